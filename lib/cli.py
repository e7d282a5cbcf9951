"""Command line of the project: `python -m adamwprune <command>` (the Makefile calls it).

  run       train what .config describes (plus make-line overrides)
  continue  resume the latest interrupted run (or DIR) from its last.pt
  evaluate  evaluate a run's best checkpoint on another copy of the dataset
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from .run import checkpoint as ckpt
from .config import pinned
from .engine import signals
from .run.atomic import DiskFullError, write_text_atomic
from .config.kconfig import ROOT, ConfigError, load, parse_set
from .run.locks import HELD_ENV, LockBusy, die_with_parent, lock_run
from .run.rundir import new_run_path, read_json, run_name
from .engine.tasks import load_task  # noqa: F401  (adamwprune.cli.load_task, as before)

# Exit statuses a matrix runner reads to judge a cell (matrix._finish).
EXIT_USAGE, EXIT_DIVERGED, EXIT_CORRUPT_CHECKPOINT, EXIT_DISK_FULL = 2, 3, 4, 5


def _user_errors() -> tuple:
    """Problems a user can fix, reported in one line (never a traceback)."""
    from .data.tokens import DataPrepError

    from .launch.slurm import SlurmError

    return (ConfigError, FileNotFoundError, ValueError, ckpt.CheckpointError, LockBusy, DiskFullError,
            DataPrepError, SlurmError)


def exit_status(exc: BaseException, cmd: str = "") -> int:
    """2 for a problem to fix; a trainer (`run`, what matrix cells are) tells a corrupt
    last.pt and a full disk apart, which its matrix runner treats differently."""
    if cmd != "run":
        return EXIT_USAGE
    if isinstance(exc, ckpt.CheckpointError):
        return EXIT_CORRUPT_CHECKPOINT
    if isinstance(exc, DiskFullError):
        return EXIT_DISK_FULL
    return EXIT_USAGE


# --------------------------------------------------------------------- tasks
def cell_id(cfg) -> str:
    """The run's name, as the matrix names its cells."""
    from .registry import pattern_of, target_of

    return run_name(cfg.model, cfg.optimizer, cfg.pruning, target_of(cfg) or 0.0,
                    cfg.adamwprune_variant, cfg.seed, pattern=pattern_of(cfg),
                    distribution=cfg.prune_distribution)


# ----------------------------------------------------------------------- run
def parse_overrides(items: Sequence[str], set_text: str = "") -> list[tuple[str, str]]:
    pairs = []
    for item in items or ():
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not NAME=value")
        k, v = item.split("=", 1)
        pairs.append((k, v))
    pairs += list(parse_set(set_text).items())
    return pairs


def train(config_path: Path, overrides: list[tuple[str, str]], run_dir: Optional[Path] = None,
          resume: bool = False, accept_changes: bool = False) -> int:
    """`make`: a matrix when the config selects more than one cell, else one run."""
    from .run import matrix
    from .config.notes import print_override_effects

    cfg, _, _ = load(config_path, dict(overrides))
    if run_dir is None and not resume:
        print_override_effects(config_path, overrides)
    slurm = bool(cfg.matrix) and cfg.launcher == "slurm"  # even one cell: a job array of one
    if run_dir is None and not resume and (matrix.is_matrix(cfg) or slurm):
        mdir = matrix.create(config_path, overrides, results_path(cfg))
        if slurm:
            from .launch.slurm import run_matrix as submit_matrix

            return submit_matrix(mdir, cfg)
        unfinished = matrix.run(mdir, checked=True)
        return 1 if unfinished else 0
    if cfg.matrix:
        (cell,) = matrix.expand(cfg)  # a one-cell matrix is a single run of that cell
        overrides = list(cell.overrides) + list(overrides)
    return train_one(config_path, overrides, run_dir=run_dir, resume=resume, accept_changes=accept_changes)


def results_path(cfg) -> Path:
    p = Path(cfg.results_dir)
    return p if p.is_absolute() else ROOT / p


