"""
KL-guided layer scoring (GA-S2 of arXiv 2512.20569): how much does each layer need its softmax attention?

For every layer l, take the Stage-1 all-linear student, restore layer l alone to the teacher's exact softmax attention
(distill.make_hybrid), and run a short Stage 2 (distill.stage2_step). A layer whose softmax attention the linear
layers cannot replace leaves a small KL once it is restored: lower late KL = more important. Selection keeps the K
layers with the lowest scores; smaller budgets are prefixes of the same ranking.

    score(l) = mean of the probe's training KL over the last late_frac of its steps
    the probes run in rounds of eval_every steps, all on the same batches. After each round the layers are ranked;
    once the top-K set of every budget in --budget (e.g. 0.125,0.25,0.5: K = 4, 8, 15 of 30) has not changed for
    `patience` rounds, all probes stop (the paper: the top-K set settles after 27-42% of the run)

Each round computes the teacher's hidden states once per batch and steps every probe on them (one teacher forward
for L probes). Probes train together as many as memory holds (on the GPU; those that do not fit there wait in CPU
memory between their turns); on the GPU each probe that stays there replays its step as a CUDA graph
(common.cuda_graph, --graph; one memory pool shared by the group's probes, since they run one after another), as
distill.py does, while a parked probe moves and so keeps the eager step. More layers than fit run in groups, later
groups ranking against the stored curves of earlier ones, cut to the same step. Under torchrun the layers are split
across the ranks (no gradient traffic: the probes are independent), the curves gathered after every round so that
every rank takes the same early-stop decision, and rank 0 writes the file. scores.json is rewritten (atomically)
after every round; a finished layer (all steps, or early-stopped) is never recomputed when the same settings and the
same Stage-1 weights run again; an unfinished one restarts.

Reads  out/<run>/align/ckpt.pt, the teacher and token files named in its config.
Writes out/<run>/score/scores.json: per layer {score, curve, steps, tokens, early_stopped, stopped_at, finished},
       "ranking" (most important first), "scores" (list by layer), "settings"; log.jsonl (one line per round).

    python score.py --run_name=tiny --steps=8 --eval_every=2 --batch_size=2 --seq_len=64      # tiny CPU run
    python score.py --run_name=smollm2 --steps=400 --eval_every=20 --batch_size=8 --seq_len=2048  # one GPU
    torchrun --standalone --nproc_per_node=2 score.py --run_name=smollm2                          # two GPUs
"""

import copy
import json
import math
import os
import time
from dataclasses import dataclass

import torch

import model as M
from common import (Dist, Logger, banner, check_finite, check_modes, check_positive, check_shapes, check_teacher,
                    cuda_graph, fingerprint, inherit, init_dist, lock_folder, parse_args, parse_budget, print_config,
                    want_graph, write_json)
from distill import (compile_blocks, load_teachers, make_hybrid, make_optimizer, micro_batches, open_data, set_lr,
                     stage2_step, teacher_hidden)


