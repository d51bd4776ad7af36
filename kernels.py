"""
Gated linear attention (GLA): a chunked Triton kernel, forward and backward, beside its PyTorch references.

One head, per token t: q_t, k_t, g_t in R^K, v_t in R^V, the state S in R^{K x V} is fp32, and g_t <= 0 is a
log-decay per key channel (the model uses logsigmoid(.)/16):

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t          o_t = scale * q_t S_t          (scale = K^-0.5)

Token by token (gla_recurrent_ref; gla_step decodes this way) it is T rank-1 updates: no matrix units. Cut the sequence
into chunks of BT = 64 tokens. In one chunk, with rows i, j = 0..BT-1, the state S entering it, and the cumulative
log-gate b_i = g_0 + ... + g_i (per channel, decreasing, <= 0), unrolling the recurrence gives

    o_i    = scale * [ (q_i * exp(b_i)) S + sum_{j<=i} A_ij v_j ]      A_ij = sum_c q_ic k_jc exp(b_ic - b_jc)
    S_next = exp(b_L) * S + sum_j (k_j * exp(b_L - b_j))^T v_j         b_L = b of the last row: the chunk's decay

Every exponent above is <= 0 (b_i; b_L - b_j; b_i - b_j with i >= j), and that is what keeps it finite: a gate of
-20 per step gives b = -1280 within one chunk, so exp(-b) overflows and exp(b) underflows. The textbook trick writes
the intra-chunk matrix as one matmul, A = (q * exp(b)) (k * exp(-b))^T, i.e. a tiny number times an infinite one.
We use that factorization only where it is bounded: when the chunk decays by less than 2^64 in every channel
(b >= -64 ln 2; a trained gate logsigmoid(x)/16 needs x < -11 on average to break it), the factors lie within 2^+-64
of q and k, which fp32 and bf16 hold, and the entries i < j it also produces (up to 2^64 |q||k|) are finite and masked
away. Otherwise that chunk takes the exact path: a loop over key rows j that builds column j of exp(b_i - b_j) for
i >= j only (others -> 0). The choice is made per chunk at run time; tests drive both.

Forward = three launches. (1) _local_state_kernel, parallel over (chunk, head): X_n = (k * exp(b_L - b))^T v, the
state chunk n leaves from a zero start, and its decay b_L. (2) _state_scan_kernel: the only sequential part, and only
elementwise on K x V: S_{n+1} = exp(b_L,n) * S_n + X_n, loading U chunks at a time so that their loads overlap;
it writes the state entering each chunk and the final state.
(3) _chunk_output_kernel, parallel over (chunk, head): o from the formula above, A computed in registers.

Backward. The forward saves only its inputs; the backward recomputes the chunk states with (1) and (2) (a re-read of
k, v, g) instead of keeping NT x K x V per head alive between the passes. Kernel (1), given do, also forms the local
terms of the state gradient, which runs the same recurrence backwards: with dS_n = dL/d(state leaving chunk n),
dS_{n-1} = exp(b_L,n) * dS_n + scale (q * exp(b))_n^T do_n, from dS_{NT-1} = d(final state); its last step is
d(initial_state). Then _chunk_bwd_kernel, per chunk, with dA_ij = do_i . v_j (i >= j):

    dq_i = scale [ (do_i S^T) * exp(b_i) + sum_{j<=i} dA_ij k_j exp(b_i - b_j) ]
    dk_j = (v_j dS^T) * exp(b_L - b_j) + scale sum_{i>=j} dA_ij q_i exp(b_i - b_j)
    dv_j = scale sum_{i>=j} A_ij do_i + (k_j * exp(b_L - b_j)) dS

The gate gradient: g_t enters b_i for every i >= t of its chunk, so dg_t = sum_{i>=t} dL/db_i, and the usual form
dL/db_i = q_i dq_i - k_i dk_i (+ the exp(b_L) terms at i = L) counts every term exp(b_i - b_j) once with + and once
with -. The i = j terms are exp(0) = 1: they cancel in exact arithmetic, but in floats they leave noise of size
|q k dA| where the true dg is exp(-20) smaller. So dg_t sums only the terms whose exponent really contains g_t:

    dg_t = sum_{i>=t} q_i (dq_i - diag_i) - sum_{j>=t} k_j (dk_j^intra - diag_j) + sum_{j<t} k_j dk_j^inter
           + exp(b_L) * rowsum(S * dS)

Inside the kernels exponents are base 2 (g * log2 e, then exp2). On CUDA tensors chunk_gla runs Triton; on CPU it runs
chunk_gla_torch (the same three steps in PyTorch, autograd for the backward) unless TRITON_INTERPRET=1 was set before
triton was first imported: then the Triton kernels run in the interpreter (that is how CI tests them).

    python -m pytest -q tests/test_kernels.py             # CPU: PyTorch path + Triton interpreter (child process)
    python kernels.py --shapes=small --no-fla             # GPU benchmark: ms of ours, fla, SDPA; --json=path
"""

