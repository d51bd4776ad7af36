"""
Stage 2: KL distillation of the hybrid (RADLADS step 2; arXiv 2505.03005, arXiv 2512.20569 section 3).

The hybrid is the Stage-1 all-linear student with the selected layers put back to the teacher's exact softmax
attention (its q/k/v/o weights and its pre-attention norm). Stage 1 only matched each mixer's output in isolation;
here the whole network learns to reproduce the teacher's next-token distribution, so the linear layers learn to work
together and around the softmax layers. Every parameter trains: the mixers (and pre-attention norms) fast, the rest
(embeddings, MLPs, other norms, head) at a rate small enough to keep the teacher's knowledge.

    loss = mean over tokens t of  KL(p_t || q_t) = sum_v p_t(v) (log p_t(v) - log q_t(v))
           p_t = softmax(teacher logits), q_t = softmax(student logits), temperature 1, full vocabulary
    AdamW(0.9, 0.95), constant lr after a short warmup: 1e-4 for self_attn.* and input_layernorm, 7e-6 for the rest,
    gradient norm clipped to 1.0

The KL is computed by common.kl_div_chunked from the final hidden states and the two heads, in row chunks, so no
B*T x V fp32 tensor is ever alive. SmolLM2 ties its embedding and head; `--untie=true` gives the head its own copy
while training (as RADLADS does) and re-ties it in the final checkpoint (`--retie=mean` averages the two,
`embed`/`head` keeps one), reporting the held-out KL before and after re-tying; checkpoints written during training
keep the untied head.

Reads  out/<run>/align/ckpt.pt, out/<run>/select/selection.json (or --layers=3,7), the teacher named in the parent
       checkpoint's config, the token files of data.py.
Writes out/<run>/<out>/ckpt.pt (+ meta.json, log.jsonl); `--out=distill_kl_8` keeps several hybrids side by side.

    python distill.py --run=tiny --steps=20 --batch_size=2 --seq_len=64 --layers=1    # a few CPU steps
    python distill.py --run=smollm2 --steps=2000 --batch_size=16 --seq_len=1024       # one GPU
"""

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

import data
import model as M
from common import (Logger, autocast, banner, check_finite, inherit, kl_div_chunked, parse_args, pick_device,
                    print_config)
from teachers import from_pretrained


@dataclass
class Config:
    run: str = "smollm2"          # run name: everything lives in <out_dir>/<run>/
    out_dir: str = "out"          # root of all runs
    input: str = ""               # Stage-1 checkpoint; "" = <out_dir>/<run>/align/ckpt.pt
    selection: str = ""           # selection.json of select_layers.py; "" = <out_dir>/<run>/select/selection.json
    layers: str = ""              # "3,7" overrides the selection; "none" = all-linear student
    teacher: str = ""             # teacher source; "" = inherited from the parent checkpoint
    data_dir: str = ""            # token files; "" = inherited from the parent checkpoint
    out: str = "distill"          # output subfolder of the run (e.g. distill_kl_8 to keep several hybrids)
    steps: int = 1000             # optimizer steps
    batch_size: int = 8           # sequences per step
    seq_len: int = 512            # tokens per sequence (the paper uses 4096)
    lr_mixer: float = 1e-4        # lr of self_attn.* and input_layernorm (RADLADS step 2)
    lr_other: float = 7e-6        # lr of everything else
    warmup: int = 20              # linear warmup steps, then constant
    weight_decay: float = 0.0     # AdamW weight decay
    clip: float = 1.0             # gradient-norm clip
    untie: bool = False           # train a separate head copy if the embeddings are tied, re-tie on save
    retie: str = "mean"           # how to re-tie an untied head: mean | embed | head
    chunk: int = 4096             # rows per KL chunk (memory: ~4 x chunk x vocab fp32)
    valid_batches: int = 8        # held-out batches for the validation KL
    eval_every: int = 0           # validation KL every N steps (0 = only at the end)
    save_every: int = 500         # checkpoint every N steps (0 = only at the end)
    compile: bool = False         # torch.compile the student's forward
    device: str = ""              # "" = cuda if available else cpu
    seed: int = 0                 # data order: batch s is a function of (seed, s) only


# ------------------------------------------------------------------------------------------- shared with score.py

def make_hybrid(student, teacher, layers):
    """Restore `layers` of the student to the teacher's softmax attention and pre-attention norm (in place)."""
    p = next(student.parameters())
    for l in layers:
        attn = M.Attention(student.config).to(device=p.device, dtype=p.dtype)
        attn.load_state_dict(teacher.model.layers[l].self_attn.state_dict(), strict=True)
        student.set_mixer(l, attn, "attn")
        student.model.layers[l].input_layernorm.load_state_dict(
            teacher.model.layers[l].input_layernorm.state_dict(), strict=True)
    return student


