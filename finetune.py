"""
Stage 3: a short finetune of the hybrid at a longer context (RADLADS step 3; arXiv 2505.03005).

Stage 2 taught the hybrid to match the teacher token by token at the distillation length. Here it trains on plain
next-token prediction at a longer context (2x by default), so the GLA layers' decay gates and the softmax layers
learn to carry information further than they saw in Stage 2. A flat small lr over all parameters keeps the result
close to the distilled model; the loss can keep a share of the teacher's KL as an anchor.

    loss = (1 - w) * CE(next token) + w * KL(teacher || student),    w = --kl_weight (0 = plain CE, RADLADS: 0.5)
    AdamW(0.9, 0.95, weight decay 0.01), lr 1e-5 flat, gradient-norm clip 1.0

Both terms are computed in row chunks from the final hidden states (no B*T x V fp32 tensor): the cross-entropy
by recomputing each chunk's logits in the backward (activation checkpointing), the KL by common.kl_div_chunked.
Speed (the step replayed as a CUDA graph), torchrun, micro-batches, mid-run checkpoints and --resume work as in
distill.py.

Reads  out/<run>/distill/ckpt.pt (the teacher and token files named in its config chain).
Writes out/<run>/finetune/ckpt.pt (+ meta.json, log.jsonl).

    python finetune.py --run_name=tiny --steps=10 --batch_size=2 --seq_len=128     # a few CPU steps
    python finetune.py --run_name=smollm2 --steps=500 --kl_weight=0.5              # one GPU, 2x the Stage-2 length
"""

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import model as M
from common import (Logger, all_mean, autocast, banner, check_finite, check_modes, check_positive, check_shapes,
                    check_teacher, cuda_graph, distribute, full_state, inherit, init_dist, kl_div_chunked,
                    load_optimizer, lock_folder, parse_args, print_config, want_graph)
from distill import compile_blocks, load_teachers, micro_batches, open_data, set_lr, skip_nonfinite, teacher_hidden


@dataclass
class Config:
    run_name: str = "smollm2"     # run name: everything lives in <out_dir>/<run_name>/
    out_dir: str = "out"          # root of all runs
    input: str = ""               # Stage-2 checkpoint; "" = <out_dir>/<run_name>/distill/ckpt.pt
    teacher: str = ""             # teacher source (for --kl_weight > 0 and the tokenizer check); "" = inherited
    other_teacher: bool = False   # allow a teacher other than the one the input descends from
    data_dir: str = ""            # token files; "" = inherited from the parent checkpoint
    out: str = "finetune"         # output subfolder of the run
    steps: int = 500              # optimizer steps
    batch_size: int = 4           # sequences per step, over all processes
    micro_batch: int = 0          # sequences per forward per process (gradients accumulate); 0 = all of its share
    seq_len: int = -1             # tokens per sequence; -1 = twice the parent's (Stage-2) seq_len
    lr: float = 1e-5              # flat lr of all parameters
    warmup: int = 0               # linear warmup steps (RADLADS: flat lr)
    weight_decay: float = 0.01    # AdamW weight decay (torch's default, as the official code)
    clip: float = 1.0             # gradient-norm clip
    kl_weight: float = 0.0        # share of KL(teacher || student) in the loss (0 = next-token CE only)
    chunk: int = 4096             # rows per loss chunk
    valid_batches: int = 8        # held-out batches for the validation loss
    eval_every: int = 0           # validation every N steps (0 = only at the end)
    log_every: int = 10           # print and log every N steps
    save_every: int = 500         # mid-run checkpoint every N steps (0 = only at the end)
    resume: bool = False          # continue the mid-run checkpoint in <out> (same settings)
    compile: str = "auto"         # torch.compile the blocks of model and teacher: auto (on the GPU) | true | false
    graph: str = "auto"           # replay each step as one CUDA graph: auto (on a GPU, one process or DDP; not
                                  # FSDP2) | true (the same, or an error) | false
    shard: bool = False           # under torchrun: FSDP2 instead of DDP
    device: str = ""              # "" = cuda if available else cpu
    seed: int = 1                 # data order (1: other windows than Stage 2's seed 0)

    def __post_init__(self):
        check_positive(self, "steps", "batch_size", "chunk", "log_every", "micro_batch", "valid_batches", "save_every",
                       "eval_every", "warmup", allow_zero=("micro_batch", "valid_batches", "save_every", "eval_every",
                                                           "warmup"))
        if self.seq_len != -1:
            check_positive(self, "seq_len")
        check_modes(self, "graph")
        if not 0 <= self.kl_weight <= 1:
            raise ValueError(f"--kl_weight={self.kl_weight}: a share between 0 and 1")


