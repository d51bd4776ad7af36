"""
Decoding kernels: the work of one new token per sequence, in a few launches per layer (issue 16).

A decoding step moves little data: the weights once, the KV caches of the softmax layers up to the current position,
the GLA and GDN states. Written as the training forward (model.Transformer.forward with a cache), it launches ~40 small
kernels per layer, ~1200 for SmolLM2's 30 layers, and a recorded CUDA graph of them still takes ~3.7 ms on an H100
where the bytes need ~0.1 ms: every kernel costs a few microseconds whatever it does. Transformer.fused_step runs the
same arithmetic in fewer kernels, the matmuls in cuBLAS and the rest fused (B rows; D model width; H, Hkv heads;
K head dim; I MLP width):

    attn layer   rms_norm | qkv matmul | rope_cache_write | attend (split-KV, + combine) | o matmul
                 | rms_norm | gate_up matmul | swiglu | down matmul                                9-10 launches
    gla layer    rms_norm | q,k,v,g,gate-rank matmul | gla_decode | o matmul
                 | rms_norm | gate_up matmul | swiglu | down matmul                                   8 launches
    gdn layer    rms_norm | q,k,v,g,a,b matmul | gdn_decode | o matmul
                 | rms_norm | gate_up matmul | swiglu | down matmul                                   8 launches

    rms_norm          the residual add of the previous sublayer and the RMSNorm of the next, one program per row;
                      it writes the new residual and the normed input of the matmul after it
    qkv, gate_up      q_proj, k_proj, v_proj (and for GLA g_proj and the first, D -> 16, half of gk_proj; for GDN
                      g_proj, a_proj and b_proj) as one matrix, concatenated once when the decoder is made
                      (Transformer.decode_plan); gate|up the same
    swiglu            silu(gate) * up, the down projection's input
    rope_cache_write  RoPE of q and k at position pos (cos/sin from a table made with the plan), k and v written into
                      the KV cache at pos
    attend            softmax attention of the B x H queries over keys 0..pos, flash-decoding: the keys are cut into
                      splits of SPLIT keys, one program per (row, kv head, split) with an online softmax over blocks
                      of BN keys, then a combine kernel merges the splits' (max, sum, output) triples (a cache of
                      one block: one split, no combine). A GQA group (G query heads of one KV head) shares each
                      K/V load.
    gla_decode        the GLA step of model.GLA: the decay's second low-rank matmul (16 -> K per head) and logsigmoid,
                      S = diag(exp(g)) S + k^T v on the fp32 state in place, o = scale q S, the per-head RMSNorm and
                      the swish gate, one program per (row, head) holding its K x V state in registers
    gdn_decode        the step of model.GDN, programs as gla_decode's: silu and l2norm of q and k, silu of v,
                      beta = sigmoid(b) and g = -exp(A_log) softplus(a + dt_bias) per head, then the delta rule on the
                      fp32 state in place, S = exp(g) S, S += beta k (v - S^T k)^T, o = scale S^T q, the norm and gate

Hand-written matrix-vector kernels with the norm and SwiGLU inside (5-7 launches per layer) were slower than cuBLAS
at every shape measured on an H200 (SmolLM2, B = 1, 1K tokens: 2.17 against 0.92 ms per step,
results/h200/bench_decode.txt, where this step is named "fused-cublas") and were removed.

Every kernel reproduces the eager model's roundings: where the eager model stores an intermediate in bf16 (a matmul
output such as the attention scores, x * cos, silu(gate), ...), the kernel rounds to bf16 at the same place (_rnd), so
that bf16 decoding gives the same tokens; the differences left are summation orders, and where flash-decoding rounds
the attention probabilities (before normalising, per block, where the eager step rounds them after). Each op has a
PyTorch reference (*_ref) written as the eager model computes it; on CPU tensors the references run (fast), unless
TRITON_INTERPRET=1 was set before triton was imported: then the Triton kernels run in the interpreter, which is how
the tests check them. Each op is also a torch.library custom op, so torch.compile of the step (decoder(compile=True))
sees it as one opaque call and keeps its in-place cache writes.

The floor of a step: the bytes it must move over the memory bandwidth,

    bytes = weights (every matrix once; a tied head counts once) + sum over attn layers of 2 B Hkv (pos + 1) K
            (K and V, cache dtype) + sum over gla and gdn layers of 2 B H K V 4 (the fp32 state read and written)

e.g. SmolLM2-135M in bf16: 0.27 GB of weights, ~0.07 ms at 4 TB/s; each attn layer adds 0.79 MB per row and 1K
tokens of context (the teacher at B=8, 32K: 6.2 GB, ~1.5 ms); each gla or gdn layer 2 x 9 x 64 x 64 x 4 B = 0.29 MB
per row, whatever the context. bench_decode.bench prints the floor beside every time.

    python -m pytest -q tests/test_decode.py        # CPU: references, and Triton in the interpreter (child process)
    python bench_decode.py                          # GPU: bf16 checks against the eager step, then the speed table
"""

