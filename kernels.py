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
(b >= -64 ln 2; a gate logsigmoid(x)/16 needs x < -11 on average to break it), the factors lie within 2^+-64 of q
and k, which fp32 and bf16 hold, and the entries i < j it also produces (up to 2^64 |q||k|) are finite and masked
away (fp32 inputs: 2^16, as each factor carries a relative error eps * |b|). Training breaks it: as the study's
Stage 1 trained the GLA gates, its steps slowed from 78 to 214 ms at steady GPU clocks (results/study/gla_kl_25/),
most likely as flagged chunks took over (on such gates the exact loop over a whole chunk cost six times the
factorized form); with the sub-chunk path below, the same Stage 1 goes from 79 to 95 ms (results/h200_s12/). A
flagged chunk is therefore cut into sub-chunks of BC = 16 rows, taken in turn with
the state carried between them in registers, as if the chunk length were 16 there: each sub-chunk is factorized
when none of its gates is below -64/16 (base 2), so its factors stay within 2^+-64; the others (gates near -3 per
step and below) take the exact loop over their 16 key rows s, which builds column s of exp(b_i - b_s) for i >= s
only, its exponent g_{s+1} + ... + g_i summed afresh (a difference of two cumulative sums of size ~1800 would lose
1e-4 of it). Kernel (1) below flags the chunks; each chunk kernel is launched twice, the chunk form then the
sub-chunk form, each skipping the other's chunks, so the sub-chunk loops take no registers (occupancy) from the
common path. `python kernels.py --gates=trained` times it with a quarter of the channels decaying 0.5-2.5 per step
(a stand-in for trained gates: every chunk flagged, no sub-chunk on the loop).

Forward. (1) _local_state_kernel, parallel over (chunk, head): X_n = (k * exp(b_L - b))^T v, the state chunk n leaves
from a zero start, and its decay b_L. (2) _state_scan_kernel: the only sequential part, and only elementwise on
K x V: S_{n+1} = exp(b_L,n) * S_n + X_n, U chunks per step so that their loads overlap; it writes the state entering
each chunk (bf16 for bf16 inputs: it only feeds matmuls) and the final state (fp32). (3) _chunk_output_kernel,
parallel over (chunk, head): o from the formula above, A in registers.

Backward. The forward saves only its inputs; the backward recomputes the chunk states with (1) and (2) (a re-read of
k, v, g) instead of keeping NT x K x V per head alive between the passes. Kernel (1), given do, also forms the local
terms of the state gradient, which runs the same recurrence backwards: with dS_n = dL/d(state leaving chunk n),
dS_{n-1} = exp(b_L,n) * dS_n + scale (q * exp(b))_n^T do_n, from dS_{NT-1} = d(final state); its last step is
d(initial_state). Then per chunk, with dA_ij = do_i . v_j for i >= j:

    dq_i = scale [ (do_i S^T) * exp(b_i) + sum_{j<=i} dA_ij k_j exp(b_i - b_j) ]
    dk_j = (v_j dS^T) * exp(b_L - b_j) + scale sum_{i>=j} dA_ij q_i exp(b_i - b_j)
    dv_j = scale sum_{i>=j} A_ij do_i + (k_j * exp(b_L - b_j)) dS

g_t enters b_i for every i >= t of its chunk, so dg_t = sum_{i>=t} dL/db_i, with dL/db_i = q_i dq_i - k_i dk_i, plus
rowsum(dS * S_next) at i = L (every term of S_next carries exp(b_L)). But this sum counts every term exp(b_i - b_j)
once with + and once with -: the i = j terms, exp(0) = 1, cancel only up to rounding, noise of size |q k dA| where
under strong decay the true dg is exp(-20) smaller, and the leaving state's terms cancel against rowsum(dS * S_next)
the same way (with bf16 inputs and gates of a few tenths per step that left dg 2-7% off). So every block, a chunk
(_chunk_bwd_kernel) or a sub-chunk of a flagged one (_chunk_bwd_sub_kernel), sums only the terms whose exponent
contains g_t (_bwd_block; _chunk_bwd_kernel writes the same sums out in its own order, for registers), its
intra-block terms from the factorization or, where that is not bounded, the loop:

    dg_t = sum_{i>=t} q_i (dq_i - dA_ii k_i) - sum_{j>=t} k_j (dk_j^intra - dA_jj q_j) + sum_{j<t} k_j dk_j^inter
           + exp(b_L) * rowsum(S * dS)

Inside the kernels exponents are base 2 (g * log2 e, then exp2), and head sizes are powers of two >= 16: chunk_gla
zero-pads other sizes up to 128 (q = k = 0 and g = 0 on the extra key channels, v = 0 on the extra value columns: they
add nothing) and cuts the padding off again. On CUDA tensors chunk_gla runs Triton; on CPU it runs chunk_gla_torch (the
same three steps in PyTorch, autograd for the backward) unless TRITON_INTERPRET=1 was set before triton was first
imported: then the Triton kernels run in the interpreter (that is how CI tests them).

    python -m pytest -q tests/test_kernels.py             # CPU: PyTorch path + Triton interpreter (child process)
    python kernels.py --shapes=small --fla=false          # GPU benchmark: ms of ours, fla, SDPA; --json=path
    python kernels.py --shapes=4,5,6                      # only those rows of SHAPES (0-based; default: all)