def make_optimizer(model, lr_mixer, lr_other, weight_decay=0.0):
    """AdamW(0.9, 0.95) with two groups: mixers + pre-attention norms at lr_mixer, everything else at lr_other."""
    fast, slow = [], []
    for name, p in model.named_parameters():
        (fast if ".self_attn." in name or ".input_layernorm." in name else slow).append(p)
    groups = [{"params": fast, "lr": lr_mixer, "base_lr": lr_mixer},
              {"params": slow, "lr": lr_other, "base_lr": lr_other}]
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=weight_decay)


def set_lr(opt, step, warmup):
    """Linear warmup over `warmup` steps, then each group's constant base lr. Returns the first group's lr."""
    scale = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * scale
    return opt.param_groups[0]["lr"]


def load_teachers(source, device):
    """(fp32 teacher on the CPU, whose weights make_hybrid restores; the frozen teacher that runs: the same model
    on the CPU, a bf16 copy on the GPU, forward only)."""
    teacher32 = from_pretrained(source).eval().requires_grad_(False)
    if not str(device).startswith("cuda"):
        return teacher32, teacher32
    return teacher32, copy.deepcopy(teacher32).to(device=device, dtype=torch.bfloat16)


def open_data(cfg):
    """Train and valid token maps of cfg.data_dir, refused if made with another tokenizer than the teacher's."""
    from tokenizer import load_tokenizer
    cfg.data_dir = cfg.data_dir or os.path.join(cfg.out_dir, cfg.run, "data")
    data.check_tokenizer(data.load_meta(cfg.data_dir), load_tokenizer(cfg.teacher), cfg.data_dir)
    return data.load_tokens(cfg.data_dir, "train"), data.load_tokens(cfg.data_dir, "valid")


def batch_at(tokens, cfg, seed, step, device):
    """Batch `step` of the stream `seed`: [B, T+1] token ids, the same in every run with the same (seed, step)."""
    return data.get_batch(tokens, cfg.batch_size, cfg.seq_len, data.batch_rng(seed, step), device)


@torch.no_grad()
def teacher_hidden(teacher, idx, device):
    """The teacher's final-normed hidden states [B, T, D], computed once per batch (score.py shares them)."""
    with autocast(device):
        return teacher(idx, return_hidden=True)


def stage2_step(student, t_hidden, t_head, idx, opt, clip=1.0, device="cpu", chunk=4096, forward=None):
    """One Stage-2 step on one batch: forward KL(teacher || student), backward, clip, AdamW step.

    t_hidden [B, T, D] and t_head [V, D] are the teacher's (see teacher_hidden). Returns the KL as a float, or nan
    when the loss or the gradient is not finite; the update is then skipped, so the model stays as it was."""
    forward = forward or student
    with autocast(device):
        s_hidden = forward(idx, return_hidden=True)
        loss = kl_div_chunked(s_hidden.flatten(0, 1), student.lm_head.weight, t_hidden.flatten(0, 1), t_head, chunk)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(student.parameters(), clip)
    loss, norm = float(loss.detach()), float(norm)
    if not (math.isfinite(loss) and math.isfinite(norm)):
        opt.zero_grad(set_to_none=True)
        return float("nan")
    opt.step()
    return loss


@torch.no_grad()
def valid_kl(student, teacher, batches, device, chunk=4096):
    """Mean KL(teacher || student) over fixed held-out batches."""
    student.eval()
    total = 0.0
    for idx in batches:
        with autocast(device):
            s = student(idx, return_hidden=True).flatten(0, 1)
            t = teacher(idx, return_hidden=True).flatten(0, 1)
            total += float(kl_div_chunked(s, student.lm_head.weight.detach(), t, teacher.lm_head.weight, chunk))
    student.train()
    return total / max(len(batches), 1)


def read_layers(cfg, n_layers):
    """The softmax layers of the hybrid: --layers if given, else the selection file of select_layers.py."""
    if cfg.layers:
        layers = [] if cfg.layers == "none" else [int(x) for x in cfg.layers.split(",") if x.strip()]
        print(f"layers from --layers: {layers}")
    else:
        if not os.path.exists(cfg.selection):
            raise FileNotFoundError(f"no selection file {cfg.selection}: run select_layers.py first, "
                                    "or pass --layers=3,7 (--layers=none for an all-linear student)")
        with open(cfg.selection) as f:
            sel = json.load(f)
        if sel.get("n_layers", n_layers) != n_layers:
            raise ValueError(f"{cfg.selection} is for {sel['n_layers']} layers, the student has {n_layers}")
        layers = list(sel["layers"])
        print(f"layers from {cfg.selection} ({sel.get('method')}, budget {sel.get('budget')}): {layers}")
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    return sorted(set(layers))


