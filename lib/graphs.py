"""Figures of a matrix of runs, or of one run, always drawn from the run directories.

    update_graphs(dir)        every figure of a matrix into <dir>/graphs/, copied to
                              images/<model>/, plus <dir>/graphs/report.md
    plot_run(run_dir, png)    one run: metric and sparsity against step

Per model, a figure is drawn only when the runs hold the data for it (a matrix
with one target sparsity has no "metric against sparsity" figure); report.md
says which were skipped and why. Matplotlib is used without pyplot (Figure +
the Agg canvas), so nothing global changes and no display is needed; the same
data gives byte-identical PNGs.

Run ``python -m adamwprune.graphs [DIR]`` for a matrix (default: the newest under
results/) or ``python -m adamwprune.graphs --run [RUN_DIR] [--out PNG]`` for one run.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import matplotlib as mpl
import matplotlib.ticker
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from . import summary as S
from . import summary_sections as sections
from .atomic import write_file_atomic, write_text_atomic
from .monitor import METRICS, read_timeline, sample_metrics
from .rundir import read_json, read_jsonl

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


# ------------------------------------------------------------- the figures
@dataclass
class ModelData:
    """The runs (records plus metrics rows) and summary rows of one model."""

    model: str
    runs: list[dict]
    rows: list[dict]
    colors: dict[str, tuple]

    @property
    def metric(self) -> Optional[str]:
        return next((r["metric_name"] for r in self.rows if r["metric_name"]), None)

    @property
    def higher_is_better(self) -> bool:
        return bool(next((r["higher_is_better"] for r in self.rows if r["metric_name"]), True))

    def configs(self, runs: Optional[list[dict]] = None) -> list[tuple[str, list[dict]]]:
        """(method, runs) per configuration, in matrix order."""
        groups = S.group_records(r for r in (self.runs if runs is None else runs) if r["rows"])
        return [(self.label(g[0]), g) for g in groups.values()]

    def label(self, run: dict) -> str:
        """The method's name as in the summary rows (one name per configuration)."""
        key = S.config_key(run)
        return next((r["method"] for r in self.rows if S.config_key(r) == key), S.method_label(run))

    def targets(self) -> list[float]:
        return sorted({r["target_sparsity"] for r in self.runs if r["rows"] and r["target_sparsity"]})

    def dense(self) -> list[dict]:
        return [r for r in self.runs if r["rows"] and not r["target_sparsity"]]


def fig_val_curves(d: ModelData) -> Drawn:
    if not any(r["rows"] for r in d.runs):
        raise Skipped("no run has evaluated yet (metrics.jsonl empty)")
    targets = d.targets() or [0.0]
    fig, axes = new_figure(len(targets))
    dense = d.dense()
    for ax, target in zip(axes, targets):
        for method, runs in d.configs([r for r in d.runs if r["target_sparsity"] == target]):
            plot_mean(ax, runs, "val_metric", method, color=d.colors[method])
        if target:
            for method, runs in d.configs(dense):
                plot_mean(ax, runs, "val_metric", f"{method} (dense)", color=d.colors[method],
                          linestyle="--")
        ax.set(title=sparsity_title(target), xlabel="optimizer step",
               ylabel=metric_label(d.metric, "validation"))
        if not d.higher_is_better:
            log_y(ax)
    figure_legend(fig, axes)
    fig.suptitle(f"{d.model}: validation {d.metric} during training (mean over seeds, band ±1 std)",
                 wrap=True)
    return Drawn(f"{d.model}_val_curves", "Validation metric against step",
                 f"Validation {d.metric} against optimizer step for each method, one panel per target "
                 "sparsity (mean over seeds with a ±1 std band; the dense baseline dashed).", fig)