"""

import json
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

BT = 64  # chunk length (method.md)
BC = 16  # sub-chunk length of the chunks whose decay is too strong to factorize at BT
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
    ex = lambda x: x.exp().float()  # noqa: E731
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
        if dt == tl.bfloat16 and x.dtype == tl.float32:
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
def _local_state_kernel(q, k, v, g, do, X, dX, bLs, exact, scale, T, H, K: tl.constexpr, V: tl.constexpr,
                        BT: tl.constexpr, WITH_DO: tl.constexpr, PREC: tl.constexpr, FAST: tl.constexpr):
    """Per (chunk, head): X = (k * 2^(b_L - b))^T v and b_L; with do also dX = scale (q * 2^b)^T do. Also flags the
    chunks whose decay is too strong for the factorized intra-chunk form (exact = 1)."""
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
    tl.store(exact + i, (tl.min(bL, axis=0) < FAST).to(tl.int8))  # b is smallest in the last row
    if WITH_DO:
        pq, _ = _tile(q, n, bh, T, H, K, BT)
        pdo, _ = _tile(do, n, bh, T, H, V, BT)
        qe = tl.load(pq, mask=m, other=0.).to(tl.float32) * scale * tl.exp2(tl.cumsum(g2, axis=0))  # [BT, K]
        do_ = tl.load(pdo, mask=m, other=0.)  # [BT, V]
        tl.store(dX + i * K * V + kv, _dot(tl.trans(_cast(qe, do_.dtype)), do_, PREC))


@triton.jit
def _state_scan_kernel(X, bLs, init, out, final, NT, NS, K: tl.constexpr, V: tl.constexpr, R: tl.constexpr,
                       U: tl.constexpr, REVERSE: tl.constexpr, HAS_INIT: tl.constexpr):
    """carry <- 2^bL[n] * carry + X[n] over chunks n (descending if REVERSE), for R rows of the K x V state.
    out[slot] gets the carry before chunk n (slot n) and after it (slot n + 1, or n - 1 if REVERSE), 0 <= slot < NS;
    final gets the carry at the end. U chunks are loaded at once, so that their loads overlap (one warp: the U axis
    then lies within each thread, and picking row j of a tile below is a register move, not a shuffle)."""
    pid, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    c = pid * R + tl.arange(0, R)  # [R] rows of the state (key channels)
    e = c[:, None] * V + tl.arange(0, V)[None, :]  # [R, V] elements of the state
    u = tl.arange(0, U)
    if HAS_INIT:
        carry = tl.load(init + bh * K * V + e)
    else:
        carry = tl.zeros([R, V], dtype=tl.float32)
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
        x = tl.load(X + (bh * NT + n)[:, None, None] * K * V + e[None, :, :], mask=ok[:, :, None], other=0.)
        # steps past the end get decay 2^0 = 1 and x = 0: the identity, so the carry ends as the final state
        a = tl.exp2(tl.load(bLs + (bh * NT + n)[:, None] * K + c[None, :], mask=ok, other=0.))  # [U, R]
        states = tl.zeros([U, R, V], dtype=tl.float32)  # the carry after each chunk
        for j in tl.static_range(U):
            pick = u == j
            x_j = tl.sum(tl.where(pick[:, None, None], x, 0.), axis=0)  # [R, V]
            carry = tl.sum(tl.where(pick[:, None], a, 0.), axis=0)[:, None] * carry + x_j
            states = tl.where(pick[:, None, None], carry[None, :, :], states)
        tl.store(out + (bh * NS + slot)[:, None, None] * K * V + e[None, :, :], _cast(states, out.dtype.element_ty),
                 mask=(ok & (slot >= 0)[:, None] & (slot < NS)[:, None])[:, :, None])
    tl.store(final + bh * K * V + e, carry)


@triton.jit
def _block_tiles(q, k, v, g, n, bh, scale, T, H, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr):
    """What a block (n: its index in blocks of BT rows) starts with: its base-2 gates g2 and their cumulative sum b,
    the row mask m, q * scale and k in fp32 ([BT, K]) and v ([BT, V])."""
    g2 = _log2_gates(g, n, bh, T, H, K, BT)
    pq, m = _tile(q, n, bh, T, H, K, BT)
    pk, _ = _tile(k, n, bh, T, H, K, BT)
    pv, _ = _tile(v, n, bh, T, H, V, BT)
    return (g2, tl.cumsum(g2, axis=0), m, tl.load(pq, mask=m, other=0.).to(tl.float32) * scale,
            tl.load(pk, mask=m, other=0.).to(tl.float32), tl.load(pv, mask=m, other=0.))


@triton.jit
def _output_block(q, k, v, g, o, S_, n, bh, scale, T, H, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                  PREC: tl.constexpr, EXACT):
    """Block n of BT rows (a chunk, or a sub-chunk of one) of head bh, entering state S_ [K, V]: o = (q * 2^b) S +
    A v, A the causal attention with per-channel decay, by the bounded factorization or (EXACT) the exact loop.
    Returns its k (fp32), v and base-2 gates, for the state it leaves."""
    g2, b, m, q_, k_, v_ = _block_tiles(q, k, v, g, n, bh, scale, T, H, K, V, BT)
    qe = q_ * tl.exp2(b)
    dt = S_.dtype
    acc = _dot(_cast(qe, dt), S_, PREC)  # [BT, V] through the entering state
    t = tl.arange(0, BT)
    if EXACT:
        A, _, _ = _intra_loop(q_, k_, g2, 0., t, BT, K, False)
    else:  # bounded factorization
        A = _dot(_cast(qe, dt), tl.trans(_cast(k_ * tl.exp2(-b), dt)), PREC)
    A = tl.where(t[:, None] >= t[None, :], A, 0.)
    acc += _dot(_cast(A, dt), v_, PREC)  # [BT, BT] @ [BT, V]
    po, _ = _tile(o, n, bh, T, H, V, BT)
    tl.store(po, _cast(acc, o.dtype.element_ty), mask=m)
    return k_, v_, g2


@triton.jit
def _leave(S_, k_, v_, g2, PREC: tl.constexpr, dt: tl.constexpr):
    """The state after a block, fp32: 2^b_L * S + (k * 2^(b_L - b))^T v."""
    return tl.exp2(tl.sum(g2, axis=0))[:, None] * S_ + _dot(tl.trans(_cast(k_ * tl.exp2(_suffix(g2)), dt)), v_, PREC)


@triton.jit
def _chunk_output_kernel(q, k, v, g, S, exact, o, scale, T, H, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                         PREC: tl.constexpr):
    """Per (chunk, head) whose decay allows the factorization (the others: _chunk_output_sub_kernel)."""
    n, bh = tl.program_id(0), tl.program_id(1)
    NT = tl.cdiv(T, BT)
    if tl.load(exact + bh * NT + n) == 0:
        S_ = tl.load(S + (bh.to(tl.int64) * (NT + 1) + n) * K * V + tl.arange(0, K)[:, None] * V
                     + tl.arange(0, V)[None, :])  # [K, V] entering
        _output_block(q, k, v, g, o, S_, n, bh, scale, T, H, K, V, BT, PREC, False)


@triton.jit
def _strong(g, s, bh, T, H, K: tl.constexpr, BC: tl.constexpr, FAST: tl.constexpr):
    """Sub-chunk s (blocks of BC rows) takes the exact loop if one of its gates is below FAST / BC (base 2): with
    every gate above it, the sub-chunk decays by less than 2^-FAST, which bounds its factors by 2^+-(-FAST)."""
    return tl.min(tl.min(_log2_gates(g, s, bh, T, H, K, BC), axis=1), axis=0) < FAST / BC


@triton.jit
def _chunk_output_sub_kernel(q, k, v, g, S, exact, o, scale, T, H, K: tl.constexpr, V: tl.constexpr,
                             BT: tl.constexpr, BC: tl.constexpr, PREC: tl.constexpr, FAST: tl.constexpr):
    """Per flagged (chunk, head): the chunk as BT / BC sub-chunks of BC rows in turn, the state carried from one to
    the next in registers (fp32), each factorized when its own decay is bounded (nearly always), else exact."""
    n, bh = tl.program_id(0), tl.program_id(1)
    NT = tl.cdiv(T, BT)
    if tl.load(exact + bh * NT + n) != 0:
        carry = tl.load(S + (bh.to(tl.int64) * (NT + 1) + n) * K * V + tl.arange(0, K)[:, None] * V
                        + tl.arange(0, V)[None, :]).to(tl.float32)
        for c in tl.static_range(BT // BC):
            s = n * (BT // BC) + c  # the sub-chunk, in blocks of BC rows
            flag = _strong(g, s, bh, T, H, K, BC, FAST)
            k_, v_, g2 = _output_block(q, k, v, g, o, _cast(carry, S.dtype.element_ty), s, bh, scale, T, H, K, V, BC,
                                       PREC, flag)
            carry = _leave(carry, k_, v_, g2, PREC, S.dtype.element_ty)


@triton.jit
def _decay_column(g2, t, s):
    """exp2(b_i - b_s) for i >= s, 0 above, [BT, K]: g_{s+1} + ... + g_i summed afresh from row s, because the
    difference of two cumulative sums would carry an error of eps * |b| (|b| reaches ~1800 at -20 per step)."""
    return tl.exp2(tl.where(t[:, None] >= s, tl.cumsum(tl.where(t[:, None] > s, g2, 0.), axis=0), -1e30))


@triton.jit
def _intra_loop(q_, k_, g2, dA, t, BT: tl.constexpr, K: tl.constexpr, GRAD: tl.constexpr):
    """A of one block without factorizing, by a loop over key rows s (column s of A and exp2(b_i - b_s) per step);
    with GRAD also its intra-block dq, dk from dA (strictly causal)."""
    A = tl.zeros([BT, BT], dtype=tl.float32)
    dq_ = tl.zeros([BT, K], dtype=tl.float32)
    dk_ = tl.zeros([BT, K], dtype=tl.float32)
    for s in range(BT):
        e = _decay_column(g2, t, s)  # [BT, K]
        k_s = tl.sum(tl.where(t[:, None] == s, k_, 0.), axis=0)  # [K] row s: a masked sum, registers have no index
        A = tl.where(t[None, :] == s, tl.sum(q_ * k_s[None, :] * e, axis=1)[:, None], A)
        if GRAD:
            dA_s = tl.sum(tl.where(t[None, :] == s, dA, 0.), axis=1)  # [BT], 0 at i = s
            dq_ += dA_s[:, None] * k_s[None, :] * e
            dk_ = tl.where(t[:, None] == s, tl.sum(dA_s[:, None] * q_ * e, axis=0)[None, :], dk_)
    return A, dq_, dk_


@triton.jit
def _intra_factorized(q_, k_, b, dA, dt: tl.constexpr, PREC: tl.constexpr):
    """The same three by the bounded factorization: qe = q 2^b, ke = k 2^-b (a block that is not flagged)."""
    eb, ebn = tl.exp2(b), tl.exp2(-b)
    qe, ke, dA_ = _cast(q_ * eb, dt), _cast(k_ * ebn, dt), _cast(dA, dt)
    return _dot(qe, tl.trans(ke), PREC), _dot(dA_, ke, PREC) * eb, _dot(tl.trans(dA_), qe, PREC) * ebn


@triton.jit
def _excl_combine(e1, s1, e2, s2):
    """Scan operator on pairs (sum of a range without its last element, sum of the range): an exclusive prefix sum
    from two plain sums, no term added and then subtracted."""
    return s1 + e2, s1 + s2


@triton.jit
def _strict_prefix(x, BT: tl.constexpr, K: tl.constexpr, V: tl.constexpr, PREC: tl.constexpr):
    """sum_{j<t} x_j for every row t of x [BT, K] fp32, the j = t term never added. Small states: a strictly lower
    triangular matmul (tf32 for 16-bit inputs). K * V > 64 * 64: an exclusive scan instead (exact in fp32), since
    there the matmul's fp32 operands cost the chunk backward 900-1600 B/thread more register spills (sm_90; the
    sub-chunk backward's stack, bf16: 816 B with the matmul, 792 B with the scan)."""
    if K * V > 64 * 64:
        ex, _ = tl.associative_scan((tl.zeros_like(x), x), 0, _excl_combine)
        return ex
    else:
        t = tl.arange(0, BT)
        return _dot(tl.where(t[:, None] > t[None, :], 1., 0.), x, PREC)


