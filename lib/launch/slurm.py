"""A test matrix on a Slurm cluster: its cells as one job array, submitted with submitit.

The submitting side (the login node): `submit` sends the cells that have not
finished as one job array, one task per cell (each task runs `task.CellTask`,
which runs the cell's `python -m adamwprune run` in its run directory), and
records in <matrix>/slurm.json which job and array index ran which cell;
`StatusView` reads the tasks' states back for `make status`; `refuse_if_active`
stops `make continue` while a task of the matrix is still queued or running.

Slurm is asked with squeue only: without an accounting database `sacct` fails
(and so would submitit's own state queries, which are not used), and finished
tasks stay visible to squeue for the cluster's MinJobAge (300 s by default).
After that the run directories alone say what happened to a cell.
"""
from __future__ import annotations

import contextlib
import fcntl
import io
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from ..config.kconfig import ConfigError
from ..run.rundir import read_json, write_json_atomic

SLURM_JSON = "slurm.json"
LISTED = 8  # cells listed one per line at submission
# Job states after which a task will not run again by itself (Slurm's "finished" states).
FINISHED = {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT"}
# What `make status` calls a cell whose task Slurm still holds.
ACTIVE_NAMES = {"PENDING": "pending", "RUNNING": "running", "COMPLETING": "running", "CONFIGURING": "running",
                "SIGNALING": "running", "STAGE_OUT": "running", "SUSPENDED": "suspended",
                "REQUEUED": "requeued", "REQUEUE_HOLD": "requeued", "REQUEUE_FED": "requeued",
                "RESIZING": "running"}


class SlurmError(RuntimeError):
    """Slurm refused or could not be asked; the message is one line."""


# ------------------------------------------------------------------ settings
def parse_sbatch_extra(text: str) -> dict:
    """"--account=x --qos=high --exclusive" -> {"account": "x", "qos": "high", "exclusive": True}."""
    out: dict = {}
    words = shlex.split(text or "")
    i = 0
    while i < len(words):
        word = words[i]
        if not word.startswith("--") or len(word) < 3:
            raise ConfigError(f"SLURM_SBATCH_EXTRA={text!r}: {word!r} is not a long sbatch option "
                              "(write --account=proj, not -A proj)")
        key, eq, value = word[2:].partition("=")
        if not eq and i + 1 < len(words) and not words[i + 1].startswith("-"):
            value, i = words[i + 1], i + 1
        out[key] = value if (eq or value) else True
        i += 1
    return out


@dataclass(frozen=True)
class Settings:
    """The sbatch side of a matrix's Kconfig (Kconfig.launcher)."""

    partition: str = ""
    time_min: int = 240
    signal_delay_s: int = 90
    cpus_per_task: int = 1
    gpus_per_task: int = 0
    mem_gb: int = 0
    array_parallelism: int = 0
    max_requeues: int = 3
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg) -> "Settings":
        s = cls(cfg.slurm_partition or "", cfg.slurm_time_min, cfg.slurm_signal_delay_s,
                cfg.slurm_cpus_per_task, cfg.slurm_gpus_per_task, cfg.slurm_mem_gb,
                cfg.slurm_array_parallelism, cfg.slurm_max_requeues, parse_sbatch_extra(cfg.slurm_sbatch_extra))
        if s.signal_delay_s >= 60 * s.time_min:
            raise ConfigError(f"SLURM_SIGNAL_DELAY={s.signal_delay_s}: not shorter than the time limit "
                              f"SLURM_TIME_MIN={s.time_min} minutes")
        if cfg.nproc > 1 and s.gpus_per_task not in (0, cfg.nproc):
            raise ConfigError(f"RUN_NPROC={cfg.nproc} runs {cfg.nproc} ranks in one Slurm task: set "
                              f"SLURM_GPUS_PER_TASK={cfg.nproc} (or 0 for CPU ranks), not {s.gpus_per_task}")
        return s

    def parameters(self, name: str, n_tasks: int) -> dict:
        """submitit.SlurmExecutor parameters (sbatch options)."""
        p = {"job_name": name, "time": self.time_min, "cpus_per_task": self.cpus_per_task,
             "signal_delay_s": self.signal_delay_s, "stderr_to_stdout": True,
             "array_parallelism": self.array_parallelism or max(1, n_tasks)}
        if self.partition:
            p["partition"] = self.partition
        if self.gpus_per_task:
            p["gpus_per_task"] = self.gpus_per_task
        if self.mem_gb:
            p["mem"] = f"{self.mem_gb}GB"
        # --requeue: the task may be requeued (after a time limit or a preemption) even where
        # the cluster's JobRequeue default says no; SLURM_SBATCH_EXTRA can say --no-requeue.
        p["additional_parameters"] = {"requeue": True, **self.extra}
        if "no-requeue" in self.extra:
            del p["additional_parameters"]["requeue"]
        return p

    def describe(self) -> str:
        where = f"partition {self.partition}" if self.partition else "the default partition"
        mem = f", {self.mem_gb} GB" if self.mem_gb else ""
        return (f"{self.cpus_per_task} CPU, {self.gpus_per_task} GPU{mem}, {self.time_min} min per task "
                f"on {where}, up to {self.max_requeues} requeues")


