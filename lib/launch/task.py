"""What one Slurm array task runs: a matrix cell, exactly as the local runner runs it.

`CellTask` is a submitit Checkpointable. On the compute node its `__call__`
starts the cell's `python -m adamwprune run` (`matrix.cell_command`, the command
a local cell runs) in the cell's run directory, with train.log as its output,
records the task in cell.json and waits for the cell.

Slurm signals every process of the task. On SIGTERM (preemption, `scancel`,
`scontrol requeue`, the time limit itself) and on SIGUSR2 (the warning submitit
asks for SLURM_SIGNAL_DELAY seconds before the time limit) the cell saves
last.pt at its current step and exits with EXIT_INTERRUPTED (lib/engine/signals.py).
On SIGUSR2 submitit calls `checkpoint`: it waits until the cell has saved and
exited, then lets submitit requeue the task (`scontrol requeue`), at most
SLURM_MAX_REQUEUES times. The requeued task finds last.pt and resumes in place:
same directory, same cell, nothing renumbered.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import submitit

from ..run import matrix
from ..config.kconfig import ROOT
from ..run.rundir import write_json_atomic

CHECKPOINT_WAIT_S = 600  # at most this long for the cell to save after the warning signal


class CellFailed(RuntimeError):
    """The cell's process failed (its cell.json says failed, with the end of its log)."""


class CellStopped(RuntimeError):
    """The cell saved last.pt and stopped on a signal, and this task is not requeued."""


class CellTask(submitit.helpers.Checkpointable):
    def __init__(self, matrix_dir: str, cell_id: str, max_requeues: int, gpus_per_task: int = 0):
        self.matrix_dir, self.cell_id = matrix_dir, cell_id
        self.max_requeues, self.gpus_per_task = max_requeues, gpus_per_task
        self._pid: Optional[int] = None
        self._code: Optional[int] = None

    def __getstate__(self) -> dict:  # what submitit pickles for the (re)queued task
        return {k: v for k, v in self.__dict__.items() if k not in ("_pid", "_code")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _pid=None, _code=None)

    # ------------------------------------------------------------ the run
    def __call__(self) -> dict:
        mdir = Path(self.matrix_dir)
        meta, cells = matrix.load_cells(mdir)
        cell = next(c for c in cells if c.id == self.cell_id)
        cell_dir = mdir / cell.id
        cell_dir.mkdir(exist_ok=True)
        resume = (cell_dir / "last.pt").exists()
        with open(cell_dir / "train.log", "a") as log:
            log.write(f"[slurm] task {_task_id()} on {socket.gethostname()}, restart {_restarts()}"
                      + (": resuming from last.pt\n" if resume else "\n"))
            log.flush()
            proc = subprocess.Popen(matrix.cell_command(mdir, cell, meta, resume=resume), cwd=ROOT,
                                    env=self._env(), stdout=log, stderr=subprocess.STDOUT,
                                    preexec_fn=matrix._die_with_parent)
        self._pid = proc.pid
        write_json_atomic(cell_dir / "cell.json", {
            "status": "running", "started": time.time(), "resumed": resume, **self._where()})
        return self._done(self._wait())

    def _env(self) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for name in ("SUBMITIT_EXECUTOR", "SUBMITIT_FOLDER"):  # submitit's, not the cell's
            env.pop(name, None)
        if not self.gpus_per_task:
            env["CUDA_VISIBLE_DEVICES"] = ""  # no GPU was allocated: use none, even if one is visible
        if os.environ.get("SLURM_CPUS_PER_TASK"):
            env.setdefault("OMP_NUM_THREADS", os.environ["SLURM_CPUS_PER_TASK"])
        return env

    def _where(self) -> dict:
        # No "pid": the runner's liveness check would read it as a process of its own host.
        return {"launcher": "slurm", "slurm_task": _task_id(), "host": socket.gethostname(),
                "node_pid": self._pid, "restarts": _restarts()}

    def _wait(self, deadline: Optional[float] = None) -> Optional[int]:
        """The cell's exit status (reaped here, by the main loop or by `checkpoint`,
        whichever comes first); None when `deadline` passes first."""
        while self._code is None:
            try:
                pid, status = os.waitpid(self._pid, os.WNOHANG)
            except ChildProcessError:
                return self._code  # the other path reaped it just now
            if pid:
                self._code = os.waitstatus_to_exitcode(status)
                break
            if deadline is not None and time.time() > deadline:
                return None
            time.sleep(0.2)
        return self._code

    def _done(self, code: int) -> dict:
        mdir = Path(self.matrix_dir)
        cell = next(c for c in matrix.load_cells(mdir)[1] if c.id == self.cell_id)
        state = matrix._finish(mdir, cell, code, **self._where())
        _summary_if_complete(mdir)
        if state == "failed":
            raise CellFailed(f"cell {cell.id} failed with exit status {code}; its log: {mdir / cell.id}/train.log")
        if state == "interrupted":
            raise CellStopped(f"cell {cell.id} was stopped by a signal; last.pt saved "
                              f"(`make continue DIR={mdir}` resubmits it if Slurm does not requeue it)")
        return {"cell": cell.id, "status": state}

    # ------------------------------------------------- submitit's checkpoint
    def checkpoint(self, *args, **kwargs):
        """Called by submitit on SIGUSR2 (in its signal handler). The cell got the signal
        too and stops after its current step: wait for it, then requeue this task."""
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # one checkpoint per task
        if self._pid is None:  # the cell has not started: requeue as it is
            return super().checkpoint(*args, **kwargs)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._pid, signal.SIGUSR2)  # in case only this process was signalled
        code = self._wait(deadline=time.time() + CHECKPOINT_WAIT_S)
        if code is None:  # never saved: its last periodic last.pt stands
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, signal.SIGKILL)
            code = self._wait()
        mdir = Path(self.matrix_dir)
        cell = next(c for c in matrix.load_cells(mdir)[1] if c.id == self.cell_id)
        state = matrix._finish(mdir, cell, code if code is not None else -signal.SIGKILL, **self._where())
        if state in ("completed", "diverged"):  # it finished just before the signal: no requeue
            _summary_if_complete(mdir)
            sys.exit(0)
        if state == "failed":
            raise CellFailed(f"cell {cell.id} failed with exit status {code} while stopping")
        if _restarts() >= self.max_requeues:
            raise CellStopped(f"cell {cell.id} saved last.pt; not requeued: this task was requeued "
                              f"{_restarts()} times (SLURM_MAX_REQUEUES={self.max_requeues}); "
                              f"`make continue DIR={mdir}` resubmits it")
        print(f"[slurm] {cell.id} saved last.pt on SIGUSR2; requeueing task {_task_id()}", flush=True)
        return super().checkpoint(*args, **kwargs)


def _task_id() -> str:
    """<array job>_<index> (what squeue shows and `scontrol requeue` takes)."""
    array, index = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{index}" if array and index else os.environ.get("SLURM_JOB_ID", "?")


def _restarts() -> int:
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def _summary_if_complete(mdir: Path) -> None:
    """The last cell to finish writes summary.csv/summary.md (as the local runner does at its end)."""
    _, cells = matrix.load_cells(mdir)
    if all(matrix.cell_state(mdir / c.id) in ("done", "diverged", "failed") for c in cells):
        with open(mdir / ".summary.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)  # the last of two cells finishing together writes last
            matrix._write_summary(mdir)
