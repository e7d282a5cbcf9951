"""The test matrix: expansion, dry run, failure isolation, kill -9 + continue, JOBS=2."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from adamwprune.config import kconfig as C
from adamwprune.run import matrix
from adamwprune.config.kconfig import ROOT
from helpers import cli, write_config

BASE = {"MODEL": "lenet5", "DATASET": "synthetic", "DATA_SYNTHETIC_SIZE": "64", "BATCH_SIZE": "16",
        "DEVICE": "cpu", "MAX_ITERS": "24", "TRAIN_EVAL_INTERVAL": "8", "RUN_MONITOR_INTERVAL": "0.1",
        "OPTIMIZER": "adamw", "PRUNING": "none", "MATRIX": "y"}


def matrix_cfg(**sel):
    cfg, _, _ = C.load(None, {**BASE, **sel})
    return cfg


def test_expansion_generates_only_valid_cells():
    cfg = matrix_cfg(MATRIX_OPTIMIZER_ADAMW="y", MATRIX_OPTIMIZER_ADAMWPRUNE="y", MATRIX_PRUNING_NONE="y",
                     MATRIX_PRUNING_MAGNITUDE="y", MATRIX_PRUNING_STATE="y", MATRIX_SPARSITY_50="y",
                     MATRIX_SPARSITY_70="y", MATRIX_SPARSITY_90="n", MATRIX_VARIANT_BITTER1="y", MATRIX_SEEDS="2")
    cells = matrix.expand(cfg)
    kinds = {(c.optimizer, c.pruning, c.sparsity, c.variant) for c in cells}
    assert kinds == {
        ("adamw", "none", 0.0, None), ("adamw", "magnitude", 0.5, None), ("adamw", "magnitude", 0.7, None),
        ("adamwprune", "none", 0.0, None),
        *(("adamwprune", "state", s, v) for s in (0.5, 0.7) for v in ("bitter0", "bitter1")),
    }
    assert len(cells) == 2 * len(kinds)  # two seeds each
    assert {c.seed for c in cells} == {cfg.seed, cfg.seed + 1}
    assert len({c.id for c in cells}) == len(cells)
    for c in cells:  # every cell's overrides form a valid single-run config
        cell_cfg, _, _ = C.load(None, {**BASE, **dict(c.overrides), "MATRIX": "n"})
        assert (cell_cfg.optimizer, cell_cfg.pruning) == (c.optimizer, c.pruning)


def test_seed_list_overrides_seed_count():
    cfg = matrix_cfg(MATRIX_SEED_LIST="3 11", MATRIX_SEEDS="5", MATRIX_OPTIMIZER_ADAMW="y",
                     MATRIX_PRUNING_NONE="y")
    assert [c.seed for c in matrix.expand(cfg)] == [3, 11]


def _config(tmp_path, **sel):
    return write_config(tmp_path, {**BASE, "RUN_RESULTS_DIR": str(tmp_path / "results"), **sel},
                        defconfig="test-matrix")


def test_dry_run_lists_cells_and_runs_nothing(tmp_path):
    path = _config(tmp_path, MATRIX_OPTIMIZER_SGD="y", MATRIX_OPTIMIZER_ADAMW="y", MATRIX_PRUNING_MAGNITUDE="y",
                   MATRIX_PRUNING_NONE="n", MATRIX_SPARSITY_50="y", MATRIX_SPARSITY_70="n", MATRIX_SPARSITY_90="n")
    r = cli("dry-run", "--config", str(path))
    assert r.returncode == 0, r.stderr
    assert "lenet5_sgd_magnitude_50_s1" in r.stdout and "lenet5_adamw_magnitude_50_s1" in r.stdout
    assert r.stdout.strip().endswith("2 cells")
    assert not (tmp_path / "results").exists()


def test_failing_cell_is_recorded_and_the_matrix_goes_on_with_two_jobs(tmp_path):
    # ResNet-18 on CIFAR-10 from an empty DATA_DIR fails at once; LeNet-5 on synthetic data runs.
    path = write_config(tmp_path, {
        **{k: v for k, v in BASE.items() if k not in ("DATASET", "DATA_SYNTHETIC_SIZE")},
        "RUN_RESULTS_DIR": str(tmp_path / "results"), "MATRIX_MODEL_LENET5": "y", "MATRIX_MODEL_RESNET18": "y",
        "MATRIX_OPTIMIZER_ADAMW": "y", "MATRIX_PRUNING_NONE": "y", "DATA_DIR": str(tmp_path / "empty"),
        "DATA_DOWNLOAD": "n", "MAX_ITERS": "4", "MATRIX_JOBS": "2"}, defconfig="fail-test")
    r = cli("run", "--config", str(path))
    assert r.returncode == 1
    assert "1 of 2 cells failed" in r.stdout
    (mdir,) = (tmp_path / "results").iterdir()
    bad = json.loads((mdir / "resnet18_adamw_none_s1" / "cell.json").read_text())
    assert bad["status"] == "failed" and bad["exit_code"] == 2 and "cifar-10-batches-py" in bad["log_tail"]
    good = json.loads((mdir / "lenet5_adamw_none_s1" / "final.json").read_text())
    assert good["status"] == "completed"
    # JOBS=2 on CPU: the cores are divided between the two cells
    cfg = json.loads((mdir / "lenet5_adamw_none_s1" / "config.json").read_text())["config"]
    assert cfg["threads"] == max(1, (os.cpu_count() or 1) // 2)
    assert (mdir / "summary.md").exists()


def _final_metrics(mdir):
    out = {}
    for cell in sorted(p for p in mdir.iterdir() if p.is_dir()):
        f = json.loads((cell / "final.json").read_text())
        out[cell.name] = (f["best_val_metric"], f["test_metric_at_best"], f["final_sparsity"], f["steps"])
    return out


SMALL = dict(MATRIX_OPTIMIZER_ADAMW="y", MATRIX_OPTIMIZER_ADAMWPRUNE="y", MATRIX_PRUNING_MAGNITUDE="y",
             MATRIX_PRUNING_STATE="y", MATRIX_PRUNING_NONE="n", MATRIX_SPARSITY_50="y", MATRIX_SPARSITY_70="n", MATRIX_SPARSITY_90="n",
             MAX_ITERS="150", TRAIN_CHECKPOINT_INTERVAL="10", TRAIN_EVAL_INTERVAL="50",
             RUN_THREADS="1")  # the reference and the cut matrix run side by side


def test_kill_9_then_continue_equals_an_uninterrupted_matrix(tmp_path):
    # The uninterrupted reference runs in the background while the other matrix is cut and continued.
    (tmp_path / "ref").mkdir()
    ref_path = _config(tmp_path / "ref", **SMALL)
    ref = subprocess.Popen([sys.executable, "-m", "adamwprune", "run", "--config", str(ref_path)], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _cut_and_continue(tmp_path)
        out, _ = ref.communicate(timeout=300)
        assert ref.returncode == 0, out
    finally:
        if ref.poll() is None:
            ref.kill()  # its cells die with it
            ref.communicate()
    (ref_dir,) = (tmp_path / "ref" / "results").iterdir()
    mdir = next((tmp_path / "cut" / "results").iterdir())
    assert _final_metrics(mdir) == _final_metrics(ref_dir)
    assert sorted(p.name for p in mdir.iterdir() if p.is_dir()) == sorted(
        p.name for p in ref_dir.iterdir() if p.is_dir())


def _cut_and_continue(tmp_path):
    (tmp_path / "cut").mkdir()
    path = _config(tmp_path / "cut", **SMALL)
    proc = subprocess.Popen([sys.executable, "-m", "adamwprune", "run", "--config", str(path)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = tmp_path / "cut" / "results"
    deadline = time.time() + 120
    # kill while the second cell is mid-way (it has a checkpoint but no final.json)
    while time.time() < deadline:
        cells = list(results.glob("*/*/last.pt"))
        if any(not (c.parent / "final.json").exists() and c.parent.name.startswith("lenet5_adamwprune")
               for c in cells):
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)  # the cell process dies with its parent
    (mdir,) = results.iterdir()
    st = cli("status", "--dir", str(mdir))
    assert "interrupted" in st.stdout, st.stdout
    cont = cli("continue", "--results", str(results))
    assert cont.returncode == 0, cont.stdout + cont.stderr
    assert "resuming from last.pt" in cont.stdout
    assert cli("continue", "--results", str(results)).stdout.startswith("nothing to continue")


def test_a_killed_unreaped_cell_does_not_count_as_running():
    # A cell whose runner was killed dies too, but stays a zombie until someone reaps it.
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 30
    while time.time() < deadline and open(f"/proc/{child.pid}/stat").read().split()[2] != "Z":
        time.sleep(0.01)
    try:
        assert not matrix._alive(child.pid)
    finally:
        child.wait()
    assert matrix._alive(os.getpid())
    assert not matrix._alive(child.pid) and not matrix._alive(None)
