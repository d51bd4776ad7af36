"""
Evaluate hybrids beside their teacher: held-out perplexity and KL to the teacher, a synthetic long-context recall
suite, and the speed and memory of decoding, for several checkpoints in one run and one table.

The paper's claim is about long-context recall (RULER, needle-in-a-haystack), where hybrids that keep different
softmax layers differ most; short tasks barely move. The hybrid's selling point, a fixed-size GLA state instead of a
growing KV cache, the paper never measured: here prefill, decode and cache are measured for teacher and hybrids in
the same run, and every student number has the teacher's beside it.

    ppl = exp(mean_t -log q(x_t+1 | x_<=t))      KL = mean_t sum_v p(v | x_<=t) (log p - log q)   (p teacher, q student)
    on windows of --ppl_seq_len tokens of the valid split (data.py's valid.bin).

Recall: the suite of recall.py (needle-in-a-haystack with one needle, several keys, values or queries; variable
tracking; multi-query associative recall), the same prompts for every model, scored as RULER scores
(string_match_all: the fraction of expected answers that occur in the output, case-insensitive) and, beside it, by
whole words only (whole_word: "12345678" does not count for "1234567").

lm-evaluation-harness (--lm_eval=tasks; pip install lm-eval==0.4.13 wonderwords nltk): the harness's tasks through
lm_eval_nanohybrid.py, for every model. RULER's locally generated tasks (niah_single_1, niah_multikey_2,
niah_multikey_3, ruler_vt, ruler_cwe, ruler_fwe) run offline at each of --lengths, --lm_eval_limit samples per length.

Lengths past the teacher's max_position_embeddings (--lengths, --ppl_seq_len) are measured (RoPE extends) but test
extrapolation: eval says so before it starts, and marks those numbers ("past max_pos") in the table and eval.json.

Speed (GPU, bf16 weights; CPU only with --speed=on): the path of model.generate. Prefill of T random tokens
(chunked GLA kernel; causal SDPA for attention), then --decode_tokens greedy steps through model.decoder (on the GPU
one CUDA graph per step, replayed; KV cache for attention layers, recurrent GLA state), once per decode mode (eager,
fused: bench), beside the step's floor and kernel count; cache bytes = the KV buffers of the attention
layers + the fp32 GLA states of new_cache(B, T + 2 + decode_tokens) (+ 2 on the GPU); peak =
torch.cuda.max_memory_allocated during the fused decode. Lengths past max_position_embeddings still time correctly (RoPE
extends); a length that runs out of memory is marked "oom".

Reads  the run's final checkpoints (out/<run>/finetune, else distill, plus distill_*/finetune_*) or --models=a,b;
       the teacher and data_dir named in their config (else out/<run>/data): its valid.bin.
Writes out/<run>/eval/eval.json: settings (every flag, resolved), models (per model: mixers, ppl, kl, recall {avg,
       by_task, by_length, by_task_length, by_depth, examples, whole_word {avg, by_task, by_length, by_task_length},
       past_max_pos}, lm_eval {task: {metric or length: value}}, speed [per batch x length, with vs_teacher ratios]),
       summary (the printed table), notes, plots; and recall.png, niah_depth.png, speed.png when matplotlib is there.

    python eval.py --run_name=tiny --lengths=256 --prompts=2 --ppl_seq_len=64 --speed=on --speed_lengths=64,128 \
        --speed_batch=2
    python eval.py --run_name=smollm2                             # one GPU: all checkpoints of the run + the teacher
    python eval.py --run_name=smollm2 --lm_eval=niah_single_1,ruler_vt --lm_eval_limit=100  # + the harness's RULER
"""

import glob
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

import data
from common import autocast, inherit, kl_div_chunked, parse_args, pick_device, print_config, write_json
from model import load_checkpoint
from bench_decode import bench, free
from recall import DEPTHS, FILLER, TASKS, make_prompts, recall_suite
from teachers import from_pretrained
from tokenizer import load_tokenizer

