"""
Training throughput of the stages on one GPU: tokens/s, model FLOPs/s, MFU, peak memory and ms per step of align, a
score probe, distill and finetune, at the gpu preset's shapes and at the paper's 4096-token sequences. One table.

It runs the stages themselves (`python <stage>.py ...` in a checkout, as a user would) for a few dozen steps and
reads their log.jsonl: the ms of each logged interval over the steps it covers, the median over the intervals after
the first few (compilation and warm-up out of the numbers). So the same command measures an older checkout too
(--repo=path: the "before" of a change; peak memory is n/a where its logs lack it).

Model FLOPs per token (counted from the config, the usual 2 x weights per matmul; backward = 2 x forward):
    forward  F(model, T) = 2 x (matmul weights of the blocks) + 2 x D x V (head, where logits are made)
                           + per softmax layer 2 x T x H x K (causal QK^T and AV, half the T x T square each)
                           + per GLA layer 2 x H x (2 x K x V + 64 x (K + V)) (state in and out, the 64-row chunk)
    align    teacher F (no head) + 3 x the mixers' share of F (they alone train; the teacher's stream is given)
    probe    3 x F(hybrid) + F(teacher) / probes (one teacher forward serves every probe of a round)
    distill  3 x F(hybrid) + F(teacher)          finetune  3 x F(hybrid) + F(teacher) (--kl_weight=0.5)
MFU = model FLOPs/s over the dense bf16 matmul rate measured here (an 8192^3 product, median of do_bench), times
--gpus. With --gpus=N each stage runs under torchrun on N GPUs (DDP; score splits its probes across them): B is the
global batch, so tokens/s is the whole machine's, comparable with --gpus=1 at the same shapes.

    python bench_train.py --data_dir=out/smollm2/data                      # this checkout, every stage and shape
    python bench_train.py --data_dir=out/smollm2/data --repo=../old --json=before.json
    python bench_train.py --data_dir=out/smollm2/data --gpus=2 --stages=probe,distill   # each stage under torchrun
    python bench_train.py --data_dir=out/smollm2/data --extra=--graph=false   # the steps eager, not CUDA graphs
    python bench_train.py --profile=true --shapes=preset,4096    # where a distill step's GPU time goes
    torchrun --standalone --nproc_per_node=2 bench_train.py --allreduce_mb=106,540   # the link DDP averages over

--profile=true runs no stage: it builds the distill step in this process (the run.sh hybrid, the bf16 teacher, the
compiled blocks, fused AdamW: distill.py's own functions on random tokens; on a GPU replayed as a CUDA graph as
distill.py does, --profile_graph=false for the eager step) and traces a few steps with torch.profiler. The table
groups the GPU kernels (gemm, the GLA kernel, softmax attention, the KL's kernels, normalisation and other fused
elementwise kernels, the optimizer, copies) with their share of the step, the GPU's busy fraction (kernel time over
wall time: the rest is the GPU waiting for the host) and the rate of the matmuls (the model's matmul FLOPs over the
gemm kernels' time), which says whether the step is bound by its kernels or by launching them.

--allreduce_mb (under torchrun) times all_reduce of fp32 tensors of those sizes, what DDP moves once per step: the
mixers' gradients in align (106 MB for SmolLM2) and every parameter's in distill and finetune (540 MB). The bus
bandwidth printed is the usual 2 (N-1)/N x bytes / time.
"""

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from common import cuda_graph, parse_args

# (stage, shape name) -> flags: the gpu preset of run.sh, then the paper's 4096-token sequences
SHAPES = {
    ("align", "preset"): "--batch_size=32 --seq_len=512",
    ("align", "4096"): "--batch_size=4 --seq_len=4096",
    ("probe", "preset"): "--batch_size=8 --seq_len=1024",
    ("probe", "4096"): "--batch_size=8 --seq_len=4096",
    ("distill", "preset"): "--batch_size=16 --seq_len=1024",
    ("distill", "4096"): "--batch_size=8 --seq_len=4096",
    ("finetune", "preset"): "--batch_size=8 --seq_len=2048 --kl_weight=0.5",
    ("finetune", "4096"): "--batch_size=8 --seq_len=4096 --kl_weight=0.5",
}
LAYERS = "0,1,2,17,18,20,23,24"  # the softmax layers of the run.sh hybrid (kl, 25% of SmolLM2)


