"""The test matrix on a real (single-node, localhost) Slurm cluster through submitit.

The cluster comes from scripts/slurm-local.sh (the `slurm_cluster` fixture in
conftest.py). Cells are tiny LeNet-5 runs on synthetic data; each Slurm result is
compared with the same matrix run by the local launcher. To interrupt a cell at a
known point *mid-run* however loaded the machine is, the test freezes the cell's
process (SIGSTOP) once it has evaluated, then lets Slurm act: `scontrol requeue`
(Slurm then sends SIGCONT and SIGTERM), or the time limit's warning signal, which
the frozen cell finds pending when the test continues it.
"""
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from adamwprune.config.kconfig import ROOT
from helpers import write_config

CELL = {"MODEL": "lenet5", "DATASET": "synthetic", "DATA_SYNTHETIC_SIZE": "128", "BATCH_SIZE": "16",
        "DEVICE": "cpu", "RUN_THREADS": "1", "RUN_MONITOR_INTERVAL": "0.1", "OPTIMIZER": "adamw", "PRUNING": "none",
        # last.pt only at evaluations and on a stop: a resume from elsewhere shows in the step
        "MAX_ITERS": "200", "TRAIN_EVAL_INTERVAL": "50", "CHECKPOINT_INTERVAL": "100000"}
MATRIX = {**CELL, "MATRIX": "y", "MATRIX_OPTIMIZER_ADAMW": "y", "MATRIX_OPTIMIZER_ADAMWPRUNE": "y",
          "MATRIX_PRUNING_NONE": "y", "MATRIX_PRUNING_MAGNITUDE": "y", "MATRIX_PRUNING_STATE": "y",
          "MATRIX_SPARSITY_50": "y", "MATRIX_SPARSITY_70": "n", "MATRIX_SPARSITY_90": "n"}
PLAIN, REQUEUED, TIMED_OUT, FAILING = ("lenet5_adamw_none_s1", "lenet5_adamw_magnitude_50_s1",
                                       "lenet5_adamwprune_state_50_bitter0_s1", "lenet5_adamwprune_none_s1")
# The time limit's warning (SIGUSR2) is due 100 s before it; Slurm checks limits every 30 s.
SLURM = "SLURM_TIME_MIN=5 SLURM_SIGNAL_DELAY=100"
USR2_PENDING = 1 << (signal.SIGUSR2 - 1)


def _cli(env, *args, **kw):
    return subprocess.run([sys.executable, "-m", "adamwprune", *args], cwd=ROOT, capture_output=True, text=True,
                          env=dict(env, PYTHONUNBUFFERED="1"), timeout=300, **kw)


def _wait(predicate, what, env, timeout=150):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            print(f"{time.strftime('%T')} {what}", flush=True)
            return
        _start_requeued_now(env)
        time.sleep(0.1)
    queue = subprocess.run(["squeue", "--array", "-t", "all"], env=env, capture_output=True, text=True).stdout
    logs = Path(env["SLURM_CONF"]).parent / "log"
    tails = "".join(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-25:]) + "\n"
                    for f in sorted(logs.glob("slurm*.log")))
    raise AssertionError(f"timed out waiting for {what}\n{queue}{tails}")