# -------------------------------------------------------------- submission
def submit(matrix_dir: Path, cells: list, settings: Settings, name: str) -> tuple[str, list[str]]:
    """Submit `cells` as one job array (a plain job for one cell); returns its job id and
    the task of each cell ("<job>_<index>"), as recorded in slurm.json."""
    import shutil

    import submitit

    from .task import CellTask

    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise SlurmError("sbatch/srun are not on PATH: LAUNCHER=slurm submits from a Slurm login node "
                         "(`scripts/slurm-local.sh start` starts a one-node cluster on this machine)")
    folder = Path(matrix_dir) / "slurm"
    for cell in cells:
        (Path(matrix_dir) / cell.id).mkdir(exist_ok=True)
    try:
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=settings.max_requeues)
        executor.update_parameters(**settings.parameters(f"adamwprune-{name}", len(cells)))
        with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's stderr as well
            with executor.batch():
                jobs = [executor.submit(CellTask(str(matrix_dir), c.id, settings.max_requeues,
                                                 settings.gpus_per_task)) for c in cells]
    except RuntimeError as exc:  # sbatch refused (submitit's FailedJobError carries its stderr)
        raise SlurmError(f"sbatch failed: {_one_line(exc)}") from None
    job_id = jobs[0].job_id.split("_")[0]
    record = read_json(Path(matrix_dir) / SLURM_JSON) or {"submissions": []}
    record["submissions"].append({"job_id": job_id, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                  "tasks": {j.job_id: c.id for j, c in zip(jobs, cells)},
                                  "settings": {**vars(settings)}})
    write_json_atomic(Path(matrix_dir) / SLURM_JSON, record)
    return job_id, [j.job_id for j in jobs]


def matrix_config(matrix_dir: Path, extra: Iterable[tuple[str, str]] = ()):
    """The matrix's own configuration (its .config and make-line overrides), plus `extra`:
    launcher settings given to `make continue` (nothing else may change there; JOBS=, how
    many cells run at once here, is one)."""
    from ..run import matrix
    from ..config.kconfig import load

    extra = list(extra)
    for key, _ in extra:
        if not matrix._symbol(key).startswith(("LAUNCHER", "SLURM_", "MATRIX_JOBS")):
            raise ConfigError(f"{key}: `make continue` takes launcher settings only (LAUNCHER=, JOBS=, SLURM_*); "
                              "the cells' configuration is fixed when the matrix is created")
    meta, _ = matrix.load_cells(matrix_dir)
    pairs = [tuple(p) for p in meta["overrides"]] + extra
    return load(Path(matrix_dir) / ".config", dict(pairs))[0]


def run_matrix(matrix_dir: Path, cfg, rerun_failed: bool = False) -> int:
    """`make` and `make continue` with LAUNCHER=slurm: submit the cells that did not
    finish as one job array and return at once (exit status 0 when submitted)."""
    from ..run import matrix

    matrix_dir = Path(matrix_dir).absolute()  # the tasks run elsewhere, in another directory
    meta, cells = matrix.load_cells(matrix_dir)
    settings = Settings.from_config(cfg)
    with submission_lock(matrix_dir):
        refuse_if_active(matrix_dir)
        todo = matrix.unfinished(matrix_dir, cells, rerun_failed)
        if not todo:
            matrix._write_summary(matrix_dir)
            failed = [c.id for c in cells if matrix.cell_state(matrix_dir / c.id) == "failed"]
            print(f"[slurm] {matrix_dir}: nothing to submit: {len(cells) - len(failed)} of {len(cells)} cells "
                  f"finished" + (f", {len(failed)} failed (RERUN_FAILED=1 resubmits them)" if failed else ""))
            return 1 if failed else 0
        job, tasks = submit(matrix_dir, todo, settings, meta["name"])
    print(f"[slurm] {matrix_dir}: submitted job array {job} with {len(todo)} of {len(cells)} cells "
          f"({settings.describe()})", flush=True)
    for task, c in list(zip(tasks, todo))[:LISTED]:
        print(f"[slurm]   {task:<7} {c.id}")
    if len(todo) > LISTED:
        print(f"[slurm]   ... {len(todo) - LISTED} more (every task's cell is in {matrix_dir / SLURM_JSON})")
    print(f"[slurm] `make status DIR={matrix_dir}` shows their states; each cell logs to <cell>/train.log")
    return 0


def _one_line(exc: BaseException) -> str:
    lines = [l.strip() for l in str(exc).splitlines() if l.strip()]
    return lines[-1] if lines else type(exc).__name__


