"""
Small pieces every stage shares: the --key=value parser, the run folder (one writer at a time, files written
atomically), the device, precision and torchrun setup, the step logger, the NaN guard, and the forward KL computed in
row chunks.

Each piece is written once here so that the stage scripts can stay flat and read top to bottom. Nothing runs at
import.

The chunked KL is the one piece of math here. Distillation needs KL(teacher || student) over the whole vocabulary for
every token, but B*T x V logits in fp32 do not fit (32 x 4096 x 49152 x 4 bytes = 25 GB). So `kl_div_chunked` takes
the final hidden states and the two output heads, and walks over rows: for each chunk of rows it builds both logit
blocks, computes the KL and, in the same pass, its gradient with respect to the student's hidden states and head,

    p = softmax(t), q = softmax(s):   KL = sum_v p (log p - log q),   dKL/ds = q - p

so that only [rows, V] blocks of one chunk are ever alive and nothing of size B*T x V is stored for the backward.

Several GPUs: a stage started by `torchrun --nproc_per_node=N stage.py ...` gets RANK / WORLD_SIZE / LOCAL_RANK from
torchrun; init_dist() then joins the process group (NCCL on GPUs, gloo on CPUs) and every rank takes its slice of
each global batch (data.get_batch), so that 1 and N processes see the same token ids at every step. Only rank 0
logs and writes files.
"""

import atexit
import contextlib
import dataclasses
import hashlib
import inspect
import json
import math
import os
import re
import socket
import sys
import time
import typing
import uuid

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


def field_comments(Config):
    """{field: the comment after it in the class body}: the Config's own documentation, shown by --help."""
    try:
        source = inspect.getsource(Config)
    except (OSError, TypeError):
        return {}
    return dict(re.findall(r"^\s+(\w+)\s*:[^#\n]*#\s*(.*)$", source, flags=re.M))


def parse_args(Config, argv=None):
    """Build a `Config` from `--key=value` flags: typed from the dataclass fields, unknown keys and bad values
    rejected (and values the Config's __post_init__ refuses, such as a batch of 0). --help lists every key with its
    default and comment."""
    argv = sys.argv[1:] if argv is None else argv
    hints = typing.get_type_hints(Config)
    fields = {f.name: f for f in dataclasses.fields(Config)}
    valid = ", ".join(f"--{k}" for k in fields)
    values = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            doc = (sys.modules[Config.__module__].__doc__ or "").strip().split("\n\n")[0]
            notes = field_comments(Config)
            print(f"usage: python {os.path.basename(sys.argv[0])} [--key=value ...]\n\n{doc}\n\nkeys (default):")
            for k, f in fields.items():
                print(f"  --{k}={f.default!r}".ljust(36) + f"  {notes.get(k, '')}")
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
    try:
        return Config(**values)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def check_positive(cfg, *names, allow_zero=()):
    """Sizes and counts are checked when the flags are parsed (a Config's __post_init__), not at the first step."""
    for name in names:
        v = getattr(cfg, name)
        if v < 1 and not (name in allow_zero and v == 0):
            raise ValueError(f"--{name}={v}: must be a positive integer" + (" (or 0)" if name in allow_zero else ""))


def check_modes(cfg, *names):
    """Flags that take auto | true | false (--compile, --graph, --offload): anything else is an error naming it."""
    for name in names:
        if getattr(cfg, name) not in ("auto", "true", "false"):
            raise ValueError(f"--{name}={getattr(cfg, name)!r}: choose auto, true or false")


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
        k = max(1, math.floor(value * n_layers + 0.5 + 1e-9))  # the 1e-9: 0.125 * 36 is 4.4999999... in floats
    else:
        raise ValueError(f"--budget={text}: a fraction must be at most 1; for a count write an integer (e.g. 8)")
    if k > n_layers:
        raise ValueError(f"--budget={text}: asks for {k} softmax layers but the model has only {n_layers}; "
                         f"use a count from 1 to {n_layers} or a fraction")
    return k


# ----------------------------------------------------------------------------------------------------------- files