def untie(model):
    """Give the head its own copy of the (tied) embedding matrix."""
    if model.lm_head.weight is model.model.embed_tokens.weight:
        model.lm_head.weight = nn.Parameter(model.model.embed_tokens.weight.detach().clone())
    model.config.tie_word_embeddings = False


def retie(model, how):
    """Share one matrix between embedding and head again: their mean, or keep the embedding's or the head's."""
    emb, head = model.model.embed_tokens.weight, model.lm_head.weight
    with torch.no_grad():
        if how == "mean":
            emb.copy_((emb + head) / 2)
        elif how == "head":
            emb.copy_(head)
        elif how != "embed":
            raise ValueError(f"--retie must be mean, embed or head, got {how!r}")
    model.lm_head.weight = emb
    model.config.tie_word_embeddings = True


# ---------------------------------------------------------------------------------------------------------- main

def main(cfg):
    t_start = time.time()
    run_dir = os.path.join(cfg.out_dir, cfg.run)
    cfg.input = cfg.input or os.path.join(run_dir, "align", "ckpt.pt")
    cfg.selection = cfg.selection or os.path.join(run_dir, "select", "selection.json")
    out_dir = os.path.join(run_dir, cfg.out)
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    device = cfg.device or pick_device()
    torch.manual_seed(cfg.seed)

    # ---- load: Stage-1 student, teacher, layers, data
    student, parent = M.load_checkpoint(cfg.input)
    inherit(cfg, parent["config"], ["teacher", "data_dir"])
    print_config(cfg)
    layers = read_layers(cfg, student.config.num_hidden_layers)
    teacher32, teacher = load_teachers(cfg.teacher, device)
    make_hybrid(student, teacher32, layers)
    del teacher32
    student.to(device)
    tied = student.lm_head.weight is student.model.embed_tokens.weight
    if cfg.untie and tied:
        untie(student)
        print(f"untied the head for training; it is re-tied ({cfg.retie}) when saved")
    print(f"hybrid mixers: {''.join('S' if m == 'attn' else '.' for m in student.config.mixers)} (S = softmax)")
    train, valid = open_data(cfg)
    valid_batches = [batch_at(valid, cfg, 1234, i, device)[:, :-1] for i in range(cfg.valid_batches)]
    forward = torch.compile(student) if cfg.compile else student
    opt = make_optimizer(student, cfg.lr_mixer, cfg.lr_other, cfg.weight_decay)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    banner("distill (Stage 2)", device, student, tokens_per_step)

    def save(metrics):
        M.save_checkpoint(ckpt_path, student, stage="distill", config=asdict(cfg), parent=cfg.input,
                          metrics=metrics, tokenizer=parent["tokenizer"])

    # ---- train
    log = Logger(out_dir, cfg.steps)
    kls, last_ckpt = [], None
    for step in range(cfg.steps):
        lr = set_lr(opt, step, cfg.warmup)
        idx = batch_at(train, cfg, cfg.seed, step, device)[:, :-1]
        kl = stage2_step(student, teacher_hidden(teacher, idx, device), teacher.lm_head.weight, idx, opt,
                         cfg.clip, device, cfg.chunk, forward)
        check_finite(kl, step + 1, last_ckpt)
        kls.append(kl)
        fields = {"kl": kl, "lr": lr}
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            fields["valid_kl"] = valid_kl(student, teacher, valid_batches, device, cfg.chunk)
        log.log(step + 1, tokens=tokens_per_step, **fields)
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            save({"step": step + 1, "kl": kl})
            last_ckpt = ckpt_path

    # ---- evaluate, re-tie, save
    late = kls[-max(1, len(kls) // 10):]
    metrics = {"kl": sum(late) / len(late), "kl_first": kls[0] if kls else None, "steps": cfg.steps,
               "tokens": cfg.steps * tokens_per_step, "layers": layers}
    metrics["valid_kl"] = valid_kl(student, teacher, valid_batches, device, cfg.chunk)
    if cfg.untie and tied:
        metrics["valid_kl_untied"] = metrics["valid_kl"]
        retie(student, cfg.retie)
        metrics["valid_kl"] = valid_kl(student, teacher, valid_batches, device, cfg.chunk)
        print(f"re-tied ({cfg.retie}): valid KL {metrics['valid_kl_untied']:.4f} untied -> {metrics['valid_kl']:.4f}")
    metrics["time_s"] = round(time.time() - t_start, 1)
    save(metrics)
    log.final(**metrics)
    return metrics


if __name__ == "__main__":
    main(parse_args(Config))
