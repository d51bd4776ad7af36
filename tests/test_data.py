"""data.py on the tiny teacher and corpus: the token files (documents in order, each ended by the end-of-text token,
text encoded as text), the held-out split, the cap, teacher sampling, the batches, and the safety of a rerun: a rerun
that fails (a missing path, an empty file) leaves the data that was there untouched."""

import gzip
import json
import os
import sys

import numpy as np
import pytest
import torch

import data
from conftest import write_tokenizer


def cfg_of(module, **kw):
    return module.Config(**kw)


def corpus_docs(corpus, split):
    with gzip.open(os.path.join(corpus, f"{split}.jsonl.gz"), "rt") as f:
        return [json.loads(line)["text"] for line in f]


# ------------------------------------------------------------------------------------------------------------ data

def test_data_files_and_meta(aligned):
    from tokenizer import load_tokenizer
    tok = load_tokenizer(aligned.teacher)
    d = aligned.data_dir
    meta = data.load_meta(d)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == tok.n_vocab and meta["tokenizer"] == tok.source
    end = data.doc_end_id(tok)  # documents end with <|endoftext|>, not the instruct model's end of turn (its EOS)
    assert end == meta["doc_end_id"] == tok.encode("<|endoftext|>")[0] != tok.eos_id
    for split in ("train", "valid"):
        docs = corpus_docs(aligned.corpus, split)
        expected = []
        for text in docs:
            expected += tok.encode(text, parse_special=False) + [end]
        tokens = data.load_tokens(d, split)
        # the corpus's own valid file is the held-out split; every document ends with the end-of-text token, in order
        assert np.array_equal(np.asarray(tokens), np.array(expected)), split
        assert meta[f"{split}_docs"] == len(docs) and meta[f"{split}_tokens"] == len(expected)
        assert int((np.asarray(tokens) == end).sum()) == len(docs)
    data.check_tokenizer(meta, tok)


def test_special_token_text_is_text(aligned, tmp_path):
    """A document that writes "<|endoftext|>" as text gets no document boundary there: text is encoded as text."""
    from tokenizer import load_tokenizer
    tok = load_tokenizer(aligned.teacher)
    docs = ["print('<|endoftext|>') ends a GPT-2 sample", "<|im_start|> and <|im_end|> wrap a chat turn"] * 3
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    m = data.main(cfg_of(data, data=str(src), teacher=aligned.teacher, data_dir=str(tmp_path / "d"), valid_every=3))
    tokens = np.concatenate([data.load_tokens(str(tmp_path / "d"), s) for s in ("train", "valid")])
    end = data.doc_end_id(tok)
    assert (tokens == end).sum() == m["train_docs"] + m["valid_docs"] == len(docs)
    assert tok.eos_id not in tokens.tolist()


def test_data_with_another_separator_warns(aligned, capsys):
    """Token files of an older data.py (documents ended by EOS) still load, with a warning that names the fix."""
    from tokenizer import load_tokenizer
    tok = load_tokenizer(aligned.teacher)
    meta = data.load_meta(aligned.data_dir)
    data.check_tokenizer(meta, tok)
    assert "warning" not in capsys.readouterr().out
    del meta["doc_end_id"]
    data.check_tokenizer(meta, tok)
    assert "Rerun data.py" in capsys.readouterr().out


def test_data_cap_and_holdout(aligned, tmp_path):
    """A single file: every Nth document is held out; --max_tokens is an exact cap ending in the
    end-of-text token."""
    src = os.path.join(aligned.corpus, "train.jsonl.gz")
    m = data.main(cfg_of(data, data=src, teacher=aligned.teacher, data_dir=str(tmp_path), max_tokens=3000,
                         valid_every=10))
    meta = data.load_meta(str(tmp_path))
    train = data.load_tokens(str(tmp_path), "train")
    assert m["train_tokens"] == len(train) == 3000 and train[-1] == meta["doc_end_id"]
    assert m["valid_docs"] >= 1 and m["valid_tokens"] == len(data.load_tokens(str(tmp_path), "valid"))


