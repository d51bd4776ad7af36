"""
Layer selection: which K of the L layers keep softmax attention in the hybrid.

The method of the paper is `kl`: keep the K layers whose KL-guided score (score.py) is lowest, i.e. the layers whose
own softmax attention, restored alone into the all-linear student, brings it closest to the teacher (Li et al.,
arXiv 2512.20569). The other methods are the baselines it is compared against:

    kl        keep the K lowest scores of <run>/score/scores.json                    (lower KL = more important)
    uniform   one layer per block of L/K layers, at the block's centre: floor((i + 1/2) * L / K), i = 0..K-1.
              Centred, so that the choice is symmetric and layer 0 is not forced in (L=30, K=8: 1 5 9 13 16 20 24 28)
    ga_s1     the K worst-aligned layers of Stage 1: the largest metrics["layer_losses"] of the align checkpoint
    ablation  zero one layer's attention output in the TEACHER (forward hook), measure the drop of synthetic
              key-value recall accuracy (recall.recall_accuracy, task mqar) against the intact teacher; keep the K
              largest drops

Budget: a fraction of L (0.25 -> 0.25 * L rounded half up, at least 1, as the paper's configs count) or a count (8).
Ties break toward the lower index.
Writes <run>/select/selection.json: {"method", "budget", "n_layers", "layers" (sorted), "scores" (per layer), "source"};
--out names another file in the same folder, so that several selections can sit side by side.

    python select_layers.py --run_name=smollm2 --method=uniform --budget=0.25 --out=selection_uniform.json  # no inputs
    python select_layers.py --run_name=smollm2 --method=kl --budget=0.25        # after score.py: the paper's selection
"""

import json
import os
import time
from dataclasses import dataclass

import torch

from common import check_positive, inherit, parse_args, parse_budget, pick_device, print_config, write_json
from model import checkpoint_info

METHODS = ("kl", "uniform", "ga_s1", "ablation")


@dataclass
class Config:
    run_name: str = "smollm2"       # run name: reads and writes under <out_dir>/<run_name>
    out_dir: str = "out"            # root of all runs
    method: str = "kl"              # kl | uniform | ga_s1 | ablation
    budget: str = "0.25"            # softmax layers kept: a fraction of L (0.25) or a count (8)
    out: str = ""                   # file name in <run>/select/ (or a path); "" -> selection.json
    scores: str = ""                # kl: "" -> <out_dir>/<run_name>/score/scores.json (another run's: cross-variant)
    align: str = ""                 # ga_s1 (and L for the others): "" -> <out_dir>/<run_name>/align/ckpt.pt
    n_layers: int = -1              # L; -1 -> from the scores, the align checkpoint or the teacher
    teacher: str = ""               # ablation: "" -> inherited from the align checkpoint's config, else the default
    task: str = "mqar"              # ablation: recall task of recall.recall_accuracy
    length: int = 512               # ablation: context length of the recall prompts
    prompts: int = 64               # ablation: prompts per measurement
    device: str = ""                # ablation: "" -> cuda if available else cpu
    seed: int = 0                   # ablation: seed of the recall prompts (the same prompts for every layer)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"--method={self.method!r} is unknown: choose one of {', '.join(METHODS)}")
        check_positive(self, "length", "prompts")


