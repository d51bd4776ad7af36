"""model.py: the GLA equations of method.md token by token, decoding with a cache against full recomputation, the
CUDA-graph decoder and torch.compile against eager (GPU), generation, the checkpoint format. CPU, no network."""

import json
import math
import os
import types

import numpy as np
import pytest
import torch

from conftest import tokens
from model import GLA, ModelConfig, Transformer, decoder, generate, load_checkpoint, save_checkpoint


# ---------------------------------------------------------------------------------------------------- builders

def tiny_config(mixers, tie=False):
    return ModelConfig(arch="llama", vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=len(mixers),
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
                       tie_word_embeddings=tie, mixers=mixers)


def hybrid(mixers=("attn", "gla", "gla", "attn"), tie=False, seed=0):
    torch.manual_seed(seed)
    m = Transformer(tiny_config(list(mixers), tie)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # make norms and biases non-trivial too
    return m



def test_bad_checkpoints(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt: not a readable"):
        load_checkpoint(str(junk))
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: not a nanohybrid checkpoint"):
        load_checkpoint(str(tmp_path / "other.pt"))
    # Pickled objects are refused by weights_only loading.
    torch.save({"format": 1, "model": {}, "model_config": {}, "x": types.SimpleNamespace()}, tmp_path / "obj.pt")
    with pytest.raises(ValueError, match="obj.pt: not a readable"):
        load_checkpoint(str(tmp_path / "obj.pt"))
    m = hybrid()
    save_checkpoint(str(tmp_path / "ok.pt"), m, stage="t", config={}, parent=None, metrics={}, tokenizer="")
    ckpt = torch.load(tmp_path / "ok.pt", weights_only=True)
    del ckpt["model"]["model.layers.1.self_attn.g_proj.weight"]
    torch.save(ckpt, tmp_path / "cut.pt")
    with pytest.raises(ValueError, match=r"cut.pt: .*missing \['model.layers.1.self_attn.g_proj.weight'\]"):
        load_checkpoint(str(tmp_path / "cut.pt"))
    with pytest.raises(FileNotFoundError):
        load_checkpoint(str(tmp_path / "absent.pt"))
    with pytest.raises(TypeError, match="ckpt.config.opt"):
        save_checkpoint(str(tmp_path / "x.pt"), m, stage="t", config={"opt": object()}, parent=None, metrics={},
                        tokenizer="")

# ------------------------------------------------------------------------------------------- GLA, cache, checkpoints

def test_gla_follows_the_equations():
    """GLA.forward against method.md's recurrence, written out token by token from the module's weights."""
    torch.manual_seed(0)
    cfg = tiny_config(["gla"])
    gla, x = GLA(cfg), torch.randn(2, 11, 64)
    with torch.no_grad():
        gla.gk_proj[1].bias.normal_(0, 3)  # decays from ~0.8 to ~1 per step
        gla.g_norm.weight.normal_(1, 0.2)
        y = gla(x)
        H, K, W = 4, 16, lambda lin: lin.weight.double()
        xd = x.double()
        q, k, v, g = (xd @ W(p).T for p in (gla.q_proj, gla.k_proj, gla.v_proj, gla.g_proj))
        log_a = torch.nn.functional.logsigmoid(xd @ W(gla.gk_proj[0]).T @ W(gla.gk_proj[1]).T
                                               + gla.gk_proj[1].bias.double()) / 16
        S, ys = torch.zeros(2, H, K, K, dtype=torch.float64), []
        for t in range(11):
            qt, kt, vt, at = (z[:, t].view(2, H, K) for z in (q, k, v, log_a.exp()))
            S = at[..., None] * S + kt[..., None] * vt[..., None, :]
            o = torch.einsum("bhk,bhkv->bhv", qt, S) / math.sqrt(K)
            o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * gla.g_norm.weight.double()
            ys.append((o * torch.nn.functional.silu(g[:, t].view(2, H, K))).reshape(2, -1) @ W(gla.o_proj).T)
    assert (y.double() - torch.stack(ys, 1)).abs().max() < 1e-5


def test_cached_decoding_equals_recompute():
    m = hybrid(("attn", "gla", "gla", "attn"))
    idx = tokens(B=2, T=9, vocab=97)
    with torch.no_grad():
        # Cached: prefill 9, a second chunk of 4 (attention with an offset mask, GLA from a state), then 1 by 1.
        cache, seq, steps = m.new_cache(2, 24), idx, []
        steps.append(m(idx, cache=cache))
        more = tokens(B=2, T=4, vocab=97, seed=2)
        steps.append(m(more, cache=cache))
        seq = torch.cat([idx, more], 1)
        for _ in range(6):
            nxt = steps[-1][:, -1].argmax(-1, keepdim=True)
            steps.append(m(nxt, cache=cache))
            seq = torch.cat([seq, nxt], 1)
        assert cache.pos == seq.shape[1] == 19
        full = m(seq)
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-4
    # generate() (cached, greedy) == greedy decoding by full recomputation.
    out = generate(m, idx, max_new_tokens=8)
    ref = idx
    for _ in range(8):
        ref = torch.cat([ref, m(ref)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ref)


def test_cache_full_is_a_clear_error():
    m = hybrid()
    with torch.no_grad():
        cache = m.new_cache(1, 6)
        m(tokens(B=1, T=5, vocab=97), cache=cache)
        decoder(m, cache)(tokens(B=1, T=1, vocab=97))
        with pytest.raises(ValueError, match=r"cache full: 6 \+ 1 tokens > max_len 6"):
            m(tokens(B=1, T=1, vocab=97), cache=cache)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("amp", [False, True])
def test_cuda_graph_decoding_equals_eager(amp):
    # decoder() records the step as a CUDA graph on its second call and replays it after: the logits of every step
    # equal eager decoding's (fp32 weights, with and without bf16 autocast as eval.py runs it).
    m = hybrid(("attn", "gla", "gla", "attn")).cuda()
    idx = tokens(B=3, T=11, vocab=97).cuda()
    runs = []
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        for graphs in (True, False):
            cache = m.new_cache(3, 30)
            m(idx, cache=cache)
            step = decoder(m, cache, "eager") if graphs else (lambda x: m(x, cache=cache)[:, -1].float())
            x, logits = idx[:, -1:], []
            for _ in range(12):
                logits.append(step(x))
                x = logits[-1].argmax(-1, keepdim=True)
            assert cache.pos == cache.pos_t.item() == 23
            runs.append(torch.stack(logits))
    assert (runs[0] - runs[1]).abs().max() < (2e-2 if amp else 1e-4)


def test_torch_compile_of_a_hybrid_equals_eager():
    """The stages' --compile (on by default on the GPU): dynamo compiles around chunk_gla (torch.compiler.disable);
    the logits and every gradient are eager's. Inductor runs on the CPU too (C++), so this runs in CI."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m = hybrid(("attn", "gla", "gla", "attn")).to(dev)
    idx = tokens(B=2, T=100, vocab=97).to(dev)
    grads = []
    for f in (m, torch.compile(m)):
        m.zero_grad()
        out = f(idx)
        out.float().pow(2).mean().backward()
        grads.append((out.detach(), [p.grad.clone() for p in m.parameters()]))
    (o1, g1), (o2, g2) = grads
    assert (o1 - o2).abs().max() < 1e-4 and all((a - b).abs().max() < 1e-4 for a, b in zip(g1, g2))


def test_compiled_kl_rows_equal_eager():
    """The elementwise half of the chunked KL, compiled as on the GPU, equals the eager one (value and gradient)."""
    from common import _kl_rows
    torch.manual_seed(0)
    s, t, scale = torch.randn(37, 50), torch.randn(37, 50), torch.tensor(1 / 37)
    (k1, g1), (k2, g2) = _kl_rows(s, t, scale), torch.compile(_kl_rows, dynamic=False)(s, t, scale)
    torch.testing.assert_close(k1, k2)
    torch.testing.assert_close(g1, g2)


def test_generate_sampling_and_eos():
    m = hybrid()
    idx = tokens(B=3, T=5, vocab=97)
    torch.manual_seed(0)
    out = generate(m, idx, max_new_tokens=6, temperature=0.8, top_k=5)
    assert out.shape == (3, 11) and torch.equal(out[:, :5], idx)
    greedy = generate(m, idx, max_new_tokens=6)
    eos = int(greedy[0, 6])  # row 0 emits it at its 2nd step: the row is then padded with eos
    out = generate(m, idx, max_new_tokens=6, eos_id=eos)
    assert torch.all(out[0, 6:] == eos)


def test_forward_hidden_set_mixer_and_config_isolation():
    m = hybrid(("attn", "attn"))
    idx = tokens(vocab=97)
    with torch.no_grad():
        assert torch.allclose(m.lm_head(m(idx, return_hidden=True)), m(idx))
    teacher_cfg = m.config
    student = Transformer(teacher_cfg)
    student.set_mixer(1, GLA(student.config), "gla")
    assert student.config.mixers == ["attn", "gla"] and teacher_cfg.mixers == ["attn", "attn"]
    with pytest.raises(TypeError):
        student.set_mixer(0, GLA(student.config), "attn")
    cos, sin = m.rope(torch.arange(5))
    assert cos.shape == sin.shape == (5, 16) and cos.dtype == torch.float32


@pytest.mark.parametrize("tie", [False, True])
def test_checkpoint_roundtrip(tmp_path, tie):
    m = hybrid(("gla", "attn", "gla"), tie=tie)
    path = str(tmp_path / "run" / "distill" / "ckpt.pt")
    # A compiled wrapper is saved as the module underneath (no _orig_mod. prefixes).
    save_checkpoint(path, torch.compile(m), stage="distill", config={"lr": 1e-4, "layers": (1,)},
                    parent="out/x/align/ckpt.pt", metrics={"kl": np.float64(0.25), "loss": torch.tensor(1.5)},
                    tokenizer="smollm2")
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"model", "model_config", "stage", "config", "parent", "metrics", "tokenizer", "format",
                        "teacher", "complete"} and raw["complete"] and raw["teacher"] is None
    assert not any("_orig_mod" in k for k in raw["model"]) and raw["metrics"] == {"kl": 0.25, "loss": 1.5}
    meta = json.loads((tmp_path / "run" / "distill" / "meta.json").read_text())
    assert meta["model_config"]["mixers"] == ["gla", "attn", "gla"] and meta["parent"] == "out/x/align/ckpt.pt"
    assert not [f for f in os.listdir(tmp_path / "run" / "distill") if f.endswith(".tmp")]
    loaded, info = load_checkpoint(path)
    assert info["stage"] == "distill" and info["config"] == {"lr": 1e-4, "layers": [1]} and "model" not in info
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tie
    idx = tokens(vocab=97)
    with torch.no_grad():
        assert torch.equal(loaded(idx), m(idx))
    half = load_checkpoint(path, dtype=torch.bfloat16)[0]
    assert half.lm_head.weight.dtype == torch.bfloat16 and half.config.mixers == ["gla", "attn", "gla"]


def test_untied_head_is_recorded(tmp_path):
    # RADLADS unties SmolLM2's head while distilling; the checkpoint must say so even if the config was not updated.
    m = hybrid(("attn", "gla"), tie=True)
    m.lm_head.weight = torch.nn.Parameter(m.lm_head.weight.detach() + 0.1)
    save_checkpoint(str(tmp_path / "ckpt.pt"), m, stage="distill", config={}, parent=None, metrics={}, tokenizer="")
    loaded, info = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert info["model_config"]["tie_word_embeddings"] is False and not loaded.config.tie_word_embeddings
    idx = tokens(vocab=97)
    with torch.no_grad():
        assert torch.equal(loaded(idx), m(idx))
