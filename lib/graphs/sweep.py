"""The figure of a matrix with MATRIX_SWEEP axes: validation metric against each swept value.

One panel per swept symbol; a line per configuration without that symbol (method,
target sparsity and the other swept values), its points the mean validation metric
over seeds with ±1 std error bars. Per (model, optimizer), the dense configuration
that validation chooses (what MATRIX_TUNED_FROM would use) is ringed. Numeric
values spanning a factor of 10 or more get a log axis; other values are shown in
the order given.
"""
from __future__ import annotations

from . import figures as F
from . import style as G
from ..report import summary as S
from ..config.sweep import label
from ..config.tuning import best_per_group

LOG_SPAN = 10.0  # values spanning at least this factor are drawn on a log axis


def _numeric(values: list[str]):
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def _line_key(row: dict, symbol: str) -> str:
    others = tuple(p for p in row["sweep"] if p[0] != symbol)
    name = S.method_label({**row, "sweep": ()})
    name += "" if not row["target_sparsity"] else f" @ {100 * row['target_sparsity']:g}%"
    return f"{name} [{label(others)}]" if others else name


def _axis(ax, symbol: str, values: list[str]) -> dict[str, float]:
    """Positions of the values on the x axis (and the axis scale)."""
    nums = _numeric(values)
    if nums is None:
        ax.set_xticks(range(len(values)), values)
        return {v: float(i) for i, v in enumerate(values)}
    if min(nums) > 0 and max(nums) / min(nums) >= LOG_SPAN:
        ax.set_xscale("log")
    return dict(zip(values, nums))


def fig_sweep(d: F.ModelData) -> G.Drawn:
    rows = [r for r in d.rows if r.get("sweep")]
    if not rows:
        raise G.NotApplicable("no MATRIX_SWEEP axes")
    rows = [r for r in rows if r["val_mean"] is not None]
    if not rows:
        raise G.Skipped("no swept configuration has a completed run")
    symbols = list(dict.fromkeys(s for r in rows for s, _ in r["sweep"]))
    chosen = {id(r) for r in best_per_group(rows).values()}
    fig, axes = G.new_figure(len(symbols), sharey=True)
    lines = list(dict.fromkeys(_line_key(r, s) for s in symbols for r in rows))
    colors = G.palette(lines)
    for ax, symbol in zip(axes, symbols):
        values = list(dict.fromkeys(dict(r["sweep"])[symbol] for r in rows if symbol in dict(r["sweep"])))
        where = _axis(ax, symbol, values)
        for key in dict.fromkeys(_line_key(r, symbol) for r in rows):
            mine = sorted((r for r in rows if _line_key(r, symbol) == key),
                          key=lambda r: where[dict(r["sweep"])[symbol]])
            xs = [where[dict(r["sweep"])[symbol]] for r in mine]
            ax.errorbar(xs, [r["val_mean"] for r in mine], yerr=[r["val_std"] for r in mine], marker="o",
                        capsize=3, color=colors[key], label=key)
            picked = [(x, r["val_mean"]) for x, r in zip(xs, mine) if id(r) in chosen]
            if picked:
                ax.plot(*zip(*picked), linestyle="none", marker="o", markersize=14, markerfacecolor="none",
                        markeredgecolor="black", label="chosen on validation (dense)")
        ax.set(title=symbol, xlabel=symbol, ylabel=G.metric_label(d.metric, "validation"))
        if not d.higher_is_better:
            G.log_y(ax)
    G.figure_legend(fig, axes)
    fig.suptitle(f"{d.model}: best validation {d.metric} against the swept values (mean over seeds, ±1 std)",
                 wrap=True)
    return G.Drawn(f"{d.model}_sweep", "Validation metric against the swept values",
                   f"Best validation {d.metric} of each configuration against each MATRIX_SWEEP value "
                   "(mean over seeds, error bars ±1 std); the dense run that validation chooses per optimizer "
                   "is ringed.", fig)
