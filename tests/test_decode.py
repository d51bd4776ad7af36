"""The fused decoding step (model.Transformer.fused_step, kernels_decode.py) against the eager step: every Triton
kernel against its PyTorch reference (fp32 and bf16, the mixed dtypes of autocast, GQA groups of 3, widths that are
not powers of two, attention over one split and many; the GDN step also against the token-by-token recurrence), the
fused step's logits and cache against the eager step's over several steps (fp32, CPU: teacher, hybrids of attn, GLA
and GDN, all-GLA; biases, q/k norms, a tied head), every row of a batch against that row decoded alone, greedy
generation token for token, torch.compile of the step (fullgraph), the floor's byte count. On a GPU also bf16 and
autocast, through the recorded CUDA graph.

As in test_kernels.py, the Triton kernels run on CPU in triton's interpreter (TRITON_INTERPRET=1), in a child pytest
(test_child_runs_triton_tests) so that the interpreter stays out of the other test modules.
Alone: TRITON_INTERPRET=1 python -m pytest -q tests/test_decode.py
"""

import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import kernels_decode as kd  # noqa: E402
from conftest import run_triton_child  # noqa: E402
import model as M  # noqa: E402
from model import ModelConfig, Transformer, decoder, generate  # noqa: E402

TRITON_HERE = kd.INTERPRET or torch.cuda.is_available()
DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not TRITON_HERE, reason="runs in the TRITON_INTERPRET=1 child")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 decoding through CUDA graphs needs a GPU")


def tiny(mixers, arch="llama", tie=False, seed=0):
    """A random model with GQA groups of 3 (6 query heads, 2 KV heads) and widths that are not powers of two."""
    torch.manual_seed(seed)
    cfg = ModelConfig(arch=arch, vocab_size=97, hidden_size=80, intermediate_size=72, num_hidden_layers=len(mixers),
                      num_attention_heads=6, num_key_value_heads=2, head_dim=16, tie_word_embeddings=tie,
                      attention_bias=arch == "qwen2", qk_norm=arch == "qwen3", mixers=list(mixers))
    m = Transformer(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # non-trivial norms, biases and gates
    return m


def tokens(B, T, seed=1):
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(seed))


def decode_both(m, idx, steps, T_extra=2):
    """Logits [steps, B, vocab] and the cache of the eager and of the fused decoder after the same prefill (run once:
    in the interpreter it takes seconds), each fed the eager step's greedy tokens."""
    out = {}
    forced = None
    prefilled = m.new_cache(idx.shape[0], idx.shape[1] + steps + T_extra)
    with torch.no_grad():
        m(idx, cache=prefilled)
    for mode in ("eager", "fused"):
        cache = m.new_cache(idx.shape[0], prefilled.max_len)
        for a, b in zip(cache, prefilled):
            for key in {"k", "v", "state"} & b.keys():
                a[key].copy_(b[key])
        cache.pos = prefilled.pos
        cache.pos_t.fill_(prefilled.pos)
        step, x, logits = decoder(m, cache, mode), idx[:, -1:], []
        for i in range(steps):
            logits.append(step(x))
            x = logits[-1].argmax(-1, keepdim=True) if forced is None else forced[i]
        if forced is None:
            forced = [lg.argmax(-1, keepdim=True) for lg in logits]
        assert cache.pos == cache.pos_t.item() == idx.shape[1] + steps
        out[mode] = (torch.stack(logits), cache)
    return out


def assert_caches_equal(a, b, tol):
    """KV buffers and GLA states equal within tol relative to their largest entry (at least 1)."""
    for ea, eb in zip(a, b):
        for key in ("k", "v", "state"):
            if key in ea:
                ref = eb[key].float()
                assert (ea[key].float() - ref).abs().max() <= tol * max(1.0, ref.abs().max().item()), key


# ------------------------------------------------------------------------------------------- kernels vs references

def close(a, b, tol):
    """Equal shapes and dtypes, values within tol relative to the reference's largest (at least 1)."""
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    err = (a.float() - b.float()).abs().max().item()
    assert err <= tol * max(1.0, b.float().abs().max().item()), err


# bf16: the interpreter reproduces the eager roundings exactly; a GPU sums in another order (one bf16 step apart)
BF16 = 0 if kd.INTERPRET else 1e-2


# (activations, weights/residual/cache, tolerance); the last is autocast
DTYPES = [(torch.float32, torch.float32, 1e-5), (torch.bfloat16, torch.bfloat16, BF16),
          (torch.bfloat16, torch.float32, max(1e-5, BF16))]
