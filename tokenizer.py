"""
Tokenizers of the teachers (SmolLM2, Qwen2/2.5/3, Llama-3), rebuilt on tiktoken from the files the models ship.

Every teacher here uses byte-level BPE: text is first cut into pieces by a regex (words with their leading space,
single digits or runs of up to three, punctuation, whitespace runs), each piece is turned into UTF-8 bytes, and
within a piece adjacent tokens are merged, cheapest merge first, until no listed merge applies. Special tokens
(<|im_start|>, <|eot_id|>, ...) are cut out of the text before any of that and map straight to their ids.

    HF BPE:   repeatedly merge the adjacent pair (a, b) with the smallest index in the merges list
    tiktoken: repeatedly merge the adjacent pair whose concatenation a+b has the smallest rank
    so rank(token) = index of the merge that makes it (single bytes below every merge) gives the same ids.

The rules agree whenever every token's own bytes BPE back to that token (true of BPE as trained, and checked for
SmolLM2's 49k and Qwen2.5's 151k tokens in the tests): then no other spelling x+y of a token is ever adjacent in HF's
merge state, so tiktoken never sees an extra candidate. Tiktoken also takes a piece that is a whole token as is,
which is HF's ignore_merges (Llama-3) and, given the above, changes nothing elsewhere. The tests compare ids with
`tokenizers`/`transformers` on hard text and real text: SmolLM2's and Qwen2.5-Coder's GGUF tokenizers give
transformers' ids on all 13,109 documents (45M characters) of ../shared/corpus. A GGUF carries no normalizer: Qwen's
tokenizer.json applies NFC first, its GGUF (as llama.cpp and transformers read it, and as read here) does not.

Sources (`load_tokenizer(source)`):
    "" or "smollm2"        the default teacher .gguf (teachers.fetch_default_teacher())
    dir/ or tokenizer.json an HF tokenizer.json (+ tokenizer_config.json for bos/eos/chat template)
    tokenizer.model        a Llama-3 tiktoken rank file (base64 token, rank per line) + Llama-3's special tokens
    model.gguf             GGUF metadata: tokenizer.ggml.tokens/merges/token_type/pre, chat template
    ckpt.pt                a project checkpoint: the tokenizer source stored in it (meta.json beside it)
    owner/name             a hub repo id (huggingface_hub.snapshot_download of the tokenizer files)

    python tokenizer.py smollm2 "Hello 12345 world"
    python tokenizer.py path/to/Qwen2.5-0.5B-Instruct "<|im_start|>user"
"""

import base64
import json
import mmap
import os
import re
import struct
import sys
import unicodedata

import numpy as np
import regex  # comes with tiktoken, which uses it too
import tiktoken

# ---------------------------------------------------------------------------------------------------------------
# Pre-tokenizer regexes (fancy-regex syntax, which tiktoken uses; lookahead such as \s+(?!\S) is supported)

# GPT-2 (Hugging Face ByteLevel(use_regex=True))
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# SmolLM2, StarCoder: Digits(individual_digits=True) then the GPT-2 regex inside each non-digit run. In one regex:
# a digit is its own piece, and a digit ends a whitespace run the way the end of the run does, hence (?![^\s\p{N}]).
GPT2_DIGITS_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
# Qwen2/2.5/3: single digits
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
                 r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Llama-3: runs of up to three digits
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
                  r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

# tokenizer.ggml.pre (llama.cpp's name for the pre-tokenizer) -> regex
GGUF_PRE_PATTERNS = {
    "gpt-2": GPT2_PATTERN, "gpt2": GPT2_PATTERN,
    "smollm": GPT2_DIGITS_PATTERN, "starcoder": GPT2_DIGITS_PATTERN,
    "qwen2": QWEN2_PATTERN, "deepseek-r1-qwen": QWEN2_PATTERN,
    "llama-bpe": LLAMA3_PATTERN, "llama3": LLAMA3_PATTERN, "llama-v3": LLAMA3_PATTERN,
}

# Llama-3.1's 256 special tokens, ids n_base .. n_base+255 after the tiktoken ranks (Meta's llama3 tokenizer.py)
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
LLAMA3_SPECIAL += [f"<|reserved_special_token_{i}|>" for i in range(2, 256 - len(LLAMA3_SPECIAL) + 2)]

