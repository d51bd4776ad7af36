"""
The study's report from its committed files (results/reproduce.sh writes them part by part): one table of every
hybrid (student x method x budget) beside the teacher and the all-linear student, the retention of the teacher's
recall per length, the KL-guided hybrid's lead over the other selections of its student and budget, the curve of
recall against distill tokens of the 25% hybrids, recall against the number of softmax layers, recall against the
distill's sequence length, and the per-layer score plots of both students. CPU only; parts not run yet are left
out, parts started but not finished named.

    python results/report.py                       # prints the report, writes results/study/report.md (+ png)
    python results/report.py --res=results/study --out=results/study/report.md
"""

import glob
import json
import os
import re
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common import parse_args  # noqa: E402

LENGTHS = ("1024", "2048", "4096")


@dataclass
class Config:
    res: str = "results/study"      # the study's files (results/reproduce.sh)
    out: str = ""                   # the report; "" -> <res>/report.md (plots beside it)


def row(label, m, teacher):
    """One line of the table: recall (avg and per length), retention per length, KL, perplexity."""
    r = m["recall"]
    by = r["by_length"]
    keep = [by.get(n, 0) / teacher["recall"]["by_length"][n] if teacher["recall"]["by_length"].get(n) else None
            for n in LENGTHS]
    cells = [label, f"{r['avg']:.3f}", " / ".join(f"{by.get(n, float('nan')):.3f}" for n in LENGTHS),
             " / ".join("n/a" if k is None else f"{100 * k:.0f}%" for k in keep), f"{m.get('kl') or 0:.3f}",
             f"{m['ppl']:.2f}"]
    return "| " + " | ".join(cells) + " |"


