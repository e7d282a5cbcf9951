"""The test matrix: expand a config into cells, run each as its own process, resume.

A matrix directory (results/<timestamp>_<name>/) keeps the .config, its minimal
form (`defconfig`, what every cell starts from), matrix.json (the cells, fixed at
creation: `make continue` never renumbers them) and one run directory per cell
with cell.json (status, exit code, end of the log) and train.log.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import psutil

from . import signals
from .config import ROOT, SHORTHANDS, load, minimal_text
from .rundir import read_json, run_name, write_json_atomic

LOG_TAIL_LINES = 20


@dataclass(frozen=True)
class Cell:
    id: str
    model: str
    optimizer: str
    pruning: str
    sparsity: float
    variant: Optional[str]
    seed: int
    overrides: tuple = field(default=())


def _picked(pairs) -> list:
    return [name for name, on in pairs if on]


def matrix_axes(cfg) -> dict:
    """The selected values of each axis (literal tables: every symbol is read by name)."""
    seeds = ([int(s) for s in cfg.matrix_seed_list.split()] if cfg.matrix_seed_list
             else [cfg.seed + i for i in range(cfg.matrix_seeds or 1)])
    return {
        "models": _picked([("lenet5", cfg.matrix_model_lenet5), ("resnet18", cfg.matrix_model_resnet18),
                           ("resnet50", cfg.matrix_model_resnet50), ("gpt2", cfg.matrix_model_gpt2)]),
        "optimizers": _picked([("sgd", cfg.matrix_optimizer_sgd), ("adam", cfg.matrix_optimizer_adam),
                               ("adamw", cfg.matrix_optimizer_adamw), ("adamwadv", cfg.matrix_optimizer_adamwadv),
                               ("adamwspam", cfg.matrix_optimizer_adamwspam),
                               ("adamwprune", cfg.matrix_optimizer_adamwprune)]),
        "prunings": _picked([("none", cfg.matrix_pruning_none), ("magnitude", cfg.matrix_pruning_magnitude),
                             ("movement", cfg.matrix_pruning_movement), ("state", cfg.matrix_pruning_state)]),
        "sparsities": _picked([(0.5, cfg.matrix_sparsity_50), (0.7, cfg.matrix_sparsity_70),
                               (0.9, cfg.matrix_sparsity_90), (0.95, cfg.matrix_sparsity_95),
                               (0.99, cfg.matrix_sparsity_99)]),
        "variants": _picked([("bitter0", cfg.matrix_variant_bitter0), ("bitter1", cfg.matrix_variant_bitter1),
                             ("bitter2", cfg.matrix_variant_bitter2)]),
        "seeds": seeds,
    }


def _valid(optimizer: str, pruning: str) -> bool:
    """A cell is valid when the pruner accepts the optimizer and an optimizer that prunes
    by itself is not paired with a second, external pruner (it would be AdamW plus one)."""
    from .registry import OPTIMIZERS, PRUNERS

    need = PRUNERS[pruning].requires_optimizer
    if need is not None:
        return optimizer in need
    return not (OPTIMIZERS[optimizer].prunes_itself and PRUNERS[pruning].prunes)


def expand(cfg) -> list[Cell]:
    """The valid cells of cfg's matrix, in a stable order."""
    a = matrix_axes(cfg)
    cells = []
    for model in a["models"]:
        for opt in a["optimizers"]:
            for pruning in a["prunings"]:
                if not _valid(opt, pruning):
                    continue
                sparsities = [0.0] if pruning == "none" else a["sparsities"]
                variants = a["variants"] if pruning == "state" else [None]
                for s in sparsities:
                    for v in variants:
                        for seed in a["seeds"]:
                            pairs = [("MODEL", model), ("OPTIMIZER", opt), ("PRUNING", pruning)]
                            if pruning != "none":
                                pairs.append(("PRUNING_TARGET_SPARSITY", f"{s:g}"))
                            if v is not None:
                                pairs.append(("ADAMWPRUNE_VARIANT", v))
                            pairs.append(("SEED", str(seed)))
                            name = run_name(model, opt, pruning, s, v, seed)
                            cells.append(Cell(name, model, opt, pruning, s, v, seed, tuple(pairs)))
    return cells


def is_matrix(cfg) -> bool:
    return bool(cfg.matrix) and len(expand(cfg)) > 1


# ---------------------------------------------------------------- dry run
def dry_run(config_path: Path, overrides: Sequence[tuple[str, str]]) -> int:
    cfg, _, _ = load(config_path, dict(overrides))
    cells = expand(cfg) if cfg.matrix else []
    if not cells:
        print("single run (CONFIG_MATRIX is off): `make` trains one model")
        return 0
    print(f"{'#':>4}  {'cell id':<48} {'model':<9} {'optimizer':<11} {'pruning':<10} {'sparsity':>8} "
          f"{'variant':<8} {'seed':>4}")
    for i, c in enumerate(cells, 1):
        print(f"{i:>4}  {c.id:<48} {c.model:<9} {c.optimizer:<11} {c.pruning:<10} {100 * c.sparsity:>7.0f}% "
              f"{c.variant or '-':<8} {c.seed:>4}")
    print(f"{len(cells)} cells")
    return 0


