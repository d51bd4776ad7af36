"""
The fused decoding step against the eager one (issue 16), on one GPU and without trained checkpoints: first that the
two agree in bf16, then eval.bench's speed sweep of both, for the teacher and hybrid layouts built from it.

Speed and memory depend on which layers are softmax attention, not on the GLA weights, so every hybrid here is the
teacher with its other layers converted by Stage 0's attention transfer (transfer.attention_to_gla: untrained
gates). For each layout:

    check   greedy generation of --check_tokens tokens with decode="eager" and with each fused mode (all recorded as
            CUDA graphs, bf16 weights), for a text prompt (B=1) and random tokens (B=--batch): the tokens must be
            equal; and the logits of both steps fed the same tokens (max |fused - eager|, and relative to the
            logits' max). Where tokens differ, the eager step's top-2 margin there says whether it was a near-tie.
    speed   eval.bench with modes eager (the step before issue 16), fused-cublas (fused kernels, cuBLAS matmuls) and
            fused (the default: norms and SwiGLU inside matrix-vector kernels): ms per step, the floor (bytes the
            step must move over the copy bandwidth measured in the same run) and the kernels per step (profiler
            trace of one step), at B = 1 and --batch, every length of --lengths.

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
import time
from dataclasses import asdict, dataclass

import torch

from common import parse_args, pick_device, print_config, write_json
from eval import bench
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
    modes: str = "eager,fused-cublas,fused"  # decode modes timed (model.decoder); drop one that fails to compile
    compile: bool = False           # also time fused+compile (shortest length, B = 1, teacher and all-linear)
    out: str = "out/bench_decode.json"  # results
    device: str = ""                # "" = cuda if available


def parse_layouts(spec, n_layers):
    """"name:0,1,2;name:all;name:none" -> [(name, [mixer per layer])]; the listed layers keep softmax attention."""
    out = []
    for item in filter(None, spec.split(";")):
        name, _, layers = item.partition(":")
        keep = (set(range(n_layers)) if layers == "all" else set() if layers == "none"
                else {int(i) for i in layers.split(",")})
        if not keep <= set(range(n_layers)):
            raise SystemExit(f"--layouts: {name} lists layers outside 0..{n_layers - 1}")
        out.append((name, ["attn" if i in keep else "gla" for i in range(n_layers)]))
    return out


def hybrid(teacher, mixers, seed=0):
    """The teacher with the layers marked "gla" converted by Stage 0 (transfer.attention_to_gla)."""
    from transfer import attention_to_gla
    torch.manual_seed(seed)
    model = copy.deepcopy(teacher)
    for i, kind in enumerate(mixers):
        if kind == "gla":
            model.set_mixer(i, attention_to_gla(model.model.layers[i].self_attn, model.config), "gla")
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
    layouts = parse_layouts(cfg.layouts, teacher.config.num_hidden_layers)
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
    print(f"final | greedy tokens of every fused mode == eager for every layout: {ok} | "
          f"{(time.time() - t0) / 60:.1f}m | {cfg.out}")
    report = dict(settings=dict(asdict(cfg), device=torch.cuda.get_device_name() if cuda else "cpu",
                                torch=torch.__version__, triton=triton.__version__, dtype=str(dtype)),
                  results=results, table=text)
    write_json(cfg.out, report)
    return report


if __name__ == "__main__":
    main(parse_args(Config))