# chat formats: (prefix, suffix) around the user message, ending where the assistant's reply starts
CHAT_FORMATS = {
    "chatml": ("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"),
    "llama3": ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n",
               "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
}
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}

SUPPORTED = ("supported: byte-level BPE tokenizers (GPT-2, SmolLM2, Qwen2/2.5/3, Llama-3) as an HF tokenizer.json, "
             "a Llama-3 tiktoken tokenizer.model, or a GGUF with tokenizer.ggml.model 'gpt2'")
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "config.json", "generation_config.json", "original/tokenizer.model"]


def bytes_to_unicode():
    """GPT-2's reversible byte -> printable character map: byte-level vocab files spell byte b as chr(map[b])
    (printable ASCII and Latin-1 stay themselves, the rest shift up past 255; a space is 'Ġ', a newline 'Ċ')."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


# str.translate table: byte-alphabet character -> its byte (as a Latin-1 code point); any other character below 256
# -> U+FFFF, so that .encode("latin-1") fails on a string that is not in the byte alphabet
BYTE_TABLE = {ord(c): b for b, c in bytes_to_unicode().items()}
BYTE_TABLE.update({i: 0xFFFF for i in range(256) if i not in BYTE_TABLE})


def token_bytes(s):
    """A byte-level token string -> its bytes, or None when it uses characters outside the byte alphabet."""
    try:
        return s.translate(BYTE_TABLE).encode("latin-1")
    except UnicodeEncodeError:
        return None


# ---------------------------------------------------------------------------------------------------------------
# The tokenizer

class Tokenizer:
    """Byte-level BPE through tiktoken. Built by load_tokenizer(); the fields of the API contract are
    eos_id, bos_id, n_vocab, source, is_chat, encode, decode, chat. Also: add_bos (the original tokenizer prepends
    BOS to each text; encode never does), stop_ids (eos and the end-of-turn token), chat_format."""

    def __init__(self, *, vocab, merges, added, pattern, source, bos=None, eos=None, chat_template=None,
                 normalizer=None, add_bos=False, strip=None):
        # vocab: {bytes: id} BPE tokens; merges: [(bytes, bytes)] in priority order, or None when vocab ids are
        # already tiktoken ranks (a tiktoken file); added: {text: id} split out before BPE; strip: {text: (l, r)}
        self.source, self.normalizer, self.add_bos = source, normalizer, add_bos

        # ---- tiktoken ranks: single bytes, then every merge result in merge order
        to_id = None
        if merges is None:
            ranks = vocab
        else:
            ranks = {b: i for b, i in vocab.items() if len(b) == 1}
            made = []  # merge results in merge order (a token that two merges make keeps the first)
            for a, b in merges:
                t = a + b
                if t in ranks:
                    continue
                if t not in vocab:
                    raise ValueError(f"{source}: merge {a!r} + {b!r} makes {t!r}, which is not in the vocab")
                ranks[t] = vocab[t]
                made.append(t)
            # tiktoken's ranks are also its output ids: when ids grow with merge order they serve as ranks as they
            # are, otherwise rank = 256 + merge index and a table maps ranks back to ids after encoding
            if any(ranks[x] >= ranks[y] for x, y in zip(made, made[1:])):
                by_rank = sorted(t for t in ranks if len(t) == 1) + made
                to_id = np.array([ranks[t] for t in by_rank], dtype=np.int64)
                ranks = {t: r for r, t in enumerate(by_rank)}
        # vocab tokens that no merge makes stay out of the ranks (tiktoken would otherwise produce them whole)
        # but can still be decoded
        self._to_id = to_id
        # single bytes the vocab lacks (SmolLM2 has 235 of 256): HF's BPE, with no unk token, drops them from each
        # regex piece before merging; tiktoken needs every byte, so text holding one goes piece by piece
        self._missing = bytes(b for b in range(256) if bytes([b]) not in ranks)
        self._pieces = regex.compile(pattern) if self._missing else None
        try:
            self._enc = tiktoken.Encoding("nanohybrid", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
        except ValueError as e:
            raise ValueError(f"{source}: tiktoken rejects the pre-tokenizer regex {pattern!r}: {e}") from e

        # ---- added/special tokens: cut out first, longest first so that a token that is a prefix of another loses
        self._added = dict(added)
        self._strip = strip or {}
        alts = []
        for t in sorted(added, key=len, reverse=True):
            lstrip, rstrip = self._strip.get(t, (False, False))
            alts.append(r"\s*" * lstrip + re.escape(t) + r"\s*" * rstrip)
        self._special_re = re.compile("(" + "|".join(alts) + ")") if alts else None

        # ---- decoding table: id -> bytes for every id (BPE tokens, unreachable ones and added tokens)
        by_id = {i: b for b, i in vocab.items()}
        by_id.update({i: t.encode("utf-8") for t, i in added.items()})
        self.n_vocab = max(by_id) + 1
        self._bytes = [by_id.get(i) for i in range(self.n_vocab)]

        # ---- bos/eos and chat format: from the chat template if there is one, else from the special tokens
        name_to_id = lambda t: t if t is None or isinstance(t, int) else added.get(t, vocab.get(token_bytes(t)))
        self.bos_id, self.eos_id = name_to_id(bos), name_to_id(eos)
        marks = chat_template if chat_template else " ".join(added)
        self.chat_format = ("chatml" if "<|im_start|>" in marks and "<|im_start|>" in added else
                            "llama3" if "<|start_header_id|>" in marks and "<|start_header_id|>" in added else None)
        self.is_chat = self.chat_format is not None
        eot = self._added.get(END_OF_TURN.get(self.chat_format))
        self.stop_ids = [i for i in dict.fromkeys([self.eos_id, eot]) if i is not None]

    def encode(self, text, parse_special=True):
        """text -> ids, special tokens written in the text become their ids (as HF does). Adds no BOS."""
        parts = self._special_re.split(text) if parse_special and self._special_re else [text]
        ids = []
        for k, part in enumerate(parts):
            if k % 2:  # a special token (the regex's captured group)
                ids.append(self._added[part] if part in self._added else self._added[part.strip()])
            elif part:
                if self.normalizer == "NFC":
                    part = unicodedata.normalize("NFC", part)
                ids.extend(self._encode_ordinary(part))
        return ids

    def _encode_ordinary(self, text):
        raw = text.encode("utf-8", errors="surrogatepass")
        if self._missing and len(raw.translate(None, self._missing)) != len(raw):
            out = []
            for piece in self._pieces.findall(text):
                b = piece.encode("utf-8", errors="surrogatepass").translate(None, self._missing)
                out.extend(self._enc._encode_single_piece(b) if b else [])
        else:
            out = self._enc.encode_ordinary(text)
        return self._to_id[out].tolist() if self._to_id is not None else out

    def decode(self, ids):
        """ids (a list, array or tensor) -> text; invalid UTF-8 from a partial character becomes U+FFFD, as in HF."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        try:
            if min(ids, default=0) < 0:
                raise IndexError
            return b"".join(self._bytes[i] for i in ids).decode("utf-8", errors="replace")
        except (IndexError, TypeError):
            bad = [i for i in ids if not 0 <= i < self.n_vocab or self._bytes[i] is None]
            raise ValueError(f"token ids {bad[:5]} are not in the tokenizer {self.source} "
                             f"(n_vocab {self.n_vocab})") from None

    def chat(self, user_message):
        """The prompt for one user turn in the model's chat format, up to where the assistant answers."""
        if self.chat_format is None:
            return user_message
        prefix, suffix = CHAT_FORMATS[self.chat_format]
        return prefix + user_message + suffix

    def __repr__(self):
        return (f"Tokenizer(source={self.source!r}, n_vocab={self.n_vocab}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, chat={self.chat_format})")


