"""
Stage 1 - hidden-state alignment: teach every GLA mixer to produce what its layer's softmax attention produces.

One residual stream runs through the frozen teacher. At every layer the teacher's attention and the student's GLA read
the same normalised input x = input_layernorm(h); the loss compares their outputs; and the TEACHER's output, not the
student's, is added to the stream (teacher forcing). So no layer's input depends on another layer's student, all
layers train at once from one forward pass, and one Stage-1 checkpoint serves every later hybrid (RADLADS step 1;
Li et al. Sec. 3). Only the mixer parameters train; everything else is the teacher's and frozen.

    loss_l = mean over tokens t of ||attn_l(x_t) - gla_l(x_t)||_2 / sqrt(D)        loss = mean over layers of loss_l
    AdamW(0.9, 0.95, weight decay 0.01), lr 1e-3 cosine to 1e-5, gradient-norm clip 1.0

Each layer's late loss (mean over the last ~10% of steps) is stored as metrics["layer_losses"]: the GA-S1 baseline of
select_layers.py (the worst-aligned layers stay softmax). On the GPU the frozen teacher runs in bf16 weights and the
mixers (fp32 weights) under bf16 autocast, and the whole step is replayed as one CUDA graph (--graph, as in
distill.py; the lr is a tensor the graph reads, refilled each step); under torchrun every rank takes its rows of each
global batch (DDP).

Reads out/<run>/transfer/ckpt.pt (the teacher is inherited from its config) and the token files of data.py;
writes out/<run>/align/ckpt.pt (+ meta.json, log.jsonl); mid-run checkpoints every --save_every steps, which
--resume=true continues.

    python align.py --steps=20 --batch_size=4 --seq_len=128 --log_every=5 --device=cpu      # CPU smoke run
    python align.py --run_name=smollm2                                                      # GPU: 300 x 32 x 512
"""

import dataclasses
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

import model as M
from common import (Logger, all_mean, autocast, banner, check_finite, check_modes, check_positive, cuda_graph,
                    distribute, inherit, init_dist, load_optimizer, lock_folder, parse_args, print_config, want_graph)
from distill import micro_batches, open_data


@dataclass
class Config:
    run_name: str = "smollm2"       # run name: reads/writes under <out_dir>/<run_name>
    out_dir: str = "out"            # root of all runs
    input: str = ""                 # Stage-0 checkpoint; "" -> <out_dir>/<run_name>/transfer/ckpt.pt
    output: str = ""                # "" -> <out_dir>/<run_name>/align/ckpt.pt
    teacher: str = ""               # "" -> inherited from the input checkpoint's config
    data_dir: str = ""              # token files of data.py; "" -> <out_dir>/<run_name>/data
    steps: int = 300                # optimizer steps (paper: 100M tokens; this default is ~5M)
    batch_size: int = 32            # sequences per step, over all processes (paper: 96)
    micro_batch: int = 0            # sequences per forward per process (gradients accumulate); 0 = all of its share
    seq_len: int = 512              # tokens per sequence (paper: 512)
    lr: float = 1e-3                # peak learning rate (paper: 1e-3)
    lr_min: float = 1e-5            # cosine decays to this (paper: "to ~0")
    warmup: int = 0                 # linear warmup steps (paper: none)
    weight_decay: float = 0.01      # AdamW weight decay (the official code: torch's default 0.01)
    clip: float = 1.0               # gradient-norm clip (paper: 1.0)
    log_every: int = 10             # print and log every N steps (the host waits for the GPU only then)
    save_every: int = 0             # mid-run checkpoint every N steps (0 = only at the end)
    resume: bool = False            # continue the mid-run checkpoint at --output (same settings)
    valid_batches: int = 4          # held-out batches measured at the end
    compile: str = "auto"           # torch.compile the per-layer step: auto (on the GPU) | true | false
    graph: str = "auto"             # replay each step as one CUDA graph: auto (on a GPU, one process or DDP) | true
                                    # | false
    device: str = ""                # "" -> cuda if available else cpu
    seed: int = 0                   # data order: batch s is a function of (seed, s) only

    def __post_init__(self):
        check_positive(self, "steps", "batch_size", "seq_len", "log_every", "micro_batch", "save_every",
                       "valid_batches", "warmup", allow_zero=("micro_batch", "save_every", "valid_batches", "warmup"))
        check_modes(self, "compile", "graph")


def rms_distance(t, s):
    """Per-token RMS distance ||t - s||_2 / sqrt(D), averaged over tokens, in fp32."""
    return (t.float() - s.float()).pow(2).sum(-1).sqrt().mean() / math.sqrt(t.shape[-1])