def read_kl_scores(path):
    """Per-layer scores of score.py: {"scores": [score or null per layer], ...}."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no KL scores at {path}: run `python score.py` for this run first "
                                "(or pass --scores=<file>, or choose --method=uniform|ga_s1|ablation)")
    with open(path) as f:
        record = json.load(f)
    scores = record.get("scores") if isinstance(record, dict) else None
    if not isinstance(scores, list) or not scores:
        raise ValueError(f"{path} holds no per-layer list 'scores'")
    missing = [i for i, s in enumerate(scores) if s is None]
    if missing:
        raise ValueError(f"{path} is incomplete: layers {missing} have no score yet. Let score.py finish "
                         "(it skips the layers already done when rerun)")
    return [float(s) for s in scores]


def ablation_scores(cfg, teacher_source):
    """Drop in recall accuracy when one teacher layer's attention output is zeroed, for every layer."""
    from recall import recall_accuracy
    from teachers import from_pretrained
    from tokenizer import load_tokenizer
    device = cfg.device or pick_device()
    model = from_pretrained(teacher_source, device=device).eval()
    tok = load_tokenizer(teacher_source)
    measure = lambda: float(recall_accuracy(model, tok, task=cfg.task, length=cfg.length, n=cfg.prompts, seed=cfg.seed,
                                            device=device))
    base = measure()
    print(f"intact teacher: {cfg.task} accuracy {base:.3f} at length {cfg.length} (n={cfg.prompts})")
    if base < 0.1:
        print(f"warning: the intact teacher barely solves {cfg.task} at length {cfg.length}, so the drops say little "
              "about the layers; try a shorter --length, another --task or a larger --n")
    drops = []
    for i, layer in enumerate(model.model.layers):
        hook = layer.self_attn.register_forward_hook(lambda mod, args, out: torch.zeros_like(out))
        try:
            acc = measure()
        finally:
            hook.remove()
        drops.append(base - acc)
        print(f"  layer {i:3d} zeroed: accuracy {acc:.3f}, drop {base - acc:+.3f}", flush=True)
    return drops, base


def main(cfg):
    t0 = time.time()
    run_dir = os.path.join(cfg.out_dir, cfg.run_name)
    cfg.scores = cfg.scores or os.path.join(run_dir, "score", "scores.json")
    cfg.align = cfg.align or os.path.join(run_dir, "align", "ckpt.pt")
    cfg.out = os.path.join(run_dir, "select", cfg.out or "selection.json") if "/" not in cfg.out else cfg.out
    align_meta = checkpoint_info(cfg.align) if os.path.exists(cfg.align) else None
    if align_meta and cfg.method in ("ablation", "uniform"):
        inherit(cfg, align_meta.get("config", {}), ["teacher"])
    print_config(cfg)

    # ---- per-layer scores; `larger` says whether large scores are the ones kept
    extra = {}
    if cfg.method == "kl":
        scores, source, larger = read_kl_scores(cfg.scores), cfg.scores, False
    elif cfg.method == "ga_s1":
        losses = (align_meta or {}).get("metrics", {}).get("layer_losses")
        if not losses:
            raise FileNotFoundError(f"no Stage-1 layer losses at {cfg.align} (metrics['layer_losses']): run "
                                    "`python align.py` for this run first, or pass --align=<checkpoint>")
        scores, source, larger = [float(x) for x in losses], cfg.align, True
    elif cfg.method == "ablation":
        from teachers import DEFAULT_TEACHER
        teacher = cfg.teacher or DEFAULT_TEACHER
        scores, extra["base_accuracy"] = ablation_scores(cfg, teacher)
        source, larger = f"{teacher} ({cfg.task}, length {cfg.length}, n {cfg.prompts}, seed {cfg.seed})", True
    else:
        scores, source, larger = None, "layer count", None

    # ---- the number of layers L, from whatever this run has
    L = cfg.n_layers
    if L < 0 and scores is not None:
        L = len(scores)
    if L < 0 and align_meta:
        L = align_meta["model_config"]["num_hidden_layers"]
    if L < 0:
        from teachers import DEFAULT_TEACHER, from_pretrained
        L = from_pretrained(cfg.teacher or DEFAULT_TEACHER).config.num_hidden_layers
    if scores is not None and len(scores) != L:
        raise ValueError(f"{source} has {len(scores)} layer scores but --n_layers={L}")
    K = parse_budget(cfg.budget, L)

    # ---- choose
    if cfg.method == "uniform":
        layers = sorted({int((i + 0.5) * L / K) for i in range(K)})
    else:
        order = sorted(range(L), key=lambda i: (-scores[i] if larger else scores[i], i))
        layers = sorted(order[:K])
    assert len(layers) == K

    selection = {"method": cfg.method, "budget": K, "budget_arg": cfg.budget, "n_layers": L, "layers": layers,
                 "scores": scores, "source": source, **extra}
    write_json(cfg.out, selection)
    print("selection: " + "".join("S" if i in layers else "." for i in range(L)) + f"  (S = softmax, {K} of {L})")
    print(f"final | {cfg.method} | layers {layers} | {(time.time() - t0):.1f}s | {cfg.out}")
    return selection


if __name__ == "__main__":
    main(parse_args(Config))