import json
import math
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

BT = 64  # chunk length (method.md)
# The Triton path on CPU needs the interpreter, which triton fixes when it is first imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_INTERP = tl.constexpr(INTERPRET)


# ----------------------------------------------------------------------------- references (PyTorch)

def gla_recurrent_ref(q, k, v, g, scale=None, initial_state=None, output_final_state=False):
    """Token-by-token recurrence in fp32: the ground truth every other path is tested against."""
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    q, k, v, g = (x.float().transpose(1, 2) for x in (q, k, v, g))  # [B, H, T, D]
    S = q.new_zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state.float()
    o = []
    for t in range(T):
        S = g[:, :, t, :, None].exp() * S + k[:, :, t, :, None] * v[:, :, t, None, :]
        o.append(scale * (q[:, :, t, None, :] @ S).squeeze(2))
    return torch.stack(o, 1), (S if output_final_state else None)


def gla_step(q, k, v, g, state, scale=None):
    """One decoding step: q, k, g [B, H, K], v [B, H, V], state fp32 [B, H, K, V] -> (o [B, H, V], new state)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    state = g.float().exp()[..., None] * state + k.float()[..., None] * v.float()[..., None, :]
    o = scale * (q.float()[..., None, :] @ state).squeeze(-2)
    return o.to(q.dtype), state


def chunk_gla_torch(q, k, v, g, scale=None, initial_state=None, output_final_state=False):
    """The chunked form in PyTorch (the CPU path): local states, a scan over chunks, then the outputs."""
    B, T, H, K = q.shape
    V, NT, dtype = v.shape[-1], triton.cdiv(T, BT), q.dtype
    scale = K ** -0.5 if scale is None else scale

    def chunks(x):  # [B, T, H, D] -> [B, H, NT, BT, D] fp32; padded rows are 0 (g = 0 there: no decay, no content)
        return F.pad(x.float(), (0, 0, 0, 0, 0, NT * BT - T)).view(B, NT, BT, H, -1).permute(0, 3, 1, 2, 4)

    q, k, v = chunks(q) * scale, chunks(k), chunks(v)
    # Gate arithmetic in float64: exponents are differences of cumulative sums that reach |b| ~ 1e3 (fp32 would lose
    # 1e-4 of them), and autograd's dg adds and subtracts every exp(b_i - b_j) term, exp(0) = 1 on the diagonal.
    b = chunks(g).double().cumsum(-2)  # [B, H, NT, BT, K]
    bL = b[..., -1:, :]

    def ex(x):
        return x.exp().float()

    # 1. each chunk's own contribution to the state it leaves
    X = (k * ex(bL - b)).transpose(-1, -2) @ v  # [B, H, NT, K, V]
    # 2. the sequential pass over chunks
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.float()
    states = []
    for n in range(NT):
        states.append(S)
        S = ex(bL[:, :, n, 0, :, None]) * S + X[:, :, n]
    # 3. outputs: inter-chunk through the entering state + intra-chunk attention A
    causal = torch.ones(BT, BT, dtype=torch.bool, device=q.device).tril()
    if b.min() >= -64 * math.log(2):  # bounded factorization (docstring)
        A = ((q * ex(b)) @ (k * ex(-b)).transpose(-1, -2)).masked_fill(~causal, 0)
    else:  # exact: exp(b_i - b_j) for i >= j only
        E = ex((b[..., :, None, :] - b[..., None, :, :]).masked_fill(~causal[..., None], -math.inf))
        A = torch.einsum("...ic,...jc,...ijc->...ij", q, k, E)
    o = (q * ex(b)) @ torch.stack(states, 2) + A @ v
    o = o.permute(0, 2, 3, 1, 4).reshape(B, NT * BT, H, V)[:, :T]
    return o.to(dtype), (S if output_final_state else None)


# ----------------------------------------------------------------------------- Triton kernels

@triton.jit
def _tile(x, n, bh, T, H, D: tl.constexpr, BT: tl.constexpr):
    """Pointers and row mask of chunk n of head bh of a contiguous [B, T, H, D] tensor x: a [BT, D] tile."""
    r = tl.arange(0, BT)
    x += ((bh // H) * T + n * BT).to(tl.int64) * H * D + (bh % H) * D  # 64-bit base, 32-bit offsets within
    return x + r[:, None] * (H * D) + tl.arange(0, D)[None, :], (n * BT + r)[:, None] < T


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    # fp32 accumulation; PREC = "ieee" for fp32 inputs (tf32 would miss the 1e-5 tests). The triton 3.9 interpreter
    # multiplies bf16 tiles as their raw uint16 bits, so there the operands go up to fp32 (bf16 products are exact).
    if _INTERP:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _cast(x, dt: tl.constexpr):
    # The triton 3.9 interpreter rounds fp32 -> bf16 toward zero, GPUs to nearest even: round here first, so that
    # the CPU tests see the GPU's precision.
    if _INTERP:
        if dt == tl.bfloat16:
            u = x.to(tl.uint32, bitcast=True)
            x = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return x.to(dt)


@triton.jit
def _log2_gates(g, n, bh, T, H, K: tl.constexpr, BT: tl.constexpr):
    # rows past T read g = 0: the decay stays flat, so b of row BT-1 is the decay of the chunk's real rows
    pg, m = _tile(g, n, bh, T, H, K, BT)
    return tl.load(pg, mask=m, other=0.).to(tl.float32) * 1.4426950408889634  # [BT, K], base 2


@triton.jit
def _suffix(g2):
    """b_L - b_i = g_{i+1} + ... + g_L (<= 0), summed from the end: the row L is exactly 0 and the rows near it, the
    terms that matter, are exact to their own size, not to |b_L| as the difference of two cumulative sums would be."""
    return tl.cumsum(g2, axis=0, reverse=True) - g2


@triton.jit
def _local_state_kernel(q, k, v, g, do, X, dX, bLs, scale, T, H, K: tl.constexpr, V: tl.constexpr,
                        BT: tl.constexpr, WITH_DO: tl.constexpr, PREC: tl.constexpr):
    """Per (chunk, head): X = (k * 2^(b_L - b))^T v and b_L; with do also dX = scale (q * 2^b)^T do."""
    n, bh = tl.program_id(0), tl.program_id(1)
    pk, m = _tile(k, n, bh, T, H, K, BT)
    pv, _ = _tile(v, n, bh, T, H, V, BT)
    g2 = _log2_gates(g, n, bh, T, H, K, BT)
    bL = tl.sum(g2, axis=0)  # [K]
    v_ = tl.load(pv, mask=m, other=0.)  # [BT, V]
    kl = tl.load(pk, mask=m, other=0.).to(tl.float32) * tl.exp2(_suffix(g2))  # [BT, K]
    i = bh.to(tl.int64) * tl.cdiv(T, BT) + n
    kv = tl.arange(0, K)[:, None] * V + tl.arange(0, V)[None, :]
    tl.store(X + i * K * V + kv, _dot(tl.trans(_cast(kl, v_.dtype)), v_, PREC))
    tl.store(bLs + i * K + tl.arange(0, K), bL)
    if WITH_DO:
        pq, _ = _tile(q, n, bh, T, H, K, BT)
        pdo, _ = _tile(do, n, bh, T, H, V, BT)
        qe = tl.load(pq, mask=m, other=0.).to(tl.float32) * scale * tl.exp2(tl.cumsum(g2, axis=0))  # [BT, K]
        do_ = tl.load(pdo, mask=m, other=0.)  # [BT, V]
        tl.store(dX + i * K * V + kv, _dot(tl.trans(_cast(qe, do_.dtype)), do_, PREC))


@triton.jit
def _state_scan_kernel(X, bLs, init, out, final, NT, NS, K: tl.constexpr, V: tl.constexpr, BKV: tl.constexpr,
                       U: tl.constexpr, REVERSE: tl.constexpr, HAS_INIT: tl.constexpr):
    """carry <- 2^bL[n] * carry + X[n] over chunks n (descending if REVERSE) for BKV elements of the flattened K x V
    state. out[slot] gets the carry before chunk n (slot n) and after it (slot n + 1, or n - 1 if REVERSE), where
    0 <= slot < NS; final gets the carry at the end. U chunks are loaded at once so their loads overlap."""
    pid, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    e = pid * BKV + tl.arange(0, BKV)  # [BKV] elements of the state
    u = tl.arange(0, U)
    if HAS_INIT:
        carry = tl.load(init + bh * K * V + e)
    else:
        carry = tl.zeros([BKV], dtype=tl.float32)
    if REVERSE:
        tl.store(out + (bh * NS + NT - 1) * K * V + e, _cast(carry, out.dtype.element_ty))
    else:
        tl.store(out + bh * NS * K * V + e, _cast(carry, out.dtype.element_ty))
    for m0 in range(0, NT, U):
        m = m0 + u
        if REVERSE:
            n = NT - 1 - m
            slot = n - 1
        else:
            n = m
            slot = n + 1
        ok = (m < NT)[:, None]
        x = tl.load(X + (bh * NT + n)[:, None] * K * V + e[None, :], mask=ok, other=0.)  # [U, BKV]
        # steps past the end get decay 2^0 = 1 and x = 0: the identity, so the carry ends as the final state
        a = tl.exp2(tl.load(bLs + (bh * NT + n)[:, None] * K + (e // V)[None, :], mask=ok, other=0.))
        states = tl.zeros([U, BKV], dtype=tl.float32)
        for j in tl.static_range(U):  # row j of a tile is a masked sum (in-thread: rows are in each thread)
            pick = (u == j)[:, None]
            carry = tl.sum(tl.where(pick, a, 0.), axis=0) * carry + tl.sum(tl.where(pick, x, 0.), axis=0)
            states = tl.where(pick, carry[None, :], states)  # [U, BKV] carry after each chunk
        tl.store(out + (bh * NS + slot)[:, None] * K * V + e[None, :], _cast(states, out.dtype.element_ty),
                 mask=ok & (slot >= 0)[:, None] & (slot < NS)[:, None])
    tl.store(final + bh * K * V + e, carry)


@triton.jit
def _chunk_output_kernel(q, k, v, g, S, o, scale, T, H, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                         PREC: tl.constexpr, FAST: tl.constexpr):
    """Per (chunk, head): o = (q * 2^b) S + A v, A the causal intra-chunk attention with per-channel decay."""
    n, bh = tl.program_id(0), tl.program_id(1)
    pq, m = _tile(q, n, bh, T, H, K, BT)
    pk, _ = _tile(k, n, bh, T, H, K, BT)
    b = tl.cumsum(_log2_gates(g, n, bh, T, H, K, BT), axis=0)  # [BT, K]
    qe = tl.load(pq, mask=m, other=0.).to(tl.float32) * scale * tl.exp2(b)  # [BT, K]
    i = bh.to(tl.int64) * (tl.cdiv(T, BT) + 1) + n
    S_ = tl.load(S + i * K * V + tl.arange(0, K)[:, None] * V + tl.arange(0, V)[None, :])  # [K, V] entering state
    dt = S_.dtype
    acc = _dot(_cast(qe, dt), S_, PREC)  # [BT, V] inter-chunk
    t = tl.arange(0, BT)
    if tl.min(tl.min(b, axis=1), axis=0) >= FAST:  # bounded factorization
        ke = tl.load(pk, mask=m, other=0.).to(tl.float32) * tl.exp2(-b)  # [BT, K]
        A = _dot(_cast(qe, dt), tl.trans(_cast(ke, dt)), PREC)
    else:
        A = _attention_exact(pq, pk, m, g, n, bh, T, H, K, BT, scale)
    A = tl.where(t[:, None] >= t[None, :], A, 0.)
    pv, _ = _tile(v, n, bh, T, H, V, BT)
    acc += _dot(_cast(A, dt), tl.load(pv, mask=m, other=0.), PREC)  # [BT, BT] @ [BT, V]
    po, _ = _tile(o, n, bh, T, H, V, BT)
    tl.store(po, _cast(acc, o.dtype.element_ty), mask=m)


@triton.jit
def _decay_column(g2, t, s):
    """exp2(b_i - b_s) for i >= s, 0 above, [BT, K]: g_{s+1} + ... + g_i summed afresh from row s, because the
    difference of two cumulative sums would carry an error of eps * |b| (|b| reaches ~1800 at -20 per step)."""
    return tl.exp2(tl.where(t[:, None] >= s, tl.cumsum(tl.where(t[:, None] > s, g2, 0.), axis=0), -1e30))


@triton.jit
def _attention_exact(pq, pk, m, g, n, bh, T, H, K: tl.constexpr, BT: tl.constexpr, scale):
    """A [BT, BT] of one chunk without factorizing: a loop over key rows s. The tiles are loaded afresh here
    (cache hits), so that this rare path does not hold registers that the common one then lacks."""
    t = tl.arange(0, BT)
    g2 = _log2_gates(g, n, bh, T, H, K, BT)
    q_ = tl.load(pq, mask=m, other=0.).to(tl.float32) * scale  # [BT, K]
    k_ = tl.load(pk, mask=m, other=0.).to(tl.float32)  # [BT, K]
    A = tl.zeros([BT, BT], dtype=tl.float32)
    for s in range(BT):
        e = _decay_column(g2, t, s)  # [BT, K]
        k_s = tl.sum(tl.where(t[:, None] == s, k_, 0.), axis=0)  # [K] row s: a masked sum, registers have no index
        A = tl.where(t[None, :] == s, tl.sum(q_ * k_s[None, :] * e, axis=1)[:, None], A)
    return A


@triton.jit
def _chunk_bwd_kernel(q, k, v, g, do, S, dS, dq, dk, dv, dg, scale, T, H, K: tl.constexpr, V: tl.constexpr,
                      BT: tl.constexpr, PREC: tl.constexpr, FAST: tl.constexpr):
    """Per (chunk, head): dq, dk, dv, dg from the entering state S and dS, the gradient of the leaving state."""
    n, bh = tl.program_id(0), tl.program_id(1)
    NT = tl.cdiv(T, BT)
    pq, m = _tile(q, n, bh, T, H, K, BT)
    pk, _ = _tile(k, n, bh, T, H, K, BT)
    pv, _ = _tile(v, n, bh, T, H, V, BT)
    pdo, _ = _tile(do, n, bh, T, H, V, BT)
    t = tl.arange(0, BT)
    # intra-chunk: dA strictly causal, the diagonal (exponent 0) on its own, outside the dg sums (docstring)
    do_ = tl.load(pdo, mask=m, other=0.)  # [BT, V]
    v_ = tl.load(pv, mask=m, other=0.)  # [BT, V]
    dA = tl.where(t[:, None] > t[None, :], _dot(do_, tl.trans(v_), PREC), 0.)  # [BT, BT]
    dAd = tl.sum(do_.to(tl.float32) * v_.to(tl.float32), axis=1)  # [BT] diagonal of dA
    dt = v_.dtype
    b = tl.cumsum(_log2_gates(g, n, bh, T, H, K, BT), axis=0)  # [BT, K]
    eb = tl.exp2(b)
    qe = tl.load(pq, mask=m, other=0.).to(tl.float32) * scale * eb  # [BT, K]
    if tl.min(tl.min(b, axis=1), axis=0) >= FAST:  # bounded factorization
        ebn = tl.exp2(-b)
        ke = _cast(tl.load(pk, mask=m, other=0.).to(tl.float32) * ebn, dt)  # [BT, K]
        A = _dot(_cast(qe, dt), tl.trans(ke), PREC)
        dq_ = _dot(_cast(dA, dt), ke, PREC) * eb
        dk_ = _dot(tl.trans(_cast(dA, dt)), _cast(qe, dt), PREC) * ebn
    else:
        A, dq_, dk_ = _attention_bwd_exact(pq, pk, m, g, n, bh, T, H, K, BT, scale, dA)
    A = tl.where(t[:, None] >= t[None, :], A, 0.)
    dv_ = _dot(tl.trans(_cast(A, dt)), do_, PREC)  # [BT, V]
    # inter-chunk: through the entering state S and the leaving state's gradient dS
    kv = tl.arange(0, K)[:, None] * V + tl.arange(0, V)[None, :]
    S_ = tl.load(S + (bh.to(tl.int64) * (NT + 1) + n) * K * V + kv)  # [K, V]
    dS_ = tl.load(dS + (bh.to(tl.int64) * NT + n) * K * V + kv)  # [K, V]
    dq_ += _dot(do_, tl.trans(S_), PREC) * eb
    g2 = _log2_gates(g, n, bh, T, H, K, BT)
    el = tl.exp2(_suffix(g2))  # [BT, K]
    k_ = tl.load(pk, mask=m, other=0.).to(tl.float32)  # [BT, K]
    dkl = _dot(v_, tl.trans(dS_), PREC) * el  # [BT, K]
    dv_ += _dot(_cast(k_ * el, dt), dS_, PREC)
    q_ = tl.load(pq, mask=m, other=0.).to(tl.float32) * scale  # [BT, K]
    # dg: suffix sums of the intra terms without the diagonal, the strict prefix sum of the leaving-state terms (a
    # lower-triangular matmul: the j = t term is never added and then removed), the decay of the entering state
    dg_ = tl.cumsum(q_ * dq_ - k_ * dk_, axis=0, reverse=True)
    dg_ += _dot(tl.where(t[:, None] > t[None, :], 1., 0.), k_ * dkl, PREC)
    dg_ += (tl.exp2(tl.sum(g2, axis=0)) * tl.sum(S_.to(tl.float32) * dS_.to(tl.float32), axis=1))[None, :]
    pdq, _ = _tile(dq, n, bh, T, H, K, BT)
    tl.store(pdq, _cast((dq_ + dAd[:, None] * k_) * scale, dq.dtype.element_ty), mask=m)
    pdk, _ = _tile(dk, n, bh, T, H, K, BT)
    tl.store(pdk, _cast(dk_ + dAd[:, None] * q_ + dkl, dk.dtype.element_ty), mask=m)
    pdv, _ = _tile(dv, n, bh, T, H, V, BT)
    tl.store(pdv, _cast(dv_, dv.dtype.element_ty), mask=m)
    pdg, _ = _tile(dg, n, bh, T, H, K, BT)
    tl.store(pdg, _cast(dg_, dg.dtype.element_ty), mask=m)


@triton.jit
def _attention_bwd_exact(pq, pk, m, g, n, bh, T, H, K: tl.constexpr, BT: tl.constexpr, scale, dA):
    """A and the strictly-causal intra parts of dq and dk, without factorizing (see _attention_exact)."""
    t = tl.arange(0, BT)
    g2 = _log2_gates(g, n, bh, T, H, K, BT)
    q_ = tl.load(pq, mask=m, other=0.).to(tl.float32) * scale  # [BT, K]
    k_ = tl.load(pk, mask=m, other=0.).to(tl.float32)  # [BT, K]
    A = tl.zeros([BT, BT], dtype=tl.float32)
    dq_ = tl.zeros([BT, K], dtype=tl.float32)
    dk_ = tl.zeros([BT, K], dtype=tl.float32)
    for s in range(BT):
        e = _decay_column(g2, t, s)  # [BT, K]
        k_s = tl.sum(tl.where(t[:, None] == s, k_, 0.), axis=0)  # [K]
        dA_s = tl.sum(tl.where(t[None, :] == s, dA, 0.), axis=1)  # [BT] column s of dA (0 at i = s)
        A = tl.where(t[None, :] == s, tl.sum(q_ * k_s[None, :] * e, axis=1)[:, None], A)
        dq_ += dA_s[:, None] * k_s[None, :] * e
        dk_ = tl.where(t[:, None] == s, tl.sum(dA_s[:, None] * q_ * e, axis=0)[None, :], dk_)
    return A, dq_, dk_


# ----------------------------------------------------------------------------- launchers and autograd

def _precision(v):
    """fp32: exact dots, and the factorized intra-chunk path only while |b| <= 16 (its factors carry an error of
    eps * |b| each); bf16: tensor-core dots, factorized while |b| <= 64 (bf16 rounding dominates anyway)."""
    return dict(PREC="ieee", FAST=-16.0) if v.dtype == torch.float32 else dict(PREC="tf32", FAST=-64.0)


def _warps(K, V):
    return 4 if K * V <= 64 * 64 else 8


def _states(q, k, v, g, scale, h0, do=None, dht=None):
    """Kernels (1) + (2). Returns S [B*H, NT+1, K, V] (state entering chunk n; slot NT = final) and the final
    state fp32; given do also dS [B*H, NT, K, V] (gradient of the state leaving chunk n) and d initial_state."""
    B, T, H, K = k.shape
    V, NT, dev = v.shape[-1], triton.cdiv(T, BT), k.device
    X = torch.empty(B * H, NT, K, V, device=dev, dtype=torch.float32)
    dX = torch.empty_like(X) if do is not None else X
    bLs = torch.empty(B * H, NT, K, device=dev, dtype=torch.float32)
    _local_state_kernel[(NT, B * H)](q, k, v, g, v if do is None else do, X, dX, bLs, scale, T, H, K=K, V=V, BT=BT,
                                     WITH_DO=do is not None, PREC=_precision(v)["PREC"], num_warps=_warps(K, V))
    S = torch.empty(B * H, NT + 1, K, V, device=dev, dtype=v.dtype)
    ht = torch.empty(B, H, K, V, device=dev, dtype=torch.float32)
    BKV = min(K * V, 512)
    grid = (K * V // BKV, B * H)
    _state_scan_kernel[grid](X, bLs, ht if h0 is None else h0, S, ht, NT, NT + 1, K=K, V=V, BKV=BKV, U=8,
                             REVERSE=False, HAS_INIT=h0 is not None, num_warps=4)
    if do is None:
        return S, ht
    dS = torch.empty(B * H, NT, K, V, device=dev, dtype=v.dtype)
    dh0 = torch.empty(B, H, K, V, device=dev, dtype=torch.float32)
    _state_scan_kernel[grid](dX, bLs, dh0 if dht is None else dht, dS, dh0, NT, NT, K=K, V=V, BKV=BKV, U=8,
                             REVERSE=True, HAS_INIT=dht is not None, num_warps=4)
    return S, ht, dS, dh0


class ChunkGLAFunction(torch.autograd.Function):
    """Triton forward and backward; q, k, v in one dtype (bf16 or fp32), g any float dtype, h0 fp32 or None."""

    @staticmethod
    def forward(ctx, q, k, v, g, scale, h0):
        q, k, v, g = (x.contiguous() for x in (q, k, v, g))
        h0 = None if h0 is None else h0.contiguous()
        B, T, H, K = q.shape
        S, ht = _states(q, k, v, g, scale, h0)
        o = torch.empty_like(v)
        _chunk_output_kernel[(triton.cdiv(T, BT), B * H)](
            q, k, v, g, S, o, scale, T, H, K=K, V=v.shape[-1], BT=BT,
            **_precision(v), num_warps=_warps(K, v.shape[-1]))
        ctx.save_for_backward(q, k, v, g, h0)
        ctx.scale = scale
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, h0 = ctx.saved_tensors
        B, T, H, K = q.shape
        do = torch.zeros_like(v) if do is None else do.contiguous()
        S, _, dS, dh0 = _states(q, k, v, g, ctx.scale, h0, do, None if dht is None else dht.contiguous())
        dq, dk, dv, dg = (torch.empty_like(x) for x in (q, k, v, g))
        _chunk_bwd_kernel[(triton.cdiv(T, BT), B * H)](
            q, k, v, g, do, S, dS, dq, dk, dv, dg, ctx.scale, T, H, K=K, V=v.shape[-1], BT=BT,
            **_precision(v), num_warps=8)
        return dq, dk, dv, dg, None, (dh0 if h0 is not None else None)


def chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False):
    """GLA over a sequence. q, k, g [B, T, H, K]; v [B, T, H, V]; g = log-decay (<= 0); K, V in {16, 32, 64, 128};
    initial_state fp32 [B, H, K, V] or None. Returns (o [B, T, H, V] in the input dtype, final state fp32 or None).
    Differentiable in q, k, v, g and initial_state. CUDA -> Triton, CPU -> PyTorch (Triton if INTERPRET)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if not (q.is_cuda or INTERPRET):
        return chunk_gla_torch(q, k, v, g, scale, initial_state, output_final_state)
    dtype = q.dtype
    # bf16 and fp32 run as they are; fp16 runs in fp32 (a state in fp16 overflows)
    cdt = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    h0 = None if initial_state is None else initial_state.float()
    o, ht = ChunkGLAFunction.apply(q.to(cdt), k.to(cdt), v.to(cdt), g, scale, h0)
    return o.to(dtype), (ht if output_final_state else None)


