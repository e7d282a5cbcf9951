"""GPT-2 token shards: preparation (text files or FineWeb-Edu) and batching.

Layout, as nanoGPT and llm.c: `train.bin` and `val.bin` are raw uint16 token
ids (np.memmap-compatible), every document prefixed with the end-of-text token,
and `meta.json` describes them. Preparation writes temporary files and renames
them into place, `meta.json` last, so a directory holding `meta.json` holds
complete shards.

Documents go to validation by position: document i is a validation document
when i % round(1 / val_fraction) == 0, so document 0 always is (at least one)
and the rule works on a stream of unknown length.

    python -m adamwprune.data.tokens --source ../shared/data/text/shakespeare --out data/shakespeare
    python -m adamwprune.data.tokens --source fineweb --out data/fineweb --token-budget 1000000000
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import numpy as np
import torch
from tqdm import tqdm

from ..run.atomic import disk_error, write_text_atomic
from .base import generator_for

# A stream id of its own (prime) keeps token offsets apart from the image
# streams of base.py for the same (seed, step).
_TOKEN_STREAM = 104_729
_SYNTHETIC_STREAM = 104_723
# Documents tokenized per call of encode_ordinary_batch (threads share a batch).
_ENCODE_CHUNK = 64
FINEWEB_REPO = "HuggingFaceFW/fineweb-edu"
_LOCAL_HINT = ("to use a local corpus instead run "
               "python -m adamwprune.data.tokens --source PATH_TO_TXT_FILES --out DIR")


# Where the presets' corpus comes from, for a checkout that does not have it beside it.
CORPUS_HINT = ("The presets read Shakespeare's plays: plain-text files from Project Gutenberg "
               "(https://www.gutenberg.org/ebooks/author/65, 'Plain Text UTF-8') in one folder, or the single "
               "file tiny Shakespeare (https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
               "tinyshakespeare/input.txt)")


class DataPrepError(RuntimeError):
    """Token data cannot be prepared; the message says how to fix it."""


def get_encoding(name: str = "gpt2"):
    """tiktoken's encoding, with one clear line when the BPE files cannot be had."""
    import tiktoken

    if name not in tiktoken.list_encoding_names():
        raise ValueError(f"unknown tiktoken encoding {name!r}; "
                         f"valid names: {', '.join(tiktoken.list_encoding_names())}")
    try:
        enc = tiktoken.get_encoding(name)
    except Exception as e:  # requests' network errors, OSError, hash mismatch, ...
        cache = os.environ.get("TIKTOKEN_CACHE_DIR", "<unset>")
        raise DataPrepError(
            f"cannot load the tiktoken {name!r} BPE files ({type(e).__name__}), probably offline: "
            f"point TIKTOKEN_CACHE_DIR at a folder of tiktoken's cached files (run once with internet, "
            f"or copy them from a machine that has them; now {cache})") from e
    if enc.n_vocab > 2**16:
        raise DataPrepError(f"encoding {name!r} has {enc.n_vocab} tokens; "
                            "uint16 shards hold at most 65,536")
    return enc


def text_files(sources: Iterable[Union[str, Path]]) -> list[Path]:
    """The documents of `sources`: files as given, folders as their sorted *.txt files."""
    files: list[Path] = []
    for src in map(Path, sources):
        if src.is_dir():
            files.extend(sorted(src.rglob("*.txt")))
        elif src.is_file():
            files.append(src)
        else:
            raise FileNotFoundError(f"text source {src} does not exist; pass .txt files or folders of them "
                                    f"(GPT2_TEXT_SOURCE=). {CORPUS_HINT}")
    if not files:
        raise FileNotFoundError(f"no .txt files in {', '.join(map(str, sources))}")
    return files


def read_document(path: Path) -> str:
    """A text file as one document (UTF-8, optional BOM dropped, newlines as \\n)."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataPrepError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                            "convert it with iconv -t UTF-8") from e


def _val_stride(val_fraction: float) -> int:
    if not 0.0 < val_fraction <= 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5], got {val_fraction}")
    return max(2, round(1.0 / val_fraction))


class _ShardWriter:
    """Appends documents to temporary train/val files; commit() renames them into
    place and writes meta.json last; leaving the block without commit deletes them."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        tag = uuid.uuid4().hex[:8]
        self.tmp = {s: out_dir / f".{s}.bin.{tag}.tmp" for s in ("train", "val")}
        self.files = {s: open(p, "wb") for s, p in self.tmp.items()}
        self.tokens = {"train": 0, "val": 0}
        self.docs = {"train": 0, "val": 0}

    def add(self, split: str, tokens: list[int]) -> None:
        try:
            np.asarray(tokens, dtype=np.uint16).tofile(self.files[split])
        except OSError as exc:
            raise disk_error(self.out_dir / f"{split}.bin", exc) from None
        self.tokens[split] += len(tokens)
        self.docs[split] += 1

    def commit(self, meta: dict) -> dict:
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        # Drop the old meta.json first: its presence must always vouch for the shards.
        (self.out_dir / "meta.json").unlink(missing_ok=True)
        for split, tmp in self.tmp.items():
            os.replace(tmp, self.out_dir / f"{split}.bin")
        meta = {**meta, "dtype": "uint16",
                **{f"{s}_tokens": n for s, n in self.tokens.items()},
                **{f"{s}_docs": n for s, n in self.docs.items()}}
        write_text_atomic(self.out_dir / "meta.json", json.dumps(meta, indent=2) + "\n")
        return meta

    def __enter__(self) -> "_ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        for split, f in self.files.items():
            f.close()
            self.tmp[split].unlink(missing_ok=True)