DT_IDS = ["fp32", "bf16", "autocast"]


@needs_triton
@pytest.mark.parametrize("act,wdt,tol", DTYPES, ids=DT_IDS)
def test_triton_rms_norm_swiglu(act, wdt, tol):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 80, generator=gen).to(wdt).to(DEV), torch.randn(3, 80, generator=gen).to(act).to(DEV)
    w = (1 + 0.1 * torch.randn(80, generator=gen)).to(wdt).to(DEV)
    for yy in (None, y):
        out, res = kd._rms_norm_triton(x, yy, w, 1e-6)
        ref_out, ref_res = kd.rms_norm_ref(x, yy, w, 1e-6)
        close(out, ref_out, tol)
        close(res, ref_res, 0)
    gu = torch.randn(3, 2 * 72, generator=gen).to(act).to(DEV)
    close(kd._swiglu_triton(gu), kd.swiglu_ref(gu), tol)


@needs_triton
@pytest.mark.parametrize("act,wdt,tol", DTYPES, ids=DT_IDS)
def test_triton_rope_cache_write(act, wdt, tol):
    gen = torch.Generator().manual_seed(0)
    B, H, Hkv, K, L = 2, 6, 2, 16, 37
    qkv = torch.randn(B, (H + 2 * Hkv) * K, generator=gen).to(act).to(DEV)  # rows of the merged projection
    q, k, v = (t.view(B, -1, K) for t in qkv.split([H * K, Hkv * K, Hkv * K], dim=-1))
    cos, sin = tiny(["attn"]).to(DEV).rope(torch.arange(L, device=DEV))
    kc = torch.randn(B, Hkv, L, K, generator=gen).to(wdt).to(DEV)
    vc = torch.randn(B, Hkv, L, K, generator=gen).to(wdt).to(DEV)
    for p in (0, L - 1):
        pos = torch.tensor(p, device=DEV)
        caches = [(kc.clone(), vc.clone()) for _ in range(2)]
        out = kd._rope_cache_write_triton(q, k, v, cos, sin, pos, *caches[0])
        ref = kd.rope_cache_write_ref(q, k, v, cos, sin, pos, *caches[1])
        close(out, ref, tol)
        close(caches[0][0], caches[1][0], tol)
        close(caches[0][1], caches[1][1], 0)
        assert not torch.equal(caches[0][0], kc) and torch.equal(caches[0][0][:, :, p + 1:], kc[:, :, p + 1:])


@needs_triton
@pytest.mark.parametrize("act,wdt,tol", DTYPES, ids=DT_IDS)
def test_triton_attend_splits(act, wdt, tol):
    # keys split in 8 (19 splits), 64, 16 and the automatic choice; positions at the start, past a block edge, the end
    gen = torch.Generator().manual_seed(0)
    B, H, Hkv, K, L = 2, 6, 2, 16, 150
    kc = torch.randn(B, Hkv, L, K, generator=gen).to(wdt).to(DEV)
    vc = torch.randn(B, Hkv, L, K, generator=gen).to(wdt).to(DEV)
    q = (2 * torch.randn(B, H, K, generator=gen)).to(act).to(DEV)
    for p, split in ((0, 8), (64, 64), (149, 16), (100, 0)):
        pos = torch.tensor(p, device=DEV)
        # bf16: flash-decoding rounds the probabilities before normalising them, the eager step (attend_ref) after
        close(kd._attend_triton(q, kc, vc, pos, K ** -0.5, split), kd.attend_ref(q, kc, vc, pos, K ** -0.5),
              max(tol, 1e-6 if act == torch.float32 else 2e-2))


@needs_triton
@pytest.mark.parametrize("act,wdt,tol", DTYPES, ids=DT_IDS)
def test_triton_gla_decode(act, wdt, tol):
    gen = torch.Generator().manual_seed(0)
    B, H, K, R = 2, 6, 16, 5
    proj = torch.randn(B, 4 * H * K + R, generator=gen).to(act).to(DEV)
    gw = (torch.randn(H * K, R, generator=gen) * 2).to(wdt).to(DEV)
    gb = torch.randn(H * K, generator=gen).to(wdt).to(DEV)
    nw = (1 + 0.1 * torch.randn(K, generator=gen)).to(wdt).to(DEV)
    S = torch.randn(B, H, K, K, generator=gen).to(DEV)
    states = [S.clone(), S.clone()]
    out = kd._gla_decode_triton(proj, gw, gb, states[0], nw, 1e-5, K ** -0.5, H, wdt)
    ref = kd.gla_decode_ref(proj, gw, gb, states[1], nw, 1e-5, K ** -0.5, H, wdt)
    # bf16: the state is fp32 either way; the output may differ by one bf16 rounding where fp32 sums differ
    close(out, ref, max(tol, 0 if act == torch.float32 else 2e-2))
    close(states[0], states[1], 1e-5)
    assert not torch.equal(states[0], S)