@dataclass
class Config:
    data_dir: str = ""              # token files of data.py (required)
    teacher: str = ""               # teacher source; "" = the default SmolLM2-135M-Instruct
    repo: str = "."                 # the checkout whose stages run (another one measures the "before")
    out_dir: str = "out_bench"      # where the runs write (inside --repo)
    stages: str = "align,probe,distill,finetune"  # which stages
    shapes: str = "preset,4096"     # which shapes (keys of SHAPES)
    steps: int = 40                 # steps per run (distill: the loss curve is logged at every step)
    probes: int = 4                 # probes of the score run
    extra: str = ""                 # flags added to every training stage, e.g. "--compile=false"
    json: str = ""                  # also write the rows here
    profile: bool = False           # instead: trace the distill step with torch.profiler at --shapes (see above)
    profile_steps: int = 5          # steps traced (after as many warm-up steps)
    profile_graph: bool = True      # --profile on a GPU: the step replayed as a CUDA graph (distill.py's default)
    allreduce_mb: str = ""          # instead (under torchrun): all_reduce timings of these sizes, e.g. "106,540"
    gpus: int = 1                   # processes per stage: N > 1 runs each under torchrun --nproc_per_node=N


def sh(repo, script, flags, log, gpus=1):
    """Run one stage in `repo` (under torchrun when gpus > 1); its output appended to `log`; a failure ends the
    benchmark with the log's tail."""
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"] if gpus > 1 else []
    cmd = [sys.executable, *launch, script] + flags.split()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        r = subprocess.run(cmd, cwd=repo, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        raise SystemExit(f"{script} failed in {repo}: see {log}\n" + open(log).read()[-3000:])


def per_step(log_path, skip):
    """(median ms per step, peak GB or None, the kl curve) from a stage's log.jsonl: each record covers the steps
    since the previous one; records whose interval starts before step `skip` (compilation, warm-up) are left out."""
    rows = [json.loads(line) for line in open(log_path)]
    ms, prev = [], 0
    for r in rows:
        n = r["step"] - prev
        if prev >= skip and n > 0:
            ms.append(r["ms"] / n)
        prev = r["step"]
    mem = max((r["mem_gb"] for r in rows if "mem_gb" in r), default=None)
    return (statistics.median(ms) if ms else None), mem, [r.get("kl") for r in rows]


def flops(model, T, head=True, only_mixers=False):
    """Forward model FLOPs per token (see the docstring)."""
    c = model.config
    total = 0.0
    for layer, kind in zip(model.model.layers, c.mixers):
        mix = sum(p.numel() for n, p in layer.self_attn.named_parameters() if p.dim() == 2)
        mix_f = 2 * mix + (2 * T * c.num_attention_heads * c.head_dim if kind == "attn" else
                           2 * c.num_attention_heads * (2 * c.head_dim ** 2 + 64 * 2 * c.head_dim))
        total += mix_f if only_mixers else mix_f + 2 * sum(p.numel() for p in layer.mlp.parameters())
    return total + (2 * c.hidden_size * c.vocab_size if head else 0)


def matmul_rate():
    """Dense bf16 matmul FLOP/s of this GPU (None on the CPU: no MFU there)."""
    if not torch.cuda.is_available():
        return None
    from triton.testing import do_bench
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * 8192 ** 3 / (do_bench(lambda: a @ b, return_mode="median") * 1e-3)


# kernel name (lower case) -> group, the first match wins (inductor names its kernels after the ops it fused);
# on the CPU the names are aten ops. The top kernels are printed by name too: the groups are a summary.
GROUPS = [("gemm", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "aten::mm", "aten::addmm", "aten::bmm",
                    "aten::matmul", "aten::linear")),
          ("GLA kernel", ("_state", "_chunk_", "_local_state", "gla")),
          ("softmax attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
          ("optimizer (fused AdamW)", ("adam", "multi_tensor", "foreach")),
          ("KL (log-softmax, exp, sums)", ("softmax", "_kl", "logsumexp", "amax")),
          ("inductor-fused (norms, rope, swiglu, gates)", ("triton_",)),
          ("norms, copies, casts, fills", ("norm", "copy", "memcpy", "memset", "fill", "cat", "elementwise"))]


def group(name):
    low = name.lower()
    return next((g for g, keys in GROUPS if any(k in low for k in keys)), "other")


def linear_flops(model):
    """Forward FLOPs per token of the matmuls with weights (blocks and head): what the gemm kernels compute."""
    c = model.config
    weights = sum(p.numel() for p in model.model.layers.parameters() if p.dim() == 2)
    return 2 * weights + 2 * c.hidden_size * c.vocab_size


def profile_distill(cfg, transfer, teacher_src, B, T, device):
    """Trace distill.stage2_step at B x T: (rows [(group, ms per step, share)], wall ms, busy fraction, gemm FLOP/s,
    kernels [(ms per step, launches per step, group, name)] longest first, launches per step)."""
    import distill
    from model import load_checkpoint
    from torch.profiler import ProfilerActivity, profile
    teacher32, _, teacher = distill.load_teachers(teacher_src, device, distill.Config(compile="auto"))
    student = load_checkpoint(transfer)[0]
    L = student.config.num_hidden_layers
    distill.make_hybrid(student, teacher32, [int(x) for x in LAYERS.split(",") if int(x) < L])
    student.to(device)
    forward = distill.compile_blocks(student, distill.Config(compile="auto"), device)
    opt = distill.make_optimizer(student, 1e-4, 7e-6)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, teacher.config.vocab_size, (B, T), generator=gen).to(device) for _ in range(4)]
    on_gpu = device.startswith("cuda")
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)

    def train_step(idx):
        return distill.stage2_step(forward, student, [(idx, distill.teacher_hidden(teacher, idx, device))],
                                   teacher.lm_head.weight, opt, device=device)

    graphed = on_gpu and cfg.profile_graph      # as distill.py runs it on a GPU: 3 eager steps, then the capture
    run = cuda_graph(train_step) if graphed else train_step

    def step(i):
        return run(batches[i % len(batches)])

    for i in range(max(cfg.profile_steps, 4 if graphed else 0)):   # warm-up: compilation, autotuning, capture
        step(i)
    sync()
    with profile(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for i in range(cfg.profile_steps):
            step(i)
        sync()
        wall = (time.perf_counter() - t0) * 1e3 / cfg.profile_steps
    times, kernels = {}, []
    for e in prof.key_averages():
        if on_gpu and e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if not on_gpu and not e.key.startswith("aten::"):
            continue
        ms = (e.self_device_time_total if on_gpu else e.self_cpu_time_total) / 1e3 / cfg.profile_steps
        times[group(e.key)] = times.get(group(e.key), 0.0) + ms
        kernels.append((ms, e.count // cfg.profile_steps, group(e.key), e.key))
    busy = sum(times.values())
    launches = sum(n for _, n, _, _ in kernels)
    rows = sorted(((g, ms, ms / wall) for g, ms in times.items()), key=lambda r: -r[1])
    gemm_flops = B * T * (3 * linear_flops(student) + linear_flops(teacher))
    gemm_rate = gemm_flops / (times.get("gemm", 0) * 1e-3) if times.get("gemm") else None
    return rows, wall, busy / wall, gemm_rate, sorted(kernels, reverse=True), launches


def allreduce_rates(sizes_mb, reps=10):
    """[(MB, median ms, bus GB/s)] of dist.all_reduce over torchrun's processes (NCCL on GPUs, gloo on CPUs)."""
    import torch.distributed as dist
    from common import init_dist
    d = init_dist()
    if d.world < 2:
        raise SystemExit("--allreduce_mb needs several processes: torchrun --standalone --nproc_per_node=2 "
                         "bench_train.py --allreduce_mb=106,540")
    sync = torch.cuda.synchronize if d.device.startswith("cuda") else (lambda: None)
    rows = []
    for mb in sizes_mb:
        x = torch.ones(int(mb * 2 ** 20) // 4, device=d.device)
        times = []
        for i in range(reps + 3):       # 3 warm-up calls
            sync()
            t0 = time.perf_counter()
            dist.all_reduce(x)
            sync()
            times.append(time.perf_counter() - t0)
        t = statistics.median(times[3:])
        rows.append((mb, t * 1e3, 2 * (d.world - 1) / d.world * x.numel() * 4 / t / 1e9))
        print(f"all_reduce {mb:g} MB over {d.world} processes ({d.device}): {t * 1e3:.1f} ms, "
              f"bus bandwidth {rows[-1][2]:.1f} GB/s", flush=True)
    return rows


def main(cfg):
    if cfg.allreduce_mb:
        return allreduce_rates([float(x) for x in cfg.allreduce_mb.split(",")])
    import distill
    from model import load_checkpoint
    from teachers import from_pretrained
    if not cfg.data_dir:
        raise SystemExit("--data_dir: the token folder of data.py is required")
    stages = cfg.stages.split(",")
    if "finetune" in stages and "distill" not in stages[:stages.index("finetune")] and not cfg.profile:
        raise SystemExit(f"--stages={cfg.stages}: finetune trains the distill checkpoint of its shape, so distill "
                         f"must come before it (e.g. --stages=distill,finetune)")
    repo, data_dir = os.path.abspath(cfg.repo), os.path.abspath(cfg.data_dir)
    old = "run_name" not in open(os.path.join(repo, "distill.py")).read()   # before --run was renamed
    name = lambda run: f"--run={run}" if old else f"--run_name={run}"  # noqa: E731
    log = os.path.abspath(f"bench_{os.path.basename(repo.rstrip('/'))}.log")
    out = os.path.join(repo, cfg.out_dir)
    common = f"--out_dir={out} --data_dir={data_dir} {cfg.extra}"
    peak = matmul_rate()
    peak = peak and peak * cfg.gpus   # MFU of the machine's N GPUs
    device = torch.cuda.get_device_name() if peak else "CPU (no MFU)"
    device += f" x {cfg.gpus} (torchrun)" if cfg.gpus > 1 else ""
    print(f"{device} | torch {torch.__version__} | bf16 matmul {(peak or 0) / 1e12:.0f} TFLOP/s | repo {repo} | "
          f"log {log}", flush=True)

    # ---- the runs: transfer once, then each stage at each shape (finetune reads the distill of its shape)
    sh(repo, "transfer.py", f"{name('bench')} --out_dir={out} --teacher={cfg.teacher}", log)
    transfer = os.path.join(out, "bench", "transfer", "ckpt.pt")
    if cfg.profile:
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        result = {}
        for shape in cfg.shapes.split(","):
            flags = SHAPES[("distill", shape)]
            B, T = (int(flags.split(f"--{k}=")[1].split()[0]) for k in ("batch_size", "seq_len"))
            rows, wall, busy, rate, kernels, launches = profile_distill(cfg, transfer, cfg.teacher, B, T, dev)
            print(f"\ndistill step {B} x {T} on {device}: {wall:.1f} ms wall, {launches} kernels (ops on the CPU), "
                  f"busy {100 * busy:.0f}% of it, "
                  f"gemm kernels at {(rate or 0) / 1e12:.0f} TFLOP/s" + (f" ({100 * rate / peak:.0f}% of the "
                                                                        f"{peak / 1e12:.0f} measured)" if peak else ""))
            print("| kernel group | ms / step | share of the step |\n|---|---|---|")
            for g, ms, share in rows:
                print(f"| {g} | {ms:.2f} | {100 * share:.1f}% |")
            print(f"| (GPU idle: waiting for the host) | {wall * (1 - busy):.2f} | {100 * (1 - busy):.1f}% |")
            print("the 15 kernels that take longest (ms per step, launches per step, group, name):")
            for ms, n, g, key in kernels[:15]:
                print(f"  {ms:7.3f} ms {n:5d}x  {g:28.28}  {key[:110]}")
            result[shape] = dict(batch=B, seq_len=T, wall_ms=wall, busy=busy, launches=launches,
                                 gemm_tflops=rate and rate / 1e12,
                                 groups={g: ms for g, ms, _ in rows},
                                 kernels=[dict(ms=ms, n=n, group=g, name=key) for ms, n, g, key in kernels[:40]])
        if cfg.json:
            with open(cfg.json, "w") as f:
                json.dump(dict(device=device, torch=torch.__version__, profile=result), f, indent=1)
        return result
    student = load_checkpoint(transfer)[0]
    teacher = from_pretrained(cfg.teacher)
    hybrid = distill.make_hybrid(load_checkpoint(transfer)[0], teacher, [int(x) for x in LAYERS.split(",")])
    probe_model = distill.make_hybrid(load_checkpoint(transfer)[0], teacher, [0])
    skip = max(5, cfg.steps // 4)
    rows = []
    for shape in cfg.shapes.split(","):
        run = f"bench_{shape}"
        for stage in cfg.stages.split(","):
            flags = SHAPES[(stage, shape)]
            T = int(flags.split("--seq_len=")[1].split()[0])
            B = int(flags.split("--batch_size=")[1].split()[0])
            t0 = time.time()
            if stage == "align":
                sh(repo, "align.py", f"{name(run)} {common} --input={transfer} --steps={cfg.steps} --log_every=1 "
                   f"{flags}", log, cfg.gpus)
                path = os.path.join(out, run, "align", "log.jsonl")
                fl = flops(teacher, T, head=False) + 3 * flops(student, T, head=False, only_mixers=True)
                tok_step = B * T
            elif stage == "probe":
                layers = ",".join(str(i) for i in range(cfg.probes))
                sh(repo, "score.py", f"{name(run)} {common} --input={transfer} --layers={layers} "
                   f"--steps={cfg.steps} --eval_every={max(1, cfg.steps // 8)} --patience=0 {flags}", log, cfg.gpus)
                path = os.path.join(out, run, "score", "log.jsonl")
                fl = 3 * flops(probe_model, T) + flops(teacher, T) / cfg.probes
                tok_step = B * T                # ms below is per probe step (a logged round / its probe steps)
            elif stage == "distill":
                sh(repo, "distill.py", f"{name(run)} {common} --input={transfer} --layers={LAYERS} "
                   f"--steps={cfg.steps} --warmup=0 --weight_decay=0 --valid_batches=1 --save_every=0 "
                   + ("" if old else "--log_every=1 ") + flags, log, cfg.gpus)
                path = os.path.join(out, run, "distill", "log.jsonl")
                fl = 3 * flops(hybrid, T) + flops(teacher, T)
                tok_step = B * T
            else:
                sh(repo, "finetune.py", f"{name(run)} {common} --steps={cfg.steps} --valid_batches=1 --save_every=0 "
                   + ("" if old else "--log_every=1 ") + flags, log, cfg.gpus)
                path = os.path.join(out, run, "finetune", "log.jsonl")
                fl = 3 * flops(hybrid, T) + flops(teacher, T)
                tok_step = B * T
            ms, mem, curve = per_step(path, skip if stage != "probe" else 1)
            if stage == "probe" and not old:  # a logged round covers eval_every steps of every probe
                ms = ms / (cfg.probes * max(1, cfg.steps // 8)) if ms else None
            elif stage == "probe":            # the old score.py logged per probe step, all probes together
                ms = ms / cfg.probes if ms else None
            tok_s = tok_step / (ms / 1e3) if ms else None
            row = dict(stage=stage, shape=shape, batch=B, seq_len=T, ms_step=ms, tok_s=tok_s, gflop_token=fl / 1e9,
                       tflops=tok_s * fl / 1e12 if tok_s else None, mfu=tok_s * fl / peak if tok_s and peak else None,
                       peak_gb=mem, wall_s=round(time.time() - t0, 1), kl_curve=curve if stage == "distill" else None)
            rows.append(row)
            print(f"  {stage:8} {shape:6} B={B:<3} T={T:<5} {ms or float('nan'):8.1f} ms/step "
                  f"{(tok_s or 0) / 1e3:8.1f}k tok/s {row['tflops'] or 0:6.1f} TFLOP/s "
                  f"MFU {100 * (row['mfu'] or 0):5.1f}% "
                  f"peak {mem if mem is not None else 'n/a'} GB ({row['wall_s']} s)", flush=True)

    # ---- the table
    print("\n| stage | shape (B x T) | ms/step | tokens/s | GFLOP/token | TFLOP/s | MFU | peak GB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
        print(f"| {r['stage']} | {r['batch']} x {r['seq_len']} | {fmt(r['ms_step'], '.1f')} | "
              f"{fmt(r['tok_s'] and r['tok_s'] / 1e3, '.0f')}k | {r['gflop_token']:.2f} | {fmt(r['tflops'], '.0f')} | "
              f"{fmt(r['mfu'] and 100 * r['mfu'], '.1f')}% | {fmt(r['peak_gb'], '.1f')} |")
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(dict(device=device, torch=torch.__version__, matmul_tflops=peak and peak / 1e12,
                           repo=repo, rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main(parse_args(Config))