@contextlib.contextmanager
def submission_lock(matrix_dir: Path):
    """One submitter at a time per matrix (two `make continue` must not both submit)."""
    with open(Path(matrix_dir) / ".slurm.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SlurmError(f"{matrix_dir}: another process is submitting this matrix") from None
        yield


def is_slurm_matrix(matrix_dir: Path) -> bool:
    return (Path(matrix_dir) / SLURM_JSON).exists()


def latest_tasks(matrix_dir: Path) -> dict[str, str]:
    """cell id -> the array task ("<job>_<index>") of its newest submission."""
    out: dict[str, str] = {}
    for sub in (read_json(Path(matrix_dir) / SLURM_JSON) or {}).get("submissions", []):
        out.update({cell: task for task, cell in sub["tasks"].items()})
    return out


# ------------------------------------------------------------------ states
@dataclass(frozen=True)
class TaskState:
    task: str
    state: str
    restarts: int
    nodes: str
    reason: str

    @property
    def active(self) -> bool:
        return self.state not in FINISHED


_COLUMNS = (("JobArrayID", 40), ("State", 24), ("RestartCnt", 8), ("NodeList", 60), ("Reason", 200))


def query(tasks: Iterable[str]) -> dict[str, TaskState]:
    """squeue's view of array tasks ("<job>_<index>"); tasks it no longer knows are absent."""
    jobs = sorted({t.split("_")[0] for t in tasks})
    if not jobs:
        return {}
    fmt = ",".join(f"{name}:{width}" for name, width in _COLUMNS)
    cmd = ["squeue", "--array", "--noheader", "--states=all", f"--jobs={','.join(jobs)}", "-O", fmt]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise SlurmError(f"squeue could not be run ({exc}); is Slurm installed and SLURM_CONF set?") from None
    if out.returncode != 0:
        if "Invalid job id" in out.stderr:
            return {}  # every job is past the cluster's MinJobAge
        raise SlurmError(f"squeue failed: {_one_line(out.stderr or out.stdout)}")
    states = {}
    for line in out.stdout.splitlines():
        fields, pos = [], 0
        for _, width in _COLUMNS:
            fields.append(line[pos:pos + width].strip())
            pos += width
        task, state, restarts, nodes, reason = fields
        if task:
            states[task] = TaskState(task, state, int(restarts or 0), nodes, reason)
    return states


def refuse_if_active(matrix_dir: Path) -> None:
    """`make continue` must not start a cell a second time while Slurm still holds it."""
    tasks = latest_tasks(matrix_dir)
    active = sorted((s for s in query(tasks.values()).values() if s.active), key=lambda s: _order(s.task))
    if active:
        listed = ", ".join(f"{s.task} {s.state}" for s in active[:4]) + (" ..." if len(active) > 4 else "")
        jobs = " ".join(sorted({s.task.split("_")[0] for s in active}))
        raise SlurmError(f"{matrix_dir}: {len(active)} of its Slurm tasks are still queued or running "
                         f"({listed}); wait for them (`make status DIR={matrix_dir}`) or `scancel {jobs}` "
                         f"before `make continue`")


def _order(task: str) -> tuple:
    return tuple(int(x) if x.isdigit() else 0 for x in task.split("_"))


class StatusView:
    """Slurm's side of `make status`: each cell's newest task and its state."""

    def __init__(self, matrix_dir: Path):
        self.matrix_dir = Path(matrix_dir)
        self.tasks = latest_tasks(matrix_dir)
        self.error = None
        try:
            self.states = query(self.tasks.values())
        except SlurmError as exc:
            self.states, self.error = {}, str(exc)

    @classmethod
    def load(cls, matrix_dir: Path) -> Optional["StatusView"]:
        return cls(matrix_dir) if is_slurm_matrix(matrix_dir) else None

    def header(self) -> str:
        jobs = sorted({t.split("_")[0] for t in self.tasks.values()}, key=_order)
        text = f"; slurm job arrays {', '.join(jobs)}" if jobs else ""
        return text + (f" (Slurm not available: {self.error})" if self.error else "")

    def cell(self, cell_id: str, file_state: str) -> tuple[str, str]:
        """(state to show, note): Slurm's word while it holds the task, else the files'."""
        task = self.tasks.get(cell_id)
        if task is None:
            return file_state, ""
        s = self.states.get(task)
        if s is None:
            if self.error and (read_json(self.matrix_dir / cell_id / "cell.json") or {}).get("status") == "running":
                return "unknown", f"slurm {task}"  # running, or died: only Slurm could say
            return file_state, f"slurm {task}"
        shown = file_state
        if s.active and file_state not in ("done", "diverged"):
            shown = "requeued" if s.state == "PENDING" and s.restarts else ACTIVE_NAMES.get(s.state, s.state.lower())
        note = f"slurm {task} {s.state}"
        if s.state == "RUNNING" and s.nodes:
            note += f" on {s.nodes}"
        if s.reason and s.reason != "None":
            note += f" ({s.reason})"
        if s.restarts:
            note += f", requeued {s.restarts}x"
        return shown, note
