"""The Gated DeltaNet layer (model.GDN): method.md's equations token by token from the module's weights, its init,
cached decoding of a hybrid with attn/gla/gdn layers against full recomputation, the strict checkpoint roundtrip,
and transfer.py --mixer=gdn (q/o copied, k/v expanded in HF repeat_kv order, new parameters at their init); the
o_proj bias of a Llama teacher with attention_bias carried over by transfer for both mixers. CPU, no network."""

import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import make_text, write_tokenizer

import transfer
from model import GDN, GLA, ModelConfig, Transformer, generate, load_checkpoint, save_checkpoint

torch.set_num_threads(1)


def tiny_config(mixers, **kw):
    return ModelConfig(arch="llama", vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=len(mixers),
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, mixers=mixers, **kw)


def hybrid(mixers, seed=0):
    torch.manual_seed(seed)
    m = Transformer(tiny_config(list(mixers))).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # norms and gates away from their init
    return m


def tokens(B, T, seed=1):
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(seed))


def test_gdn_follows_the_equations():
    """GDN.forward against method.md's recurrence (decay, then the delta-rule correction), written out token by
    token in float64 from the module's weights; 70 tokens, so the chunked form crosses a chunk boundary."""
    torch.manual_seed(0)
    gdn, x = GDN(tiny_config(["gdn"])), torch.randn(2, 70, 64)
    with torch.no_grad():
        gdn.dt_bias.normal_(0, 2)  # decays from ~0.5 to ~1 per step
        gdn.o_norm.weight.normal_(1, 0.2)
        y = gdn(x)
        H, K, W = 4, 16, lambda lin: lin.weight.double()
        xd = x.double()
        silu, l2 = F.silu, lambda z: z / torch.sqrt(z.pow(2).sum(-1, keepdim=True) + 1e-6)
        q = l2(silu(xd @ W(gdn.q_proj).T).view(2, 70, H, K))
        k = l2(silu(xd @ W(gdn.k_proj).T).view(2, 70, H, K))
        v = silu(xd @ W(gdn.v_proj).T).view(2, 70, H, K)
        beta = torch.sigmoid(xd @ W(gdn.b_proj).T)  # [2, 70, H]
        g = -gdn.A_log.double().exp() * F.softplus(xd @ W(gdn.a_proj).T + gdn.dt_bias.double())
        gate = silu(xd @ W(gdn.g_proj).T).view(2, 70, H, K)
        S, ys = torch.zeros(2, H, K, K, dtype=torch.float64), []
        for t in range(70):
            # S_t = exp(g_t) S_{t-1} + beta_t k_t^T (v_t - k_t exp(g_t) S_{t-1})
            decayed, kt = g[:, t].exp()[..., None, None] * S, k[:, t]
            delta = v[:, t] - torch.einsum("bhk,bhkv->bhv", kt, decayed)
            S = decayed + beta[:, t, :, None, None] * kt[..., :, None] * delta[..., None, :]
            o = torch.einsum("bhk,bhkv->bhv", q[:, t], S) / math.sqrt(K)
            o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * gdn.o_norm.weight.double()
            ys.append((o * gate[:, t]).reshape(2, -1) @ W(gdn.o_proj).T)
    assert (g < 0).all() and (y.double() - torch.stack(ys, 1)).abs().max() < 1e-5


def test_gdn_init_is_flas():
    torch.manual_seed(0)
    cfg = ModelConfig(arch="llama", vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=512, num_key_value_heads=512, head_dim=16, mixers=["gdn"])
    gdn = GDN(cfg)
    A, dt = gdn.A_log.exp(), F.softplus(gdn.dt_bias)
    assert 0 < A.min() and A.max() <= 16 and abs(A.mean() - 8) < 1  # U(0, 16)
    assert 1e-3 * 0.999 <= dt.min() and dt.max() <= 0.1 * 1.001  # log-uniform in [1e-3, 0.1]
    assert abs(dt.log().mean() - (math.log(1e-3) + math.log(0.1)) / 2) < 0.3
    assert torch.equal(gdn.o_norm.weight, torch.ones(16))
    assert {n for n, _ in gdn.named_parameters()} == {  # fla's GatedDeltaNet names: a rename-free copy
        "A_log", "dt_bias", "q_proj.weight", "k_proj.weight", "v_proj.weight", "a_proj.weight", "b_proj.weight",
        "g_proj.weight", "o_norm.weight", "o_proj.weight"}