def _start_requeued_now(env):
    """A requeued task waits ~120 s (BeginTime); start it now, with the usual 5 minutes,
    once the processes of its previous run are gone (a batch job cannot be launched on a
    node where its previous run's slurmstepd still runs)."""
    out = subprocess.run(["squeue", "--array", "--noheader", "-t", "PD", "-O", "JobArrayID:30,JobID:30,Reason:40"],
                         env=env, capture_output=True, text=True).stdout
    steps = [" ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])]
    for line in out.splitlines():
        task, job, reason = line[:30].strip(), line[30:60].strip(), line[60:].strip()  # JobID: the task's own id
        if reason == "BeginTime" and not any(s.startswith(f"slurmstepd: [{job}.") for s in steps):
            subprocess.run(["scontrol", "update", f"JobId={task}", "StartTime=now", "TimeLimit=5"], env=env,
                           capture_output=True)



def _limit_to_one_more_minute(task, env):
    """Cut a running task's time limit to 1-2 minutes from now: inside the warning's 100 s
    (so Slurm sends it at its next check, within 30 s), well before the limit itself."""
    used = subprocess.run(["squeue", "--array", "--noheader", "-j", task, "-O", "TimeUsed:20"], env=env,
                          capture_output=True, text=True, check=True).stdout.strip()
    seconds = sum(int(x) * 60 ** i for i, x in enumerate(reversed(used.replace("-", ":").split(":"))))
    subprocess.run(["scontrol", "update", f"JobId={task}", f"TimeLimit={seconds // 60 + 2}"], env=env, check=True)


def _running_pid(cell_dir, restarts=0):
    """The cell process of the task attempt `restarts`, once it has evaluated (is mid-run)."""
    info = json.loads((cell_dir / "cell.json").read_text()) if (cell_dir / "cell.json").exists() else {}
    if info.get("status") != "running" or info.get("restarts") != restarts:
        return None
    return info["node_pid"] if (cell_dir / "metrics.jsonl").exists() else None


def _freeze_until_usr2(pid, env):
    """Hold the process still until Slurm's SIGUSR2 is pending on it, then let it go on."""
    proc = psutil.Process(pid)
    def pending():
        try:
            with open(f"/proc/{pid}/status") as fh:
                shd = next(l for l in fh if l.startswith("ShdPnd:"))
            return int(shd.split()[1], 16) & USR2_PENDING
        except (OSError, StopIteration):
            return True
    try:
        _wait(pending, "Slurm's SIGUSR2 before the time limit", env, timeout=90)
    finally:
        with contextlib.suppress(psutil.Error):
            proc.resume()


def _results(cell_dir):
    final = json.loads((cell_dir / "final.json").read_text())
    rows = [{k: v for k, v in json.loads(l).items() if k != "elapsed_s"}
            for l in (cell_dir / "metrics.jsonl").read_text().splitlines()]
    weights = torch.load(cell_dir / "last.pt", weights_only=True)["model"]
    return ({k: final[k] for k in ("best_val_metric", "test_metric_at_best", "final_sparsity", "steps", "best_step")},
            rows, weights)


def _assert_same(a_dir, b_dir):
    (fa, ra, wa), (fb, rb, wb) = _results(a_dir), _results(b_dir)
    assert fa == fb and ra == rb, (a_dir, b_dir)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _finished(cell_dir):
    info = json.loads((cell_dir / "cell.json").read_text()) if (cell_dir / "cell.json").exists() else {}
    return info.get("status") in ("completed", "diverged", "failed")


@contextlib.contextmanager
def _in_background(*args):
    """`python -m adamwprune ARGS` run locally while the test works with Slurm (the two
    share the cores; most of the Slurm side is waiting). Yields a function that waits
    for it and checks it succeeded."""
    proc = subprocess.Popen([sys.executable, "-m", "adamwprune", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def finish():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out

    try:
        yield finish
    finally:
        if proc.poll() is None:
            proc.kill()  # a matrix runner's cells die with it
            proc.communicate()


def test_a_matrix_on_slurm_equals_the_local_launcher_through_requeue_time_limit_and_a_failure(
        tmp_path, slurm_cluster):
    env = slurm_cluster
    (tmp_path / "local").mkdir()
    local = write_config(tmp_path / "local", {**MATRIX, "RUN_RESULTS_DIR": str(tmp_path / "local" / "results")},
                         defconfig="slurm-test")
    with _in_background("run", "--config", str(local)) as local_finished:
        _slurm_matrix(tmp_path, env, local_finished)


def _slurm_matrix(tmp_path, env, local_finished):
    cfg = write_config(tmp_path, {**MATRIX, "RUN_RESULTS_DIR": str(tmp_path / "results")}, defconfig="slurm-test")
    sub = _cli(env, "run", "--config", str(cfg), "--override", "LAUNCHER=slurm",
               "--set", SLURM + " SLURM_SBATCH_EXTRA=--hold")  # held: the test prepares the failing cell
    assert sub.returncode == 0, sub.stdout + sub.stderr
    (mdir,) = (tmp_path / "results").iterdir()
    job = json.loads((mdir / "slurm.json").read_text())["submissions"][0]["job_id"]
    assert f"submitted job array {job} with 4 of 4 cells" in sub.stdout

    refused = _cli(env, "continue", "--dir", str(mdir))  # its tasks are queued
    assert refused.returncode == 2 and "still queued or running" in refused.stderr, refused.stderr
    (mdir / FAILING / "last.pt").write_bytes(b"not a checkpoint")  # this cell fails at its start
    subprocess.run(["scontrol", "release", job], env=env, check=True)

    # requeue one cell mid-run
    _wait(lambda: _running_pid(mdir / REQUEUED), "the requeued cell to evaluate", env)
    pid = _running_pid(mdir / REQUEUED)
    os.kill(pid, signal.SIGSTOP)
    task = json.loads((mdir / REQUEUED / "cell.json").read_text())["slurm_task"]
    subprocess.run(["scontrol", "requeue", task], env=env, check=True)  # SIGCONT + SIGTERM, then requeued

    # another one reaches its time limit mid-run: Slurm's warning signal, then requeue
    _wait(lambda: _running_pid(mdir / TIMED_OUT), "the time-limited cell to evaluate", env)
    pid = _running_pid(mdir / TIMED_OUT)
    os.kill(pid, signal.SIGSTOP)
    _limit_to_one_more_minute(json.loads((mdir / TIMED_OUT / "cell.json").read_text())["slurm_task"], env)
    _freeze_until_usr2(pid, env)

    cells = (PLAIN, REQUEUED, TIMED_OUT, FAILING)
    _wait(lambda: all(_finished(mdir / c) for c in cells), "all cells to finish", env)
    local_finished()
    (local_matrix,) = (tmp_path / "local" / "results").iterdir()
    st = _cli(env, "status", "--dir", str(mdir))
    line = lambda cell: next(l for l in st.stdout.splitlines() if f" {cell} " in l + " ")
    assert line(FAILING).split()[0] == "failed" and "FAILED" in line(FAILING), st.stdout
    assert "NonZeroExitCode" in line(FAILING), st.stdout
    for cell in (PLAIN, REQUEUED, TIMED_OUT):
        assert line(cell).split()[0] == "done", st.stdout
        _assert_same(local_matrix / cell, mdir / cell)
    assert re.search(r"requeued \dx", line(REQUEUED)) and re.search(r"requeued \dx", line(TIMED_OUT)), st.stdout
    log = (mdir / REQUEUED / "train.log").read_text()
    step = int(log.split("stopped by SIGTERM at step ")[1].split("/")[0])
    assert 50 <= step < 200 and f"resumed at step {step}" in log and "restart 1: resuming from last.pt" in log
    log = (mdir / TIMED_OUT / "train.log").read_text()
    step = int(log.split("stopped by SIGUSR2 at step ")[1].split("/")[0])
    assert 50 <= step < 200 and f"resumed at step {step}" in log
    tasks = {cell: task for task, cell in json.loads((mdir / "slurm.json").read_text())["submissions"][0]["tasks"].items()}
    assert f"CellFailed: cell {FAILING} failed" in (mdir / "slurm" / f"{tasks[FAILING]}_0_log.out").read_text()
    assert (mdir / "summary.md").exists()  # the last task to finish wrote it

    # continue resubmits exactly the cell that did not finish (once it can run)
    (mdir / FAILING / "last.pt").unlink()
    cont = _cli(env, "continue", "--dir", str(mdir), "--rerun-failed", "--set", "SLURM_SBATCH_EXTRA=")  # no --hold
    assert cont.returncode == 0, cont.stdout + cont.stderr
    assert "with 1 of 4 cells" in cont.stdout and FAILING in cont.stdout, cont.stdout
    last = json.loads((mdir / "slurm.json").read_text())["submissions"][-1]
    assert list(last["tasks"].values()) == [FAILING]
    _wait(lambda: (mdir / FAILING / "final.json").exists() and _finished(mdir / FAILING), "the resubmitted cell", env)
    _assert_same(local_matrix / FAILING, mdir / FAILING)
    nothing = _cli(env, "continue", "--dir", str(mdir))
    assert nothing.returncode == 0 and "nothing to submit: 4 of 4 cells finished" in nothing.stdout, nothing.stdout


def test_a_two_rank_cell_runs_torchrun_in_one_task_and_resumes_after_a_requeue(tmp_path, slurm_cluster):
    # Evaluation batches are 1000 images: 4004 training images give each of the 2 ranks one.
    env = slurm_cluster
    one = {**MATRIX, "MATRIX_OPTIMIZER_ADAMWPRUNE": "n", "MATRIX_PRUNING_MAGNITUDE": "n", "NPROC": "2",
           "DATA_SYNTHETIC_SIZE": "4004", "MAX_ITERS": "200"}
    cfg = write_config(tmp_path, {**one, "RUN_RESULTS_DIR": str(tmp_path / "results")}, defconfig="ddp")
    with _in_background("run", "--config", str(cfg), "--run-dir", str(tmp_path / "ref")) as local_finished:
        _two_ranks_on_slurm(tmp_path, env, cfg)
        local_finished()
    _assert_same(tmp_path / "ref", tmp_path / "results" / next((tmp_path / "results").iterdir()).name / PLAIN)


def _two_ranks_on_slurm(tmp_path, env, cfg):
    sub = _cli(env, "run", "--config", str(cfg), "--override", "LAUNCHER=slurm",
               "--set", "SLURM_CPUS_PER_TASK=2 SLURM_TIME_MIN=5")
    assert sub.returncode == 0, sub.stdout + sub.stderr
    (mdir,) = (tmp_path / "results").iterdir()
    cell = mdir / PLAIN
    _wait(lambda: _running_pid(cell), "the 2-rank cell to evaluate", env)
    parent = psutil.Process(_running_pid(cell))
    workers = [p for p in parent.children(recursive=True) if "RANK" in p.environ()]
    assert len(workers) == 2  # torchrun's two ranks inside the one task
    for w in workers:
        w.suspend()
    task = json.loads((cell / "cell.json").read_text())["slurm_task"]
    subprocess.run(["scontrol", "requeue", task], env=env, check=True)
    _wait(lambda: _finished(cell), "the 2-rank cell to finish", env)
    log = (cell / "train.log").read_text()
    assert "stopped by SIGTERM at step" in log and "restart 1: resuming from last.pt" in log, log


def test_sbatch_refusing_the_array_is_one_line(tmp_path, slurm_cluster):
    cfg = write_config(tmp_path, {**MATRIX, "RUN_RESULTS_DIR": str(tmp_path / "results")}, defconfig="bad")
    r = _cli(slurm_cluster, "run", "--config", str(cfg), "--override", "LAUNCHER=slurm",
             "--set", "SLURM_PARTITION=nosuch")
    assert r.returncode == 2 and r.stderr.startswith("error: sbatch failed:"), r.stdout + r.stderr
    assert "partition" in r.stderr.lower() and r.stderr.count("\n") == 1, r.stderr