def align_layer(layer, mixer, h, cos, sin):
    """One layer of the teacher-forced pass: (the stream after the layer, the layer's loss)."""
    with torch.no_grad():
        x = layer.input_layernorm(h)
        t = layer.self_attn(x, cos, sin)
    loss = rms_distance(t, mixer(x, cos, sin))
    # teacher forcing: the teacher's attention output continues down the stream
    with torch.no_grad():
        h = h + t
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return h, loss


def align_losses(teacher, mixers, idx, step=align_layer):
    """One teacher-forced pass: per-layer distance between the teacher's attention and the student's mixer -> [L].
    step: align_layer, or its compiled form (one graph serves every layer: parameters are its inputs)."""
    with torch.no_grad():
        h = teacher.model.embed_tokens(idx)
        cos, sin = teacher.rope(torch.arange(idx.shape[1], device=idx.device))
    losses = []
    for layer, mixer in zip(teacher.model.layers, mixers):
        h, loss = step(layer, mixer, h, cos, sin)
        losses.append(loss)
    return torch.stack(losses)


class Aligner(nn.Module):
    """The student's mixers as one module, so that DDP can wrap them: forward(teacher, idx) = align_losses."""

    def __init__(self, mixers, compile=False):
        super().__init__()
        self.mixers = nn.ModuleList(mixers)
        self.step = torch.compile(align_layer) if compile else align_layer

    def forward(self, teacher, idx):
        return align_losses(teacher, self.mixers, idx, self.step)