@pytest.mark.filterwarnings("ignore")  # fla warns that use_short_conv=False is unusual: the paper's choice here
def test_gdn_weights_load_into_flas_layer():
    """The export to flash-linear-attention is a rename-free copy: fla's GatedDeltaNet takes GDN's state dict."""
    fla_layers = pytest.importorskip("fla.layers")
    theirs = fla_layers.GatedDeltaNet(hidden_size=64, expand_v=1, head_dim=16, num_heads=4, use_short_conv=False,
                                      use_gate=True)
    theirs.load_state_dict(GDN(tiny_config(["gdn"])).state_dict(), strict=True)


def test_new_gate_projections_keep_pytorchs_init():
    """GLA's gk_proj/g_proj and GDN's a/b/g_proj keep nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    (the official hybrid-distillation layers do; transfer.py overwrites only q/k/v/o)."""
    torch.manual_seed(0)
    cfg = tiny_config(["gla"])
    gla, gdn = GLA(cfg), GDN(cfg)
    for lin in (gla.gk_proj[0], gla.gk_proj[1], gla.g_proj, gdn.a_proj, gdn.b_proj, gdn.g_proj):
        bound = lin.in_features ** -0.5
        assert lin.weight.abs().max() <= bound and lin.weight.std() > 0.8 * bound / math.sqrt(3)
    assert gla.gk_proj[1].bias.abs().max() <= 16 ** -0.5 and gla.gk_proj[1].bias.abs().min() > 0


