"""Shared fixtures: a tiny random teacher (an HF directory with a byte-level BPE tokenizer) and a tiny text corpus.

Everything is built locally in a temporary folder: no network, seconds on a CPU."""

import gzip
import json
import os
import random
import sys

import pytest
import torch

# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine threads make small matmuls
# 10-50x slower. One thread keeps the suite fast and its time steady.
torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WORDS = ("the cat dog key value city river paris berlin rome madrid code python linux kernel memory attention layer "
         "model token state gate linear softmax train step loss data table number one two three four five").split()


def tokens(B=2, T=20, vocab=128, seed=1):
    """Random token ids [B, T], the same for a given seed."""
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def logits_diff(ours, theirs, idx):
    """Largest |ours - transformers'| logit on idx."""
    with torch.no_grad():
        return (ours(idx) - theirs(idx).logits).abs().max().item()


def outputs_and_grads(fn, xs, h, do, dht):
    """A chunked kernel's (or its reference's) output, final state and the gradient of every input, for the
    loss sum(o * do) + sum(final_state * dht): what the kernel tests compare."""
    xs = [x.clone().requires_grad_() for x in xs]
    h = None if h is None else h.clone().requires_grad_()
    o, ht = fn(*xs, initial_state=h, output_final_state=True)
    ((o.float() * do).sum() + (ht * dht).sum()).backward()
    return [o, ht] + [x.grad for x in xs] + ([h.grad] if h is not None else [])


def assert_matches(got, ref, names, tol):
    """Each tensor of got finite, shaped as ref, and within relative error tol (in the 2-norm) of it."""
    for name, a, b in zip(names, got, ref):
        assert a.shape == b.shape, name
        assert torch.isfinite(a).all(), f"{name} not finite"
        err = ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()
        assert err < tol, f"{name}: relative error {err:.2e}"


def run_triton_child(test_file):
    """Rerun a test module's test_triton_* tests in a child pytest under TRITON_INTERPRET=1 (triton reads it at its
    first import, and the interpreter must not leak into the other modules' CPU paths)."""
    import subprocess
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", os.path.abspath(test_file), "-k",
           "triton and not child"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1], r.stdout[-2000:]


def make_text(n_docs, seed=0, words_per_doc=120):
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        words = [rng.choice(WORDS) for _ in range(words_per_doc)]
        for i in range(0, len(words), 9):
            words[i] = words[i].capitalize()
            words[min(i + 8, len(words) - 1)] += rng.choice([".", ",", " 42", " 2026.", "\n"])
        docs.append(" ".join(words))
    return docs


def write_tokenizer(path, texts, vocab_size=320):
    """A GPT-2-style byte-level BPE trained on `texts`, with ChatML special tokens like SmolLM2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|im_end|>", "bos_token": "<|im_start|>",
                   "chat_template": "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
                                    "{{ message['content'] }}<|im_end|>\n{% endfor %}"}, f)
    return tok.get_vocab_size()


def write_tiny_llama(path, vocab_size, n_layers=4, seed=0, tie=True):
    """A random 4-layer Llama (GQA 4 heads / 2 KV heads, head_dim 16) saved the way HF saves it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path, safe_serialization=True)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A folder with train.jsonl.gz / valid.jsonl.gz in the shared corpus's format ({"text": ...} per line)."""
    d = tmp_path_factory.mktemp("corpus")
    for split, n, seed in (("train", 200, 0), ("valid", 20, 1)):
        with gzip.open(d / f"{split}.jsonl.gz", "wt") as f:
            for text in make_text(n, seed):
                f.write(json.dumps({"text": text, "source": "tiny"}) + "\n")
    return str(d)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """Path of a tiny random Llama teacher directory (config.json, model.safetensors, tokenizer.json)."""
    d = tmp_path_factory.mktemp("tiny_teacher")
    n_vocab = write_tokenizer(str(d), make_text(200))
    write_tiny_llama(str(d), vocab_size=n_vocab)
    return str(d)


@pytest.fixture(scope="session")
def aligned(tiny_teacher, tiny_corpus, tmp_path_factory):
    """out_dir with run "tiny": data, transfer and a 30-step align of the tiny teacher, made once for all modules.
    Modules that write stage outputs use their own run_name (reading this run's align checkpoint and data) so that
    they never see each other's files."""
    import types

    import align
    import data
    import transfer
    out = str(tmp_path_factory.mktemp("out"))
    common = dict(run_name="tiny", out_dir=out)
    m_data = data.main(data.Config(data=tiny_corpus, teacher=tiny_teacher, **common))
    m_transfer = transfer.main(transfer.Config(teacher=tiny_teacher, **common))
    m_align = align.main(align.Config(steps=30, batch_size=4, seq_len=64, lr=3e-3, log_every=5, device="cpu",
                                      valid_batches=2, **common))
    run_dir = os.path.join(out, "tiny")
    return types.SimpleNamespace(out=out, dir=run_dir, teacher=tiny_teacher, corpus=tiny_corpus, data=m_data,
                                 transfer=m_transfer, align=m_align, data_dir=os.path.join(run_dir, "data"),
                                 align_ckpt=os.path.join(run_dir, "align", "ckpt.pt"),
                                 transfer_ckpt=os.path.join(run_dir, "transfer", "ckpt.pt"))