def train_one(config_path: Optional[Path], overrides: list[tuple[str, str]], run_dir: Optional[Path] = None,
              resume: bool = False, config_text: Optional[str] = None, accept_changes: bool = False,
              root: Optional[Path] = None) -> int:
    """Train one run, holding its directory's lock; returns the process exit status.

    A run directory that already holds a configuration (a resumed run, a matrix
    cell) is trained only with exactly that configuration (pinned.py)."""
    cfg, _, kconf = load(config_path, dict(overrides), root=root or ROOT)
    if config_text is None:
        config_text = Path(config_path).read_text() if config_path else _config_text(kconf)
    if run_dir is None:
        run_dir = new_run_path(results_path(cfg), cell_id(cfg))
    lock = lock_run(run_dir)  # None in a torchrun worker: its launcher holds it
    try:
        if lock is not None:
            diffs = pinned.check(run_dir, cfg.to_dict(), accept_changes)
            if diffs:
                pinned.record(run_dir, cfg.to_dict(), diffs)
                print(f"[adamwprune] accepted configuration changes: {pinned.describe(diffs)}", flush=True)
        if cfg.nproc > 1 and "LOCAL_RANK" not in os.environ:
            return _launch_torchrun(cfg.nproc, config_path, overrides, run_dir, resume, config_text)
        return _fit(cfg, run_dir, resume, config_text, overrides)
    finally:
        if lock is not None:
            lock.release()


def _fit(cfg, run_dir: Path, resume: bool, config_text: str, overrides) -> int:
    from .engine.trainer import STATUS_COMPLETED, STATUS_INTERRUPTED, Trainer

    task = load_task(cfg.model)
    trainer = Trainer(task, cfg, run_dir, config_text=config_text,
                      overrides={"pairs": [list(p) for p in overrides]})
    try:
        final = trainer.fit(resume=resume)
    finally:
        trainer.dist.close()
    if final["status"] == STATUS_INTERRUPTED:
        return signals.EXIT_INTERRUPTED
    return 0 if final["status"] == STATUS_COMPLETED else EXIT_DIVERGED


def _config_text(kconf) -> str:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "config"
        kconf.write_config(str(p), save_old=False)
        return p.read_text()