def _tokenized(docs: Iterable[str], enc) -> Iterator[list[int]]:
    """Each document's ids, prefixed with end-of-text; tokenized in threaded chunks."""
    it, threads = iter(docs), os.cpu_count() or 1
    while chunk := list(itertools.islice(it, _ENCODE_CHUNK)):
        for ids in enc.encode_ordinary_batch(chunk, num_threads=threads):
            yield [enc.eot_token] + ids


def write_shards(docs: Iterable[str], out_dir, enc, val_fraction: float = 0.005,
                 token_budget: Optional[int] = None, meta: Optional[dict] = None,
                 total_docs: Optional[int] = None) -> dict:
    """Tokenize `docs` into out_dir/{train,val}.bin and meta.json; returns the meta.

    `token_budget` caps train.bin (the last train document is cut to fit); the
    validation documents interleaved up to that point come on top of it.
    """
    stride = _val_stride(val_fraction)
    if token_budget is not None and token_budget < 1:
        raise ValueError(f"token_budget must be a positive number of tokens, got {token_budget}")
    bar = tqdm(total=token_budget or total_docs, unit="tok" if token_budget else "doc",
               unit_scale=bool(token_budget), desc=f"tokenizing -> {out_dir}")
    with _ShardWriter(Path(out_dir)) as writer, bar:
        for i, tokens in enumerate(_tokenized(docs, enc)):
            if i % stride == 0:
                writer.add("val", tokens)
                bar.update(0 if token_budget else 1)
                continue
            if token_budget is not None:
                tokens = tokens[:token_budget - writer.tokens["train"]]
            writer.add("train", tokens)
            bar.update(len(tokens) if token_budget else 1)
            if token_budget is not None and writer.tokens["train"] >= token_budget:
                break
        if writer.docs["train"] == 0:
            raise DataPrepError(f"only {writer.docs['val']} document(s): the first goes to "
                                "validation, so give at least two")
        return writer.commit({"encoding": enc.name, "vocab_size": enc.n_vocab,
                              "eot_token": enc.eot_token, "val_fraction": val_fraction,
                              "token_budget": token_budget, **(meta or {})})


def prepare_text(sources, out_dir, val_fraction: float = 0.005,
                 token_budget: Optional[int] = None, encoding: str = "gpt2") -> dict:
    """Token shards from text files or folders of .txt files (one file = one document)."""
    files = text_files(sources)
    enc = get_encoding(encoding)
    return write_shards((read_document(f) for f in files), out_dir, enc, val_fraction,
                        token_budget, meta={"sources": [str(f) for f in files]},
                        total_docs=len(files))


def _guarded_texts(rows: Iterable[dict]) -> Iterator[str]:
    """The rows' text; streaming fetches lazily, so network errors surface here."""
    it = iter(rows)
    while True:
        try:
            row = next(it)
        except StopIteration:
            return
        except Exception as e:
            raise DataPrepError(f"lost {FINEWEB_REPO} while streaming ({type(e).__name__}: {e}); "
                                f"{_LOCAL_HINT}") from e
        yield row["text"]


def prepare_fineweb(out_dir, token_budget: int, name: str = "sample-10BT",
                    val_fraction: float = 0.005) -> dict:
    """Token shards from a stream of FineWeb-Edu, stopping at `token_budget` train tokens."""
    try:
        import datasets
    except ImportError as e:
        raise DataPrepError("FineWeb needs the optional 'datasets' package: "
                            "pip install .[fineweb]") from e
    if token_budget is None or token_budget < 1:
        raise ValueError("FineWeb is billions of tokens: "
                         "give a positive token_budget (--token-budget N)")
    enc = get_encoding("gpt2")
    try:
        rows = datasets.load_dataset(FINEWEB_REPO, name=name, split="train", streaming=True)
    except Exception as e:  # offline hub errors come in many types
        raise DataPrepError(f"cannot reach {FINEWEB_REPO} ({name}): {type(e).__name__}; "
                            f"{_LOCAL_HINT}") from e
    return write_shards(_guarded_texts(rows), out_dir, enc, val_fraction, token_budget,
                        meta={"sources": [f"{FINEWEB_REPO}/{name}"]})