def save_plot(path, draw, size, what):
    """draw(ax) into path (png) with a legend; the report's line that names it, or says that matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"(matplotlib is not installed: no plot of {what.lower()})"
    fig, ax = plt.subplots(figsize=size)
    draw(ax)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small")   # outside: no line hidden
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"{what}: {os.path.basename(path)}"


def labelled(models, prefix):
    """The model of an eval (eval.json's models) whose label starts with prefix ("finetune", "distill"), or None."""
    return next((m for label, m in models.items() if label.startswith(prefix)), None)


def softmax_layers(m):
    """How many of an eval's model's layers kept softmax attention."""
    return sum(x == "attn" for x in m["mixers"])


def style(student, method):
    """A colour per selection method and a line style per student, the same in every plot."""
    return dict(color=f"C{('ga_s1', 'kl', 'uniform').index(method)}", ls="-" if student == "gla" else "--")


def gaps(finals, se):
    """The KL-guided hybrid's lead over each other selection of the same student and budget: recall, then per length,
    and the bound on a difference's standard error (two independent evals: sqrt(2) times one's)."""
    lines, nan = [], float("nan")
    for (student, name), m in sorted(finals.items()):
        if not name.startswith("kl_"):
            continue
        for other in ("uniform", "ga_s1"):
            o = finals.get((student, other + name[2:]))
            if o:
                a, b = m["recall"], o["recall"]
                per = [a["by_length"].get(n, nan) - b["by_length"].get(n, nan) for n in LENGTHS]
                lines.append(f"- {student} {name} - {other}{name[2:]}: {a['avg'] - b['avg']:+.3f} ("
                             + " / ".join(f"{d:+.3f}" for d in per) + ")")
    if lines:
        lines = ["The KL-guided hybrids' lead, recall (1K / 2K / 4K); a difference's standard error at most "
                 f"{2 ** 0.5 * se / 3 ** 0.5:.3f} for the recall column, {2 ** 0.5 * se:.3f} per length:", "",
                 *lines, ""]
    return lines


def budget_lines(finals):
    """Recall against the number of softmax layers: one line per student and selection method, from its student's
    all-linear point (0 softmax layers) where that was evaluated, through each budget's hybrid."""
    lines = {}
    for (student, name), m in finals.items():
        if name != "linear":
            lines.setdefault((student, name.rsplit("_", 1)[0]), []).append((softmax_layers(m), m["recall"]["avg"]))
    for (student, _), points in lines.items():
        if (student, "linear") in finals:
            points.append((0, finals[(student, "linear")]["recall"]["avg"]))
        points.sort()
    return dict(sorted(lines.items()))


def seqlen_lines(evals, part_of, res, se):
    """The 25% kl hybrids distilled at other sequence lengths (hybrids kl_25_s<L>, not finetuned, their evals' largest
    standard error bound se) beside the same student's kl_25 curve snapshot at the same tokens (the curve's last), at
    the length its distill log says: recall, per length, KL."""
    rows = {}   # (student, length, from the curve) -> the model's eval
    for (student, name), models in evals.items():
        if name.startswith("kl_25_s"):
            rows[(student, int(name[len("kl_25_s"):]), False)] = labelled(models, "distill")
    for student in {s for s, _, _ in rows}:
        part = os.path.join(res, part_of.get((student, "kl_25"), ""))
        if os.path.exists(os.path.join(part, "kl_25", "eval_curve.json")):
            models = json.load(open(os.path.join(part, "kl_25", "eval_curve.json")))["models"]
            n = max(int(label.split("_")[1]) for label in models if label.startswith("tokens_"))
            log = open(os.path.join(part, "logs", "distill_kl_25.log")).read()   # its config, printed first
            L = int(re.search(r"^\s*seq_len = (\d+)$", log, re.M)[1])
            rows[(student, L, True)] = models[f"tokens_{n}"]
    if not rows:
        return []
    lines = ["Recall against the distill's sequence length (the kl 25% hybrids, the same tokens per step and steps, "
             f"not finetuned, a quarter of the prompts; standard error of an average at most {se / 3 ** 0.5:.3f}, of "
             f"a length {se:.3f}):", "", "| student | distill length | recall | 1K / 2K / 4K | KL |",
             "|---|---|---|---|---|"]
    for (student, L, curve), m in sorted(rows.items()):
        by = m["recall"]["by_length"]
        lines.append(f"| {student} | {L}{' (kl_25, the curve)' if curve else ''} | {m['recall']['avg']:.3f} | "
                     + " / ".join(f"{by.get(n, float('nan')):.3f}" for n in LENGTHS) + f" | {m.get('kl') or 0:.3f} |")
    return lines + [""]


def se_bound(ev):
    """The largest standard error of one length's recall in an eval (eval.json's contents): the mean of tasks x
    prompts scores in [0, 1], whose variance is at most 1/4 each."""
    st = ev["settings"]
    return (0.25 / (len(st["tasks"]) * st["prompts"])) ** 0.5


def main(cfg):
    out = cfg.out or os.path.join(cfg.res, "report.md")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    evals, part_of, se, seqlen_se = {}, {}, [], 0.   # (student, name) -> eval.json's models, the part that made it;
    # the SE bounds of the finetuned hybrids' evals (the table's), the largest of the others
    for path in sorted(glob.glob(os.path.join(cfg.res, "*", "*", "eval.json"))):
        ev = json.load(open(path))
        if labelled(ev["models"], "finetune"):   # the table's evals
            se.append(se_bound(ev))
        else:
            seqlen_se = max(seqlen_se, se_bound(ev))
        part, name = path.split(os.sep)[-3:-1]
        student = part.split("_")[1] if part.startswith("score_") else part.split("_")[0]
        evals[(student, name)] = ev["models"]
        part_of[(student, name)] = part
    scores = {os.path.basename(os.path.dirname(p)).split("_", 1)[1]: json.load(open(p))["scores"]
              for p in sorted(glob.glob(os.path.join(cfg.res, "score_*", "scores.json")))}
    if not evals and not scores:
        raise SystemExit(f"no eval.json under {cfg.res}/<part>/<hybrid>/ and no scores.json under "
                         f"{cfg.res}/score_<student>/: run `bash results/reproduce.sh next` first")
    report = ["# The study: KL-guided selection at scale", ""]
    curves, curve_se, finals = {}, 0., {}   # (student, name) -> [(tokens, recall)], its evals' largest SE bound
    if se:   # a finetuned hybrid evaluated: the teacher as its eval saw it, with all the prompts
        teacher = next(m["teacher"] for m in evals.values() if labelled(m, "finetune"))
        lines = ["| model | recall | 1K / 2K / 4K | retention 1K / 2K / 4K | KL | ppl |", "|---|---|---|---|---|---|",
                 row("teacher", teacher, teacher)]
        tasks = list(teacher["recall"]["by_task"])   # where the recall is lost: per task, over the lengths
        task_row = lambda label, m: f"| {label} | " + " | ".join(  # noqa: E731
            f"{m['recall']['by_task'].get(t, float('nan')):.2f}" for t in tasks) + " |"
        by_task = ["| model | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|",
                   task_row("teacher", teacher)]
        for (student, name), models in sorted(evals.items()):
            final = labelled(models, "finetune")
            if final is None:
                continue
            finals[(student, name)] = final
            lines.append(row(f"{student} {name} ({softmax_layers(final)} softmax)", final, teacher))
            by_task.append(task_row(f"{student} {name}", final))
            curve = os.path.join(cfg.res, part_of[(student, name)], name, "eval_curve.json")
            if os.path.exists(curve):   # snapshots and the whole distill, evaluated with fewer prompts
                ev = json.load(open(curve))
                cm = ev["models"]
                curve_se = max(curve_se, se_bound(ev))   # the largest over the curves
                snaps = {int(label.split("_")[1]): m for label, m in cm.items() if label.startswith("tokens_")}
                distilled = labelled(cm, "distill")
                curves[(student, name)] = [(f"{n / 1e6:g}M", snaps[n]["recall"]["avg"]) for n in sorted(snaps)] + [
                    ("all distill tokens", distilled["recall"]["avg"]), ("finetuned", final["recall"]["avg"])]
        report += ["Recall: RULER's string_match_all over the six tasks of recall.py; retention = hybrid / teacher "
                   "recall at each length.", "", *lines, "", "Recall per task (over the lengths):", "", *by_task, "",
                   f"Standard error of a length's recall at most {max(se):.3f} (tasks x prompts scores in [0, 1])."
                   if len(set(se)) == 1 else f"Standard error of a length's recall at most {min(se):.3f} to "
                   f"{max(se):.3f}, by the eval's prompts (tasks x prompts scores in [0, 1]).", ""]
        report += gaps(finals, max(se))
    else:
        report += ["No hybrid evaluated yet: only the scores below.", ""]
    if curves:
        report += ["Recall against distill tokens (25% hybrids, a quarter of the prompts, standard error of an "
                   f"average at most {curve_se / 3 ** 0.5:.3f}; the last point finetuned, with all the prompts):", ""]
        report += [f"- {student} {name}: " + ", ".join(f"{n} {v:.3f}" for n, v in c)
                   for (student, name), c in curves.items()] + [""]
    report += seqlen_lines(evals, part_of, cfg.res, seqlen_se)
    for student, sc in scores.items():   # lower = more important: the order kl keeps them in
        order = sorted(range(len(sc)), key=lambda i: sc[i])
        report += [f"Scores of {student} (probe KL, lower = keep softmax), most important first: "
                   + ", ".join(f"{i} {sc[i]:.3f}" for i in order), ""]
    if curves:
        def draw(ax):
            for (student, name), c in curves.items():
                ax.plot([label for label, _ in c], [v for _, v in c], marker="o", label=f"{student} {name}",
                        **style(student, name.rsplit("_", 1)[0]))
            ax.axhline(teacher["recall"]["avg"], color="gray", ls=":", label="teacher")
            ax.set(xlabel="distill tokens", ylabel="recall (1K/2K/4K average)", title="recall against distill tokens",
                   ylim=(0, None))
        report += [save_plot(os.path.join(os.path.dirname(out), "curve.png"), draw, (7.5, 3.5),
                             "Recall against distill tokens"), ""]
    lines = budget_lines(finals)
    if any(len(points) > 1 for points in lines.values()):
        def draw(ax):
            for (student, method), points in lines.items():
                ax.plot(*zip(*points), marker="o", label=f"{student} {method}", **style(student, method))
            ax.axhline(teacher["recall"]["avg"], color="gray", ls=":", label="teacher")
            ax.set(xlabel=f"softmax layers (of {len(teacher['mixers'])})", ylabel="recall (1K/2K/4K average)",
                   title="recall against softmax layers", ylim=(0, None))
        report += [save_plot(os.path.join(os.path.dirname(out), "budget.png"), draw, (7.5, 3.5),
                             "Recall against softmax layers"), ""]
    if scores:
        def draw(ax):
            for student, s in scores.items():
                ax.plot(range(len(s)), s, marker="o", label=student)
            ax.set(xlabel="layer", ylabel="probe KL (lower = keep softmax)", title="per-layer scores")
        report += [save_plot(os.path.join(os.path.dirname(out), "scores.png"), draw, (8, 3), "Per-layer scores"), ""]
    missing = sorted({p for p in os.listdir(cfg.res) if os.path.isdir(os.path.join(cfg.res, p))
                      and not os.path.exists(os.path.join(cfg.res, p, "done"))})
    if missing:
        report += ["Parts started but not finished: " + ", ".join(missing), ""]
    text = "\n".join(report)
    print(text)
    with open(out, "w") as f:
        f.write(text)
    return text


if __name__ == "__main__":
    main(parse_args(Config))
