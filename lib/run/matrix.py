"""The test matrix: a directory of cells (run/cells.py), each run as its own process, resumed.

A matrix directory (results/<timestamp>_<name>/) keeps the .config, its minimal
form (`defconfig`, what every cell starts from), matrix.json (the cells, fixed at
creation: `make continue` never renumbers them) and one run directory per cell
with cell.json (status, exit code, end of the log) and train.log.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

import psutil

from ..config import pinned
from ..engine import signals
from .atomic import write_text_atomic
from .cells import Cell, expand, is_matrix  # noqa: F401  (callers use matrix.expand too)
from ..config.kconfig import ROOT, SHORTHANDS, load, minimal_text
from .locks import DirLock, LockBusy, die_with_parent, holder
from .rundir import read_json, read_jsonl, write_json_atomic

MatrixBusy = LockBusy  # another runner holds the matrix directory
# Exit statuses of a cell process (adamwprune.cli): a corrupt last.pt, a full disk.
EXIT_CORRUPT_CHECKPOINT, EXIT_DISK_FULL = 4, 5

LOG_TAIL_LINES = 20


# ---------------------------------------------------------------- dry run
def dry_run(config_path: Path, overrides: Sequence[tuple[str, str]]) -> int:
    from ..config import tuning
    from ..config.kconfig import ConfigError

    cfg, _, _ = load(config_path, dict(overrides))
    if not cfg.matrix:
        print("single run (CONFIG_MATRIX is off): `make` trains one model")
        return 0
    pending = None
    try:
        table = tuning.load_table(cfg) or False
    except ConfigError as e:   # the grid has not run (or not finished): list the cells anyway
        table, pending = False, str(e).removeprefix("error: ")
    cells = expand(cfg, table)
    extra = any(c.sweep or c.tuned for c in cells)
    w = max([10] + [len(c.pruning) + 1 for c in cells])  # state_regrow
    print(f"{'#':>4}  {'cell id':<48} {'model':<9} {'optimizer':<11} {'pruning':<{w}} {'sparsity':>8} "
          f"{'variant':<8} {'seed':>4}" + ("  swept / tuned values" if extra else ""))
    for i, c in enumerate(cells, 1):
        values = " ".join(f"{s}={v}" for s, v in c.sweep) + "".join(f" {s}={v} (tuned)" for s, v in c.tuned)
        print(f"{i:>4}  {c.id:<48} {c.model:<9} {c.optimizer:<11} {c.pruning:<{w}} {100 * c.sparsity:>7.0f}% "
              f"{c.variant or '-':<8} {c.seed:>4}" + (f"  {values.strip()}" if extra else ""))
    print(f"{len(cells)} cells")
    if pending:
        print(f"note: the tuned values are not known yet, so `make` would stop here: {pending}")
    return 0


# ------------------------------------------------------------- directories
def config_name(config_path: Path) -> str:
    """The defconfig a .config came from (kconfig_cli writes it in the header)."""
    for line in Path(config_path).read_text().splitlines()[:5]:
        if line.startswith("# defconfig:"):
            return line.split(":", 1)[1].strip()
    return "matrix"


def create(config_path: Path, overrides: Sequence[tuple[str, str]], results: Path) -> Path:
    """Make the matrix directory with its fixed list of cells, and fix each cell's
    full resolved configuration in its config.json (pinned.py)."""
    from .rundir import new_run_path
    from ..config.tuning import record as tuning_record

    cfg, _, kconf = load(config_path, dict(overrides))
    cells = expand(cfg)
    path = new_run_path(results, config_name(config_path))
    path.mkdir(parents=True)
    with DirLock(path, "matrix"):
        write_text_atomic(path / ".config", Path(config_path).read_text())
        base = load(config_path)[2]
        write_text_atomic(path / "defconfig", minimal_text(base))
        meta = {"name": config_name(config_path), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "overrides": [list(p) for p in overrides], "jobs": cfg.matrix_jobs,
                "tuning": tuning_record(cfg),
                "cells": [dict(asdict(c), overrides=[list(p) for p in c.overrides]) for c in cells]}
        for c in cells:
            pairs = cell_pairs(meta, c)
            pinned.pin(path / c.id, resolve_cell(path, pairs).to_dict(), pairs)
        write_json_atomic(path / "matrix.json", meta)  # last: a matrix.json vouches for the cells
    return path


def cell_pairs(meta: dict, cell: Cell, extra: Sequence[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """The overrides a cell runs with; the cell is a single run: matrix and launcher
    symbols stay out."""
    user = [tuple(p) for p in meta["overrides"]
            if not _symbol(p[0]).startswith(("MATRIX", "LAUNCHER", "SLURM_"))]
    return list(cell.overrides) + user + list(extra) + [("MATRIX", "n")]


def cell_command(matrix_dir: Path, cell: Cell, meta: dict, extra: Sequence[tuple[str, str]] = (),
                 resume: bool = False) -> list[str]:
    """The command that runs one cell (the local runner and a Slurm task run the same)."""
    pairs = cell_pairs(meta, cell, extra)
    cmd = [sys.executable, "-m", "adamwprune", "run", "--config", str(Path(matrix_dir) / "defconfig"),
           "--run-dir", str(Path(matrix_dir) / cell.id)] + [f"--override={k}={v}" for k, v in pairs]
    return cmd + ["--resume"] if resume else cmd


def resolve_cell(matrix_dir: Path, pairs, root: Path = ROOT):
    """The configuration the Kconfig tree at `root` gives a cell now."""
    return load(Path(matrix_dir) / "defconfig", dict(pairs), root=root)[0]


def config_changes(matrix_dir: Path, cells: Sequence[Cell], meta: dict, root: Path = ROOT) -> dict:
    """{cell id: (configuration now, differences)} for the cells whose pinned
    configuration the tree at `root` now resolves differently."""
    out = {}
    for c in cells:
        now = resolve_cell(matrix_dir, cell_pairs(meta, c), root).to_dict()
        diffs = pinned.check(matrix_dir / c.id, now, accept=True)
        if diffs:
            out[c.id] = (now, diffs)
    return out


def _check_config(matrix_dir: Path, todo: Sequence[Cell], meta: dict, accept: bool, root: Path) -> None:
    changed = config_changes(matrix_dir, todo, meta, root)
    if not changed:
        return
    union = {}
    for _, diffs in changed.values():
        for k, a, b in diffs:
            union.setdefault((k, str(a), str(b)), (k, a, b))
    if not accept:
        raise pinned.ConfigChanged(
            f"{matrix_dir}: the current Kconfig resolves {len(changed)} unfinished cell(s) differently from "
            f"when the matrix was created: {pinned.describe(union.values())}; {pinned.ACCEPT_HINT}, "
            "or check out the code the matrix was started with")
    for cid, (now, diffs) in changed.items():
        pinned.record(matrix_dir / cid, now, diffs)
    entry = dict(pinned.change_entry(list(union.values())), cells=sorted(changed))
    write_json_atomic(matrix_dir / "matrix.json", {**meta, "config_changes": meta.get("config_changes", []) + [entry]})
    print(f"[matrix] accepted configuration changes in {len(changed)} cell(s): "
          f"{pinned.describe(union.values())} (recorded in matrix.json)", flush=True)


def load_cells(matrix_dir: Path) -> tuple[dict, list[Cell]]:
    meta = read_json(Path(matrix_dir) / "matrix.json")
    if meta is None:
        raise FileNotFoundError(f"{matrix_dir}: no matrix.json (not a matrix directory)")
    cells = [Cell(**dict(c, overrides=tuple(tuple(p) for p in c["overrides"]))) for c in meta["cells"]]
    return meta, cells


# ------------------------------------------------------------------ status
def cell_state(cell_dir: Path) -> str:
    """done / diverged / failed / running / interrupted / pending, from the files alone.

    running: a live process holds the cell's lock, or the runner started it and
    its process (same pid *and* start time) lives; interrupted: it has a last.pt,
    or its process died (a signal, a full disk) without finishing; a cell that
    failed on a corrupt last.pt is pending again once that file is deleted."""
    final = read_json(cell_dir / "final.json")
    if final is not None:
        return {"completed": "done"}.get(final["status"], final["status"])
    info = read_json(cell_dir / "cell.json") or {}
    if holder(cell_dir) is not None or (info.get("status") == "running" and _same_process(info)):
        return "running"
    if info.get("status") == "failed":
        if info.get("reason") == "corrupt-checkpoint" and not (cell_dir / "last.pt").exists():
            return "pending"
        return "failed"
    if (cell_dir / "last.pt").exists() or info.get("status") in ("running", "interrupted"):
        return "interrupted"
    return "pending"


def _same_process(info: dict) -> bool:
    """The pid in cell.json is alive and is still the process the runner started."""
    pid, started = info.get("pid"), info.get("pid_started")
    if not _alive(pid):
        return False
    try:
        return started is None or abs(psutil.Process(pid).create_time() - started) < 0.05
    except psutil.Error:
        return False


def _alive(pid: Optional[int]) -> bool:
    """Whether the process runs; a zombie (killed, not yet reaped: its parent died
    too) does not."""
    if not pid:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def progress_of(cell_dir: Path) -> str:
    cfg = read_json(cell_dir / "config.json") or {}
    total = cfg.get("total_steps")
    path = cell_dir / "metrics.jsonl"
    rows = read_jsonl(path)
    if path.exists() and _cut_last_line(path):
        print(f"  note: {path}: the last line is cut (a crash mid-write); it is ignored and dropped on resume",
              flush=True)
    step = rows[-1].get("step", 0) if rows else 0
    return f"{step}/{total or '?'}" if total or rows else "-"


def _cut_last_line(path: Path) -> bool:
    text = path.read_text(errors="replace")
    last = text.rstrip("\n").rsplit("\n", 1)[-1]
    if not last.strip():
        return False
    try:
        json.loads(last)
        return False
    except json.JSONDecodeError:
        return True


def status(matrix_dir: Path) -> int:
    from ..launch.slurm import StatusView

    meta, cells = load_cells(matrix_dir)
    counts: dict[str, int] = {}
    slurm = StatusView.load(matrix_dir)  # None unless the matrix was submitted to Slurm
    print(f"matrix {matrix_dir} ({meta['name']}, {len(cells)} cells{slurm.header() if slurm else ''})")
    for c in cells:
        state, note = cell_state(matrix_dir / c.id), ""
        if slurm:
            state, note = slurm.cell(c.id, state)
        counts[state] = counts.get(state, 0) + 1
        print(f"  {state:<12} {progress_of(matrix_dir / c.id):>13}  {c.id:<44} {note}".rstrip())
    print("  " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return 0


# --------------------------------------------------------------------- run
def _tail(path: Path, n: int = LOG_TAIL_LINES) -> str:
    try:
        lines = path.read_text(errors="replace").replace("\r", "\n").splitlines()
    except FileNotFoundError:
        return ""
    return "\n".join(lines[-n:])


def _cell_env(slot: int, jobs: int) -> tuple[dict, list[tuple[str, str]]]:
    import torch

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    extra: list[tuple[str, str]] = []
    n_gpu = torch.cuda.device_count()
    if n_gpu:
        env["CUDA_VISIBLE_DEVICES"] = str(slot % n_gpu)
    elif jobs > 1:
        extra.append(("RUN_THREADS", str(max(1, (os.cpu_count() or 1) // jobs))))
    return env, extra


def _start(matrix_dir: Path, cell: Cell, meta: dict, slot: int, jobs: int, resume: bool) -> subprocess.Popen:
    cell_dir = matrix_dir / cell.id
    cell_dir.mkdir(exist_ok=True)
    env, extra = _cell_env(slot, jobs)
    cmd = cell_command(matrix_dir, cell, meta, extra, resume)
    log = open(cell_dir / "train.log", "a")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=_die_with_parent)
    log.close()
    try:
        pid_started = psutil.Process(proc.pid).create_time()
    except psutil.Error:
        pid_started = None
    write_json_atomic(cell_dir / "cell.json", {"status": "running", "pid": proc.pid, "pid_started": pid_started,
                                               "slot": slot, "started": time.time(), "resumed": resume})
    return proc


def _die_with_parent() -> None:
    """In a cell's process before it runs: SIGTERM when the runner dies (even by kill -9:
    no orphan keeps writing), and the stop signals held back until its trainer can
    handle them (a signal during `import torch` is then held, not lost)."""
    die_with_parent()
    signals.preexec_block()


def _symbol(key: str) -> str:
    key = key[len("CONFIG_"):] if key.startswith("CONFIG_") else key
    return SHORTHANDS.get(key, key)


def _finish(matrix_dir: Path, cell: Cell, code: int, **extra) -> str:
    """Record how a cell's process ended: its final.json's status; interrupted when a
    stop signal made it save and exit (exit status 75, stopped.json), when a signal
    (the OOM killer, kill -9) or a full disk stopped it; else failed."""
    cell_dir = matrix_dir / cell.id
    final = read_json(cell_dir / "final.json")
    info = {"exit_code": code, "finished": time.time(), "log_tail": _tail(cell_dir / "train.log"),
            **extra}
    if final:
        state = final["status"]
    elif code == signals.EXIT_INTERRUPTED or (cell_dir / "stopped.json").exists():
        state, info["reason"] = "interrupted", "stopped by a signal (last.pt saved)"
    elif code < 0 or code > 128 or code == EXIT_DISK_FULL:  # killed by signal -code (or code - 128)
        state = "interrupted"
        sig = -code if code < 0 else code - 128 if code > 128 else None
        info["reason"] = "disk-full" if code == EXIT_DISK_FULL else f"signal {sig}"
    else:
        state = "failed"
        if code == EXIT_CORRUPT_CHECKPOINT:
            info["reason"] = "corrupt-checkpoint"
    write_json_atomic(cell_dir / "cell.json", {"status": state, **info})
    return state


def run(matrix_dir: Path, rerun_failed: bool = False, jobs: Optional[int] = None, accept_changes: bool = False,
        root: Path = ROOT, checked: bool = False) -> int:
    """Run (or continue) every unfinished cell, holding the matrix's lock; returns
    the number of cells that did not complete (failed, diverged, interrupted).

    Unless `checked` (a matrix just created), every unfinished cell's pinned
    configuration is first compared with what the tree at `root` resolves now."""
    with DirLock(matrix_dir, "matrix"):
        meta, cells = load_cells(matrix_dir)
        todo = unfinished(matrix_dir, cells, rerun_failed)
        if not checked:
            _check_config(matrix_dir, todo, meta, accept_changes, root)
        meta = load_cells(matrix_dir)[0]
        _run(matrix_dir, meta, cells, todo, max(1, jobs or meta.get("jobs") or 1))
        return _report(matrix_dir, cells)


def unfinished(matrix_dir: Path, cells: Sequence[Cell], rerun_failed: bool = False) -> list[Cell]:
    """The cells `make continue` runs again: not done or diverged; failed ones on request."""
    todo = []
    for c in cells:
        state = cell_state(matrix_dir / c.id)
        if state in ("done", "diverged") or (state == "failed" and not rerun_failed):
            continue
        todo.append(c)
    return todo


def _run(matrix_dir: Path, meta: dict, cells: Sequence[Cell], todo: list[Cell], jobs: int) -> None:
    print(f"[matrix] {matrix_dir}: {len(cells) - len(todo)} of {len(cells)} cells already finished, "
          f"{len(todo)} to run, {jobs} at a time", flush=True)
    running: dict[int, tuple[Cell, subprocess.Popen]] = {}
    progress = Progress(len(cells), len(cells) - len(todo), len(todo), jobs)
    queue = list(todo)
    stop, stopping = signals.active() or signals.StopRequest(), False
    while queue or running:
        if stop.requested and not stopping:
            stopping = True
            _stop_cells(running, queue)
        while queue and len(running) < jobs and not stop.requested:
            slot = next(i for i in range(jobs) if i not in running)
            cell = queue.pop(0)
            _wait_for_holder(matrix_dir / cell.id)
            resume = (matrix_dir / cell.id / "last.pt").exists()
            running[slot] = (cell, _start(matrix_dir, cell, meta, slot, jobs, resume))
            progress.cell_started(cell.id)
            print(f"[matrix] start  {cell.id}" + (" (resuming from last.pt)" if resume else ""), flush=True)
        time.sleep(0.2)
        for slot, (cell, proc) in list(running.items()):
            code = proc.poll()
            if code is None:
                continue
            del running[slot]
            state = _finish(matrix_dir, cell, code)
            done = "(last.pt saved)" if state == "interrupted" else progress.cell_done(cell.id)
            print(f"[matrix] {state:<11} {cell.id} {done}", flush=True)
    if stop.requested:
        print(f"[matrix] stopped by {stop.name}; `make continue DIR={matrix_dir}` resumes the interrupted "
              f"cells from their last.pt", flush=True)
        raise signals.Interrupted(stop.signum)


def _stop_cells(running: dict, queue: list) -> None:
    """A stop signal reached the runner: start nothing more, and ask each running cell
    to save and stop (the terminal's Ctrl-C reached them already; a `kill` of the
    runner alone did not). Their exits are then collected as usual."""
    queue.clear()
    for cell, proc in running.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)


def _wait_for_holder(cell_dir: Path, timeout_s: float = 120.0) -> None:
    """A cell of a runner that just died may still be saving its checkpoint (it got
    SIGTERM): wait for it to let go of the cell before starting the cell again."""
    deadline = time.time() + timeout_s
    while holder(cell_dir) is not None and time.time() < deadline:
        time.sleep(0.2)


class Progress:
    """`(k/n cells, ETA ...)` after each cell: the mean duration of the cells this
    runner finished, times the cells not finished, over the cells run at once."""

    def __init__(self, total: int, finished: int, todo: int, jobs: int):
        self.total, self.finished, self.left, self.jobs = total, finished, todo, jobs
        self.started: dict[str, float] = {}
        self.durations: list[float] = []

    def cell_started(self, cell_id: str) -> None:
        self.started[cell_id] = time.time()

    def cell_done(self, cell_id: str) -> str:
        self.finished, self.left = self.finished + 1, self.left - 1
        self.durations.append(time.time() - self.started.pop(cell_id))
        eta = sum(self.durations) / len(self.durations) * self.left / self.jobs
        tail = f", ETA {_duration(eta)}" if self.left > 0 else ""
        return f"({self.finished}/{self.total} cells{tail})"


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _report(matrix_dir: Path, cells: Sequence[Cell]) -> int:
    states = {c.id: cell_state(matrix_dir / c.id) for c in cells}
    _write_summary(matrix_dir)
    bad = {s: [cid for cid, st in states.items() if st == s] for s in ("failed", "diverged", "interrupted",
                                                                       "pending", "running")}
    n_bad = sum(len(v) for v in bad.values())
    if not n_bad:
        print(f"[matrix] all {len(cells)} cells finished; results in {matrix_dir}", flush=True)
        return 0
    hints = {"failed": "logs: <cell>/train.log; rerun with `make continue RERUN_FAILED=1`",
             "diverged": "a non-finite loss; see final.json's message",
             "interrupted": "stopped by a signal, killed or out of disk; `make continue` resumes them",
             "pending": "not started", "running": "still held by another process"}
    for s, ids in bad.items():
        if ids:
            print(f"[matrix] {len(ids)} of {len(cells)} cells {s}: {', '.join(ids)} ({hints[s]})", flush=True)
    return n_bad


def _write_summary(matrix_dir: Path) -> None:
    try:
        from ..report.summary import write_summary
    except ImportError:
        return
    csv_path, md_path = write_summary(matrix_dir)
    print(f"[matrix] summary: {md_path}", flush=True)