def _ce_sum(hidden, weight, targets):
    return F.cross_entropy((hidden @ weight.t()).float(), targets, reduction="sum")


def cross_entropy_chunked(hidden, weight, targets, chunk=4096):
    """Mean cross-entropy of softmax(hidden @ weight.T) [N, V] against targets [N], chunk rows at a time: each
    chunk's logits are freed after its forward and rebuilt in the backward, so at most one [chunk, V] block lives."""
    total = 0.0
    for i in range(0, hidden.shape[0], chunk):
        total = total + checkpoint(_ce_sum, hidden[i:i + chunk], weight, targets[i:i + chunk], use_reentrant=False,
                                   preserve_rng_state=False)  # no randomness; and CUDA-graph safe
    return total / hidden.shape[0]


def losses(forward, head, teacher, batch, cfg, device):
    """(loss, ce, kl) of one batch [B, T+1]; kl is None when kl_weight is 0."""
    idx, targets = batch[:, :-1], batch[:, 1:]
    with autocast(device):
        h = forward(idx, return_hidden=True).flatten(0, 1)
        ce = cross_entropy_chunked(h, head, targets.flatten(), cfg.chunk)
        if not cfg.kl_weight:
            return ce, ce, None
        t = teacher_hidden(teacher, idx, device).flatten(0, 1)
        kl = kl_div_chunked(h, head, t, teacher.lm_head.weight, cfg.chunk)
    return (1 - cfg.kl_weight) * ce + cfg.kl_weight * kl, ce, kl


@torch.no_grad()
def validate(forward, model, teacher, batches, cfg, device, d):
    """Held-out mean cross-entropy and perplexity (and KL to the teacher when kl_weight > 0), over all ranks."""
    model.eval()
    ce = kl = 0.0
    for batch in batches:
        # the head detached: kl_div_chunked then skips its gradient pass
        _, c, k = losses(forward, model.lm_head.weight.detach(), teacher, batch, cfg, device)
        ce, kl = ce + float(c), kl + (float(k) if k is not None else 0.0)
    model.train()
    n = max(len(batches), 1)
    ce, kl = all_mean(ce / n, d), all_mean(kl / n, d)
    metrics = {"valid_ce": ce, "valid_ppl": math.exp(min(ce, 50.0))}
    return {**metrics, "valid_kl": kl} if cfg.kl_weight else metrics


# ---------------------------------------------------------------------------------------------------------- main