import functools
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import INTERPRET, _cast, _dot, gla_step
from kernels_gdn import gdn_step

BN = 64  # keys per block of the attention loop
MAX_SPLITS = 64  # most splits of one attention row: the combine kernel holds them all in registers
_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}  # dtypes passed to kernels by name


def use_triton(x):
    return x.is_cuda or INTERPRET


def _p2(n):
    return triton.next_power_of_2(n)


# ----------------------------------------------------------------------------- references (PyTorch)

def rms_norm_ref(x, y, weight, eps):
    """(RMSNorm(x + y) * weight, x + y) as model.Block computes them; y None: no residual add. x, y [B, D]."""
    r = x if y is None else x + y
    h = r.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(r.dtype), r


def _rotate(x, cos, sin):  # model.apply_rope: x * cos + rotate_half(x) * sin, in x's dtype
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat((-x2, x1), dim=-1) * sin.to(x.dtype)


def rope_cache_write_ref(q, k, v, cos, sin, pos, k_cache, v_cache):
    """q [B, H, K], k, v [B, Hkv, K]; cos, sin [L, K] fp32 tables; pos long scalar tensor; caches [B, Hkv, L, K].
    Writes RoPE(k) and v at position pos of the caches; returns RoPE(q) [B, H, K]."""
    c, s = cos.index_select(0, pos.view(1)), sin.index_select(0, pos.view(1))  # [1, K]
    k_cache.index_copy_(2, pos.view(1), _rotate(k, c, s).to(k_cache.dtype)[:, :, None])
    v_cache.index_copy_(2, pos.view(1), v.to(v_cache.dtype)[:, :, None])
    return _rotate(q, c, s)


def attend_ref(q, k_cache, v_cache, pos, scale):
    """Softmax attention of q [B, H, K] over cache slots 0..pos (GQA: query head h reads KV head h // G), as the
    eager step computes it: over the whole buffer, the slots after pos masked. Returns [B, H, K]."""
    B, H, K = q.shape
    Hkv, L = k_cache.shape[1], k_cache.shape[2]
    # the casts to the cache's dtype do nothing unless it is wider (fp32 cache, bf16 queries: autocast's case)
    s = (q.view(B, Hkv, H // Hkv, K).to(k_cache.dtype) @ k_cache.transpose(-1, -2)).float() * scale
    s = s.masked_fill(torch.arange(L, device=q.device) > pos, float("-inf"))
    return (s.softmax(-1).to(q.dtype).to(v_cache.dtype) @ v_cache).to(q.dtype).view(B, H, K)


def _norm_gate_ref(o, gate, norm_weight, norm_eps, x_dtype):
    """RMSNorm_head(o) * silu(gate) as model.GLA and model.GDN end: o [B, H, V] cast to x's dtype, normalised in fp32,
    rounded back before the weight; gate [B, H V] the output gate's projection."""
    B, H, V = o.shape
    o = o.to(x_dtype)
    h = o.float()
    h = norm_weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm_eps)).to(o.dtype)
    return (h * F.silu(gate.reshape(B, H, V))).reshape(B, H * V)


def gla_decode_ref(proj, gk_weight, gk_bias, state, norm_weight, norm_eps, scale, H, x_dtype):
    """One GLA step from the merged projection proj [B, 4 H K + R] = [q | k | v | g_proj | gk_proj[0]] (model.GLA):
    gk_weight [H K, R], gk_bias [H K] (gk_proj[1]), state fp32 [B, H, K, K] updated in place, norm_weight [K] (g_norm).
    Returns RMSNorm_head(o) * silu(g_proj x) [B, H K], o = scale q S after S = diag(exp(g)) S + k^T v."""
    B, HK = proj.shape[0], gk_weight.shape[0]
    K = HK // H
    q, k, v, gate, z = proj.split([HK, HK, HK, HK, gk_weight.shape[1]], dim=-1)
    # as autocast would: the linear in proj's dtype (a no-op cast when the weights have it)
    g = F.logsigmoid(F.linear(z, gk_weight.to(z.dtype), gk_bias.to(z.dtype)).float()) / 16
    o, S = gla_step(*(t.reshape(B, H, K) for t in (q, k, v, g)), state, scale=scale)
    state.copy_(S)
    return _norm_gate_ref(o, gate, norm_weight, norm_eps, x_dtype)


