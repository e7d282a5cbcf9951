"""The sections of summary.md beyond the results table: significance, the grid, tuned values.

    significance_lines(rows)   per (model, sparsity): best on validation, every other
                               method against it by Welch's t-test on the test metric
                               (adamwprune.report.stats), with compression, FLOPs, memory, ms/step
    grid_lines(rows)           a matrix with MATRIX_SWEEP: every swept value and the one
                               validation chooses per (model, optimizer) among dense runs
    tuned_lines(meta)          a matrix with MATRIX_TUNED_FROM: which values its cells used,
                               where they came from, and the candidates they beat
    by_sparsity_lines(rows)    per model: one line per method, one column per target
                               sparsity, the test metric's mean ± std (n) in each
"""
from __future__ import annotations

from typing import Optional

from . import stats


def _s():
    from . import summary  # summary imports this module: import it when used

    return summary


def fmt_count(n) -> str:
    """1234567 -> '1.23 M'; None -> '–'."""
    if n is None:
        return "–"
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.3g}"


def fmt_p(p: Optional[float]) -> str:
    if p is None:
        return "–"
    return f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"


def _delta(c: Optional[dict]) -> str:
    return "–" if c is None or c["delta"] is None else f"{c['delta']:+.2f}"


def significance_lines(rows: list[dict]) -> list[str]:
    S = _s()
    groups = stats.significance(rows)
    lines = ["", "## Significance over seeds (Welch's t-test on the test metric)", "",
             "Per model and target sparsity, the best method is chosen on the mean *validation* metric; "
             "every other method is compared with it on the *test* metric by Welch's t-test over its seeds "
             f"(two-sided, unequal variances; scipy). A difference is named only at p < {stats.ALPHA}, and a "
             "winner only when the best method is better than every other one at that level. For pruned "
             "methods, `p vs dense` compares with the model's best dense configuration. Compression = "
             "prunable / non-zero prunable parameters; FLOPs are forward FLOPs per example "
             "(torch.utils.flop_counter), dense and with each layer scaled by its weight density."]
    if not groups:
        return lines + ["", "No completed runs yet."]
    header = ["method", "n", "val (mean ± std)", "test (mean ± std)", "Δ test vs best", "p vs best", "verdict",
              "p vs dense", "compression", "FLOPs/example dense", "FLOPs/example non-zero", "peak MiB", "ms/step"]
    for g in groups:
        verdict = f"winner: **{g['winner']}**" if g["winner"] else "no significant winner"
        lines += ["", f"### {g['model']}, {S.fmt_pct(g['target_sparsity'])} target sparsity: {verdict}", "",
                  f"Best on validation: {g['best']}" + (f"; dense reference: {g['dense']}." if g["dense"] else "."),
                  ""]
        body = []
        for e in g["entries"]:
            r, vb, vd = e["row"], e["vs_best"], e["vs_dense"]
            body.append([r["method"], str(r["n_seeds"]), S.fmt_pm(r["val_mean"], r["val_std"]),
                         S.fmt_pm(r["test_mean"], r["test_std"]), _delta(vb), fmt_p(vb["p"]) if vb else "–",
                         "best on validation" if e["is_best"] else vb["verdict"],
                         ("n/a" if vd["p"] is None else fmt_p(vd["p"])) if vd else "–",
                         "–" if r["compression_ratio"] is None else f"{r['compression_ratio']:.2f}x",
                         fmt_count(r["flops_per_example"]), fmt_count(r["flops_per_example_nonzero"]),
                         S.fmt_num(r["peak_mib"], 1), S.fmt_num(r["step_ms"], 1)])
        lines += S._table(header, body)
    return lines


def _unswept(row: dict) -> str:
    return _s().method_label({**row, "sweep": ()})