@dataclass
class Config:
    run_name: str = "smollm2"     # run name: everything lives in <out_dir>/<run_name>/
    out_dir: str = "out"          # root of all runs
    input: str = ""               # Stage-1 checkpoint; "" = <out_dir>/<run_name>/align/ckpt.pt
    teacher: str = ""             # teacher source; "" = inherited from the parent checkpoint
    other_teacher: bool = False   # allow a teacher other than the one the input descends from
    data_dir: str = ""            # token files; "" = inherited from the parent checkpoint
    layers: str = ""              # layers to score, e.g. "0,1" ("" = all); finished ones are skipped
    budget: str = "0.25"          # budgets whose top-K sets must settle before stopping early: "0.25" or "0.125,0.25,8"
    steps: int = 400              # Stage-2 steps per probe at most
    eval_every: int = 20          # steps per round: the ranking is checked after each round
    patience: int = 4             # stop once every top-K set is unchanged for this many rounds (0 = never stop early)
    late_frac: float = 0.25       # score = mean KL over this last fraction of a probe's steps
    batch_size: int = 8           # sequences per step (the same batches for every probe)
    micro_batch: int = 0          # sequences per forward (gradients accumulate); 0 = the whole batch
    seq_len: int = 512            # tokens per sequence (the paper uses 4096)
    lr_mixer: float = 1e-4        # Stage-2 lr of self_attn.* and input_layernorm
    lr_other: float = 7e-6        # Stage-2 lr of everything else
    warmup: int = 0               # linear warmup steps (paper: constant lr)
    weight_decay: float = 0.01    # AdamW weight decay (the official code: torch's default 0.01)
    clip: float = 1.0             # gradient-norm clip
    chunk: int = 4096             # rows per KL chunk
    max_probes: int = 0           # probes trained together per process (0 = as many as memory holds)
    compile: str = "auto"         # torch.compile the blocks (probes: once for all; teacher): auto (GPU) | true | false
    offload: str = "auto"         # park probes in CPU memory between turns: auto | true | false
    graph: str = "auto"           # replay each probe's step as a CUDA graph (probes that stay on the GPU; one memory
                                  # pool for all): auto (GPU) | true | false
    device: str = ""              # "" = cuda if available else cpu
    seed: int = 0                 # data order

    def __post_init__(self):
        check_positive(self, "steps", "eval_every", "batch_size", "micro_batch", "seq_len", "chunk", "patience",
                       "max_probes", "warmup", allow_zero=("micro_batch", "patience", "max_probes", "warmup"))
        if not 0 < self.late_frac <= 1:
            raise ValueError(f"--late_frac={self.late_frac}: a fraction in (0, 1]")
        check_modes(self, "compile", "offload", "graph")


# Settings that change a probe's KL curve or its stopping point: a stored layer is reused only if they all match
# (and the Stage-1 weights, by their fingerprint).
SETTINGS = ("teacher", "data_dir", "budget", "steps", "eval_every", "patience", "late_frac", "batch_size", "seq_len",
            "lr_mixer", "lr_other", "warmup", "weight_decay", "clip", "seed")


def late_mean(curve, step, late_frac):
    """The score: mean of the last late_frac of the curve cut at `step` (so that layers compare at equal steps)."""
    curve = curve[:step]
    n = max(1, math.ceil(late_frac * len(curve)))
    return sum(curve[-n:]) / n


def rank(curves, step, late_frac):
    """Layers sorted by score at `step`, most important (lowest KL) first."""
    return sorted(curves, key=lambda l: (late_mean(curves[l], step, late_frac), l))


def top_sets(order, Ks):
    """The top-K set of the ranking for every budget K: early stopping waits until none of them changes."""
    return tuple(frozenset(order[:K]) for K in Ks)


def mem_available():
    """Bytes of CPU memory available (Linux /proc/meminfo), or a guess of 8 GB elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return 8 << 30


def move(probe, device):
    """Move a probe (model and AdamW state) to `device`; the parameters keep their identity, so the optimizer holds."""
    model, opt = probe
    model.to(device)
    for state in opt.state.values():
        for k, v in state.items():
            if torch.is_tensor(v) and v.dim() > 0:
                state[k] = v.to(device)


def plan(cfg, n_params, n_todo, device):
    """(probes trained together, how many of them stay on `device` between turns): the others wait in CPU memory
    and are moved in for their steps."""
    per_probe = 4 * n_params * 4                    # fp32 weights, grads and two AdamW moments
    in_ram = int(0.6 * mem_available() // per_probe)
    if not device.startswith("cuda"):
        group = max(1, min(n_todo, cfg.max_probes or in_ram))
        return group, group
    on_gpu = 0 if cfg.offload == "true" else int(0.6 * torch.cuda.mem_get_info()[0] // per_probe)
    if cfg.offload == "false":
        group = max(1, min(n_todo, cfg.max_probes or on_gpu))
        return group, group
    group = max(1, min(n_todo, cfg.max_probes or on_gpu + in_ram))
    return group, min(group, on_gpu)


def gather(probes, d):
    """Every rank's {layer: anything}, merged (one process: the dict itself)."""
    if d.world == 1:
        return dict(probes)
    import torch.distributed as dist
    parts = [None] * d.world
    dist.all_gather_object(parts, probes)
    return {l: c for part in parts for l, c in part.items()}