def gdn_decode_ref(proj, a_log, dt_bias, state, norm_weight, norm_eps, scale, H, x_dtype):
    """One Gated DeltaNet step from the merged projection proj [B, 4 H K + 2 H] = [q | k | v | g_proj | a_proj |
    b_proj] (model.GDN): a_log, dt_bias [H] (A_log, dt_bias), state fp32 [B, H, K, K] updated in place, norm_weight
    [K] (o_norm). q, k = l2norm(silu(.)), v = silu(.), beta = sigmoid(b), g = -exp(A_log) softplus(a + dt_bias);
    S = exp(g) S, then S += beta k (v - S^T k)^T (kernels_gdn.gdn_step). Returns RMSNorm_head(o) * silu(g_proj x)
    [B, H K], o = scale S^T q."""
    B, K = proj.shape[0], state.shape[-1]
    q, k, v, gate, a, b = proj.split([H * K] * 4 + [H, H], dim=-1)

    def l2norm(x):  # model.GDN.l2norm
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).sum(-1, keepdim=True) + 1e-6)).to(x.dtype)

    q, k = (l2norm(F.silu(t).view(B, H, K)) for t in (q, k))
    beta = torch.sigmoid(b.float())
    g = -a_log.float().exp() * F.softplus(a.float() + dt_bias.float())
    o, S = gdn_step(q, k, F.silu(v).view(B, H, K), g, beta, state, scale=scale)
    state.copy_(S)
    return _norm_gate_ref(o, gate, norm_weight, norm_eps, x_dtype)


def swiglu_ref(gate_up):
    """[B, 2 I] = [gate | up] -> silu(gate) * up [B, I], as model.MLP computes it."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# ----------------------------------------------------------------------------- Triton kernels

@triton.jit
def _rnd(x, dt):
    """x (fp32) rounded to dt and back: where the eager model keeps an intermediate in dt, so does the kernel."""
    if dt != tl.float32:
        x = _cast(x, dt).to(tl.float32)
    return x


@triton.jit
def _rnd_to(x, NAME: tl.constexpr):
    """_rnd to a dtype given by name ("fp32", "bf16", "fp16"): dtypes that no tensor of the kernel carries."""
    if NAME == "bf16":
        x = _rnd(x, tl.bfloat16)
    elif NAME == "fp16":
        x = _rnd(x, tl.float16)
    return x


@triton.jit
def _rms_norm_kernel(x, y, w, out, res, eps, D, HAS_Y: tl.constexpr, BD: tl.constexpr):
    """One row: r = x + y (rounded to the residual's dtype), out = w * RMSNorm(r) (normalised in fp32, rounded
    before the weight, as model.RMSNorm)."""
    b = tl.program_id(0)
    d = tl.arange(0, BD)
    m = d < D
    r = tl.load(x + b * D + d, mask=m, other=0.).to(tl.float32)  # [BD]
    if HAS_Y:
        r = _rnd(r + tl.load(y + b * D + d, mask=m, other=0.).to(tl.float32), res.dtype.element_ty)
    tl.store(res + b * D + d, _cast(r, res.dtype.element_ty), mask=m)
    h = _rnd(r * tl.rsqrt(tl.sum(r * r, axis=0) / D + eps), res.dtype.element_ty)
    tl.store(out + b * D + d, _cast(h * tl.load(w + d, mask=m).to(tl.float32), out.dtype.element_ty), mask=m)


@triton.jit
def _rope(x1, x2, c, s, dt):
    """HF's RoPE on the two halves of a head, each product and the sum rounded to dt as in model.apply_rope."""
    c, s = _rnd(c, dt), _rnd(s, dt)
    return _rnd(_rnd(x1 * c, dt) - _rnd(x2 * s, dt), dt), _rnd(_rnd(x2 * c, dt) + _rnd(x1 * s, dt), dt)


