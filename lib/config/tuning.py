"""Hyper-parameters tuned on validation before a seeded comparison (MATRIX_TUNED_FROM).

Comparing optimizers at one hand-picked learning rate measures the pick. So a study
first runs a small grid (a matrix with MATRIX_SWEEP, e.g. over OPT_LR, on dense runs,
one seed: presets `lenet5-lr-grid`, `gpt2-char-lr-grid`), then the comparison with
``MATRIX_TUNED_FROM=<that matrix>``: every cell of optimizer o on model m gets the
swept values of the dense (model m, optimizer o) configuration of the grid with the
best mean *validation* metric (the test metric never chooses). AdamWPrune takes the
values chosen for its base optimizer: ALGORITHMS.md's fair-comparison rules want a
base optimizer and AdamWPrune over it to resolve identical hyper-parameters.

MATRIX_TUNED_FROM is a matrix directory, or the name of the preset it was made from,
meaning the newest ``RUN_RESULTS_DIR/<timestamp>_<name>`` matrix. The grid must be
finished; a configuration whose runs all diverged or failed cannot be chosen. The
choice, the candidates and where they came from are stored in the comparison's
matrix.json (``tuning``) and shown in its summary.md.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .kconfig import ConfigError, resolve_path
from ..run.rundir import latest_matrix

Pairs = tuple[tuple[str, str], ...]


def resolve_dir(spec: str, results_dir: str) -> Path:
    """The tuning matrix MATRIX_TUNED_FROM names (a directory, or the newest matrix of a preset)."""
    path = resolve_path(spec)
    if (path / "matrix.json").is_file():
        return path
    results = resolve_path(results_dir)
    found = latest_matrix(results, spec)
    if found is None:
        raise ConfigError(f"MATRIX_TUNED_FROM={spec}: no tuning matrix there: neither a directory with a "
                          f"matrix.json nor a `{spec}` matrix under {results}; run the grid first "
                          f"(make defconfig DEFCONFIG={spec} && make) or set MATRIX_TUNED_FROM=\"\"")
    return found


def grid_rows(tuning_dir: Path) -> list[dict]:
    """The summary rows of the tuning matrix; an unfinished grid is an error."""
    from ..report import summary as S

    records = S.collect(tuning_dir)
    waiting = [r["id"] for r in records if r["status"] not in (S.COMPLETED, *S.FAILED_STATUSES)]
    if waiting:
        raise ConfigError(f"MATRIX_TUNED_FROM={tuning_dir}: the grid is not finished ({len(waiting)} of "
                          f"{len(records)} cells, e.g. {waiting[0]}); finish it with "
                          f"`make continue DIR={tuning_dir}` first")
    return S.summarize(records)


def best_per_group(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """Per (model, optimizer): the dense row with the best mean validation metric
    (the first in grid order on a tie); rows without a completed seed cannot win."""
    best: dict[tuple[str, str], dict] = {}
    for row in rows:
        if row["pruning"] != "none" or not row["n_seeds"] or row["val_mean"] is None:
            continue
        key = (row["model"], row["optimizer"])
        cur = best.get(key)
        sign = 1.0 if row["higher_is_better"] else -1.0
        if cur is None or sign * row["val_mean"] > sign * cur["val_mean"]:
            best[key] = row
    return best


def choices(tuning_dir: Path) -> dict[tuple[str, str], dict]:
    """(model, optimizer) -> {"values": pairs, "row": best row, "candidates": [rows]}."""
    rows = grid_rows(tuning_dir)
    best = best_per_group(rows)
    out = {}
    for key, row in best.items():
        cands = [r for r in rows if (r["model"], r["optimizer"]) == key and r["pruning"] == "none"]
        out[key] = {"values": tuple(tuple(p) for p in row["sweep"]), "row": row, "candidates": cands}
    return out


def tuned_for(cfg, table: dict, model: str, optimizer: str) -> Pairs:
    """The tuned (symbol, value) pairs of a cell of (model, optimizer)."""
    target = optimizer
    if optimizer == "adamwprune":
        if cfg.adamwprune_base is None:
            raise ConfigError("MATRIX_TUNED_FROM: AdamWPrune cells take their base optimizer's tuned values, "
                              "but the .config selects no AdamWPrune base; set OPTIMIZER=adamwprune and "
                              "ADAMWPRUNE_BASE=<base> in it")
        target = cfg.adamwprune_base
    if (model, target) not in table:
        raise ConfigError(f"MATRIX_TUNED_FROM={cfg.matrix_tuned_from}: the grid has no completed dense "
                          f"{model} + {target} run to take {optimizer}'s values from; add {target} to the grid")
    return table[(model, target)]["values"]


def load_table(cfg) -> Optional[tuple[Path, dict]]:
    """(tuning directory, choices) of cfg's MATRIX_TUNED_FROM, or None when unset."""
    if not getattr(cfg, "matrix_tuned_from", None):
        return None
    path = resolve_dir(cfg.matrix_tuned_from, cfg.results_dir)
    return path, choices(path)


def record(cfg) -> Optional[dict]:
    """What matrix.json stores about the tuning: where from, the choice and every candidate."""
    loaded = load_table(cfg)
    if loaded is None:
        return None
    path, table = loaded
    entries = []
    for (model, optimizer), c in table.items():
        row = c["row"]
        entries.append({"model": model, "optimizer": optimizer, "values": dict(c["values"]),
                        "metric_name": row["metric_name"], "higher_is_better": row["higher_is_better"],
                        "val_mean": row["val_mean"], "val_std": row["val_std"], "n_seeds": row["n_seeds"],
                        "candidates": [{"values": dict(r["sweep"]), "val_mean": r["val_mean"],
                                        "n_seeds": r["n_seeds"], "failed": r["failed"]}
                                       for r in c["candidates"]]})
    base = cfg.adamwprune_base
    return {"from": str(path), "spec": cfg.matrix_tuned_from, "rule": "best mean validation metric of the "
            "dense runs per (model, optimizer)", "adamwprune_uses": base, "choices": entries}
