"""kernels_gdn.py against the token-by-token fp32 recurrence (gdn_recurrent_ref): output, final state and every
gradient (q, k, v, g, beta, initial state) of the Triton path and of the PyTorch chunked path, at odd lengths, K != V
and head sizes that are not powers of two, gates 0, -20 per step and mixed, beta 0, 1 and random, with and without an
initial state, q and k L2-normalised as the layer makes them; gdn_step against the chunked form; the recurrence
against the delta rule written with matrices; the refusal of head sizes the Triton path does not take.

The Triton path runs on CPU in triton's interpreter, which has to be on (TRITON_INTERPRET=1) before triton is first
imported, and must not leak into the other test modules (their CPU calls should take the fast PyTorch path). So,
unless this process already interprets or has a GPU, test_child_runs_triton_tests reruns the test_triton_* tests in a
child pytest with TRITON_INTERPRET=1. Alone: TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels_gdn.py
"""

import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import kernels_gdn  # noqa: E402
from conftest import assert_matches, outputs_and_grads, run_triton_child  # noqa: E402

torch.set_num_threads(1)
TRITON_HERE = kernels_gdn.INTERPRET or torch.cuda.is_available()
DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not TRITON_HERE, reason="runs in the TRITON_INTERPRET=1 child")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
NAMES = ["o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dh0"]


def gates(regime, B, T, H, gen):
    if regime == "zero":
        return torch.zeros(B, T, H)
    if regime == "neg20":  # every chunk fully decayed: exp(-20 * 64) underflows
        return torch.full((B, T, H), -20.0)
    if regime == "mixed":  # per step: no decay, or anything down to about -20
        strong = F.logsigmoid(torch.randn(B, T, H, generator=gen) * 4) * 5
        return torch.where(torch.rand(B, T, H, generator=gen) < 0.5, torch.zeros(B, T, H), strong)
    return F.logsigmoid(torch.randn(B, T, H, generator=gen))  # "model": mild decays, per head and step


def make(T, K, V, regime, beta, h0, dtype, B=1, H=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen)
    g = gates(regime, B, T, H, gen)
    b = {"zero": torch.zeros(B, T, H), "one": torch.ones(B, T, H)}.get(beta, torch.rand(B, T, H, generator=gen))
    h = torch.randn(B, H, K, V, generator=gen) if h0 else None
    do, dht = torch.randn(B, T, H, V, generator=gen), torch.randn(B, H, K, V, generator=gen)
    to = lambda x: None if x is None else x.to(DEV)  # noqa: E731
    return [to(x.to(dtype)) for x in (q, k, v)] + [to(g), to(b)], to(h), to(do), to(dht)


def check_against_reference(fn, T, K, V, regime, beta, h0, dtype):
    xs, h, do, dht = make(T, K, V, regime, beta, h0, dtype)
    ref = outputs_and_grads(kernels_gdn.gdn_recurrent_ref, [x.float() for x in xs], h, do, dht)
    got = outputs_and_grads(fn, xs, h, do, dht)
    assert_matches(got, ref, NAMES, TOL[dtype])


# T in {1, 17, 64, 100, 300}; K, V in {16, 64}, K != V, 60 x 100 (padded tiles, two blocks of V in the backward);
# gates; beta 0, 1, random; with/without initial state; fp32, bf16, fp16 (runs in fp32). The interpreter is slow, so
# each regime meets only a few shapes.
CASES = [
    (1, 16, 16, "mixed", "rand", True, torch.float32),
    (17, 16, 64, "mixed", "rand", False, torch.float32),
    (64, 16, 16, "zero", "one", True, torch.float32),
    (100, 64, 16, "neg20", "rand", True, torch.float32),
    (300, 16, 16, "mixed", "rand", True, torch.float32),
    (100, 16, 16, "model", "zero", True, torch.float32),
    (300, 16, 32, "model", "one", False, torch.float32),
    (65, 60, 100, "model", "rand", True, torch.float32),
    (100, 64, 64, "model", "rand", True, torch.bfloat16),
    (300, 16, 16, "mixed", "rand", True, torch.bfloat16),
    (17, 64, 64, "neg20", "one", False, torch.bfloat16),
    (100, 16, 64, "model", "rand", True, torch.float16),
]
IDS = [f"T{c[0]}-K{c[1]}-V{c[2]}-g{c[3]}-b{c[4]}-{'h0' if c[5] else 'noh0'}-{str(c[6])[6:]}" for c in CASES]


@needs_triton
@pytest.mark.parametrize("T,K,V,regime,beta,h0,dtype", CASES, ids=IDS)
def test_triton_matches_recurrence(T, K, V, regime, beta, h0, dtype):
    check_against_reference(kernels_gdn.chunk_gdn, T, K, V, regime, beta, h0, dtype)


@pytest.mark.parametrize("T,K,V,regime,beta,h0,dtype", CASES, ids=IDS)
def test_torch_chunked_matches_recurrence(T, K, V, regime, beta, h0, dtype):
    check_against_reference(kernels_gdn.chunk_gdn_torch, T, K, V, regime, beta, h0, dtype)


