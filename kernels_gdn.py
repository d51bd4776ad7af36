"""
Gated DeltaNet (GDN): a chunked Triton kernel, forward and backward, beside its PyTorch references.

One head, per token t: q_t, k_t in R^K (the layer L2-normalises them), v_t in R^V, a write strength beta_t in [0, 1]
and a log-decay g_t <= 0 (scalars per head); the state S in R^{K x V} is fp32:

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T          o_t = scale * S_t^T q_t   (scale = K^-0.5)

that is: decay the state, read what it stores under k_t, and write beta_t of the difference to v_t back under k_t
(the delta rule replaces a value, GLA only adds). Token by token (gdn_recurrent_ref; gdn_step decodes this way) it is
T rank-1 updates and no matrix units. The chunked form, chunks of BT = 64 tokens, rows i, j = 0..63 of one chunk,
the state S entering it, b_i = g_0 + ... + g_i (cumulative within the chunk, decreasing, <= 0):

  The new values. Write S_i = exp(b_i) S + sum_{j<=i} exp(b_i - b_j) k_j d_j^T: every token adds its key times a
  "new value" d_j, which the recurrence gives as d_i = beta_i (v_i - exp(g_i) S_{i-1}^T k_i). Substituting S_{i-1}:

      d_i + sum_{j<i} beta_i (k_i . k_j) exp(b_i - b_j) d_j = beta_i v_i - beta_i exp(b_i) S^T k_i

  a unit lower-triangular system (I + M) D = diag(beta) V - diag(beta exp(b)) K S with M_ij = beta_i (k_i . k_j)
  exp(b_i - b_j) for i > j. With T = (I + M)^-1 (the UT transform; T diag(beta) K is the WY representation of the
  product of the chunk's (I - beta k k^T) factors):

      W = T diag(beta exp(b)) K      U = T diag(beta) V      D = U - W S                     [BT, K], [BT, V]

  The output and the state leaving the chunk are then GLA's with D in place of V (decay a scalar per row here):

      O = scale [ diag(exp(b)) Q S + (Q K^T * G) D ]            G_ij = exp(b_i - b_j) for i >= j, else 0
      S_next = exp(b_L) S + (diag(exp(b_L - b)) K)^T D           b_L = b of the last row: the chunk's decay

Every exponent is <= 0 (b_i; b_i - b_j masked to i >= j before the exp; b_L - b_j), so a gate of -20 per step
(exp(-1280) within a chunk) underflows to 0 and never overflows. b is summed with its rounding error kept apart
(b = hi + lo), so that b_i - b_j = (hi_i - hi_j) + (lo_i - lo_j) is exact to its own size, not to |b| ~ 1800. T is
computed in fp32 from 16 x 16 blocks: the four diagonal ones by forward substitution (row r from rows < r), then
T_ac = -T_aa sum_{c<=e<a} M_ae T_ec; it is stored in the input dtype (as fla stores it). W and U, whose rows only need
S to become D, are independent per chunk; only S passes from chunk to chunk.

Forward, four launches. (1) _solve_kernel, parallel over (chunk, head): b and T. (2) _wu_kernel: W and U, full-tile
matmuls. (3) _fwd_state_kernel, sequential over chunks, parallel over (head, block of V columns): stores the state
entering each chunk and D = U - W S, and steps S. (4) _fwd_output_kernel, parallel over (chunk, head): O. Backward,
five: the forward saves only its inputs, so (1)-(3) run again (recomputing the chunk states instead of keeping
NT x K x V per head between the passes), (2) also forming the intra-chunk dD = scale (Q K^T * G)^T dO. Then
_bwd_state_kernel runs the state gradient backwards, dS_enter = exp(b_L) dS_next + scale (Q exp(b))^T dO - W^T dD
with dD += diag(exp(b_L - b)) K dS_next, from d(final state) to d(initial state); _bwd_kernel, parallel over (chunk,
head), does everything else. With Yw = T^T dW (dW = -dD S^T) and Yu = T^T dD, the WY part is

    dK += diag(beta exp(b)) Yw        dV = diag(beta) Yu        dbeta = exp(b) rowsum(Yw * K) + rowsum(Yu * V) + ...
    dM = -T^T dT T^T = -(Yw W^T + Yu U^T), strictly lower     (as T R_w = W and T R_u = U)

and M's own terms follow from M_ij = beta_i (k_i . k_j) G_ij. g_t enters b_i for every i >= t of its chunk, so dg_t
= sum_{i>=t} dL/db_i. A factor exp(b_i - b_j) (i > j) gives +x to dL/db_i and -x to dL/db_j, x = its gradient times
itself; diagonal terms (exponent 0) are left out, and the exp(b_L - b_j) terms of S_next are summed only over j < t
(the terms whose exponent contains g_t), so no exp(0)-sized term is added and then subtracted.

Inside the kernels exponents are base 2 (g * log2 e, then exp2). Head sizes up to 128, K != V allowed: tiles are
padded to a power of two >= 16 with masked loads. On CUDA tensors chunk_gdn runs Triton; on CPU it runs
chunk_gdn_torch (the same math in PyTorch, autograd for the backward) unless TRITON_INTERPRET=1 was set before triton
was first imported: then the Triton kernels run in the interpreter (that is how CI tests them).

    python -m pytest -q tests/test_kernels_gdn.py        # CPU: PyTorch path + Triton interpreter (child process)
    python kernels_gdn.py --check=true                   # GPU: Triton vs the recurrence, every gradient, all SHAPES
    python kernels_gdn.py --shapes=small --fla=false     # GPU benchmark: ms of ours, fla, SDPA, our GLA; --json=path
"""

import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# _bench_shapes: rows of kernels.SHAPES; the benchmark's table helpers are kernels.py's
from kernels import INTERPRET, _bench_shapes, _cast, _dot, chunk_gla, copy_bandwidth, print_row, save_rows

BT = 64  # chunk length (method.md)
MAX_HEAD = 128  # largest K and V the Triton path takes


# ----------------------------------------------------------------------------- references (PyTorch)

