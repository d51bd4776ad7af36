"""
Stage 3: a short finetune of the hybrid at a longer context (RADLADS step 3; arXiv 2505.03005).

Stage 2 taught the hybrid to match the teacher token by token at the distillation length. Here it trains on plain
next-token prediction at a longer context (2x by default), so the GLA layers' decay gates and the softmax layers
learn to carry information further than they saw in Stage 2. A flat small lr over all parameters keeps the result
close to the distilled model; the loss can keep a share of the teacher's KL as an anchor.

    loss = (1 - w) * CE(next token) + w * KL(teacher || student),    w = --kl_weight (0 = plain CE, RADLADS: 0.5)
    AdamW(0.9, 0.95), lr 1e-5 flat after a short warmup, gradient-norm clip 1.0

Both terms are computed in row chunks from the final hidden states (no B*T x V fp32 tensor): the cross-entropy
by recomputing each chunk's logits in the backward (activation checkpointing), the KL by common.kl_div_chunked.

Reads  out/<run>/distill/ckpt.pt (the teacher and token files named in its config chain).
Writes out/<run>/finetune/ckpt.pt (+ meta.json, log.jsonl).

    python finetune.py --run=tiny --steps=10 --batch_size=2 --seq_len=128     # a few CPU steps
    python finetune.py --run=smollm2 --steps=500 --kl_weight=0.5              # one GPU, 2x the Stage-2 length
"""

import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import model as M
from common import (Logger, autocast, banner, check_finite, inherit, kl_div_chunked, parse_args, pick_device,
                    print_config)
from distill import batch_at, load_teachers, open_data, set_lr, teacher_hidden


@dataclass
class Config:
    run: str = "smollm2"          # run name: everything lives in <out_dir>/<run>/
    out_dir: str = "out"          # root of all runs
    input: str = ""               # Stage-2 checkpoint; "" = <out_dir>/<run>/distill/ckpt.pt
    teacher: str = ""             # teacher source (for --kl_weight > 0 and the tokenizer check); "" = inherited
    data_dir: str = ""            # token files; "" = inherited from the parent checkpoint
    out: str = "finetune"         # output subfolder of the run
    steps: int = 500              # optimizer steps
    batch_size: int = 4           # sequences per step
    seq_len: int = -1             # tokens per sequence; -1 = twice the parent's (Stage-2) seq_len
    lr: float = 1e-5              # flat lr of all parameters
    warmup: int = 20              # linear warmup steps
    weight_decay: float = 0.0     # AdamW weight decay
    clip: float = 1.0             # gradient-norm clip
    kl_weight: float = 0.0        # share of KL(teacher || student) in the loss (0 = next-token CE only)
    chunk: int = 4096             # rows per loss chunk
    valid_batches: int = 8        # held-out batches for the validation loss
    eval_every: int = 0           # validation every N steps (0 = only at the end)
    save_every: int = 500         # checkpoint every N steps (0 = only at the end)
    compile: bool = False         # torch.compile the model's forward
    device: str = ""              # "" = cuda if available else cpu
    seed: int = 1                 # data order (1: other windows than Stage 2's seed 0)


def _ce_sum(hidden, weight, targets):
    return F.cross_entropy((hidden @ weight.t()).float(), targets, reduction="sum")


def cross_entropy_chunked(hidden, weight, targets, chunk=4096):
    """Mean cross-entropy of softmax(hidden @ weight.T) [N, V] against targets [N], chunk rows at a time: each
    chunk's logits are freed after its forward and rebuilt in the backward, so at most one [chunk, V] block lives."""
    total = 0.0
    for i in range(0, hidden.shape[0], chunk):
        total = total + checkpoint(_ce_sum, hidden[i:i + chunk], weight, targets[i:i + chunk], use_reentrant=False)
    return total / hidden.shape[0]


def losses(model, forward, teacher, batch, cfg, device):
    """(loss, ce, kl) of one batch [B, T+1]; kl is None when kl_weight is 0."""
    idx, targets = batch[:, :-1], batch[:, 1:]
    # Under no_grad (validation) the head is detached, so that kl_div_chunked skips its gradient pass.
    head = model.lm_head.weight if torch.is_grad_enabled() else model.lm_head.weight.detach()
    with autocast(device):
        h = forward(idx, return_hidden=True).flatten(0, 1)
        ce = cross_entropy_chunked(h, head, targets.flatten(), cfg.chunk)
        if not cfg.kl_weight:
            return ce, ce, None
        t = teacher_hidden(teacher, idx, device).flatten(0, 1)
        kl = kl_div_chunked(h, head, t, teacher.lm_head.weight, cfg.chunk)
    return (1 - cfg.kl_weight) * ce + cfg.kl_weight * kl, ce, kl