def _launch_torchrun(nproc: int, config_path, overrides, run_dir: Path, resume: bool, text: str) -> int:
    """Re-run this command under torchrun with one process per GPU (or CPU worker)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_file = run_dir / ".config"
    if not cfg_file.exists():
        write_text_atomic(cfg_file, text)
    rdzv = os.environ.get("TORCHRUN_ARGS", "--standalone").split()
    cmd = [sys.executable, "-m", "torch.distributed.run", *rdzv, f"--nproc_per_node={nproc}",
           "-m", "adamwprune", "run", "--config", str(cfg_file), "--run-dir", str(run_dir)]
    cmd += [f"--override={k}={v}" for k, v in overrides]
    if resume:
        cmd.append("--resume")
    return _torchrun(cmd, run_dir)


def _torchrun(cmd: list, run_dir: Path) -> int:
    """Run torchrun until it exits (it holds no lock: this launcher does, HELD_ENV). A
    stop signal is passed on to its workers (the terminal and Slurm signal them
    directly too: once or twice is the same request), and torchrun itself waits for
    them on SIGUSR2 as on SIGTERM instead of dying."""
    import psutil

    env = dict(os.environ, **{HELD_ENV: str(run_dir.resolve())})
    env.setdefault("TORCHELASTIC_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2")
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "300")  # time for rank 0 to write last.pt
    (run_dir / "stopped.json").unlink(missing_ok=True)
    with signals.catching() as stop:
        proc = subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent)
        passed_on = False
        while True:
            try:
                code = proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            if stop.requested and not passed_on:
                passed_on = True
                for worker in psutil.Process(proc.pid).children():
                    with contextlib.suppress(psutil.Error):
                        worker.send_signal(signal.SIGTERM)
    # The workers stopped on a signal (rank 0 says so in stopped.json): torchrun itself
    # reports a worker that exits early as failed.
    if (stop.requested or (run_dir / "stopped.json").exists()) and not (run_dir / "final.json").exists():
        return signals.EXIT_INTERRUPTED
    return code


# ------------------------------------------------------------------ continue
def find_unfinished(results: Path) -> Optional[Path]:
    """The newest unfinished run directory or matrix directory under results/ (by
    creation time, which the timestamped names also sort by)."""
    from .run import matrix

    candidates = [p.parent for p in Path(results).glob("*/last.pt") if read_json(p.parent / "final.json") is None]
    for mdir in Path(results).glob("*/matrix.json"):
        _, cells = matrix.load_cells(mdir.parent)
        if any(matrix.cell_state(mdir.parent / c.id) in ("interrupted", "pending") for c in cells):
            candidates.append(mdir.parent)
    return max(candidates, key=lambda p: (p.name, p.stat().st_mtime)) if candidates else None


def continue_run(run_dir: Path, accept_changes: bool = False, root: Optional[Path] = None) -> int:
    """Resume one run from its last.pt, with the .config and overrides it was started with."""
    cfg_json = read_json(run_dir / "config.json")
    if cfg_json is None or not (run_dir / ".config").is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.json/.config)")
    pairs = [tuple(p) for p in cfg_json.get("overrides", {}).get("pairs", [])]
    return train_one(run_dir / ".config", pairs, run_dir=run_dir, resume=True, accept_changes=accept_changes,
                     root=root)


def continue_target(run: Path, rerun_failed: bool = False, accept_changes: bool = False,
                    root: Optional[Path] = None, launcher: Optional[str] = None,
                    launcher_set: Sequence[tuple[str, str]] = ()) -> int:
    """`make continue` on a run or matrix directory; the exit status. A matrix runs its
    unfinished cells where they ran before (or where ``launcher`` says), never while
    Slurm still holds a task of it."""
    root = root or ROOT
    print(f"continuing {run}", flush=True)
    if (run / "matrix.json").exists():
        from .run import matrix
        from .launch import slurm
        from .run.matrix import run as run_matrix

        extra = list(launcher_set) + ([("LAUNCHER", launcher)] if launcher else [])
        if slurm.is_slurm_matrix(run):
            slurm.refuse_if_active(run)
        cfg = slurm.matrix_config(run, extra)
        if cfg.launcher == "slurm":
            return slurm.run_matrix(run, cfg, rerun_failed=rerun_failed)
        jobs = cfg.matrix_jobs if any(matrix._symbol(k) == "MATRIX_JOBS" for k, _ in extra) else None
        return 1 if run_matrix(run, rerun_failed=rerun_failed, jobs=jobs, accept_changes=accept_changes,
                               root=root) else 0
    if launcher or launcher_set:
        raise ConfigError(f"{run} is a single run: it keeps the configuration it was created with; LAUNCHER= "
                          "and SET=\"SLURM_...\" on `make continue` are for a matrix")
    return continue_run(run, accept_changes, root)


def results_root(config: Optional[str], overrides: Sequence[str], set_text: str, default: Path) -> Path:
    """Where `status` and `continue` look: the results directory the configuration
    names (RUN_RESULTS_DIR, with SET=), else `default`."""
    if not config or not Path(config).is_file():
        return default
    pairs = parse_overrides(overrides, set_text)
    try:
        cfg, _, _ = load(Path(config), dict(pairs))
    except ConfigError as exc:
        if pairs:
            raise
        # A .config the current Kconfig refuses must not hide the runs to continue.
        print(f"note: {config} does not load ({str(exc)[:120]}); looking under {default}", file=sys.stderr)
        return default
    return results_path(cfg)


# ------------------------------------------------------------------ evaluate
def evaluate_run(run_dir: Path, data_dir: Optional[str] = None, dataset: Optional[str] = None) -> dict:
    from .run.evaluate import evaluate_run as evaluate

    return evaluate(run_dir, data_dir, dataset)


# ----------------------------------------------------------- direct scripts
def direct_main(model: str, argv: Sequence[str]) -> int:
    """`python <model>/train.py --flags`: the flags become overrides of the model's defconfig."""
    from .optim.adamwprune import BASES
    from .registry import OPTIMIZERS, PRUNERS, VARIANTS

    p = argparse.ArgumentParser(prog=f"{model}/train.py", description=f"Train {model} without Kconfig.")
    p.add_argument("--optimizer", help=", ".join(OPTIMIZERS))
    p.add_argument("--pruning-method", help=", ".join(
        n + (f" (needs {'/'.join(i.requires_optimizer)})" if i.requires_optimizer else "")
        for n, i in PRUNERS.items()))
    p.add_argument("--target-sparsity", type=float, help="fraction of prunable weights to zero, e.g. 0.7")
    p.add_argument("--adamwprune-base", help=", ".join(BASES))
    p.add_argument("--variant", help="AdamWPrune importance score: " + ", ".join(VARIANTS))
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-iters", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto, cpu, cuda")
    p.add_argument("--dataset", help="e.g. mnist, mnist_embedded, cifar10, text, synthetic")
    p.add_argument("--data-dir")
    p.add_argument("--results-dir")
    p.add_argument("--set", default="", help='any Kconfig symbols: --set "OPT_BETA2=0.99 RUN_AMP=n"')
    args = p.parse_args(argv)
    base = ROOT / model / "defconfigs" / model
    pairs: list[tuple[str, str]] = [] if base.is_file() else [("MODEL", model)]
    flag_map = [("optimizer", "OPTIMIZER"), ("adamwprune_base", "ADAMWPRUNE_BASE"),
                ("pruning_method", "PRUNING"), ("variant", "ADAMWPRUNE_VARIANT"),
                ("target_sparsity", "PRUNING_TARGET_SPARSITY"), ("epochs", "EPOCHS"),
                ("max_iters", "MAX_ITERS"), ("batch_size", "BATCH_SIZE"), ("lr", "LR"), ("seed", "SEED"),
                ("device", "DEVICE"), ("dataset", "DATASET"), ("data_dir", "DATA_DIR"),
                ("results_dir", "RUN_RESULTS_DIR")]
    pairs += [(sym, str(getattr(args, attr))) for attr, sym in flag_map if getattr(args, attr) is not None]
    pairs += list(parse_set(args.set).items())
    try:
        return train_one(base if base.is_file() else None, pairs)
    except _user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


