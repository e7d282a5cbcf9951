"""Command line of the project: `python -m adamwprune <command>` (the Makefile calls it).

  run       train what .config describes (plus make-line overrides)
  continue  resume the latest interrupted run (or DIR) from its last.pt
  evaluate  evaluate a run's best checkpoint on another copy of the dataset
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import checkpoint as ckpt
from . import signals
from .config import ROOT, ConfigError, load, parse_set
from .launch.slurm import SlurmError
from .matrix import MatrixBusy
from .rundir import new_run_path, read_json, run_name, write_json_atomic

EXIT_DIVERGED = 3


# --------------------------------------------------------------------- tasks
def load_task(model: str, root: Path = ROOT):
    """The TASK object of <root>/<model>/train.py."""
    path = root / model / "train.py"
    if not path.is_file():
        raise ConfigError(f"model {model!r} has no task file at {path}")
    spec = importlib.util.spec_from_file_location(f"adamwprune_task_{model}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TASK


def cell_id(cfg) -> str:
    """The run's name, as the matrix names its cells."""
    state = cfg.pruning == "state"
    return run_name(cfg.model, cfg.optimizer, cfg.pruning, cfg.target_sparsity or 0.0,
                    cfg.adamwprune_variant if state else None, cfg.seed)


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
          resume: bool = False) -> int:
    """`make`: a matrix when the config selects more than one cell, else one run."""
    from . import matrix

    cfg, _, _ = load(config_path, dict(overrides))
    slurm = bool(cfg.matrix) and cfg.launcher == "slurm"  # even one cell: a job array of one
    if run_dir is None and not resume and (matrix.is_matrix(cfg) or slurm):
        mdir = matrix.create(config_path, overrides, results_path(cfg))
        if slurm:
            from .launch.slurm import run_matrix as submit_matrix

            return submit_matrix(mdir, cfg)
        failed = matrix.run(mdir)
        return 1 if failed else 0
    if cfg.matrix:
        (cell,) = matrix.expand(cfg)  # a one-cell matrix is a single run of that cell
        overrides = list(cell.overrides) + list(overrides)
    return train_one(config_path, overrides, run_dir=run_dir, resume=resume)


def results_path(cfg) -> Path:
    p = Path(cfg.results_dir)
    return p if p.is_absolute() else ROOT / p


def train_one(config_path: Optional[Path], overrides: list[tuple[str, str]], run_dir: Optional[Path] = None,
              resume: bool = False, config_text: Optional[str] = None) -> int:
    """Train one run; returns the process exit status."""
    from .engine import STATUS_COMPLETED, STATUS_INTERRUPTED, Trainer

    cfg, _, kconf = load(config_path, dict(overrides))
    if config_text is None:
        config_text = Path(config_path).read_text() if config_path else _config_text(kconf)
    if run_dir is None:
        run_dir = new_run_path(results_path(cfg), cell_id(cfg))
    if cfg.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return _launch_torchrun(cfg.nproc, config_path, overrides, run_dir, resume, config_text)
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
        cfg_file.write_text(text)
    rdzv = os.environ.get("TORCHRUN_ARGS", "--standalone").split()
    cmd = [sys.executable, "-m", "torch.distributed.run", *rdzv, f"--nproc_per_node={nproc}",
           "-m", "adamwprune", "run", "--config", str(cfg_file), "--run-dir", str(run_dir)]
    cmd += [f"--override={k}={v}" for k, v in overrides]
    if resume:
        cmd.append("--resume")
    return _torchrun(cmd, run_dir)


def _torchrun(cmd: list, run_dir: Path) -> int:
    """Run torchrun until it exits. A stop signal is passed on to its workers (the
    terminal and Slurm signal them directly too: once or twice is the same request),
    and torchrun itself waits for them on SIGUSR2 as on SIGTERM instead of dying."""
    import psutil

    env = dict(os.environ)
    env.setdefault("TORCHELASTIC_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2")
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "300")  # time for rank 0 to write last.pt
    (run_dir / "stopped.json").unlink(missing_ok=True)
    with signals.catching() as stop:
        proc = subprocess.Popen(cmd, env=env)
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
    """The newest unfinished run directory or matrix directory under results/."""
    from . import matrix

    candidates = [p.parent for p in Path(results).glob("*/last.pt") if read_json(p.parent / "final.json") is None]
    for mdir in Path(results).glob("*/matrix.json"):
        _, cells = matrix.load_cells(mdir.parent)
        if any(matrix.cell_state(mdir.parent / c.id) in ("interrupted", "pending") for c in cells):
            candidates.append(mdir.parent)
    return max(candidates, key=lambda p: p.name) if candidates else None


def continue_run(run_dir: Path) -> int:
    """Resume one run from its last.pt, with the .config and overrides it was started with."""
    cfg_json = read_json(run_dir / "config.json")
    if cfg_json is None or not (run_dir / ".config").is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.json/.config)")
    pairs = [tuple(p) for p in cfg_json.get("overrides", {}).get("pairs", [])]
    return train_one(run_dir / ".config", pairs, run_dir=run_dir, resume=True)


def continue_matrix(mdir: Path, args) -> int:
    """Run the unfinished cells again, where they ran before (or where --launcher says);
    never while Slurm still holds a task of the matrix."""
    from .launch import slurm
    from .matrix import run as run_matrix

    extra = parse_overrides([], args.set) + ([("LAUNCHER", args.launcher)] if args.launcher else [])
    if slurm.is_slurm_matrix(mdir):
        slurm.refuse_if_active(mdir)
    cfg = slurm.matrix_config(mdir, extra)
    if cfg.launcher == "slurm":
        return slurm.run_matrix(mdir, cfg, rerun_failed=args.rerun_failed)
    return 1 if run_matrix(mdir, rerun_failed=args.rerun_failed) else 0


