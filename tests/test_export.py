"""export.py: the all-softmax teacher as plain transformers classes (logits equal on the CPU), hybrids as
flash-linear-attention's GLA / GatedDeltaNet classes (strict loading and logits on the CPU with fla's Triton pieces
swapped for their PyTorch math; the real kernels on CUDA), refusals of what fla cannot express, and the tokenizer
files (a GGUF's metadata as tokenizer.json: the same ids through transformers as through tokenizer.py).

    python -m pytest -q tests/test_export.py                      # CPU
    python -m pytest -q tests/test_export.py -k cuda              # a GPU with flash-linear-attention installed
"""

import json
import os

import pytest
import torch
import torch.nn.functional as F

import export
import model as M
from conftest import make_text, write_tokenizer
from kernels import gla_recurrent_ref
from teachers import from_pretrained
from tokenizer import load_tokenizer


def tiny_hf(folder, kind, tie=False, eps=1e-5, head_dim=None, layers=4):
    """A tiny random transformers model and a BPE tokenizer saved in `folder`, weights redrawn larger so every term
    shows in the logits."""
    import transformers as tf
    os.makedirs(folder, exist_ok=True)
    vocab = write_tokenizer(folder, make_text(50))
    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie,
                  rms_norm_eps=eps, rope_theta=50000.0, bos_token_id=1, eos_token_id=2)
    cfg = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config}[kind](
        **common, **({"head_dim": head_dim} if head_dim else {}))
    m = tf.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.15)
    m.save_pretrained(folder)
    return folder


def hybrid_checkpoint(teacher, path, gla_layers, tokenizer=None, mixer="gla"):
    """The teacher with GLA (or GDN) in `gla_layers`, every weight perturbed (norms and gate biases away from their
    init of ones and zeros, so that a swapped name shows in the logits), saved as a distill checkpoint."""
    torch.manual_seed(1)
    student = from_pretrained(teacher)
    for i in gla_layers:
        student.set_mixer(i, {"gla": M.GLA, "gdn": M.GDN}[mixer](student.config), mixer)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    M.save_checkpoint(path, student, stage="distill", config={"teacher": teacher}, parent=None, metrics={},
                      tokenizer=tokenizer or teacher)
    return path


# ------------------------------------------------------------------------------------------------ transformers

@pytest.mark.parametrize("kind,tie,head_dim", [("llama", True, None), ("qwen2", False, None), ("qwen3", False, 32)])
def test_teacher_exports_to_transformers(tmp_path, kind, tie, head_dim):
    folder = tiny_hf(str(tmp_path / "teacher"), kind, tie, head_dim=head_dim)
    out = export.main(export.Config(input=folder, out=str(tmp_path / "hf"), verify="on"))
    assert out["target"] == export.HF_CLASSES[kind] and out["max_abs_logit_diff"] < 1e-4
    config = json.load(open(tmp_path / "hf" / "config.json"))
    assert config["architectures"] == [export.HF_CLASSES[kind]] and config["tie_word_embeddings"] == tie


def test_checkpoint_of_the_teacher_and_bf16(tiny_teacher, tmp_path):
    """A project checkpoint (all softmax) exports as the teacher's class, its tokenizer copied from the source."""
    ckpt = str(tmp_path / "t" / "ckpt.pt")
    M.save_checkpoint(ckpt, from_pretrained(tiny_teacher), stage="transfer", config={}, parent=None, metrics={},
                      tokenizer=tiny_teacher)
    out = export.main(export.Config(input=ckpt, out=str(tmp_path / "hf"), dtype="bfloat16", verify="on"))
    assert out["target"] == "LlamaForCausalLM" and out["max_abs_logit_diff"] < 0.1  # bf16 weights vs fp32
    ids = load_tokenizer(str(tmp_path / "hf")).encode("the cat 42")
    assert ids == load_tokenizer(tiny_teacher).encode("the cat 42")


# ------------------------------------------------------------------------------------------------------- fla