@dataclass
class Config:
    run_name: str = "smollm2"       # run name: reads <out_dir>/<run_name>/*, writes <out_dir>/<run_name>/eval/
    out_dir: str = "out"            # root of all runs
    models: str = ""                # comma-separated ckpt.pt paths; "" = the run's final checkpoints
    teacher: str = ""               # teacher source; "" = inherited from the checkpoints ("" there = SmolLM2)
    data_dir: str = ""              # token files of data.py; "" = inherited from the checkpoints, else <run>/data
    ppl_seq_len: int = 1024         # window length for perplexity and KL
    ppl_windows: int = 64           # windows of the valid split (0 = all)
    batch_size: int = 8             # windows per forward (ppl/KL); prompts per generate call (recall)
    tasks: str = ",".join(TASKS)    # recall tasks
    lengths: str = "1024,2048,4096"  # recall (and RULER) lengths in tokens; past max_position_embeddings: marked
    depths: str = "0,0.25,0.5,0.75,1"  # needle depths, cycled over the n prompts of a cell
    prompts: int = 20               # prompts per task x length
    seed: int = 0                   # seed of the prompts (two runs see the same prompts)
    haystack: str = ""              # text file for the haystack; "" = RULER's repeated filler sentences
    speed: str = "auto"             # auto (on with a GPU, off on CPU) | on | off
    speed_lengths: str = "1024,2048,4096,8192,16384,32768"  # prefill lengths for the speed/memory runs
    speed_batch: int = 8            # the larger batch of the speed runs (batch 1 always runs)
    decode_tokens: int = 64         # decode steps timed after the prefill
    lm_eval: str = ""               # lm-evaluation-harness tasks, comma-separated ("" = none); RULER's at --lengths
    lm_eval_limit: int = 0          # documents per lm_eval task (RULER: per length; it makes 500); 0 = all
    device: str = ""                # "" = cuda if available else cpu


# ------------------------------------------------------------------------------------------- quality and speed

@torch.no_grad()
def quality(model, teacher, valid, cfg, device):
    """(perplexity, KL(teacher || model) per token, tokens scored) on consecutive windows of the valid split."""
    T = cfg.ppl_seq_len
    n_win = (len(valid) - 1) // T if not cfg.ppl_windows else min(cfg.ppl_windows, (len(valid) - 1) // T)
    if n_win == 0:
        raise ValueError(f"the valid split has {len(valid)} tokens, fewer than --ppl_seq_len+1 = {T + 1}")
    nll = kl = 0.0
    W, Wt = model.lm_head.weight.detach().float(), teacher.lm_head.weight.detach().float()
    for s in range(0, n_win, cfg.batch_size):
        xy = np.stack([valid[i * T:i * T + T + 1] for i in range(s, min(s + cfg.batch_size, n_win))])
        xy = torch.from_numpy(xy.astype(np.int64)).to(device)
        with autocast(device):
            h = model(xy[:, :-1], return_hidden=True).flatten(0, 1).float()
        y = xy[:, 1:].flatten()
        for i in range(0, len(h), 4096):  # row chunks: no [B*T, vocab] fp32 logits
            nll += F.cross_entropy(h[i:i + 4096] @ W.t(), y[i:i + 4096], reduction="sum").item()
        if model is not teacher:
            with autocast(device):
                ht = teacher(xy[:, :-1], return_hidden=True).flatten(0, 1).float()
            kl += kl_div_chunked(h, W, ht, Wt).item() * len(h)
    return math.exp(nll / (n_win * T)), kl / (n_win * T), n_win * T


