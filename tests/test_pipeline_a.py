"""Pipeline A on the tiny random teacher: data.py, transfer.py (Stage 0), align.py (Stage 1), select_layers.py.

Each stage's main runs for a few steps on the CPU; the tests check what it wrote. One run folder is shared: data ->
transfer -> align are built once per module (fixture `run`), and the selection tests read it."""

import gzip
import json
import os
import sys
import types

import numpy as np
import pytest
import torch

import align
import data
import select_layers
import transfer
from conftest import write_tokenizer


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices gain nothing from intra-op threads, and on a busy machine threads cost 10-30x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cfg_of(module, **kw):
    return module.Config(**kw)


@pytest.fixture(scope="module")
def run(tiny_teacher, tiny_corpus, tmp_path_factory):
    """out_dir with run "tiny": data, transfer and a 30-step align, plus the metrics each main returned."""
    out = str(tmp_path_factory.mktemp("out"))
    common = dict(run="tiny", out_dir=out)
    m_data = data.main(cfg_of(data, data=tiny_corpus, teacher=tiny_teacher, **common))
    m_transfer = transfer.main(cfg_of(transfer, teacher=tiny_teacher, **common))
    m_align = align.main(cfg_of(align, steps=30, batch_size=4, seq_len=64, lr=3e-3, log_every=5, device="cpu",
                                valid_batches=2, **common))
    return types.SimpleNamespace(out=out, dir=os.path.join(out, "tiny"), teacher=tiny_teacher, corpus=tiny_corpus,
                                 data=m_data, transfer=m_transfer, align=m_align)


def corpus_docs(corpus, split):
    with gzip.open(os.path.join(corpus, f"{split}.jsonl.gz"), "rt") as f:
        return [json.loads(line)["text"] for line in f]


# ------------------------------------------------------------------------------------------------------------ data

def test_data_files_and_meta(run):
    from tokenizer import load_tokenizer
    tok = load_tokenizer(run.teacher)
    d = os.path.join(run.dir, "data")
    meta = data.load_meta(d)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == tok.n_vocab and meta["tokenizer"] == tok.source
    end = data.doc_end_id(tok)  # documents end with <|endoftext|>, not the instruct model's end of turn (its EOS)
    assert end == meta["doc_end_id"] == tok.encode("<|endoftext|>")[0] != tok.eos_id
    for split in ("train", "valid"):
        docs = corpus_docs(run.corpus, split)
        expected = []
        for text in docs:
            expected += tok.encode(text, parse_special=False) + [end]
        tokens = data.load_tokens(d, split)
        # the corpus's own valid file is the held-out split; every document ends with the end-of-text token, in order
        assert np.array_equal(np.asarray(tokens), np.array(expected)), split
        assert meta[f"{split}_docs"] == len(docs) and meta[f"{split}_tokens"] == len(expected)
        assert int((np.asarray(tokens) == end).sum()) == len(docs)
    data.check_tokenizer(meta, tok)


def test_special_token_text_is_text(run, tmp_path):
    """A document that writes "<|endoftext|>" as text gets no document boundary there: text is encoded as text."""
    from tokenizer import load_tokenizer
    tok = load_tokenizer(run.teacher)
    docs = ["print('<|endoftext|>') ends a GPT-2 sample", "<|im_start|> and <|im_end|> wrap a chat turn"] * 3
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    m = data.main(cfg_of(data, data=str(src), teacher=run.teacher, data_dir=str(tmp_path / "d"), valid_every=3))
    tokens = np.concatenate([data.load_tokens(str(tmp_path / "d"), s) for s in ("train", "valid")])
    end = data.doc_end_id(tok)
    assert (tokens == end).sum() == m["train_docs"] + m["valid_docs"] == len(docs)
    assert tok.eos_id not in tokens.tolist()


def test_data_with_another_separator_warns(run, capsys):
    """Token files of an older data.py (documents ended by EOS) still load, with a warning that names the fix."""
    from tokenizer import load_tokenizer
    tok = load_tokenizer(run.teacher)
    meta = data.load_meta(os.path.join(run.dir, "data"))
    data.check_tokenizer(meta, tok)
    assert "warning" not in capsys.readouterr().out
    del meta["doc_end_id"]
    data.check_tokenizer(meta, tok)
    assert "Rerun data.py" in capsys.readouterr().out


