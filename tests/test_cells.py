"""How a matrix judges and reports its cells (issue 13: item 5, and the matrix's wrong words)."""
import json
import signal
from types import SimpleNamespace

import pytest

from adamwprune import cli as CLI
from adamwprune.run import matrix
from helpers import write_config

BASE = {"MODEL": "lenet5", "DATASET": "synthetic", "DATA_SYNTHETIC_SIZE": "64", "BATCH_SIZE": "16",
        "DEVICE": "cpu", "MAX_ITERS": "4", "TRAIN_EVAL_INTERVAL": "2", "RUN_MONITOR_INTERVAL": "0.2",
        "MATRIX": "y", "OPTIMIZER": "adamw", "MATRIX_OPTIMIZER_ADAMW": "y", "MATRIX_PRUNING_NONE": "y",
        "MATRIX_SEEDS": "2"}


@pytest.fixture
def mdir(tmp_path):
    """A two-cell matrix, created but not run."""
    path = write_config(tmp_path, BASE, defconfig="cells-test")
    return matrix.create(path, [], tmp_path / "results")


def _cells(mdir):
    return matrix.load_cells(mdir)[1]


def _finished(cell_dir, status="completed"):
    (cell_dir / "final.json").write_text(json.dumps({"status": status}))


@pytest.mark.parametrize("code", [-signal.SIGKILL, -signal.SIGTERM, 128 + signal.SIGTERM])
def test_a_cell_killed_by_a_signal_while_its_runner_lives_is_interrupted_and_resumable(mdir, code):
    first = _cells(mdir)[0]
    (mdir / first.id / "last.pt").write_bytes(b"a checkpoint")
    _finished(mdir / _cells(mdir)[1].id)
    assert matrix._finish(mdir, first, code) == "interrupted"  # what the runner records when it reaps it
    assert matrix.cell_state(mdir / first.id) == "interrupted"
    assert CLI.find_unfinished(mdir.parent) == mdir  # `make continue` finds it


def test_a_cell_that_failed_on_its_own_error_stays_failed(mdir):
    first = _cells(mdir)[0]
    assert matrix._finish(mdir, first, 2) == "failed"
    assert matrix.cell_state(mdir / first.id) == "failed"


def test_a_corrupt_last_pt_in_a_matrix_is_handled_as_its_message_promises(mdir, capsys):
    """'delete it and `make continue` restarts the run from scratch' holds for a matrix cell."""
    bad, good = _cells(mdir)
    _finished(mdir / good.id)
    (mdir / bad.id / "last.pt").write_bytes(b"not a checkpoint")
    meta = matrix.load_cells(mdir)[0]
    # The cell's process, as the runner starts it (in this process: faster).
    code = CLI.main(["run", "--config", str(mdir / "defconfig"), "--run-dir", str(mdir / bad.id), "--resume",
                     *(f"--override={k}={v}" for k, v in matrix.cell_pairs(meta, bad))])
    err = capsys.readouterr().err
    assert code == CLI.EXIT_CORRUPT_CHECKPOINT and err.count("\n") == 1
    assert "delete it and `make continue` restarts the run from scratch" in err
    assert matrix._finish(mdir, bad, code) == "failed"
    assert json.loads((mdir / bad.id / "cell.json").read_text())["reason"] == "corrupt-checkpoint"
    assert CLI.find_unfinished(mdir.parent) is None  # failed: not picked up while the file is there
    (mdir / bad.id / "last.pt").unlink()
    assert matrix.cell_state(mdir / bad.id) == "pending"
    assert CLI.find_unfinished(mdir.parent) == mdir
    assert CLI.main(["continue", "--results", str(mdir.parent)]) == 0
    assert json.loads((mdir / bad.id / "final.json").read_text())["status"] == "completed"
    assert "(2/2 cells)" in capsys.readouterr().out


def test_a_matrix_whose_cells_diverged_exits_non_zero_and_counts_them(mdir, capsys):
    first, second = _cells(mdir)
    _finished(mdir / first.id, "diverged")
    _finished(mdir / second.id)
    capsys.readouterr()
    assert CLI.main(["continue", "--dir", str(mdir)]) == 1
    out = capsys.readouterr().out
    assert "1 of 2 cells diverged" in out and "all 2 cells finished" not in out


def test_status_names_a_metrics_file_whose_last_line_is_cut(mdir, capsys):
    cell = mdir / _cells(mdir)[0].id
    (cell / "metrics.jsonl").write_text(json.dumps({"step": 2}) + "\n" + '{"step": 4, "val_')
    capsys.readouterr()
    assert CLI.main(["status", "--dir", str(mdir)]) == 0
    out = capsys.readouterr().out
    assert f"{cell / 'metrics.jsonl'}: the last line is cut" in out and "2/?" in out


def test_the_runner_shows_progress_over_cells_with_an_eta(monkeypatch):
    clock = iter([0.0, 0.0, 60.0, 100.0, 130.0, 150.0])
    monkeypatch.setattr(matrix, "time", SimpleNamespace(time=lambda: next(clock)))
    progress = matrix.Progress(total=10, finished=4, todo=6, jobs=2)
    progress.cell_started("a")
    progress.cell_started("b")
    assert progress.cell_done("a") == "(5/10 cells, ETA 2m30s)"  # 60 s a cell, 5 left, 2 at a time
    assert progress.cell_done("b") == "(6/10 cells, ETA 2m40s)"  # (60 + 100) / 2 s a cell, 4 left
    progress.cell_started("c")
    progress.left = 1
    assert progress.cell_done("c").endswith("cells)")  # nothing left: no ETA