def gdn_step(q, k, v, g, beta, state, scale=None):
    """One decoding step: q, k [B, H, K], v [B, H, V], g, beta [B, H], state [B, H, K, V] -> (o [B, H, V] in q's
    dtype, new state). fp32 (float64 stays float64)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype, dt = q.dtype, (torch.float64 if state.dtype == torch.float64 else torch.float32)
    q, k, v, g, beta = (x.to(dt) for x in (q, k, v, g, beta))
    S = g.exp()[..., None, None] * state.to(dt)  # decay
    read = (k[..., None, :] @ S).squeeze(-2)  # [B, H, V] what the state stores under k
    S = S + beta[..., None, None] * k[..., :, None] * (v - read)[..., None, :]  # delta rule write
    o = scale * (q[..., None, :] @ S).squeeze(-2)
    return o.to(dtype), S


def gdn_recurrent_ref(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
    """Token-by-token recurrence in fp32 (float64 inputs: float64): the ground truth every other path is tested
    against. q, k [B, T, H, K], v [B, T, H, V], g, beta [B, T, H]."""
    B, T, H, K = q.shape
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    S = q.new_zeros(B, H, K, v.shape[-1], dtype=dt) if initial_state is None else initial_state.to(dt)
    o = []
    for t in range(T):
        o_t, S = gdn_step(q[:, t].to(dt), k[:, t], v[:, t], g[:, t], beta[:, t], S, scale)
        o.append(o_t)
    return torch.stack(o, 1), (S if output_final_state else None)


def chunk_gdn_torch(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
    """The chunked form in PyTorch (the CPU path): T, W, U per chunk, a pass over chunks for D and the outputs."""
    B, T, H, K = q.shape
    V, NT, dtype = v.shape[-1], triton.cdiv(T, BT), q.dtype
    scale = K ** -0.5 if scale is None else scale

    def chunks(x):  # [B, T, H, ...] -> [B, H, NT, BT, ...] fp32; padded rows are 0 (g = 0, beta = 0: no effect)
        x = F.pad(x.float(), (0, 0) * (x.dim() - 2) + (0, NT * BT - T))
        return x.view(B, NT, BT, H, *x.shape[3:]).movedim(3, 1)

    q, k, v, g, beta = chunks(q), chunks(k), chunks(v), chunks(g), chunks(beta)
    # Gate arithmetic in float64: exponents are differences of cumulative sums that reach |b| ~ 1e3.
    b = g.double().cumsum(-1)  # [B, H, NT, BT]
    causal = torch.ones(BT, BT, dtype=torch.bool, device=q.device).tril()
    G = (b[..., :, None] - b[..., None, :]).masked_fill(~causal, -math.inf).exp().float()  # [.., BT, BT], i >= j
    eb, ebL, edecay = b.exp().float(), b[..., -1].exp().float(), (b[..., -1:] - b).exp().float()
    M = (beta[..., None] * (k @ k.transpose(-1, -2)) * G).tril(-1)
    eye = torch.eye(BT, device=q.device)
    Tm = torch.linalg.solve_triangular(eye + M, eye.expand_as(M), upper=False, unitriangular=True)
    W = Tm @ ((beta * eb)[..., None] * k)  # [B, H, NT, BT, K]
    U = Tm @ (beta[..., None] * v)  # [B, H, NT, BT, V]
    A = (q @ k.transpose(-1, -2)) * G
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.float()
    o = []
    for n in range(NT):  # the sequential pass over chunks
        D = U[:, :, n] - W[:, :, n] @ S
        o.append(scale * (eb[:, :, n, :, None] * q[:, :, n] @ S + A[:, :, n] @ D))
        S = ebL[:, :, n, None, None] * S + (edecay[:, :, n, :, None] * k[:, :, n]).transpose(-1, -2) @ D
    o = torch.stack(o, 2).permute(0, 2, 3, 1, 4).reshape(B, NT * BT, H, V)[:, :T]
    return o.to(dtype), (S if output_final_state else None)


# ----------------------------------------------------------------------------- Triton kernels

@triton.jit
def _rows(x, n, bh, T, H, D, r0, RB: tl.constexpr, c0, CB: tl.constexpr, BT: tl.constexpr):
    """Pointers and mask of a [RB, CB] tile of head bh of a contiguous [B, T, H, D] tensor: rows r0.. of chunk n,
    columns c0.. (masked to t < T and c < D, so the tile may be padded past the head size)."""
    r, c = r0 + tl.arange(0, RB), c0 + tl.arange(0, CB)
    x += ((bh // H) * T + n * BT).to(tl.int64) * H * D + (bh % H) * D  # 64-bit base, 32-bit offsets within
    return x + r[:, None] * (H * D) + c[None, :], ((n * BT + r) < T)[:, None] & (c < D)[None, :]


@triton.jit
def _load(x, n, bh, T, H, D, r0, RB: tl.constexpr, c0, CB: tl.constexpr, BT: tl.constexpr):
    p, m = _rows(x, n, bh, T, H, D, r0, RB, c0, CB, BT)
    return tl.load(p, mask=m, other=0.)  # [RB, CB], zero outside the tensor


@triton.jit
def _store(x, val, n, bh, T, H, D, c0, CB: tl.constexpr, BT: tl.constexpr):
    p, m = _rows(x, n, bh, T, H, D, 0, BT, c0, CB, BT)
    tl.store(p, _cast(val, x.dtype.element_ty), mask=m)  # the [BT, CB] tile of chunk n, in x's dtype


@triton.jit
def _head_rows(x, n, bh, T, H, r0, RB: tl.constexpr, BT: tl.constexpr):
    """Pointers and mask of rows r0.. of chunk n of head bh of a [B, T, H] tensor (g, beta): [RB]."""
    r = r0 + tl.arange(0, RB)
    return x + ((bh // H) * T + n * BT).to(tl.int64) * H + bh % H + r * H, (n * BT + r) < T


@triton.jit
def _buf(x, i, c0, CB: tl.constexpr, DP: tl.constexpr, BT: tl.constexpr):
    """Pointers of the rows of chunk i (its index in the [B*H, NT] grid), columns c0.., of a row-major
    [B*H, NT*BT, DP] buffer: [BT, CB]."""
    return x + (i * BT + tl.arange(0, BT))[:, None] * DP + c0 + tl.arange(0, CB)[None, :]


@triton.jit
def _slot(x, i, c0, CB: tl.constexpr, KP: tl.constexpr, VP: tl.constexpr):
    """Pointers of slot i of a [B*H*NT, KP, VP] buffer of states, columns c0..: [KP, CB]."""
    return x + i * KP * VP + tl.arange(0, KP)[:, None] * VP + c0 + tl.arange(0, CB)[None, :]


@triton.jit
def _two_sum(ah, al, bh, bl):
    # (ah + al) + (bh + bl) as hi + lo: the rounding error of ah + bh, computed exactly (Knuth's TwoSum), joins lo
    s = ah + bh
    bp = s - ah
    return s, (ah - (s - bp)) + (bh - bp) + al + bl


@triton.jit
def _decay(hi, lo, hj, lj, keep):
    """2^(b_i - b_j) where keep, else 0, b = hi + lo (base 2, docstring). The exponent is masked before exp2 and
    clamped to <= 0 (b does not increase down a chunk)."""
    e = (hi[:, None] - hj[None, :]) + (lo[:, None] - lj[None, :])
    return tl.exp2(tl.where(keep, tl.minimum(e, 0.), float("-inf")))


@triton.jit
def _exp2b(hi, lo):  # 2^b for b = hi + lo, without rounding b to fp32 first
    return tl.exp2(hi) * tl.exp2(lo)


@triton.jit
def _chunk_gates(bhi, blo, i, BT: tl.constexpr):
    """b = hi + lo of chunk i (its index in the [B*H, NT] grid), [BT] each, and the last row's (the chunk's decay),
    as _solve_kernel wrote them."""
    t = i * BT + tl.arange(0, BT)
    return tl.load(bhi + t), tl.load(blo + t), tl.load(bhi + i * BT + BT - 1), tl.load(blo + i * BT + BT - 1)


@triton.jit
def _to_last(hi, lo, hL, lL):  # 2^(b_L - b_i), [BT]
    return tl.exp2(tl.minimum((hL - hi) + (lL - lo), 0.))


@triton.jit
def _piece(k, beta, hi, lo, n, bh, T, H, K: tl.constexpr, KP: tl.constexpr, A: tl.constexpr, BT: tl.constexpr):
    """Rows 16A .. 16A+15 of the chunk: k [16, KP], b = hi + lo and beta [16]. b is picked out of the chunk's (a
    masked sum adds only zeros: the values the other kernels read)."""
    pb, mb = _head_rows(beta, n, bh, T, H, 16 * A, 16, BT)
    pick = tl.arange(0, BT)[None, :] == 16 * A + tl.arange(0, 16)[:, None]  # [16, BT]
    ha, la = tl.sum(tl.where(pick, hi[None, :], 0.), axis=1), tl.sum(tl.where(pick, lo[None, :], 0.), axis=1)
    return _load(k, n, bh, T, H, K, 16 * A, 16, 0, KP, BT), ha, la, tl.load(pb, mask=mb, other=0.)


@triton.jit
def _m_block(ka, kc, ha, la, hc, lc, bea, DIAG: tl.constexpr, PREC: tl.constexpr):
    """Block (a, c) of M: beta_i (k_i . k_j) 2^(b_i - b_j), i in piece a, j in piece c; strictly lower if DIAG."""
    i = tl.arange(0, 16)
    if DIAG:
        keep = i[:, None] > i[None, :]
    else:
        keep = i[:, None] >= 0
    return bea[:, None] * _dot(ka, tl.trans(kc), PREC) * _decay(ha, la, hc, lc, keep)  # [16, 16] fp32


@triton.jit
def _mm(a, b):  # fp32 x fp32, exact: the 16 x 16 products of the triangular solve
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _inv16(M):
    """(I + M)^-1 of a strictly lower triangular [16, 16] block by forward substitution: row r of X = T - I is
    -M_r - sum_{j<r} M_rj X_j, from the rows above it."""
    i = tl.arange(0, 16)
    X = -M  # row r still holds -M_r until step r replaces it
    for r in range(1, 16):
        m = tl.sum(tl.where(i[:, None] == r, X, 0.), axis=0)  # [16] -M_r, zero from column r on
        X = tl.where(i[:, None] == r, (m + tl.sum(m[:, None] * X, axis=0))[None, :], X)
    return X + tl.where(i[:, None] == i[None, :], 1., 0.)


@triton.jit
def _solve_kernel(k, g, beta, bhi, blo, Tinv, T, H, K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr,
                  PREC: tl.constexpr):
    """Per (chunk, head): b = hi + lo (base 2) -> bhi, blo, and T = (I + M)^-1 in fp32 -> Tinv (input dtype; its
    lower 16 x 16 blocks, the upper ones are never read): the diagonal blocks by forward substitution, then
    T_ac = -T_aa sum_{c<=e<a} M_ae T_ec. Pieces of 16 rows: a chunk's work is 10 blocks of M and 16 products of
    16 x 16 blocks, where full [64, 64] tiles would multiply mostly zeros."""
    n, bh = tl.program_id(0), tl.program_id(1)
    row0 = (bh * tl.cdiv(T, BT) + n).to(tl.int64) * BT  # first row of this chunk in the [B*H, NT*BT, .] buffers
    t = tl.arange(0, BT)
    pg, mg = _head_rows(g, n, bh, T, H, 0, BT, BT)
    g2 = tl.load(pg, mask=mg, other=0.) * 1.4426950408889634  # [BT]; rows past T: g = 0
    hi, lo = tl.associative_scan((g2, tl.zeros_like(g2)), 0, _two_sum)  # cumulative sum, compensated
    tl.store(bhi + row0 + t, hi)
    tl.store(blo + row0 + t, lo)
    k0, h0, l0, be0 = _piece(k, beta, hi, lo, n, bh, T, H, K, KP, 0, BT)
    k1, h1, l1, be1 = _piece(k, beta, hi, lo, n, bh, T, H, K, KP, 1, BT)
    k2, h2, l2, be2 = _piece(k, beta, hi, lo, n, bh, T, H, K, KP, 2, BT)
    k3, h3, l3, be3 = _piece(k, beta, hi, lo, n, bh, T, H, K, KP, 3, BT)
    M00 = _m_block(k0, k0, h0, l0, h0, l0, be0, True, PREC)
    M11 = _m_block(k1, k1, h1, l1, h1, l1, be1, True, PREC)
    M22 = _m_block(k2, k2, h2, l2, h2, l2, be2, True, PREC)
    M33 = _m_block(k3, k3, h3, l3, h3, l3, be3, True, PREC)
    M10 = _m_block(k1, k0, h1, l1, h0, l0, be1, False, PREC)
    M21 = _m_block(k2, k1, h2, l2, h1, l1, be2, False, PREC)
    M32 = _m_block(k3, k2, h3, l3, h2, l2, be3, False, PREC)
    M20 = _m_block(k2, k0, h2, l2, h0, l0, be2, False, PREC)
    M31 = _m_block(k3, k1, h3, l3, h1, l1, be3, False, PREC)
    M30 = _m_block(k3, k0, h3, l3, h0, l0, be3, False, PREC)
    T00, T11, T22, T33 = _inv16(M00), _inv16(M11), _inv16(M22), _inv16(M33)
    T10 = -_mm(T11, _mm(M10, T00))
    T21 = -_mm(T22, _mm(M21, T11))
    T32 = -_mm(T33, _mm(M32, T22))
    T20 = -_mm(T22, _mm(M20, T00) + _mm(M21, T10))
    T31 = -_mm(T33, _mm(M31, T11) + _mm(M32, T21))
    T30 = -_mm(T33, _mm(M30, T00) + _mm(M31, T10) + _mm(M32, T20))
    i = tl.arange(0, 16)
    pt = Tinv + (row0 + i)[:, None] * BT + i[None, :]  # block (a, c) at pt + 16 a BT + 16 c
    dt = Tinv.dtype.element_ty
    tl.store(pt, _cast(T00, dt))
    tl.store(pt + 16 * BT, _cast(T10, dt))
    tl.store(pt + 16 * BT + 16, _cast(T11, dt))
    tl.store(pt + 32 * BT, _cast(T20, dt))
    tl.store(pt + 32 * BT + 16, _cast(T21, dt))
    tl.store(pt + 32 * BT + 32, _cast(T22, dt))
    tl.store(pt + 48 * BT, _cast(T30, dt))
    tl.store(pt + 48 * BT + 16, _cast(T31, dt))
    tl.store(pt + 48 * BT + 32, _cast(T32, dt))
    tl.store(pt + 48 * BT + 48, _cast(T33, dt))


@triton.jit
def _load_T(Tinv, row0, BT: tl.constexpr):
    """T of one chunk, [BT, BT]; the blocks above the diagonal (never stored) read as 0."""
    t = tl.arange(0, BT)
    return tl.load(Tinv + (row0 + t)[:, None] * BT + t[None, :], mask=(t[None, :] // 16) <= (t[:, None] // 16),
                   other=0.)


@triton.jit
def _wu_kernel(q, k, v, beta, do, bhi, blo, Tinv, w, u, dvl, scale, T, H, K: tl.constexpr, V: tl.constexpr,
               KP: tl.constexpr, VP: tl.constexpr, BT: tl.constexpr, PREC: tl.constexpr, BWD: tl.constexpr):
    """Per (chunk, head): W = T diag(beta 2^b) K -> w, U = T diag(beta) V -> u; BWD: also dvl = scale (Q K^T * G)^T
    dO, the intra-chunk part of dD."""
    n, bh = tl.program_id(0), tl.program_id(1)
    i, t = (bh * tl.cdiv(T, BT) + n).to(tl.int64), tl.arange(0, BT)
    hi, lo, _, _ = _chunk_gates(bhi, blo, i, BT)
    pb, mb = _head_rows(beta, n, bh, T, H, 0, BT, BT)
    be = tl.load(pb, mask=mb, other=0.)  # [BT]
    k_ = _load(k, n, bh, T, H, K, 0, BT, 0, KP, BT)  # [BT, KP]
    dt = k_.dtype
    Tm = _load_T(Tinv, i * BT, BT)  # [BT, BT]
    rk = _cast(k_.to(tl.float32) * (be * _exp2b(hi, lo))[:, None], dt)
    tl.store(_buf(w, i, 0, KP, KP, BT), _cast(_dot(Tm, rk, PREC), dt))
    rv = _cast(_load(v, n, bh, T, H, V, 0, BT, 0, VP, BT).to(tl.float32) * be[:, None], dt)
    tl.store(_buf(u, i, 0, VP, VP, BT), _cast(_dot(Tm, rv, PREC), dt))
    if BWD:
        A = _dot(_load(q, n, bh, T, H, K, 0, BT, 0, KP, BT), tl.trans(k_), PREC)  # [BT, BT]
        A = A * _decay(hi, lo, hi, lo, t[:, None] >= t[None, :]) * scale
        dv_ = _dot(tl.trans(_cast(A, dt)), _load(do, n, bh, T, H, V, 0, BT, 0, VP, BT), PREC)  # [BT, VP]
        tl.store(_buf(dvl, i, 0, VP, VP, BT), dv_)


@triton.jit
def _fwd_state_kernel(k, w, u, bhi, blo, h0, Hs, dn, ht, T, H, K: tl.constexpr, V: tl.constexpr, KP: tl.constexpr,
                      VP: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr, PREC: tl.constexpr,
                      HAS_INIT: tl.constexpr):
    """Per (block of BV state columns, head), over the chunks in order: store the entering state S -> Hs,
    D = U - W S -> dn, S <- 2^b_L S + (K 2^(b_L - b))^T D. The final state -> ht (fp32)."""
    iv, bh = tl.program_id(0), tl.program_id(1)
    NT = tl.cdiv(T, BT)
    kr, c = tl.arange(0, KP), iv * BV + tl.arange(0, BV)
    sm = (kr < K)[:, None] & (c < V)[None, :]
    if HAS_INIT:
        h = tl.load(h0 + bh.to(tl.int64) * K * V + kr[:, None] * V + c[None, :], mask=sm, other=0.)
    else:
        h = tl.zeros([KP, BV], dtype=tl.float32)
    for n in range(NT):
        i = (bh * NT + n).to(tl.int64)
        tl.store(_slot(Hs, i, iv * BV, BV, KP, VP), _cast(h, Hs.dtype.element_ty))
        hi, lo, hL, lL = _chunk_gates(bhi, blo, i, BT)
        w_ = tl.load(_buf(w, i, 0, KP, KP, BT))  # [BT, KP]
        dt = w_.dtype
        d = tl.load(_buf(u, i, iv * BV, BV, VP, BT)).to(tl.float32) - _dot(w_, _cast(h, dt), PREC)  # [BT, BV]
        tl.store(_buf(dn, i, iv * BV, BV, VP, BT), _cast(d, dn.dtype.element_ty))
        kd = _cast(_load(k, n, bh, T, H, K, 0, BT, 0, KP, BT).to(tl.float32) * _to_last(hi, lo, hL, lL)[:, None], dt)
        h = h * _exp2b(hL, lL) + _dot(tl.trans(kd), _cast(d, dt), PREC)
    tl.store(ht + bh.to(tl.int64) * K * V + kr[:, None] * V + c[None, :], h, mask=sm)


@triton.jit
def _fwd_output_kernel(q, k, bhi, blo, Hs, dn, o, scale, T, H, K: tl.constexpr, V: tl.constexpr, KP: tl.constexpr,
                       VP: tl.constexpr, BT: tl.constexpr, PREC: tl.constexpr):
    """Per (chunk, head): O = scale [ (Q 2^b) S + (Q K^T * G) D ]."""
    n, bh = tl.program_id(0), tl.program_id(1)
    i, t = (bh * tl.cdiv(T, BT) + n).to(tl.int64), tl.arange(0, BT)
    hi, lo, _, _ = _chunk_gates(bhi, blo, i, BT)
    q_ = _load(q, n, bh, T, H, K, 0, BT, 0, KP, BT)  # [BT, KP]
    S_ = tl.load(_slot(Hs, i, 0, VP, KP, VP))  # [KP, VP] the state entering the chunk
    dt = S_.dtype
    A = _dot(q_, tl.trans(_load(k, n, bh, T, H, K, 0, BT, 0, KP, BT)), PREC)  # [BT, BT]
    A = A * _decay(hi, lo, hi, lo, t[:, None] >= t[None, :])
    acc = _dot(_cast(q_.to(tl.float32) * _exp2b(hi, lo)[:, None], dt), S_, PREC)
    acc += _dot(_cast(A, dt), tl.load(_buf(dn, i, 0, VP, VP, BT)), PREC)
    _store(o, acc * scale, n, bh, T, H, V, 0, VP, BT)


@triton.jit
def _bwd_state_kernel(q, k, w, bhi, blo, do, ddn, dht, dHs, dh0, scale, T, H, K: tl.constexpr, V: tl.constexpr,
                      KP: tl.constexpr, VP: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr, PREC: tl.constexpr,
                      HAS_DHT: tl.constexpr):
    """Per (block of BV columns, head), over the chunks in reverse: store dS (gradient of the state leaving the
    chunk) -> dHs, dD = dD_intra + (K 2^(b_L - b)) dS -> ddn (in place of dD_intra), then
    dS <- 2^b_L dS + scale (Q 2^b)^T dO - W^T dD. The last one is d(initial state) -> dh0."""
    iv, bh = tl.program_id(0), tl.program_id(1)
    NT = tl.cdiv(T, BT)
    kr, c = tl.arange(0, KP), iv * BV + tl.arange(0, BV)
    sm = (kr < K)[:, None] & (c < V)[None, :]
    if HAS_DHT:
        dh = tl.load(dht + bh.to(tl.int64) * K * V + kr[:, None] * V + c[None, :], mask=sm, other=0.)
    else:
        dh = tl.zeros([KP, BV], dtype=tl.float32)
    for m in range(NT):
        n = NT - 1 - m
        i = (bh * NT + n).to(tl.int64)
        tl.store(_slot(dHs, i, iv * BV, BV, KP, VP), _cast(dh, dHs.dtype.element_ty))
        hi, lo, hL, lL = _chunk_gates(bhi, blo, i, BT)
        w_ = tl.load(_buf(w, i, 0, KP, KP, BT))  # [BT, KP]
        dt = w_.dtype
        kd = _cast(_load(k, n, bh, T, H, K, 0, BT, 0, KP, BT).to(tl.float32) * _to_last(hi, lo, hL, lL)[:, None], dt)
        qe = _cast(_load(q, n, bh, T, H, K, 0, BT, 0, KP, BT).to(tl.float32) * _exp2b(hi, lo)[:, None], dt)
        dd = tl.load(_buf(ddn, i, iv * BV, BV, VP, BT)) + _dot(kd, _cast(dh, dt), PREC)  # [BT, BV]
        tl.store(_buf(ddn, i, iv * BV, BV, VP, BT), dd)
        dh = dh * _exp2b(hL, lL) + scale * _dot(tl.trans(qe), _load(do, n, bh, T, H, V, 0, BT, iv * BV, BV, BT), PREC)
        dh -= _dot(tl.trans(w_), _cast(dd, dt), PREC)
    tl.store(dh0 + bh.to(tl.int64) * K * V + kr[:, None] * V + c[None, :], dh, mask=sm)


@triton.jit
def _bwd_kernel(q, k, v, beta, do, bhi, blo, w, u, Tinv, Hs, dHs, dn, ddn, dq, dk, dv, dbeta, dg, scale, T, H,
                K: tl.constexpr, V: tl.constexpr, KP: tl.constexpr, VP: tl.constexpr, BV: tl.constexpr,
                BT: tl.constexpr, PREC: tl.constexpr):
    """Per (chunk, head): dq, dk, dv, dbeta, dg from the module docstring's formulas, given the entering state S,
    dS of the leaving one, D, dD (complete) and T. Two passes over blocks of BV value columns, so that no [K, V]
    tile is whole in registers: the first for what dD drives (dv, T^T dW, dM), the second for what S and dS drive
    (dq and dk through the states)."""
    n, bh = tl.program_id(0), tl.program_id(1)
    i, t = (bh * tl.cdiv(T, BT) + n).to(tl.int64), tl.arange(0, BT)
    strict = t[:, None] > t[None, :]
    hi, lo, hL, lL = _chunk_gates(bhi, blo, i, BT)
    eb, G = _exp2b(hi, lo), _decay(hi, lo, hi, lo, t[:, None] >= t[None, :])  # [BT], [BT, BT]
    pb, mb = _head_rows(beta, n, bh, T, H, 0, BT, BT)
    be = tl.load(pb, mask=mb, other=0.)  # [BT]
    Tm = _load_T(Tinv, i * BT, BT)  # [BT, BT]
    dt = Tm.dtype
    dA = tl.zeros([BT, BT], dtype=tl.float32)  # dO D^T
    dM = tl.zeros([BT, BT], dtype=tl.float32)  # -T^T dT T^T = -(T^T dU) U^T - (T^T dW) W^T
    dW = tl.zeros([BT, KP], dtype=tl.float32)  # -dD S^T
    dbe = tl.zeros([BT], dtype=tl.float32)
    gS = 0.
    for c0 in tl.static_range(0, VP, BV):
        S_ = tl.load(_slot(Hs, i, c0, BV, KP, VP))  # [KP, BV] the state entering the chunk
        d_ = tl.load(_buf(dn, i, c0, BV, VP, BT))  # [BT, BV] D
        dd = _cast(tl.load(_buf(ddn, i, c0, BV, VP, BT)), dt)  # [BT, BV] dD
        dA += _dot(_load(do, n, bh, T, H, V, 0, BT, c0, BV, BT), tl.trans(d_), PREC)
        dW -= _dot(dd, tl.trans(S_), PREC)
        # U = T diag(beta) V: T^T dU gives dv, its part of dbeta and of dM
        Yu = _dot(tl.trans(Tm), dd, PREC)  # [BT, BV]
        dbe += tl.sum(Yu * _load(v, n, bh, T, H, V, 0, BT, c0, BV, BT).to(tl.float32), axis=1)
        _store(dv, be[:, None] * Yu, n, bh, T, H, V, c0, BV, BT)
        dM -= _dot(_cast(Yu, dt), tl.trans(tl.load(_buf(u, i, c0, BV, VP, BT))), PREC)
        dS_ = tl.load(_slot(dHs, i, c0, BV, KP, VP))  # [KP, BV] the gradient of the state leaving it
        gS += tl.sum(tl.sum(S_.to(tl.float32) * dS_.to(tl.float32), axis=1), axis=0)
    q_, k_ = _load(q, n, bh, T, H, K, 0, BT, 0, KP, BT), _load(k, n, bh, T, H, K, 0, BT, 0, KP, BT)  # [BT, KP]
    # W = T diag(beta 2^b) K
    Yw = _dot(tl.trans(Tm), _cast(dW, dt), PREC)  # [BT, KP] T^T dW
    yk = tl.sum(Yw * k_.to(tl.float32), axis=1)  # [BT]
    dbe += eb * yk
    db = be * eb * yk  # [BT] dL/db
    dM -= _dot(_cast(Yw, dt), tl.trans(tl.load(_buf(w, i, 0, KP, KP, BT))), PREC)
    dk_ = (be * eb)[:, None] * Yw  # [BT, KP]
    # M_ij = beta_i (k_i . k_j) G_ij, i > j
    kk = _dot(k_, tl.trans(k_), PREC)
    Gs = tl.where(strict, dM * G, 0.)
    dbe += tl.sum(Gs * kk, axis=1)
    Gb = _cast(be[:, None] * Gs, dt)
    dk_ += _dot(Gb, k_, PREC) + _dot(tl.trans(Gb), k_, PREC)
    # O = scale [(Q 2^b) S + (Q K^T * G) D], intra-chunk part; E: the terms of every G_ij (i > j), diagonal left out
    dAG = dA * G * scale  # [BT, BT] gradient of (Q K^T)_ij, times G_ij
    E = tl.where(strict, dAG * _dot(q_, tl.trans(k_), PREC) + Gb.to(tl.float32) * kk, 0.)
    db += tl.sum(E, axis=1) - tl.sum(E, axis=0)
    dk_ += _dot(tl.trans(_cast(dAG, dt)), q_, PREC)
    dq_ = _dot(_cast(dAG, dt), k_, PREC)  # [BT, KP]
    # the inter-chunk part of O and S_next = 2^b_L S + (K 2^(b_L - b))^T D
    el = _to_last(hi, lo, hL, lL)  # [BT]
    x = tl.zeros([BT], dtype=tl.float32)  # term j: exponent b_L - b_j, contains g_t for t > j
    for c0 in tl.static_range(0, VP, BV):
        S_, dS_ = tl.load(_slot(Hs, i, c0, BV, KP, VP)), tl.load(_slot(dHs, i, c0, BV, KP, VP))  # [KP, BV]
        do_ = _load(do, n, bh, T, H, V, 0, BT, c0, BV, BT)  # [BT, BV]
        dqS = _dot(do_, tl.trans(S_), PREC) * (scale * eb)[:, None]  # [BT, KP]
        dq_ += dqS
        db += tl.sum(q_.to(tl.float32) * dqS, axis=1)
        dkS = _dot(tl.load(_buf(dn, i, c0, BV, VP, BT)), tl.trans(dS_), PREC) * el[:, None]  # [BT, KP]
        dk_ += dkS
        x += tl.sum(k_.to(tl.float32) * dkS, axis=1)
    dg_ = tl.cumsum(db, axis=0, reverse=True) + _exp2b(hL, lL) * gS  # 2^b_L S: every g_t of the chunk
    dg_ += tl.sum(tl.where(t[None, :] < t[:, None], x[None, :], 0.), axis=1)  # sum_{j<t} x_j, no add-subtract
    _store(dq, dq_, n, bh, T, H, K, 0, KP, BT)
    _store(dk, dk_, n, bh, T, H, K, 0, KP, BT)
    tl.store(_head_rows(dbeta, n, bh, T, H, 0, BT, BT)[0], dbe, mask=mb)
    tl.store(_head_rows(dg, n, bh, T, H, 0, BT, BT)[0], dg_, mask=mb)


# ----------------------------------------------------------------------------- launchers and autograd

def _padded(n):
    """Tile size of a head dimension: the next power of two, at least 16 (tl.dot's smallest)."""
    return max(16, triton.next_power_of_2(n))


def _precision(x):
    """fp32 inputs: exact dots (tf32 would miss the 1e-5 tests); bf16: tensor cores (operands bf16, as T, W, U and
    the stored states are). The 16 x 16 products inside the triangular solve are fp32 in both (_mm)."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


# Launch configurations, fixed (no autotuning): num_warps per kernel for small (K * V <= 64 * 64) and large states,
# chosen where ptxas (sm_90a) reports the fewest spills; the two scans run one program per SCAN_BV state columns and
# head, so that short batches still fill the GPU.
WARPS = {"solve": (4, 8), "wu": (4, 4), "fwd_scan": (4, 4), "out": (4, 4), "bwd_scan": (4, 8), "bwd": (8, 8)}
SCAN_BV = 32
BWD_BV = 64  # value columns per step of _bwd_kernel's first loop


def _warps(kind, KP, VP):
    return WARPS[kind][KP * VP > 64 * 64]


def _stages(x, KP, VP):
    """Software-pipelining stages of the backward scans: fp32 tiles of a 128-wide head, three stages deep, need more
    shared memory than an H100/H200 has (280 KB of 227 KB measured): one stage there (fp32 is the checking path, not
    the training one), Triton's default 3 elsewhere."""
    return 1 if x.dtype == torch.float32 and KP * VP > 64 * 64 else 3


def _wy(q, k, v, g, beta, scale, do=None):
    """Kernels (1) and (2): b [2, B*H, NT*BT] fp32 (hi and lo), T [B*H, NT*BT, BT], W [B*H, NT*BT, KP] and
    U [B*H, NT*BT, VP] in the input dtype; given do also dD_intra [B*H, NT*BT, VP] fp32."""
    B, T, H, K = k.shape
    V, NT, dev = v.shape[-1], triton.cdiv(T, BT), k.device
    KP, VP = _padded(K), _padded(V)
    bc = torch.empty(2, B * H, NT * BT, device=dev, dtype=torch.float32)  # b = bc[0] + bc[1]
    Tinv = torch.empty(B * H, NT * BT, BT, device=dev, dtype=k.dtype)
    _solve_kernel[(NT, B * H)](k, g, beta, bc[0], bc[1], Tinv, T, H, K=K, KP=KP, BT=BT, PREC=_precision(k),
                               num_warps=_warps("solve", KP, VP))
    w = torch.empty(B * H, NT * BT, KP, device=dev, dtype=k.dtype)
    u = torch.empty(B * H, NT * BT, VP, device=dev, dtype=k.dtype)
    dvl = torch.empty(B * H, NT * BT, VP, device=dev, dtype=torch.float32) if do is not None else u
    _wu_kernel[(NT, B * H)](q, k, v, beta, v if do is None else do, bc[0], bc[1], Tinv, w, u, dvl, scale, T, H, K=K,
                            V=V, KP=KP, VP=VP, BT=BT, PREC=_precision(k), BWD=do is not None,
                            num_warps=_warps("wu", KP, VP))
    return bc, Tinv, w, u, dvl


def _fwd_states(k, v, w, u, bc, h0):
    """Kernel (3): the state entering each chunk Hs [B*H, NT, KP, VP] (input dtype), D [B*H, NT*BT, VP] and the final
    state [B, H, K, V] fp32."""
    B, T, H, K = k.shape
    V, NT, KP, VP = v.shape[-1], triton.cdiv(T, BT), w.shape[-1], u.shape[-1]
    Hs = torch.empty(B * H, NT, KP, VP, device=k.device, dtype=k.dtype)
    dn = torch.empty_like(u)
    ht = torch.empty(B, H, K, V, device=k.device, dtype=torch.float32)
    BV = min(VP, SCAN_BV)
    _fwd_state_kernel[(VP // BV, B * H)](k, w, u, bc[0], bc[1], ht if h0 is None else h0, Hs, dn, ht, T, H, K=K,
                                         V=V, KP=KP, VP=VP, BV=BV, BT=BT, PREC=_precision(k),
                                         HAS_INIT=h0 is not None, num_warps=_warps("fwd_scan", KP, VP))
    return Hs, dn, ht


class ChunkGDNFunction(torch.autograd.Function):
    """Triton forward and backward; q, k, v in one dtype (bf16 or fp32), g and beta fp32, h0 fp32 or None."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, h0):
        q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
        h0 = None if h0 is None else h0.contiguous()
        B, T, H, K = q.shape
        bc, _, w, u, _ = _wy(q, k, v, g, beta, scale)
        Hs, dn, ht = _fwd_states(k, v, w, u, bc, h0)
        o = torch.empty_like(v)
        KP, VP = w.shape[-1], u.shape[-1]
        _fwd_output_kernel[(triton.cdiv(T, BT), B * H)](q, k, bc[0], bc[1], Hs, dn, o, scale, T, H, K=K,
                                                        V=v.shape[-1], KP=KP, VP=VP, BT=BT, PREC=_precision(k),
                                                        num_warps=_warps("out", KP, VP))
        ctx.save_for_backward(q, k, v, g, beta, h0)
        ctx.scale = scale
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, h0 = ctx.saved_tensors
        B, T, H, K = q.shape
        V, NT, scale = v.shape[-1], triton.cdiv(T, BT), ctx.scale
        do = torch.zeros_like(v) if do is None else do.contiguous()
        bc, Tinv, w, u, ddn = _wy(q, k, v, g, beta, scale, do)
        Hs, dn, _ = _fwd_states(k, v, w, u, bc, h0)
        KP, VP = w.shape[-1], u.shape[-1]
        dHs = torch.empty_like(Hs)
        dh0 = torch.empty(B, H, K, V, device=q.device, dtype=torch.float32)
        BV = min(VP, SCAN_BV)
        _bwd_state_kernel[(VP // BV, B * H)](q, k, w, bc[0], bc[1], do, ddn, dh0 if dht is None else dht.contiguous(),
                                             dHs, dh0, scale, T, H, K=K, V=V, KP=KP, VP=VP, BV=BV, BT=BT,
                                             PREC=_precision(k), HAS_DHT=dht is not None,
                                             num_warps=_warps("bwd_scan", KP, VP), num_stages=_stages(k, KP, VP))
        dq, dk, dv, dg, dbeta = (torch.empty_like(x) for x in (q, k, v, g, beta))
        _bwd_kernel[(NT, B * H)](q, k, v, beta, do, bc[0], bc[1], w, u, Tinv, Hs, dHs, dn, ddn, dq, dk, dv, dbeta, dg,
                                 scale, T, H, K=K, V=V, KP=KP, VP=VP, BV=min(VP, BWD_BV), BT=BT,
                                 PREC=_precision(k), num_warps=_warps("bwd", KP, VP), num_stages=_stages(k, KP, VP))
        return dq, dk, dv, dg, dbeta, None, (dh0 if h0 is not None else None)


# torch.compile (the stages' --compile) runs around this call rather than through it, as around chunk_gla.
@torch.compiler.disable
def chunk_gdn(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
    """Gated DeltaNet over a sequence (fla's chunk_gated_delta_rule interface). q, k [B, T, H, K]; v [B, T, H, V];
    g (log-decay, <= 0) and beta [B, T, H]; initial_state fp32 [B, H, K, V] or None. Returns (o [B, T, H, V] in the
    input dtype, final state fp32 or None). Differentiable in all of them. CUDA -> Triton (K, V <= 128), CPU ->
    PyTorch (Triton if INTERPRET)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if not (q.is_cuda or INTERPRET):
        return chunk_gdn_torch(q, k, v, g, beta, scale, initial_state, output_final_state)
    K, V = q.shape[-1], v.shape[-1]
    if not (1 <= K <= MAX_HEAD and 1 <= V <= MAX_HEAD):
        raise ValueError(f"chunk_gdn (Triton) takes head sizes K, V from 1 to {MAX_HEAD} (tiles padded to 16, 32, 64 "
                         f"or 128), got K={K}, V={V}")
    dtype = q.dtype
    # bf16 and fp32 run as they are; fp16 runs in fp32 (a state in fp16 overflows)
    cdt = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    h0 = None if initial_state is None else initial_state.float()
    o, ht = ChunkGDNFunction.apply(q.to(cdt), k.to(cdt), v.to(cdt), g.float(), beta.float(), scale, h0)
    return o.to(dtype), (ht if output_final_state else None)


# ----------------------------------------------------------------------------- benchmark and GPU check

@dataclass
class BenchConfig:
    shapes: str = "all"             # all | small (the first four of kernels.SHAPES) | indices into SHAPES, e.g. 4,5,6
    json: str = ""                  # also write the table to this JSON file
    fla: bool = True                # time flash-linear-attention's chunk_gated_delta_rule beside ours (when importable)
    check: bool = False             # instead of timing: Triton vs the float64 recurrence at each shape, every gradient


def _inputs(B, T, H, D, dtype, seed=0):
    """q, k L2-normalised (as the layer makes them), v, g = logsigmoid(randn) (fp32), beta = sigmoid(randn)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    rand = lambda *s: torch.randn(*s, device="cuda", generator=gen)  # noqa: E731
    q, k = (F.normalize(rand(B, T, H, D), dim=-1).to(dtype) for _ in range(2))
    return q, k, rand(B, T, H, D).to(dtype), F.logsigmoid(rand(B, T, H)), torch.sigmoid(rand(B, T, H))


def _bench_one(fn, inputs, do):
    """(ms forward, ms forward+backward) of fn(*inputs) -> o, do_bench medians; None (n/a) where one fails."""
    from triton.testing import do_bench
    out = []
    for backward in (False, True):
        try:
            if backward:
                xs = [x.detach().requires_grad_() for x in inputs]
                out.append(do_bench(lambda: fn(*xs).backward(do), grad_to_none=xs, return_mode="median"))
            else:
                with torch.no_grad():
                    out.append(do_bench(lambda: fn(*inputs), return_mode="median"))
        except Exception as e:  # OOM, or fla refusing its own backward: the table goes on
            print(f"  ({type(e).__name__}: {str(e)[:100]})")
            out.append(None)
        torch.cuda.empty_cache()
    return out


def _check(shapes):
    """Triton (bf16 and fp32 inputs) against gdn_recurrent_ref in float64 on the same values: output, final state and
    every gradient. Exits non-zero on a relative error above bf16 2e-2 / fp32 1e-4, or a NaN."""
    from torch.utils.checkpoint import checkpoint

    def ref(q, k, v, g, beta, h):  # segments of 256 tokens, recomputed in the backward: the graph stays small
        o = []
        for s in range(0, q.shape[1], 256):
            o_s, h = checkpoint(lambda *a: gdn_recurrent_ref(*a, output_final_state=True),
                                *(x[:, s:s + 256] for x in (q, k, v, g, beta)), None, h, use_reentrant=False)
            o.append(o_s)
        return torch.cat(o, 1), h

    ours = lambda *a: chunk_gdn(*a[:5], initial_state=a[5], output_final_state=True)  # noqa: E731
    names, failed = ["o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dh0"], []
    for B, T, H, D in shapes:
        for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float32, 1e-4)):
            xs = [*_inputs(B, T, H, D, dtype), torch.randn(B, H, D, D, device="cuda")]
            do, dht = torch.randn(B, T, H, D, device="cuda"), torch.randn(B, H, D, D, device="cuda")
            res = []
            for fn, args in ((ours, xs), (ref, [x.double() for x in xs])):
                args = [a.detach().requires_grad_() for a in args]
                o, ht = fn(*args)
                ((o.double() * do).sum() + (ht.double() * dht).sum()).backward()
                res.append([o.detach(), ht.detach()] + [a.grad for a in args])
                del o, ht, args
            errs = {n: ((a.double() - b).norm() / b.norm()).item() for n, a, b in zip(names, *res)}
            bad = [n for n, e in errs.items() if not e <= tol]  # NaN fails too
            print(f"check {B} x {T} x {H} x {D} {str(dtype)[6:]:>8}: " + " ".join(f"{n} {e:.1e}" for n, e in
                                                                                 errs.items()), flush=True)
            failed += [f"{(B, T, H, D)} {dtype} {n}" for n in bad]
            del res
            torch.cuda.empty_cache()
    if failed:
        raise SystemExit("check FAILED (Triton vs the float64 recurrence): " + ", ".join(failed))
    print("check passed: output, final state and every gradient within bf16 2e-2 / fp32 1e-4 at every shape")


def main(argv):
    from common import parse_args
    cfg = parse_args(BenchConfig, argv)
    shapes = _bench_shapes(cfg.shapes)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    if cfg.check:
        return _check(shapes)
    fla = None
    if cfg.fla:
        try:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla
        except ImportError:
            print("flash-linear-attention not importable: its columns are n/a")
    bw = copy_bandwidth("cuda")
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s; ms (do_bench median), bf16, g = logsigmoid(randn) per head; "
          f"gla_fb: our GLA at the same shape (target: ours_fb <= 1.5 gla_fb); fla_err: |ours - fla| / |fla| of "
          f"the forward outputs")
    cols = ["B", "T", "H", "D", "ours_fwd", "ours_fb", "fla_fwd", "fla_fb", "fla_err", "sdpa_fwd", "sdpa_fb",
            "gla_fb", "ratio_fwd", "ratio_fb", "vs_gla_fb", "floor_fwd"]
    print(" ".join(f"{c:>9}" for c in cols))
    rows = []
    for B, T, H, D in shapes:
        row = dict(B=B, T=T, H=H, D=D)
        try:
            q, k, v, g, beta = _inputs(B, T, H, D, torch.bfloat16)
            do = torch.randn_like(v)
            row["ours_fwd"], row["ours_fb"] = _bench_one(lambda *x: chunk_gdn(*x)[0], (q, k, v, g, beta), do)
            if fla is not None:
                row["fla_fwd"], row["fla_fb"] = _bench_one(lambda *x: fla(*x)[0], (q, k, v, g, beta.bfloat16()), do)
                with torch.no_grad():  # agreement of the forwards: |ours - fla| / |fla| over the whole output
                    o_fla = fla(q, k, v, g, beta.bfloat16())[0].float()
                    row["fla_err"] = ((chunk_gdn(q, k, v, g, beta)[0].float() - o_fla).norm() / o_fla.norm()).item()
            qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # [B, H, T, D]
            row["sdpa_fwd"], row["sdpa_fb"] = _bench_one(
                lambda *x: F.scaled_dot_product_attention(*x, is_causal=True), (qt, kt, vt), do.transpose(1, 2))
            gk = (F.logsigmoid(torch.randn_like(v, dtype=torch.float32)) / 16).bfloat16()
            row["gla_fb"] = _bench_one(lambda *x: chunk_gla(*x)[0], (q, k, v, gk), do)[1]
            del q, k, v, g, beta, do, qt, kt, vt, gk
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
        for s in ("fwd", "fb"):
            if row.get(f"ours_{s}") and row.get(f"fla_{s}"):
                row[f"ratio_{s}"] = row[f"ours_{s}"] / row[f"fla_{s}"]
        if row.get("ours_fb") and row.get("gla_fb"):
            row["vs_gla_fb"] = row["ours_fb"] / row["gla_fb"]
        row["floor_fwd"] = (4 * D * 2 + 8) * B * T * H / bw * 1e3  # q, k, v read + o written (bf16), g, beta fp32
        rows.append(row)
        print_row(row, cols)
    return save_rows(cfg.json, bw, rows)


if __name__ == "__main__":
    main(sys.argv[1:])