def lr_at(step, cfg):
    """Linear warmup, then cosine from lr to lr_min over the remaining steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * p))


def check_same_teacher(student, teacher):
    """The student's non-mixer weights must be the teacher's (transfer copied them); else the teacher is wrong."""
    t = teacher.state_dict()
    for name, p in student.state_dict().items():
        if ".self_attn." in name:
            continue
        if name not in t or t[name].shape != p.shape or not torch.allclose(t[name].float(), p.float(), atol=1e-6):
            raise ValueError(f"the student's {name} differs from the teacher's: the transfer checkpoint was made "
                             "from another teacher. Pass the matching --teacher or rerun transfer.py")


def main(cfg):
    from teachers import from_pretrained
    from tokenizer import check_vocab, load_tokenizer
    t_start = time.time()
    d = init_dist(cfg.device)
    device = d.device
    run_dir = os.path.join(cfg.out_dir, cfg.run_name)
    cfg.input = cfg.input or os.path.join(run_dir, "transfer", "ckpt.pt")
    cfg.output = cfg.output or os.path.join(run_dir, "align", "ckpt.pt")
    if d.main:
        lock_folder(os.path.dirname(cfg.output), "align.py")  # one writer; also checks the output can be written
    torch.manual_seed(cfg.seed)
    cuda = device.startswith("cuda")

    # ---- load: all-linear student (or the mid-run checkpoint to resume), teacher, data
    if not os.path.exists(cfg.input):
        raise FileNotFoundError(f"no Stage-0 checkpoint at {cfg.input}: run `python transfer.py "
                                f"--run_name={cfg.run_name}` first")
    parent = M.checkpoint_info(cfg.input)
    inherit(cfg, parent["config"], ["teacher"])
    print_config(cfg)
    state = M.resume_state(cfg.output, dataclasses.asdict(cfg)) if cfg.resume else None
    if state == "finished":
        print(f"final | {cfg.output} is complete with these settings: nothing to do")
        return M.checkpoint_info(cfg.output)["metrics"]
    student, _ = M.load_checkpoint(cfg.output if state else cfg.input, device=device)
    if any(m == "attn" for m in student.config.mixers):
        raise ValueError(f"{cfg.input} is not all-linear (mixers {student.config.mixers}): Stage 1 starts from "
                         "transfer.py")
    teacher = from_pretrained(cfg.teacher, device=device).eval().requires_grad_(False)
    check_same_teacher(student, teacher)
    if cuda:
        teacher.to(torch.bfloat16)  # frozen: bf16 weights, as the teacher runs in distill.py
    tok = load_tokenizer(cfg.teacher)
    check_vocab(tok, student.config.vocab_size)
    train, valid = open_data(cfg, run_dir)
    n_layers = student.config.num_hidden_layers

    # Only the mixers train; the teacher's modules carry the stream, so the student's other modules sit unused.
    student.requires_grad_(False)
    compiled = cfg.compile == "true" or (cfg.compile == "auto" and cuda)
    aligner = Aligner([layer.self_attn for layer in student.model.layers], compiled).requires_grad_(True)
    params = list(aligner.parameters())
    graphs = want_graph(cfg.graph, d)
    # The lr changes every step (cosine): a recorded step reads it from a tensor on the GPU, refilled before each step.
    opt = torch.optim.AdamW(params, lr=torch.tensor(cfg.lr, device=device) if graphs else cfg.lr, betas=(0.9, 0.95),
                            weight_decay=cfg.weight_decay, fused=cuda, capturable=cuda)
    start = 0
    if state:
        load_optimizer(opt, aligner, state["optimizer"], d, shard=False)
        start = state["step"]
    forward = distribute(aligner, d)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    banner("align (Stage 1)", device, student, tokens_per_step, d)
    print(f"   training {sum(p.numel() for p in params) / 1e6:.2f}M mixer parameters in {n_layers} layers")

    def save(metrics, step=None):
        train_state = None if step is None else {"step": step, "optimizer": opt.state_dict(),
                                                 "history": [h.tolist() for h in history]}
        if d.main:
            M.save_checkpoint(cfg.output, student, stage="align", config=dataclasses.asdict(cfg), parent=cfg.input,
                              metrics=metrics, tokenizer=parent["tokenizer"], teacher=parent.get("teacher"),
                              train_state=train_state)

    # ---- train
    log = Logger(os.path.dirname(cfg.output), cfg.steps, start, d.main)
    tail = max(1, math.ceil(cfg.steps / 10))          # the late steps whose per-layer losses are averaged
    history = [torch.tensor(h, device=device) for h in state["history"]] if state else []  # per step, per layer
    last_ckpt = cfg.output if state else None

    def train_step(*batches):
        """One optimizer step over this process's micro-batches [b, T + 1]: (per-layer losses, gradient norm) as one
        tensor [L + 1] on the device."""
        losses = torch.zeros(n_layers, device=device)
        for i, idx in enumerate(batches):
            last = i == len(batches) - 1 or not hasattr(forward, "no_sync")
            with autocast(device), (torch.enable_grad() if last else forward.no_sync()):
                step_losses = forward(teacher, idx[:, :-1]) / len(batches)
            step_losses.mean().backward()
            losses += step_losses.detach().float()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        ok = torch.isfinite(losses).all() & torch.isfinite(grad_norm)   # a NaN never reaches the weights
        if cuda:
            opt.found_inf = (~ok).float()   # fused AdamW skips the update on the GPU, no wait for the host
            opt.step()
        elif bool(ok):
            opt.step()
        opt.zero_grad(set_to_none=True)
        return torch.cat([losses, grad_norm.float().reshape(1)])

    run = cuda_graph(train_step) if graphs else train_step
    for step in range(start, cfg.steps):
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(lr)       # in place: the recorded step reads this tensor
            else:
                group["lr"] = lr
        out = run(*micro_batches(train, cfg, cfg.seed, step, d))
        losses, grad_norm = out[:-1], out[-1]
        history.append(all_mean(losses, d))
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            n = min(cfg.log_every, step + 1 - start)
            mean = torch.stack(history[-n:]).mean(0).cpu()
            check_finite(float(mean.mean()), step + 1, last_ckpt, "a smaller --lr")
            worst = int(mean.argmax())
            log.log(step + 1, tokens=tokens_per_step * n, loss=float(mean.mean()),
                    worst=f"L{worst}:{float(mean[worst]):.3g}", grad=float(grad_norm), lr=lr,
                    layer_losses=[round(float(v), 5) for v in mean])
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            save({"step": step + 1}, step + 1)
            last_ckpt = cfg.output

    # ---- evaluate on held-out windows, save
    late = history[-tail:]
    layer_losses = torch.stack(late).mean(0).tolist() if late else None
    with torch.no_grad(), autocast(device):
        held_out = [torch.cat(micro_batches(valid, cfg, cfg.seed, i, d))[:, :-1] for i in range(cfg.valid_batches)]
        v = [all_mean(align_losses(teacher, aligner.mixers, idx, aligner.step), d).float().cpu()
             for idx in held_out]
    metrics = {"loss": sum(layer_losses) / n_layers if layer_losses else None, "layer_losses": layer_losses,
               "valid_loss": float(torch.stack(v).mean()) if v else None,
               "valid_layer_losses": torch.stack(v).mean(0).tolist() if v else None,
               "steps": cfg.steps, "tokens": cfg.steps * tokens_per_step, "minutes": (time.time() - t_start) / 60}
    save(metrics)
    if layer_losses:
        order = sorted(range(n_layers), key=lambda i: -layer_losses[i])
        print("layer losses (late mean): " + " ".join(f"{x:.3g}" for x in layer_losses))
        print(f"worst aligned (GA-S1 order): {order}")
    log.final(loss=metrics["loss"], valid_loss=metrics["valid_loss"], steps=cfg.steps, ckpt=cfg.output)
    return metrics


if __name__ == "__main__":
    main(parse_args(Config))