@pytest.mark.parametrize("triton_path", [False, pytest.param(True, marks=needs_triton)], ids=["torch", "triton"])
def test_no_nan_when_everything_decays(triton_path):
    xs, h, _, _ = make(130, 16, 16, "zero", "rand", True, torch.float32)
    xs[3] = torch.full_like(xs[3], -1e4)  # exp underflows to 0 in every term
    fn = kernels_gdn.chunk_gdn if triton_path else kernels_gdn.chunk_gdn_torch
    outs = outputs_and_grads(fn, xs, h, torch.ones_like(xs[2]), torch.ones_like(h))
    assert all(torch.isfinite(x).all() for x in outs)


def step_by_step(xs, h):
    q, k, v, g, beta = xs
    o, S = [], h
    for t in range(q.shape[1]):
        o_t, S = kernels_gdn.gdn_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], S)
        o.append(o_t)
    return torch.stack(o, 1), S


@pytest.mark.parametrize("triton_path", [False, pytest.param(True, marks=needs_triton)], ids=["torch", "triton"])
def test_gdn_step_equals_chunked(triton_path):
    xs, h, _, _ = make(70, 16, 32, "model", "rand", True, torch.float32)
    o_step, S_step = step_by_step(xs, h)
    fn = kernels_gdn.chunk_gdn if triton_path else kernels_gdn.chunk_gdn_torch
    o, S = fn(*xs, initial_state=h, output_final_state=True)
    assert (o - o_step).norm() / o_step.norm() < 1e-5
    assert (S - S_step).norm() / S_step.norm() < 1e-5


def test_recurrence_is_the_delta_rule():
    """gdn_recurrent_ref (hence gdn_step) against method.md's second form, S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1}
    + beta_t k_t v_t^T, with the matrices written out in float64; and a key written with beta = 1 is read back
    exactly: the delta rule replaces the value stored under a unit key."""
    xs, h, _, _ = make(9, 8, 5, "model", "rand", True, torch.float64)
    xs, h = [x.double() for x in xs], h.double()
    q, k, v, g, beta = xs
    S, want = h.clone(), []
    for t in range(9):
        kt = k[:, t, :, :, None]  # [B, H, K, 1]
        P = torch.eye(8, dtype=torch.float64) - beta[:, t, :, None, None] * kt @ kt.transpose(-1, -2)
        S = g[:, t].exp()[..., None, None] * P @ S + beta[:, t, :, None, None] * kt @ v[:, t, :, None, :]
        want.append(8 ** -0.5 * (q[:, t, :, None, :] @ S)[..., 0, :])
    o, ht = kernels_gdn.gdn_recurrent_ref(*xs, initial_state=h, output_final_state=True)
    assert torch.allclose(o, torch.stack(want, 1), atol=1e-12) and torch.allclose(ht, S, atol=1e-12)
    k1, v1 = k[:, 0], v[:, 0]
    _, S1 = kernels_gdn.gdn_step(q[:, 0], k1, v1, torch.zeros_like(g[:, 0]), torch.ones_like(beta[:, 0]), h)
    assert torch.allclose((k1[..., None, :] @ S1)[..., 0, :], v1, atol=1e-12)


def test_recurrence_matches_flas_reference():
    """The interface convention (state [K, V], scale, g and beta per head) is fla's: its naive recurrence agrees."""
    naive = pytest.importorskip("fla.ops.gated_delta_rule.naive").naive_recurrent_gated_delta_rule
    (q, k, v, g, beta), h, _, _ = make(50, 16, 24, "model", "rand", True, torch.float32, B=2, H=3)
    o, ht = kernels_gdn.gdn_recurrent_ref(q, k, v, g, beta, initial_state=h, output_final_state=True)
    o_fla, ht_fla = naive(q, k, v, beta, g, initial_state=h, output_final_state=True)  # note: beta before g
    assert (o - o_fla).abs().max() < 1e-5 and (ht - ht_fla).abs().max() < 1e-5


@needs_triton
def test_triton_refuses_big_heads_before_compiling(monkeypatch):
    def launched(*args):
        raise AssertionError("a Triton kernel was reached")
    monkeypatch.setattr(kernels_gdn.ChunkGDNFunction, "apply", launched)
    for K, V in ((160, 64), (64, 129)):
        xs, _, _, _ = make(3, K, V, "model", "rand", False, torch.float32)
        with pytest.raises(ValueError, match=r"head sizes K, V from 1 to 128 .*K=%d, V=%d" % (K, V)):
            kernels_gdn.chunk_gdn(*xs)


def test_cpu_dispatch_is_torch_path():
    if kernels_gdn.INTERPRET:
        pytest.skip("this process interprets: CPU tensors take the Triton path")
    xs, h, _, _ = make(70, 16, 16, "model", "rand", True, torch.float32)
    xs = [x.cpu() for x in xs]
    a = kernels_gdn.chunk_gdn(*xs, initial_state=h.cpu(), output_final_state=True)
    b = kernels_gdn.chunk_gdn_torch(*xs, initial_state=h.cpu(), output_final_state=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_child_runs_triton_tests():
    if TRITON_HERE:
        pytest.skip("the Triton tests run in this process")
    run_triton_child(__file__)


def test_bench_flags():  # kernels_gdn.py's flags: parsed before any GPU work
    for argv in (["--shapes"], ["--check=maybe"], ["--fla=sometimes"], ["--shape=1"], ["--shapes=7"]):
        with pytest.raises(SystemExit, match=r"expected --key=value|unknown key|takes true or false|0\.\.6"):
            kernels_gdn.main(argv)