def same_everywhere(n, d):
    """The smallest of an integer over the ranks: a decision every rank must take alike."""
    if d.world == 1:
        return n
    import torch.distributed as dist
    t = torch.tensor(n, device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t)


def bar_chart(scores, top, width=40):
    """One line per layer: a bar proportional to its score, top-K layers starred."""
    lo, hi = min(scores.values()), max(scores.values())
    lines = [f"KL-guided scores (lower = more important, * = top {len(top)}; bars span min to max):"]
    for l in sorted(scores):
        n = 1 + int((width - 1) * (scores[l] - lo) / (hi - lo)) if hi > lo else width // 2
        lines.append(f"  layer {l:3d} {'*' if l in top else ' '} {'#' * n:<{width}} {scores[l]:.4f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------- main

def main(cfg):
    t_start = time.time()
    d = init_dist(cfg.device)
    device = d.device
    run_dir = os.path.join(cfg.out_dir, cfg.run_name)
    cfg.input = cfg.input or os.path.join(run_dir, "align", "ckpt.pt")
    out_dir = os.path.join(run_dir, "score")
    path = os.path.join(out_dir, "scores.json")
    if d.main:
        lock_folder(out_dir, "score.py")  # one scorer per run: two would each score every layer

    # ---- load: Stage-1 student (on the CPU: each probe is a copy), teacher, data, stored scores
    base, parent = M.load_checkpoint(cfg.input)
    inherit(cfg, parent["config"], ["teacher", "data_dir"])
    print_config(cfg)
    print(M.describe_input(cfg.input, parent))
    L = base.config.num_hidden_layers
    Ks = sorted({parse_budget(b, L) for b in cfg.budget.split(",") if b.strip()})
    # The input is identified by its weights: a rerun of align.py that changed the student invalidates the scores,
    # one that left it as it was (a resumed, finished stage) does not.
    settings = {**{k: getattr(cfg, k) for k in SETTINGS}, "input_fingerprint": fingerprint(base)}
    scope = [int(x) for x in cfg.layers.split(",") if x.strip()] if cfg.layers else list(range(L))
    if any(not 0 <= l < L for l in scope):
        raise ValueError(f"--layers={cfg.layers}: the model has {L} layers (0..{L - 1})")
    record = {"method": "kl", "n_layers": L, "budget": cfg.budget, "top_k": Ks, "settings": settings, "layers": {}}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old.get("settings") == settings:
            record["layers"] = {k: v for k, v in old["layers"].items() if v["finished"]}
        elif d.main:
            os.replace(path, path + ".old")
            print(f"{path} was made with other settings or another Stage-1 checkpoint: moved to scores.json.old, "
                  "starting afresh")
    done = {int(k): v["curve"] for k, v in record["layers"].items()}
    skipped = [l for l in scope if l in done]
    todo = [l for l in scope if l not in done]
    mine = todo[d.rank::d.world]                     # this rank's layers
    print(f"scoring {len(todo)} layers, skipping {len(skipped)} finished ones {skipped}; top-K sets watched: "
          f"K = {Ks} of {L}" + (f"; {d.world} processes, {len(mine)} layers each at most" if d.world > 1 else ""))
    teacher32, teacher_fp, teacher = load_teachers(cfg.teacher, device, cfg)
    check_shapes(base.config, teacher.config, cfg.teacher)
    check_teacher(teacher_fp, parent, cfg.teacher, cfg.other_teacher)
    t_head = teacher.lm_head.weight
    train, _ = open_data(cfg, run_dir)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    group_size, resident = plan(cfg, sum(p.numel() for p in base.parameters()), max(len(mine), 1), device)
    group_size = same_everywhere(group_size, d)
    resident = min(resident, group_size)
    n_groups = max(math.ceil(len(todo[r::d.world]) / group_size) for r in range(d.world)) if todo else 0
    banner("score (KL-guided layer scoring)", device, base, tokens_per_step, d)
    parked = f", {group_size - resident} of them waiting in CPU memory between turns" if resident < group_size else ""
    print(f"probes: {group_size} at a time per process on {device}{parked}; {n_groups} group(s); {cfg.steps} steps "
          f"each at most, in rounds of {cfg.eval_every}")

    def save():
        at = min((len(c) for c in done.values()), default=0)
        ranking = rank(done, at, cfg.late_frac)
        for l, c in done.items():
            record["layers"][str(l)]["score"] = late_mean(c, at, cfg.late_frac)
        record.update(scored_at_step=at, complete=len(done) == L, ranking=ranking,
                      scores=[record["layers"][str(l)]["score"] if l in done else None for l in range(L)])
        if d.main:
            write_json(path, record)

    # ---- score: groups of probes, each trained in rounds that share the teacher's forward pass
    log = Logger(out_dir, enabled=d.main)
    stopped_at, one = None, Dist(0, 1, device)      # every probe sees the whole batch (one = no row split)
    graphs = want_graph(cfg.graph, one)             # a probe's step is its own process's: no DDP in it
    rounds = math.ceil(cfg.steps / cfg.eval_every)

    def probe_step(student, opt):
        """The probe's optimizer step from its micro-batches, flattened: idx, teacher hidden, idx, ..."""
        def step(*tensors):
            return stage2_step(student, student, list(zip(tensors[::2], tensors[1::2])), t_head, opt, cfg.clip, device,
                               cfg.chunk)
        return step

    for g in range(n_groups):
        group = mine[g * group_size:(g + 1) * group_size]
        # one memory pool for the group's graphs, new for each group: the allocator forgets a pool once every graph
        # recorded into it is gone (the last group's are), and recording into a forgotten one fails (an internal
        # assert in PyTorch's CUDACachingAllocator: use_count > 0)
        pool = torch.cuda.graph_pool_handle() if graphs else None
        probes, home, steps = {}, {}, {}
        for i, l in enumerate(group):
            home[l] = device if i < resident else "cpu"
            student = compile_blocks(make_hybrid(copy.deepcopy(base), teacher32, [l]).to(home[l]), cfg, device)
            probes[l] = (student, make_optimizer(student, cfg.lr_mixer, cfg.lr_other, cfg.weight_decay))
            eager = probe_step(*probes[l])
            # a graph keeps the addresses it recorded: only probes that stay on the GPU between turns get one; 3 eager
            # steps suffice (no DDP in a probe, even under torchrun)
            steps[l] = (eager, cuda_graph(eager, 3, pool) if graphs and home[l] == device else None)
        curves, secs = {l: [] for l in group}, {l: 0.0 for l in group}
        # Early stopping needs every layer in the ranking: finished layers count with their curve cut to this step.
        seen = {l for r in range(d.world) for l in todo[r::d.world][:(g + 1) * group_size]}
        can_stop = cfg.patience > 0 and len(set(done) | seen) == L
        step, stable, top = 0, 0, None
        while step < cfg.steps:
            n = min(cfg.eval_every, cfg.steps - step)
            # the same batches for every probe, and the teacher's forward pass once per batch for all of them
            batches = []
            for i in range(n if probes else 0):
                batches.append([(idx[:, :-1], teacher_hidden(teacher, idx[:, :-1], device))
                                for idx in micro_batches(train, cfg, cfg.seed, step + i, one)])
            for l, probe in probes.items():
                t0 = time.time()
                move(probe, device)
                student, opt = probe
                kls = []
                eager, graphed = steps[l]
                for i, batch in enumerate(batches):
                    set_lr(opt, step + i, cfg.warmup)
                    # recorded once the lr is constant (after the warmup): the graph keeps the lr it was recorded with
                    run = graphed if graphed and step + i + 1 >= cfg.warmup else eager
                    try:
                        kls.append(run(*(x for pair in batch for x in pair)))
                    except torch.OutOfMemoryError as e:
                        raise RuntimeError(
                            f"out of memory in the layer-{l} probe's step, with {resident} of this group's "
                            f"{len(group)} probes kept on {device}: the groups are sized from the memory free when "
                            "score.py starts, so another process on the same GPU (a second run, an eval) can take what "
                            "they counted on. Run again with fewer probes at a time, e.g. "
                            f"--max_probes={max(1, resident // 2)}, or --offload=true; finished layers stay in "
                            "scores.json") from e
                curves[l] += [float(k) for k in torch.stack(kls)]   # one wait for the GPU per probe and round
                check_finite(sum(curves[l][-n:]), f"{step + n} of the layer-{l} probe", None,
                             "a smaller --lr_mixer / --lr_other (layers already finished stay in scores.json)")
                move(probe, home[l])
                secs[l] += time.time() - t0
            step += n
            status = gather({l: (curves[l], secs[l]) for l in group}, d)
            everyone = {**done, **{l: c for l, (c, _) in status.items()}}
            order = rank(everyone, step, cfg.late_frac)
            now = top_sets(order, Ks)
            stable = stable + 1 if now == top else 0
            top = now
            log.log(g * rounds + step // cfg.eval_every, n_groups * rounds,
                    tokens=n * tokens_per_step * len(everyone.keys() - done.keys()), group=f"{g + 1}/{n_groups}",
                    probe_step=f"{step}/{cfg.steps}", best=order[0],
                    kl_best=late_mean(everyone[order[0]], step, cfg.late_frac),
                    top_k=",".join(map(str, sorted(order[:Ks[-1]]))), stable=stable)
            finish = step >= cfg.steps or (can_stop and stable >= cfg.patience)
            for l, curve in everyone.items():
                if l in done:
                    continue
                record["layers"][str(l)] = {
                    "score": late_mean(curve, step, cfg.late_frac), "curve": curve, "steps": step,
                    "tokens": step * tokens_per_step, "early_stopped": finish and step < cfg.steps,
                    "stopped_at": step if finish and step < cfg.steps else None, "finished": finish,
                    "time_s": round(status[l][1], 1)}
            if finish:
                done.update({l: c for l, c in everyone.items() if l not in done})
            save()
            if finish:
                if step < cfg.steps:
                    stopped_at = step
                    print(f"top-K sets {[sorted(s) for s in top]} unchanged for {stable} rounds: stopping all probes "
                          f"at step {step} of {cfg.steps}")
                break
        # the group's probes and graphs go (a graph left alive would keep its memory): no name may hold one
        probes = steps = probe = student = opt = eager = graphed = run = None

    # ---- report
    if not done:
        raise RuntimeError("no layer was scored")
    save()
    scores = {l: record["layers"][str(l)]["score"] for l in sorted(done)}
    print(bar_chart(scores, set(record["ranking"][:Ks[-1]])))
    print(f"ranking (most important first): {record['ranking']}  (scores at step {record['scored_at_step']})")
    metrics = {"ranking": record["ranking"], "top_k": record["ranking"][:Ks[-1]], "complete": record["complete"],
               "scored": todo, "skipped": skipped, "early_stopped": stopped_at is not None,
               "stopped_at": stopped_at, "scores": scores, "time_s": round(time.time() - t_start, 1)}
    log.final(**metrics)
    return metrics


if __name__ == "__main__":
    main(parse_args(Config))