@pytest.fixture
def fla_on_cpu(monkeypatch):
    """flash-linear-attention's model classes with their Triton pieces swapped for the same math in PyTorch, so
    that the exported folder runs on the CPU: GLA's recurrence (kernels.gla_recurrent_ref, token by token), the
    fused RMSNorm (+ residual), the fused RMSNorm * swish gate, the fused SwiGLU, RoPE, and flash-attn (SDPA)."""
    pytest.importorskip("fla.models", reason="flash-linear-attention (fla.models; fla-core has no classes) is missing")
    import fla
    import fla.layers.attn as fla_attn
    import fla.layers.gated_deltanet as fla_gdn
    import fla.layers.gla as fla_gla
    from fla.modules import FusedRMSNormGated, RMSNorm, RotaryEmbedding
    from fla.modules.mlp import SwiGLULinear

    def gla(q, k, v, gk=None, g=None, initial_state=None, output_final_state=False, **_):
        return gla_recurrent_ref(q, k, v, gk if gk is not None else g, initial_state=initial_state,
                                 output_final_state=output_final_state)

    def rms(x, weight, eps):
        h = x.float()
        return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def rms_norm(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        x = x if residual is None else x + residual
        return (rms(x, self.weight, self.eps), x) if prenorm else rms(x, self.weight, self.eps)

    def rotary(self, q, k, seqlen_offset=0, **_):
        inv = 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float32) / self.dim))
        freqs = torch.arange(seqlen_offset, seqlen_offset + q.shape[1]).float()[:, None] * inv
        cos, sin = torch.cat((freqs, freqs), -1).cos()[:, None], torch.cat((freqs, freqs), -1).sin()[:, None]
        return M.apply_rope(q, cos, sin), M.apply_rope(k, cos, sin)

    def gdn(q, k, v, g, beta, A_log, dt_bias, use_qk_l2norm_in_kernel, use_beta_sigmoid_in_kernel,
            use_gate_in_kernel, allow_neg_eigval=False, scale=None, initial_state=None, cu_seqlens=None, **_):
        """The gated delta rule as fla's GatedDeltaNet layer calls its kernel (q/k l2norm, sigmoid beta and the decay
        gate inside), through fla's own PyTorch references: naive_gdn_gate and naive_recurrent_gated_delta_rule."""
        from fla.ops.gated_delta_rule.gate import naive_gdn_gate
        from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
        assert use_qk_l2norm_in_kernel and use_beta_sigmoid_in_kernel and use_gate_in_kernel and not allow_neg_eigval
        assert initial_state is None and cu_seqlens is None   # no cache, no packed sequences in these tests
        q, k = (x.float() * torch.rsqrt(x.float().pow(2).sum(-1, keepdim=True) + 1e-6) for x in (q, k))
        o, _ = naive_recurrent_gated_delta_rule(q, k, v, beta.float().sigmoid(), naive_gdn_gate(g, A_log, dt_bias),
                                                scale=scale)
        return o.to(v.dtype), None

    monkeypatch.setattr(fla_gla, "chunk_gla", gla)
    monkeypatch.setattr(fla_gla, "fused_recurrent_gla", gla)
    monkeypatch.setattr(fla_gdn, "chunk_gated_delta_rule", gdn)
    monkeypatch.setattr(fla_gdn, "fused_recurrent_gated_delta_rule", gdn)
    monkeypatch.setattr(RMSNorm, "forward", rms_norm)
    monkeypatch.setattr(FusedRMSNormGated, "forward", lambda self, x, g, *a, **k: rms(x, self.weight, self.eps)
                        * F.silu(g))
    monkeypatch.setattr(SwiGLULinear, "forward", lambda self, x, y, w, b: F.linear(F.silu(x) * y, w, b))
    monkeypatch.setattr(RotaryEmbedding, "forward", rotary)
    monkeypatch.setattr(fla_attn, "flash_attn_func", export.sdpa_flash_attn)
    return fla


def load_fla(folder):
    """The export through transformers' Auto class, asserting that every tensor matched (strict loading)."""
    from transformers import AutoModelForCausalLM
    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    return model.eval()