def check_vocab(tokenizer, model_vocab_size):
    """Raise when the tokenizer can produce ids that the model has no embedding rows for (a tokenizer from another
    model). A model with more rows than the tokenizer has ids is fine (Qwen pads its embedding)."""
    if tokenizer.n_vocab > model_vocab_size:
        raise ValueError(f"tokenizer {tokenizer.source} has {tokenizer.n_vocab} ids but the model's embedding has "
                         f"{model_vocab_size} rows: the tokenizer does not belong to this model")


# ---------------------------------------------------------------------------------------------------------------
# Readers: each returns the keyword arguments of Tokenizer

def _pattern_from_pre_tokenizer(pre, path):
    """The single regex equivalent to a tokenizer.json pre_tokenizer (read from its structure, not its name)."""
    steps = pre.get("pretokenizers", []) if pre and pre["type"] == "Sequence" else [pre] if pre else []
    kinds = []
    for s in steps:
        if s["type"] == "ByteLevel" and not s.get("add_prefix_space", False):
            kinds.append("bytelevel+regex" if s.get("use_regex", True) else "bytelevel")
        elif s["type"] == "Digits" and s.get("individual_digits"):
            kinds.append("digits")
        elif s["type"] == "Split" and s.get("behavior") == "Isolated" and not s.get("invert"):
            p = s["pattern"]
            kinds.append(("split", p["Regex"] if "Regex" in p else re.escape(p["String"])))
        else:
            kinds.append(None)
    if kinds == ["bytelevel+regex"]:
        return GPT2_PATTERN
    if kinds == ["digits", "bytelevel+regex"]:
        return GPT2_DIGITS_PATTERN
    if len(kinds) == 2 and isinstance(kinds[0], tuple) and kinds[1] == "bytelevel":
        return kinds[0][1]
    raise ValueError(f"{path}: unsupported pre_tokenizer {json.dumps(pre)[:300]}; known: ByteLevel(use_regex), "
                     f"Digits(individual) + ByteLevel, Split(regex, Isolated) + ByteLevel(use_regex=false). "
                     f"{SUPPORTED}")