def fig_final_vs_sparsity(d: ModelData) -> Drawn:
    pruned = [r for r in d.rows if r["target_sparsity"] and r["test_mean"] is not None]
    if len({r["target_sparsity"] for r in pruned}) < 2:
        raise Skipped("fewer than two target sparsities with completed runs")
    fig, (ax,) = new_figure(1)
    for method in dict.fromkeys(r["method"] for r in pruned):
        rs = sorted((r for r in pruned if r["method"] == method), key=lambda r: r["target_sparsity"])
        ax.errorbar([100 * r["target_sparsity"] for r in rs], [r["test_mean"] for r in rs],
                    yerr=[r["test_std"] for r in rs], label=method, color=d.colors[method],
                    marker="o", capsize=4)
    for r in (r for r in d.rows if not r["target_sparsity"] and r["test_mean"] is not None):
        ax.axhline(r["test_mean"], color=d.colors[r["method"]], linestyle="--",
                   label=f"{r['method']} (dense)")
    ax.set(title=f"{d.model}: final {d.metric} against sparsity", xlabel="target sparsity (%)",
           ylabel=metric_label(d.metric, "test") + " at best validation step")
    side_legend(fig, ax)
    return Drawn(f"{d.model}_final_vs_sparsity", "Final metric against target sparsity",
                 f"Test {d.metric} at the best validation step against target sparsity per method "
                 "(mean over seeds, error bars ±1 std; the dense baseline dashed).", fig)


def fig_sparsity_schedule(d: ModelData) -> Drawn:
    targets = d.targets()
    if not targets:
        raise Skipped("no pruned run has evaluated yet")
    fig, axes = new_figure(len(targets), sharey=True)
    for ax, target in zip(axes, targets):
        for method, runs in d.configs([r for r in d.runs if r["target_sparsity"] == target]):
            for run in runs:
                steps = [row["step"] for row in run["rows"]]
                ax.plot(steps, [100 * row["sparsity"] for row in run["rows"]], color=d.colors[method],
                        marker=".", alpha=0.8, label=method)
        ax.axhline(100 * target, color="black", linestyle=":", label="target")
        ax.set(title=sparsity_title(target), xlabel="optimizer step",
               ylabel="measured sparsity of prunable weights (%)")
    figure_legend(fig, axes)
    fig.suptitle(f"{d.model}: sparsity measured from the weights at each evaluation (every seed)", wrap=True)
    return Drawn(f"{d.model}_sparsity_schedule", "Measured sparsity against step",
                 "Sparsity measured from the weights against optimizer step for every run, one panel per "
                 "target sparsity: methods on the same ramp lie on one curve.", fig)


def _memory_rows(d: ModelData) -> list[dict]:
    return [r for r in d.rows if r["peak_mib"] is not None]


def _memory_source(d: ModelData) -> str:
    return ", ".join(sorted({r["memory_source"] for r in d.rows if r["memory_source"]})) or "final.json"


def _rss_only(rows: list[dict]) -> bool:
    """CPU runs: the memory is the process's resident set (torch and Python included),
    noise next to the differences between methods (S.is_process_rss)."""
    return bool(rows) and all(S.is_process_rss(r) for r in rows)


def _memory_axis(rows: list[dict], what: str = "memory") -> str:
    return f"{what} (process RSS, MiB)" if _rss_only(rows) else f"{what} (MiB)"


def fig_memory_bars(d: ModelData) -> Drawn:
    rows = _memory_rows(d)
    if not rows:
        raise Skipped("no completed run recorded its memory")
    series = [("peak", "peak_mib"), ("mean", "mean_mib")]
    if any(r["allocator_peak_mib"] is not None for r in rows):
        series.append(("CUDA allocator peak", "allocator_peak_mib"))
    height = 1.0 / (len(series) + 1)
    fig, ax = bar_figure(len(rows))
    for k, (name, key) in enumerate(series):
        ys = [i + (k - (len(series) - 1) / 2) * height for i in range(len(rows))]
        bars = ax.barh(ys, [r[key] or 0.0 for r in rows], height=height, label=name)
        ax.bar_label(bars, labels=[S.fmt_num(r[key], 1) for r in rows], padding=3,
                     fontsize=STYLE["legend.fontsize"])
    ax.set_yticks(range(len(rows)), [config_label(r) for r in rows])
    ax.invert_yaxis()
    ax.set(title=f"{d.model}: memory during training ({_memory_source(d)}), mean over seeds",
           xlabel=_memory_axis(rows))
    ax.margins(x=0.1)
    fig.legend(loc="outside lower center", ncols=len(series))
    return Drawn(f"{d.model}_memory_bars", "Peak and mean memory per configuration",
                 "Peak and mean memory sampled during training for each configuration, in MiB "
                 "(mean over completed seeds).", fig)