@pytest.mark.parametrize("mixer,layers", [("gla", (1, 2)), ("gla", (0, 1, 2, 3)), ("gdn", (0, 2, 3))])
def test_hybrid_loads_and_matches_in_fla(fla_on_cpu, tiny_teacher, tmp_path, mixer, layers):
    """A GLA or GDN student of model.py exports to fla's class, and that model (its kernels as PyTorch: GLA through
    our recurrence, the gated delta rule through fla's own references) gives our logits: names, head layout, gates,
    norms and the attn dict agree."""
    ckpt = hybrid_checkpoint(tiny_teacher, str(tmp_path / "distill" / "ckpt.pt"), layers, mixer=mixer)
    out = export.main(export.Config(input=ckpt, out=str(tmp_path / "hf"), verify="off"))
    assert out["target"] == export.FLA_CLASSES[mixer][0]
    config = json.load(open(tmp_path / "hf" / "config.json"))
    assert (config["attn"] or {}).get("layers", []) == [i for i in range(4) if i not in layers]
    theirs, ours = load_fla(str(tmp_path / "hf")), M.load_checkpoint(ckpt)[0].eval()
    idx = torch.randint(0, ours.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (theirs(idx).logits - ours(idx)).abs().max().item() < 1e-4


def fla_gdn_as_ours(fla, attn_layers, eps=1e-5):
    """A random fla GatedDeltaNetForCausalLM and its tensors under our names (model.py's names, GDN layers named as
    fla's layer, the way the GDN mixer lands in model.py): what a GDN checkpoint will hold."""
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM
    torch.manual_seed(0)
    cfg = GatedDeltaNetConfig(hidden_size=64, head_dim=16, num_heads=4, expand_v=1.0, use_gate=True,
                              use_short_conv=False, intermediate_size=96, num_hidden_layers=3, vocab_size=128,
                              norm_eps=eps, attn={"layers": list(attn_layers), "num_heads": 4, "num_kv_heads": 2,
                                                  "rope_theta": 50000.0}, tie_word_embeddings=False)
    ref = GatedDeltaNetForCausalLM(cfg)
    ours = {}
    for name, t in ref.state_dict().items():
        name = name.replace("model.embeddings.", "model.embed_tokens.").replace(".attn_norm.", ".input_layernorm.")
        ours[name.replace(".mlp_norm.", ".post_attention_layernorm.").replace(".attn.", ".self_attn.")] = t
    mc = dict(arch="llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=eps, rope_theta=50000.0,
              rope_scaling=None, max_position_embeddings=2048, tie_word_embeddings=False, attention_bias=False,
              qk_norm=False, mixers=["attn" if i in attn_layers else "gdn" for i in range(3)], gla_gate_rank=16,
              bos_token_id=1, eos_token_id=2)
    return ref, mc, ours


def test_gdn_export_maps_onto_fla(fla_on_cpu):
    """GDN layers export with fla's GatedDeltaNet config: the exported config builds a model whose strict load of the
    exported tensors reproduces the reference exactly."""
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM
    ref, mc, ours = fla_gdn_as_ours(fla_on_cpu, attn_layers=[1])
    assert export.target(mc) == "GatedDeltaNetForCausalLM"
    config = export.hf_config(mc, "float32")
    rebuilt = GatedDeltaNetForCausalLM(GatedDeltaNetConfig(**{k: v for k, v in config.items()
                                                               if k not in ("architectures", "model_type")}))
    rebuilt.load_state_dict(export.hf_state_dict(mc, ours), strict=True)
    for name, t in ref.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], t), name
    renamed = {k.replace(".o_norm.", ".g_norm."): v for k, v in ours.items()}
    with pytest.raises(ValueError, match="o_norm"):
        export.hf_state_dict(mc, renamed)


def test_refusals(tiny_teacher, tmp_path, fla_on_cpu):
    base = M.load_checkpoint(hybrid_checkpoint(tiny_teacher, str(tmp_path / "h" / "ckpt.pt"), (1, 2)))[0].config
    mc = dict(vars(base))
    for change, match in [(dict(rms_norm_eps=1e-6), "norm_eps"), (dict(gla_gate_rank=8), "gate_low_rank_dim=16"),
                          (dict(qk_norm=True, arch="qwen3"), "qk_norm"), (dict(attention_bias=True), "o_proj bias"),
                          (dict(head_dim=32), "head_dim"),
                          (dict(rope_scaling={"rope_type": "llama3"}), "RoPE"),
                          (dict(mixers=["attn", "gla", "gdn", "gla"]), "mixes")]:
        with pytest.raises(ValueError, match=match):
            export.target(dict(mc, **change))
    assert export.target(dict(mc, attention_bias=True, arch="qwen2")) == "GLAForCausalLM"  # q/k/v biases are fine
    assert export.target(dict(mc, rms_norm_eps=9.999999747378752e-06)) == "GLAForCausalLM"  # 1e-5 in a GGUF (float32)
    # an all-linear student has no softmax layer, so the attention limits do not apply
    assert export.target(dict(mc, qk_norm=True, mixers=["gla"] * 4)) == "GLAForCausalLM"


def test_verify_runs_fla_with_sdpa_and_puts_flash_attn_back(fla_on_cpu, tiny_teacher, tmp_path, monkeypatch):
    """export.verify on a machine without flash-attn (fla's Triton pieces as PyTorch here, so it runs on the CPU): the
    SDPA stand-in serves fla's softmax layers while it runs, and fla's module is as it was after."""
    import fla.layers.attn as fla_attn
    ckpt = hybrid_checkpoint(tiny_teacher, str(tmp_path / "distill" / "ckpt.pt"), (1, 2))
    export.main(export.Config(input=ckpt, out=str(tmp_path / "hf"), verify="off"))
    monkeypatch.setattr(fla_attn, "flash_attn_func", None)
    assert export.verify(str(tmp_path / "hf"), M.load_checkpoint(ckpt)[0].eval(), "cpu") < 1e-4
    assert fla_attn.flash_attn_func is None


