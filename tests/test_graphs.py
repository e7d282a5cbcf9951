"""Figures from a real (tiny) matrix: valid PNGs, report.md, and images that follow the results."""
import json
import math

import matplotlib.image
import pytest

from adamwprune import graphs as G
from test_summary import copy_matrix, shared_matrix

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The fixture has two target sparsities, memory samples and accuracy (higher is better):
# every lenet5 figure has its data, except the metric per MiB, which a CPU run's process
# RSS cannot support; the GPT-2 comparison does not apply.
EXPECTED = ["lenet5_val_curves", "lenet5_final_vs_sparsity", "lenet5_sparsity_schedule",
            "lenet5_memory_bars", "lenet5_memory_timeline", "lenet5_memory_vs_metric", "lenet5_adamwprune_vs_base"]


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """A copy of the shared matrix with its figures drawn once: (matrix, images root, pngs)."""
    root = tmp_path_factory.mktemp("drawn")
    matrix = copy_matrix(shared_matrix(tmp_path_factory), root)
    images = root / "images"
    return matrix, images, G.update_graphs(matrix, images_root=images)


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100


def cells(matrix):
    return json.loads((matrix / "matrix.json").read_text())["cells"]


def test_update_graphs_writes_every_figure_as_a_valid_png(drawn):
    matrix, _, pngs = drawn
    assert [p.stem for p in pngs] == EXPECTED
    assert all(p.parent == matrix / "graphs" for p in pngs)
    for png in pngs:
        assert_png(png)


def test_pngs_are_copied_to_images_per_model(drawn):
    _, images, pngs = drawn
    for png in pngs:
        copy = images / "lenet5" / png.name
        assert copy.read_bytes() == png.read_bytes()


def test_report_lists_every_figure_with_a_sentence_and_the_summary_table(drawn):
    matrix, _, pngs = drawn
    report = (matrix / "graphs" / "report.md").read_text()
    for png in pngs:
        assert f"]({png.name})" in report
    assert "| model | method | target sparsity |" in report and "± " in report
    assert "Best method per model and sparsity" in report
    assert "gpt2" not in report  # a figure that does not apply is not listed as skipped


