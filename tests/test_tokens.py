import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import requests
import tiktoken
import tiktoken.load
import tiktoken.registry
import torch

from adamwprune.data.tokens import (DataPrepError, TokenData, main, prepare_fineweb,
                                    prepare_text, read_document, synthetic_tokens)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CACHE = SHARED / "tiktoken-cache"
PLAYS = SHARED / "text" / "shakespeare"
# The three shortest texts (2-15 KB) keep tokenization well under a second.
SMALL = [PLAYS / f"{n}_gut.txt" for n in ("phoenix_and_the_turtle", "passionate_pilgrim",
                                            "lovers_complaint")]
EOT = 50256


@pytest.fixture
def enc(monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(CACHE))
    return tiktoken.get_encoding("gpt2")


def shard(path: Path) -> np.ndarray:
    return np.fromfile(path, dtype=np.uint16)


def documents(tokens: np.ndarray, enc) -> list[str]:
    """Decode a shard back into its documents (each one starts with EOT)."""
    assert tokens[0] == EOT
    cuts = np.flatnonzero(tokens == EOT).tolist() + [len(tokens)]
    return [enc.decode(tokens[a + 1:b].tolist()) for a, b in zip(cuts, cuts[1:])]


def test_shards_decode_back_to_the_documents_with_eot_before_each(enc, tmp_path):
    meta = prepare_text(SMALL, tmp_path)
    texts = [read_document(p) for p in SMALL]
    # Document 0 is always the (at least one) validation document.
    assert documents(shard(tmp_path / "val.bin"), enc) == texts[:1]
    assert documents(shard(tmp_path / "train.bin"), enc) == texts[1:]
    assert meta["train_tokens"] == len(shard(tmp_path / "train.bin"))
    assert meta["val_tokens"] > 0 and meta["val_docs"] == 1 and meta["train_docs"] == 2
    assert (tmp_path / "train.bin").stat().st_size == 2 * meta["train_tokens"]  # uint16
    on_disk = json.loads((tmp_path / "meta.json").read_text())
    assert on_disk == meta
    assert on_disk["dtype"] == "uint16" and on_disk["eot_token"] == EOT
    assert on_disk["sources"] == [str(p) for p in SMALL]


def test_shards_hold_exactly_the_tiktoken_ids(enc, tmp_path):
    prepare_text(SMALL[:2], tmp_path)
    expected = [EOT] + enc.encode_ordinary(read_document(SMALL[1]))
    assert shard(tmp_path / "train.bin").tolist() == expected


def test_folder_sources_take_sorted_txt_files_recursively(enc, tmp_path):
    src = tmp_path / "corpus"
    (src / "sub").mkdir(parents=True)
    shutil.copy(SMALL[0], src / "b.txt")
    shutil.copy(SMALL[1], src / "sub" / "c.txt")
    shutil.copy(SMALL[2], src / "a.txt")
    (src / "notes.md").write_text("not a document")
    meta = prepare_text([src], tmp_path / "out")
    assert [Path(s).name for s in meta["sources"]] == ["a.txt", "b.txt", "c.txt"]


def test_preparation_leaves_only_the_three_output_files(enc, tmp_path):
    prepare_text(SMALL, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_failed_preparation_removes_temp_files_and_keeps_old_shards(enc, tmp_path):
    out = tmp_path / "out"
    prepare_text(SMALL[:2], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9 latin-1, not UTF-8")
    with pytest.raises(DataPrepError, match="bad.txt is not UTF-8"):
        prepare_text([SMALL[0], SMALL[1], bad], out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_token_budget_caps_the_train_shard_exactly(enc, tmp_path):
    meta = prepare_text(SMALL, tmp_path, token_budget=1000)
    assert meta["train_tokens"] == 1000 == len(shard(tmp_path / "train.bin"))
    assert meta["train_docs"] == 1  # the first train document alone exceeds 1000 tokens


def test_val_fraction_sends_every_kth_document_to_validation(enc, tmp_path):
    meta = prepare_text(SMALL, tmp_path, val_fraction=0.5)
    assert (meta["val_docs"], meta["train_docs"]) == (2, 1)
    with pytest.raises(ValueError, match="val_fraction"):
        prepare_text(SMALL, tmp_path, val_fraction=0.9)


def test_a_single_document_cannot_be_split(enc, tmp_path):
    with pytest.raises(DataPrepError, match="at least two"):
        prepare_text(SMALL[:1], tmp_path / "out")
    assert not list((tmp_path / "out").iterdir())


def test_missing_bpe_cache_offline_names_tiktoken_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "missing"))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # forget the loaded encoding

    def offline(url):
        raise requests.ConnectionError(f"cannot resolve host for {url}")

    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    with pytest.raises(DataPrepError, match="point TIKTOKEN_CACHE_DIR at a folder"):
        prepare_text(SMALL, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_prepares_shards_and_reports_errors_in_one_line(enc, tmp_path, capsys):
    main(["--source", *map(str, SMALL), "--out", str(tmp_path / "cli")])
    assert (tmp_path / "cli" / "meta.json").is_file()
    assert "train /" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"^error: text source .*nope does not exist"):
        main(["--source", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])


def test_fineweb_without_datasets_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataPrepError, match=r"pip install \.\[fineweb\]"):
        prepare_fineweb(tmp_path, token_budget=100)