# ----------------------------------------------------------------------------- benchmark

SHAPES = [(8, 2048, 9, 64), (4, 4096, 9, 64), (2, 8192, 9, 64), (8, 2048, 16, 128), (4, 4096, 16, 128),
          (2, 16384, 16, 128), (1, 32768, 16, 128)]


def _bench_one(fn, inputs, do):
    """(ms forward, ms forward+backward) of fn(*inputs) -> o, with fresh inputs; n/a (None) on OOM."""
    from triton.testing import do_bench
    try:
        with torch.no_grad():
            fwd = do_bench(lambda: fn(*inputs))
        xs = [x.detach().requires_grad_() for x in inputs]
        fb = do_bench(lambda: fn(*xs).backward(do), grad_to_none=xs)
        return fwd, fb
    except torch.cuda.OutOfMemoryError:
        return None, None
    finally:
        torch.cuda.empty_cache()


def main(argv):
    args = dict(a.lstrip("-").split("=", 1) if "=" in a else (a.lstrip("-"), "1") for a in argv)
    shapes = SHAPES[:3] + SHAPES[3:4] if args.get("shapes") == "small" else SHAPES
    fla = None
    if "no-fla" not in args:
        try:
            from fla.ops.gla import chunk_gla as fla
        except ImportError:
            print("flash-linear-attention not importable: its columns are n/a")
    from triton.testing import do_bench
    src = torch.empty(2 ** 28, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)
    bw = 2 * src.numel() * 4 / (do_bench(lambda: dst.copy_(src)) * 1e-3)  # bytes/s of a device copy
    del src, dst
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"copy bandwidth {bw / 1e12:.2f} TB/s; ms (do_bench median), bf16, gates logsigmoid(randn)/16")
    cols = ["B", "T", "H", "D", "ours_fwd", "ours_fb", "fla_fwd", "fla_fb", "sdpa_fwd", "sdpa_fb", "ratio_fwd",
            "ratio_fb", "floor_fwd"]
    print(" ".join(f"{c:>9}" for c in cols))
    rows = []
    for B, T, H, D in shapes:
        row = dict(B=B, T=T, H=H, D=D)
        try:
            q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            g = (F.logsigmoid(torch.randn(B, T, H, D, device="cuda")) / 16).bfloat16()
            do = torch.randn_like(v)
            row["ours_fwd"], row["ours_fb"] = _bench_one(lambda *x: chunk_gla(*x)[0], (q, k, v, g), do)
            if fla is not None:
                row["fla_fwd"], row["fla_fb"] = _bench_one(lambda *x: fla(*x)[0], (q, k, v, g), do)
            qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # [B, H, T, D]
            row["sdpa_fwd"], row["sdpa_fb"] = _bench_one(
                lambda *x: F.scaled_dot_product_attention(*x, is_causal=True), (qt, kt, vt), do.transpose(1, 2))
            del q, k, v, g, do, qt, kt, vt
        except torch.cuda.OutOfMemoryError:
            pass
        for s in ("fwd", "fb"):
            if row.get(f"ours_{s}") and row.get(f"fla_{s}"):
                row[f"ratio_{s}"] = row[f"ours_{s}"] / row[f"fla_{s}"]
        row["floor_fwd"] = 5 * B * T * H * D * 2 / bw * 1e3  # q, k, v, g read + o written, bf16
        rows.append(row)
        print(" ".join(f"{row[c]:>9.3f}" if isinstance(row.get(c), float) else f"{row.get(c, 'n/a'):>9}"
                       for c in cols), flush=True)
    if "json" in args:
        with open(args["json"], "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), copy_bw=bw, rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
