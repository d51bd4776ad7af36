"""
Stage 2: KL distillation of the hybrid (RADLADS step 2; arXiv 2505.03005, arXiv 2512.20569 section 3).

The hybrid is the Stage-1 all-linear student with the selected layers put back to the teacher's exact softmax
attention (its q/k/v/o weights and its pre-attention norm). Stage 1 only matched each mixer's output in isolation;
here the whole network learns to reproduce the teacher's next-token distribution, so the linear layers learn to work
together and around the softmax layers. Every parameter trains: the mixers (and pre-attention norms) fast, the rest
(embeddings, MLPs, other norms, head) at a rate small enough to keep the teacher's knowledge.

    loss = mean over tokens t of  KL(p_t || q_t) = sum_v p_t(v) (log p_t(v) - log q_t(v))
           p_t = softmax(teacher logits), q_t = softmax(student logits), temperature 1, full vocabulary
    AdamW(0.9, 0.95, weight decay 0.01), constant lr: 1e-4 for self_attn.* and input_layernorm, 7e-6 for the rest,
    gradient norm clipped to 1.0

The KL is computed by common.kl_div_chunked from the final hidden states and the two heads, in row chunks, so no
B*T x V fp32 tensor is ever alive. SmolLM2 ties its embedding and head; `--untie=true` gives the head its own copy
while training (as RADLADS does) and re-ties it in the final checkpoint (`--retie=embed` keeps the embedding, as
RADLADS does; `mean` averages the two, `head` keeps the head), reporting the held-out KL before and after
re-tying; checkpoints written during training keep the untied head.

Speed: the frozen teacher runs in bf16 weights under inference mode (its final hidden states once per batch); the
student keeps fp32 weights under bf16 autocast (updates of 7e-6 need fp32), its blocks compiled on the GPU; fused
AdamW skips a non-finite step on the GPU itself (skip_nonfinite). On a GPU the whole step, DDP's all-reduce
included, is recorded once as a CUDA graph and replayed (--graph, common.cuda_graph): one launch instead of ~2600
the GPU would wait for (H200, 16 x 1024 tokens: 95k -> 187k tok/s on one GPU, 305k on two). Under torchrun every
rank takes its rows of each global batch (DDP; --shard=true for FSDP2); --micro_batch splits them into forwards.

Reads  out/<run>/align/ckpt.pt, out/<run>/select/selection.json (or --layers=3,7), the teacher named in the parent
       checkpoint's config, the token files of data.py.
Writes out/<run>/<out>/ckpt.pt (+ meta.json, log.jsonl); `--out=distill_kl_8` keeps several hybrids side by side.
       Every --save_every steps a mid-run checkpoint with the optimizer state: --resume=true continues from it.

    python distill.py --run_name=tiny --steps=20 --batch_size=2 --seq_len=64 --layers=1    # a few CPU steps
    python distill.py --run_name=smollm2 --steps=2000 --batch_size=16 --seq_len=1024       # one GPU
    torchrun --standalone --nproc_per_node=2 distill.py --run_name=smollm2 --steps=2000     # two GPUs
"""

import contextlib
import copy
import json
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

import data
import model as M
from common import (Logger, all_mean, autocast, banner, check_finite, check_modes, check_positive, check_shapes,
                    check_teacher, cuda_graph, distribute, fingerprint, full_state, inherit, init_dist, kl_div_chunked,
                    load_optimizer, lock_folder, parse_args, print_config, want_graph)
from teachers import from_pretrained


