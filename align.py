"""
Stage 1 - hidden-state alignment: teach every GLA mixer to produce what its layer's softmax attention produces.

One residual stream runs through the frozen teacher. At every layer the teacher's attention and the student's GLA read
the same normalised input x = input_layernorm(h); the loss compares their outputs; and the TEACHER's output, not the
student's, is added to the stream (teacher forcing). So no layer's input depends on another layer's student, all
layers train at once from one forward pass, and one Stage-1 checkpoint serves every later hybrid (RADLADS step 1;
Li et al. Sec. 3). Only the mixer parameters train; everything else is the teacher's and frozen.

    loss_l = mean over tokens t of ||attn_l(x_t) - gla_l(x_t)||_2 / sqrt(D)        loss = mean over layers of loss_l

Each layer's late loss (mean over the last ~10% of steps) is stored as metrics["layer_losses"]: the GA-S1 baseline of
select_layers.py (the worst-aligned layers stay softmax).

Reads out/<run>/transfer/ckpt.pt (the teacher is inherited from its config) and the token files of data.py;
writes out/<run>/align/ckpt.pt (+ meta.json, log.jsonl).

    python align.py --steps=20 --batch_size=4 --seq_len=128 --log_every=5 --device=cpu      # CPU smoke run
    python align.py --run=smollm2                                                           # GPU: 300 x 32 x 512
"""

import dataclasses
import math
import os
import time
from dataclasses import dataclass

import torch

import data
from common import Logger, autocast, banner, check_finite, inherit, parse_args, pick_device, print_config


@dataclass
class Config:
    run: str = "smollm2"            # run name: reads/writes under <out_dir>/<run>
    out_dir: str = "out"            # root of all runs
    input: str = ""                 # Stage-0 checkpoint; "" -> <out_dir>/<run>/transfer/ckpt.pt
    output: str = ""                # "" -> <out_dir>/<run>/align/ckpt.pt
    teacher: str = ""               # "" -> inherited from the input checkpoint's config
    data_dir: str = ""              # token files of data.py; "" -> <out_dir>/<run>/data
    steps: int = 300                # optimizer steps (paper: 100M tokens; this default is ~5M)
    batch_size: int = 32            # sequences per step (paper: 96)
    seq_len: int = 512              # tokens per sequence (paper: 512)
    lr: float = 1e-3                # peak learning rate (paper: 1e-3)
    lr_min: float = 1e-5            # cosine decays to this (paper: "to ~0")
    warmup: int = 0                 # linear warmup steps (paper: none)
    weight_decay: float = 0.0       # AdamW weight decay
    clip: float = 1.0               # gradient-norm clip (paper: 1.0)
    log_every: int = 10             # print and log every N steps
    save_every: int = 0             # also write the checkpoint every N steps (0 = only at the end)
    valid_batches: int = 4          # held-out batches measured at the end
    compile: bool = False           # torch.compile the aligned forward (GPU)
    device: str = ""                # "" -> cuda if available else cpu
    seed: int = 0                   # data order: batch s is a function of (seed, s) only


def rms_distance(t, s):
    """Per-token RMS distance ||t - s||_2 / sqrt(D), averaged over tokens, in fp32."""
    return (t.float() - s.float()).pow(2).sum(-1).sqrt().mean() / math.sqrt(t.shape[-1])


