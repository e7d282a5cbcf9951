"""One writer per run or matrix directory; no orphan trainer (issue 13, item 1)."""
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from adamwprune import cli as CLI
from adamwprune.run import locks
from adamwprune.run import matrix
from adamwprune.config.kconfig import ROOT
from helpers import write_config

# locks.py loaded by path: a holder process in a fraction of a second (no torch import).
HOLD = ("import importlib.util, sys, time; spec = importlib.util.spec_from_file_location('locks', sys.argv[1]); "
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
        "lock = m.DirLock(sys.argv[2]).acquire(); print('held', flush=True); time.sleep(60)")


def _holder_process(directory):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(ROOT / "lib" / "run" / "locks.py"), str(directory)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_lock_fails_in_one_line_naming_the_live_holder(tmp_path):
    proc = _holder_process(tmp_path)
    try:
        with pytest.raises(locks.LockBusy) as err:
            locks.DirLock(tmp_path).acquire()
        assert f"process {proc.pid}" in str(err.value) and "\n" not in str(err.value)
        assert locks.holder(tmp_path)["pid"] == proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_a_holder_killed_by_sigkill_never_blocks(tmp_path):
    proc = _holder_process(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert locks.holder(tmp_path) is None  # its record names a dead process
    with locks.DirLock(tmp_path):
        assert locks.holder(tmp_path)["pid"] == os.getpid()
    assert locks.holder(tmp_path) is None  # released: names nobody


def test_a_recorded_pid_that_now_belongs_to_another_process_is_stale(tmp_path):
    # The pid lives (it is this test), but it was not running when the record was written.
    (tmp_path / locks.LOCK_NAME).write_text(json.dumps(
        {"pid": os.getpid(), "started": psutil.Process().create_time() - 3600, "cmd": ["old"]}))
    assert locks.holder(tmp_path) is None
    assert "names none that is still running" in locks.describe(locks.holder(tmp_path))


def _interrupted_run(tmp_path):
    """A run directory with last.pt and no final.json, as a killed `make` leaves it."""
    path = write_config(tmp_path, {"MODEL": "lenet5", "DATASET": "synthetic", "DATA_SYNTHETIC_SIZE": "64",
                                   "BATCH_SIZE": "16", "DEVICE": "cpu", "MAX_ITERS": "4", "TRAIN_EVAL_INTERVAL": "2",
                                   "RUN_MONITOR_INTERVAL": "0.2", "RUN_RESULTS_DIR": str(tmp_path / "results")})
    assert CLI.main(["run", "--config", str(path), "--run-dir", str(tmp_path / "results" / "run")]) == 0
    (tmp_path / "results" / "run" / "final.json").unlink()
    return tmp_path / "results" / "run"


def test_continue_on_a_run_another_process_writes_is_refused_in_one_line(tmp_path, capsys):
    run = _interrupted_run(tmp_path)
    rows = (run / "metrics.jsonl").read_text()
    capsys.readouterr()
    # The lock is per open file: held here, it stands for the first `make continue`.
    with locks.DirLock(run):
        code = CLI.main(["continue", "--dir", str(run)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and f"process {os.getpid()}" in err and "in use" in err
    assert (run / "metrics.jsonl").read_text() == rows and not (run / "final.json").exists()


def test_two_matrix_runners_never_both_run(tmp_path, capsys):
    path = write_config(tmp_path, {"MODEL": "lenet5", "DATASET": "synthetic", "DEVICE": "cpu", "MATRIX": "y",
                                   "OPTIMIZER": "adamw", "MATRIX_OPTIMIZER_ADAMW": "y", "MATRIX_SEEDS": "2",
                                   "MATRIX_PRUNING_NONE": "y"}, defconfig="lock-test")
    mdir = matrix.create(path, [], tmp_path / "results")
    with locks.DirLock(mdir, "matrix"):
        code = CLI.main(["continue", "--dir", str(mdir)])
    err = capsys.readouterr().err
    assert code == 2 and "matrix is in use by process" in err and err.count("\n") == 1
    assert not list(mdir.glob("*/cell.json"))  # no cell was started


def test_a_trainer_started_by_make_dies_with_make(tmp_path):
    """`make` killed with SIGKILL: its trainer gets SIGTERM instead of training on as an orphan."""
    path = write_config(tmp_path, {"MODEL": "lenet5", "DATASET": "synthetic", "DATA_SYNTHETIC_SIZE": "64",
                                   "BATCH_SIZE": "16", "DEVICE": "cpu", "MAX_ITERS": "100000",
                                   "RUN_MONITOR_INTERVAL": "1", "RUN_RESULTS_DIR": str(tmp_path / "results")})
    make = subprocess.Popen(["make", "--no-print-directory", f"CONFIG={path}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, held = time.time() + 60, None
    while time.time() < deadline and held is None:
        held = next((locks.holder(d) for d in (tmp_path / "results").glob("*") if locks.holder(d)), None)
        time.sleep(0.1)
    assert held is not None, "the trainer did not start"
    pid = held["pid"]
    assert psutil.Process(pid).ppid() == make.pid  # make's shell became the trainer (exec)
    make.kill()
    make.wait()
    deadline = time.time() + 20
    while time.time() < deadline and psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.1)
    alive = psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    if alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, "the trainer outlived the make that started it"