@torch.no_grad()
def validate(model, teacher, batches, cfg, device):
    """Held-out mean cross-entropy and perplexity (and KL to the teacher when kl_weight > 0)."""
    model.eval()
    ce = kl = 0.0
    for batch in batches:
        _, c, k = losses(model, model, teacher, batch, cfg, device)
        ce, kl = ce + float(c), kl + (float(k) if k is not None else 0.0)
    model.train()
    n = max(len(batches), 1)
    metrics = {"valid_ce": ce / n, "valid_ppl": math.exp(min(ce / n, 50.0))}
    return {**metrics, "valid_kl": kl / n} if cfg.kl_weight else metrics


# ---------------------------------------------------------------------------------------------------------- main

def main(cfg):
    t_start = time.time()
    run_dir = os.path.join(cfg.out_dir, cfg.run)
    cfg.input = cfg.input or os.path.join(run_dir, "distill", "ckpt.pt")
    out_dir = os.path.join(run_dir, cfg.out)
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    device = cfg.device or pick_device()
    torch.manual_seed(cfg.seed)

    # ---- load: the hybrid, the teacher if the loss needs it, data at the longer context
    model, parent = M.load_checkpoint(cfg.input, device=device)
    inherit(cfg, parent["config"], ["teacher", "data_dir"])
    if cfg.seq_len == -1:
        cfg.seq_len = 2 * parent["config"].get("seq_len", 512)
        print(f"seq_len = {cfg.seq_len}: twice the parent's {cfg.seq_len // 2}")
    print_config(cfg)
    teacher = load_teachers(cfg.teacher, device)[1] if cfg.kl_weight else None
    print(f"hybrid mixers: {''.join('S' if m == 'attn' else '.' for m in model.config.mixers)} (S = softmax)")
    train, valid = open_data(cfg)
    valid_batches = [batch_at(valid, cfg, 1234, i, device) for i in range(cfg.valid_batches)]
    forward = torch.compile(model) if cfg.compile else model
    opt = torch.optim.AdamW([{"params": list(model.parameters()), "lr": cfg.lr, "base_lr": cfg.lr}],
                            betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    banner("finetune (Stage 3)", device, model, tokens_per_step)

    def save(metrics):
        M.save_checkpoint(ckpt_path, model, stage="finetune", config=asdict(cfg), parent=cfg.input,
                          metrics=metrics, tokenizer=parent["tokenizer"])

    # ---- train
    log = Logger(out_dir, cfg.steps)
    history, last_ckpt = [], None
    for step in range(cfg.steps):
        lr = set_lr(opt, step, cfg.warmup)
        loss, ce, kl = losses(model, forward, teacher, batch_at(train, cfg, cfg.seed, step, device), cfg, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip))
        loss, ce, kl = (None if x is None else float(x.detach()) for x in (loss, ce, kl))
        # A non-finite gradient stops the run like a non-finite loss, before the update spoils the weights.
        check_finite(loss if math.isfinite(norm) else norm, step + 1, last_ckpt)
        opt.step()
        history.append(loss)
        fields = {"loss": loss, "ce": ce, **({"kl": kl} if kl is not None else {}), "lr": lr}
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            fields.update(validate(model, teacher, valid_batches, cfg, device))
        log.log(step + 1, tokens=tokens_per_step, **fields)
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            save({"step": step + 1, "loss": loss})
            last_ckpt = ckpt_path

    # ---- evaluate and save
    late = history[-max(1, len(history) // 10):]
    metrics = {"loss": sum(late) / len(late), "loss_first": history[0] if history else None, "steps": cfg.steps,
               "tokens": cfg.steps * tokens_per_step, "seq_len": cfg.seq_len,
               **validate(model, teacher, valid_batches, cfg, device)}
    metrics["time_s"] = round(time.time() - t_start, 1)
    save(metrics)
    log.final(**metrics)
    return metrics


if __name__ == "__main__":
    main(parse_args(Config))