# ------------------------------------------------------------------ evaluate
def evaluate_run(run_dir: Path, data_dir: Optional[str]) -> dict:
    """Evaluate best.pt of a run on the test split found under data_dir."""
    import torch

    from .config import Config
    from .engine import Trainer

    state = ckpt.load(Path(run_dir) / "best.pt")
    cfg = Config(**state["config"])
    if data_dir:
        cfg = cfg.replace(data_dir=data_dir, data_download=False)
    task = load_task(cfg.model)
    trainer = Trainer(task, cfg, Path(run_dir))
    trainer.device = torch.device("cpu")
    trainer.data = task.build_data(cfg)
    trainer.model = task.build_model(cfg)
    trainer.model.load_state_dict(state["model"])
    import contextlib

    trainer.amp = contextlib.nullcontext()
    loss, metric = trainer.evaluate(trainer.data.test)
    result = {"run": str(run_dir), "checkpoint_step": state["step"], "data_dir": cfg.data_dir,
              "dataset": cfg.dataset, "test_loss": loss, "test_metric": metric,
              "metric_name": task.metric_name}
    write_json_atomic(Path(run_dir) / "eval.json", result)
    print(f"{task.metric_name} on {cfg.dataset} test split under {cfg.data_dir}: {metric:.2f} "
          f"(loss {loss:.4f}); wrote {Path(run_dir) / 'eval.json'}")
    return result


# ----------------------------------------------------------- direct scripts
def direct_main(model: str, argv: Sequence[str]) -> int:
    """`python <model>/train.py --flags`: the flags become overrides of the model's defconfig."""
    p = argparse.ArgumentParser(prog=f"{model}/train.py", description=f"Train {model} without Kconfig.")
    p.add_argument("--optimizer", help="sgd, adam, adamw, adamwadv, adamwspam, adamwprune")
    p.add_argument("--pruning-method", help="none, magnitude, movement, state (state needs adamwprune)")
    p.add_argument("--target-sparsity", type=float, help="fraction of prunable weights to zero, e.g. 0.7")
    p.add_argument("--adamwprune-base", help="adamw, adamwspam, adam, adamwadv")
    p.add_argument("--variant", help="AdamWPrune importance score: bitter0, bitter1, bitter2")
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
    except (ConfigError, FileNotFoundError, ValueError, ckpt.CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------------- main
def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m adamwprune")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train what .config describes")
    r.add_argument("--config", default=".config")
    r.add_argument("--override", action="append", default=[], help="NAME=value (shorthand or symbol)")
    r.add_argument("--set", default="", help='"SYMBOL=value SYMBOL2=value"')
    r.add_argument("--run-dir", type=Path)
    r.add_argument("--resume", action="store_true")
    c = sub.add_parser("continue", help="resume the latest interrupted run")
    c.add_argument("--dir", type=Path, help="a run directory (default: the newest unfinished one)")
    c.add_argument("--results", type=Path, default=ROOT / "results")
    c.add_argument("--rerun-failed", action="store_true", help="also rerun failed matrix cells")
    c.add_argument("--launcher", choices=("local", "slurm"), help="where a matrix's cells run (default: "
                   "where they ran)")
    c.add_argument("--set", default="", help='launcher settings, e.g. "SLURM_TIME_MIN=600"')
    d = sub.add_parser("dry-run", help="list the cells of the configured matrix")
    d.add_argument("--config", default=".config")
    d.add_argument("--override", action="append", default=[])
    d.add_argument("--set", default="")
    st = sub.add_parser("status", help="state of every cell of the newest (or DIR) matrix")
    st.add_argument("--dir", type=Path)
    st.add_argument("--results", type=Path, default=ROOT / "results")
    e = sub.add_parser("evaluate", help="evaluate a run's best checkpoint")
    e.add_argument("--run", type=Path, required=True)
    e.add_argument("--data-dir")
    args = p.parse_args(argv)
    try:
        with signals.catching():  # a stop signal is a flag the loops look at, never a traceback
            return _dispatch(args)
    except signals.Interrupted:
        return signals.EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("aborted by a second Ctrl-C: nothing was saved after the last checkpoint "
              "(`make continue` resumes from it)", file=sys.stderr)
        return 130
    except (ConfigError, FileNotFoundError, ValueError, ckpt.CheckpointError, MatrixBusy, SlurmError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _dispatch(args) -> int:
    """Run one command; errors are raised to main(), which prints them in one line."""
    if args.cmd == "run":
        if not Path(args.config).is_file():
            raise ConfigError(f"{args.config}: no configuration yet; run `make defconfig DEFCONFIG=<name>` "
                              "first (`make list-defconfigs` lists them)")
        return train(Path(args.config), parse_overrides(args.override, args.set),
                     run_dir=args.run_dir, resume=args.resume)
    if args.cmd == "dry-run":
        from .matrix import dry_run

        return dry_run(Path(args.config), parse_overrides(args.override, args.set))
    if args.cmd == "status":
        from .matrix import latest_matrix, status

        mdir = args.dir or latest_matrix(args.results)
        if mdir is None:
            print(f"no matrix under {args.results}")
            return 0
        return status(mdir)
    if args.cmd == "continue":
        run = args.dir or find_unfinished(args.results)
        if run is None:
            print(f"nothing to continue: every run under {args.results} has finished")
            return 0
        print(f"continuing {run}")
        if (run / "matrix.json").exists():
            return continue_matrix(run, args)
        if args.launcher or args.set.strip():
            raise ConfigError(f"{run} is a single run: LAUNCHER= and SET= on `make continue` are for a matrix")
        return continue_run(run)
    if args.cmd == "evaluate":
        evaluate_run(args.run, args.data_dir)
        return 0
    return 1