@dataclass
class Config:
    run_name: str = "smollm2"     # run name: everything lives in <out_dir>/<run_name>/
    out_dir: str = "out"          # root of all runs
    input: str = ""               # Stage-1 checkpoint; "" = <out_dir>/<run_name>/align/ckpt.pt
    selection: str = ""           # selection.json of select_layers.py; "" = <out_dir>/<run_name>/select/selection.json
    layers: str = ""              # "3,7" overrides the selection; "none" = all-linear student
    teacher: str = ""             # teacher source; "" = inherited from the parent checkpoint
    other_teacher: bool = False   # allow a teacher other than the one the input descends from
    data_dir: str = ""            # token files; "" = inherited from the parent checkpoint
    out: str = "distill"          # output subfolder of the run (e.g. distill_kl_8 to keep several hybrids)
    steps: int = 1000             # optimizer steps
    batch_size: int = 8           # sequences per step, over all processes (paper: 32)
    micro_batch: int = 0          # sequences per forward per process (gradients accumulate); 0 = all of its share
    seq_len: int = 512            # tokens per sequence (paper: 4096)
    lr_mixer: float = 1e-4        # lr of self_attn.* and input_layernorm (RADLADS step 2)
    lr_other: float = 7e-6        # lr of everything else
    warmup: int = 0               # linear warmup steps, then constant (paper: constant lr, no warmup)
    weight_decay: float = 0.01    # AdamW weight decay (the official code: torch's default 0.01)
    clip: float = 1.0             # gradient-norm clip
    untie: bool = False           # train a separate head copy if the embeddings are tied, re-tie on save
    retie: str = "embed"          # how to re-tie an untied head: embed (RADLADS keeps the embedding) | mean | head
    chunk: int = 4096             # rows per KL chunk (memory: ~4 x chunk x vocab fp32)
    valid_batches: int = 8        # held-out batches for the validation KL
    eval_every: int = 0           # validation KL every N steps (0 = only at the end)
    log_every: int = 10           # print and log every N steps (the host waits for the GPU only then)
    save_every: int = 500         # mid-run checkpoint every N steps (0 = only at the end)
    snapshots: str = ""           # token counts (e.g. 5000000,20000000) at which a copy of the model is kept in
                                  # <out>/tokens_<n>/ckpt.pt: quality against distill tokens from one run
    resume: bool = False          # continue the mid-run checkpoint in <out> (same settings), or say it is finished
    compile: str = "auto"         # torch.compile the blocks of student and teacher: auto (on the GPU) | true | false
    graph: str = "auto"           # one CUDA graph per step: auto (GPU, not FSDP2) | true (or an error) | false
    shard: bool = False           # under torchrun: FSDP2 instead of DDP (students that do not fit one GPU)
    device: str = ""              # "" = cuda if available else cpu
    seed: int = 0                 # data order: batch s is a function of (seed, s) only

    def __post_init__(self):
        check_positive(self, "steps", "batch_size", "seq_len", "chunk", "log_every", "micro_batch", "valid_batches",
                       "save_every", "eval_every", "warmup", allow_zero=("micro_batch", "valid_batches", "save_every",
                                                                         "eval_every", "warmup"))
        if self.retie not in ("embed", "mean", "head"):
            raise ValueError(f"--retie={self.retie!r}: choose embed, mean or head")
        check_modes(self, "compile", "graph")
        if self.untie and self.shard:
            raise ValueError("--untie=true with --shard=true is not supported: re-tying swaps parameters FSDP2 holds")


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


def make_optimizer(model, lr_mixer, lr_other, weight_decay=0.01):
    """AdamW(0.9, 0.95) with two groups: mixers + pre-attention norms at lr_mixer, everything else at lr_other.
    Fused (one kernel for all parameters) and capturable (its step can be recorded in a CUDA graph) on a GPU."""
    fast, slow = [], []
    for name, p in model.named_parameters():
        (fast if ".self_attn." in name or ".input_layernorm." in name else slow).append(p)
    groups = [{"params": fast, "lr": lr_mixer, "base_lr": lr_mixer},
              {"params": slow, "lr": lr_other, "base_lr": lr_other}]
    cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=weight_decay, fused=cuda, capturable=cuda)


def set_lr(opt, step, warmup):
    """Linear warmup over `warmup` steps, then each group's constant base lr. Returns the first group's lr."""
    scale = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * scale
    return opt.param_groups[0]["lr"]


def skip_nonfinite(opt, loss, norm):
    """opt.step(), unless the loss or the gradient norm is not finite: then the weights stay as they were. On the
    GPU without waiting for it (fused AdamW skips its update where found_inf is 1, as under a GradScaler); on the
    CPU, where nothing runs ahead, by a plain test."""
    ok = torch.isfinite(loss) & torch.isfinite(norm)
    if opt.defaults.get("fused"):
        opt.found_inf = (~ok).float()
        opt.step()
    elif bool(ok):
        opt.step()
    opt.zero_grad(set_to_none=True)