def test_images_change_when_the_results_change(drawn, tmp_path):
    matrix, _, pngs = drawn
    copy = copy_matrix(matrix, tmp_path)
    cell = copy / next(c["id"] for c in cells(copy) if c["pruning"] == "none")
    rows = [json.loads(line) for line in (cell / "metrics.jsonl").read_text().splitlines()]
    rows[-1]["val_metric"] += 50.0
    (cell / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    final = json.loads((cell / "final.json").read_text())
    final["test_metric_at_best"] += 50.0
    (cell / "final.json").write_text(json.dumps(final))
    after = {p.stem: p.read_bytes() for p in G.update_graphs(copy, images_root=tmp_path / "images")}
    before = {p.stem: p.read_bytes() for p in pngs}
    for name in ("lenet5_val_curves", "lenet5_final_vs_sparsity", "lenet5_memory_vs_metric"):
        assert after[name] != before[name], name
    # figures of data that did not change are byte-identical: the PNGs depend on the data only
    for name in ("lenet5_sparsity_schedule", "lenet5_memory_bars", "lenet5_memory_timeline"):
        assert after[name] == before[name], name
    assert (tmp_path / "images" / "lenet5" / "lenet5_val_curves.png").read_bytes() == after["lenet5_val_curves"]


def to_gpt2(matrix):
    """Relabel the fixture's 50% cells as GPT-2 runs reporting perplexity = exp(validation loss)."""
    spec = json.loads((matrix / "matrix.json").read_text())
    # AdamWPrune's base in the fixture is AdamW: its pair for the comparison figure
    relabel = {("adamw", "magnitude"): ("adamw", "magnitude", None),
               ("adamwprune", "state"): ("adamwprune", "state", "bitter1")}
    kept = []
    for cell in spec["cells"]:
        key = (cell["optimizer"], cell["pruning"])
        if cell["sparsity"] != 0.5 or key not in relabel:
            continue
        cell["optimizer"], cell["pruning"], cell["variant"] = relabel[key]
        cell["model"] = "gpt2"
        run = matrix / cell["id"]
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        for row in rows:
            row["val_metric"], row["test_metric"] = math.exp(row["val_loss"]), math.exp(row["test_loss"])
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        final = json.loads((run / "final.json").read_text())
        final.update(metric_name="perplexity", higher_is_better=False,
                     best_val_metric=min(r["val_metric"] for r in rows))
        (run / "final.json").write_text(json.dumps(final))
        kept.append(cell)
    spec["cells"] = kept
    (matrix / "matrix.json").write_text(json.dumps(spec))
    for path in matrix.iterdir():
        if path.is_dir() and path.name not in {c["id"] for c in kept}:
            path.rename(matrix.parent / f"removed_{path.name}")
    return matrix


def test_gpt2_perplexity_comparison_is_drawn_when_present(drawn, tmp_path):
    matrix, _, _ = drawn
    gpt2 = to_gpt2(copy_matrix(matrix, tmp_path))
    pngs = {p.stem: p for p in G.update_graphs(gpt2, images_root=tmp_path / "images")}
    assert "gpt2_adamwprune_vs_base" in pngs and "gpt2_val_curves" in pngs
    assert_png(pngs["gpt2_adamwprune_vs_base"])
    # a ratio of perplexity to memory means nothing: skipped, and said so
    assert f"gpt2_metric_per_{G.PER_MIB}mib" not in pngs
    assert "lower-is-better" in (gpt2 / "graphs" / "report.md").read_text()
    assert (tmp_path / "images" / "gpt2" / "gpt2_adamwprune_vs_base.png").is_file()


def test_pareto_front_keeps_points_no_other_beats_on_memory_and_metric():
    points = [(100.0, 90.0), (200.0, 95.0), (150.0, 89.0), (300.0, 94.0), (100.0, 85.0), (400.0, 99.0)]
    assert G.pareto_front(points, higher_is_better=True) == [0, 1, 5]
    # perplexity: lower is better
    assert G.pareto_front([(1.0, 30.0), (2.0, 25.0), (3.0, 27.0)], higher_is_better=False) == [0, 1]


def test_mean_curve_averages_seeds_step_by_step():
    runs = [{"rows": [{"step": 4, "v": 1.0}, {"step": 8, "v": 3.0}]},
            {"rows": [{"step": 4, "v": 3.0}, {"step": 8, "v": 3.0}, {"step": 12, "v": 5.0}]}]
    steps, mean, std = G.mean_curve(runs, "v")
    assert (steps, mean) == ([4, 8, 12], [2.0, 3.0, 5.0])
    assert std == pytest.approx([math.sqrt(2.0), 0.0, 0.0])


def test_plot_run_draws_one_run_directory(drawn, tmp_path):
    matrix, _, _ = drawn
    out = G.plot_run(matrix / cells(matrix)[0]["id"], tmp_path / "run.png")
    assert out == tmp_path / "run.png"
    assert_png(out)


def test_plot_run_rejects_a_run_without_evaluations(drawn, tmp_path):
    matrix, _, _ = drawn
    failed = matrix / next(c["id"] for c in cells(matrix) if c["seed"] == 2 and c["sparsity"] == 0.7)
    with pytest.raises(ValueError, match="no evaluation yet"):
        G.plot_run(failed, tmp_path / "run.png")


def test_cli_draws_a_single_run_directory_skipping_what_it_lacks(drawn, tmp_path, capsys):
    matrix, _, pngs = drawn
    run = copy_matrix(matrix, tmp_path) / cells(matrix)[0]["id"]
    (run / "graphs").mkdir()
    for png in pngs:  # as if a larger matrix had drawn here before: stale files must go
        (run / "graphs" / png.name).write_bytes(png.read_bytes())
    assert G.main([str(run), "--images-root", str(tmp_path / "images")]) == 0
    out = capsys.readouterr().out.split()
    names = sorted(p.stem for p in (run / "graphs").glob("*.png"))
    assert sorted(out[:-1]) == [str(run / "graphs" / f"{n}.png") for n in names]
    assert out[-1] == str(run / "graphs" / "report.md")
    assert "lenet5_val_curves" in names and "lenet5_memory_timeline" in names
    # one configuration: nothing to draw against sparsity, no frontier of one point
    assert "lenet5_final_vs_sparsity" not in names and "lenet5_memory_vs_metric" not in names
    report = (run / "graphs" / "report.md").read_text()
    assert "final_vs_sparsity: fewer than two target sparsities" in report


def test_cli_draws_one_run(drawn, tmp_path, capsys):
    matrix, _, _ = drawn
    run = matrix / cells(matrix)[0]["id"]
    assert G.main(["--run", str(run), "--out", str(tmp_path / "one.png")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "one.png")
    assert_png(tmp_path / "one.png")


def _as_gpu_memory(matrix):
    """Relabel every run's sampled memory as the GPU memory of its process."""
    for final in matrix.glob("*/final.json"):
        data = json.loads(final.read_text())
        data["sampled_memory"] = dict(data.get("sampled_memory") or {}, backend="nvml", metric="process_gpu")
        final.write_text(json.dumps(data))
    return matrix


def test_cpu_memory_is_labelled_process_rss_and_draws_no_pareto_frontier(drawn, tmp_path):
    matrix, _, _ = drawn
    report = (matrix / "graphs" / "report.md").read_text()
    assert "no Pareto frontier is drawn" in report and "resident set" in report
    assert f"{G.PER_MIB} MiB" not in report.split("## Figures not drawn")[0].split("## Figures")[1]
    gpu = _as_gpu_memory(copy_matrix(matrix, tmp_path))
    pngs = {p.stem for p in G.update_graphs(gpu, images_root=tmp_path / "images")}
    assert f"lenet5_metric_per_{G.PER_MIB}mib" in pngs
    assert "the dashed line joins" in (gpu / "graphs" / "report.md").read_text()


def test_make_update_graphs_command_draws_a_matrix_without_sweeps(drawn, tmp_path):
    """`python -m adamwprune.graphs DIR` (what `make update-graphs` runs), as a process:
    run as __main__, the figures that do not apply (no MATRIX_SWEEP axes) are skipped,
    not a crash of two NotApplicable classes."""
    import subprocess
    import sys

    from adamwprune.config.kconfig import ROOT

    matrix = copy_matrix(drawn[0], tmp_path)
    r = subprocess.run([sys.executable, "-m", "adamwprune.graphs", str(matrix),
                        "--images-root", str(tmp_path / "images")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-1] == str(matrix / "graphs" / "report.md")
    assert not any((matrix / "graphs").glob("*sweep*"))


def test_adamwprune_is_paired_with_its_own_base_optimizer_and_pattern():
    run = lambda opt, pruning, base=None, pattern="unstructured": {
        "optimizer": opt, "pruning": pruning, "base": base, "pattern": pattern}
    ours, regrow = run("adamwprune", "state", "adamwspam"), run("adamwprune", "state_regrow", "adamw")
    same, rigl = run("adamwspam", "magnitude"), run("adamw", "rigl")
    other_base, other_pattern = run("adamw", "magnitude"), run("adamwspam", "magnitude", pattern="2:4")
    got = G.against_base([ours, regrow, same, rigl, other_base, other_pattern, run("adamw", "none")])
    assert {id(r) for r in got} == {id(ours), id(regrow), id(same), id(rigl)}
    assert G.against_base([ours, other_base]) == []  # no run of its base: nothing to compare
