"""A full disk: one line naming the file, no temporary file left behind (issue 13, item 7)."""
import errno
import os
import re

import pytest
import torch

from adamwprune.run import atomic
from adamwprune.run import checkpoint
from adamwprune import cli as CLI
from adamwprune.config.kconfig import ROOT
from adamwprune.run.rundir import RunDir, write_json_atomic
from helpers import write_config


def _full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_saving_a_checkpoint_is_one_line_and_leaves_no_temp_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", _full)
    with pytest.raises(atomic.DiskFullError) as err:
        checkpoint.save_atomic({"step": 1}, tmp_path / "last.pt")
    message = str(err.value)
    assert str(tmp_path / "last.pt") in message and "no space left on device" in message
    assert "\n" not in message
    assert list(tmp_path.iterdir()) == []  # neither last.pt nor .last.pt.tmp<pid>


@pytest.mark.parametrize("write", [
    lambda p: write_json_atomic(p / "cell.json", {"status": "running"}),
    lambda p: atomic.write_text_atomic(p / "summary.md", "# x\n"),
    lambda p: atomic.write_file_atomic(p / "fig.png", lambda tmp: tmp.write_bytes(b"png")),
])
def test_every_atomic_writer_turns_enospc_into_one_line_and_cleans_up(tmp_path, monkeypatch, write):
    monkeypatch.setattr(os, "fsync", _full)
    with pytest.raises(atomic.DiskFullError, match="no space left on device"):
        write(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_metrics_row_on_a_full_disk_is_one_line(tmp_path, monkeypatch):
    run = RunDir(tmp_path)

    class FullFile:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        write = flush = _full

    monkeypatch.setattr("builtins.open", FullFile)
    with pytest.raises(atomic.DiskFullError, match=re.escape(str(tmp_path / "metrics.jsonl"))):
        run.append_metrics({"step": 1})


def test_disk_full_during_training_is_one_line_from_the_command(tmp_path, monkeypatch, capsys):
    """What `make` prints when last.pt cannot be written: one line, exit 5, no temp file."""
    path = write_config(tmp_path, {"MODEL": "lenet5", "DATASET": "synthetic", "DATA_SYNTHETIC_SIZE": "64",
                                   "BATCH_SIZE": "16", "DEVICE": "cpu", "MAX_ITERS": "4",
                                   "TRAIN_EVAL_INTERVAL": "2", "RUN_MONITOR_INTERVAL": "0.2"})
    monkeypatch.setattr(torch, "save", _full)
    code = CLI.main(["run", "--config", str(path), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == CLI.EXIT_DISK_FULL
    assert err.count("\n") == 1 and err.startswith("error: ") and "last.pt" in err and "no space" in err
    assert not [p for p in (tmp_path / "run").iterdir() if ".tmp" in p.name]


def test_files_are_renamed_into_place_only_by_the_atomic_module():
    """One atomic-write helper: no other module renames temporary files itself. Exceptions:
    the token shard writer streams gigabytes into its own temporary files, and the C
    compiler writes a kernel library's shared object into a temporary directory."""
    allowed = {ROOT / "lib" / "run" / "atomic.py", ROOT / "lib" / "data" / "tokens.py",
               ROOT / "lib" / "native" / "__init__.py"}
    offenders = [p.relative_to(ROOT) for p in (ROOT / "lib").rglob("*.py")
                 if p not in allowed and re.search(r"os\.replace\(|\.replace\(out\)|\.rename\(", p.read_text())]
    assert offenders == []