def atomic_write(path, write):
    """Call write(tmp) for a temporary name unique to this process and call, then rename it to `path`: readers see
    the old file or the new one, never half of one, and two processes never share a temporary file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    """Write JSON atomically: an interrupted run never leaves half a file."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    atomic_write(path, write)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_folder(folder, what):
    """Make `folder` this process's until it exits: a second writer of the same stage is refused with the owner's
    pid; a lock left by a process that died (same host, pid gone) is taken over. Creating the lock file is also the
    check, before any work, that the output can be written at all."""
    path = os.path.join(folder, ".lock")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise PermissionError(f"cannot create the output folder {folder} ({e.strerror}): choose a writable "
                              "--out_dir") from None
    me = {"pid": os.getpid(), "host": socket.gethostname(), "what": what, "since": time.strftime("%F %T")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(path) as f:
                    owner = json.load(f)
            except (OSError, ValueError):
                owner = {}
            if owner.get("host") == me["host"] and owner.get("pid") == me["pid"]:
                os.remove(path)                            # this process's own lock, from an earlier stage call
                continue
            if owner.get("host") == me["host"] and owner.get("pid") and not _alive(owner["pid"]):
                print(f"taking over {path}: its owner, pid {owner['pid']} ({owner.get('what')}), is gone")
                os.remove(path)
                continue
            raise RuntimeError(f"{folder} is being written by another process ({owner.get('what', '?')}, pid "
                               f"{owner.get('pid', '?')} on {owner.get('host', '?')}, since {owner.get('since', '?')}):"
                               f" two writers would overwrite each other's files. Wait for it to finish, or stop it "
                               f"(kill {owner.get('pid', '<pid>')}); if it is gone, delete {path}") from None
        except OSError as e:
            raise PermissionError(f"cannot write to the output folder {folder} ({e.strerror}): choose a writable "
                                  "--out_dir") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)

        def release():
            try:
                with open(path) as f:
                    if json.load(f).get("pid") == me["pid"]:
                        os.remove(path)
            except (OSError, ValueError):
                pass
        atexit.register(release)
        return release
    raise RuntimeError(f"could not take the lock {path}")


def fingerprint(model):
    """A short id of a model's weights (and shapes): what identifies a teacher or a stage's input, whatever path it
    was loaded from. Per tensor the fp64 sum and sum of squares, rounded to 9 digits (summation order noise stays
    below that), hashed with the names and shapes."""
    h = hashlib.sha1()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().double()
        h.update(f"{name}{tuple(t.shape)}{float(t.sum()):.9g}{float((t * t).sum()):.9g}".encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------ devices, torchrun

def pick_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def autocast(device):
    """bf16 autocast on the GPU (the papers train in bf16); plain fp32 on the CPU, where bf16 matmuls are slow."""
    if str(device).startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def want_graph(mode, d, shard=False):
    """--graph: whether a stage replays its training step as a CUDA graph (cuda_graph). auto = wherever it can: on a
    GPU, in one process or under torchrun with DDP (its all-reduce recorded in the graph: NCCL allows that, PyTorch
    asks for DDP made on a side stream, see distribute, and 11 eager steps first); never with FSDP2 (--shard=true)."""
    if mode == "false":
        return False
    why = ("CUDA graphs record GPU kernels" if not d.device.startswith("cuda") else
           "FSDP2 (--shard=true) is not recorded here" if d.world > 1 and shard else "")
    if mode == "true" and why:
        raise ValueError(f"--graph=true needs the GPU and not --shard=true (here: {d.device}, {d.world} "
                         f"process(es)): {why}. Use --graph=auto (on where it can be) or --graph=false")
    return not why


_SIDE = {}


def cuda_graph(step, warmup=None, pool=None):
    """`step(*tensors) -> tensor`, replayed as one CUDA graph. A training step of a 135M model launches ~2600 small
    kernels, and the GPU waits for the Python that launches them about half of the step (bench_train.py --profile);
    replayed, the whole step is one launch.

    The first `warmup` calls (default 3; 11 under torchrun, where the step holds DDP's all-reduce: PyTorch's
    CUDA-graph notes) run eagerly, on a side stream as capture wants (Triton compiles and autotunes, inductor
    compiles, the optimizer makes its state); the next is recorded once (torch.cuda.graph: every kernel with its
    memory) and from then on each call copies its inputs into the recorded ones and replays. So `step` must be
    static: the same shapes every call, nothing read on the host (.item(), bool(tensor), Python branches on
    values), the same learning rate (a float lr is a kernel argument, recorded; one kept in a GPU tensor, as
    align.py does, is read at every replay, so refill it in place), an optimizer made with capturable=True,
    and every tensor it makes from Python values made on the GPU (torch.full, not torch.tensor). The returned
    tensor is a copy: the recorded output is overwritten by the next replay.

    pool: a memory pool (torch.cuda.graph_pool_handle()) shared with other graphs that are replayed one after
    another, never at once, and whose temporaries need not outlive their replay (score.py's probes): one pool holds
    the activations of one step instead of one per graph."""
    graph, ins, out, calls = None, [], None, 0
    if warmup is None:
        import torch.distributed as dist
        warmup = 11 if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else 3
    # One side stream for every graph's warm-up: the allocator caches freed memory per stream, so a stream per graph
    # (30 probes) would keep 30 steps' worth of activations.
    if torch.cuda.current_device() not in _SIDE:
        _SIDE[torch.cuda.current_device()] = torch.cuda.Stream()
    side = _SIDE[torch.cuda.current_device()]

    def run(*args):
        nonlocal graph, ins, out, calls
        if graph is None and calls < warmup:
            calls += 1
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                result = step(*args)
            torch.cuda.current_stream().wait_stream(side)
            return result
        if graph is None:
            ins, graph = [a.clone() for a in args], torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=pool):
                    out = step(*ins)  # recorded, not run: the replay below runs it
            except torch.OutOfMemoryError:
                graph = None
                raise                 # the caller's to explain (a smaller batch), not the graph's
            except RuntimeError as e:
                graph = None
                raise RuntimeError(f"recording the training step as a CUDA graph failed ({e}); run the stage again "
                                   "with --graph=false (the step eager, slower) and report it") from e
        else:
            for mine, new in zip(ins, args):
                mine.copy_(new)
        graph.replay()
        return out.clone()

    return run