# ------------------------------------------------------------- directories
def config_name(config_path: Path) -> str:
    """The defconfig a .config came from (kconfig_cli writes it in the header)."""
    for line in Path(config_path).read_text().splitlines()[:5]:
        if line.startswith("# defconfig:"):
            return line.split(":", 1)[1].strip()
    return "matrix"


def create(config_path: Path, overrides: Sequence[tuple[str, str]], results: Path) -> Path:
    """Make the matrix directory with its fixed list of cells."""
    from .rundir import new_run_path

    cfg, _, kconf = load(config_path, dict(overrides))
    cells = expand(cfg)
    path = new_run_path(results, config_name(config_path))
    path.mkdir(parents=True)
    (path / ".config").write_text(Path(config_path).read_text())
    base = load(config_path)[2]
    (path / "defconfig").write_text(minimal_text(base))
    write_json_atomic(path / "matrix.json", {
        "name": config_name(config_path), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "overrides": [list(p) for p in overrides],
        "jobs": cfg.matrix_jobs,
        "cells": [dict(asdict(c), overrides=[list(p) for p in c.overrides]) for c in cells]})
    return path


def load_cells(matrix_dir: Path) -> tuple[dict, list[Cell]]:
    meta = read_json(Path(matrix_dir) / "matrix.json")
    if meta is None:
        raise FileNotFoundError(f"{matrix_dir}: no matrix.json (not a matrix directory)")
    cells = [Cell(**dict(c, overrides=tuple(tuple(p) for p in c["overrides"]))) for c in meta["cells"]]
    return meta, cells


def latest_matrix(results: Path) -> Optional[Path]:
    found = sorted(p.parent for p in Path(results).glob("*/matrix.json"))
    return found[-1] if found else None


# ------------------------------------------------------------------ status
def cell_state(cell_dir: Path) -> str:
    """done / diverged / failed / running / interrupted / pending, from the files alone."""
    final = read_json(cell_dir / "final.json")
    if final is not None:
        return {"completed": "done"}.get(final["status"], final["status"])
    info = read_json(cell_dir / "cell.json") or {}
    if info.get("status") == "failed":
        return "failed"
    if info.get("status") == "running" and _alive(info.get("pid")):
        return "running"
    if (cell_dir / "last.pt").exists() or info.get("status") == "running":
        return "interrupted"
    return "pending"


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
    rows = (cell_dir / "metrics.jsonl").read_text().splitlines() if (cell_dir / "metrics.jsonl").exists() else []
    step = json.loads(rows[-1]).get("step", 0) if rows else 0
    return f"{step}/{total}" if total else "-"


