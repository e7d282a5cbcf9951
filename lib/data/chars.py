"""Character-level text shards, split as nanoGPT's data/shakespeare_char/prepare.py.

The vocabulary is the sorted set of characters of the text (for tiny Shakespeare:
65 symbols); id i is the i-th character. The text of n characters is split by
position, never shuffled:

    validation = text[int(0.9 n):]               nanoGPT's val.bin exactly, so losses compare
    test       = the last 5 % of text[:int(0.9 n)]   held out too: validation picks, test reports
    train      = the rest of the first 90 %

Preparation writes `train.bin`, `val.bin`, `test.bin` (uint8 ids when the
vocabulary has at most 256 symbols, else uint16), `vocab.json` (the characters in
id order) and `meta.json`, all through temporary files renamed into place,
`meta.json` last, so a folder holding `meta.json` holds complete shards.

    python -m adamwprune.data.chars --source ../shared/data/text/tinyshakespeare/input.txt --out data/char
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

import numpy as np

from ..run.atomic import write_bytes_atomic
from .tokens import DataPrepError, read_document

VAL_FRACTION = 0.1     # nanoGPT: val = data[int(n * 0.9):]
TEST_FRACTION = 0.05   # of the first 90 %: the test split sits just before validation
SPLITS = ("train", "val", "test")
# The address nanoGPT's prepare.py downloads tiny Shakespeare from.
TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
DOWNLOAD_TIMEOUT_S = 30


def split_bounds(n: int) -> tuple[int, int]:
    """(train end, test end = validation start) for a text of n characters."""
    val_start = int(n * (1.0 - VAL_FRACTION))
    train_end = int(val_start * (1.0 - TEST_FRACTION))
    if train_end < 1 or val_start - train_end < 1 or n - val_start < 1:
        raise DataPrepError(f"a text of {n} characters is too short to split into train, test and "
                            "validation; give a longer text")
    return train_end, val_start


def vocabulary(text: str) -> list[str]:
    """The sorted set of characters of `text` (code-point order, as sorted(set(text)))."""
    return sorted(set(text))


def shard_dtype(vocab_size: int) -> np.dtype:
    if vocab_size > 2**16:
        raise DataPrepError(f"{vocab_size} distinct characters; uint16 shards hold at most 65,536")
    return np.dtype(np.uint8 if vocab_size <= 2**8 else np.uint16)


def encode(text: str, vocab: list[str]) -> np.ndarray:
    """Ids of `text` under `vocab` (every character must be in it)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    table = np.array([ord(c) for c in vocab], dtype=np.uint32)
    ids = np.searchsorted(table, codes)
    bad = (ids >= len(table)) | (table[np.minimum(ids, len(table) - 1)] != codes)
    if bad.any():
        raise DataPrepError(f"character {chr(int(codes[np.argmax(bad)]))!r} is not in the vocabulary")
    return ids.astype(shard_dtype(len(vocab)))


def decode(ids, vocab: list[str]) -> str:
    return "".join(vocab[int(i)] for i in ids)


def _write_atomic(path: Path, data: bytes) -> None:
    write_bytes_atomic(path, data)


def prepare_chars(source, out_dir) -> dict:
    """Character shards of one text file into out_dir; returns the meta written."""
    source, out = Path(source), Path(out_dir)
    if not source.is_file():
        raise FileNotFoundError(f"text file {source} does not exist; character-level data needs one "
                                ".txt file (GPT2_TEXT_SOURCE)")
    text = read_document(source)
    vocab = vocabulary(text)
    ids = encode(text, vocab)
    train_end, val_start = split_bounds(len(ids))
    parts = {"train": ids[:train_end], "test": ids[train_end:val_start], "val": ids[val_start:]}
    out.mkdir(parents=True, exist_ok=True)
    # Drop the old meta.json first: its presence must always vouch for the shards.
    (out / "meta.json").unlink(missing_ok=True)
    for split, arr in parts.items():
        _write_atomic(out / f"{split}.bin", arr.tobytes())
    _write_atomic(out / "vocab.json", (json.dumps({"chars": vocab}, ensure_ascii=False) + "\n").encode())
    meta = {"encoding": "char", "vocab_size": len(vocab), "dtype": ids.dtype.name,
            "source": str(source), "source_chars": len(text),
            "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
            "val_fraction": VAL_FRACTION, "test_fraction_of_first_part": TEST_FRACTION,
            **{f"{s}_tokens": int(parts[s].size) for s in SPLITS}}
    _write_atomic(out / "meta.json", (json.dumps(meta, indent=2) + "\n").encode())
    return meta


def read_meta(folder) -> dict:
    meta = Path(folder) / "meta.json"
    try:
        return json.loads(meta.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{meta} not found: prepare the character shards with python -m "
                                f"adamwprune.data.chars --source FILE --out {Path(folder)}") from None


def read_vocab(folder) -> list[str]:
    return json.loads((Path(folder) / "vocab.json").read_text())["chars"]


def fetch_text(path: Path, url: Optional[str], allowed: bool) -> Path:
    """`path` itself when it exists; else download `url` to it (when allowed and a url is
    set); else FileNotFoundError, one line saying where to put the file."""
    path = Path(path)
    if path.is_file():
        return path
    where = f"put the text at {path} or point GPT2_TEXT_SOURCE at it"
    if not url or not allowed:
        why = "no download address (GPT2_TEXT_URL)" if not url else "downloads are off (DATA_DOWNLOAD=n)"
        raise FileNotFoundError(f"{path} not found and {why}: {where}"
                                + (f" (it is the file at {url})" if url else ""))
    print(f"[data] downloading {url} -> {path}", flush=True)
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
            data = resp.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise FileNotFoundError(f"{path} not found and downloading {url} failed ({reason}), "
                                f"probably offline: {where}") from e
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, data)
    return path


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m adamwprune.data.chars",
                                description="Character-level shards of one text file (nanoGPT's splits).")
    p.add_argument("--source", required=True, help="the .txt file")
    p.add_argument("--out", required=True, help="output folder for train/val/test.bin, vocab.json, meta.json")
    p.add_argument("--url", default=None, help="download the source from here when it is absent")
    args = p.parse_args(argv)
    try:
        meta = prepare_chars(fetch_text(Path(args.source), args.url, allowed=True), args.out)
    except (DataPrepError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"{args.out}: vocabulary of {meta['vocab_size']} characters; {meta['train_tokens']:,} train / "
          f"{meta['test_tokens']:,} test / {meta['val_tokens']:,} val characters")


if __name__ == "__main__":
    main()