def _token_name(v):
    return v.get("content") if isinstance(v, dict) else v


def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _hf_config(folder):
    """bos/eos token names and the chat template from tokenizer_config.json (and friends) in an HF folder."""
    cfg = {}
    p = os.path.join(folder, "tokenizer_config.json")
    if os.path.exists(p):
        cfg = _read_json(p)
    bos, eos, template = _token_name(cfg.get("bos_token")), _token_name(cfg.get("eos_token")), cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
    if template is None and os.path.exists(os.path.join(folder, "chat_template.jinja")):
        with open(os.path.join(folder, "chat_template.jinja"), encoding="utf-8") as f:
            template = f.read()
    if template is None and os.path.exists(os.path.join(folder, "chat_template.json")):
        template = _read_json(os.path.join(folder, "chat_template.json")).get("chat_template")
    # bos/eos ids from config.json when tokenizer_config.json names none
    model_cfg = os.path.join(folder, "config.json")
    if (bos is None or eos is None) and os.path.exists(model_cfg):
        mc = _read_json(model_cfg)
        first = lambda v: v[0] if isinstance(v, list) else v
        bos = bos if bos is not None else first(mc.get("bos_token_id"))
        eos = eos if eos is not None else first(mc.get("eos_token_id"))
    return dict(bos=bos, eos=eos, chat_template=template, add_bos=bool(cfg.get("add_bos_token", False)))


def _from_tokenizer_json(path, source):
    tj = _read_json(path)
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: tokenizer model {model.get('type')!r} is not supported; {SUPPORTED}")
    if model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") \
            or model.get("dropout"):
        raise ValueError(f"{path}: BPE with byte_fallback/subword prefix/suffix/dropout (SentencePiece-style) is not "
                         f"supported; {SUPPORTED}")
    norm = tj.get("normalizer")
    if norm is not None and norm.get("type") != "NFC":
        raise ValueError(f"{path}: normalizer {norm.get('type')!r} is not supported (only none or NFC)")
    pattern = _pattern_from_pre_tokenizer(tj.get("pre_tokenizer"), path)

    added, strip = {}, {}
    for t in tj.get("added_tokens", []):
        if t.get("single_word"):
            raise ValueError(f"{path}: added token {t['content']!r} has single_word=true, which is not supported")
        added[t["content"]] = t["id"]
        strip[t["content"]] = (t.get("lstrip", False), t.get("rstrip", False))
    added_ids = set(added.values())
    # vocab entries that are also added tokens are added tokens; entries outside the byte alphabet decode as text
    vocab = {}
    for s, i in model["vocab"].items():
        if i not in added_ids:
            b = token_bytes(s)
            vocab[b if b is not None else s.encode("utf-8")] = i
    merges = [m.split(" ") if isinstance(m, str) else m for m in model.get("merges", [])]
    merges = [(token_bytes(a), token_bytes(b)) for a, b in merges]
    if any(a is None or b is None for a, b in merges):
        raise ValueError(f"{path}: merges use characters outside GPT-2's byte alphabet, so this is not a byte-level "
                         f"BPE; {SUPPORTED}")

    # a TemplateProcessing post-processor that starts with a special token = the tokenizer prepends BOS (Llama-3)
    post = tj.get("post_processor") or {}
    posts = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    add_bos = any(p.get("type") == "TemplateProcessing" and "SpecialToken" in (p.get("single") or [{}])[0]
                  for p in posts)
    cfg = _hf_config(os.path.dirname(path))
    cfg["add_bos"] = add_bos or cfg["add_bos"]
    return dict(vocab=vocab, merges=merges, added=added, strip=strip, pattern=pattern, source=source,
                normalizer="NFC" if norm else None, **cfg)


