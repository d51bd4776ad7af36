"""results/reproduce.sh, the study at scale, in its CPU preset on the tiny teacher: parts run in order (a kl part
refuses to start before its student's scores exist; `next` prefers a part whose student's Stage 1 is already there,
and that part reuses it; `next 2` runs a second part in OUT_DIR/gpu1; a part cut short resumes, keeping the hybrids
it finished, but not with other sizes; a part done does not run again), leave their files under RES, say they are
done, take the selection from the committed scores, and results/report.py builds the table and the curve from those
files."""

import fcntl
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_report():
    """results/report.py as a module (results/ is not a package)."""
    spec = importlib.util.spec_from_file_location("report", os.path.join(ROOT, "results", "report.py"))
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    return report


def test_study_runs_in_parts_and_reports(tiny_teacher, tiny_corpus, tmp_path):
    res = tmp_path / "res"
    # a stand-in nvidia-smi that writes a line every half second, as `-l 15` would every 15 s, until killed
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text('#!/bin/sh\necho "$$" >> "$(dirname "$0")/pids"\n'
                                        'while true; do echo "12:00:00, 1980 MHz, $$, $*"; sleep 0.5; done\n')
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = dict(os.environ, PRESET="cpu", TEACHER=tiny_teacher, DATA_SRC=tiny_corpus, RES=str(res),
               OUT_DIR=str(tmp_path / "out"), OMP_NUM_THREADS="1", PYTHON=sys.executable,
               PATH=f"{bin_dir}:{os.environ['PATH']}")

    def study(*args, **sizes):
        return subprocess.run(["bash", "results/reproduce.sh", *args], cwd=ROOT, env=dict(env, **sizes),
                              capture_output=True, text=True, timeout=900)

    r = study("part", "gla_kl_25")
    assert r.returncode == 2 and "needs the scores of part score_gla" in r.stderr
    r = study("part", "score_gla")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # the part logged its GPU's clocks, and stopped logging when it ended
    log = (res / "score_gla" / "gpu.csv").read_text()
    assert "1980 MHz" in log and "clocks.sm" in log and "-l 15" in log
    for pid in (bin_dir / "pids").read_text().split():
        assert not os.path.exists(f"/proc/{pid}"), "the part left its nvidia-smi running"
    # a report before any hybrid: the scores alone
    report = subprocess.run([sys.executable, "results/report.py", f"--res={res}"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert report.returncode == 0 and "No hybrid evaluated yet" in report.stdout, report.stderr[-2000:]
    assert "Scores of gla" in report.stdout
    # next: score_gdn comes first in the list, but a part of gla starts from the Stage 1 already on this machine
    r = study("next", "1")
    assert r.returncode == 0 and "gla_kl_25 done" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert not (res / "score_gdn").exists()
    stages = [line.split()[0] for line in open(res / "gla_kl_25" / "times.txt")]
    assert "transfer" not in stages and "nothing to do" in open(res / "gla_kl_25" / "logs" / "align.log").read()
    # two parts of one student never share its run folder at once: a running part holds its lock
    with open(tmp_path / "out" / "study_gla.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        r = study("part", "gla_linear")
    assert r.returncode == 3 and "another part of gla is running" in r.stderr, r.stderr[-3000:]
    r = study("part", "gla_linear")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = study("part", "gla_linear")   # a part done is not run again by accident
    assert r.returncode == 2 and "gla_linear is done" in r.stderr and "remove" in r.stderr, r.stderr[-3000:]
    # a part cut short (here: after its first hybrid, uniform_12, was copied) resumes: that hybrid is kept, not
    # trained again, and the time spent before counts in the part's time
    r = study("part", "gla_uniform_small")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    small = res / "gla_uniform_small"
    (small / "done").unlink()
    shutil.rmtree(small / "uniform_50")
    status = study("status").stdout
    cut = re.search(r"pending  gla_uniform_small  \(~(\d+) GPU-min on one H200, estimated; cut short, it resumes "
                    r"with the hybrids it finished: uniform_12\)", status)
    fresh = re.search(r"pending  gla_ga_s1_small  \(~(\d+) GPU-min", status)
    assert cut and fresh and int(cut[1]) < int(fresh[1]), status   # its finished hybrid is not counted as left
    # resumed with other sizes, it would mix two recipes in one part: refused, the fix named
    r = study("part", "gla_uniform_small", SMALL_TOKENS="128")
    assert r.returncode == 2 and "uniform_12" in r.stderr and "made by another recipe" in r.stderr and \
        "distill=1 " in r.stderr and "remove" in r.stderr, r.stdout[-3000:] + r.stderr[-3000:]
    earlier = sum(int(line.split()[1].rstrip("s")) for line in open(small / "times.txt") if line[:2] != "--")
    gpu_log = (small / "gpu.csv").read_text()
    r = study("part", "gla_uniform_small")
    assert r.returncode == 0 and "uniform_12: kept from an earlier run" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    resumed = open(small / "times.txt").read().split("-- resumed")[-1].split()
    assert "distill_uniform_50" in resumed and not [s for s in resumed if s.endswith("uniform_12")], resumed
    assert (small / "uniform_50" / "eval.json").exists() and (small / "uniform_12" / "eval.json").exists()
    after = (small / "gpu.csv").read_text()   # the resumed run's GPU log follows the earlier runs' (its own pid)
    assert after.startswith(gpu_log) and len(after) > len(gpu_log), (gpu_log[-300:], after[:300])
    done = (small / "done").read_text()
    assert int(done.split("s")[0]) >= earlier and f"({earlier}s of it in an earlier run)" in done, done
    # next 2: GPU 0 takes a part of gla (its Stage 1 is in OUT_DIR), GPU 1 the first part in the list, in OUT_DIR/gpu1
    r = study("next", "2")
    assert r.returncode == 0 and "gla_uniform_25 done" in r.stdout and "score_gdn done" in r.stdout, \
        r.stdout[-3000:] + r.stderr[-3000:]
    assert "transfer" not in open(res / "gla_uniform_25" / "times.txt").read()
    assert (tmp_path / "out" / "gpu1" / "study_gdn" / "align" / "ckpt.pt").exists()
    assert not (tmp_path / "out" / "study_gdn").exists()
    status = study("status").stdout
    assert "done     score_gla" in status and "done     gla_kl_25" in status and "pending  gdn_kl_25" in status
    assert re.search(r"GPU time: \d+ min spent on the parts done, ~\d+ min left", status), status
    scores = json.load(open(res / "score_gla" / "scores.json"))["scores"]
    chosen = json.load(open(res / "gla_kl_25" / "kl_25" / "selection_kl_25.json"))["layers"]
    assert chosen == [min(range(len(scores)), key=scores.__getitem__)]   # 25% of 4 layers: the lowest score
    curve = json.load(open(res / "gla_kl_25" / "kl_25" / "eval_curve.json"))["models"]
    assert {"tokens_128", "tokens_256", "distill_kl_25"} <= curve.keys()
    # the sequence-length check: the kl 25% hybrid distilled at 128 and 32 tokens (SEQ_LEN 64 x BATCH 2 per step in
    # both, so 1 x 128 and 4 x 32), up to the last snapshot (256 tokens: 2 steps), evaluated without a finetune and
    # with a quarter of the prompts (8 here: 2, whose wider standard error must not enter the leads')
    r = study("part", "gdn_kl_seqlen", PROMPTS="8")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    stages = open(res / "gdn_kl_seqlen" / "times.txt").read()
    assert "distill_kl_25_s128" in stages and "distill_kl_25_s32" in stages and "finetune" not in stages, stages
    for L, b in ((128, 1), (32, 4)):
        log = open(res / "gdn_kl_seqlen" / "logs" / f"distill_kl_25_s{L}.log").read()
        assert f"seq_len = {L}\n" in log and f"batch_size = {b}\n" in log and "steps = 2\n" in log, log[:3000]
        ev = json.load(open(res / "gdn_kl_seqlen" / f"kl_25_s{L}" / "eval.json"))
        assert list(ev["models"]) == ["teacher", f"distill_kl_25_s{L}"] and ev["settings"]["prompts"] == 2, ev
    report = subprocess.run([sys.executable, "results/report.py", f"--res={res}"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    assert "| gla kl_25 (1 softmax) |" in report.stdout and "| gla linear (0 softmax) |" in report.stdout
    assert "- gla kl_25: 0.000128M" in report.stdout and (res / "report.md").exists()
    # one prompt per task and length in the CPU preset: the standard error bound of 1/4 over 1 task x 1 prompt
    assert "Standard error of a length's recall at most 0.500" in report.stdout, report.stdout
    assert "- gla kl_25 - uniform_25: " in report.stdout, report.stdout   # the lead (test below)
    assert "| gdn | 32 | " in report.stdout and "| gdn | 128 | " in report.stdout, report.stdout   # (test below)
    assert "gdn kl_25_s" not in report.stdout, report.stdout   # not finetuned: not in the table of hybrids


def test_report_seqlen_sets_each_length_beside_the_curve_at_the_same_tokens(tmp_path):
    """The sequence-length check: each kl_25_s<L> hybrid's recall, ordered by length, beside its student's kl_25
    curve at the last snapshot (the same tokens) at the length that kl_25's distill log says it was distilled at."""
    report = load_report()
    rec = lambda avg: {"recall": {"avg": avg, "by_length": dict.fromkeys(report.LENGTHS, avg)}, "kl": 0.1}  # noqa: E731
    keep = tmp_path / "gdn_kl_25" / "kl_25"
    keep.mkdir(parents=True)
    (tmp_path / "gdn_kl_25" / "logs").mkdir()   # the committed log's config (its length) as the part wrote it
    shutil.copy(os.path.join(ROOT, "results", "study", "gdn_kl_25", "logs", "distill_kl_25.log"),
                tmp_path / "gdn_kl_25" / "logs")
    (keep / "eval_curve.json").write_text(json.dumps({"models": {
        "teacher": rec(0.9), "tokens_5000000": rec(0.2), "tokens_20000000": rec(0.3), "distill_kl_25": rec(0.35)}}))
    evals = {("gdn", f"kl_25_s{L}"): {"teacher": rec(0.9), f"distill_kl_25_s{L}": rec(v)}
             for L, v in ((8192, 0.4), (2048, 0.25), (4096, 0.31))}
    lines = report.seqlen_lines({**evals, ("gdn", "kl_25"): {}}, {("gdn", "kl_25"): "gdn_kl_25"}, str(tmp_path), 0.05)
    assert [x.split(" | ")[1:3] for x in lines if x.startswith("| gdn")] == [
        ["2048", "0.250"], ["4096", "0.310"], ["4096 (kl_25, the curve)", "0.300"], ["8192", "0.400"]], lines
    assert "at most 0.029, of a length 0.050" in lines[0], lines[0]
    assert report.seqlen_lines({("gdn", "kl_25"): {}}, {}, str(tmp_path), 0.05) == []   # no check run: no section


def test_report_gaps_compare_one_student_and_budget():
    """The KL-guided hybrid's lead is taken over the other selections of its own student and budget, kl minus the
    other, per length too, with the standard error of a difference (sqrt(2) times one eval's)."""
    report = load_report()
    rec = lambda avg, *by: {"recall": {"avg": avg, "by_length": dict(zip(report.LENGTHS, by))}}  # noqa: E731
    finals = {("gla", "kl_25"): rec(0.5, 0.6, 0.5, 0.4), ("gla", "uniform_25"): rec(0.2, 0.3, 0.2, 0.1),
              ("gla", "ga_s1_12"): rec(0.1, 0.1, 0.1, 0.1), ("gdn", "uniform_25"): rec(0.0, 0.0, 0.0, 0.0),
              ("gdn", "kl_12"): rec(0.4, 0.4, 0.4, 0.4), ("gdn", "ga_s1_12"): rec(0.45, 0.5, 0.45, 0.4)}
    lines = report.gaps(finals, 0.02)
    assert [x for x in lines if x.startswith("- ")] == ["- gdn kl_12 - ga_s1_12: -0.050 (-0.100 / -0.050 / +0.000)",
                                                        "- gla kl_25 - uniform_25: +0.300 (+0.300 / +0.300 / +0.300)"]
    assert "at most 0.016 for the recall column, 0.028 per length" in lines[0]
    assert report.gaps({("gla", "kl_25"): finals[("gla", "kl_25")]}, 0.02) == []   # nothing to compare with


def test_report_budget_lines_run_from_the_linear_student_by_softmax_layers():
    """The plot of recall against softmax layers: one line per student and method, its points ordered by the number
    of softmax layers, starting from the same student's all-linear point (and only where that exists)."""
    report = load_report()
    m = lambda k, avg: {"mixers": ["attn"] * k + ["gla"] * (8 - k), "recall": {"avg": avg}}  # noqa: E731
    finals = {("gla", "kl_50"): m(4, 0.4), ("gla", "kl_12"): m(1, 0.2), ("gla", "linear"): m(0, 0.0),
              ("gla", "ga_s1_12"): m(1, 0.1), ("gdn", "kl_25"): m(2, 0.3)}
    assert report.budget_lines(finals) == {("gdn", "kl"): [(2, 0.3)], ("gla", "ga_s1"): [(0, 0.0), (1, 0.1)],
                                           ("gla", "kl"): [(0, 0.0), (1, 0.2), (4, 0.4)]}


def test_status_sums_the_parts_and_says_when_all_are_done(tmp_path):
    """status adds each done part's seconds (its `done` line) and, with none pending, says so instead of an
    estimate of what is left."""
    env = dict(os.environ, RES=str(tmp_path / "res"), OUT_DIR=str(tmp_path / "out"))

    def status():
        r = subprocess.run(["bash", "results/reproduce.sh", "status"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout

    parts = re.findall(r"pending  (\w+)", status())
    assert len(parts) == 17 and "gdn_kl_seqlen" in parts, parts
    for p in parts:
        (tmp_path / "res" / p).mkdir(parents=True)
        (tmp_path / "res" / p / "done").write_text("120s on cpu at abc 2026-12-01\n")
    out = status()
    assert "pending" not in out and f"GPU time: {len(parts) * 2} min spent on the parts, all done" in out, out
    (tmp_path / "res" / parts[-1] / "done").unlink()
    out = status()
    assert f"GPU time: {(len(parts) - 1) * 2} min spent on the parts done, ~" in out and "all done" not in out, out
