"""kernels.py against the token-by-token fp32 recurrence (gla_recurrent_ref): output, final state and every
gradient (q, k, v, g, initial state) of the Triton path and of the PyTorch chunked path, at odd lengths, K != V,
gates 0, -20 per step, mixed, steady (-0.5 to -2.5), mid (-0.2 to -0.6) and alternating by sub-chunk, with and
without an initial state; gla_step against the chunked form.

The Triton path runs on CPU in triton's interpreter, which has to be on (TRITON_INTERPRET=1) before triton is first
imported, and must not leak into the other test modules (their CPU calls should take the fast PyTorch path). So,
unless this process already interprets or has a GPU, test_child_runs_triton_tests reruns the test_triton_* tests in a
child pytest with TRITON_INTERPRET=1. Alone: TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels.py
"""

import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import kernels  # noqa: E402
from conftest import assert_matches, outputs_and_grads, run_triton_child  # noqa: E402

TRITON_HERE = kernels.INTERPRET or torch.cuda.is_available()
DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not TRITON_HERE, reason="runs in the TRITON_INTERPRET=1 child")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
NAMES = ["o", "final_state", "dq", "dk", "dv", "dg", "dh0"]


def gates(regime, B, T, H, K, gen):
    if regime == "zero":
        return torch.zeros(B, T, H, K)
    if regime == "neg20":  # every chunk fully decayed: exp(-20 * 64) underflows
        return torch.full((B, T, H, K), -20.0)
    if regime == "mixed":  # per element: no decay, or anything down to about -20
        strong = F.logsigmoid(torch.randn(B, T, H, K, generator=gen) * 4) * 5
        return torch.where(torch.rand(B, T, H, K, generator=gen) < 0.5, torch.zeros(B, T, H, K), strong)
    if regime == "steady":  # -0.5 to -2.5 per step, as a trained student's fast channels: every chunk decays past
        # 2^-64 (the sub-chunk path), but no sub-chunk of 16 does (its factorized form)
        return -0.5 - 2 * torch.rand(B, T, H, K, generator=gen)
    if regime == "mid":  # -0.2 to -0.6 per step: bf16 chunks of 64 stay unflagged (the chunk form, whose dg once
        # summed terms that cancel, 2% off); fp32 chunks are flagged, their sub-chunks factorized
        return -0.2 - 0.4 * torch.rand(B, T, H, K, generator=gen)
    if regime == "alt":  # sub-chunks of 16 alternate -0.3 and -6 per step: loop and factorized ones in one chunk
        t = torch.arange(T)[None, :, None, None]
        return torch.where((t // 16) % 2 == 0, -0.3, -6.0).expand(B, T, H, K).clone()
    if regime == "ramp":  # mild for two chunks (factorized path), then -20 per step (exact path)
        return torch.where(torch.arange(T)[None, :, None, None] < 128, -0.01, -20.0).expand(B, T, H, K).clone()
    return F.logsigmoid(torch.randn(B, T, H, K, generator=gen)) / 16  # the model's gates


def make(T, K, V, regime, h0, dtype, B=1, H=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, H, K, generator=gen), torch.randn(
        B, T, H, V, generator=gen)
    g = gates(regime, B, T, H, K, gen)
    h = torch.randn(B, H, K, V, generator=gen) if h0 else None
    do, dht = torch.randn(B, T, H, V, generator=gen), torch.randn(B, H, K, V, generator=gen)
    to = lambda x: None if x is None else x.to(DEV)  # noqa: E731
    return [to(x.to(dtype)) for x in (q, k, v, g)], to(h), to(do), to(dht)


def check_against_reference(fn, T, K, V, regime, h0, dtype):
    xs, h, do, dht = make(T, K, V, regime, h0, dtype)
    ref = outputs_and_grads(kernels.gla_recurrent_ref, [x.float() for x in xs], h, do, dht)
    got = outputs_and_grads(fn, xs, h, do, dht)
    assert_matches(got, ref, NAMES, TOL[dtype])


# T in {1, 17, 64, 100, 300}; K, V in {16, 64}, K != V, 60 and 100 (zero-padded by chunk_gla); regimes; with/without
# initial state; fp32 and bf16.
# The interpreter is slow, so each regime meets only a few shapes.
CASES = [
    (1, 16, 16, "mixed", True, torch.float32),
    (17, 16, 64, "mixed", False, torch.float32),
    (64, 16, 16, "zero", True, torch.float32),
    (100, 64, 16, "neg20", True, torch.float32),
    (300, 16, 16, "ramp", True, torch.float32),
    (300, 16, 16, "model", False, torch.float32),
    (150, 16, 32, "steady", True, torch.float32),
    (200, 64, 16, "steady", True, torch.bfloat16),
    (150, 16, 32, "mid", True, torch.float32),
    (64, 64, 64, "mid", True, torch.bfloat16),
    (64, 128, 128, "mid", True, torch.bfloat16),  # unflagged bf16 at 128 x 128: the chunk backward's scan for dg
    (129, 32, 16, "alt", False, torch.bfloat16),
    (100, 64, 64, "model", True, torch.bfloat16),
    (300, 16, 16, "mixed", True, torch.bfloat16),
    (17, 64, 64, "neg20", False, torch.bfloat16),
    (100, 16, 64, "model", True, torch.float16),
    (70, 60, 100, "model", True, torch.float32),  # head sizes that are not powers of two (fla's tests use 60, 100)
    (40, 100, 60, "mixed", False, torch.bfloat16),
    (40, 128, 128, "mid", True, torch.float32),  # fp32 at 128 x 128: every chunk on the sub-chunk path (_sub_only)
]
IDS = [f"T{c[0]}-K{c[1]}-V{c[2]}-{c[3]}-{'h0' if c[4] else 'noh0'}-{str(c[5])[6:]}" for c in CASES]


@needs_triton
@pytest.mark.parametrize("T,K,V,regime,h0,dtype", CASES, ids=IDS)
def test_triton_matches_recurrence(T, K, V, regime, h0, dtype):
    check_against_reference(kernels.chunk_gla, T, K, V, regime, h0, dtype)


@pytest.mark.parametrize("T,K,V,regime,h0,dtype", CASES, ids=IDS)
def test_torch_chunked_matches_recurrence(T, K, V, regime, h0, dtype):
    check_against_reference(kernels.chunk_gla_torch, T, K, V, regime, h0, dtype)


@needs_triton
def test_triton_no_nan_when_everything_decays():
    xs, h, _, _ = make(130, 16, 16, "zero", True, torch.float32)
    xs[3] = torch.full_like(xs[3], -1e4)  # exp underflows to 0 in every term
    outs = outputs_and_grads(kernels.chunk_gla, xs, h, torch.ones_like(xs[2]), torch.ones_like(h))
    assert all(torch.isfinite(x).all() for x in outs)


def test_torch_no_nan_when_everything_decays():
    xs, h, _, _ = make(130, 16, 16, "zero", True, torch.float32)
    xs[3] = torch.full_like(xs[3], -1e4)
    outs = outputs_and_grads(kernels.chunk_gla_torch, xs, h, torch.ones_like(xs[2]), torch.ones_like(h))
    assert all(torch.isfinite(x).all() for x in outs)


def step_by_step(xs, h):
    q, k, v, g = xs
    o, S = [], h
    for t in range(q.shape[1]):
        o_t, S = kernels.gla_step(q[:, t], k[:, t], v[:, t], g[:, t], S)
        o.append(o_t)
    return torch.stack(o, 1), S


@pytest.mark.parametrize("triton_path", [False, pytest.param(True, marks=needs_triton)], ids=["torch", "triton"])
def test_gla_step_equals_chunked(triton_path):
    xs, h, _, _ = make(70, 16, 32, "model", True, torch.float32)
    o_step, S_step = step_by_step(xs, h)
    fn = kernels.chunk_gla if triton_path else kernels.chunk_gla_torch
    o, S = fn(*xs, initial_state=h, output_final_state=True)
    assert (o - o_step).norm() / o_step.norm() < 1e-5
    assert (S - S_step).norm() / S_step.norm() < 1e-5


@needs_triton
def test_triton_refuses_big_heads_before_compiling(monkeypatch):
    def launched(*args):
        raise AssertionError("a Triton kernel was reached")
    monkeypatch.setattr(kernels.ChunkGLAFunction, "apply", launched)
    for K, V in ((160, 64), (64, 256)):
        xs, _, _, _ = make(3, K, V, "model", False, torch.float32)
        with pytest.raises(ValueError, match=r"head sizes K, V from 1 to 128 .*K=%d, V=%d" % (K, V)):
            kernels.chunk_gla(*xs)


def test_cpu_dispatch_is_torch_path():
    if kernels.INTERPRET:
        pytest.skip("this process interprets: CPU tensors take the Triton path")
    xs, h, _, _ = make(70, 16, 16, "model", True, torch.float32)
    xs = [x.cpu() for x in xs]
    a = kernels.chunk_gla(*xs, initial_state=h.cpu(), output_final_state=True)
    b = kernels.chunk_gla_torch(*xs, initial_state=h.cpu(), output_final_state=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_child_runs_triton_tests():
    if TRITON_HERE:
        pytest.skip("the Triton tests run in this process")
    run_triton_child(__file__)


def test_bench_shapes_flag():  # kernels.py --shapes=...: parsed before any GPU work
    assert kernels._bench_shapes(kernels.BenchConfig().shapes) == kernels.SHAPES
    assert kernels._bench_shapes("small") == kernels.SHAPES[:4]
    assert kernels._bench_shapes("4,5,6") == kernels.SHAPES[4:7]
    assert kernels._bench_shapes("6,0") == [kernels.SHAPES[6], kernels.SHAPES[0]]
    for bad in ("7", "-1", "1,,2", "", "big", "1.5"):
        with pytest.raises(SystemExit, match=r"0\.\.6"):
            kernels._bench_shapes(bad)
    for argv in (["--shapes"], ["--json"], ["--no-fla"], ["--shape=1"], ["--fla=maybe"]):  # bad flags: no GPU work
        with pytest.raises(SystemExit, match=r"expected --key=value|unknown key|takes true or false"):
            kernels.main(argv)


def test_bench_gates():  # --gates=trained must time the sub-chunk path: every chunk flagged, its sub-chunks factorized
    g2 = kernels.bench_gates("trained", 2, 256, 3, 64, device="cpu").float() * 1.4426950408889634  # base 2
    chunks = g2.view(2, 4, 64, 3, 64)
    assert (chunks.sum(2).amin(-1) < kernels._precision(g2.bfloat16())["FAST"]).all()  # each chunk, some channel
    assert g2.min() >= kernels._precision(g2.bfloat16())["FAST"] / kernels.BC  # no sub-chunk takes the loop
    mild = kernels.bench_gates("model", 2, 256, 3, 64, device="cpu").float() * 1.4426950408889634
    assert (mild.view(2, 4, 64, 3, 64).sum(2) > -64).all()  # the model's initial gates: the chunk form
    with pytest.raises(SystemExit, match="--gates=fast: expected model or trained"):
        kernels.main(["--gates=fast"])