def test_data_cap_and_holdout(run, tmp_path):
    """A single file: every Nth document is held out; --max_tokens is an exact cap ending in the
    end-of-text token."""
    src = os.path.join(run.corpus, "train.jsonl.gz")
    m = data.main(cfg_of(data, data=src, teacher=run.teacher, data_dir=str(tmp_path), max_tokens=3000, valid_every=10))
    meta = data.load_meta(str(tmp_path))
    train = data.load_tokens(str(tmp_path), "train")
    assert m["train_tokens"] == len(train) == 3000 and train[-1] == meta["doc_end_id"]
    assert m["valid_docs"] >= 1 and m["valid_tokens"] == len(data.load_tokens(str(tmp_path), "valid"))


def test_data_from_teacher(run, tmp_path):
    """--data=teacher: documents sampled from the teacher, each ending in the end-of-text token, some held
    out."""
    m = data.main(cfg_of(data, data="teacher", teacher=run.teacher, data_dir=str(tmp_path), max_tokens=150,
                         gen_batch=4, gen_len=12, valid_every=4))
    meta = data.load_meta(str(tmp_path))
    train = np.asarray(data.load_tokens(str(tmp_path), "train"))
    assert meta["source"] == "teacher" and m["train_tokens"] == len(train) == 150 and m["valid_docs"] >= 1
    assert train[-1] == meta["doc_end_id"] and (train == meta["doc_end_id"]).sum() == m["train_docs"]


def test_teacher_samples_start_as_documents_start(run, monkeypatch):
    """Sampling starts after BOS only for a tokenizer that adds one; else after the end-of-text token, where
    pretraining documents start (SmolLM2's BOS and EOS, <|im_start|> and <|im_end|>, belong to chat turns)."""
    import model
    from tokenizer import load_tokenizer
    tok = load_tokenizer(run.teacher)
    seen = []

    def fake_generate(m, idx, n, **kw):
        seen.append(idx[0].tolist())
        return torch.cat([idx, torch.full((idx.shape[0], n), 7, device=idx.device)], 1)  # 7: never a stop
    monkeypatch.setattr(model, "generate", fake_generate)
    cfg = cfg_of(data, data="teacher", teacher=run.teacher, gen_batch=2, gen_len=3)
    for add_bos in (False, True):
        monkeypatch.setattr(tok, "add_bos", add_bos)
        doc = next(data.iter_teacher(cfg, tok))
        endoftext = tok.encode("<|endoftext|>")[0]
        assert endoftext not in (tok.bos_id, tok.eos_id)
        assert seen[-1][0] == (tok.bos_id if add_bos else endoftext)
        assert seen[-1][1:] == tok.encode(data.PROMPTS[0])
        assert doc == seen[-1][1:] + [7] * 3  # the document: prompt text and sample, no start token


def test_local_jsonl_and_txt_need_no_datasets(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now fails
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "first doc"}) + "\n\n" + json.dumps({"text": "second\ndoc"}) + "\n")
    (tmp_path / "b.txt").write_text("a whole\nfile", encoding="utf-8")
    files = [str(tmp_path / "a.jsonl.gz"), str(tmp_path / "b.txt")]
    assert list(data.iter_local(files, "text")) == ["first doc", "second\ndoc", "a whole\nfile"]
    with pytest.raises(KeyError, match="no field 'body'"):
        list(data.iter_local(files[:1], "body"))


def test_get_batch_determinism(run):
    tokens = data.load_tokens(os.path.join(run.dir, "data"), "train")
    a = data.get_batch(tokens, 4, 32, data.batch_rng(7, 3))
    b = data.get_batch(tokens, 4, 32, data.batch_rng(7, 3))
    c = data.get_batch(tokens, 4, 32, data.batch_rng(7, 4))
    assert a.shape == (4, 33) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the batch of step 3 is the same whether or not other steps were drawn before it
    for s in range(3):
        data.get_batch(tokens, 4, 32, data.batch_rng(7, s))
    assert torch.equal(a, data.get_batch(tokens, 4, 32, data.batch_rng(7, 3)))
    # every row is a window of consecutive tokens from the file
    flat = np.asarray(tokens)
    for row in a.numpy():
        starts = np.flatnonzero(flat[:len(flat) - 32] == row[0])
        assert any(np.array_equal(flat[s:s + 33], row) for s in starts)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(data.get_batch(tokens, 2, 16, g1), data.get_batch(tokens, 2, 16, g2))