def load_teachers(source, device, cfg):
    """(fp32 teacher on the CPU, whose weights make_hybrid restores; its fingerprint; the frozen teacher that runs:
    the same model on the CPU, a bf16 copy on the GPU, forward only, its blocks compiled as the student's are
    (cfg.compile): eager, its norms, RoPE, SwiGLU and residual adds run as hundreds of small kernels per step)."""
    teacher32 = from_pretrained(source).eval().requires_grad_(False)
    fp = fingerprint(teacher32)
    if not str(device).startswith("cuda"):       # the same model (a copy where it compiles: --compile=true)
        teacher = copy.deepcopy(teacher32) if cfg.compile == "true" else teacher32
    else:
        teacher = copy.deepcopy(teacher32).to(device=device, dtype=torch.bfloat16)
    return teacher32, fp, compile_blocks(teacher, cfg, device)


def open_data(cfg, run_dir):
    """Train and valid token maps of cfg.data_dir ("" = the run's own data folder), refused if made with another
    tokenizer than the teacher's."""
    from tokenizer import load_tokenizer
    data_dir = cfg.data_dir or os.path.join(run_dir, "data")
    meta = data.check_tokenizer(data.load_meta(data_dir), load_tokenizer(cfg.teacher), data_dir)
    print(f"data: {os.path.abspath(data_dir)} ({meta['train_tokens']:,} train / {meta['valid_tokens']:,} valid tokens)")
    return data.load_tokens(data_dir, "train"), data.load_tokens(data_dir, "valid")


def micro_batches(tokens, cfg, seed, step, d):
    """This process's rows of global batch `step` (batch_size windows of seq_len+1 tokens, drawn from (seed, step)
    alone), cut into micro-batches of cfg.micro_batch rows: the same token ids for any number of processes."""
    if cfg.batch_size % d.world:
        raise ValueError(f"--batch_size={cfg.batch_size} does not split over {d.world} processes: use a multiple")
    share = cfg.batch_size // d.world
    micro = cfg.micro_batch or share
    if share % micro:
        raise ValueError(f"--micro_batch={micro} does not divide this process's {share} sequences per step")
    rng = data.batch_rng(seed, step)
    mine = slice(d.rank * share, (d.rank + 1) * share)
    rows = data.get_batch(tokens, cfg.batch_size, cfg.seq_len, rng, d.device, mine)
    return list(rows.split(micro))


@torch.inference_mode()
def teacher_hidden(teacher, idx, device):
    """The teacher's final-normed hidden states [B, T, D], computed once per batch (score.py shares them)."""
    with autocast(device):
        return teacher(idx, return_hidden=True)


def stage2_step(forward, student, batches, t_head, opt, clip=1.0, device="cpu", chunk=4096):
    """One Stage-2 optimizer step: forward KL(teacher || student) over the micro-batches [(idx, teacher hidden)],
    gradients accumulated to the mean over all their tokens, clipped, one AdamW step (skipped if not finite).

    forward: the student, or its compiled / DDP wrapper (student is the module underneath, whose head the KL uses).
    Returns the KL as a 0-dim tensor on the device: reading it (float()) makes the host wait for the GPU."""
    total = 0.0
    for i, (idx, t_hidden) in enumerate(batches):
        # DDP averages gradients over ranks in the backward of the last micro-batch only
        last = i == len(batches) - 1 or not hasattr(forward, "no_sync")
        sync = contextlib.nullcontext() if last else forward.no_sync()
        with sync:
            with autocast(device):
                s_hidden = forward(idx, return_hidden=True)
                loss = kl_div_chunked(s_hidden.flatten(0, 1), student.lm_head.weight, t_hidden.flatten(0, 1), t_head,
                                      chunk) / len(batches)
            loss.backward()
        total = total + loss.detach()
    norm = torch.nn.utils.clip_grad_norm_(student.parameters(), clip)
    skip_nonfinite(opt, total, norm)
    return total