def align_losses(teacher, mixers, idx):
    """One teacher-forced pass: per-layer distance between the teacher's attention and the student's mixer -> [L]."""
    layers = teacher.model.layers
    with torch.no_grad():
        h = teacher.model.embed_tokens(idx)
        cos, sin = teacher.rope(torch.arange(idx.shape[1], device=idx.device))
    losses = []
    for layer, mixer in zip(layers, mixers):
        with torch.no_grad():
            x = layer.input_layernorm(h)
            t = layer.self_attn(x, cos, sin)
        losses.append(rms_distance(t, mixer(x, cos, sin)))
        # teacher forcing: the teacher's attention output continues down the stream
        with torch.no_grad():
            h = h + t
            h = h + layer.mlp(layer.post_attention_layernorm(h))
    return torch.stack(losses)


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
    from model import load_checkpoint, save_checkpoint
    from teachers import from_pretrained
    from tokenizer import check_vocab, load_tokenizer
    t_start = time.time()
    run_dir = os.path.join(cfg.out_dir, cfg.run)
    cfg.input = cfg.input or os.path.join(run_dir, "transfer", "ckpt.pt")
    cfg.output = cfg.output or os.path.join(run_dir, "align", "ckpt.pt")
    cfg.data_dir = cfg.data_dir or os.path.join(run_dir, "data")
    device = cfg.device or pick_device()
    if cfg.steps < 1:
        raise ValueError(f"--steps={cfg.steps}: Stage 1 needs at least one step")
    torch.manual_seed(cfg.seed)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    # ---- load: all-linear student, teacher, data
    if not os.path.exists(cfg.input):
        raise FileNotFoundError(f"no Stage-0 checkpoint at {cfg.input}: run `python transfer.py --run={cfg.run}` first")
    student, parent = load_checkpoint(cfg.input, device=device)
    inherit(cfg, parent["config"], ["teacher"])
    print_config(cfg)
    if any(m != "gla" for m in student.config.mixers):
        raise ValueError(f"{cfg.input} is not all-linear (mixers {student.config.mixers}): Stage 1 starts from transfer.py")
    teacher = from_pretrained(cfg.teacher, device=device).eval()
    check_same_teacher(student, teacher)
    tok = load_tokenizer(cfg.teacher)
    check_vocab(tok, student.config.vocab_size)
    data.check_tokenizer(data.load_meta(cfg.data_dir), tok, cfg.data_dir)
    train, valid = data.load_tokens(cfg.data_dir, "train"), data.load_tokens(cfg.data_dir, "valid")
    n_layers = student.config.num_hidden_layers

    # Only the mixers train; the teacher's modules carry the stream, so the student's other modules sit unused.
    teacher.requires_grad_(False)
    student.requires_grad_(False)
    mixers = [layer.self_attn for layer in student.model.layers]
    params = [p for m in mixers for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay,
                            fused=device == "cuda")
    forward = torch.compile(align_losses) if cfg.compile else align_losses
    tokens_per_step = cfg.batch_size * cfg.seq_len
    banner("align (Stage 1)", device, student, tokens_per_step)
    print(f"   training {sum(p.numel() for p in params) / 1e6:.2f}M mixer parameters in {n_layers} layers")

    def save(metrics):
        save_checkpoint(cfg.output, student, stage="align", config=dataclasses.asdict(cfg), parent=cfg.input,
                        metrics=metrics, tokenizer=parent["tokenizer"])

    # ---- train
    log_path = os.path.join(os.path.dirname(cfg.output), "log.jsonl")
    if os.path.exists(log_path):
        os.remove(log_path)   # a fresh run (Stage 1 does not resume): its log starts empty
    log = Logger(os.path.dirname(cfg.output), cfg.steps)
    tail = max(1, math.ceil(cfg.steps / 10))          # the late steps whose per-layer losses are averaged
    tail_sum, last_ckpt, logged = torch.zeros(n_layers), None, 0
    for step in range(cfg.steps):
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = data.get_batch(train, cfg.batch_size, cfg.seq_len, data.batch_rng(cfg.seed, step), device)[:, :-1]
        with autocast(device):
            losses = forward(teacher, mixers, idx)
        loss = losses.mean()
        check_finite(loss.item(), step + 1, last_ckpt)   # before the update: a NaN never reaches the weights
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        losses = losses.detach().float().cpu()
        if step >= cfg.steps - tail:
            tail_sum += losses
        if (step + 1) % cfg.log_every == 0 or step == 0 or step + 1 == cfg.steps:
            worst = int(losses.argmax())
            log.log(step + 1, tokens=tokens_per_step * (step + 1 - logged), loss=float(losses.mean()),
                    worst=f"L{worst}:{float(losses[worst]):.3g}", grad=float(grad_norm), lr=lr,
                    layer_losses=[round(float(v), 5) for v in losses])
            logged = step + 1
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            save({"step": step + 1, "loss": float(losses.mean()), "layer_losses": losses.tolist()})
            last_ckpt = cfg.output

    # ---- evaluate on held-out windows, save
    with torch.no_grad(), autocast(device):
        v = [align_losses(teacher, mixers, data.get_batch(valid, cfg.batch_size, cfg.seq_len, data.batch_rng(cfg.seed, i),
                                                          device)[:, :-1]).cpu() for i in range(cfg.valid_batches)]
    layer_losses = (tail_sum / min(tail, cfg.steps)).tolist()
    metrics = {"loss": sum(layer_losses) / n_layers, "layer_losses": layer_losses,
               "valid_loss": float(torch.stack(v).mean()) if v else None,
               "valid_layer_losses": torch.stack(v).mean(0).tolist() if v else None,
               "steps": cfg.steps, "tokens": cfg.steps * tokens_per_step, "minutes": (time.time() - t_start) / 60}
    save(metrics)
    order = sorted(range(n_layers), key=lambda i: -layer_losses[i])
    print("layer losses (late mean): " + " ".join(f"{x:.3g}" for x in layer_losses))
    print(f"worst aligned (GA-S1 order): {order}")
    log.final(loss=metrics["loss"], valid_loss=metrics["valid_loss"], steps=cfg.steps, ckpt=cfg.output)
    return metrics


if __name__ == "__main__":
    main(parse_args(Config))