def _timeline_runs(d: ModelData) -> list[dict]:
    """Per method, its lowest seed at its highest target sparsity that has a memory timeline."""
    chosen: dict[str, dict] = {}
    for run in (r for r in d.runs if r["timeline"] is not None):
        current = chosen.get(d.label(run))
        if current is None or _timeline_rank(run) < _timeline_rank(current):
            chosen[d.label(run)] = run
    return list(chosen.values())


def _timeline_rank(run: dict) -> tuple:
    """Completed runs first, then the highest target sparsity, then the lowest seed."""
    seed = run["seed"] if run["seed"] is not None else math.inf
    return run["status"] != S.COMPLETED, -run["target_sparsity"], seed


def _timeline_series(run: dict) -> tuple[list[float], list[float], list[str], str]:
    samples = read_timeline(run["timeline"])
    if not samples:
        return [], [], [], None
    wanted = (run["memory_source"] or "").split("/")[-1]
    present = [m for m in METRICS if any(m in sample_metrics(s) for s in samples)]
    metric = wanted if wanted in present else (present[0] if present else None)
    use_wall = all(s.get("wall") is not None for s in samples)
    t0 = samples[0]["wall"] if use_wall else samples[0]["t"]
    xs, ys, phases = [], [], []
    for s in samples:
        value = sample_metrics(s).get(metric)
        if value is not None:
            xs.append((s["wall"] if use_wall else s["t"]) - t0)
            ys.append(value / S.MIB)
            phases.append(s.get("phase") or "?")
    return xs, ys, phases, metric


def _shade_phases(ax, xs: list[float], phases: list[str], colors: dict[str, tuple]) -> None:
    start = 0
    for i in range(1, len(xs) + 1):
        if i == len(xs) or phases[i] != phases[start]:
            ax.axvspan(xs[start], xs[min(i, len(xs) - 1)], color=colors[phases[start]], alpha=0.5,
                       linewidth=0)
            start = i


def fig_memory_timeline(d: ModelData) -> Drawn:
    runs = _timeline_runs(d)
    series = [(run, *_timeline_series(run)) for run in runs]
    series = [s for s in series if s[1]]
    if not series:
        raise Skipped("no memory.jsonl with samples")
    phase_names = list(dict.fromkeys(p for s in series for p in s[3]))
    shades = dict(zip(phase_names, mpl.colormaps["Pastel2"].colors))
    fig, axes = new_figure(len(series), sharey=True)
    for ax, (run, xs, ys, phases, metric) in zip(axes, series):
        _shade_phases(ax, xs, phases, shades)
        method = d.label(run)
        ax.plot(xs, ys, color=d.colors[method], marker=".", markersize=3)
        ax.set(title=f"{method}\n{sparsity_title(run['target_sparsity'])}, seed {run['seed']}",
               xlabel="time since start (s)", ylabel=f"{MEMORY_LABELS.get(metric, metric)} (MiB)")
    fig.legend([Patch(color=shades[p], alpha=0.5) for p in phase_names],
               [f"phase: {p}" for p in phase_names], loc="outside lower center", ncols=len(phase_names))
    fig.suptitle(f"{d.model}: memory timeline of the first seed of each method", wrap=True)
    return Drawn(f"{d.model}_memory_timeline", "Memory timelines",
                 "Sampled memory against time for the lowest seed of each method at its highest target "
                 "sparsity, with the set-up, training and evaluation phases shaded.", fig)