class TokenData:
    """Windows of `block_size` tokens from one shard (a .bin path or an array).

    Training windows start at random offsets drawn from a generator that depends
    only on (seed, step), so batches need no loader state to resume; evaluation
    windows are fixed and spread evenly over the shard.
    """

    def __init__(self, source: Union[str, Path, np.ndarray], block_size: int,
                 dtype: Union[str, np.dtype] = np.uint16):
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.dtype = np.dtype(dtype)  # uint16 (BPE shards) or uint8 (small character vocabularies)
        self.path: Optional[Path] = None
        self._array: Optional[np.ndarray] = None
        if isinstance(source, np.ndarray):
            self._array = source.astype(self.dtype, copy=False).reshape(-1)
            self.n_tokens = int(self._array.size)
        else:
            self.path = Path(source)
            if not self.path.is_file():
                raise FileNotFoundError(
                    f"token shard {self.path} not found; prepare it with python -m "
                    f"adamwprune.data.tokens --source PATH_OR_fineweb --out {self.path.parent}")
            size = self.path.stat().st_size
            if size % self.dtype.itemsize:
                raise ValueError(f"{self.path} has an odd size ({size} bytes): "
                                 f"not a {self.dtype.name} token shard")
            self.n_tokens = size // self.dtype.itemsize
        if self.n_tokens <= block_size:
            raise ValueError(f"{self.path or 'token array'} has {self.n_tokens} tokens, too few "
                             f"for one window of block_size {block_size} (+1 target)")

    def __len__(self) -> int:
        return self.n_tokens

    def _tokens(self) -> np.ndarray:
        if self._array is not None:
            return self._array
        # A fresh memmap per batch, as nanoGPT: a long-lived one keeps every
        # page it ever touched mapped and the resident memory grows.
        return np.memmap(self.path, dtype=self.dtype, mode="r")

    def _windows(self, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = starts.numpy()[:, None] + np.arange(self.block_size + 1)
        chunk = torch.from_numpy(self._tokens()[idx].astype(np.int64))
        return chunk[:, :-1], chunk[:, 1:]

    def steps_per_epoch(self, batch_size: int) -> int:
        """Steps whose batches hold as many tokens as the shard (at least 1)."""
        return max(1, self.n_tokens // (batch_size * self.block_size))

    def train_batch(self, step: int, batch_size: int, seed: int, rank: int = 0,
                    world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of the global batch of `step`: (x, y) int64, y = x shifted by one."""
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} does not split over {world_size} ranks")
        g = generator_for(seed, _TOKEN_STREAM, step)
        starts = torch.randint(0, self.n_tokens - self.block_size, (batch_size,), generator=g)
        per_rank = batch_size // world_size
        return self._windows(starts[rank * per_rank:(rank + 1) * per_rank])

    def eval_batches(self, batch_size: int, n_batches: int, rank: int = 0,
                     world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The same `n_batches` batches every call, windows evenly spaced over the
        shard; ranks take interleaved batches (as ArrayData.eval_batches)."""
        n = batch_size * n_batches
        starts = torch.from_numpy(
            np.linspace(0, self.n_tokens - self.block_size - 1, num=n).round().astype(np.int64))
        for b in range(rank, n_batches, world_size):
            yield self._windows(starts[b * batch_size:(b + 1) * batch_size])


def synthetic_tokens(block_size: int, n_train: int = 65_536, n_val: int = 8_192,
                     vocab_size: int = 256, seed: int = 0) -> tuple[TokenData, TokenData]:
    """(train, val) token streams a tiny model can learn within a few steps: a
    walk z_t = z_{t-1} + {1, 2, 3} (mod vocab_size) shown through a fixed random
    permutation of the ids, so each token has three equally likely successors."""
    if not 1 < vocab_size <= 2**16:
        raise ValueError(f"vocab_size must be in [2, 65536], got {vocab_size}")
    g = generator_for(seed, _SYNTHETIC_STREAM, 0)
    perm = torch.randperm(vocab_size, generator=g)
    steps = torch.randint(1, 4, (n_train + n_val,), generator=g)
    ids = perm[torch.cumsum(steps, 0) % vocab_size].numpy().astype(np.uint16)
    return TokenData(ids[:n_train], block_size), TokenData(ids[n_train:], block_size)


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m adamwprune.data.tokens",
                                description="Tokenize text into GPT-2 uint16 shards.")
    p.add_argument("--source", nargs="+", required=True,
                   help="text files / folders of .txt files, or 'fineweb'")
    p.add_argument("--out", required=True, help="output folder for train.bin, val.bin, meta.json")
    p.add_argument("--token-budget", type=int, default=None, help="stop at this many train tokens")
    p.add_argument("--val-fraction", type=float, default=0.005,
                   help="share of documents for validation (at least one)")
    p.add_argument("--fineweb-name", default="sample-10BT", help="FineWeb-Edu configuration")
    args = p.parse_args(argv)
    try:
        if args.source == ["fineweb"]:
            meta = prepare_fineweb(args.out, args.token_budget, args.fineweb_name,
                                   args.val_fraction)
        else:
            meta = prepare_text(args.source, args.out, args.val_fraction, args.token_budget)
    except (DataPrepError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"{args.out}: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens")


if __name__ == "__main__":
    main()
