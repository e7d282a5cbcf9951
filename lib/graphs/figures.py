"""The figures of one model's runs (ModelData -> Drawn); each raises Skipped when the runs lack its data."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import matplotlib as mpl
import matplotlib.ticker
from matplotlib.patches import Patch

from ..report import summary as S
from ..monitor import METRICS, read_timeline, sample_metrics
from .style import (MEMORY_LABELS, PER_MIB, STYLE, Drawn, Skipped, bar_figure, config_label,
                    figure_legend, log_y, metric_label, new_figure, pareto_front, plot_mean, side_legend,
                    sparsity_title)


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
    from ..registry import PRUNERS

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
