"""SIGTERM / SIGUSR2 / Ctrl-C: last.pt at the current step, one line, EXIT_INTERRUPTED, exact resume."""
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from adamwprune.config.kconfig import ROOT
from adamwprune.engine.signals import EXIT_INTERRUPTED
from helpers import cli, write_config

TINY = {"MODEL": "lenet5", "DATASET": "synthetic", "DATA_SYNTHETIC_SIZE": "128", "BATCH_SIZE": "16",
        "DEVICE": "cpu", "RUN_MONITOR_INTERVAL": "0.1", "RUN_THREADS": "1", "OPTIMIZER": "adamw",
        "PRUNING": "magnitude", "PRUNING_TARGET_SPARSITY": "0.5",
        # last.pt only at evaluations: a last.pt at any other step was written by the stop
        "MAX_ITERS": "240", "TRAIN_EVAL_INTERVAL": "60", "CHECKPOINT_INTERVAL": "100000"}
ENV = dict(os.environ, PYTHONUNBUFFERED="1")


def _popen(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "adamwprune", *args], cwd=ROOT, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def _wait_for(predicate, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


def _rows(path):
    return [{k: v for k, v in json.loads(l).items() if k != "elapsed_s"} for l in path.read_text().splitlines()]


def _same_result(a, b):
    fa, fb = (json.loads((d / "final.json").read_text()) for d in (a, b))
    for key in ("best_val_metric", "test_metric_at_best", "final_sparsity", "steps", "best_step"):
        assert fa[key] == fb[key], key
    assert _rows(a / "metrics.jsonl") == _rows(b / "metrics.jsonl")
    wa, wb = (torch.load(d / "last.pt", weights_only=True)["model"] for d in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _stopped_step(out: str, signame: str) -> int:
    lines = [l for l in out.splitlines() if l.startswith("[adamwprune] stopped by")]
    assert len(lines) == 1, out
    assert lines[0].startswith(f"[adamwprune] stopped by {signame} at step ") and "make continue DIR=" in lines[0]
    return int(lines[0].split(" at step ")[1].split("/")[0])


def test_sigterm_saves_last_pt_at_the_current_step_and_continue_is_exact(tmp_path, references):
    sig = signal.SIGTERM
    cfg = write_config(tmp_path, {**TINY, "RUN_RESULTS_DIR": str(tmp_path / "results")})
    cut = tmp_path / "results" / "cut"
    proc = _popen(["run", "--config", str(cfg), "--run-dir", str(cut)])
    _wait_for(lambda: (cut / "metrics.jsonl").exists())  # past the first evaluation (step 60)
    time.sleep(0.2)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, out
    assert "Traceback" not in out
    step = _stopped_step(out, sig.name)
    assert 60 <= step < 240
    assert torch.load(cut / "last.pt", weights_only=True)["step"] == step
    assert not (cut / "final.json").exists()
    cont = cli("continue", "--results", str(tmp_path / "results"))
    assert cont.returncode == 0, cont.stdout + cont.stderr
    assert f"resumed at step {step}" in cont.stdout
    _same_result(references.run(), cut)


MATRIX = {**{k: v for k, v in TINY.items() if k != "PRUNING_TARGET_SPARSITY"},
          "OPTIMIZER": "adamw", "PRUNING": "none", "MATRIX": "y", "MATRIX_OPTIMIZER_ADAMW": "y",
          "MATRIX_OPTIMIZER_SGD": "y", "MATRIX_JOBS": "2", "MAX_ITERS": "600", "TRAIN_EVAL_INTERVAL": "100"}


class _References:
    """The uninterrupted runs the tests compare with, all started at once in the background
    (one thread per process: they share the cores with the tests' own runs, much of which
    use one core): a single run of TINY and the 2-cell MATRIX. run() / matrix() wait for
    one, check it succeeded and give its directory."""

    def __init__(self, d):
        (d / "run").mkdir()
        (d / "matrix").mkdir()
        run_cfg = write_config(d / "run", TINY)
        matrix_cfg = write_config(d / "matrix", {**MATRIX, "RUN_RESULTS_DIR": str(d / "matrix" / "results")},
                                  defconfig="signals")
        self.dir, self.out = d, {}
        self.procs = {"run": _popen(["run", "--config", str(run_cfg), "--run-dir", str(d / "run" / "ref")]),
                      "matrix": _popen(["run", "--config", str(matrix_cfg)])}

    def _finished(self, name):
        proc = self.procs[name]
        if proc.returncode is None:
            self.out[name], _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, self.out[name]

    def run(self):
        self._finished("run")
        return self.dir / "run" / "ref"

    def matrix(self):
        self._finished("matrix")
        (mdir,) = (self.dir / "matrix" / "results").iterdir()
        return mdir

    def stop(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()  # a matrix runner's cells die with it
                proc.communicate()


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    refs = _References(tmp_path_factory.mktemp("ref"))
    try:
        yield refs
    finally:
        refs.stop()


def _cells(mdir):
    return sorted(p.name for p in mdir.iterdir() if (p / "cell.json").exists())


def test_sigusr2_to_one_cell_marks_it_interrupted_and_continue_resumes_it_exactly(tmp_path, references):
    cfg = write_config(tmp_path, {**MATRIX, "RUN_RESULTS_DIR": str(tmp_path / "results")}, defconfig="signals")
    runner = _popen(["run", "--config", str(cfg)])
    results = tmp_path / "results"
    _wait_for(lambda: list(results.glob("*/lenet5_sgd_none_s1/metrics.jsonl")))
    (cell,) = results.glob("*/lenet5_sgd_none_s1")
    os.kill(json.loads((cell / "cell.json").read_text())["pid"], signal.SIGUSR2)
    out, _ = runner.communicate(timeout=180)
    assert runner.returncode == 1, out  # the matrix went on, then reported the stopped cell
    assert "[matrix] interrupted lenet5_sgd_none_s1" in out and "Traceback" not in out
    assert "1 of 2 cells interrupted: lenet5_sgd_none_s1 (stopped by a signal" in out
    info = json.loads((cell / "cell.json").read_text())
    assert info["status"] == "interrupted" and info["exit_code"] == EXIT_INTERRUPTED
    assert (cell.parent / "lenet5_adamw_none_s1" / "final.json").exists()
    st = cli("status", "--dir", str(cell.parent))
    assert "interrupted" in st.stdout
    cont = cli("continue", "--results", str(results))
    assert cont.returncode == 0, cont.stdout + cont.stderr
    assert "start  lenet5_sgd_none_s1 (resuming from last.pt)" in cont.stdout
    assert "lenet5_adamw_none_s1" not in cont.stdout.split("cells already finished")[1].split("summary")[0]
    reference_matrix = references.matrix()
    for name in _cells(reference_matrix):
        _same_result(reference_matrix / name, cell.parent / name)


def test_ctrl_c_stops_the_runner_and_its_cells_with_one_line_each(tmp_path, references):
    cfg = write_config(tmp_path, {**MATRIX, "RUN_RESULTS_DIR": str(tmp_path / "results")}, defconfig="signals")
    runner = _popen(["run", "--config", str(cfg)], start_new_session=True)  # its own process group
    results = tmp_path / "results"
    _wait_for(lambda: len(list(results.glob("*/*/metrics.jsonl"))) == 2)
    os.killpg(runner.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
    out, _ = runner.communicate(timeout=120)
    assert runner.returncode == EXIT_INTERRUPTED, out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out
    (mdir,) = results.iterdir()
    lines = out.strip().splitlines()
    assert sorted(l for l in lines if l.startswith("[matrix] interrupted")) == [
        f"[matrix] interrupted {c} (last.pt saved)" for c in _cells(mdir)]
    assert lines[-1].startswith("[matrix] stopped by SIGINT; `make continue DIR=")
    for name in _cells(mdir):
        log = (mdir / name / "train.log").read_text()
        assert "Traceback" not in log
        _stopped_step(log, "SIGINT")
        assert json.loads((mdir / name / "cell.json").read_text())["status"] == "interrupted"
    cont = cli("continue", "--results", str(results))
    assert cont.returncode == 0, cont.stdout + cont.stderr
    assert cont.stdout.count("(resuming from last.pt)") == 2
    reference_matrix = references.matrix()
    for name in _cells(reference_matrix):
        _same_result(reference_matrix / name, mdir / name)


def test_ddp_ranks_stop_together_when_only_one_rank_gets_the_signal(tmp_path):
    # 2 gloo ranks; SIGUSR2 to rank 1 only: the ranks agree at the next poll step, rank 0
    # saves there, nobody hangs in a collective, and the launcher exits EXIT_INTERRUPTED.
    # (Evaluation batches are 1000 images: 4004 training images give both ranks one.)
    cfg = write_config(tmp_path, {**TINY, "NPROC": "2", "DATA_SYNTHETIC_SIZE": "4004", "MAX_ITERS": "100000",
                                  "TRAIN_EVAL_INTERVAL": "20", "RUN_RESULTS_DIR": str(tmp_path / "results")})
    run_dir = tmp_path / "results" / "ddp"
    proc = _popen(["run", "--config", str(cfg), "--run-dir", str(run_dir)])
    _wait_for(lambda: (run_dir / "metrics.jsonl").exists())
    ranks = {p.environ().get("RANK"): p for p in psutil.Process(proc.pid).children(recursive=True)
             if "RANK" in p.environ()}
    ranks["1"].send_signal(signal.SIGUSR2)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, out
    step = _stopped_step(out, "SIGTERM")  # rank 0 did not get the signal itself
    assert step % 10 == 0  # a poll step (TRAIN_LOG_INTERVAL=10) on both ranks
    assert torch.load(run_dir / "last.pt", weights_only=True)["step"] == step
    assert json.loads((run_dir / "stopped.json").read_text())["step"] == step
