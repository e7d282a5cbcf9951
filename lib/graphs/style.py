"""Figure style and the drawing helpers every figure uses (panels, legends, mean curves, Pareto front)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Union

import matplotlib as mpl
import matplotlib.ticker
from matplotlib.figure import Figure

from ..report import summary as S


STYLE = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 9,
         "xtick.labelsize": 10, "ytick.labelsize": 10, "figure.titlesize": 13,
         "axes.grid": True, "grid.alpha": 0.3, "savefig.dpi": 110}
PANEL = (5.6, 4.0)   # inches per panel: 11 pt text stays readable at savefig.dpi
MAX_COLUMNS = 3
PER_MIB = 100        # "accuracy per 100 MiB": a LeNet-5 run is a few hundred MiB of RSS
ROW_INCH, MARGIN_INCH = 0.45, 1.5   # bar charts grow with the number of configurations
SINGLE_WIDTH = 1.4   # a one-panel figure is this many panels wide
RUN_FIGSIZE = (7.3, 6.4)  # plot_run: two stacked panels sharing the step axis
BAND_ALPHA = 0.2
MEMORY_LABELS = {"process_gpu": "GPU memory held by the process",
                 "device_used": "GPU memory used on the device",
                 "process_rss": "resident memory of the process"}
PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class Drawn:
    name: str        # file stem, "<model>_<figure>"
    title: str
    caption: str     # one sentence for report.md
    figure: Figure


class Skipped(Exception):
    """A figure whose data is absent; the message says what is missing."""


class NotApplicable(Skipped):
    """A figure that does not concern this model at all; not listed as skipped."""


# ------------------------------------------------------------------ helpers
def metric_label(metric: Optional[str], what: str) -> str:
    unit = S.METRIC_UNITS.get(metric or "")
    name = f"{what} {metric or 'metric'}".strip()
    return f"{name} ({unit})" if unit else name


def sparsity_title(target: float) -> str:
    return "dense (no pruning)" if not target else f"target sparsity {100 * target:g}%"


def config_label(row: dict) -> str:
    if not row["target_sparsity"]:
        return f"{row['method']} (dense)"
    return f"{row['method']} @ {100 * row['target_sparsity']:g}%"


def palette(methods: list[str]) -> dict[str, tuple]:
    """A colour per method; beyond ten, tab20's dark shades first so neighbours differ in hue."""
    if len(methods) <= len(mpl.colormaps["tab10"].colors):
        colors = mpl.colormaps["tab10"].colors
    else:
        pairs = mpl.colormaps["tab20"].colors
        colors = pairs[::2] + pairs[1::2]
    return {m: colors[i % len(colors)] for i, m in enumerate(methods)}


def new_figure(panels: int, sharey: bool = False) -> tuple[Figure, list]:
    cols = min(panels, MAX_COLUMNS)
    rows = math.ceil(panels / cols)
    # one panel gets some extra width so the figure title fits beside its legend
    fig = Figure(figsize=(PANEL[0] * max(cols, SINGLE_WIDTH), PANEL[1] * rows), layout="constrained")
    axes = list(fig.subplots(rows, cols, squeeze=False, sharey=sharey).flat)
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes[:panels]


def bar_figure(bars: int) -> tuple[Figure, object]:
    """A wide single panel for horizontal bars with long configuration labels."""
    height = max(PANEL[1], ROW_INCH * bars + MARGIN_INCH)
    fig = Figure(figsize=(2 * PANEL[0], height), layout="constrained")
    return fig, fig.subplots()


def figure_legend(fig: Figure, axes: list) -> None:
    """One legend under the panels, each label once."""
    seen: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="outside lower center",
                   ncols=min(len(seen), MAX_COLUMNS))


def side_legend(fig: Figure, ax) -> None:
    """A one-panel figure's legend, each label once, right of the panel so it hides no point."""
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    fig.legend(list(unique.values()), list(unique), loc="outside right upper")


def mean_curve(runs: list[dict], key: str) -> tuple[list, list, list]:
    """Steps, mean and sample std over runs of metrics-row `key` (each step over the runs that have it)."""
    by_step: dict[int, list[float]] = {}
    for run in runs:
        for row in run["rows"]:
            if row.get(key) is not None:
                by_step.setdefault(row["step"], []).append(row[key])
    steps = sorted(by_step)
    stats = [S.mean_std(by_step[s]) for s in steps]
    return steps, [m for m, _ in stats], [sd for _, sd in stats]


def log_y(ax) -> None:
    """Log scale for perplexity, with plain numbers on the ticks (9, not 9x10^0)."""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(mpl.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    # labels some minor ticks only when the axis spans few decades, as matplotlib's default
    ax.yaxis.set_minor_formatter(mpl.ticker.LogFormatter(labelOnlyBase=False))


def plot_mean(ax, runs: list[dict], key: str, label: str, scale: float = 1.0, **style) -> None:
    steps, mean, std = mean_curve(runs, key)
    if not steps:
        return
    mean = [scale * m for m in mean]
    line, = ax.plot(steps, mean, label=label, **style)
    if len(runs) > 1:
        ax.fill_between(steps, [m - scale * s for m, s in zip(mean, std)],
                        [m + scale * s for m, s in zip(mean, std)], color=line.get_color(),
                        alpha=BAND_ALPHA, linewidth=0)


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """Indices of the points no other point beats on both memory (lower) and metric.

    Sorted by memory; a point is on the front when its metric is strictly better
    than that of every point using no more memory.
    """
    sign = 1.0 if higher_is_better else -1.0
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -sign * points[i][1]))
    front, best = [], None
    for i in order:
        score = sign * points[i][1]
        # a tolerance: means of equal accuracies differ in the last bits (92.8 vs 92.80000000000001)
        if best is None or score > best + 1e-9 * max(1.0, abs(best)):
            front.append(i)
            best = score
    return front