def test_cached_decoding_equals_recompute():
    m = hybrid(("attn", "gdn", "gla", "gdn"))
    idx = tokens(2, 9)
    with torch.no_grad():
        # Cached: prefill 9, a second chunk of 70 (GDN from a state, across a chunk boundary), then 1 by 1.
        cache, steps = m.new_cache(2, 90), []
        assert cache[1]["state"].shape == (2, 4, 16, 16) and cache[1]["state"].dtype == torch.float32
        steps.append(m(idx, cache=cache))
        more = tokens(2, 70, seed=2)
        steps.append(m(more, cache=cache))
        seq = torch.cat([idx, more], 1)
        state = cache[1]["state"]
        for _ in range(6):
            nxt = steps[-1][:, -1].argmax(-1, keepdim=True)
            steps.append(m(nxt, cache=cache))
            seq = torch.cat([seq, nxt], 1)
        assert cache.pos == seq.shape[1] == 85 and cache[1]["state"] is state  # written in place
        full = m(seq)
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-4
    out = generate(m, idx, max_new_tokens=8)
    ref = idx
    for _ in range(8):
        ref = torch.cat([ref, m(ref)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and the Triton kernels need a GPU")
def test_gpu_hybrid_decoding_and_compile():
    """On the GPU: the Triton prefill and the CUDA-graph decoder (decoder()) of a hybrid with gdn layers equal the
    CPU model's recomputation, and torch.compile runs around chunk_gdn with eager's result and gradients."""
    from model import decoder
    m = hybrid(("attn", "gdn", "gla", "gdn"))
    idx = tokens(3, 70)
    with torch.no_grad():
        ref = [m(idx)[:, -1]]
        x, seq = ref[0].argmax(-1, keepdim=True), idx
        for _ in range(8):
            seq = torch.cat([seq, x], 1)
            ref.append(m(seq)[:, -1])
            x = ref[-1].argmax(-1, keepdim=True)
        mc = m.cuda()
        cache = mc.new_cache(3, 90)
        got = [mc(idx.cuda(), cache=cache)[:, -1].float()]
        step = decoder(mc, cache)
        for i in range(8):
            got.append(step(ref[i].argmax(-1, keepdim=True).cuda()))
    assert max((a.cpu() - b).abs().max().item() for a, b in zip(got, ref)) < 1e-3
    outs = []
    for f in (mc, torch.compile(mc)):
        mc.zero_grad()
        out = f(idx.cuda())
        out.float().pow(2).mean().backward()
        outs.append((out.detach(), [p.grad.clone() for p in mc.parameters()]))
    (o1, g1), (o2, g2) = outs
    assert (o1 - o2).abs().max() < 1e-4 and all((a - b).abs().max() < 1e-4 for a, b in zip(g1, g2))


def test_checkpoint_roundtrip_and_set_mixer(tmp_path):
    m = hybrid(("gdn", "attn", "gla"))
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, m, stage="t", config={}, parent=None, metrics={}, tokenizer="")
    loaded, info = load_checkpoint(path)
    assert info["model_config"]["mixers"] == ["gdn", "attn", "gla"]
    assert isinstance(loaded.model.layers[0].self_attn, GDN)
    with torch.no_grad():
        assert torch.equal(loaded(tokens(2, 20)), m(tokens(2, 20)))
    raw = torch.load(path, weights_only=True)
    del raw["model"]["model.layers.0.self_attn.A_log"]
    torch.save(raw, tmp_path / "cut.pt")
    with pytest.raises(ValueError, match=r"missing \['model.layers.0.self_attn.A_log'\]"):
        load_checkpoint(str(tmp_path / "cut.pt"))
    m.set_mixer(1, GDN(m.config), "gdn")
    assert m.config.mixers == ["gdn", "gdn", "gla"]
    with pytest.raises(TypeError, match="needs a GDN module, got GLA"):
        m.set_mixer(2, GLA(m.config), "gdn")
    with pytest.raises(ValueError, match="'attn', 'gla' or 'gdn'"):
        tiny_config(["attn", "delta"])


def transfer_run(teacher, out, mixer):
    transfer.main(transfer.Config(teacher=teacher, out_dir=out, run_name=mixer, mixer=mixer))
    return os.path.join(out, mixer, "transfer", "ckpt.pt")


def test_transfer_gdn_copies_weights(tiny_teacher, tmp_path):
    from teachers import from_pretrained
    path = transfer_run(tiny_teacher, str(tmp_path), "gdn")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["config"]["mixer"] == "gdn" and raw["model_config"]["mixers"] == ["gdn"] * 4
    student, _ = load_checkpoint(path)
    teacher = from_pretrained(tiny_teacher)
    c = teacher.config
    n_rep = c.num_attention_heads // c.num_key_value_heads
    for ls, lt in zip(student.model.layers, teacher.model.layers):
        s, t = ls.self_attn, lt.self_attn
        assert isinstance(s, GDN)
        assert torch.equal(s.q_proj.weight, t.q_proj.weight) and torch.equal(s.o_proj.weight, t.o_proj.weight)
        for name in ("k_proj", "v_proj"):
            w_s = getattr(s, name).weight.view(c.num_attention_heads, c.head_dim, -1)
            w_t = getattr(t, name).weight.view(c.num_key_value_heads, c.head_dim, -1)
            for h in range(c.num_attention_heads):  # query head h reads kv head h // n_rep (HF repeat_kv)
                assert torch.equal(w_s[h], w_t[h // n_rep]), (name, h)
        assert torch.equal(s.o_norm.weight, torch.ones_like(s.o_norm.weight))
        A, dt = s.A_log.exp(), F.softplus(s.dt_bias)
        assert ((0 < A) & (A <= 16)).all() and ((dt > 0.999e-3) & (dt < 0.1001)).all()
    ts = teacher.state_dict()
    for name, p in student.state_dict().items():
        if ".self_attn." not in name:
            assert torch.equal(p, ts[name]), name
    assert torch.isfinite(student(tokens(2, 20))).all()


@pytest.fixture(scope="module")
def biased_llama(tmp_path_factory):
    """A tiny Llama with attention_bias (q/k/v and o_proj biases), its biases random rather than HF's zeros."""
    from transformers import LlamaConfig, LlamaForCausalLM
    d = tmp_path_factory.mktemp("biased_llama")
    n_vocab = write_tokenizer(str(d), make_text(50))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=n_vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                         attention_bias=True, rms_norm_eps=1e-5))
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(layer.self_attn, proj).bias.normal_()
    model.save_pretrained(str(d), safe_serialization=True)
    return str(d), model


@pytest.mark.parametrize("mixer", ["gla", "gdn"])
def test_transfer_keeps_the_o_proj_bias(biased_llama, tmp_path, mixer):
    path, hf = biased_llama
    student, _ = load_checkpoint(transfer_run(path, str(tmp_path), mixer))
    for ls, lt in zip(student.model.layers, hf.model.layers):
        s = ls.self_attn
        assert torch.equal(s.o_proj.bias, lt.self_attn.o_proj.bias)  # carried over
        assert s.q_proj.bias is None  # q/k/v biases dropped (the paper's choice)