def test_fineweb_streams_rows_up_to_the_budget(enc, monkeypatch, tmp_path):
    rows = [{"text": f"Document number {i} says hello to the world."} for i in range(50)]
    calls = []

    def load_dataset(path, name, split, streaming):
        calls.append((path, name, split, streaming))
        return iter(rows)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    meta = prepare_fineweb(tmp_path, token_budget=100, val_fraction=0.1)
    assert calls == [("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True)]
    assert meta["train_tokens"] == 100 and meta["val_docs"] >= 1
    assert documents(shard(tmp_path / "val.bin"), enc)[0] == rows[0]["text"]


def test_fineweb_unreachable_points_to_a_local_corpus(enc, monkeypatch, tmp_path):
    def load_dataset(*args, **kwargs):
        raise ConnectionError("hub offline")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(DataPrepError, match="--source PATH_TO_TXT_FILES"):
        prepare_fineweb(tmp_path, token_budget=100)


@pytest.fixture
def counting_shard(tmp_path) -> Path:
    """A shard whose token at position i is i (mod 65,536), to check windows."""
    path = tmp_path / "train.bin"
    np.arange(5000, dtype=np.uint16).tofile(path)
    return path


def test_train_batch_is_a_function_of_seed_and_step(counting_shard):
    data = TokenData(counting_shard, block_size=16)
    x, y = data.train_batch(step=3, batch_size=8, seed=1)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    # Windows are consecutive tokens; targets are the inputs shifted by one.
    assert torch.equal(x[:, 1:] - x[:, :1], torch.arange(1, 16).expand(8, 15))
    assert torch.equal(y, x + 1)
    assert torch.equal(x, data.train_batch(step=3, batch_size=8, seed=1)[0])
    assert not torch.equal(x, data.train_batch(step=4, batch_size=8, seed=1)[0])
    assert not torch.equal(x, data.train_batch(step=3, batch_size=8, seed=2)[0])


def test_ranks_take_slices_of_the_global_batch(counting_shard):
    data = TokenData(counting_shard, block_size=16)
    full, _ = data.train_batch(step=5, batch_size=8, seed=0)
    parts = [data.train_batch(step=5, batch_size=8, seed=0, rank=r, world_size=4)[0]
             for r in range(4)]
    assert all(p.shape == (2, 16) for p in parts)
    assert torch.equal(torch.cat(parts), full)
    with pytest.raises(ValueError, match="does not split over 3 ranks"):
        data.train_batch(step=0, batch_size=8, seed=0, world_size=3)


def test_eval_batches_are_fixed_and_span_the_shard(counting_shard):
    data = TokenData(counting_shard, block_size=16)
    first = list(data.eval_batches(batch_size=4, n_batches=3))
    again = list(data.eval_batches(batch_size=4, n_batches=3))
    assert len(first) == 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    starts = torch.cat([x[:, 0] for x, _ in first])
    assert starts[0] == 0 and starts[-1] == 5000 - 17  # last window's target is the last token
    by_rank = [list(data.eval_batches(4, 3, rank=r, world_size=2)) for r in range(2)]
    assert [len(b) for b in by_rank] == [2, 1]
    assert torch.equal(by_rank[1][0][0], first[1][0])


def test_token_data_errors_say_what_to_do(tmp_path, counting_shard):
    with pytest.raises(FileNotFoundError, match="python -m adamwprune.data.tokens"):
        TokenData(tmp_path / "absent.bin", 16)
    with pytest.raises(ValueError, match="too few"):
        TokenData(counting_shard, block_size=5000)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x00\x01\x02")
    with pytest.raises(ValueError, match="not a uint16 token shard"):
        TokenData(odd, 1)


def test_prepared_shards_feed_token_data(enc, tmp_path):
    prepare_text(SMALL, tmp_path)
    train, val = TokenData(tmp_path / "train.bin", 32), TokenData(tmp_path / "val.bin", 32)
    x, y = train.train_batch(0, 4, seed=0)
    assert int(x.max()) <= EOT and x.shape == (4, 32)
    assert len(list(val.eval_batches(2, 2))) == 2


def test_synthetic_tokens_follow_a_learnable_walk():
    train, val = synthetic_tokens(block_size=32, n_train=4096, n_val=512, vocab_size=64, seed=0)
    assert (len(train), len(val)) == (4096, 512)
    x, y = train.train_batch(0, 16, seed=0)
    assert int(x.max()) < 64
    successors: dict[int, set[int]] = {}
    for a, b in zip(x.flatten().tolist(), y.flatten().tolist()):
        successors.setdefault(a, set()).add(b)
    assert max(len(s) for s in successors.values()) <= 3
    again, _ = synthetic_tokens(block_size=32, n_train=4096, n_val=512, vocab_size=64, seed=0)
    assert torch.equal(x, again.train_batch(0, 16, seed=0)[0])
