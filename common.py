"""
Small pieces every stage shares: the --key=value parser, the step logger, the device and precision choice, the
NaN guard, and the forward KL computed in row chunks.

Each piece is written once here so that the stage scripts can stay flat and read top to bottom. Nothing runs at
import.

The chunked KL is the one piece of math here. Distillation needs KL(teacher || student) over the whole vocabulary for
every token, but B*T x V logits in fp32 do not fit (32 x 4096 x 49152 x 4 bytes = 25 GB). So `kl_div_chunked` takes
the final hidden states and the two output heads, and walks over rows: for each chunk of rows it builds both logit
blocks, computes the KL and, in the same pass, its gradient with respect to the student's hidden states and head,

    p = softmax(t), q = softmax(s):   KL = sum_v p (log p - log q),   dKL/ds = q - p

so that only [rows, V] blocks of one chunk are ever alive and nothing of size B*T x V is stored for the backward.
"""

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
import typing

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------------------- config

def _convert(name, typ, text):
    """Turn the text of one --key=value flag into the field's type, or explain why not."""
    origin = typing.get_origin(typ)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if text.lower() in ("none", "null"):
            return None
        typ = args[0]
    if typ is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{name} takes true or false, got {text!r}")
    if typ is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"--{name} takes an integer, got {text!r}") from None
    if typ is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"--{name} takes a number, got {text!r}") from None
    return text


def parse_args(Config, argv=None):
    """Build a `Config` from `--key=value` flags: typed from the dataclass fields, unknown keys and bad values rejected."""
    argv = sys.argv[1:] if argv is None else argv
    hints = typing.get_type_hints(Config)
    fields = {f.name: f for f in dataclasses.fields(Config)}
    valid = ", ".join(f"--{k}" for k in fields)
    values = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(f"usage: python {os.path.basename(sys.argv[0])} [--key=value ...]\nkeys (default):")
            for k, f in fields.items():
                print(f"  --{k}={f.default!r}")
            raise SystemExit(0)
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"error: expected --key=value, got {arg!r}. Valid keys: {valid}")
        key, text = arg[2:].split("=", 1)
        key = key.replace("-", "_")
        if key not in fields:
            raise SystemExit(f"error: unknown key --{key}. Valid keys: {valid}")
        try:
            values[key] = _convert(key, hints[key], text)
        except ValueError as e:
            raise SystemExit(f"error: {e}. Valid keys: {valid}") from None
    return Config(**values)


def print_config(cfg):
    """Print the resolved configuration, one key per line, so every log starts with what ran."""
    print(f"config ({type(cfg).__module__}):")
    for k, v in dataclasses.asdict(cfg).items():
        print(f"  {k} = {v!r}")


def inherit(cfg, parent_config, fields):
    """Fill the `fields` of `cfg` that are left unset ("" or -1) from the parent checkpoint's config, saying so."""
    for name in fields:
        mine, theirs = getattr(cfg, name), parent_config.get(name)
        if mine in ("", -1, None) and theirs not in (None, "", -1):
            setattr(cfg, name, theirs)
            print(f"inherited {name} = {theirs!r} from the parent checkpoint")
        elif theirs is not None and mine != theirs:
            print(f"override {name} = {mine!r} (parent had {theirs!r})")


def parse_budget(text, n_layers):
    """'0.25' / '25%' -> 0.25 * L rounded half up (at least 1); '8' -> 8. Clear errors for anything out of range.

    Half up, as the paper's configs count (Qwen2.5-3B, L = 36: 12.5/25/33/50% -> 5/9/12/18 layers; Llama-3.2-3B,
    L = 28: 4/7/9/14). Python's round() rounds half to even and would give 4 for 12.5% of 36."""
    text = str(text).strip()
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise ValueError(f"--budget={text!r}: give a fraction of the layers (0.25) or a count (8)") from None
    is_count = not text.endswith("%") and "." not in text and "e" not in text.lower()
    if value <= 0:
        raise ValueError(f"--budget={text}: the budget must be positive (a fraction in (0, 1] like 0.25, or a count "
                         f"from 1 to {n_layers}); with no softmax layer there is nothing to select")
    if is_count:
        k = int(value)
    elif value <= 1:
        k = max(1, math.floor(value * n_layers + 0.5 + 1e-9))
    else:
        raise ValueError(f"--budget={text}: a fraction must be at most 1; for a count write an integer (e.g. 8)")
    if k > n_layers:
        raise ValueError(f"--budget={text}: asks for {k} softmax layers but the model has only {n_layers}; "
                         f"use a count from 1 to {n_layers} or a fraction")
    return k


# --------------------------------------------------------------------------------------------------------- devices