def _from_tiktoken_model(path, source):
    """Llama-3's tokenizer.model: one 'base64(token bytes) rank' per line, ranks = ids; then 256 special tokens."""
    with open(path, "rb") as f:
        raw = f.read()
    ranks = {}
    try:
        for line in raw.decode("ascii").splitlines():
            if line:
                tok, rank = line.split()
                ranks[base64.b64decode(tok, validate=True)] = int(rank)
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"{path}: not a tiktoken rank file (a SentencePiece tokenizer.model, as in Llama-2 or "
                         f"Mistral, is not supported); {SUPPORTED}") from None
    n = len(ranks)
    added = {t: n + i for i, t in enumerate(LLAMA3_SPECIAL)}
    return dict(vocab=ranks, merges=None, added=added, pattern=LLAMA3_PATTERN, source=source,
                bos="<|begin_of_text|>", eos="<|end_of_text|>", add_bos=True)


# GGUF value types (gguf-py's GGUFValueType) -> struct format; 8 is a string, 9 an array
GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def read_gguf_metadata(path):
    """The key-value metadata at the start of a GGUF file (v2/v3) as a dict of Python values. gguf.GGUFReader reads the
    same, but makes a numpy view of every array element: ~12 s on Qwen's 151,936 tokens + 151,387 merges (2-core
    CPU), where this takes under a second. Layout: magic "GGUF", u32 version, u64 tensor count, u64 key count, then
    per key a string (u64 length + UTF-8), a u32 type and the value (an array: u32 element type, u64 count, items)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        magic, version, _, n_kv = struct.unpack_from("<4sIQQ", m, 0)
        if magic != b"GGUF" or version < 2:
            raise ValueError(f"{path}: not a GGUF file of version 2 or 3 (magic {magic!r}, version {version})")
        pos = 24

        def string():
            nonlocal pos
            n, = struct.unpack_from("<Q", m, pos)
            pos += 8 + n
            return m[pos - n:pos].decode("utf-8")

        def scalars(kind, n):
            nonlocal pos
            if kind not in GGUF_SCALARS:
                raise ValueError(f"{path}: GGUF value type {kind} is not readable here")
            fmt = f"<{n}{GGUF_SCALARS[kind]}"
            values = struct.unpack_from(fmt, m, pos)
            pos += struct.calcsize(fmt)
            return values

        fields = {}
        for _ in range(n_kv):
            key = string()
            kind, = scalars(4, 1)
            if kind == 8:
                fields[key] = string()
            elif kind == 9:
                kind, n = scalars(4, 1)[0], scalars(10, 1)[0]
                fields[key] = [string() for _ in range(n)] if kind == 8 else list(scalars(kind, n))
            else:
                fields[key] = scalars(kind, 1)[0]
    return fields


def _from_gguf(path, source):
    get = read_gguf_metadata(path).get

    kind = get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{path}: GGUF tokenizer.ggml.model {kind!r} is not supported (\"llama\" is SentencePiece); "
                         f"{SUPPORTED}")
    pre = get("tokenizer.ggml.pre")
    if pre not in GGUF_PRE_PATTERNS:
        raise ValueError(f"{path}: GGUF tokenizer.ggml.pre {pre!r} is not supported; "
                         f"known: {sorted(GGUF_PRE_PATTERNS)}")
    tokens = get("tokenizer.ggml.tokens")
    types = get("tokenizer.ggml.token_type", [1] * len(tokens))
    # token types: 1 normal, 3 control (special), 4 user-defined (added, matched whole like llama.cpp does)
    added, vocab = {}, {}
    for i, (s, ty) in enumerate(zip(tokens, types)):
        b = token_bytes(s)
        if ty in (3, 4):
            added[s] = i
        else:
            vocab[b if b is not None else s.encode("utf-8")] = i
    merges = [tuple(token_bytes(x) for x in m.split(" ")) for m in get("tokenizer.ggml.merges", [])]
    return dict(vocab=vocab, merges=merges, added=added, pattern=GGUF_PRE_PATTERNS[pre], source=source,
                bos=get("tokenizer.ggml.bos_token_id"), eos=get("tokenizer.ggml.eos_token_id"),
                chat_template=get("tokenizer.chat_template"), add_bos=bool(get("tokenizer.ggml.add_bos_token", False)))


def _from_checkpoint(path):
    """The tokenizer source a project checkpoint was saved with: meta.json beside it, else the .pt itself."""
    meta = os.path.join(os.path.dirname(path), "meta.json")
    if os.path.exists(meta):
        src = _read_json(meta).get("tokenizer")
    elif os.path.exists(path):
        import torch

        src = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("tokenizer")
    else:
        raise FileNotFoundError(f"checkpoint {path} not found (nor a meta.json beside it)")
    if src is None:
        raise ValueError(f"checkpoint {path} stores no tokenizer source")
    return src


def load_tokenizer(source):
    """Build the Tokenizer for a source (see the module docstring for the kinds of source)."""
    if source in ("", "smollm2"):
        from teachers import fetch_default_teacher

        return Tokenizer(**_from_gguf(fetch_default_teacher(), "smollm2"))
    if source.endswith(".pt"):
        src = _from_checkpoint(source)
        if src == source:
            raise ValueError(f"checkpoint {source} names itself as its tokenizer source")
        return load_tokenizer(src)
    path = os.path.abspath(source)
    if not os.path.exists(path) and re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        from huggingface_hub import snapshot_download

        try:
            folder = snapshot_download(source, allow_patterns=TOKENIZER_FILES)
        except Exception as e:
            raise FileNotFoundError(f"tokenizer source {source!r}: not a local path, and the hub download failed: "
                                    f"{type(e).__name__}: {e}") from e
        return Tokenizer(**{**_from_folder(folder), "source": source})
    if os.path.isdir(path):
        return Tokenizer(**_from_folder(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer source {source!r}: no such file or directory (give an HF model folder, "
                                f"tokenizer.json, tokenizer.model, a .gguf, a checkpoint .pt, a hub id or 'smollm2')")
    if path.endswith(".gguf"):
        return Tokenizer(**_from_gguf(path, path))
    if path.endswith(".json"):
        return Tokenizer(**_from_tokenizer_json(path, path))
    if path.endswith(".model"):
        return Tokenizer(**_from_tiktoken_model(path, path))
    raise ValueError(f"tokenizer source {source!r}: unknown file type; {SUPPORTED}")


def _from_folder(folder):
    """An HF folder: tokenizer.json, else a Llama-3 tokenizer.model (top level or original/), else a single .gguf."""
    for name, reader in [("tokenizer.json", _from_tokenizer_json), ("tokenizer.model", _from_tiktoken_model),
                         (os.path.join("original", "tokenizer.model"), _from_tiktoken_model)]:
        if os.path.exists(os.path.join(folder, name)):
            return reader(os.path.join(folder, name), folder)
    ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if len(ggufs) == 1:
        return _from_gguf(os.path.join(folder, ggufs[0]), os.path.join(folder, ggufs[0]))
    raise FileNotFoundError(f"{folder}: no tokenizer.json, tokenizer.model, original/tokenizer.model or single .gguf")


if __name__ == "__main__":
    tok = load_tokenizer(sys.argv[1] if len(sys.argv) > 1 else "smollm2")
    text = sys.argv[2] if len(sys.argv) > 2 else "Hello world! 12345 ça va? 你好 🙂"
    ids = tok.encode(text)
    print(tok)
    print(ids)
    print([tok.decode([i]) for i in ids])
    print(repr(tok.chat(text)))