# ---------------------------------------------------------------------- main
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m adamwprune")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train what .config describes")
    r.add_argument("--run-dir", type=Path)
    r.add_argument("--resume", action="store_true")
    r.add_argument("--accept-config-changes", action="store_true")
    d = sub.add_parser("dry-run", help="list the cells of the configured matrix")
    c = sub.add_parser("continue", help="resume the latest interrupted run")
    c.add_argument("--dir", type=Path, help="a run directory (default: the newest unfinished one)")
    c.add_argument("--rerun-failed", action="store_true", help="also rerun failed matrix cells")
    c.add_argument("--accept-config-changes", action="store_true",
                   help="resume although the current Kconfig resolves the run differently (recorded)")
    c.add_argument("--launcher", choices=("local", "slurm"), help="where a matrix's cells run (default: "
                   "where they ran)")
    st = sub.add_parser("status", help="state of every cell of the newest (or DIR) matrix")
    st.add_argument("--dir", type=Path)
    for q in (r, d, c, st):
        q.add_argument("--config", default=".config")
        q.add_argument("--override", action="append", default=[], help="NAME=value (shorthand or symbol)")
        q.add_argument("--set", default="", help='"SYMBOL=value SYMBOL2=value"')
    for q in (c, st):
        q.add_argument("--results", type=Path, help="where to look (default: RUN_RESULTS_DIR of --config)")
    e = sub.add_parser("evaluate", help="evaluate a run's best checkpoint")
    e.add_argument("--run", type=Path, required=True)
    e.add_argument("--dataset", help="another dataset of the same task (default: the run's)")
    e.add_argument("--data-dir")
    x = sub.add_parser("export", help="write a run's best model as safetensors, compressed, HF")
    x.add_argument("--run", type=Path, required=True)
    return p