def pick_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def autocast(device):
    """bf16 autocast on the GPU (the papers train in bf16); plain fp32 on the CPU, where bf16 matmuls are slow."""
    if str(device).startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def banner(stage, device, model=None, tokens_per_step=None):
    """One block at the start of a stage: versions, device, parameter counts by kind, tokens per step."""
    import triton  # noqa: F401  (imported for its version only)
    gpu = torch.cuda.get_device_name() if str(device).startswith("cuda") else "no GPU"
    print(f"== {stage} | torch {torch.__version__} | triton {triton.__version__} | {device} ({gpu})")
    if model is not None:
        counts = {}
        for name, p in model.named_parameters():
            kind = "mixer" if ".self_attn." in name else "embed/head" if "embed" in name or "lm_head" in name else "other"
            counts[kind] = counts.get(kind, 0) + p.numel()
        print("   params: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items()))
    if tokens_per_step:
        print(f"   tokens per step: {tokens_per_step:,}")


# --------------------------------------------------------------------------------------------------------- logging

class Logger:
    """One line per log step with a fixed field order, the same fields appended to out_dir/log.jsonl."""

    def __init__(self, out_dir, total_steps=None):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "log.jsonl")
        self.total = total_steps
        self.t0 = self.t_last = time.time()

    def log(self, step, total=None, tokens=None, **fields):
        """`fields` in the order given (loss first); `tokens` = tokens processed since the previous log call."""
        total = total or self.total
        now = time.time()
        dt, self.t_last = now - self.t_last, now
        parts = [f"step {step}/{total}" if total else f"step {step}"]
        for k, v in fields.items():
            if isinstance(v, (list, dict)):
                continue                                   # long values go to log.jsonl only
            parts.append(f"{k} {v:.2e}" if k == "lr" else f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
        parts.append(f"{dt * 1000:.0f}ms")
        if tokens:
            parts.append(f"{tokens / max(dt, 1e-9) / 1000:.0f}k tok/s")
        if total and step > 0:
            eta = (now - self.t0) / step * (total - step)
            parts.append(f"eta {eta / 60:.1f}m")
        print(" | ".join(parts), flush=True)
        record = {"step": step, **{k: float(v) if isinstance(v, (int, float)) else v for k, v in fields.items()},
                  "ms": round(dt * 1000, 1), "time": round(now - self.t0, 2)}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def final(self, **metrics):
        parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
                 if not isinstance(v, (list, dict))]
        print("final | " + " | ".join(parts + [f"{(time.time() - self.t0) / 60:.1f}m"]), flush=True)


def check_finite(loss, step, last_ckpt):
    """Stop a run at the first NaN/inf loss, naming the step and the last checkpoint that is still good."""
    if not math.isfinite(float(loss)):
        raise FloatingPointError(
            f"loss is {float(loss)} at step {step}; stopping. The last good checkpoint is {last_ckpt or 'none (no step saved yet)'}. "
            "Lower --lr, check the data for empty windows, or resume from that checkpoint.")


def write_json(path, obj):
    """Write JSON atomically (temp file, then os.replace): an interrupted run never leaves half a file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------------ chunked KL

class _ChunkedKL(torch.autograd.Function):
    """Forward KL(t || s) per token, averaged over rows, with the gradient computed chunk by chunk in the forward."""

    @staticmethod
    def forward(ctx, s_hidden, s_weight, t_hidden, t_weight, chunk, grad_enabled):
        n = s_hidden.shape[0]
        total = torch.zeros((), device=s_hidden.device, dtype=torch.float32)
        # Grad mode is always off inside forward: whether a backward will come was read by the caller.
        need_grad = grad_enabled and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        d_hidden = torch.zeros_like(s_hidden) if need_grad else None
        d_weight = torch.zeros_like(s_weight, dtype=torch.float32) if need_grad and ctx.needs_input_grad[1] else None
        for i in range(0, n, chunk):
            sh = s_hidden[i:i + chunk]
            s_logp = F.log_softmax((sh @ s_weight.t()).float(), dim=-1)       # [rows, V]
            t_logp = F.log_softmax((t_hidden[i:i + chunk] @ t_weight.t()).float(), dim=-1)
            p = t_logp.exp()
            total += (p * (t_logp - s_logp)).sum()
            if need_grad:
                g = (s_logp.exp() - p) / n                                     # d mean-KL / d student logits
                del s_logp, t_logp, p
                d_hidden[i:i + chunk] = (g.to(s_weight.dtype) @ s_weight).to(s_hidden.dtype)
                if d_weight is not None:
                    d_weight += g.t() @ sh.float()
        ctx.save_for_backward(d_hidden, d_weight)
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        d_hidden, d_weight = ctx.saved_tensors
        dh = d_hidden * grad_out if d_hidden is not None else None
        dw = d_weight * grad_out if d_weight is not None else None
        return dh, dw, None, None, None, None


def kl_div_chunked(s_hidden, s_weight, t_hidden, t_weight, chunk=4096):
    """Mean over rows of KL(softmax(t_hidden @ t_weight.T) || softmax(s_hidden @ s_weight.T)).

    s_hidden, t_hidden: [N, D] final-normed hidden states (student, teacher); s_weight, t_weight: [V, D] output heads.
    Never materialises N x V; gradients flow to s_hidden and s_weight only."""
    return _ChunkedKL.apply(s_hidden, s_weight, t_hidden.detach(), t_weight.detach(), chunk, torch.is_grad_enabled())


def kl_div_reference(s_logits, t_logits):
    """The same KL from full logits: the plain formula, used by tests to check the chunked one."""
    t_logp = F.log_softmax(t_logits.float(), -1)
    return (t_logp.exp() * (t_logp - F.log_softmax(s_logits.float(), -1))).sum(-1).mean()