def fig_memory_vs_metric(d: ModelData) -> Drawn:
    rows = [r for r in _memory_rows(d) if r["test_mean"] is not None]
    if len(rows) < 2:
        raise Skipped("fewer than two configurations with both memory and a test metric")
    fig, (ax,) = new_figure(1)
    for r in rows:
        ax.errorbar(r["peak_mib"], r["test_mean"], yerr=r["test_std"], color=d.colors[r["method"]],
                    marker="o", capsize=3, linestyle="none", label=r["method"])
        ax.annotate(f"{100 * r['target_sparsity']:g}%", (r["peak_mib"], r["test_mean"]),
                    textcoords="offset points", xytext=(5, 5), fontsize=STYLE["legend.fontsize"])
    better = "higher" if d.higher_is_better else "lower"
    if _rss_only(rows):  # no frontier drawn from noise
        note = ("memory is the CPU process's resident set (torch and Python included), so no Pareto "
                "frontier is drawn: compare bytes per parameter instead.")
    else:
        points = [(r["peak_mib"], r["test_mean"]) for r in rows]
        front = [rows[i] for i in pareto_front(points, d.higher_is_better)]
        ax.plot([r["peak_mib"] for r in front], [r["test_mean"] for r in front], color="black",
                linestyle="--", drawstyle="steps-post", marker="o", markerfacecolor="none",
                markersize=12, label="Pareto frontier")
        note = f"the dashed line joins the configurations no other beats on both lower memory and {better} {d.metric}."
    ax.set(title=f"{d.model}: peak memory against final {d.metric}", xlabel=_memory_axis(rows, "peak memory"),
           ylabel=metric_label(d.metric, "test") + " at best validation step")
    side_legend(fig, ax)
    return Drawn(f"{d.model}_memory_vs_metric", "Memory against metric",
                 f"Peak memory against test {d.metric} per configuration (labels give the target "
                 f"sparsity); {note}", fig)


def fig_metric_per_mib(d: ModelData) -> Drawn:
    if not d.higher_is_better:
        raise Skipped(f"{d.metric} is lower-is-better; a ratio to memory has no meaning")
    rows = [r for r in _memory_rows(d) if r["test_mean"] is not None and r["peak_mib"]]
    if not rows:
        raise Skipped("no configuration with both memory and a test metric")
    if _rss_only(rows):
        raise Skipped("memory is the CPU process's resident set, not the method's cost; a ratio to it is noise")
    fig, ax = bar_figure(len(rows))
    values = [r["test_mean"] / (r["peak_mib"] / PER_MIB) for r in rows]
    bars = ax.barh(range(len(rows)), values, color=[d.colors[r["method"]] for r in rows])
    ax.bar_label(bars, fmt="{:.3g}", padding=3, fontsize=STYLE["legend.fontsize"])
    ax.margins(x=0.1)
    ax.set_yticks(range(len(rows)), [config_label(r) for r in rows])
    ax.invert_yaxis()
    unit = S.METRIC_UNITS.get(d.metric or "", "")
    ax.set(title=f"{d.model}: test {d.metric} per {PER_MIB} MiB of peak memory",
           xlabel=f"test {d.metric} per {PER_MIB} MiB of peak memory ({unit} / {PER_MIB} MiB)")
    return Drawn(f"{d.model}_metric_per_{PER_MIB}mib", f"{d.metric} per {PER_MIB} MiB",
                 f"Test {d.metric} divided by peak memory in units of {PER_MIB} MiB for each configuration "
                 "(mean over seeds): how much of the metric each MiB buys.", fig)


def against_base(runs: list[dict]) -> list[dict]:
    """AdamWPrune's runs whose pruner has a baseline (registry ``PrunerInfo.baseline``), and
    the runs of that baseline over the same base optimizer with the same pattern."""
    from .registry import PRUNERS

    ours = [r for r in runs if r["optimizer"] == "adamwprune" and r["pruning"] in PRUNERS
            and PRUNERS[r["pruning"]].baseline and r.get("base")]
    pairs = {(r["base"], PRUNERS[r["pruning"]].baseline, r.get("pattern")) for r in ours}
    theirs = [r for r in runs if (r["optimizer"], r["pruning"], r.get("pattern")) in pairs]
    return theirs + ours if theirs else []


def fig_adamwprune_vs_base(d: ModelData) -> Drawn:
    runs = [r for r in against_base(d.runs) if r["rows"] and r["target_sparsity"]]
    if not runs:
        raise Skipped("needs AdamWPrune and its base optimizer with the matching pruner "
                      "(e.g. AdamWSpam + magnitude and AdamWPrune[adamwspam] + state)")
    targets = sorted({r["target_sparsity"] for r in runs})
    fig, axes = new_figure(len(targets), sharey=True)
    for ax, target in zip(axes, targets):
        for method, group in d.configs([r for r in runs if r["target_sparsity"] == target]):
            plot_mean(ax, group, "val_metric", method, color=d.colors[method])
        ax.set(title=sparsity_title(target), xlabel="optimizer step",
               ylabel=metric_label(d.metric, "validation"))
        if not d.higher_is_better:
            log_y(ax)
    figure_legend(fig, axes)
    fig.suptitle(f"{d.model}: AdamWPrune's importance scores against its base optimizer's pruner", wrap=True)
    return Drawn(f"{d.model}_adamwprune_vs_base", "AdamWPrune against its base optimizer's pruner",
                 f"{d.model} validation {d.metric} against step for each AdamWPrune variant and its base "
                 "optimizer with the pruner that selects the same way (magnitude for state pruning, RigL "
                 "for regrow), one panel per target sparsity (mean over seeds).", fig)