@dataclasses.dataclass
class Dist:
    """Where this process stands: rank of world processes (1 without torchrun) and its device."""
    rank: int = 0
    world: int = 1
    device: str = "cpu"

    @property
    def main(self):
        return self.rank == 0


def init_dist(device=""):
    """One process (python stage.py), or one of torchrun's: then join the process group, NCCL on GPUs (one GPU per
    process, cuda:LOCAL_RANK) and gloo on CPUs. A failure on any rank ends the group (destroy at exit; torchrun
    stops the other ranks and names the one that failed)."""
    device = device or pick_device()
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return Dist(0, 1, device)
    import torch.distributed as dist
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device.startswith("cuda"):
        if torch.cuda.device_count() <= local:
            raise RuntimeError(f"rank {rank}: torchrun started {world} processes on this node but torch sees "
                               f"{torch.cuda.device_count()} GPUs: use --nproc_per_node={torch.cuda.device_count()}")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # one log: rank 0 prints (errors still reach stderr from every rank)
    return Dist(rank, world, device)


def all_mean(x, d):
    """The mean of a float (or tensor) over the ranks; the value itself in one process."""
    if d.world == 1:
        return x
    import torch.distributed as dist
    t = torch.as_tensor(x, dtype=torch.float32, device=d.device).clone()
    dist.all_reduce(t)
    return t / d.world if torch.is_tensor(x) else float(t) / d.world