def ints(text, flag):
    """'1024,2048' -> [1024, 2048]; a clear error for anything that is not a list of positive integers."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{flag}={text!r}: give positive integers separated by commas, e.g. 1024,2048") from None
    if not values or min(values) < 1:
        raise ValueError(f"--{flag}={text!r}: give at least one positive integer, e.g. --{flag}=1024,2048")
    return values


def check(cfg):
    """Refuse bad flags before anything loads, naming the flag and the fix."""
    for flag, low in (("prompts", 1), ("ppl_seq_len", 1), ("ppl_windows", 0), ("batch_size", 1), ("speed_batch", 1),
                      ("decode_tokens", 1), ("lm_eval_limit", 0)):
        if getattr(cfg, flag) < low:
            raise ValueError(f"--{flag}={getattr(cfg, flag)}: must be at least {low}")
    unknown = [t for t in cfg.tasks.split(",") if t and t not in TASKS]
    if unknown:
        raise ValueError(f"--tasks: unknown recall task(s) {unknown}; choose from {','.join(TASKS)} "
                         f"(or --tasks= for none; lm-evaluation-harness tasks go in --lm_eval)")
    if cfg.tasks.strip(","):
        ints(cfg.lengths, "lengths")
    try:
        depths = [float(d) for d in cfg.depths.split(",") if d.strip()]
    except ValueError:
        depths = []
    if not depths or not all(0 <= d <= 1 for d in depths):
        raise ValueError(f"--depths={cfg.depths!r}: give needle depths between 0 and 1, e.g. "
                         f"{','.join(str(d) for d in DEPTHS)}")
    if cfg.speed not in ("auto", "on", "off"):
        raise ValueError(f"--speed={cfg.speed!r}: choose auto, on or off")
    ints(cfg.speed_lengths, "speed_lengths")
    missing = [p for p in cfg.models.split(",") if p and not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"--models: {missing} do not exist (give checkpoint .pt paths, comma-separated)")
    if cfg.haystack and not os.path.isfile(cfg.haystack):
        raise FileNotFoundError(f"--haystack={cfg.haystack}: no such file (\"\" = RULER's filler sentences)")


# ------------------------------------------------------------------------------------------------------ report

def default_checkpoints(run_dir):
    """The run's final checkpoint (finetune, else distill) and any side-by-side hybrids (distill_*, finetune_*)."""
    final = [p for p in (f"{run_dir}/finetune/ckpt.pt", f"{run_dir}/distill/ckpt.pt") if os.path.exists(p)][:1]
    return final + sorted(glob.glob(f"{run_dir}/distill_*/ckpt.pt") + glob.glob(f"{run_dir}/finetune_*/ckpt.pt"))


def summarize(models, batches, past=()):
    """Rows of the printed table: {row label: {model: number or None}} (the teacher's speed numbers are absolute).
    Numbers at lengths in `past` (beyond max_position_embeddings) carry "past max_pos" in their label."""
    rows = {}
    add = lambda label, f: rows.__setitem__(label, {n: f(m) for n, m in models.items()})
    mark = lambda L: " (past max_pos)" * (int(L) in past)
    add("softmax layers", lambda m: f"{m['mixers'].count('attn')}/{len(m['mixers'])}")
    if all(m.get("ppl") for m in models.values()):
        first = next(iter(models.values()))
        add("ppl" + mark(first["ppl_seq_len"]), lambda m: m["ppl"])
        add("KL to teacher" + mark(first["ppl_seq_len"]), lambda m: m["kl"])
    if all(m.get("recall") for m in models.values()):
        first = next(iter(models.values()))["recall"]
        add("recall avg" + " (incl. past max_pos)" * any(int(L) in past for L in first["by_length"]),
            lambda m: m["recall"]["avg"])
        add("  whole words", lambda m: m["recall"]["whole_word"]["avg"])
        for t in first["by_task"]:
            add(f"  {t}", lambda m, t=t: m["recall"]["by_task"][t])
        for L in first["by_length"]:
            add(f"  @{L}" + mark(L), lambda m, L=L: m["recall"]["by_length"][L])
    if all(m.get("lm_eval") for m in models.values()):
        for t, cells in next(iter(models.values()))["lm_eval"].items():
            for key in cells:
                label = f"{t} @{key}{mark(key)}" if key.isdigit() else f"{t} {key}"
                add(label, lambda m, t=t, key=key: m["lm_eval"][t][key])
    for B in batches if all(m.get("speed") for m in models.values()) else []:
        ok = [{r["length"] for r in m["speed"] if r["batch"] == B and r["status"] == "ok"} for m in models.values()]
        if not set.intersection(*ok):
            continue
        T = max(set.intersection(*ok))
        at = lambda m, key: next(r[key] for r in m["speed"] if r["batch"] == B and r["length"] == T)
        add(f"decode tok/s B={B} T={T}", lambda m: at(m, "decode_tok_s"))
        add(f"  B={B} decode speed-up", lambda m: at(m, "vs_teacher")["decode_speedup"])
        add(f"  B={B} prefill speed-up", lambda m: at(m, "vs_teacher")["prefill_speedup"])
        add(f"  B={B} cache MB", lambda m: at(m, "cache_bytes") / 2**20)
        add(f"  B={B} cache / teacher's", lambda m: at(m, "vs_teacher")["cache_ratio"])
        if at(next(iter(models.values())), "peak_decode_bytes") is not None:
            add(f"  B={B} peak decode MB", lambda m: at(m, "peak_decode_bytes") / 2**20)
    return rows


