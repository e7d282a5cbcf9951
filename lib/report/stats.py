"""Is a difference between two methods more than seed noise? (ShrinkBench's checklist)

Per (model, target sparsity), over the summary rows of `adamwprune.report.summary`:

* the best method is the one with the best mean *validation* metric (validation
  picks; the test metric never does);
* every other method is compared with it on the *test* metric by Welch's t-test
  (unequal variances, two-sided; ``scipy.stats.ttest_ind(equal_var=False)``) over
  the seeds: p-value, and a verdict that names a difference only at p < 0.05;
* the group names a winner only when the best method's test mean is better than
  every other method's, each at p < 0.05; otherwise "no significant winner";
* pruned methods are also compared with the best dense configuration of the model
  (chosen on validation too), the question "does pruning to s % cost anything?".

A test needs at least two seeds on each side and some spread; otherwise the p-value
is None and the reason is given.
"""
from __future__ import annotations

import math
from typing import Optional

ALPHA = 0.05


def welch(a: list[float], b: list[float]) -> tuple[Optional[float], Optional[str]]:
    """(two-sided p-value of Welch's t-test, None) or (None, why it cannot be computed)."""
    from scipy import stats

    a, b = [float(x) for x in a], [float(x) for x in b]
    if len(a) < 2 or len(b) < 2:
        return None, f"n < 2 (n = {len(a)} and {len(b)})"
    if max(a) == min(a) and max(b) == min(b):
        return None, "no spread (every seed gave the same value)"
    p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    if math.isnan(p):
        return None, "undefined"
    return p, None


def _better(x: float, y: float, higher: bool) -> bool:
    return x > y if higher else x < y


def _ranked(group: list[dict]) -> list[dict]:
    hib = bool(group[0]["higher_is_better"])
    return sorted(group, key=lambda r: r["val_mean"], reverse=hib)


def compare(best: dict, other: dict) -> dict:
    """Welch's test of `other` against `best` on the test metric, with a verdict."""
    p, why = welch(best["test_values"], other["test_values"])
    hib = bool(best["higher_is_better"])
    delta = (other["test_mean"] - best["test_mean"]) if None not in (other["test_mean"], best["test_mean"]) else None
    if p is None:
        verdict = f"not testable: {why}"
    elif p >= ALPHA:
        verdict = "no significant difference"
    elif _better(other["test_mean"], best["test_mean"], hib):
        verdict = "better on test (p < 0.05)"
    else:
        verdict = "worse (p < 0.05)"
    return {"p": p, "why": why, "delta": delta, "verdict": verdict}


def dense_best(rows: list[dict], model: str) -> Optional[dict]:
    dense = [r for r in rows if r["model"] == model and not r["target_sparsity"] and _usable(r)]
    return _ranked(dense)[0] if dense else None


def _usable(row: dict) -> bool:
    return bool(row["n_seeds"]) and row["val_mean"] is not None and row["test_mean"] is not None


def significance(rows: list[dict]) -> list[dict]:
    """One entry per (model, target sparsity): best on validation, each method against it."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if _usable(row):
            groups.setdefault((row["model"], row["target_sparsity"]), []).append(row)
    out = []
    for (model, target), group in sorted(groups.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        ranked = _ranked(group)
        best = ranked[0]
        dense = dense_best(rows, model) if target else None
        entries = []
        for row in ranked:
            entry = {"row": row, "is_best": row is best, "vs_best": None if row is best else compare(best, row),
                     "vs_dense": compare(dense, row) if dense is not None else None}
            entries.append(entry)
        others = [e["vs_best"] for e in entries if not e["is_best"]]
        wins = bool(others) and all(c["verdict"] == "worse (p < 0.05)" for c in others)
        out.append({"model": model, "target_sparsity": target, "metric_name": best["metric_name"],
                    "higher_is_better": best["higher_is_better"], "best": best["method"],
                    "winner": best["method"] if wins else None, "dense": dense["method"] if dense else None,
                    "entries": entries})
    return out


def annotate(rows: list[dict]) -> None:
    """Add each row's p-values to itself (for summary.csv): p_vs_best, verdict, p_vs_dense."""
    for group in significance(rows):
        for e in group["entries"]:
            row = e["row"]
            row["best_on_val"] = e["is_best"]
            row["p_vs_best"] = e["vs_best"]["p"] if e["vs_best"] else None
            row["verdict_vs_best"] = "best on validation" if e["is_best"] else e["vs_best"]["verdict"]
            row["p_vs_dense"] = e["vs_dense"]["p"] if e["vs_dense"] else None