def status(matrix_dir: Path) -> int:
    from .launch.slurm import StatusView

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
def _die_with_parent() -> None:
    """Children are killed when the runner dies (even by kill -9): no orphan keeps writing.
    They start with the stop signals held back until their trainer can handle them."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    signals.preexec_block()


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


def cell_command(matrix_dir: Path, cell: Cell, meta: dict, extra: Sequence[tuple[str, str]] = (),
                 resume: bool = False) -> list[str]:
    """The command that runs one cell (the local runner and a Slurm task run the same)."""
    # The cell is a single run: matrix and launcher symbols stay out of it.
    user = [tuple(p) for p in meta["overrides"]
            if not _symbol(p[0]).startswith(("MATRIX", "LAUNCHER", "SLURM_"))]
    pairs = list(cell.overrides) + user + list(extra) + [("MATRIX", "n")]
    cmd = [sys.executable, "-m", "adamwprune", "run", "--config", str(Path(matrix_dir) / "defconfig"),
           "--run-dir", str(Path(matrix_dir) / cell.id)] + [f"--override={k}={v}" for k, v in pairs]
    return cmd + ["--resume"] if resume else cmd


def _start(matrix_dir: Path, cell: Cell, meta: dict, slot: int, jobs: int, resume: bool) -> subprocess.Popen:
    cell_dir = matrix_dir / cell.id
    cell_dir.mkdir(exist_ok=True)
    env, extra = _cell_env(slot, jobs)
    cmd = cell_command(matrix_dir, cell, meta, extra, resume)
    log = open(cell_dir / "train.log", "a")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=_die_with_parent)
    log.close()
    write_json_atomic(cell_dir / "cell.json", {"status": "running", "pid": proc.pid, "slot": slot,
                                               "started": time.time(), "resumed": resume})
    return proc


def _symbol(key: str) -> str:
    key = key[len("CONFIG_"):] if key.startswith("CONFIG_") else key
    return SHORTHANDS.get(key, key)


def _finish(matrix_dir: Path, cell: Cell, code: int, **extra) -> str:
    cell_dir = matrix_dir / cell.id
    final = read_json(cell_dir / "final.json")
    stopped = code == signals.EXIT_INTERRUPTED or (cell_dir / "stopped.json").exists()
    state = final["status"] if final else "interrupted" if stopped else "failed"
    write_json_atomic(cell_dir / "cell.json", {"status": state, "exit_code": code, "finished": time.time(),
                                               "log_tail": _tail(cell_dir / "train.log"), **extra})
    return state


class MatrixBusy(RuntimeError):
    """Another runner is alive on this matrix."""


def run(matrix_dir: Path, rerun_failed: bool = False, jobs: Optional[int] = None) -> int:
    """Run (or continue) every unfinished cell; returns the number of cells that failed
    or were stopped by a signal (raises signals.Interrupted when the runner itself was)."""
    lock = Path(matrix_dir) / "runner.pid"
    other = int(lock.read_text() or 0) if lock.exists() else 0
    if other and other != os.getpid() and _alive(other):
        raise MatrixBusy(f"{matrix_dir} is being run by process {other}; wait for it (`make status`) "
                         f"or stop it before `make continue`")
    lock.write_text(str(os.getpid()))
    try:
        return _run(matrix_dir, rerun_failed, jobs)
    finally:
        lock.unlink(missing_ok=True)


def unfinished(matrix_dir: Path, cells: Sequence[Cell], rerun_failed: bool = False) -> list[Cell]:
    """The cells `make continue` runs again: not done or diverged; failed ones on request."""
    todo = []
    for c in cells:
        state = cell_state(matrix_dir / c.id)
        if state in ("done", "diverged") or (state == "failed" and not rerun_failed):
            continue
        todo.append(c)
    return todo


def _run(matrix_dir: Path, rerun_failed: bool, jobs: Optional[int]) -> int:
    meta, cells = load_cells(matrix_dir)
    jobs = max(1, jobs or meta.get("jobs") or 1)
    todo = unfinished(matrix_dir, cells, rerun_failed)
    print(f"[matrix] {matrix_dir}: {len(cells) - len(todo)} of {len(cells)} cells already finished, "
          f"{len(todo)} to run, {jobs} at a time", flush=True)
    running: dict[int, tuple[Cell, subprocess.Popen]] = {}
    done = len(cells) - len(todo)
    queue = list(todo)
    stop, stopping = signals.active() or signals.StopRequest(), False
    while queue or running:
        if stop.requested and not stopping:
            stopping = True
            _stop_cells(running, queue)
        while queue and len(running) < jobs and not stop.requested:
            slot = next(i for i in range(jobs) if i not in running)
            cell = queue.pop(0)
            resume = (matrix_dir / cell.id / "last.pt").exists()
            running[slot] = (cell, _start(matrix_dir, cell, meta, slot, jobs, resume))
            print(f"[matrix] start  {cell.id}" + (" (resuming from last.pt)" if resume else ""), flush=True)
        time.sleep(0.2)
        for slot, (cell, proc) in list(running.items()):
            code = proc.poll()
            if code is None:
                continue
            del running[slot]
            state = _finish(matrix_dir, cell, code)
            done += state != "interrupted"
            print(f"[matrix] {state:<9} {cell.id} " + ("(last.pt saved)" if state == "interrupted" else
                                                       f"({done}/{len(cells)})"), flush=True)
    if stop.requested:
        print(f"[matrix] stopped by {stop.name}; `make continue DIR={matrix_dir}` resumes the interrupted "
              f"cells from their last.pt", flush=True)
        raise signals.Interrupted(stop.signum)
    failed = [c.id for c in cells if cell_state(matrix_dir / c.id) == "failed"]
    stopped = [c.id for c in cells if cell_state(matrix_dir / c.id) == "interrupted"]
    _write_summary(matrix_dir)
    if failed:
        print(f"[matrix] {len(failed)} of {len(cells)} cells failed: {', '.join(failed)} "
              f"(logs: <cell>/train.log; rerun with `make continue RERUN_FAILED=1`)", flush=True)
    if stopped:
        print(f"[matrix] {len(stopped)} of {len(cells)} cells were stopped by a signal: {', '.join(stopped)} "
              f"(`make continue DIR={matrix_dir}` resumes them from last.pt)", flush=True)
    if not failed and not stopped:
        print(f"[matrix] all {len(cells)} cells finished; results in {matrix_dir}", flush=True)
    return len(failed) + len(stopped)


def _stop_cells(running: dict, queue: list) -> None:
    """A stop signal reached the runner: start nothing more, and ask each running cell
    to save and stop (the terminal's Ctrl-C reached them already; a `kill` of the
    runner alone did not). Their exits are then collected as usual."""
    queue.clear()
    for cell, proc in running.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)


def _write_summary(matrix_dir: Path) -> None:
    try:
        from .summary import write_summary
    except ImportError:
        return
    csv_path, md_path = write_summary(matrix_dir)
    print(f"[matrix] summary: {md_path}", flush=True)