def print_table(rows, names):
    width = max(12, *(len(n) + 2 for n in names))
    fmt = lambda v: "-" if v is None else v if isinstance(v, str) else f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    print(f"{'':28}" + "".join(f"{n:>{width}}" for n in names))
    for label, cells in rows.items():
        print(f"{label:28}" + "".join(f"{fmt(cells[n]):>{width}}" for n in names))


def plot(models, batches, out):
    """recall.png (accuracy vs length, per task), niah_depth.png (depth x length), speed.png; needs matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    rec = {n: m["recall"] for n, m in models.items() if m.get("recall")}
    heat = {n: r["by_depth"]["niah_single"] for n, r in rec.items() if "niah_single" in r["by_depth"]}
    spd = {n: m["speed"] for n, m in models.items() if m.get("speed")}
    figs = {}

    def context_axis(ax, lengths):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [f"{L // 1024}K" if L % 1024 == 0 else str(L) for L in lengths])
        ax.minorticks_off()
        ax.set_xlabel("context (tokens)")
    if rec:
        panels = list(next(iter(rec.values()))["by_task_length"]) + ["average"]
        fig, axes = figs["recall.png"] = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3), sharey=True,
                                                      layout="constrained")
        for ax, task in zip(axes, panels):
            for n, r in rec.items():
                cells = r["by_length"] if task == "average" else r["by_task_length"][task]
                ax.plot([int(L) for L in cells], list(cells.values()), marker="o", label=n)
            context_axis(ax, [int(L) for L in cells])
            ax.set(title=task, ylim=(-0.05, 1.05))
        axes[0].set_ylabel("accuracy")
        axes[-1].legend(fontsize=7)
    if heat:
        fig, axes = figs["niah_depth.png"] = plt.subplots(1, len(heat), figsize=(3 * len(heat) + 1, 3), sharey=True,
                                                          squeeze=False, layout="constrained")
        for ax, (n, cells) in zip(axes[0], heat.items()):
            depths = sorted({d for c in cells.values() for d in c}, key=float)
            grid = np.array([[cells[L].get(d, np.nan) for L in cells] for d in depths])
            im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            for (y, x), v in np.ndenumerate(grid):
                ax.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=7)
            ax.set_xticks(range(len(cells)), list(cells))
            ax.set_yticks(range(len(depths)), depths)
            ax.set(title=f"{n}: niah_single", xlabel="context (tokens)")
        axes[0][0].set_ylabel("needle depth")
        fig.colorbar(im, ax=axes[0].tolist(), label="accuracy")
    if spd:
        fig, axes = figs["speed.png"] = plt.subplots(1, 3, figsize=(14, 3.8), layout="constrained")
        for c, (n, rows) in enumerate(spd.items()):
            for B, style in zip(batches, ("-", "--")):
                ok = [r for r in rows if r["batch"] == B and r["status"] == "ok"]
                for ax, key, scale in zip(axes, ("decode_tok_s", "prefill_s", "cache_bytes"), (1, 1, 2**-20)):
                    ax.plot([r["length"] for r in ok], [r[key] * scale for r in ok], style, marker="o",
                            color=f"C{c}", label=f"{n} B={B}")
        for ax, label in zip(axes, ("decode tokens/s", "prefill seconds", "cache MB (KV + GLA state)")):
            context_axis(ax, sorted({r["length"] for rows in spd.values() for r in rows}))
            ax.set(yscale="log", ylabel=label)
        axes[0].legend(fontsize=7)
    for name, (fig, _) in figs.items():
        fig.savefig(os.path.join(out, name), dpi=110)
        plt.close(fig)
    return list(figs)


# --------------------------------------------------------------------------------------------------------- main

def main(cfg):
    check(cfg)
    device = cfg.device or pick_device()
    cuda = device.startswith("cuda")
    run_dir = os.path.join(cfg.out_dir, cfg.run_name)
    out = os.path.join(run_dir, "eval")
    notes = []

    # ---- what to evaluate: the checkpoints, and the teacher and data named in their configs; then the config
    paths = [p for p in cfg.models.split(",") if p] or default_checkpoints(run_dir)
    names = [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in paths]
    names = [n if names.count(n) == 1 else os.path.relpath(os.path.dirname(p), cfg.out_dir)
             for n, p in zip(names, paths)]
    if not paths:
        notes.append(f"no checkpoints found under {run_dir} and no --models: the teacher alone is evaluated")
    for p in paths:
        meta_path = os.path.join(os.path.dirname(p), "meta.json")
        meta = json.load(open(meta_path)) if os.path.exists(meta_path) else load_checkpoint(p)[1]
        inherit(cfg, meta.get("config", {}), ["teacher", "data_dir"])
    cfg.teacher = teacher_source = cfg.teacher or "smollm2"
    cfg.data_dir = cfg.data_dir or os.path.join(run_dir, "data")
    ruler, other = [], []
    if cfg.lm_eval:
        try:
            import lm_eval_nanohybrid as harness
        except ImportError as e:
            raise ImportError(f"--lm_eval needs lm-evaluation-harness: pip install lm-eval==0.4.13 wonderwords nltk "
                              f"({e})") from e
        ruler, other = harness.split_tasks(cfg.lm_eval)
    print_config(cfg)
    print(f"evaluating: teacher ({teacher_source})" + "".join(f", {n} ({p})" for n, p in zip(names, paths)))
    os.makedirs(out, exist_ok=True)

    # ---- load: the teacher (fp32; bf16 autocast on the GPU, as the stages train), its tokenizer, the valid split
    teacher = from_pretrained(cfg.teacher, device=device).eval()
    tok = load_tokenizer(cfg.teacher)
    max_pos = teacher.config.max_position_embeddings
    valid = None
    if os.path.exists(os.path.join(cfg.data_dir, "meta.json")):
        data.check_tokenizer(data.load_meta(cfg.data_dir), tok, cfg.data_dir)
        valid = data.load_tokens(cfg.data_dir, "valid")
    else:
        notes.append(f"no token data in {cfg.data_dir}: no perplexity or KL (run data.py, or pass --data_dir)")

    # ---- lengths past max_position_embeddings: measured (RoPE extends), said now and marked in table and json
    tasks = [t for t in cfg.tasks.split(",") if t]
    lengths = ints(cfg.lengths, "lengths") if tasks or ruler else []
    past = sorted({L for L in lengths if L > max_pos} | ({cfg.ppl_seq_len} if cfg.ppl_seq_len > max_pos and
                                                          valid is not None else set()))
    if past:
        notes.append(f"lengths {past} are past the teacher's max_position_embeddings={max_pos}: the models run there "
                     f"with RoPE extended, so those numbers test extrapolation (marked 'past max_pos')")
        print(f"note: {notes[-1]}", flush=True)

    # ---- recall prompts, made once: every model sees exactly the same ones
    depths = [float(d) for d in cfg.depths.split(",")]
    t0 = time.time()
    prompts = {(t, L): make_prompts(t, tok, L, cfg.prompts, cfg.seed, depths, cfg.haystack)
               for t in tasks for L in lengths}
    print(f"recall prompts: {len(tasks)} tasks x {len(lengths)} lengths x {cfg.prompts} ({time.time() - t0:.1f}s; "
          f"chat format: {tok.is_chat})")
    hf_tok = None
    if ruler or other:
        hf_tok = harness.hf_tokenizer_dir(teacher_source)
        note = harness.punkt_offline() if ruler else None
        notes += [note] if note else []

    # ---- quality: the teacher first, then each student (the teacher stays loaded for the KL)
    models = {}
    for name, path in [("teacher", None)] + list(zip(names, paths)):
        model = teacher if path is None else load_checkpoint(path, device=device)[0].eval()
        r = models[name] = dict(path=path or teacher_source, mixers=list(model.config.mixers),
                                params=sum(p.numel() for p in model.parameters()))
        if valid is not None:
            t0 = time.time()
            r["ppl"], r["kl"], r["ppl_tokens"] = quality(model, teacher, valid, cfg, device)
            r["ppl_seq_len"], r["ppl_past_max_pos"] = cfg.ppl_seq_len, cfg.ppl_seq_len > max_pos
            print(f"{name} | ppl {r['ppl']:.3f} | KL {r['kl']:.4f} | {r['ppl_tokens']:,} tokens | "
                  f"{time.time() - t0:.1f}s", flush=True)
        if prompts:
            r["recall"] = recall_suite(name, model, tok, prompts, device, cfg.batch_size)
            r["recall"]["past_max_pos"] = [str(L) for L in lengths if L > max_pos]
        if ruler or other:
            r["lm_eval"] = harness.evaluate_tasks(name, model, tok, hf_tok, ruler, other, lengths, cfg.batch_size,
                                                  cfg.lm_eval_limit, device)
        if path is not None:
            del model
            free(cuda)

    # ---- speed and memory: one model at a time, bf16 weights on the GPU (fp32 state for GLA, as new_cache makes it)
    speed = cfg.speed == "on" or (cfg.speed == "auto" and cuda)
    batches = sorted({1, cfg.speed_batch})
    speed_lengths = ints(cfg.speed_lengths, "speed_lengths")
    if not speed:
        notes.append(f"speed/memory not measured (--speed={cfg.speed} on {device})"
                     + ("; --speed=on measures them" if cuda else "; use a GPU, or --speed=on on the CPU"))
    elif any(L > max_pos for L in speed_lengths):
        notes.append(f"speed lengths beyond max_position_embeddings={max_pos} run with RoPE extrapolated: timings "
                     "and memory are valid, the model's outputs there are not")
    if not cuda and speed:
        notes.append("speed measured on the CPU: fp32 weights, no peak-memory numbers, not representative of a GPU")
    dtype = torch.bfloat16 if cuda else torch.float32
    for name, path in [("teacher", None)] + list(zip(names, paths)) if speed else []:
        print(f"speed: {name}", flush=True)
        model = teacher.to(dtype) if path is None else load_checkpoint(path, device=device, dtype=dtype)[0].eval()
        teacher = None  # the bf16 copy replaced it; nothing needs the fp32 teacher any more
        models[name]["speed"] = bench(model, speed_lengths, batches, cfg.decode_tokens, device)
        del model
        free(cuda)
    for r in [r for m in models.values() for r in m.get("speed", [])]:
        t = next(x for x in models["teacher"]["speed"] if (x["batch"], x["length"]) == (r["batch"], r["length"]))
        if r["status"] == "ok" and t["status"] == "ok":
            r["vs_teacher"] = dict(decode_speedup=r["decode_tok_s"] / t["decode_tok_s"],
                                   prefill_speedup=t["prefill_s"] / r["prefill_s"],
                                   cache_ratio=r["cache_bytes"] / t["cache_bytes"],
                                   peak_ratio=r["peak_decode_bytes"] / t["peak_decode_bytes"] if cuda else None)

    # ---- report: table, eval.json, plots
    summary = summarize(models, batches, past)
    print_table(summary, list(models))
    for note in notes:
        print(f"note: {note}")
    settings = dict(asdict(cfg), teacher_source=teacher_source, models={n: p for n, p in zip(names, paths)},
                    device=device, gpu=torch.cuda.get_device_name() if cuda else None, torch=torch.__version__,
                    tasks=tasks, lengths=lengths, depths=depths, chat_format=tok.is_chat, haystack_text=cfg.haystack
                    or FILLER, max_position_embeddings=max_pos, past_max_pos=past, speed_run=speed,
                    lm_eval_tasks=ruler + other, hf_tokenizer=hf_tok,
                    speed_lengths=speed_lengths, speed_batches=batches,
                    precision=("fp32 weights + bf16 autocast (quality, recall); bf16 weights, fp32 GLA state (speed)"
                               if cuda else "fp32"),
                    scoring="recall: fraction of the expected answers found in the greedy output as case-insensitive "
                            "substrings (RULER's string_match_all); whole_word: the same counting whole words only; "
                            "avg = mean over the task x length cells")
    report = dict(settings=settings, models=models, summary=summary, notes=notes)
    report["plots"] = plot(models, batches, out)
    write_json(os.path.join(out, "eval.json"), report)
    print(f"final | wrote {os.path.join(out, 'eval.json')}" + "".join(f", {p}" for p in report["plots"]))
    return report


if __name__ == "__main__":
    main(parse_args(Config))
