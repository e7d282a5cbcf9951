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

Modules: ``style`` (rcParams, panels, legends, mean curves, the Pareto front),
``figures`` (ModelData and one function per figure), ``sweep`` (the MATRIX_SWEEP
figure), ``report`` (drawing a matrix, report.md, images/, the one-run plot),
``cli``. A figure is a function of ModelData that returns Drawn or raises Skipped:
adding one is adding it to ``figures.FIGURES``.
"""
from .cli import main
from .figures import FIGURES, ModelData, against_base
from .report import all_figures, draw_all, load_runs, model_data, plot_run, render_report, update_graphs
from .style import PER_MIB, STYLE, Drawn, NotApplicable, Skipped, mean_curve, pareto_front
from .sweep import fig_sweep

__all__ = ["FIGURES", "PER_MIB", "STYLE", "Drawn", "ModelData", "NotApplicable", "Skipped", "against_base",
           "all_figures", "draw_all", "fig_sweep", "load_runs", "main", "mean_curve", "model_data", "pareto_front",
           "plot_run", "render_report", "update_graphs"]