@triton.jit
def _bwd_block(q, k, v, g, do, dq, dk, dv, dg, S_, dS_, n, bh, scale, T, H, K: tl.constexpr, V: tl.constexpr,
               BT: tl.constexpr, PREC: tl.constexpr, exact):
    """Gradients of block n of BT rows (a chunk, or a sub-chunk of a flagged one) of head bh, given the state
    entering it (S_) and the gradient of the state leaving it (dS_), [K, V], in the compute dtype or fp32 (matmuls
    take them in the compute dtype, sums in fp32), with the formulas of the module docstring: every exponent <= 0,
    and dg summed only over terms whose exponent contains g_t (no exp(0) terms added and then subtracted). The
    intra-block terms by the loop if exact, else by the bounded factorization: the same sums either way. Each
    gradient is stored as soon as it is complete (fewer tiles alive at once: fewer register spills)."""
    g2, b, m, q_, k_, v_ = _block_tiles(q, k, v, g, n, bh, scale, T, H, K, V, BT)
    t = tl.arange(0, BT)
    pdo, _ = _tile(do, n, bh, T, H, V, BT)
    do_ = tl.load(pdo, mask=m, other=0.)  # [BT, V]
    dt = v_.dtype
    dA = tl.where(t[:, None] > t[None, :], _dot(do_, tl.trans(v_), PREC), 0.)  # [BT, BT] strictly causal
    dAd = tl.sum(do_.to(tl.float32) * v_.to(tl.float32), axis=1)  # [BT] its diagonal, kept apart
    if exact:
        A, dq_, dk_ = _intra_loop(q_, k_, g2, dA, t, BT, K, True)
    else:
        A, dq_, dk_ = _intra_factorized(q_, k_, b, dA, dt, PREC)
    el = tl.exp2(_suffix(g2))  # [BT, K]
    dSd = _cast(dS_, dt)
    pdv, _ = _tile(dv, n, bh, T, H, V, BT)
    dv_ = _dot(tl.trans(_cast(tl.where(t[:, None] >= t[None, :], A, 0.), dt)), do_, PREC)
    tl.store(pdv, _cast(dv_ + _dot(_cast(k_ * el, dt), dSd, PREC), dv.dtype.element_ty), mask=m)
    dq_ += _dot(do_, tl.trans(_cast(S_, dt)), PREC) * tl.exp2(b)  # inter-block, through the entering state
    # dg: suffix sums of the intra terms without the diagonal, the strict prefix sum of the leaving-state terms
    # (_strict_prefix: the j = t term is never added and then removed), the entering state's decay
    dg_ = tl.cumsum(q_ * dq_ - k_ * dk_, axis=0, reverse=True)
    pdq, _ = _tile(dq, n, bh, T, H, K, BT)
    tl.store(pdq, _cast((dq_ + dAd[:, None] * k_) * scale, dq.dtype.element_ty), mask=m)
    dkl = _dot(v_, tl.trans(dSd), PREC) * el  # inter-block, through the leaving state
    dg_ += _strict_prefix(k_ * dkl, BT, K, V, PREC)
    dg_ += (tl.exp2(tl.sum(g2, axis=0)) * tl.sum(S_.to(tl.float32) * dS_.to(tl.float32), axis=1))[None, :]
    pdg, _ = _tile(dg, n, bh, T, H, K, BT)
    tl.store(pdg, _cast(dg_, dg.dtype.element_ty), mask=m)
    pdk, _ = _tile(dk, n, bh, T, H, K, BT)
    tl.store(pdk, _cast(dk_ + dAd[:, None] * q_ + dkl, dk.dtype.element_ty), mask=m)
    return q_, do_, g2, b