def grid_lines(rows: list[dict]) -> list[str]:
    """The swept values of every configuration; per (model, optimizer), the dense one chosen."""
    from ..config.sweep import label
    from ..config.tuning import best_per_group

    swept = [r for r in rows if r.get("sweep")]
    if not swept:
        return []
    S = _s()
    chosen = {id(r) for r in best_per_group(swept).values()}
    lines = ["", "## Hyper-parameter grid (MATRIX_SWEEP)", "",
             "Every swept combination. Among the dense runs of each (model, optimizer), the one with the best "
             "mean validation metric is marked: it is what a comparison with MATRIX_TUNED_FROM=<this matrix> "
             "uses (AdamWPrune takes its base optimizer's).", ""]
    body = [[str(r["model"]), _unswept(r), S.fmt_pct(r["target_sparsity"]), label(r["sweep"]), str(r["n_seeds"]),
             str(r["failed"]), S.fmt_pm(r["val_mean"], r["val_std"]), S.fmt_pm(r["test_mean"], r["test_std"]),
             "**chosen**" if id(r) in chosen else ""] for r in swept]
    return lines + S._table(["model", "method", "target sparsity", "swept values", "seeds", "failed",
                             "val (mean ± std)", "test (mean ± std)", "choice"], body)


def tuned_lines(meta: Optional[dict]) -> list[str]:
    tuning = (meta or {}).get("tuning")
    if not tuning:
        return []
    S = _s()
    lines = ["", "## Hyper-parameters tuned on validation (MATRIX_TUNED_FROM)", "",
             f"Taken from `{tuning['from']}` (MATRIX_TUNED_FROM={tuning['spec']}): {tuning['rule']}. "
             f"AdamWPrune cells use the values chosen for their base optimizer "
             f"({tuning.get('adamwprune_uses') or 'none selected'}), so a base and AdamWPrune over it train "
             "with the same hyper-parameters.", ""]
    body = []
    for c in tuning["choices"]:
        cands = "; ".join(f"{' '.join(f'{k}={v}' for k, v in x['values'].items())}: "
                          f"{S.fmt_num(x['val_mean'])}" + (" (failed)" if x["failed"] and not x["n_seeds"] else "")
                          for x in c["candidates"])
        body.append([str(c["model"]), c["optimizer"], " ".join(f"{k}={v}" for k, v in c["values"].items()),
                     f"{c['metric_name']} {S.fmt_pm(c['val_mean'], c['val_std'])}", cands])
    return lines + S._table(["model", "optimizer", "values used", "validation of the choice",
                             "candidates (validation mean)"], body)


def by_sparsity_lines(rows: list[dict]) -> list[str]:
    """Per model, the test metric (mean ± std over the completed seeds, n) of every method at
    every target sparsity of the matrix; dense methods in the 0 % column."""
    S = _s()
    models = list(dict.fromkeys(r["model"] for r in rows if r["n_seeds"]))
    if len(models) == 0 or len({r["target_sparsity"] for r in rows}) < 2:
        return []
    lines = ["", "## Test metric by method and target sparsity", "",
             "The test metric at the best validation step, mean ± std over the completed seeds (n); the "
             "significance of each difference is in the section above."]
    for model in models:
        mine = [r for r in rows if r["model"] == model and r["n_seeds"]]
        targets = sorted({r["target_sparsity"] or 0.0 for r in mine})
        methods = list(dict.fromkeys(r["method"] for r in mine))
        cell = {(r["method"], r["target_sparsity"] or 0.0): r for r in mine}
        metric = next((r["metric_name"] for r in mine if r["metric_name"]), "metric")
        body = []
        for m in methods:
            line = [m]
            for t in targets:
                r = cell.get((m, t))
                line.append("" if r is None else f"{S.fmt_pm(r['test_mean'], r['test_std'])} ({r['n_seeds']})")
            body.append(line)
        lines += ["", f"### {model}: test {metric}", ""]
        lines += S._table(["method"] + [S.fmt_pct(t) for t in targets], body)
    return lines


def extra_sections(rows: list[dict], meta: Optional[dict] = None) -> list[str]:
    return significance_lines(rows) + by_sparsity_lines(rows) + grid_lines(rows) + tuned_lines(meta)