def _is_launcher(key: str) -> bool:
    key = key.removeprefix("CONFIG_")
    return key == "LAUNCHER" or key.startswith(("LAUNCHER_", "SLURM_"))


def _results(args) -> Path:
    if args.results is not None:
        return args.results
    extra = [k for k, _ in parse_overrides(args.override, args.set)
             if k.removeprefix("CONFIG_") != "RUN_RESULTS_DIR" and not (args.cmd == "continue" and _is_launcher(k))]
    if extra:
        raise ConfigError(f"`make {args.cmd}` takes no training overrides ({', '.join(extra)}): a run keeps the "
                          "configuration it was created with; only SET=\"RUN_RESULTS_DIR=<dir>\" (where to look) applies")
    return results_root(args.config, args.override, args.set, ROOT / "results")


def _dispatch(args) -> int:
    if args.cmd == "run":
        if not Path(args.config).is_file():
            raise ConfigError(f"{args.config}: no configuration yet; run `make defconfig DEFCONFIG=<name>` "
                              "first (`make list-defconfigs` lists them)")
        return train(Path(args.config), parse_overrides(args.override, args.set), run_dir=args.run_dir,
                     resume=args.resume, accept_changes=args.accept_config_changes)
    if args.cmd == "dry-run":
        from .run.matrix import dry_run

        return dry_run(Path(args.config), parse_overrides(args.override, args.set))
    if args.cmd == "status":
        from .run.matrix import status
        from .run.rundir import latest_matrix

        results = None if args.dir else _results(args)
        mdir = args.dir or latest_matrix(results)
        if mdir is None:
            print(f"no matrix under {results}")
            return 0
        return status(mdir)
    if args.cmd == "continue":
        results = None if args.dir else _results(args)
        run = args.dir or find_unfinished(results)
        if run is None:
            print(f"nothing to continue: every run under {results} has finished")
            return 0
        # Everything but RUN_RESULTS_DIR (where to look) goes on: a matrix takes launcher
        # settings only (slurm.matrix_config says so in one line), a single run none.
        given = [(k, v) for k, v in parse_overrides(args.override, args.set)
                 if k.removeprefix("CONFIG_") != "RUN_RESULTS_DIR"]
        pairs = [(k, v) for k, v in given if k.removeprefix("CONFIG_") != "LAUNCHER"]
        launcher = args.launcher or next((v for k, v in given
                                          if k.removeprefix("CONFIG_") == "LAUNCHER"), None)
        return continue_target(run, args.rerun_failed, args.accept_config_changes,
                               launcher=launcher, launcher_set=pairs)
    if args.cmd == "export":
        from .export import export_run

        report = export_run(args.run)
        same = report["test_metric"]["all_equal"] and report["round_trip"]["decompressed_tensors_identical"]
        return 0 if same else 1
    evaluate_run(args.run, args.data_dir, args.dataset)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd in ("run", "continue") and os.environ.get("MAKELEVEL"):
        die_with_parent()  # started by make: a killed make takes its trainer with it
    try:
        with signals.catching():  # a stop signal is a flag the loops look at, never a traceback
            return _dispatch(args)
    except signals.Interrupted:
        return signals.EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("aborted by a second Ctrl-C: nothing was saved after the last checkpoint "
              "(`make continue` resumes from it)", file=sys.stderr)
        return 130
    except _user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exit_status(exc, args.cmd)