@triton.jit
def _rope_cache_kernel(q, k, v, cos, sin, pos, kc, vc, qo, sq, sk, sv, L, H, HKV, K: tl.constexpr,
                       BH: tl.constexpr):
    """Program (row b, head j): j < H rotates query head j into qo; j >= H rotates key head j - H into the key
    cache at pos and copies value head j - H into the value cache. sq, sk, sv: row strides of q, k, v."""
    b, j = tl.program_id(0), tl.program_id(1)
    p = tl.load(pos)
    d = tl.arange(0, BH)  # the first half of the head; the second is d + K // 2
    m = d < K // 2
    c = tl.load(cos + p * K + d, mask=m, other=0.)  # [BH] fp32 (both halves share it)
    s = tl.load(sin + p * K + d, mask=m, other=0.)
    if j < H:
        src = q + b * sq + j * K
        x1, x2 = tl.load(src + d, mask=m, other=0.), tl.load(src + K // 2 + d, mask=m, other=0.)
        o1, o2 = _rope(x1.to(tl.float32), x2.to(tl.float32), c, s, x1.dtype)
        dst = qo + (b * H + j) * K
        tl.store(dst + d, _cast(o1, qo.dtype.element_ty), mask=m)
        tl.store(dst + K // 2 + d, _cast(o2, qo.dtype.element_ty), mask=m)
    else:
        src = k + b * sk + (j - H) * K
        x1, x2 = tl.load(src + d, mask=m, other=0.), tl.load(src + K // 2 + d, mask=m, other=0.)
        o1, o2 = _rope(x1.to(tl.float32), x2.to(tl.float32), c, s, x1.dtype)
        slot = ((b * HKV + j - H).to(tl.int64) * L + p) * K
        tl.store(kc + slot + d, _cast(o1, kc.dtype.element_ty), mask=m)
        tl.store(kc + slot + K // 2 + d, _cast(o2, kc.dtype.element_ty), mask=m)
        src = v + b * sv + (j - H) * K
        for half in tl.static_range(2):
            x = tl.load(src + half * (K // 2) + d, mask=m, other=0.).to(tl.float32)
            tl.store(vc + slot + half * (K // 2) + d, _cast(x, vc.dtype.element_ty), mask=m)


@triton.jit
def _attend_kernel(q, kc, vc, pos, y, ms, ls, accs, scale, L, H, HKV, NS, SPLIT, G: tl.constexpr,
                   GP: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
                   SINGLE: tl.constexpr):
    """Program (row b and kv head, split sp): the G query heads of the group against keys sp*SPLIT .. (sp+1)*SPLIT-1
    that are <= pos, an online softmax over blocks of BN keys in base 2. The query tile has GP >= 16 rows (the
    matrix units' minimum; rows past G are zero and never stored). SINGLE (one split): the normalised output;
    else the split's running max, sum and unnormalised output for the combine kernel (max -inf, sum 0 when the
    split lies wholly after pos)."""
    bk, sp = tl.program_id(0), tl.program_id(1)
    b, kvh = bk // HKV, bk % HKV
    n_keys = tl.load(pos).to(tl.int32) + 1
    start = sp * SPLIT
    stop = tl.minimum(start + SPLIT, n_keys)
    g, d = tl.arange(0, GP), tl.arange(0, BK)
    mg, md = g < G, d < K
    heads = b * H + kvh * G + g  # [GP] rows of q and y
    qt = tl.load(q + heads[:, None] * K + d[None, :], mask=mg[:, None] & md[None, :], other=0.)  # [GP, BK]
    qt = qt.to(kc.dtype.element_ty)  # only ever widens (bf16 queries, fp32 cache under autocast)
    base = bk.to(tl.int64) * L * K
    mx = tl.full([GP], float("-inf"), tl.float32)
    sm = tl.zeros([GP], dtype=tl.float32)
    acc = tl.zeros([GP, BK], dtype=tl.float32)
    for n0 in range(start, stop, BN):
        n = n0 + tl.arange(0, BN)
        mn = n < stop
        kv = base + n[:, None] * K + d[None, :]
        kt = tl.load(kc + kv, mask=mn[:, None] & md[None, :], other=0.)  # [BN, BK]
        # the scores rounded to the queries' dtype, as the eager step's q @ k^T leaves them (bf16 in bf16 decoding)
        s = _rnd(_dot(qt, tl.trans(kt), PREC), q.dtype.element_ty) * (scale * 1.4426950408889634)
        s = tl.where(mn[None, :], s, float("-inf"))
        mx_new = tl.maximum(mx, tl.max(s, axis=1))  # finite: every block has a key <= pos
        alpha = tl.exp2(mx - mx_new)
        p = tl.exp2(s - mx_new[:, None])  # [GP, BN]
        vt = tl.load(vc + kv, mask=mn[:, None] & md[None, :], other=0.)  # [BN, BK]
        sm = sm * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(_cast(p, vt.dtype), vt, PREC)
        mx = mx_new
    if SINGLE:
        tl.store(y + heads[:, None] * K + d[None, :], _cast(acc / sm[:, None], y.dtype.element_ty),
                 mask=mg[:, None] & md[None, :])
    else:
        i = heads * NS + sp
        tl.store(ms + i, mx, mask=mg)
        tl.store(ls + i, sm, mask=mg)
        tl.store(accs + i[:, None] * K + d[None, :], acc, mask=mg[:, None] & md[None, :])


@triton.jit
def _attend_combine_kernel(ms, ls, accs, y, NS, K: tl.constexpr, BK: tl.constexpr, NSP: tl.constexpr):
    """Program (row b, query head): o = sum_j 2^(m_j - M) acc_j / sum_j 2^(m_j - M) l_j over the splits j, M their
    max (finite: split 0 holds key 0)."""
    h = tl.program_id(0)
    j, d = tl.arange(0, NSP), tl.arange(0, BK)
    mj, md = j < NS, d < K
    m = tl.load(ms + h * NS + j, mask=mj, other=float("-inf"))  # [NSP]
    w = tl.exp2(m - tl.max(m, axis=0))
    sm = tl.sum(tl.load(ls + h * NS + j, mask=mj, other=0.) * w, axis=0)
    a = tl.load(accs + (h * NS + j)[:, None] * K + d[None, :], mask=mj[:, None] & md[None, :], other=0.)  # [NSP, BK]
    tl.store(y + h * K + d, _cast(tl.sum(a * w[:, None], axis=0) / sm, y.dtype.element_ty), mask=md)


@triton.jit
def _norm_gate(o, gate, nw, c, mc, eps, K, DT, XDT: tl.constexpr, NDT: tl.constexpr):
    """The end of model.GLA and model.GDN on one head: o [BV] (fp32) -> o_norm(o) * silu(gate), with their roundings:
    o to proj's dtype DT then XDT, the norm to XDT then NDT, silu to DT."""
    o = _rnd_to(_rnd(o, DT), XDT)
    o = _rnd_to(o * tl.rsqrt(tl.sum(o * o, axis=0) / K + eps), XDT)
    o = _rnd_to(o * tl.load(nw + c, mask=mc, other=0.).to(tl.float32), NDT)
    return o * _rnd(gate * tl.sigmoid(gate), DT)


@triton.jit
def _gla_decode_kernel(proj, gw, gb, state, nw, out, eps, scale, H, R, NP, K: tl.constexpr, BK: tl.constexpr,
                       BR: tl.constexpr, XDT: tl.constexpr, NDT: tl.constexpr):
    """Program (row b, head h), proj row = [q | k | v | g_proj | z], each of the first four H*K wide, z R wide:
        g = logsigmoid(gk_weight_h z + gk_bias_h) / 16              (gk_proj[1], in proj's dtype as eager's linear)
        S = diag(exp(g)) S + k^T v                                  (fp32, in place)
        o = scale q S -> out = g_norm(o) * silu(g_proj x)           (_norm_gate)"""
    b, h = tl.program_id(0), tl.program_id(1)
    c, r = tl.arange(0, BK), tl.arange(0, BR)
    mc, mr = c < K, r < R
    DT = proj.dtype.element_ty
    row = proj + b * NP + h * K
    q = tl.load(row + c, mask=mc, other=0.).to(tl.float32)  # [BK]
    k = tl.load(row + H * K + c, mask=mc, other=0.).to(tl.float32)
    v = tl.load(row + 2 * H * K + c, mask=mc, other=0.).to(tl.float32)  # [BV] (V = K)
    gate = tl.load(row + 3 * H * K + c, mask=mc, other=0.).to(tl.float32)
    z = tl.load(proj + b * NP + 4 * H * K + r, mask=mr, other=0.).to(tl.float32)  # [BR]
    wz = _rnd(tl.load(gw + (h * K + c)[:, None] * R + r[None, :], mask=mc[:, None] & mr[None, :],
                      other=0.).to(tl.float32), DT)  # [BK, BR]
    gl = _rnd(tl.sum(wz * z[None, :], axis=1) + _rnd(tl.load(gb + h * K + c, mask=mc, other=0.).to(tl.float32),
                                                     DT), DT)
    g = (tl.minimum(gl, 0.) - tl.log(1. + tl.exp(-tl.abs(gl)))) / 16  # logsigmoid / 16, [BK]
    sp = state + (b * H + h).to(tl.int64) * K * K + c[:, None] * K + c[None, :]
    msk = mc[:, None] & mc[None, :]
    S = tl.exp(g)[:, None] * tl.load(sp, mask=msk, other=0.) + k[:, None] * v[None, :]  # [BK, BV]
    tl.store(sp, S, mask=msk)
    o = _norm_gate(scale * tl.sum(q[:, None] * S, axis=0), gate, nw, c, mc, eps, K, DT, XDT, NDT)  # [BV]
    tl.store(out + b * H * K + h * K + c, _cast(o, out.dtype.element_ty), mask=mc)


@triton.jit
def _silu_l2norm(x, DT, NORM: tl.constexpr):
    """silu(x) rounded to DT (model.GDN's F.silu of a projection), then NORM: l2norm, x / sqrt(sum x^2 + 1e-6) in
    fp32 rounded to DT (model.GDN.l2norm)."""
    x = _rnd(x * tl.sigmoid(x), DT)
    if NORM:
        x = _rnd(x * tl.rsqrt(tl.sum(x * x, axis=0) + 1e-6), DT)
    return x


@triton.jit
def _gdn_decode_kernel(proj, a_log, dt_bias, state, nw, out, eps, scale, H, NP, K: tl.constexpr, BK: tl.constexpr,
                       XDT: tl.constexpr, NDT: tl.constexpr):
    """Program (row b, head h), proj row = [q | k | v | g_proj | a | b], the first four H*K wide, a and b H wide:
        q, k = l2norm(silu(.)), v = silu(.)                         (each rounded to proj's dtype, as model.GDN)
        beta = sigmoid(b_h), g = -exp(A_log_h) softplus(a_h + dt_bias_h)          (fp32 scalars)
        S = exp(g) S;  S += beta k (v - S^T k)^T                    (the delta rule, fp32, in place)
        o = scale S^T q -> out = o_norm(o) * silu(g_proj x)         (_norm_gate)"""
    b, h = tl.program_id(0), tl.program_id(1)
    c = tl.arange(0, BK)
    mc = c < K
    DT = proj.dtype.element_ty
    row = proj + b * NP + h * K
    q = _silu_l2norm(tl.load(row + c, mask=mc, other=0.).to(tl.float32), DT, True)  # [BK]
    k = _silu_l2norm(tl.load(row + H * K + c, mask=mc, other=0.).to(tl.float32), DT, True)
    v = _silu_l2norm(tl.load(row + 2 * H * K + c, mask=mc, other=0.).to(tl.float32), DT, False)  # [BV] (V = K)
    gate = tl.load(row + 3 * H * K + c, mask=mc, other=0.).to(tl.float32)
    x = tl.load(proj + b * NP + 4 * H * K + h).to(tl.float32) + tl.load(dt_bias + h).to(tl.float32)
    # softplus(x) = max(x, 0) + log1p(exp(-|x|)); log1p(e) as log(1 + e) e / ((1 + e) - 1) (Goldberg), which keeps
    # the low bits of a small e that log(1 + e) alone loses
    e = tl.exp(-tl.abs(x))
    d = (1. + e) - 1.  # 0 where 1 + e rounds to 1: there log1p(e) = e
    softplus = tl.maximum(x, 0.) + tl.where(d == 0., e, tl.log(1. + e) * e / tl.where(d == 0., 1., d))
    g = -tl.exp(tl.load(a_log + h).to(tl.float32)) * softplus
    beta = tl.sigmoid(tl.load(proj + b * NP + 4 * H * K + H + h).to(tl.float32))
    sp = state + (b * H + h).to(tl.int64) * K * K + c[:, None] * K + c[None, :]
    msk = mc[:, None] & mc[None, :]
    S = tl.exp(g) * tl.load(sp, mask=msk, other=0.)  # [BK, BV]
    read = tl.sum(k[:, None] * S, axis=0)  # [BV]: what the state stores under k
    S = S + (beta * k)[:, None] * (v - read)[None, :]
    tl.store(sp, S, mask=msk)
    o = _norm_gate(scale * tl.sum(q[:, None] * S, axis=0), gate, nw, c, mc, eps, K, DT, XDT, NDT)  # [BV]
    tl.store(out + b * H * K + h * K + c, _cast(o, out.dtype.element_ty), mask=mc)


@triton.jit
def _swiglu_kernel(gu, out, I, BLOCK: tl.constexpr):
    b, i = tl.program_id(0), tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = i < I
    g = tl.load(gu + b * 2 * I + i, mask=m, other=0.)
    u = tl.load(gu + b * 2 * I + I + i, mask=m, other=0.).to(tl.float32)
    gf = g.to(tl.float32)
    tl.store(out + b * I + i, _cast(_rnd(gf * tl.sigmoid(gf), g.dtype) * u, out.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------- launchers

@functools.lru_cache(maxsize=None)
def _sm_count(device):
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def attend_split(L, rows, device):
    """Keys per program for a cache of L slots and rows = B * Hkv (row, kv head) pairs: about two programs per SM
    in all, at most MAX_SPLITS splits, a multiple of BN. Fixed by L, not by pos, so a recorded step keeps its grid;
    the splits after pos exit at once."""
    blocks = triton.cdiv(L, BN)
    n = min(blocks, MAX_SPLITS, max(1, 2 * _sm_count(device) // rows))
    return triton.cdiv(blocks, n) * BN


def _rms_norm_triton(x, y, weight, eps):
    B, D = x.shape
    rdt = x.dtype if y is None else torch.promote_types(x.dtype, y.dtype)
    res = torch.empty(B, D, dtype=rdt, device=x.device)
    out = torch.empty(B, D, dtype=torch.promote_types(rdt, weight.dtype), device=x.device)
    _rms_norm_kernel[(B,)](x, x if y is None else y, weight, out, res, eps, D, HAS_Y=y is not None, BD=_p2(D),
                           num_warps=4)
    return out, res


def _rope_cache_write_triton(q, k, v, cos, sin, pos, k_cache, v_cache):
    B, H, K = q.shape
    Hkv, L = k_cache.shape[1], k_cache.shape[2]
    for t in (q, k, v):
        assert t.stride(-1) == 1 and t.stride(-2) == K, "heads must be contiguous within a row"
    qo = torch.empty(B, H, K, dtype=q.dtype, device=q.device)
    _rope_cache_kernel[(B, H + Hkv)](q, k, v, cos, sin, pos, k_cache, v_cache, qo, q.stride(0), k.stride(0),
                                     v.stride(0), L, H, Hkv, K=K, BH=_p2(K // 2), num_warps=1)
    return qo


def _attend_triton(q, k_cache, v_cache, pos, scale, split):
    B, H, K = q.shape
    Hkv, L = k_cache.shape[1], k_cache.shape[2]
    split = split or attend_split(L, B * Hkv, q.device)
    NS = triton.cdiv(L, split)
    y = torch.empty(B, H, K, dtype=q.dtype, device=q.device)
    ms = ls = accs = y  # unused with one split
    if NS > 1:
        ms, ls = (torch.empty(B * H * NS, dtype=torch.float32, device=q.device) for _ in range(2))
        accs = torch.empty(B * H * NS, K, dtype=torch.float32, device=q.device)
    G = H // Hkv
    _attend_kernel[(B * Hkv, NS)](q.contiguous(), k_cache, v_cache, pos, y, ms, ls, accs, scale, L, H, Hkv, NS, split,
                                  G=G, GP=max(16, _p2(G)), K=K, BK=_p2(K), BN=BN,
                                  PREC="ieee" if k_cache.dtype == torch.float32 else "tf32", SINGLE=NS == 1,
                                  num_warps=4)
    if NS > 1:
        _attend_combine_kernel[(B * H,)](ms, ls, accs, y, NS, K=K, BK=_p2(K), NSP=_p2(NS), num_warps=4)
    return y


def _gla_decode_triton(proj, gk_weight, gk_bias, state, norm_weight, norm_eps, scale, H, x_dtype):
    B, HK, R = proj.shape[0], gk_weight.shape[0], gk_weight.shape[1]
    K = HK // H
    assert proj.stride(-1) == 1 and state.is_contiguous() and state.dtype == torch.float32
    ndt = torch.promote_types(x_dtype, norm_weight.dtype)
    out = torch.empty(B, HK, dtype=torch.promote_types(ndt, proj.dtype), device=proj.device)
    _gla_decode_kernel[(B, H)](proj, gk_weight, gk_bias, state, norm_weight, out, norm_eps, scale, H, R,
                               proj.stride(0), K=K, BK=_p2(K), BR=_p2(R), XDT=_NAME[x_dtype], NDT=_NAME[ndt],
                               num_warps=4)
    return out


def _gdn_decode_triton(proj, a_log, dt_bias, state, norm_weight, norm_eps, scale, H, x_dtype):
    B, K = proj.shape[0], state.shape[-1]
    assert proj.shape[1] == 4 * H * K + 2 * H and state.shape[-2] == K, "one square K x K state per head"
    assert proj.stride(-1) == 1 and state.is_contiguous() and state.dtype == torch.float32
    ndt = torch.promote_types(x_dtype, norm_weight.dtype)
    out = torch.empty(B, H * K, dtype=torch.promote_types(ndt, proj.dtype), device=proj.device)
    _gdn_decode_kernel[(B, H)](proj, a_log, dt_bias, state, norm_weight, out, norm_eps, scale, H, proj.stride(0), K=K,
                               BK=_p2(K), XDT=_NAME[x_dtype], NDT=_NAME[ndt], num_warps=4)
    return out


def _swiglu_triton(gate_up):
    B, I = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(B, I, dtype=gate_up.dtype, device=gate_up.device)
    BLOCK = min(1024, _p2(I))
    _swiglu_kernel[(B, triton.cdiv(I, BLOCK))](gate_up, out, I, BLOCK=BLOCK, num_warps=4)
    return out


# ----------------------------------------------------------------------------- custom ops (the step's entry points)
# One op per fused kernel: Triton on CUDA (or in the interpreter), the reference on CPU. As custom ops, torch.compile
# traces them as single calls (fake implementations give their output shapes) and keeps their in-place writes.

@torch.library.custom_op("nanohybrid::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, y: Optional[torch.Tensor], weight: torch.Tensor,
             eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * RMSNorm(x + y), x + y) for x, y [B, D] (y None: RMSNorm(x), and a copy of x as the residual)."""
    if use_triton(x):
        return _rms_norm_triton(x.contiguous(), None if y is None else y.contiguous(), weight, eps)
    out, r = rms_norm_ref(x, y, weight, eps)
    return out, r.clone() if y is None else r


@rms_norm.register_fake
def _(x, y, weight, eps):
    rdt = x.dtype if y is None else torch.promote_types(x.dtype, y.dtype)
    return x.new_empty(x.shape, dtype=torch.promote_types(rdt, weight.dtype)), x.new_empty(x.shape, dtype=rdt)


@torch.library.custom_op("nanohybrid::rope_cache_write", mutates_args=("k_cache", "v_cache"))
def rope_cache_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """RoPE(q) [B, H, K]; RoPE(k) and v written into the caches [B, Hkv, L, K] at slot pos (rope_cache_write_ref)."""
    if use_triton(q):
        return _rope_cache_write_triton(q, k, v, cos, sin, pos, k_cache, v_cache)
    return rope_cache_write_ref(q, k, v, cos, sin, pos, k_cache, v_cache)


@rope_cache_write.register_fake
def _(q, k, v, cos, sin, pos, k_cache, v_cache):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("nanohybrid::attend", mutates_args=())
def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, scale: float,
           split: int = 0) -> torch.Tensor:
    """Attention of q [B, H, K] over cache slots 0..pos -> [B, H, K]; split = keys per program (0: attend_split)."""
    if use_triton(q):
        return _attend_triton(q, k_cache, v_cache, pos, scale, split)
    return attend_ref(q, k_cache, v_cache, pos, scale)


@attend.register_fake
def _(q, k_cache, v_cache, pos, scale, split=0):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("nanohybrid::gla_decode", mutates_args=("state",))
def gla_decode(proj: torch.Tensor, gk_weight: torch.Tensor, gk_bias: torch.Tensor, state: torch.Tensor,
               norm_weight: torch.Tensor, norm_eps: float, scale: float, H: int,
               x_dtype: torch.dtype) -> torch.Tensor:
    """One GLA step (gla_decode_ref): output [B, H K] for o_proj; state updated in place."""
    if use_triton(proj):
        return _gla_decode_triton(proj, gk_weight, gk_bias, state, norm_weight, norm_eps, scale, H, x_dtype)
    return gla_decode_ref(proj, gk_weight, gk_bias, state, norm_weight, norm_eps, scale, H, x_dtype)


@gla_decode.register_fake
def _(proj, gk_weight, gk_bias, state, norm_weight, norm_eps, scale, H, x_dtype):
    dt = torch.promote_types(torch.promote_types(x_dtype, norm_weight.dtype), proj.dtype)
    return proj.new_empty((proj.shape[0], gk_weight.shape[0]), dtype=dt)


@torch.library.custom_op("nanohybrid::gdn_decode", mutates_args=("state",))
def gdn_decode(proj: torch.Tensor, a_log: torch.Tensor, dt_bias: torch.Tensor, state: torch.Tensor,
               norm_weight: torch.Tensor, norm_eps: float, scale: float, H: int,
               x_dtype: torch.dtype) -> torch.Tensor:
    """One Gated DeltaNet step (gdn_decode_ref): output [B, H K] for o_proj; state updated in place."""
    if use_triton(proj):
        return _gdn_decode_triton(proj, a_log, dt_bias, state, norm_weight, norm_eps, scale, H, x_dtype)
    return gdn_decode_ref(proj, a_log, dt_bias, state, norm_weight, norm_eps, scale, H, x_dtype)


@gdn_decode.register_fake
def _(proj, a_log, dt_bias, state, norm_weight, norm_eps, scale, H, x_dtype):
    dt = torch.promote_types(torch.promote_types(x_dtype, norm_weight.dtype), proj.dtype)
    return proj.new_empty((proj.shape[0], H * state.shape[-1]), dtype=dt)


@torch.library.custom_op("nanohybrid::swiglu", mutates_args=())
def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [B, 2 I] = [gate | up] -> [B, I]."""
    if use_triton(gate_up):
        return _swiglu_triton(gate_up.contiguous())
    return swiglu_ref(gate_up)


@swiglu.register_fake
def _(gate_up):
    return gate_up.new_empty((gate_up.shape[0], gate_up.shape[1] // 2))


# ----------------------------------------------------------------------------- the floor of a step

def step_bytes(model, batch, pos):
    """Bytes one decoding step at position pos must move (the floor's numerator): every weight matrix once (the
    embedding only as a tied head; its B rows are negligible), keys and values 0..pos of every attn layer, the
    fp32 state of every gla and gdn layer read and written. Merged copies of weights replace, not add to, what is
    read."""
    c = model.config
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                  if n != "model.embed_tokens.weight" or p is model.lm_head.weight)  # tied: listed once, as embed
    elt = model.lm_head.weight.element_size()
    kv = 2 * batch * c.num_key_value_heads * (pos + 1) * c.head_dim * elt
    state = 2 * batch * c.num_attention_heads * c.head_dim * c.head_dim * 4
    return weights + sum(kv if kind == "attn" else state for kind in c.mixers)
