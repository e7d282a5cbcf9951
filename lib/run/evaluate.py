"""`make evaluate`: a run's best.pt on the test split of a dataset of the same task.

The model is rebuilt from the run's own config.json (never from whatever the
checkpoint says), the checkpoint must have been written by that run, and its
weight names must fit the model; each mismatch is one line. The result,
`<run>/eval.json`, names the model, the checkpoint, the dataset and data
directory evaluated, the number of examples, the loss and the metric.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from . import checkpoint as ckpt
from ..config import pinned
from ..config.kconfig import FIELDS, Config, ConfigError, load
from .locks import DirLock
from .rundir import read_json, write_json_atomic

# Datasets built in memory: a DATA_DIR given for them would be silently ignored.
DATASETS_WITHOUT_FILES = ("mnist_embedded", "synthetic")


def run_config(run_dir: Path) -> dict:
    stored = pinned.pinned(run_dir)
    if stored is None:
        raise ConfigError(f"{run_dir}: no config.json with a configuration (not a run directory; "
                          "`make status` lists runs)")
    return stored


def check_checkpoint_config(run_dir: Path, stored: dict, state: dict) -> None:
    """best.pt must come from this run: same model, same configuration (changes the
    run accepted on resume aside)."""
    theirs = state.get("config") or {}
    where = Path(run_dir) / "best.pt"
    if theirs.get("model") != stored.get("model"):
        raise ConfigError(f"{where}: holds a {theirs.get('model') or 'unknown'} checkpoint but the run's "
                          f"config.json is a {stored.get('model')} run; copy the run's own best.pt back "
                          "or evaluate the run the checkpoint came from")
    diffs = pinned.differences(stored, theirs)
    accepted = read_json(Path(run_dir) / "config.json").get("config_changes")
    if diffs and not accepted:
        raise ConfigError(f"{where}: was written by a different run ({pinned.describe(diffs[:4])}"
                          f"{', ...' if len(diffs) > 4 else ''}); copy the run's own best.pt back")


def eval_config(stored: dict, dataset: Optional[str], data_dir: Optional[str]):
    """The run's configuration with the dataset to evaluate; another dataset is
    split as its own defaults say (the validation size decides the embedded split)."""
    cfg = Config(**{f.name: stored.get(f.name) for f in FIELDS})
    dataset = dataset or cfg.dataset
    if data_dir and dataset in DATASETS_WITHOUT_FILES:
        raise ConfigError(f"DATA_DIR={data_dir}: dataset {dataset} reads no files (it is built in), so "
                          "DATA_DIR would be ignored; drop DATA_DIR or give DATASET= a dataset that reads files")
    changes = {"dataset": dataset}
    if dataset != cfg.dataset:
        changes["val_size"] = _dataset_defaults(cfg.model, dataset).val_size
    if data_dir:
        changes.update(data_dir=data_dir, data_download=False)
    return cfg.replace(**changes)


def _dataset_defaults(model: str, dataset: str):
    """The configuration of `model` on `dataset`; one line if the task has no such dataset."""
    try:
        return load(None, {"MODEL": model, "DATASET": dataset})[0]
    except ConfigError:
        kconf = load(None, {"MODEL": model})[2]
        valid = [s.name[len("DATASET_"):].lower() for s in kconf.named_choices["DATASET"].syms if s.visibility]
        raise ConfigError(f"DATASET={dataset}: not a dataset of the {model} task (valid: {', '.join(valid)})") from None


def evaluate_run(run_dir: Path, data_dir: Optional[str] = None, dataset: Optional[str] = None) -> dict:
    """Evaluate best.pt of `run_dir` on the test split of `dataset` (default: the
    run's) under `data_dir` (default: the run's); writes and returns eval.json."""
    from ..engine.tasks import load_task
    from ..engine.trainer import Trainer
    from ..engine.distributed import DistContext

    run_dir = Path(run_dir)
    state = ckpt.load(run_dir / "best.pt")
    stored = run_config(run_dir)
    check_checkpoint_config(run_dir, stored, state)
    cfg = eval_config(stored, dataset, data_dir)
    task = load_task(cfg.model)
    with DirLock(run_dir, "run directory"):
        sums = Trainer(task, cfg, run_dir, dist=DistContext()).evaluate_checkpoint(state["model"],
                                                                                  run_dir / "best.pt")
        loss, metric = task.finish_eval(sums)
        used_dir = None if cfg.dataset in DATASETS_WITHOUT_FILES else cfg.data_dir
        result = {"run": str(run_dir), "model": cfg.model, "checkpoint": str(run_dir / "best.pt"),
                  "checkpoint_step": state["step"], "dataset": cfg.dataset, "data_dir": used_dir,
                  "split": "test", "n_examples": int(sums["_examples"]), "loss": loss, "metric": metric,
                  "metric_name": task.metric_name, "test_loss": loss, "test_metric": metric}
        write_json_atomic(run_dir / "eval.json", result)
    where = f" under {used_dir}" if used_dir else " (built in)"
    print(f"{cfg.model} {task.metric_name} on the {cfg.dataset} test split{where}, {result['n_examples']:,} "
          f"examples: {metric:.2f} (loss {loss:.4f}); wrote {run_dir / 'eval.json'}")
    return result