@triton.jit
def _chunk_bwd_kernel(q, k, v, g, do, S, dS, exact, dq, dk, dv, dg, scale, T, H, K: tl.constexpr, V: tl.constexpr,
                      BT: tl.constexpr, PREC: tl.constexpr):
    """Per (chunk, head) whose decay allows the factorization (the others: _chunk_bwd_sub_kernel): _bwd_block's sums
    in the factorized form, qe = q 2^b, ke = k 2^-b, dS' = 2^b_L dS (bounded here, so the leaving state's 2^(b_L - b)
    may be taken as 2^b_L 2^-b), dA strictly causal and its diagonal dA_ii kept apart:
        dq = (do S^T + dA ke) 2^b + dA_ii k        dv = ke dS' + A^T do
        dk = (dA^T qe + v dS'^T) 2^-b + dA_ii q    dg as in the module docstring (no term added, then subtracted)
    Written out rather than through _bwd_block, in an order that keeps few [BT, K] tiles alive: through _bwd_block
    this kernel spilled 832 B/thread at K = V = 64 and 1992 B at 128 (sm_90, triton 3.6; forward + backward 1.2x and
    2.2x the old dg form's time on an H200); in this order 88 B and 264 B (the old dg form: 8 B and 272 B; through
    _block_tiles' loads at the start, 144 B and 304 B), and
    0.868 and 1.978 ms against the old form's 0.886 and 1.850 (B=4, T=4096, H=9 at D=64, H=16 at D=128, bf16)."""
    n, bh = tl.program_id(0), tl.program_id(1)
    NT = tl.cdiv(T, BT)
    if tl.load(exact + bh * NT + n) == 0:
        g2 = _log2_gates(g, n, bh, T, H, K, BT)
        b = tl.cumsum(g2, axis=0)
        t = tl.arange(0, BT)
        pq, m = _tile(q, n, bh, T, H, K, BT)
        pk, _ = _tile(k, n, bh, T, H, K, BT)
        pv, _ = _tile(v, n, bh, T, H, V, BT)
        pdo, _ = _tile(do, n, bh, T, H, V, BT)
        do_ = tl.load(pdo, mask=m, other=0.)  # [BT, V]
        v_ = tl.load(pv, mask=m, other=0.)  # [BT, V]
        dt = v_.dtype
        kv = tl.arange(0, K)[:, None] * V + tl.arange(0, V)[None, :]
        pS = S + (bh.to(tl.int64) * (NT + 1) + n) * K * V + kv  # [K, V] entering state
        dA = _cast(tl.where(t[:, None] > t[None, :], _dot(do_, tl.trans(v_), PREC), 0.), dt)  # [BT, BT] strict
        dAd = tl.sum(do_.to(tl.float32) * v_.to(tl.float32), axis=1)  # [BT] its diagonal, kept apart
        eb, ebn = tl.exp2(b), tl.exp2(-b)  # [BT, K]
        q_ = tl.load(pq, mask=m, other=0.).to(tl.float32) * scale  # [BT, K]
        k_ = tl.load(pk, mask=m, other=0.).to(tl.float32)  # [BT, K]
        qe, ke = _cast(q_ * eb, dt), _cast(k_ * ebn, dt)
        # S is loaded twice (here and for dgS) rather than kept: 264 B of stack at K = V = 128 against 480 B
        dq_ = (_dot(do_, tl.trans(tl.load(pS)), PREC) + _dot(dA, ke, PREC)) * eb  # [BT, K] without the diagonal
        acc = q_ * dq_  # dg's intra and entering-state terms, summed over i >= t below
        pdq, _ = _tile(dq, n, bh, T, H, K, BT)
        tl.store(pdq, _cast((dq_ + dAd[:, None] * k_) * scale, dq.dtype.element_ty), mask=m)
        dS_ = tl.load(dS + (bh.to(tl.int64) * NT + n) * K * V + kv).to(tl.float32)  # [K, V] leaving state's grad
        bL = tl.exp2(tl.sum(g2, axis=0))  # [K]
        dgS = bL * tl.sum(tl.load(pS).to(tl.float32) * dS_, axis=1)  # [K] the entering state's decay
        dSl = _cast(dS_ * bL[:, None], dt)
        dkl = _dot(v_, tl.trans(dSl), PREC) * ebn  # [BT, K] through the leaving state
        dki = _dot(tl.trans(dA), qe, PREC) * ebn  # [BT, K] intra, without the diagonal
        acc -= k_ * dki
        pdk, _ = _tile(dk, n, bh, T, H, K, BT)
        tl.store(pdk, _cast(dki + dkl + dAd[:, None] * q_, dk.dtype.element_ty), mask=m)
        A = tl.where(t[:, None] >= t[None, :], _dot(qe, tl.trans(ke), PREC), 0.)  # [BT, BT]
        dv_ = _dot(ke, dSl, PREC) + _dot(tl.trans(_cast(A, dt)), do_, PREC)  # [BT, V]
        pdv, _ = _tile(dv, n, bh, T, H, V, BT)
        tl.store(pdv, _cast(dv_, dv.dtype.element_ty), mask=m)
        dg_ = tl.cumsum(acc, axis=0, reverse=True) + _strict_prefix(k_ * dkl, BT, K, V, PREC) + dgS[None, :]
        pdg, _ = _tile(dg, n, bh, T, H, K, BT)
        tl.store(pdg, _cast(dg_, dg.dtype.element_ty), mask=m)