def gdn_inputs(B, H, K, gen):
    """A merged GDN projection row [q | k | v | g_proj | a | b] per row, with decay inputs a from -30 to 30 (softplus
    past its threshold of 20, and far below 0), and A_log, dt_bias, o_norm's weight, a state."""
    proj = torch.randn(B, 4 * H * K + 2 * H, generator=gen)
    proj[:, 4 * H * K:4 * H * K + H] = torch.linspace(-30, 30, B * H).view(B, H)
    a_log = torch.empty(H).uniform_(0, 16, generator=gen).log()
    dt_bias = torch.randn(H, generator=gen) - 3
    nw = 1 + 0.1 * torch.randn(K, generator=gen)
    return proj, a_log, dt_bias, nw, torch.randn(B, H, K, K, generator=gen)


@needs_triton
@pytest.mark.parametrize("act,wdt,tol", DTYPES, ids=DT_IDS)
def test_triton_gdn_decode(act, wdt, tol):
    gen = torch.Generator().manual_seed(0)
    B, H, K = 2, 6, 16
    proj, a_log, dt_bias, nw, S = gdn_inputs(B, H, K, gen)
    proj = proj.to(act).to(DEV)
    a_log, dt_bias, nw = (t.to(wdt).to(DEV) for t in (a_log, dt_bias, nw))
    states = [S.clone().to(DEV), S.clone().to(DEV)]
    out = kd._gdn_decode_triton(proj, a_log, dt_bias, states[0], nw, 1e-5, K ** -0.5, H, wdt)
    ref = kd.gdn_decode_ref(proj, a_log, dt_bias, states[1], nw, 1e-5, K ** -0.5, H, wdt)
    close(out, ref, max(tol, 0 if act == torch.float32 else 2e-2))  # as test_triton_gla_decode
    close(states[0], states[1], 1e-5)
    assert not torch.equal(states[0], S.to(DEV))