@torch.no_grad()
def valid_kl(forward, student, teacher, batches, device, d, chunk=4096):
    """Mean KL(teacher || student) over fixed held-out batches (this process's rows of each, averaged over ranks)."""
    student.eval()
    total = 0.0
    for idx in batches:
        with autocast(device):
            s = forward(idx, return_hidden=True).flatten(0, 1)
            t = teacher_hidden(teacher, idx, device).flatten(0, 1)
            total += float(kl_div_chunked(s, student.lm_head.weight.detach(), t, teacher.lm_head.weight, chunk))
    student.train()
    return all_mean(total / max(len(batches), 1), d)


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
    """Share one matrix between embedding and head again: keep the embedding's (RADLADS), their mean, or the head's."""
    emb, head = model.model.embed_tokens.weight, model.lm_head.weight
    with torch.no_grad():
        if how == "mean":
            emb.copy_((emb + head) / 2)
        elif how == "head":
            emb.copy_(head)
    model.lm_head.weight = emb
    model.config.tie_word_embeddings = True


def compile_blocks(model, cfg, device):
    """torch.compile of every block where it pays (the GPU, or --compile=true), in place. Block by block, not the
    whole model: blocks of one kind share their compiled code (parameters are graph inputs), so the probes of
    score.py, each a model of its own, compile once instead of once per probe. The GLA kernel stays outside the
    graphs (kernels.chunk_gla is torch.compiler.disable'd). Returns the model."""
    if cfg.compile == "true" or (cfg.compile == "auto" and str(device).startswith("cuda")):
        for block in model.model.layers:
            block.compile()
    return model


# ---------------------------------------------------------------------------------------------------------- main