def test_data_from_teacher(aligned, tmp_path):
    """--data=teacher: documents sampled from the teacher, each ending in the end-of-text token, some held
    out."""
    m = data.main(cfg_of(data, data="teacher", teacher=aligned.teacher, data_dir=str(tmp_path), max_tokens=150,
                         gen_batch=4, gen_len=12, valid_every=4))
    meta = data.load_meta(str(tmp_path))
    train = np.asarray(data.load_tokens(str(tmp_path), "train"))
    assert meta["source"] == "teacher" and m["train_tokens"] == len(train) == 150 and m["valid_docs"] >= 1
    assert train[-1] == meta["doc_end_id"] and (train == meta["doc_end_id"]).sum() == m["train_docs"]


def test_teacher_samples_start_as_documents_start(aligned, monkeypatch):
    """Sampling starts after BOS only for a tokenizer that adds one; else after the end-of-text token, where
    pretraining documents start (SmolLM2's BOS and EOS, <|im_start|> and <|im_end|>, belong to chat turns)."""
    import model
    from tokenizer import load_tokenizer
    tok = load_tokenizer(aligned.teacher)
    seen = []

    def fake_generate(m, idx, n, **kw):
        seen.append(idx[0].tolist())
        return torch.cat([idx, torch.full((idx.shape[0], n), 7, device=idx.device)], 1)  # 7: never a stop
    monkeypatch.setattr(model, "generate", fake_generate)
    cfg = cfg_of(data, data="teacher", teacher=aligned.teacher, gen_batch=2, gen_len=3)
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


def test_get_batch_determinism(aligned):
    tokens = data.load_tokens(aligned.data_dir, "train")
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
    # rows: a slice of the global batch is the same rows, whoever draws it (torchrun ranks, micro-batches)
    assert torch.equal(data.get_batch(tokens, 4, 32, data.batch_rng(7, 3), rows=slice(1, 3)), a[1:3])


def test_data_errors(aligned, tmp_path):
    with pytest.raises(FileNotFoundError, match="python data.py"):
        data.load_meta(str(tmp_path / "nowhere"))
    # a different tokenizer (another vocabulary) must not read this run's token files
    other = tmp_path / "other_tok"
    other.mkdir()
    from conftest import make_text
    write_tokenizer(str(other), make_text(50, seed=5), vocab_size=300)
    from tokenizer import load_tokenizer
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        data.check_tokenizer(data.load_meta(aligned.data_dir), load_tokenizer(str(other)))
    tokens = data.load_tokens(aligned.data_dir, "valid")
    with pytest.raises(ValueError, match="seq_len"):
        data.get_batch(tokens, 1, len(tokens) + 5, data.batch_rng(0, 0))


def snapshot(folder):
    return {f: open(os.path.join(folder, f), "rb").read() for f in ("meta.json", "train.bin", "valid.bin")}


def test_failed_rerun_keeps_the_data(aligned, tmp_path, capsys):
    """Validate first, write to temporaries, publish last: a rerun that fails never destroys the run's data."""
    out = str(tmp_path / "d")
    src = os.path.join(aligned.corpus, "train.jsonl.gz")
    data.main(cfg_of(data, data=src, teacher=aligned.teacher, data_dir=out, max_tokens=2000, valid_every=10))
    before = snapshot(out)
    with pytest.raises(FileNotFoundError, match="neither a local path nor a reachable hub dataset"):
        data.main(cfg_of(data, data=str(tmp_path / "missing.jsonl"), teacher=aligned.teacher, data_dir=out))
    assert snapshot(out) == before
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no train tokens.*unchanged"):
        data.main(cfg_of(data, data=str(empty), teacher=aligned.teacher, data_dir=out))
    assert snapshot(out) == before
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]  # no temporary folder left behind
    # the same settings again: nothing to do; other settings: the data is remade
    capsys.readouterr()
    data.main(cfg_of(data, data=src, teacher=aligned.teacher, data_dir=out, max_tokens=2000, valid_every=10))
    assert "nothing to do" in capsys.readouterr().out and snapshot(out) == before
    m = data.main(cfg_of(data, data=src, teacher=aligned.teacher, data_dir=out, max_tokens=1000, valid_every=10))
    assert m["train_tokens"] == 1000 == len(data.load_tokens(out, "train"))


@pytest.mark.parametrize("flag", ["max_tokens", "valid_every", "gen_batch", "threads"])
def test_bad_counts_are_refused_when_parsed(flag):
    with pytest.raises(SystemExit, match=f"--{flag}=0: must be a positive integer"):
        from common import parse_args
        parse_args(data.Config, [f"--{flag}=0"])