@pytest.mark.parametrize("impl", ["ref", pytest.param("triton", marks=needs_triton)])
def test_gdn_decode_equals_recurrence(impl):
    """fp32: T = 5 steps of gdn_decode (the reference, or the Triton kernel) from a random state, against
    kernels_gdn.gdn_recurrent_ref on the activations written out as method.md defines them, then o_norm and the
    gate: every output and the final state."""
    from kernels_gdn import gdn_recurrent_ref
    gen = torch.Generator().manual_seed(0)
    B, H, K, T = 2, 3, 16, 5
    _, a_log, dt_bias, nw, S0 = gdn_inputs(B, H, K, gen)
    projs = torch.stack([gdn_inputs(B, H, K, gen)[0] for _ in range(T)], 1)  # [B, T, 4 H K + 2 H]
    state, outs = S0.clone().to(DEV), []
    step = kd._gdn_decode_triton if impl == "triton" else kd.gdn_decode_ref
    for t in range(T):
        outs.append(step(projs[:, t].to(DEV), a_log.to(DEV), dt_bias.to(DEV), state, nw.to(DEV), 1e-5, K ** -0.5, H,
                         torch.float32).cpu())
    q, k, v, gate, a, b = projs.split([H * K] * 4 + [H, H], dim=-1)
    q, k, v, gate = (F.silu(x).view(B, T, H, K) for x in (q, k, v, gate))
    q, k = (x / (x.pow(2).sum(-1, keepdim=True) + 1e-6).sqrt() for x in (q, k))
    g = -a_log.exp() * F.softplus(a + dt_bias)
    o, S = gdn_recurrent_ref(q, k, v, g, torch.sigmoid(b), K ** -0.5, initial_state=S0, output_final_state=True)
    ref = nw * o / (o.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * gate  # [B, T, H, K]
    close(torch.stack(outs, 1), ref.reshape(B, T, H * K), 1e-5)
    close(state.cpu(), S, 1e-5)


def test_attend_split_choice():
    for L, rows in ((1090, 3), (32834, 24), (37, 2), (5000, 1)):
        split = kd.attend_split(L, rows, torch.device("cpu"))
        n = -(-L // split)
        assert split % kd.BN == 0 and 1 <= n <= kd.MAX_SPLITS and (n - 1) * split < L


# ------------------------------------------------------------------------------------------- the fused step

MODELS = {"teacher": (["attn"] * 3, "llama", False), "hybrid": (["attn", "gla", "gla", "attn"], "llama", True),
          "all-gla": (["gla"] * 3, "llama", False), "qwen2-bias": (["attn", "gla"], "qwen2", False),
          "qwen3-qknorm": (["gla", "attn"], "qwen3", True),
          "gdn-hybrid": (["gdn", "attn", "gla", "gdn"], "llama", True), "qwen2-gdn": (["attn", "gdn"], "qwen2", False)}


@pytest.mark.parametrize("name", list(MODELS))
def test_fused_step_equals_eager_step(name):
    """fp32, CPU: the fused step's logits and cache equal the eager step's over 6 steps; generation is the same."""
    mixers, arch, tie = MODELS[name]
    m = tiny(mixers, arch, tie)
    idx = tokens(2, 9)
    out = decode_both(m, idx, 6)
    (le, ce), (lf, cf) = out["eager"], out["fused"]
    assert (le - lf).abs().max() <= 1e-5 * le.abs().max()  # ~1e-7 with the references; ~1e-6 Triton (interpreted)
    assert_caches_equal(ce, cf, 1e-5)
    assert torch.equal(generate(m, idx, 8, decode="eager"), generate(m, idx, 8, decode="fused"))


@needs_triton
def test_triton_fused_step_equals_eager_step():
    """The fused step with the Triton kernels (interpreter on CPU): the eager step's logits, cache and greedy tokens
    (both are fed the eager step's tokens, so equal argmaxes are equal greedy generations)."""
    m = tiny(["attn", "gla", "gdn"], tie=True).to(DEV)
    idx = tokens(2, 9).to(DEV)
    out = decode_both(m, idx, 3)
    (le, ce), (lf, cf) = out["eager"], out["fused"]
    assert (le - lf).abs().max() < 1e-4 and torch.equal(le.argmax(-1), lf.argmax(-1))
    assert_caches_equal(ce, cf, 1e-5)


@pytest.mark.parametrize("impl", ["ref", pytest.param("triton", marks=needs_triton)])
def test_fused_step_rows_are_independent(impl):
    """Rows of different tokens: each row's logits from the fused step are those of the same row decoded alone
    (B = 1), and the eager step's, batched and alone (no mixing of rows; each row its own cache and state). The
    cache has one position for all rows (lm_eval_nanohybrid feeds a row with a shorter prompt its prompt tokens
    through the step), so the rows are fed fixed tokens: a one-token prefill, then the steps. The interpreter runs
    fewer rows and steps (each of its programs takes milliseconds)."""
    B, steps = (3, 5) if impl == "ref" else (2, 3)
    m = tiny(["attn", "gla", "gdn"]).to(DEV)
    idx = tokens(B, steps + 1, seed=2).to(DEV)

    def run(rows, mode):
        cache = m.new_cache(len(rows), steps + 2)
        with torch.no_grad():
            m(idx[rows, :1], cache=cache)
        step = decoder(m, cache, mode)
        return torch.stack([step(idx[rows, t:t + 1]) for t in range(1, steps + 1)], 1)  # [rows, steps, vocab]

    ref = run(list(range(B)), "eager")
    for mode in ("eager", "fused"):
        batch = run(list(range(B)), mode)
        assert (batch - ref).abs().max() <= 1e-5 * ref.abs().max(), mode
        for b in range(B):
            alone = run([b], mode)[0]
            assert (alone - batch[b]).abs().max() <= 1e-5 * batch[b].abs().max(), (mode, b)


def test_fused_step_compiles_fullgraph():
    """torch.compile traces the whole step without a graph break (the kernels are custom ops, their cache writes
    in place); aot_eager keeps the CPU test fast, a GPU runs inductor in test_gpu_fused_decoder_bf16."""
    m = tiny(["attn", "gla", "gdn"])
    idx = tokens(2, 9)
    logits = []
    for backend in (None, "aot_eager"):
        cache = m.new_cache(2, 16)
        with torch.no_grad():
            m(idx, cache=cache)
            plan = m.decode_plan(cache)
            step = m.fused_step if backend is None else torch.compile(m.fused_step, fullgraph=True, backend=backend)
            x, out = idx[:, -1:].contiguous(), []
            for _ in range(3):
                out.append(step(x, plan))
                x = out[-1].argmax(-1, keepdim=True)
        assert cache.pos_t.item() == 12
        logits.append((torch.stack(out), cache))
    assert (logits[0][0] - logits[1][0]).abs().max() < 1e-6
    assert_caches_equal(logits[0][1], logits[1][1], 1e-6)


def test_decoder_modes_and_fallback(monkeypatch):
    m = tiny(["attn", "gla"])
    cache = m.new_cache(1, 12)
    for mode in ("graph", "fused-cublas"):  # fused-cublas: the name "fused" had when a second fused mode existed
        with pytest.raises(ValueError, match="'eager' or 'fused'"):
            decoder(m, cache, mode)
    # a mixer fused_step has no branch for (a new kind, before its kernel exists) decodes with the eager step
    monkeypatch.setattr(M, "FUSED_MIXERS", ("attn",))
    monkeypatch.setattr(Transformer, "decode_plan", lambda *a: pytest.fail("the fused step was built"))
    idx = tokens(1, 5)
    ref = generate(m, idx, 4, decode="eager")
    assert torch.equal(generate(m, idx, 4, decode="fused"), ref)


def test_step_bytes():
    """The floor's numerator: weights once (a tied head once), K and V up to pos, GLA and GDN states read and
    written."""
    for tie in (False, True):
        m = tiny(["attn", "gla", "attn", "gdn"], tie=tie)
        params = sum(p.numel() for p in m.parameters())  # parameters() lists a tied matrix once
        weights = 4 * (params - (0 if tie else 97 * 80))  # an untied embedding is read only in B rows
        kv, state = 2 * 3 * 2 * 101 * 16 * 4, 2 * 3 * 6 * 16 * 16 * 4
        assert kd.step_bytes(m, 3, 100) == weights + 2 * kv + 2 * state


# ------------------------------------------------------------------------------------------- GPU: bf16, graphs

@needs_gpu
@pytest.mark.parametrize("compile", [
    False,
    # seen on an H200 (torch 2.11): recording the compiled step fails ("operation not permitted when stream is
    # capturing"); strict, so that a torch where it works says so
    pytest.param(True, marks=pytest.mark.xfail(strict=True, reason="compiled step not recordable (H200, torch 2.11)"))],
    ids=["fused", "compile"])
def test_gpu_fused_decoder_bf16(compile):
    """bf16 weights, both steps recorded as CUDA graphs: logits close, greedy tokens equal wherever the eager step's
    top-2 margin is not a tie at bf16 precision."""
    m = tiny(["attn", "gla", "gdn", "attn"]).to("cuda", torch.bfloat16)
    idx = tokens(3, 11).cuda()
    runs = []
    for mode in ("eager", "fused"):
        cache = m.new_cache(3, 40)
        with torch.no_grad():
            m(idx, cache=cache)
        step = decoder(m, cache, mode, compile=compile and mode != "eager")
        x, logits = idx[:, -1:], []
        for i in range(12):
            logits.append(step(x))
            x = logits[-1].argmax(-1, keepdim=True) if not runs else runs[0][i].argmax(-1, keepdim=True)
        assert cache.pos == cache.pos_t.item() == 23
        runs.append(torch.stack(logits))
    err = (runs[0] - runs[1]).abs().max().item()
    assert err < 3e-2 * runs[0].abs().max().item(), err
    top2 = runs[0].topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * err
    assert torch.equal(runs[0].argmax(-1)[clear], runs[1].argmax(-1)[clear])


@needs_gpu
def test_gpu_fused_decoder_autocast():
    """fp32 weights under bf16 autocast (eval's recall runs): the fused step follows the eager step's roundings."""
    m = tiny(["attn", "gla", "gdn", "attn"]).cuda()
    idx = tokens(3, 11).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = decode_both(m, idx, 8)
    (le, ce), (lf, cf) = out["eager"], out["fused"]
    assert (le - lf).abs().max() < 3e-2 * le.abs().max()
    assert_caches_equal(ce, cf, 3e-2)


def test_child_runs_triton_tests():
    if TRITON_HERE:
        pytest.skip("the Triton tests run in this process")
    run_triton_child(__file__)