def test_sdpa_stand_in_is_causal_gqa_attention():
    """The stand-in verify uses for flash-attn in fla's softmax layers equals causal GQA attention written out, and
    refuses what it does not implement (a sliding window)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 7, 4, 8, generator=g), torch.randn(2, 7, 2, 8, generator=g), torch.randn(2, 7, 2, 8, generator=g)
    k2, v2 = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)      # query head h reads kv head h // 2
    s = torch.einsum("bthd,bshd->bhts", q, k2) / 8 ** 0.5
    s = s.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
    ref = torch.einsum("bhts,bshd->bthd", s.softmax(-1), v2)
    assert (export.sdpa_flash_attn(q, k, v) - ref).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="window"):
        export.sdpa_flash_attn(q, k, v, window_size=(3, 0))
    with pytest.raises(ValueError, match="1 queries, 7 keys"):     # decoding from a cache: not this stand-in's case
        export.sdpa_flash_attn(q[:, -1:], k, v)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fla's Triton kernels need CUDA")
@pytest.mark.parametrize("mixer,layers", [("gla", (1, 2)), ("gdn", (0, 2, 3))])
def test_export_matches_on_cuda(tiny_teacher, tmp_path, mixer, layers):
    """The export run by fla's own kernels (chunk GLA or the chunked gated delta rule, fused norms, SwiGLU, RoPE) on
    CUDA against our model on CUDA, both fp32 (verify puts PyTorch's SDPA in flash-attn's place: flash-attn has no
    fp32)."""
    pytest.importorskip("fla.models", reason="flash-linear-attention (fla.models) is missing")
    ckpt = hybrid_checkpoint(tiny_teacher, str(tmp_path / "distill" / "ckpt.pt"), layers, mixer=mixer)
    out = export.main(export.Config(input=ckpt, out=str(tmp_path / "hf"), verify="on"))
    assert out["target"] == export.FLA_CLASSES[mixer][0] and out["max_abs_logit_diff"] < 2e-3, out


# -------------------------------------------------------------------------------------------------- tokenizer

def write_tokenizer_gguf(path, tokenizer_json):
    """The tokenizer of an HF tokenizer.json as llama.cpp stores it in a GGUF (tokens, types, merges, ids)."""
    from gguf import GGUFWriter
    tj = json.load(open(tokenizer_json))
    specials = {t["content"]: t["id"] for t in tj["added_tokens"]}
    vocab = {**tj["model"]["vocab"], **specials}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    w = GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]])
    w.add_bos_token_id(specials["<|im_start|>"])
    w.add_eos_token_id(specials["<|im_end|>"])
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


TEXTS = ["Hello world! 12345 ça va?  Two  spaces\n\nand\ttabs", "<|im_start|>user\nthe cat 2026.<|im_end|>\n",
         "VAR ABCDE = 12345. One of the special magic numbers for able-apple is: 1234567."]


def test_gguf_tokenizer_as_tokenizer_json(tiny_teacher, tmp_path):
    from transformers import AutoTokenizer
    gguf = write_tokenizer_gguf(tmp_path / "tok.gguf", os.path.join(tiny_teacher, "tokenizer.json"))
    folder = export.write_hf_tokenizer(gguf, str(tmp_path / "hf_tok"))
    ours, hf = load_tokenizer(gguf), AutoTokenizer.from_pretrained(folder)
    for text in TEXTS + make_text(20, seed=3):
        assert hf(text).input_ids == ours.encode(text), text
        assert load_tokenizer(folder).encode(text) == ours.encode(text)
    assert hf.eos_token == "<|im_end|>" and "<|im_start|>" in hf.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False)


def test_smollm2_tokenizer_as_tokenizer_json(tmp_path):
    """The real default teacher's GGUF tokenizer (only where teachers.py has it cached: no download in tests)."""
    from transformers import AutoTokenizer
    import teachers
    cache = os.environ.get("NANOHYBRID_CACHE") or os.path.expanduser("~/.cache/nanohybrid")
    path = os.path.join(cache, teachers.SMOLLM2_FILE)
    if not os.path.exists(path):
        pytest.skip(f"{path} not cached")
    hf = AutoTokenizer.from_pretrained(export.write_hf_tokenizer(path, str(tmp_path / "tok")))
    ours = load_tokenizer(path)
    for text in TEXTS + make_text(8, seed=4):
        assert hf(text).input_ids == ours.encode(text), text