def main(cfg):
    t_start = time.time()
    d = init_dist(cfg.device)
    device = d.device
    run_dir = os.path.join(cfg.out_dir, cfg.run_name)
    cfg.input = cfg.input or os.path.join(run_dir, "distill", "ckpt.pt")
    out_dir = os.path.join(run_dir, cfg.out)
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    if d.main:
        lock_folder(out_dir, "finetune.py")
    torch.manual_seed(cfg.seed)

    # ---- load: the hybrid (or the mid-run checkpoint to resume), the teacher, data at the longer context
    parent = M.checkpoint_info(cfg.input)
    inherit(cfg, parent["config"], ["teacher", "data_dir"])
    if cfg.seq_len == -1:
        cfg.seq_len = 2 * parent["config"].get("seq_len", 512)
        print(f"seq_len = {cfg.seq_len}: twice the parent's {cfg.seq_len // 2}")
    print_config(cfg)
    print(M.describe_input(cfg.input, parent))
    state = M.resume_state(ckpt_path, asdict(cfg)) if cfg.resume else None
    if state == "finished":
        print(f"final | {ckpt_path} is complete with these settings: nothing to do")
        return M.checkpoint_info(ckpt_path)["metrics"]
    _, teacher_fp, teacher = load_teachers(cfg.teacher, device, cfg)
    check_shapes(M.ModelConfig(**parent["model_config"]), teacher.config, cfg.teacher)
    check_teacher(teacher_fp, parent, cfg.teacher, cfg.other_teacher)
    model, _ = M.load_checkpoint(ckpt_path if state else cfg.input, device=device)
    if not cfg.kl_weight:
        teacher = None
    print(f"hybrid mixers: {''.join('S' if m == 'attn' else '.' for m in model.config.mixers)} (S = softmax)")
    train, valid = open_data(cfg, run_dir)
    valid_batches = [torch.cat(micro_batches(valid, cfg, 1234, i, d)) for i in range(cfg.valid_batches)]
    forward = distribute(compile_blocks(model, cfg, device), d, cfg.shard)  # FSDP2 swaps the parameters: first
    opt = torch.optim.AdamW([{"params": list(model.parameters()), "lr": cfg.lr, "base_lr": cfg.lr}],
                            betas=(0.9, 0.95), weight_decay=cfg.weight_decay, fused=device.startswith("cuda"),
                            capturable=device.startswith("cuda"))
    start = 0
    if state:
        load_optimizer(opt, model, state["optimizer"], d, cfg.shard)
        start = state["step"]
    tokens_per_step = cfg.batch_size * cfg.seq_len
    banner("finetune (Stage 3)", device, model, tokens_per_step, d)

    def save(metrics, step=None):
        weights, opt_state = full_state(model, opt if step is not None else None, d, cfg.shard)
        if d.main:
            train_state = None if step is None else {"step": step, "optimizer": opt_state,
                                                     "history": [h.tolist() for h in history]}
            M.save_checkpoint(ckpt_path, model, stage="finetune", config=asdict(cfg), parent=cfg.input,
                              metrics=metrics, tokenizer=parent["tokenizer"], teacher=parent.get("teacher"),
                              train_state=train_state, state_dict=weights)

    # ---- train
    log = Logger(out_dir, cfg.steps, start, d.main)
    history = [torch.tensor(h, device=device) for h in state["history"]] if state else []  # (loss, ce, kl) per step
    last_ckpt = ckpt_path if state else None

    def train_step(*batches):
        """One optimizer step over this process's micro-batches [b, T + 1]; returns (loss, ce, kl) on the device."""
        total = torch.zeros(3, device=device)
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1 or not hasattr(forward, "no_sync")
            with contextlib.nullcontext() if last else forward.no_sync():
                loss, ce, kl = losses(forward, model.lm_head.weight, teacher, batch, cfg, device)
                (loss / len(batches)).backward()
            total += torch.stack([loss.detach(), ce.detach(), kl.detach() if kl is not None else ce.new_zeros(())])
        total /= len(batches)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        skip_nonfinite(opt, total[0], norm)
        return total

    graphed = cuda_graph(train_step) if want_graph(cfg.graph, d, cfg.shard) else None
    for step in range(start, cfg.steps):
        lr = set_lr(opt, step, cfg.warmup)
        run = graphed if graphed and step + 1 >= cfg.warmup else train_step   # recorded once the lr is constant
        history.append(all_mean(run(*micro_batches(train, cfg, cfg.seed, step, d)), d))
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            n = min(cfg.log_every, step + 1 - start)
            loss, ce, kl = (float(v) for v in torch.stack(history[-n:]).mean(0))
            check_finite(loss, step + 1, last_ckpt, "a smaller --lr")
            fields = {"loss": loss, "ce": ce, **({"kl": kl} if cfg.kl_weight else {}), "lr": lr}
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                fields.update(validate(forward, model, teacher, valid_batches, cfg, device, d))
            log.log(step + 1, tokens=n * tokens_per_step, **fields)
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            save({"step": step + 1}, step + 1)
            last_ckpt = ckpt_path

    # ---- evaluate and save
    history = [float(h[0]) for h in history]
    late = history[-max(1, len(history) // 10):]
    metrics = {"loss": sum(late) / len(late) if late else None,
               "loss_first": history[0] if history else None, "steps": cfg.steps,
               "tokens": cfg.steps * tokens_per_step, "seq_len": cfg.seq_len,
               **validate(forward, model, teacher, valid_batches, cfg, device, d)}
    metrics["time_s"] = round(time.time() - t_start, 1)
    save(metrics)
    log.final(**metrics)
    return metrics


if __name__ == "__main__":
    main(parse_args(Config))
