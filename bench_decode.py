"""
The fused decoding step against the eager one (issue 16), on one GPU and without trained checkpoints: first that the
two agree in bf16, then the speed sweep of both (bench() below, which eval.py --speed runs too), for the teacher and
hybrid layouts built from it.

Speed and memory depend on which layers are softmax attention, not on the GLA or GDN weights, so every hybrid here is
the teacher with its other layers converted to --mixer by Stage 0's attention transfer (transfer.attention_to_mixer:
untrained gates). For each layout:

    check   greedy generation of --check_tokens tokens with decode="eager" and with decode="fused" (both recorded
            as CUDA graphs, bf16 weights), for a text prompt (B=1) and random tokens (B=--batch): the tokens must be
            equal; and the logits of both steps fed the same tokens (max |fused - eager|, and relative to the
            logits' max). Where tokens differ, the eager step's top-2 margin there says whether it was a near-tie.
    speed   bench with modes eager (the step before issue 16) and fused (Transformer.fused_step: fused kernels,
            cuBLAS matmuls; model.decoder's default): ms per step, the floor (bytes the step must move over the copy
            bandwidth measured in the same run) and the kernels per step (profiler trace of one step), at B = 1 and
            --batch, every length of --lengths.

Then one table of everything and the ratios the issue asks for (B=1 ms per step at the shortest length; at --batch,
each hybrid's fused step against the teacher's fused step). --compile=true adds "fused+compile" (torch.compile of
the fused step inside the recorded graph) at the shortest length, B = 1, for the teacher and the all-linear model
(compiling takes a minute per model).

Writes --out (JSON: settings, checks, speed rows per layout).

    python bench_decode.py --device=cpu --layouts="teacher:all;linear:none" --lengths=64 --batch=2 \
        --decode_tokens=4 --check_tokens=4
    python bench_decode.py                                   # one H200: ~3 minutes
"""

import copy
import gc
import time
from dataclasses import asdict, dataclass

import torch

from common import parse_args, pick_device, print_config, write_json
from model import decoder, generate

TEXT = ("The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome. "
        "Write one sentence about each of these cities, then name the river that runs through each.")


@dataclass
class Config:
    teacher: str = ""               # teacher source ("" = SmolLM2-135M-Instruct, the Q4_1 GGUF)
    layouts: str = "teacher:all;25%:0,1,2,17,18,20,23,24;12.5%:1,18,20,23;all-linear:none"  # name:softmax layers
    lengths: str = "1024,4096,16384,32768"  # prefill lengths of the speed sweep
    batch: int = 8                  # the larger batch (B = 1 always runs)
    decode_tokens: int = 64         # timed decoding steps per row
    check_tokens: int = 32          # greedy tokens compared between the eager and the fused step
    modes: str = "eager,fused"      # model.decoder modes timed; the table sets the last against the floor
    mixer: str = "gla"              # the linear mixer of the hybrids: gla | gdn
    compile: bool = False           # also time fused+compile (shortest length, B = 1, teacher and all-linear)
    out: str = "out/bench_decode.json"  # results
    device: str = ""                # "" = cuda if available


# ------------------------------------------------------------------------------------------- the speed sweep

def free(cuda):
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def cache_bytes(cache, mixers):
    """Bytes of the decoding state by kind: KV buffers of attention layers ("attn"), the fp32 states of the linear
    layers, GLA or GDN ("gla")."""
    out = {"attn": 0, "gla": 0}
    for kind, entry in zip(mixers, cache):
        out["attn" if kind == "attn" else "gla"] += sum(entry[key].untyped_storage().nbytes()
                                                        for key in ("k", "v", "state") if key in entry)
    return out


def kernels_per_step(step, x):
    """CUDA kernels (with memcpys and memsets) that one call of a decoder step runs: device activities in a profiler
    trace of the call, which on a recorded step are the graph's kernels as they run (CUPTI reports each kernel of a
    replay), plus the copy of the input token and the clone of the logits around the replay. If the trace shows
    none, the same count for one unrecorded run of the step (step.run), the launches the graph was recorded from.
    Each call decodes one more token. None if the profiler is unavailable."""
    from torch.profiler import ProfilerActivity, profile
    try:
        for call in (step, step.run):
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                call(x)
                torch.cuda.synchronize()
            n = sum(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events())
            if n:
                return n
    except Exception as e:  # a profiler that cannot start must not end the speed table
        print(f"  (no kernel count: {type(e).__name__}: {str(e)[:100]})")
    return None