FIGURES: tuple[Callable[[ModelData], Drawn], ...] = (
    fig_val_curves, fig_final_vs_sparsity, fig_sparsity_schedule, fig_memory_bars,
    fig_memory_timeline, fig_memory_vs_metric, fig_metric_per_mib, fig_adamwprune_vs_base)


# ------------------------------------------------------------------ drawing
def all_figures() -> tuple[Callable[[ModelData], Drawn], ...]:
    """FIGURES and the MATRIX_SWEEP figure (graphs_sweep imports this module, hence here)."""
    from .graphs_sweep import fig_sweep

    return (*FIGURES, fig_sweep)


def load_runs(records: list[dict]) -> list[dict]:
    """Records with their metrics rows and the path of a non-empty memory.jsonl (or None).

    Read on every call, never cached, so a redrawn figure always reflects the files;
    timelines (long for long runs) are read only for the runs a figure shows.
    """
    runs = []
    for rec in records:
        path = Path(rec["path"])
        timeline = path / "memory.jsonl"
        has_timeline = timeline.is_file() and timeline.stat().st_size > 0
        runs.append(dict(rec, rows=read_jsonl(path / "metrics.jsonl"),
                         timeline=timeline if has_timeline else None))
    return runs


def model_data(model: str, runs: list[dict]) -> ModelData:
    mine = [r for r in runs if r["model"] == model]
    rows = S.summarize(mine)
    return ModelData(model, mine, rows, palette(list(dict.fromkeys(r["method"] for r in rows))))