def banner(stage, device, model=None, tokens_per_step=None, d=None):
    """One block at the start of a stage: versions, device(s), parameter counts by kind, tokens per step."""
    import triton  # noqa: F401  (imported for its version only)
    gpu = torch.cuda.get_device_name() if str(device).startswith("cuda") else "no GPU"
    procs = f" x {d.world} processes (torchrun)" if d is not None and d.world > 1 else ""
    print(f"== {stage} | torch {torch.__version__} | triton {triton.__version__} | {device} ({gpu}){procs}")
    if model is not None:
        counts = {}
        for name, p in model.named_parameters():
            kind = ("mixer" if ".self_attn." in name else "embed/head" if "embed" in name or "lm_head" in name
                    else "other")
            counts[kind] = counts.get(kind, 0) + p.numel()
        print("   params: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items()))
    if tokens_per_step:
        print(f"   tokens per step: {tokens_per_step:,}" + (" (all processes)" if procs else ""))


def distribute(model, d, shard=False):
    """The module a stage runs forward and backward through: the model itself in one process; under torchrun
    DistributedDataParallel (every rank a full copy, gradients averaged in buckets during the backward), or with
    shard=True FSDP2 (torch.distributed.fsdp.fully_shard, one unit per block plus the root): weights, gradients and
    AdamW states split across ranks, for students that do not fit one GPU."""
    if d.world == 1:
        return model
    if shard:
        from torch.distributed.fsdp import fully_shard
        for block in model.model.layers:
            fully_shard(block)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel
    if not d.device.startswith("cuda"):
        return DistributedDataParallel(model)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # made on a side stream, so that its step can be a CUDA graph
        ddp = DistributedDataParallel(model, device_ids=[torch.device(d.device).index])
    torch.cuda.current_stream().wait_stream(side)   # its broadcast of the weights, before the first step reads them
    return ddp


def full_state(model, opt, d, shard):
    """(model state dict, optimizer state dict) with whole tensors, for a checkpoint. Under FSDP2 every rank holds a
    shard: all of them take part (a collective), rank 0 gets the whole tensors on the CPU."""
    if not (shard and d.world > 1):
        return model.state_dict(), opt.state_dict() if opt is not None else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=options),
            get_optimizer_state_dict(model, opt, options=options) if opt is not None else None)


def load_optimizer(opt, model, state, d, shard):
    """Restore an optimizer state written by full_state (each rank takes its shard of it under FSDP2). The state
    brings the settings of the run that wrote it (fused and capturable on a GPU, neither on the CPU, capturable not
    before the CUDA-graph step): this run's device decides them, the step counters move to where they belong, and an
    lr that this run keeps in a tensor (align.py's recorded step reads it there) stays that tensor, with the saved
    value."""
    mine = [g["lr"] for g in opt.param_groups]   # a tensor where a recorded step reads the lr from it: keep it
    if not (shard and d.world > 1):
        opt.load_state_dict(state)
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))
    cuda = d.device.startswith("cuda")
    for group, lr in zip(opt.param_groups, mine):
        group["fused"] = group["capturable"] = cuda
        group["lr"] = lr.fill_(float(group["lr"])) if torch.is_tensor(lr) else float(group["lr"])
    for p, st in opt.state.items():
        if torch.is_tensor(st.get("step")):
            st["step"] = st["step"].to(p.device if cuda else "cpu", torch.float32)


def check_shapes(student_config, teacher_config, source):
    """A teacher of another shape (vocabulary, width, depth, heads) cannot be this student's at all: say so before
    anything indexes one with the other."""
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim")
    diff = [f"{k} {getattr(teacher_config, k)} vs {getattr(student_config, k)}" for k in keys
            if getattr(teacher_config, k) != getattr(student_config, k)]
    if diff:
        raise ValueError(f"--teacher={source!r} cannot be this student's teacher: teacher vs student "
                         f"{', '.join(diff)}. Pass the teacher it was made from (or leave --teacher empty to inherit "
                         "it)")


def check_teacher(teacher_fp, info, source, allow):
    """Refuse a teacher other than the one the input checkpoint descends from (its weights' fingerprint), unless
    the user asks for it (allow): the same shapes would otherwise train silently against the wrong model."""
    want = (info.get("teacher") or {}).get("fingerprint")
    if want is None or teacher_fp == want:
        return
    msg = (f"--teacher={source!r} is not the teacher this checkpoint descends from ({info['teacher'].get('source')!r};"
           f" weights fingerprint {teacher_fp} vs {want})")
    if not allow:
        raise ValueError(msg + ". Pass that teacher (or leave --teacher empty to inherit it), or "
                         "--other_teacher=true to distill from another one on purpose")
    print(f"warning: {msg}; going on (--other_teacher=true)")


# --------------------------------------------------------------------------------------------------------- logging