@torch.no_grad()
def bench(model, lengths, batches, n_decode, device, modes=("eager", "fused")):
    """Prefill and decode timings and memory for each batch x length; a length that runs out of memory ends that
    batch's sweep (the longer ones are marked skipped). Each decode mode of model.decoder decodes from the same
    prefill (the earlier modes from a copy of the cache): "eager", the model's forward recorded as one CUDA graph
    (the step before issue 16); "fused", Transformer.fused_step recorded the same way; "fused+compile", "fused"
    under torch.compile. Beside each time: the floor, the bytes a step must move (kernels_decode.step_bytes:
    weights, KV up to the position, GLA and GDN states read and written) over the copy bandwidth measured here, and
    on the GPU the kernels of one step (kernels_per_step, on one extra step after the timed ones). decode_tok_s,
    decode_ms_per_step and peak_decode_bytes are the last mode's: with the default modes, "fused", the default of
    model.decoder."""
    from kernels import copy_bandwidth
    from kernels_decode import step_bytes
    cuda = str(device).startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    head = model.lm_head.weight
    bw = copy_bandwidth(device) if cuda else None
    if cuda:  # CUPTI loaded before any graph is recorded: a profiler first started after recording breaks graphs
        with torch.autograd.profiler.profile():
            pass
    warm = 2  # untimed decoding steps: on the GPU the first warms up, the second records the CUDA graph

    def fork(cache, B):
        """A copy of a prefilled cache, so that every decode mode starts from the same prefill."""
        twin = model.new_cache(B, cache.max_len)
        for a, b in zip(twin, cache):
            for key, t in b.items():
                if torch.is_tensor(t) and key != "pos_t":
                    a[key].copy_(t)
        twin.pos = cache.pos
        twin.pos_t.fill_(cache.pos)
        return twin

    def one(B, T, steps):
        idx = torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(T)).to(device)
        cache = model.new_cache(B, T + warm + steps + 2 * (cuda and steps > 0))  # + kernels_per_step's steps
        sync()
        t0 = time.perf_counter()
        # the hidden state, not the logits: B x T x vocab logits at 32K would dwarf the cache being measured
        nxt = (model(idx, cache=cache, return_hidden=True)[:, -1:] @ head.t()).argmax(-1)
        sync()
        t1 = time.perf_counter()
        kinds = cache_bytes(cache, model.config.mixers)
        r = dict(batch=B, length=T, status="ok", prefill_s=t1 - t0, prefill_tok_s=B * T / (t1 - t0),
                 cache_bytes=kinds["attn"] + kinds["gla"], kv_bytes=kinds["attn"], gla_state_bytes=kinds["gla"],
                 beyond_max_pos=T + warm + steps > model.config.max_position_embeddings, decode={})
        if steps == 0:
            return r
        # the floor at the middle of the timed steps: T + warm + steps / 2 keys per attn layer
        r["step_bytes"] = step_bytes(model, B, T + warm + steps // 2)
        r["floor_ms"] = 1000 * r["step_bytes"] / bw if bw else None
        for i, mode in enumerate(modes):
            c = fork(cache, B) if i < len(modes) - 1 else cache  # the last mode decodes from the prefill itself
            try:
                step, x = decoder(model, c, mode.split("+")[0], compile=mode.endswith("+compile")), nxt
                for _ in range(warm):
                    x = step(x).argmax(-1, keepdim=True)
                sync()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                t2 = time.perf_counter()
                for _ in range(steps):
                    x = step(x).argmax(-1, keepdim=True)
                sync()
                t3 = time.perf_counter()
            except (torch.cuda.OutOfMemoryError, MemoryError):
                raise
            except Exception as e:  # a mode that fails (a kernel that does not compile) must not end the table
                r["decode"][mode] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
                print(f"  B={B} T={T} {mode}: {r['decode'][mode]['error']}", flush=True)
                continue
            r["decode"][mode] = dict(ms_per_step=1000 * (t3 - t2) / steps, tok_s=B * steps / (t3 - t2),
                                     kernels=kernels_per_step(step, x) if cuda else None)
            r.update(decode_tok_s=B * steps / (t3 - t2), decode_ms_per_step=1000 * (t3 - t2) / steps,
                     peak_decode_bytes=torch.cuda.max_memory_allocated() if cuda else None)
            del step, c
        if "decode_tok_s" not in r:
            r["status"] = "error (every decode mode failed)"
        return r

    rows, fits = [], {B: True for B in batches}
    for B in batches:
        for T in sorted(lengths):
            r = dict(batch=B, length=T, status="skipped (oom at a shorter length)")
            if fits[B]:
                try:
                    one(B, T, 0)  # warm-up of the prefill at this shape: cuBLAS/SDPA pick kernels, untimed
                    r = one(B, T, n_decode)
                except (torch.cuda.OutOfMemoryError, MemoryError):
                    r, fits[B] = dict(batch=B, length=T, status="oom"), False
            rows.append(r)
            free(cuda)
            if r["status"] != "ok":
                print(f"  B={B} T={T}: {r['status']}", flush=True)
                continue
            cols = [f"{mode} {d['ms_per_step']:.3f} ms/step ({d['tok_s']:.0f} tok/s"
                    + (f", {d['kernels']} kernels)" if d["kernels"] else ")") for mode, d in r["decode"].items()
                    if "error" not in d]
            floor = f"floor {r['floor_ms']:.3f} ms ({r['step_bytes'] / 1e6:.0f} MB)" if r.get("floor_ms") else ""
            print(f"  B={B} T={T}: prefill {r['prefill_s'] * 1000:.0f}ms | " + " | ".join(cols + [floor] * bool(floor))
                  + f" | cache {r['cache_bytes'] / 2**20:.1f}MB" + " | past max_position_embeddings"
                  * r["beyond_max_pos"], flush=True)
    if bw:
        print(f"  (floor = bytes a step moves / copy bandwidth {bw / 1e12:.2f} TB/s; kernels: CUDA kernels, memcpys "
              f"and memsets of one step in a profiler trace)")
    return rows


# ------------------------------------------------------------------------------------------------------ checks


# ------------------------------------------------------------------------------------------------- layouts

def parse_layouts(spec, n_layers, linear="gla"):
    """"name:0,1,2;name:all;name:none" -> [(name, [mixer per layer])]; the listed layers keep softmax attention, the
    others are `linear`."""
    out = []
    for item in filter(None, spec.split(";")):
        name, _, layers = item.partition(":")
        keep = (set(range(n_layers)) if layers == "all" else set() if layers == "none"
                else {int(i) for i in layers.split(",")})
        if not keep <= set(range(n_layers)):
            raise SystemExit(f"--layouts: {name} lists layers outside 0..{n_layers - 1}")
        out.append((name, ["attn" if i in keep else linear for i in range(n_layers)]))
    return out


def hybrid(teacher, mixers, seed=0):
    """The teacher with the layers not marked "attn" converted by Stage 0 (transfer.attention_to_mixer)."""
    from transfer import attention_to_mixer
    torch.manual_seed(seed)
    model = copy.deepcopy(teacher)
    for i, kind in enumerate(mixers):
        if kind != "attn":
            model.set_mixer(i, attention_to_mixer(model.model.layers[i].self_attn, model.config, kind), kind)
    return model.eval()


@torch.no_grad()
def check(model, prompt, n, mode="fused"):
    """Greedy tokens of the eager step and of the `mode` step, and both steps' logits along the eager tokens."""
    T = prompt.shape[1]
    r = dict(batch=prompt.shape[0], prompt=T, tokens=n, mode=mode)
    try:
        eager = generate(model, prompt, n, decode="eager")
        fused = generate(model, prompt, n, decode=mode)
        logits = {}
        for m in ("eager", mode):
            cache = model.new_cache(prompt.shape[0], T + n)
            model(prompt, cache=cache, return_hidden=True)
            step = decoder(model, cache, m)
            logits[m] = torch.stack([step(eager[:, T + i:T + i + 1]) for i in range(n - 1)], 1)  # predicts i + 1
    except (torch.cuda.OutOfMemoryError, MemoryError):
        raise
    except Exception as e:  # report it, and let the speed sweep run the modes that work
        return dict(r, tokens_equal=False, error=f"{type(e).__name__}: {str(e)[:300]}")
    diff = (logits[mode] - logits["eager"]).abs().max().item()
    r.update(tokens_equal=bool(torch.equal(eager, fused)), max_logit_diff=diff,
             rel_logit_diff=diff / logits["eager"].abs().max().item())
    if not r["tokens_equal"]:
        b, i = (eager != fused).nonzero()[0].tolist()  # first differing token (i > T: the prefill is shared)
        top2 = logits["eager"][b, i - T - 1].topk(2).values
        r.update(first_diff=i - T, eager_margin_there=(top2[0] - top2[1]).item())
    return r


def table(results, batches, lengths, modes):
    """Markdown: per layout, batch and length the ms per step of each mode, the floor, the kernels; then ratios."""
    nan = float("nan")
    ms = lambda r, m: r["decode"].get(m, {}).get("ms_per_step", nan)  # noqa: E731  (nan: the mode failed)
    last = modes[-1]
    lines = ["| model | B | T | " + " | ".join(f"{m} ms" for m in modes) + f" | floor ms | {last} / floor | kernels "
             + " / ".join(modes) + f" | {last} tok/s |", "|---|---|---|" + "---|" * (len(modes) + 4)]
    rows = {}
    for name, res in results.items():
        for r in res["speed"]:
            if r["status"] != "ok":
                lines.append(f"| {name} | {r['batch']} | {r['length']} | {r['status']} |" + " |" * (len(modes) + 3))
                continue
            rows[name, r["batch"], r["length"]] = r
            floor = r.get("floor_ms") or nan
            lines.append(f"| {name} | {r['batch']} | {r['length']} | " + " | ".join(f"{ms(r, m):.3f}" for m in modes)
                         + f" | {floor:.3f} | {ms(r, last) / floor:.1f}x | "
                         + " / ".join(str(r["decode"].get(m, {}).get("kernels")) for m in modes)
                         + f" | {r['batch'] * 1000 / ms(r, last):.0f} |")
    names = list(results)
    lines += ["", f"decode speed-up against the teacher (teacher ms / model ms), {' -> '.join(modes)}:", "",
              "| model | B | " + " | ".join(str(T) for T in lengths) + " |", "|---|---|" + "---|" * len(lengths)]
    for name in names[1:]:
        for B in batches:
            cells = []
            for T in lengths:
                m, t = rows.get((name, B, T)), rows.get((names[0], B, T))
                cells.append(" -> ".join(f"{ms(t, k) / ms(m, k):.2f}x" for k in modes) if m and t else "-")
            lines.append(f"| {name} | {B} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(cfg):
    print_config(cfg)
    from teachers import from_pretrained
    from tokenizer import load_tokenizer
    import triton
    device = cfg.device or pick_device()
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    print(f"{torch.cuda.get_device_name() if cuda else 'CPU'}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{dtype}", flush=True)
    t0 = time.time()
    if cuda:  # CUPTI loaded before any graph is recorded (eval.kernels_per_step profiles recorded steps)
        with torch.autograd.profiler.profile():
            pass
    teacher = from_pretrained(cfg.teacher, dtype=dtype, device=device).eval()
    tok = load_tokenizer(cfg.teacher)
    lengths = sorted(int(x) for x in cfg.lengths.split(","))
    batches = sorted({1, cfg.batch})
    if cfg.mixer not in ("gla", "gdn"):
        raise SystemExit(f"--mixer must be gla or gdn, got {cfg.mixer!r}")
    layouts = parse_layouts(cfg.layouts, teacher.config.num_hidden_layers, cfg.mixer)
    modes = tuple(m for m in cfg.modes.split(",") if m)
    prompts = [torch.tensor([tok.encode(TEXT)], device=device),
               torch.randint(0, teacher.config.vocab_size, (cfg.batch, 64), generator=torch.Generator().manual_seed(0)
                             ).to(device)]
    results = {}
    for name, mixers in layouts:
        model = teacher if all(k == "attn" for k in mixers) else hybrid(teacher, mixers)
        print(f"== {name}: {mixers.count('attn')}/{len(mixers)} softmax layers", flush=True)
        checks = [check(model, p, cfg.check_tokens, m) for m in modes if m != "eager" for p in prompts]
        for c in checks:
            print(f"  check {c['mode']} B={c['batch']}: " + (c["error"] if "error" in c else
                  f"tokens equal {c['tokens_equal']} | max |fused - eager| logit {c['max_logit_diff']:.3g} "
                  f"({c['rel_logit_diff']:.2g} of the largest)" + (f" | first differing token {c['first_diff']}, "
                  f"eager top-2 margin there {c['eager_margin_there']:.3g}" if not c["tokens_equal"] else "")),
                  flush=True)
        speed = bench(model, lengths, batches, cfg.decode_tokens, device, modes=modes)
        results[name] = dict(mixers=mixers, checks=checks, speed=speed)
        if cfg.compile and (name == layouts[0][0] or "attn" not in mixers):
            results[name]["compile"] = bench(model, lengths[:1], [1], cfg.decode_tokens, device,
                                             modes=("fused", "fused+compile"))
        del model
        if cuda:
            torch.cuda.empty_cache()
    text = table(results, batches, lengths, modes)
    print("\n" + text)
    for name, res in results.items():
        for r in res.get("compile", []):
            if r["status"] == "ok":
                print(f"compile, {name} B=1 T={r['length']}: " + ", ".join(
                    f"{k} {d['ms_per_step']:.3f} ms ({d['kernels']} kernels)" if "error" not in d else f"{k} {d}"
                    for k, d in r["decode"].items()))
    ok = all(c["tokens_equal"] for res in results.values() for c in res["checks"])
    print(f"final | greedy tokens of the fused step == eager for every layout: {ok} | "
          f"{(time.time() - t0) / 60:.1f}m | {cfg.out}")
    report = dict(settings=dict(asdict(cfg), device=torch.cuda.get_device_name() if cuda else "cpu",
                                torch=torch.__version__, triton=triton.__version__, dtype=str(dtype)),
                  results=results, table=text)
    write_json(cfg.out, report)
    return report


if __name__ == "__main__":
    main(parse_args(Config))