def save_png(fig: Figure, path: Path) -> Path:
    """Write atomically; the same figure gives the same bytes (no timestamp in PNG metadata)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with mpl.rc_context(STYLE):
        write_file_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


def draw_all(runs: list[dict]) -> tuple[list[tuple[str, Drawn]], list[tuple[str, str, str]]]:
    """([(model, drawn)], [(model, figure, reason skipped)]) for every model and figure."""
    drawn, skipped = [], []
    for model in dict.fromkeys(r["model"] for r in runs if r["model"]):
        data = model_data(model, runs)
        for make in all_figures():
            try:
                with mpl.rc_context(STYLE):
                    drawn.append((model, make(data)))
            except NotApplicable:
                continue
            except Skipped as why:
                skipped.append((model, make.__name__.removeprefix("fig_"), str(why)))
    return drawn, skipped


def render_report(name: str, records: list[dict], drawn: list[tuple[str, Drawn]],
                  skipped: list[tuple[str, str, str]]) -> str:
    rows = S.summarize(records)
    lines = [f"# Results of {name}", "", "Rebuilt from the run directories by `python -m adamwprune.graphs`.",
             "Mean ± sample std over completed seeds; memory in MiB.", ""]
    lines += S.results_table(rows)
    best = S.best_methods(rows)
    if best:
        lines += ["", "## Best method per model and sparsity (chosen on validation)", ""]
        lines += S.best_table(best)
    lines += sections.significance_lines(rows) + sections.grid_lines(rows)
    lines += ["", "## Figures"]
    for model, d in drawn:
        lines += ["", f"### {model}: {d.title}", "", d.caption, "", f"![{d.title}]({d.name}.png)"]
    if skipped:
        lines += ["", "## Figures not drawn", ""]
        lines += [f"- {model} {figure}: {reason}" for model, figure, reason in skipped]
    return "\n".join(lines) + "\n"


def images_dir(images_root: PathLike) -> Path:
    root = Path(images_root)
    return root if root.is_absolute() else S.ROOT / root


def update_graphs(matrix_dir: PathLike, images_root: PathLike = "images") -> list[Path]:
    """Redraw every figure of a matrix (or run) directory from its run directories.

    PNGs go to <dir>/graphs/<model>_<figure>.png (figures no longer drawn are
    removed there) and are copied to <images_root>/<model>/; <dir>/graphs/report.md
    holds the summary table and one sentence per figure. `images_root` is relative
    to the project root unless absolute. Returns the PNG paths in <dir>/graphs/.
    """
    path = Path(matrix_dir)
    records = S.collect(path)
    drawn, skipped = draw_all(load_runs(records))
    out = path / "graphs"
    out.mkdir(parents=True, exist_ok=True)
    written = [save_png(d.figure, out / f"{d.name}.png") for _, d in drawn]
    for stale in set(out.glob("*.png")) - set(written):
        stale.unlink()
    for (model, _), png in zip(drawn, written):
        dest = images_dir(images_root) / model / png.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomic(dest, lambda tmp: shutil.copyfile(png, tmp))
    write_text_atomic(out / "report.md", render_report(path.name, records, drawn, skipped))
    return written


# --------------------------------------------------------------- one run
def plot_run(run_dir: PathLike, out_png: PathLike) -> Path:
    """Validation/test metric and measured sparsity against step of one run directory."""
    run_dir = Path(run_dir)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    if not rows:
        raise ValueError(f"{run_dir}/metrics.jsonl has no evaluation yet; train longer or pick another run")
    (rec,) = S.collect(run_dir)
    final = read_json(run_dir / "final.json") or {}
    metric = final.get("metric_name")
    steps = [r["step"] for r in rows]
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=RUN_FIGSIZE, layout="constrained")
        top, bottom = fig.subplots(2, 1, sharex=True)
        top.plot(steps, [r["val_metric"] for r in rows], marker=".", label="validation")
        top.plot(steps, [r.get("test_metric") for r in rows], marker=".", label="test")
        if final.get("best_step") is not None:
            top.axvline(final["best_step"], color="grey", linestyle=":", label="best validation step")
        if final.get("higher_is_better") is False:
            log_y(top)
        top.set(ylabel=metric_label(metric, ""), title=f"{rec['id'].split('_', 1)[-1]}\n{S.method_label(rec)}")
        top.legend()
        bottom.plot(steps, [100 * r["sparsity"] for r in rows], marker=".", color="tab:green",
                    label="measured")
        if rec["target_sparsity"]:
            bottom.axhline(100 * rec["target_sparsity"], color="black", linestyle=":", label="target")
        bottom.set(xlabel="optimizer step", ylabel="sparsity of prunable weights (%)")
        bottom.legend()
    return save_png(fig, Path(out_png))


def latest_run(results_root: Path = S.ROOT / "results") -> Optional[Path]:
    """The run directory (at most one level inside a matrix) whose final.json is newest."""
    finals = list(results_root.glob("*/final.json")) + list(results_root.glob("*/*/final.json"))
    return max(finals, key=lambda p: p.stat().st_mtime).parent if finals else None


# ---------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adamwprune.graphs",
                                     description="draw the figures of a matrix of runs, or of one run")
    parser.add_argument("dir", nargs="?", metavar="DIR",
                        help="matrix directory (default: newest under results/ with a matrix.json)")
    parser.add_argument("--run", nargs="?", const="", metavar="RUN_DIR",
                        help="plot one run instead (no value: the run that finished last)")
    parser.add_argument("--out", metavar="PNG", help="with --run: output file (default RUN_DIR/run.png)")
    parser.add_argument("--images-root", default="images",
                        help="copies go to IMAGES_ROOT/<model>/ (relative to the project root)")
    args = parser.parse_args(argv)
    if args.run is not None:
        run = Path(args.run) if args.run else latest_run()
        if run is None or not run.is_dir():
            where = args.run or "with a final.json under results/"
            raise SystemExit(f"no run directory {where}; pass --run RUN_DIR")
        print(plot_run(run, Path(args.out) if args.out else run / "run.png"))
        return 0
    if args.out:
        parser.error("--out only goes with --run")
    path = S.resolve_dir(args.dir)
    for png in update_graphs(path, args.images_root):
        print(png)
    print(path / "graphs" / "report.md")
    return 0


if __name__ == "__main__":
    # `python -m adamwprune.graphs` runs this file as __main__; the figure modules import
    # adamwprune.graphs, so run that module's main, or its exception classes (NotApplicable,
    # Skipped) would be two different classes and a figure that does not apply would crash.
    from adamwprune.graphs import main as _main

    sys.exit(_main())