def test_data_errors(run, tmp_path):
    with pytest.raises(FileNotFoundError, match="python data.py"):
        data.load_meta(str(tmp_path / "nowhere"))
    # a different tokenizer (another vocabulary) must not read this run's token files
    other = tmp_path / "other_tok"
    other.mkdir()
    from conftest import make_text
    write_tokenizer(str(other), make_text(50, seed=5), vocab_size=300)
    from tokenizer import load_tokenizer
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        data.check_tokenizer(data.load_meta(os.path.join(run.dir, "data")), load_tokenizer(str(other)))
    tokens = data.load_tokens(os.path.join(run.dir, "data"), "valid")
    with pytest.raises(ValueError, match="seq_len"):
        data.get_batch(tokens, 1, len(tokens) + 5, data.batch_rng(0, 0))


# -------------------------------------------------------------------------------------------------------- transfer

def test_transfer_copies_weights(run):
    from model import load_checkpoint
    from teachers import from_pretrained
    path = os.path.join(run.dir, "transfer", "ckpt.pt")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["stage"] == "transfer" and raw["config"]["teacher"] == run.teacher
    student, ckpt = load_checkpoint(path)
    teacher = from_pretrained(run.teacher)
    c = teacher.config
    n_rep = c.num_attention_heads // c.num_key_value_heads
    assert n_rep == 2 and student.config.mixers == ["gla"] * c.num_hidden_layers
    for ls, lt in zip(student.model.layers, teacher.model.layers):
        s, t = ls.self_attn, lt.self_attn
        assert torch.equal(s.q_proj.weight, t.q_proj.weight) and torch.equal(s.o_proj.weight, t.o_proj.weight)
        for name in ("k_proj", "v_proj"):
            w_s = getattr(s, name).weight.view(c.num_attention_heads, c.head_dim, -1)
            w_t = getattr(t, name).weight.view(c.num_key_value_heads, c.head_dim, -1)
            for h in range(c.num_attention_heads):   # query head h reads kv head h // n_rep (HF repeat_kv)
                assert torch.equal(w_s[h], w_t[h // n_rep]), (name, h)
        assert torch.equal(s.g_norm.weight, torch.ones_like(s.g_norm.weight))
    ts = teacher.state_dict()
    for name, p in student.state_dict().items():
        if ".self_attn." not in name:
            assert torch.equal(p, ts[name]), name
    idx = torch.randint(0, c.vocab_size, (2, 20))
    assert torch.isfinite(student(idx)).all()
    assert np.isfinite(run.transfer["probe_kl"])


# ----------------------------------------------------------------------------------------------------------- align

def test_align_stream_is_the_teachers(run):
    """The hand-written teacher-forced stream is the teacher's own forward pass (checked via the final hidden)."""
    from model import load_checkpoint
    from teachers import from_pretrained
    teacher = from_pretrained(run.teacher).eval()
    student, _ = load_checkpoint(os.path.join(run.dir, "align", "ckpt.pt"))
    idx = torch.randint(0, teacher.config.vocab_size, (2, 24))
    seen = []
    hooks = [layer.register_forward_hook(lambda m, a, out: seen.append(out)) for layer in teacher.model.layers]
    with torch.no_grad():
        teacher(idx)
    for h in hooks:
        h.remove()
    mixers = [layer.self_attn for layer in student.model.layers]
    with torch.no_grad():
        losses = align.align_losses(teacher, mixers, idx)
    assert losses.shape == (teacher.config.num_hidden_layers,) and torch.isfinite(losses).all()
    # same stream: reproduce it by hand and compare with the block outputs captured above
    cos, sin = teacher.rope(torch.arange(24))
    h = teacher.model.embed_tokens(idx)
    with torch.no_grad():
        for layer, out in zip(teacher.model.layers, seen):
            h = h + layer.self_attn(layer.input_layernorm(h), cos, sin)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            torch.testing.assert_close(h, out)


def test_align_trains(run):
    m = run.align
    L = 4
    assert len(m["layer_losses"]) == L and all(np.isfinite(m["layer_losses"]))
    assert np.isfinite(m["valid_loss"]) and len(m["valid_layer_losses"]) == L
    with open(os.path.join(run.dir, "align", "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    assert len(log[0]["layer_losses"]) == L
    assert log[-1]["loss"] < 0.8 * log[0]["loss"], (log[0]["loss"], log[-1]["loss"])
    raw = torch.load(os.path.join(run.dir, "align", "ckpt.pt"), map_location="cpu", weights_only=True)
    assert raw["stage"] == "align" and raw["config"]["teacher"] == run.teacher
    assert raw["metrics"]["layer_losses"] == pytest.approx(m["layer_losses"])
    # only the mixers moved
    t = torch.load(os.path.join(run.dir, "transfer", "ckpt.pt"), map_location="cpu", weights_only=True)["model"]
    moved = {name for name, p in raw["model"].items() if not torch.equal(p, t[name])}
    assert moved and all(".self_attn." in name for name in moved), moved


def test_align_nan_stops(run, tmp_path, monkeypatch):
    """A NaN loss stops the run at its step, naming the last checkpoint written before it."""
    real = align.align_losses
    calls = []

    def poisoned(*args):
        calls.append(1)
        return real(*args) * (float("nan") if len(calls) == 3 else 1.0)

    monkeypatch.setattr(align, "align_losses", poisoned)
    out = str(tmp_path / "nan" / "ckpt.pt")
    with pytest.raises(FloatingPointError, match=f"step 3.*{out}"):
        align.main(cfg_of(align, run="tiny", out_dir=run.out, steps=5, batch_size=2, seq_len=16, device="cpu",
                          save_every=2, output=out))
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="transfer.py"):
        align.main(cfg_of(align, run="missing", out_dir=run.out, device="cpu"))


# ---------------------------------------------------------------------------------------------------------- select

def select(run, **kw):
    kw.setdefault("budget", "2")
    return select_layers.main(select_layers.Config(run="tiny", out_dir=run.out, **kw))


def test_select_methods(run, monkeypatch):
    scores = [0.5, 0.1, 0.9, 0.2]
    os.makedirs(os.path.join(run.dir, "score"), exist_ok=True)
    with open(os.path.join(run.dir, "score", "scores.json"), "w") as f:
        json.dump({"method": "kl", "n_layers": 4, "scores": scores}, f)
    sel = select(run, method="kl")
    assert sel["layers"] == [1, 3] and sel["n_layers"] == 4 and sel["budget"] == 2
    with open(os.path.join(run.dir, "select", "selection.json")) as f:
        assert json.load(f) == sel

    assert select(run, method="uniform", budget="0.5", out="selection_uniform.json")["layers"] == [1, 3]
    assert select(run, method="uniform", budget="1", out="u1.json")["layers"] == [2]
    assert select(run, method="uniform", budget="4", out="u4.json")["layers"] == [0, 1, 2, 3]
    assert os.path.exists(os.path.join(run.dir, "select", "selection_uniform.json"))

    losses = run.align["layer_losses"]
    sel = select(run, method="ga_s1", out="ga.json")
    assert sel["layers"] == sorted(sorted(range(4), key=lambda i: -losses[i])[:2])

    # ablation: a stand-in for eval.recall_accuracy that sees the hooks (zeroing layer 2 hurts most, then layer 0)
    calls = []

    def fake_recall(model, tok, task, length, n, seed, device):
        idx = torch.arange(1, 17, device=device)[None]
        with torch.no_grad():
            out = [layer.self_attn(layer.input_layernorm(model.model.embed_tokens(idx)),
                                   *model.rope(torch.arange(16, device=device))) for layer in model.model.layers]
        zeroed = [i for i, o in enumerate(out) if not o.any()]
        calls.append((task, length, n, zeroed))
        return {2: 0.2, 0: 0.5}.get(zeroed[0], 0.9) if zeroed else 1.0

    monkeypatch.setitem(sys.modules, "recall", types.SimpleNamespace(recall_accuracy=fake_recall))
    sel = select(run, method="ablation", out="abl.json", length=128, n=8)
    assert sel["layers"] == [0, 2] and sel["scores"] == pytest.approx([0.5, 0.1, 0.8, 0.1])
    assert [c[3] for c in calls] == [[], [0], [1], [2], [3]] and calls[0][:3] == ("mqar", 128, 8)


def test_select_ablation_with_eval(run):
    """The ablation through recall.py's real recall_accuracy (the random teacher scores 0; the plumbing is the point)."""
    sel = select(run, method="ablation", out="abl_real.json", length=512, n=2)
    assert len(sel["layers"]) == 2 and len(sel["scores"]) == 4 and 0 <= sel["base_accuracy"] <= 1


def test_select_errors(run, tmp_path):
    for budget, pattern in (("5", "only 4"), ("0", "positive"), ("-1", "positive"), ("1.5", "at most 1"),
                            ("lots", "fraction")):
        with pytest.raises(ValueError, match=pattern):
            select(run, method="uniform", budget=budget, out="x.json")
    with pytest.raises(ValueError, match="unknown"):
        select(run, method="random")
    with pytest.raises(FileNotFoundError, match="score.py"):
        select(run, method="kl", scores=str(tmp_path / "none.json"))
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"scores": [0.1, None, 0.3, 0.2]}))
    with pytest.raises(ValueError, match=r"\[1\]"):
        select(run, method="kl", scores=str(partial))