class Logger:
    """One line per log step with a fixed field order, the same fields appended to out_dir/log.jsonl. A run that
    starts at step 0 starts a new log.jsonl; a resumed one (start > 0) appends. Silent on ranks other than 0."""

    def __init__(self, out_dir, total_steps=None, start=0, enabled=True):
        self.enabled, self.total, self.start = enabled, total_steps, start
        self.path = os.path.join(out_dir, "log.jsonl")
        if enabled:
            os.makedirs(out_dir, exist_ok=True)
            if start == 0 and os.path.exists(self.path):
                os.remove(self.path)
        self.t0 = self.t_last = time.time()

    def log(self, step, total=None, tokens=None, **fields):
        """`fields` in the order given (loss first); `tokens` = tokens processed since the previous log call."""
        if not self.enabled:
            return
        total = total or self.total
        now = time.time()
        dt, self.t_last = now - self.t_last, now
        parts = [f"step {step}/{total}" if total else f"step {step}"]
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            fields["mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        for k, v in fields.items():
            if isinstance(v, (list, dict)):
                continue                                   # long values go to log.jsonl only
            parts.append(f"{k} {v:.2e}" if k == "lr" else f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
        parts.append(f"{dt * 1000:.0f}ms")
        if tokens:
            parts.append(f"{tokens / max(dt, 1e-9) / 1000:.0f}k tok/s")
        if total and step > self.start:
            eta = (now - self.t0) / (step - self.start) * (total - step)
            parts.append(f"eta {eta / 60:.1f}m")
        print(" | ".join(parts), flush=True)
        record = {"step": step, **{k: float(v) if isinstance(v, (int, float)) else v for k, v in fields.items()},
                  "ms": round(dt * 1000, 1), "time": round(now - self.t0, 2)}
        if tokens:
            record["tok_s"] = round(tokens / max(dt, 1e-9))
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def final(self, **metrics):
        if not self.enabled:
            return
        parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
                 if not isinstance(v, (list, dict))]
        print("final | " + " | ".join(parts + [f"{(time.time() - self.t0) / 60:.1f}m"]), flush=True)


def check_finite(loss, step, last_ckpt, fix):
    """Stop a run at the first NaN/inf loss, naming the step, the last checkpoint whose weights were finite when it
    was written (save_checkpoint refuses any other), and `fix`: the flags of this stage that help."""
    if not math.isfinite(float(loss)):
        where = (f"The last good checkpoint is {last_ckpt} (its weights were checked finite when written; "
                 "--resume=true continues it with the same flags, after a transient fault)." if last_ckpt else
                 "No checkpoint was written before it.")
        raise FloatingPointError(f"loss is {float(loss)} at step {step}; stopping. {where} Try {fix} and start "
                                 "again, and check the data for empty windows.")


# ------------------------------------------------------------------------------------------------------ chunked KL

def _kl_rows(s_logits, t_logits, scale=None):
    """KL(t || s) summed over these rows of logits [rows, V], in fp32; with `scale` also its gradient with respect
    to s_logits times scale, in the logits' dtype. The elementwise half of the chunked KL: on the GPU compiled into a
    few fused kernels (each [rows, V] block read and written about once instead of a dozen fp32 passes)."""
    s_logp = F.log_softmax(s_logits.float(), dim=-1)
    t_logp = F.log_softmax(t_logits.float(), dim=-1)
    p = t_logp.exp()
    kl = (p * (t_logp - s_logp)).sum()
    if scale is None:
        return kl, None
    return kl, ((s_logp.exp() - p) * scale).to(s_logits.dtype)    # d (scale * KL) / d student logits


_COMPILED = {}


def _rows_fn(device):
    """_kl_rows, compiled once per process on CUDA (fixed shapes: one graph per chunk size); eager on the CPU."""
    if device.type != "cuda":
        return _kl_rows
    if "kl" not in _COMPILED:
        _COMPILED["kl"] = torch.compile(_kl_rows, dynamic=False)
    return _COMPILED["kl"]


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
        rows = _rows_fn(s_hidden.device)
        scale = torch.full((), 1.0 / n, device=s_hidden.device) if need_grad else None  # a tensor: no recompile per n
        for i in range(0, n, chunk):
            sh = s_hidden[i:i + chunk]
            # under autocast the two head matmuls run in bf16, as the rest of the model
            kl, g = rows(sh @ s_weight.t(), t_hidden[i:i + chunk] @ t_weight.t(), scale)   # g: [rows, V]
            total += kl
            if need_grad:
                d_hidden[i:i + chunk] = (g @ s_weight.to(g.dtype)).to(s_hidden.dtype)
                if d_weight is not None:
                    d_weight += g.t() @ sh.to(g.dtype)
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
