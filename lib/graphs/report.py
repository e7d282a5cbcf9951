"""Drawing every figure of a matrix, report.md, the copies under images/, and the one-run plot."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Optional

import matplotlib as mpl
import matplotlib.ticker
from matplotlib.figure import Figure

from ..report import summary as S
from ..report import sections
from ..run.atomic import write_file_atomic, write_text_atomic
from ..run.rundir import read_json, read_jsonl
from .figures import FIGURES, ModelData
from .sweep import fig_sweep
from .style import (RUN_FIGSIZE, STYLE, Drawn, NotApplicable, PathLike, Skipped, log_y, metric_label,
                    palette)


# ------------------------------------------------------------------ drawing
def all_figures() -> tuple[Callable[[ModelData], Drawn], ...]:
    """FIGURES and the MATRIX_SWEEP figure."""
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
