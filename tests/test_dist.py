"""The stages under torchrun (2 processes, gloo on the CPU) against one process: the same global batches split over
the ranks give the same model (DDP, and FSDP2 with --shard=true) up to reduction order; score.py splits its layers
over the ranks and writes the same scores.json, and a rerun under torchrun skips what is finished; a bad setting on
the ranks stops the run with one clear message."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--batch_size=4", "--seq_len=32", "--device=cpu", "--log_every=1"]


def torchrun(script, *args, procs=2):
    cmd = ([shutil.which("torchrun")] if shutil.which("torchrun") else [sys.executable, "-m", "torch.distributed.run"])
    cmd += ["--standalone", f"--nproc_per_node={procs}", script, *args] if procs > 1 else [script, *args]
    if procs == 1:
        cmd = [sys.executable, script, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def common(aligned):
    return [f"--input={aligned.align_ckpt}", f"--data_dir={aligned.data_dir}"]


def test_distill_on_two_processes_equals_one(aligned, common, tmp_path):
    args = ["--layers=1", "--steps=4", "--valid_batches=1", "--save_every=2", f"--out_dir={tmp_path}", *FAST, *common]
    runs = {}
    for name, procs, extra in (("one", 1, []), ("ddp", 2, []), ("fsdp", 2, ["--shard=true"])):
        r = torchrun("distill.py", f"--run_name={name}", *args, *extra, procs=procs)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        runs[name] = weights(os.path.join(tmp_path, name, "distill", "ckpt.pt"))
        if procs == 2:
            assert "x 2 processes (torchrun)" in r.stdout and r.stdout.count("final |") == 1  # rank 0 alone logs
    assert max_diff(runs["one"], runs["ddp"]) < 1e-6
    assert max_diff(runs["one"], runs["fsdp"]) < 1e-6
    logs = {n: [json.loads(x)["kl"] for x in open(os.path.join(tmp_path, n, "distill", "log.jsonl"))] for n in runs}
    assert logs["one"] == pytest.approx(logs["ddp"], rel=1e-5) and logs["one"] == pytest.approx(logs["fsdp"], rel=1e-5)


def test_align_on_two_processes_equals_one(aligned, tmp_path):
    args = [f"--input={aligned.transfer_ckpt}", f"--data_dir={aligned.data_dir}", "--steps=3", "--valid_batches=1",
            f"--out_dir={tmp_path}", *FAST]
    for name, procs in (("one", 1), ("two", 2)):
        r = torchrun("align.py", f"--run_name={name}", *args, procs=procs)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = (weights(os.path.join(tmp_path, n, "align", "ckpt.pt")) for n in ("one", "two"))
    assert max_diff(a, b) < 1e-6


def test_score_splits_layers_over_the_ranks(aligned, common, tmp_path):
    args = ["--steps=4", "--eval_every=2", "--patience=0", "--batch_size=2", "--seq_len=32", "--device=cpu", *common]
    for name, procs in (("one", 1), ("two", 2)):
        r = torchrun("score.py", f"--run_name={name}", f"--out_dir={tmp_path}", *args, procs=procs)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    one, two = (json.load(open(os.path.join(tmp_path, n, "score", "scores.json"))) for n in ("one", "two"))
    assert one["ranking"] == two["ranking"] and one["scores"] == pytest.approx(two["scores"], rel=1e-6)
    again = torchrun("score.py", "--run_name=two", f"--out_dir={tmp_path}", *args)
    assert again.returncode == 0 and "skipping 4 finished ones [0, 1, 2, 3]" in again.stdout


def test_a_failure_on_the_ranks_stops_the_run_with_its_message(aligned, common, tmp_path):
    r = torchrun("distill.py", "--run_name=bad", f"--out_dir={tmp_path}", "--layers=1", "--steps=2", "--batch_size=3",
                 "--seq_len=32", "--device=cpu", *common)
    assert r.returncode != 0 and "--batch_size=3 does not split over 2 processes" in r.stderr


def test_allreduce_benchmark_runs_under_torchrun():
    """bench_train --allreduce_mb: the link DDP averages gradients over, timed on the ranks (gloo here)."""
    r = torchrun("bench_train.py", "--allreduce_mb=1,4")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.count("all_reduce") == 2 and "over 2 processes" in r.stdout and "GB/s" in r.stdout
    alone = torchrun("bench_train.py", "--allreduce_mb=1", procs=1)
    assert alone.returncode != 0 and "needs several processes" in alone.stderr


def test_bench_train_runs_each_stage_under_torchrun(tmp_path):
    """bench_train --gpus=2: a stage runs as 2 torchrun processes (here a script that leaves a file named by its rank
    and world size: printing, the two processes' lines could interleave)."""
    import bench_train
    (tmp_path / "stage.py").write_text("import os\nenv = os.environ.get\n"
                                       "open(f\"rank{env('RANK', '0')}_of_{env('WORLD_SIZE', '1')}\", 'w').close()\n")
    log = str(tmp_path / "log")
    bench_train.sh(str(tmp_path), "stage.py", "", log, gpus=2)
    assert sorted(p.name for p in tmp_path.glob("rank*")) == ["rank0_of_2", "rank1_of_2"], open(log).read()
    bench_train.sh(str(tmp_path), "stage.py", "", log)
    assert (tmp_path / "rank0_of_1").exists()


def test_bench_train_refuses_finetune_without_its_distill(tmp_path):
    """finetune reads the distill checkpoint of its shape: without distill before it in --stages the benchmark
    stops at once with the fix, not after the other stages ran (an H200 session lost its finetune rows that way)."""
    import bench_train
    for stages in ("align,probe,finetune", "finetune,distill"):
        with pytest.raises(SystemExit, match="distill must come before"):
            bench_train.main(bench_train.Config(data_dir=str(tmp_path), stages=stages, out_dir=str(tmp_path)))