def main(cfg):
    t_start = time.time()
    d = init_dist(cfg.device)
    device = d.device
    run_dir = os.path.join(cfg.out_dir, cfg.run_name)
    cfg.input = cfg.input or os.path.join(run_dir, "align", "ckpt.pt")
    cfg.selection = cfg.selection or os.path.join(run_dir, "select", "selection.json")
    out_dir = os.path.join(run_dir, cfg.out)
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    if d.main:
        lock_folder(out_dir, "distill.py")  # one writer per output folder; also checks it can be written
    torch.manual_seed(cfg.seed)

    # ---- load: Stage-1 student (or the mid-run checkpoint to resume), teacher, layers, data
    parent = M.checkpoint_info(cfg.input)
    inherit(cfg, parent["config"], ["teacher", "data_dir"])
    print_config(cfg)
    print(M.describe_input(cfg.input, parent))
    state = M.resume_state(ckpt_path, asdict(cfg)) if cfg.resume else None
    if state == "finished":
        print(f"final | {ckpt_path} is complete with these settings: nothing to do")
        return M.checkpoint_info(ckpt_path)["metrics"]
    teacher32, teacher_fp, teacher = load_teachers(cfg.teacher, device, cfg)
    check_shapes(M.ModelConfig(**parent["model_config"]), teacher.config, cfg.teacher)
    check_teacher(teacher_fp, parent, cfg.teacher, cfg.other_teacher)
    if state:
        student, _ = M.load_checkpoint(ckpt_path)
        layers = [i for i, m in enumerate(student.config.mixers) if m == "attn"]
    else:
        student, _ = M.load_checkpoint(cfg.input)
        layers = read_layers(cfg, student.config.num_hidden_layers)
        make_hybrid(student, teacher32, layers)
    del teacher32
    student.to(device)
    tied = parent["model_config"].get("tie_word_embeddings", False)
    if cfg.untie and tied and not state:
        untie(student)
        print(f"untied the head for training; it is re-tied ({cfg.retie}) when saved")
    print(f"hybrid mixers: {''.join('S' if m == 'attn' else '.' for m in student.config.mixers)} (S = softmax)")
    train, valid = open_data(cfg, run_dir)
    valid_batches = [torch.cat(micro_batches(valid, cfg, 1234, i, d)) for i in range(cfg.valid_batches)]
    forward = distribute(compile_blocks(student, cfg, device), d, cfg.shard)  # FSDP2 swaps the parameters: first
    opt = make_optimizer(student, cfg.lr_mixer, cfg.lr_other, cfg.weight_decay)
    start = 0
    if state:
        load_optimizer(opt, student, state["optimizer"], d, cfg.shard)
        start = state["step"]
    tokens_per_step = cfg.batch_size * cfg.seq_len
    banner("distill (Stage 2)", device, student, tokens_per_step, d)
    teacher_info = parent.get("teacher")

    def save(metrics, step=None):
        """The checkpoint (rank 0): mid-run with the optimizer state when step is given, else the final one."""
        weights, opt_state = full_state(student, opt if step is not None else None, d, cfg.shard)
        if d.main:
            train_state = None if step is None else {"step": step, "optimizer": opt_state,
                                                     "history": [float(k) for k in kls]}
            M.save_checkpoint(ckpt_path, student, stage="distill", config=asdict(cfg), parent=cfg.input,
                              metrics=metrics, tokenizer=parent["tokenizer"], teacher=teacher_info,
                              train_state=train_state, state_dict=weights)

    snapshots = sorted(int(float(x)) for x in cfg.snapshots.split(",") if x)

    def snapshot(step):
        """The model as it is after `step` steps, when a --snapshots token count was crossed in this step."""
        done = step * tokens_per_step
        for n in (n for n in snapshots if done - tokens_per_step < n <= done):
            weights, _ = full_state(student, None, d, cfg.shard)
            if d.main:
                M.save_checkpoint(os.path.join(out_dir, f"tokens_{n}", "ckpt.pt"), student, stage="distill",
                                  config=asdict(cfg), parent=cfg.input, metrics={"step": step, "tokens": done},
                                  tokenizer=parent["tokenizer"], teacher=teacher_info, state_dict=weights)

    # ---- train
    log = Logger(out_dir, cfg.steps, start, d.main)
    kls = [torch.tensor(k, device=device) for k in state["history"]] if state else []  # per step, on the device
    last_ckpt = ckpt_path if state else None

    def train_step(*rows):
        """The whole step, teacher included, from this process's micro-batches of token ids [b, T + 1]."""
        batches = [(idx[:, :-1], teacher_hidden(teacher, idx[:, :-1], device)) for idx in rows]
        return stage2_step(forward, student, batches, teacher.lm_head.weight, opt, cfg.clip, device, cfg.chunk)

    graphed = cuda_graph(train_step) if want_graph(cfg.graph, d, cfg.shard) else None
    for step in range(start, cfg.steps):
        lr = set_lr(opt, step, cfg.warmup)
        # recorded once the lr is constant (after the warmup): the graph keeps the lr it was recorded with
        run = graphed if graphed and step + 1 >= cfg.warmup else train_step
        kl = run(*micro_batches(train, cfg, cfg.seed, step, d))
        kls.append(all_mean(kl, d))               # over the ranks, on the device (NCCL: no wait for the host)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            n = min(cfg.log_every, step + 1 - start)
            kl = float(torch.stack(kls[-n:]).mean())
            check_finite(kl, step + 1, last_ckpt, "a smaller --lr_mixer / --lr_other")
            fields = {"kl": kl, "lr": lr}
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                fields["valid_kl"] = valid_kl(forward, student, teacher, valid_batches, device, d, cfg.chunk)
            log.log(step + 1, tokens=n * tokens_per_step, **fields)
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            save({"step": step + 1}, step + 1)
            last_ckpt = ckpt_path
        snapshot(step + 1)

    # ---- evaluate, re-tie, save
    kls = [float(k) for k in kls]
    late = kls[-max(1, len(kls) // 10):]
    metrics = {"kl": sum(late) / len(late) if late else None, "kl_first": kls[0] if kls else None,
               "steps": cfg.steps, "tokens": cfg.steps * tokens_per_step, "layers": layers}
    metrics["valid_kl"] = valid_kl(forward, student, teacher, valid_batches, device, d, cfg.chunk)
    if student.lm_head.weight is not student.model.embed_tokens.weight and tied:
        metrics["valid_kl_untied"] = metrics["valid_kl"]
        retie(student, cfg.retie)
        metrics["valid_kl"] = valid_kl(student, student, teacher, valid_batches, device, d, cfg.chunk)
        print(f"re-tied ({cfg.retie}): valid KL {metrics['valid_kl_untied']:.4f} untied -> {metrics['valid_kl']:.4f}")
    metrics["time_s"] = round(time.time() - t_start, 1)
    save(metrics)
    log.final(**metrics)
    return metrics


if __name__ == "__main__":
    main(parse_args(Config))