@triton.jit
def _sub_state(k, v, g, S_, s, bh, T, H, K: tl.constexpr, V: tl.constexpr, BC: tl.constexpr, PREC: tl.constexpr,
               dt: tl.constexpr):
    """The state after sub-chunk s (blocks of BC rows), fp32, from the state S_ entering it (fp32)."""
    pk, m = _tile(k, s, bh, T, H, K, BC)
    pv, _ = _tile(v, s, bh, T, H, V, BC)
    return _leave(S_, tl.load(pk, mask=m, other=0.).to(tl.float32), tl.load(pv, mask=m, other=0.),
                  _log2_gates(g, s, bh, T, H, K, BC), PREC, dt)


@triton.jit
def _chunk_bwd_sub_kernel(q, k, v, g, do, S, dS, exact, dq, dk, dv, dg, scale, T, H, K: tl.constexpr,
                          V: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, PREC: tl.constexpr, FAST: tl.constexpr):
    """Per flagged (chunk, head): its sub-chunks from the last to the first, each with the state entering it
    (recomputed from the chunk's: c steps of the recurrence) and the gradient of the state leaving it, carried
    backwards in registers as dS_{c-1} = 2^b_L,c * dS_c + (q * 2^b)_c^T do_c; factorized where bounded, else exact."""
    n, bh = tl.program_id(0), tl.program_id(1)
    NT = tl.cdiv(T, BT)
    if tl.load(exact + bh * NT + n) != 0:
        dt = S.dtype.element_ty
        kv = tl.arange(0, K)[:, None] * V + tl.arange(0, V)[None, :]
        S0 = tl.load(S + (bh.to(tl.int64) * (NT + 1) + n) * K * V + kv).to(tl.float32)
        dSc = tl.load(dS + (bh.to(tl.int64) * NT + n) * K * V + kv).to(tl.float32)
        for cc in tl.static_range(BT // BC):
            c = BT // BC - 1 - cc
            Sc = S0
            for j in range(c):
                Sc = _sub_state(k, v, g, Sc, n * (BT // BC) + j, bh, T, H, K, V, BC, PREC, dt)
            s = n * (BT // BC) + c
            q_, do_, g2, b = _bwd_block(q, k, v, g, do, dq, dk, dv, dg, Sc, dSc, s, bh, scale, T, H, K, V, BC, PREC,
                                        _strong(g, s, bh, T, H, K, BC, FAST))
            dSc = tl.exp2(tl.sum(g2, axis=0))[:, None] * dSc + _dot(tl.trans(_cast(q_ * tl.exp2(b), dt)), do_, PREC)


# ----------------------------------------------------------------------------- launchers and autograd

def _precision(v):
    """fp32: exact dots, and the factorized intra-chunk path only while |b| <= 16 (its factors carry an error of
    eps * |b| each); bf16: tensor-core dots, factorized while |b| <= 64 (bf16 rounding dominates anyway)."""
    return dict(PREC="ieee", FAST=-16.0) if v.dtype == torch.float32 else dict(PREC="tf32", FAST=-64.0)


# Launch configurations, fixed (no autotuning): num_warps per kernel for small (K * V <= 64 * 64) and large states,
# and the scan's tile of SCAN_ELEMS state elements x SCAN_U chunks. Measured on an H100: 4 warps beat 8 wherever the
# registers allow it (more programs per SM hide more latency); the backward at K = V = 128 spills less with 8. The
# scan runs one warp per program, so that the U chunks of a tile sit in each thread's registers. fp32 at K = V = 128:
# _sub_only.
WARPS = {"state": (4, 4), "out": (4, 4), "bwd": (4, 8), "scan": (1, 1)}
SCAN_ELEMS, SCAN_U = 256, 8


def _warps(kind, K, V):
    return WARPS[kind][K * V > 64 * 64]


def _sub_only(K, v):
    """fp32 at K = V = 128 takes the sub-chunk path for every chunk: there the chunk-form backward asks for 278528 B
    of shared memory (compiled for sm_90), more than an H100 or H200 has (232448 B); the sub-chunk backward, with
    one pipeline stage, 230400 B. Its loops are slower, but fp32 at that size is for tests and fp16 inputs."""
    return v.dtype == torch.float32 and K * v.shape[-1] > 64 * 128


def _states(q, k, v, g, scale, h0, do=None, dht=None):
    """Kernels (1) + (2). Returns S [B*H, NT+1, K, V] (state entering chunk n; slot NT = final), the exact-path
    flags [B*H, NT] and the final state fp32; given do also dS [B*H, NT, K, V] (gradient of the state leaving chunk
    n) and d initial_state."""
    B, T, H, K = k.shape
    V, NT, dev = v.shape[-1], triton.cdiv(T, BT), k.device
    X = torch.empty(B * H, NT, K, V, device=dev, dtype=torch.float32)
    dX = torch.empty_like(X) if do is not None else X
    bLs = torch.empty(B * H, NT, K, device=dev, dtype=torch.float32)
    exact = torch.empty(B * H, NT, device=dev, dtype=torch.int8)
    p = _precision(v)
    _local_state_kernel[(NT, B * H)](q, k, v, g, v if do is None else do, X, dX, bLs, exact, scale, T, H, K=K, V=V,
                                     BT=BT, WITH_DO=do is not None, PREC=p["PREC"],
                                     FAST=1e30 if _sub_only(K, v) else p["FAST"], num_warps=_warps("state", K, V))
    S = torch.empty(B * H, NT + 1, K, V, device=dev, dtype=v.dtype)
    ht = torch.empty(B, H, K, V, device=dev, dtype=torch.float32)
    R = max(1, min(K, SCAN_ELEMS // V))  # state rows per program
    grid = (K // R, B * H)
    _state_scan_kernel[grid](X, bLs, ht if h0 is None else h0, S, ht, NT, NT + 1, K=K, V=V, R=R, U=SCAN_U,
                             REVERSE=False, HAS_INIT=h0 is not None, num_warps=_warps("scan", K, V))
    if do is None:
        return S, exact, ht
    dS = torch.empty(B * H, NT, K, V, device=dev, dtype=v.dtype)
    dh0 = torch.empty(B, H, K, V, device=dev, dtype=torch.float32)
    _state_scan_kernel[grid](dX, bLs, dh0 if dht is None else dht, dS, dh0, NT, NT, K=K, V=V, R=R, U=SCAN_U,
                             REVERSE=True, HAS_INIT=dht is not None, num_warps=_warps("scan", K, V))
    return S, exact, ht, dS, dh0


class ChunkGLAFunction(torch.autograd.Function):
    """Triton forward and backward; q, k, v in one dtype (bf16 or fp32), g any float dtype, h0 fp32 or None."""

    @staticmethod
    def forward(ctx, q, k, v, g, scale, h0):
        q, k, v, g = (x.contiguous() for x in (q, k, v, g))
        h0 = None if h0 is None else h0.contiguous()
        B, T, H, K = q.shape
        S, exact, ht = _states(q, k, v, g, scale, h0)
        o = torch.empty_like(v)
        grid, V, p = (triton.cdiv(T, BT), B * H), v.shape[-1], _precision(v)
        if not _sub_only(K, v):
            _chunk_output_kernel[grid](q, k, v, g, S, exact, o, scale, T, H, K=K, V=V, BT=BT, PREC=p["PREC"],
                                       num_warps=_warps("out", K, V))
        _chunk_output_sub_kernel[grid](q, k, v, g, S, exact, o, scale, T, H, K=K, V=V, BT=BT, BC=BC, **p,
                                       num_warps=_warps("out", K, V))
        ctx.save_for_backward(q, k, v, g, h0)
        ctx.scale = scale
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, h0 = ctx.saved_tensors
        B, T, H, K = q.shape
        do = torch.zeros_like(v) if do is None else do.contiguous()
        S, exact, _, dS, dh0 = _states(q, k, v, g, ctx.scale, h0, do, None if dht is None else dht.contiguous())
        dq, dk, dv, dg = (torch.empty_like(x) for x in (q, k, v, g))
        grid, V, p = (triton.cdiv(T, BT), B * H), v.shape[-1], _precision(v)
        args = (q, k, v, g, do, S, dS, exact, dq, dk, dv, dg, ctx.scale, T, H)
        if not _sub_only(K, v):
            _chunk_bwd_kernel[grid](*args, K=K, V=V, BT=BT, PREC=p["PREC"], num_warps=_warps("bwd", K, V))
        _chunk_bwd_sub_kernel[grid](*args, K=K, V=V, BT=BT, BC=BC, **p, num_warps=_warps("bwd", K, V),
                                    num_stages=1 if _sub_only(K, v) else 3)
        return dq, dk, dv, dg, None, (dh0 if h0 is not None else None)


# torch.compile (the stages' --compile) runs around this call rather than through it: inductor does not take these
# Triton kernels apart ("loop-carried variable ... fp32 re-assigned to fp64" in _chunk_output_kernel).
@torch.compiler.disable
def chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False):
    """GLA over a sequence. q, k, g [B, T, H, K]; v [B, T, H, V]; g = log-decay (<= 0); initial_state fp32
    [B, H, K, V] or None. Returns (o [B, T, H, V] in the input dtype, final state fp32 or None). Differentiable in q,
    k, v, g and initial_state. CUDA -> Triton (K, V <= 128), CPU -> PyTorch (Triton if INTERPRET)."""
    K, V = q.shape[-1], v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    if not (q.is_cuda or INTERPRET):
        return chunk_gla_torch(q, k, v, g, scale, initial_state, output_final_state)
    if not (1 <= K <= 128 and 1 <= V <= 128):  # at 256 the backward needs more shared memory than an H100 has
        raise ValueError(f"chunk_gla (Triton) takes head sizes K, V from 1 to 128 (zero-padded to 16, 32, 64 or 128), "
                         f"got K={K}, V={V}")
    cdt = torch.bfloat16 if q.dtype == torch.bfloat16 else torch.float32  # fp16 runs in fp32 (its state overflows)
    pk, pv = max(16, triton.next_power_of_2(K)) - K, max(16, triton.next_power_of_2(V)) - V  # zero padding (docstring)
    pad = lambda x, p: F.pad(x, p) if any(p) and x is not None else x  # noqa: E731
    h0 = None if initial_state is None else initial_state.float()
    o, ht = ChunkGLAFunction.apply(pad(q.to(cdt), (0, pk)), pad(k.to(cdt), (0, pk)), pad(v.to(cdt), (0, pv)),
                                   pad(g, (0, pk)), scale, pad(h0, (0, pv, 0, pk)))
    return o[..., :V].to(q.dtype), (ht[:, :, :K, :V] if output_final_state else None)


# ----------------------------------------------------------------------------- benchmark

SHAPES = [(8, 2048, 9, 64), (4, 4096, 9, 64), (2, 8192, 9, 64), (8, 2048, 16, 128), (4, 4096, 16, 128),
          (2, 16384, 16, 128), (1, 32768, 16, 128)]


@dataclass
class BenchConfig:
    shapes: str = "all"             # all | small (the first four of SHAPES) | indices into SHAPES, e.g. 4,5,6
    json: str = ""                  # also write the table to this JSON file
    fla: bool = True                # time flash-linear-attention's chunk_gla beside ours (when importable)
    gates: str = "model"            # model: logsigmoid(randn)/16 | trained: a quarter of the key channels decay 0.5
                                    # to 2.5 per step, as a trained student's fast channels (every chunk past 2^-64)

    def __post_init__(self):
        if self.gates not in ("model", "trained"):
            raise SystemExit(f"--gates={self.gates}: expected model or trained")


def bench_gates(kind, B, T, H, D, device="cuda"):
    """The benchmark's log-gates [B, T, H, D] (bf16): the model's at initialization, or trained-like ones."""
    g = F.logsigmoid(torch.randn(B, T, H, D, device=device)) / 16
    if kind == "trained":
        g[..., : D // 4] = -0.5 - 2 * torch.rand(B, T, H, D // 4, device=device)
    return g.bfloat16()


def _bench_shapes(spec):
    """--shapes: "all" = all of SHAPES, "small" = the first four, "4,5,6" = those indices."""
    if spec in ("all", "small"):
        return SHAPES if spec == "all" else SHAPES[:4]
    idx = [int(s) if s.isdecimal() else -1 for s in spec.split(",")]
    if not all(0 <= i < len(SHAPES) for i in idx):
        raise SystemExit(f"--shapes={spec}: expected 'all', 'small' or comma-separated indices into SHAPES, each in "
                         f"0..{len(SHAPES) - 1}: " + ", ".join(f"{i}={x}" for i, x in enumerate(SHAPES)))
    return [SHAPES[i] for i in idx]


def _bench_one(fn, inputs, do):
    """(ms forward, ms forward+backward) of fn(*inputs) -> o: do_bench medians; None (n/a) where it fails (OOM, or
    a backward its library refuses: the forward's time is kept)."""
    from triton.testing import do_bench
    fwd = fb = None
    try:
        with torch.no_grad():
            fwd = do_bench(lambda: fn(*inputs), return_mode="median")
        xs = [x.detach().requires_grad_() for x in inputs]
        fb = do_bench(lambda: fn(*xs).backward(do), grad_to_none=xs, return_mode="median")
    except Exception as e:  # a shape that does not fit must not end the table
        print(f"  ({type(e).__name__}: {str(e)[:400]})")
    finally:
        torch.cuda.empty_cache()
    return fwd, fb


def main(argv):
    from common import parse_args
    cfg = parse_args(BenchConfig, argv)
    shapes = _bench_shapes(cfg.shapes)
    fla = None
    if cfg.fla:
        try:
            from fla.ops.gla import chunk_gla as fla
        except ImportError:
            print("flash-linear-attention not importable: its columns are n/a")
    bw = copy_bandwidth("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"copy bandwidth {bw / 1e12:.2f} TB/s; ms (do_bench median), bf16, gates {cfg.gates} (bench_gates)")
    cols = ["B", "T", "H", "D", "ours_fwd", "ours_fb", "fla_fwd", "fla_fb", "sdpa_fwd", "sdpa_fb", "ratio_fwd",
            "ratio_fb", "floor_fwd"]
    print(" ".join(f"{c:>9}" for c in cols))
    rows = []
    for B, T, H, D in shapes:
        row = dict(B=B, T=T, H=H, D=D)
        try:
            q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            g = bench_gates(cfg.gates, B, T, H, D)
            do = torch.randn_like(v)
            row["ours_fwd"], row["ours_fb"] = _bench_one(lambda *x: chunk_gla(*x)[0], (q, k, v, g), do)
            if fla is not None:
                row["fla_fwd"], row["fla_fb"] = _bench_one(lambda *x: fla(*x)[0], (q, k, v, g), do)
            qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # [B, H, T, D]
            row["sdpa_fwd"], row["sdpa_fb"] = _bench_one(
                lambda *x: F.scaled_dot_product_attention(*x, is_causal=True), (qt, kt, vt), do.transpose(1, 2))
            del q, k, v, g, do, qt, kt, vt
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
        for s in ("fwd", "fb"):
            if row.get(f"ours_{s}") and row.get(f"fla_{s}"):
                row[f"ratio_{s}"] = row[f"ours_{s}"] / row[f"fla_{s}"]
        row["floor_fwd"] = 5 * B * T * H * D * 2 / bw * 1e3  # q, k, v, g read + o written, bf16
        rows.append(row)
        print_row(row, cols)
    return save_rows(cfg.json, bw, rows)


def copy_bandwidth(device, nbytes=2 ** 30):
    """Bytes/s of a device copy (read + write) of nbytes: the bandwidth a memory-bound kernel can hope for."""
    from triton.testing import do_bench
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / (do_bench(lambda: dst.copy_(src), return_mode="median") * 1e-3)


def print_row(row, cols):
    """One line of a benchmark table: numbers to 3 decimals, n/a where a timing is missing."""
    fmt = lambda v: f"{v:>9.3f}" if abs(v) >= 0.01 or v == 0 else f"{v:>9.1e}"  # noqa: E731
    print(" ".join(fmt(row[c]) if isinstance(row.get(c), float) else f"{row.get(c) or 'n/a':>9}" for c in cols),
          flush=True)


def save_rows(path, bw, rows):
    """Also write the table as JSON when --json names a file. Returns the rows."""
    if path:
        with open(path, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), copy_bw=bw, rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
