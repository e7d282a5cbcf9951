"""Character-level shards: nanoGPT's splits exactly, the vocabulary beside them, missing files."""
import json
from pathlib import Path

import numpy as np
import pytest

from adamwprune.config import kconfig as C
from adamwprune.cli import load_task
from adamwprune.config.kconfig import ROOT
from adamwprune.data import chars
from adamwprune.data.tokens import DataPrepError, TokenData
from helpers import cli

TINY = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "text" / "tinyshakespeare" / "input.txt"


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("char")
    return chars.prepare_chars(TINY, out), out


def test_validation_split_is_nanogpts_val_bin_exactly(tiny_shards):
    meta, out = tiny_shards
    # nanoGPT's data/shakespeare_char/prepare.py, line by line
    data = TINY.read_text()
    stoi = {ch: i for i, ch in enumerate(sorted(list(set(data))))}
    n = len(data)
    val_ids = np.array([stoi[c] for c in data[int(n * 0.9):]], dtype=np.uint16)
    assert meta["vocab_size"] == len(stoi) == 65 and meta["source_chars"] == 1_115_394
    assert meta["dtype"] == "uint8"
    ours = np.fromfile(out / "val.bin", dtype=np.uint8)
    assert ours.size == 111_540 and np.array_equal(ours.astype(np.uint16), val_ids)


def test_test_split_is_the_last_5_percent_of_the_first_90(tiny_shards):
    meta, out = tiny_shards
    n90 = int(1_115_394 * 0.9)
    assert meta["test_tokens"] == n90 - int(n90 * 0.95) == 50_193
    assert meta["train_tokens"] + meta["test_tokens"] == n90
    vocab = chars.read_vocab(out)
    text = TINY.read_text()
    test = np.fromfile(out / "test.bin", dtype=np.uint8)
    assert chars.decode(test, vocab) == text[int(n90 * 0.95):n90]


def test_the_three_shards_and_vocab_json_decode_back_to_the_text(tiny_shards):
    meta, out = tiny_shards
    vocab = json.loads((out / "vocab.json").read_text())["chars"]
    assert vocab == sorted(set(TINY.read_text()))
    ids = np.concatenate([np.fromfile(out / f"{s}.bin", dtype=np.uint8) for s in ("train", "test", "val")])
    assert chars.decode(ids, vocab) == TINY.read_text()
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "test.bin", "train.bin", "val.bin", "vocab.json"]


def test_more_than_256_characters_give_uint16_shards(tmp_path):
    alphabet = "".join(chr(0x100 + i) for i in range(300))
    (tmp_path / "wide.txt").write_text(alphabet * 20, encoding="utf-8")
    meta = chars.prepare_chars(tmp_path / "wide.txt", tmp_path / "out")
    assert meta["vocab_size"] == 300 and meta["dtype"] == "uint16"
    data = TokenData(tmp_path / "out" / "train.bin", 8, meta["dtype"])
    x, y = data.train_batch(0, 4, seed=1)
    assert int(x.max()) < 300 and x.shape == (4, 8)
    assert chars.decode(np.fromfile(tmp_path / "out" / "val.bin", np.uint16), chars.read_vocab(tmp_path / "out")) \
        == (alphabet * 20)[int(6000 * 0.9):]


def test_a_text_too_short_to_split_is_refused(tmp_path):
    (tmp_path / "t.txt").write_text("ab")
    with pytest.raises(DataPrepError, match="too short"):
        chars.prepare_chars(tmp_path / "t.txt", tmp_path / "out")
    assert not (tmp_path / "out" / "meta.json").exists()


def test_missing_text_offline_says_where_to_put_it(tmp_path):
    missing = tmp_path / "tiny" / "input.txt"
    # port 9 (discard) on the loopback refuses at once: what an offline machine sees
    with pytest.raises(FileNotFoundError) as e:
        chars.fetch_text(missing, "http://127.0.0.1:9/input.txt", allowed=True)
    assert str(missing) in str(e.value) and "put the text at" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="DATA_DOWNLOAD=n"):
        chars.fetch_text(missing, "http://127.0.0.1:9/input.txt", allowed=False)
    with pytest.raises(FileNotFoundError, match="GPT2_TEXT_URL"):
        chars.fetch_text(missing, "", allowed=True)
    assert not missing.exists()


def test_missing_text_is_downloaded_from_its_address(tmp_path):
    served = tmp_path / "served.txt"
    served.write_text("to be or not to be " * 50)
    target = tmp_path / "fresh" / "input.txt"
    assert chars.fetch_text(target, served.as_uri(), allowed=True) == target
    assert target.read_text() == served.read_text()
    assert [p.name for p in target.parent.iterdir()] == ["input.txt"]  # no temporary file left


def _char_cfg(tmp_path, text, **extra):
    src = tmp_path / "corpus" / "play.txt"
    src.parent.mkdir(exist_ok=True)
    src.write_text(text)
    cfg, _, _ = C.load(None, {"MODEL": "gpt2", "DATASET": "text_char", "GPT2_SIZE": "tiny", "GPT2_BIAS": "n",
                              "GPT2_BLOCK_SIZE": "16", "GPT2_TEXT_SOURCE": str(src), "DATA_DIR": str(tmp_path / "d"),
                              "DEVICE": "cpu", "OPTIMIZER": "adamw", "PRUNING": "none", **extra})
    return cfg


def test_gpt2_task_trains_on_characters_with_the_character_vocabulary(tmp_path):
    cfg = _char_cfg(tmp_path, TINY.read_text()[:20_000])
    task = load_task("gpt2")
    splits = task.build_data(cfg)
    model = task.build_model(cfg)
    assert model.config.vocab_size == len(set(TINY.read_text()[:20_000]))
    assert not any(n.endswith(".bias") for n, _ in model.named_parameters())
    assert (len(splits.train), len(splits.test), len(splits.val)) == (17_100, 900, 2_000)
    assert (tmp_path / "d" / "tokens" / "corpus-play-char" / "vocab.json").is_file()
    x, y = splits.train.train_batch(0, 4, cfg.seed)
    assert int(x.max()) < model.config.vocab_size and bool((x[:, 1:] == y[:, :-1]).all())


def test_bpe_only_options_do_not_apply_to_characters(tmp_path):
    with pytest.raises(C.ConfigError, match="GPT2_TOKEN_BUDGET"):
        _char_cfg(tmp_path, "abc" * 100, GPT2_TOKEN_BUDGET="1000")


def test_a_run_whose_text_is_missing_stops_with_one_line_saying_where_to_put_it(tmp_path):
    missing = tmp_path / "absent" / "input.txt"
    r = cli("run", "--config", str(ROOT / "gpt2" / "defconfigs" / "gpt2-shakespeare-char"),
            f"--override=GPT2_TEXT_SOURCE={missing}", "--override=GPT2_TEXT_URL=http://127.0.0.1:9/input.txt",
            f"--override=DATA_DIR={tmp_path / 'data'}", f"--override=RUN_RESULTS_DIR={tmp_path / 'results'}")
    assert r.returncode == 2, r.stdout + r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"error: {missing} not found and downloading http://127.0.0.1:9/input.txt failed")
    assert f"put the text at {missing} or point GPT2_TEXT_SOURCE at it" in line
