"""Summary tables from real (tiny) run directories: statistics over seeds, selection on validation."""
import csv
import json
import shutil
import statistics

import pytest

from adamwprune.config import kconfig as C
from adamwprune.report import summary as S
from adamwprune.cli import load_task
from adamwprune.engine.trainer import Trainer

TINY = {"MODEL": "lenet5", "DATASET": "synthetic", "DATA_SYNTHETIC_SIZE": "64", "BATCH_SIZE": "16",
        "DEVICE": "cpu", "MAX_ITERS": "12", "TRAIN_EVAL_INTERVAL": "4", "RUN_MONITOR_INTERVAL": "0.05"}
# (optimizer, pruning, target sparsity, variant, seed): two seeds of one configuration for the
# statistics, two sparsities for the sparsity figure, a dense baseline and AdamWPrune.
TRAINED = [("adamw", "magnitude", 0.5, None, 1), ("adamw", "magnitude", 0.5, None, 2),
           ("adamwprune", "state", 0.5, "bitter1", 1), ("adamw", "magnitude", 0.7, None, 1),
           ("adamw", "none", 0.0, None, 1)]
FAILED = ("adamw", "magnitude", 0.7, None, 2)
FAILED_LOG = "Traceback (most recent call last):\nRuntimeError: the fixture's failed cell"

_BUILT = {}


def cell_entry(optimizer, pruning, sparsity, variant, seed):
    cell_id = "_".join(str(p) for p in ("lenet5", optimizer, pruning, round(100 * sparsity), variant, f"s{seed}")
                       if p is not None)
    overrides = {**TINY, "OPTIMIZER": optimizer, "PRUNING": pruning, "SEED": str(seed)}
    if pruning != "none":
        overrides["PRUNING_TARGET_SPARSITY"] = str(sparsity)
    if variant:
        overrides["ADAMWPRUNE_VARIANT"] = variant
    return {"id": cell_id, "model": "lenet5", "optimizer": optimizer, "pruning": pruning,
            "sparsity": sparsity, "variant": variant, "seed": seed,
            "overrides": [[k, v] for k, v in overrides.items()]}


def build_matrix(root):
    """A matrix directory made by the real engine: 5 trained cells of 12 steps and 1 failed cell."""
    matrix = root / "20990101-000000_fixture"
    cells = [cell_entry(*spec) for spec in TRAINED]
    for cell in cells:
        cfg, _, _ = C.load(None, dict(cell["overrides"]))
        final = Trainer(load_task(cfg.model), cfg, matrix / cell["id"], config_text="").fit()
        (matrix / cell["id"] / "cell.json").write_text(json.dumps(
            {"status": final["status"], "exit_code": 0, "log_tail": ""}))
    failed = cell_entry(*FAILED)
    (matrix / failed["id"]).mkdir(parents=True)
    (matrix / failed["id"] / "cell.json").write_text(json.dumps(
        {"status": "failed", "exit_code": 1, "log_tail": FAILED_LOG}))
    cells.append(failed)
    (matrix / "matrix.json").write_text(json.dumps(
        {"name": "fixture", "created": "20990101-000000", "overrides": [], "cells": cells}))
    return matrix


def shared_matrix(tmp_path_factory):
    """Built once per session, shared with test_graphs.py (which imports this)."""
    if "matrix" not in _BUILT:
        _BUILT["matrix"] = build_matrix(tmp_path_factory.mktemp("matrix"))
    return _BUILT["matrix"]


def copy_matrix(matrix, dest):
    """A writable copy, for tests that change results."""
    return shutil.copytree(matrix, dest / matrix.name)


@pytest.fixture(scope="session")
def matrix(tmp_path_factory):
    return shared_matrix(tmp_path_factory)


def finals(matrix, **match):
    out = []
    for cell in json.loads((matrix / "matrix.json").read_text())["cells"]:
        path = matrix / cell["id"] / "final.json"
        if path.exists() and all(cell[k] == v for k, v in match.items()):
            out.append(json.loads(path.read_text()))
    return out


def row_of(rows, **match):
    found = [r for r in rows if all(r[k] == v for k, v in match.items())]
    assert len(found) == 1, found
    return found[0]


# --------------------------------------------------------------- collect
def test_collect_reads_one_record_per_cell_in_matrix_order(matrix):
    records = S.collect(matrix)
    cells = json.loads((matrix / "matrix.json").read_text())["cells"]
    assert [r["id"] for r in records] == [c["id"] for c in cells]
    assert [r["status"] for r in records] == ["completed"] * len(TRAINED) + ["failed"]
    state = row_of(records, optimizer="adamwprune")
    assert state["variant"] == "bitter1" and state["base"] == "adamw"
    failed = records[-1]
    assert failed["best_val_metric"] is None and failed["exit_code"] == 1
    assert failed["message"] == FAILED_LOG.splitlines()[-1]


def test_cell_without_any_file_is_pending_and_joins_its_configuration(matrix, tmp_path):
    copy = copy_matrix(matrix, tmp_path)
    spec = json.loads((copy / "matrix.json").read_text())
    spec["cells"].append(cell_entry("adamwprune", "state", 0.5, "bitter1", 2))
    (copy / "matrix.json").write_text(json.dumps(spec))
    records = S.collect(copy)
    assert records[-1]["status"] == "pending" and records[-1]["base"] is None
    row = row_of(S.summarize(records), optimizer="adamwprune")
    assert (row["runs"], row["n_seeds"], row["unfinished"], row["failed"]) == (2, 1, 1, 0)
    assert row["method"] == "adamwprune[adamw] + state (bitter1)"


def test_collect_accepts_a_single_run_directory(matrix):
    run = matrix / json.loads((matrix / "matrix.json").read_text())["cells"][0]["id"]
    (record,) = S.collect(run)
    assert record["status"] == "completed" and record["target_sparsity"] == 0.5
    assert record["variant"] is None and record["model"] == "lenet5"


# ------------------------------------------------------------- summarize
def test_summary_statistics_match_the_run_directories(matrix):
    rows = S.summarize(S.collect(matrix))
    row = row_of(rows, optimizer="adamw", pruning="magnitude", target_sparsity=0.5)
    two = finals(matrix, optimizer="adamw", pruning="magnitude", sparsity=0.5)
    assert row["n_seeds"] == len(two) == 2 and row["failed"] == 0
    vals = [f["best_val_metric"] for f in two]
    tests = [f["test_metric_at_best"] for f in two]
    assert row["val_mean"] == pytest.approx(statistics.fmean(vals))
    assert row["val_std"] == pytest.approx(statistics.stdev(vals))
    assert row["test_mean"] == pytest.approx(statistics.fmean(tests))
    assert row["test_std"] == pytest.approx(statistics.stdev(tests))
    assert row["sparsity_mean"] == pytest.approx(statistics.fmean(f["final_sparsity"] for f in two))
    assert row["peak_mib"] == pytest.approx(
        statistics.fmean(f["sampled_memory"]["peak_bytes"] for f in two) / 2**20)
    assert row["mean_mib"] == pytest.approx(
        statistics.fmean(f["sampled_memory"]["mean_bytes"] for f in two) / 2**20)
    assert row["step_ms"] == pytest.approx(1000 * statistics.fmean(f["step_time_s"] for f in two))
    for c in ("parameters", "gradients", "optimizer_state", "pruning_buffers"):
        assert row[f"bpp_{c}"] == pytest.approx(
            statistics.fmean(f["memory"][c]["bytes_per_param"] for f in two))
    assert row["metric_name"] == "accuracy" and row["higher_is_better"] is True


def test_summary_md_tabulates_the_test_metric_by_method_and_sparsity(matrix):
    from adamwprune.report.sections import by_sparsity_lines

    lines = by_sparsity_lines(S.summarize(S.collect(matrix)))
    assert "| method | 0.0% | 50.0% | 70.0% |" in lines
    tests = [f["test_metric_at_best"] for f in finals(matrix, optimizer="adamw", pruning="magnitude", sparsity=0.5)]
    (mag,) = [ln for ln in lines if ln.startswith("| adamw + magnitude |")]
    cells = [c.strip() for c in mag.strip("|").split("|")]
    assert cells[1] == "" and cells[2] == f"{S.fmt_pm(statistics.fmean(tests), statistics.stdev(tests))} (2)"
    assert cells[3].endswith("(1)")  # the 70 % configuration: one completed seed, one failed
    (dense,) = [ln for ln in lines if ln.startswith("| adamw + none |")]
    assert dense.split("|")[2].strip().endswith("(1)") and dense.split("|")[3].strip() == ""


def test_sample_std_uses_n_minus_one_and_is_zero_for_one_seed(matrix, tmp_path):
    copy = copy_matrix(matrix, tmp_path)
    cells = [c for c in json.loads((copy / "matrix.json").read_text())["cells"]
             if (c["optimizer"], c["pruning"], c["sparsity"]) == ("adamw", "magnitude", 0.5)]
    for cell, (val, test) in zip(cells, [(10.0, 40.0), (20.0, 60.0)]):
        path = copy / cell["id"] / "final.json"
        final = json.loads(path.read_text())
        final.update(best_val_metric=val, test_metric_at_best=test)
        path.write_text(json.dumps(final))
    rows = S.summarize(S.collect(copy))
    row = row_of(rows, optimizer="adamw", pruning="magnitude", target_sparsity=0.5)
    # hand-computed: mean 15, sample std sqrt(((10-15)^2 + (20-15)^2) / 1) = 7.0711; test: 50, 14.142
    assert (row["val_mean"], row["test_mean"]) == (15.0, 50.0)
    assert row["val_std"] == pytest.approx(7.0710678) and row["test_std"] == pytest.approx(14.1421356)
    single = row_of(rows, optimizer="adamw", pruning="none")
    assert single["n_seeds"] == 1 and single["val_std"] == 0.0


def test_failed_cells_are_counted_and_left_out_of_the_statistics(matrix):
    rows = S.summarize(S.collect(matrix))
    row = row_of(rows, optimizer="adamw", pruning="magnitude", target_sparsity=0.7)
    assert (row["runs"], row["n_seeds"], row["failed"]) == (2, 1, 1)
    (done,) = finals(matrix, optimizer="adamw", pruning="magnitude", sparsity=0.7)
    assert row["val_mean"] == done["best_val_metric"] and row["val_std"] == 0.0


# ---------------------------------------------------------- best methods
def rec(optimizer, val, test, seed, higher=True, target=0.5):
    return {"id": f"{optimizer}{seed}", "model": "m", "optimizer": optimizer, "base": None,
            "pruning": "magnitude", "target_sparsity": target, "variant": None, "seed": seed,
            "status": "completed", "metric_name": "accuracy" if higher else "perplexity",
            "higher_is_better": higher, "best_val_metric": val, "test_metric": test,
            "final_sparsity": target, "peak_memory_bytes": None, "mean_memory_bytes": None,
            "allocator_peak_bytes": None, "memory_source": None, "step_time_s": None,
            "bytes_per_param": dict.fromkeys(S.COMPONENTS)}


def test_best_method_is_chosen_on_validation_not_test():
    # "a" wins on validation, "b" on test: the test set must not select.
    records = [rec("a", 90.0, 70.0, 1), rec("a", 92.0, 72.0, 2), rec("b", 80.0, 95.0, 1),
               rec("b", 81.0, 96.0, 2)]
    (best,) = S.best_methods(S.summarize(records))
    assert best["best"] == "a + magnitude" and best["runner_up"] == "b + magnitude"
    assert best["best_test_mean"] == 71.0
    assert best["margin"] == pytest.approx(10.5)
    # stds are sqrt(2) and sqrt(0.5); 10.5 exceeds both
    assert best["exceeds_spread"] is True and best["verdict"] == "yes"


def test_lower_is_better_metrics_pick_the_smallest_validation_value():
    records = [rec("a", 30.0, 20.0, 1, higher=False), rec("b", 25.0, 40.0, 1, higher=False)]
    (best,) = S.best_methods(S.summarize(records))
    assert best["best"] == "b + magnitude" and best["margin"] == 5.0
    assert best["exceeds_spread"] is None and best["verdict"] == "n/a (1 seed)"


def test_margin_within_seed_spread_is_not_significant():
    records = [rec("a", 90.0, 0.0, 1), rec("a", 80.0, 0.0, 2), rec("b", 84.0, 0.0, 1),
               rec("b", 84.0, 0.0, 2)]
    (best,) = S.best_methods(S.summarize(records))
    assert best["best"] == "a + magnitude" and best["margin"] == pytest.approx(1.0)
    assert best["exceeds_spread"] is False and best["verdict"] == "no"


def test_a_tie_on_validation_is_reported_as_one():
    records = [rec("a", 90.0, 10.0, 1), rec("b", 90.0, 99.0, 1)]
    (best,) = S.best_methods(S.summarize(records))
    assert best["margin"] == 0.0 and best["exceeds_spread"] is False and best["verdict"] == "no (tie)"


def test_best_methods_are_per_model_and_sparsity():
    records = [rec("a", 90.0, 0.0, 1, target=0.5), rec("b", 91.0, 0.0, 1, target=0.9)]
    best = S.best_methods(S.summarize(records))
    assert [(b["target_sparsity"], b["best"], b["verdict"]) for b in best] == [
        (0.5, "a + magnitude", "n/a (one method)"), (0.9, "b + magnitude", "n/a (one method)")]


# ----------------------------------------------------------------- files
def test_write_summary_writes_csv_and_markdown(matrix, tmp_path):
    copy = copy_matrix(matrix, tmp_path)
    csv_path, md_path = S.write_summary(copy)
    assert (csv_path, md_path) == (copy / "summary.csv", copy / "summary.md")
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == len(S.summarize(S.collect(copy))) == 4
    row = next(r for r in rows if r["pruning"] == "magnitude" and r["target_sparsity"] == "0.7")
    assert (row["n_seeds"], row["failed"]) == ("1", "1")
    md = md_path.read_text()
    assert "## Best method per model and sparsity" in md and "± " in md and "peak MiB" in md
    # A CPU matrix: its memory is the process's RSS, and the table and text say so.
    assert "peak MiB (process RSS)" in md and "does not measure a method's cost" in md
    assert "adamwprune[adamw] + state (bitter1)" in md
    assert "## Cells that did not complete" in md and "the fixture's failed cell" in md
    assert not list(copy.glob(".*.tmp*"))


def test_summary_is_rebuilt_from_the_run_directories(matrix, tmp_path):
    copy = copy_matrix(matrix, tmp_path)
    _, md_path = S.write_summary(copy)
    before = md_path.read_text()
    cell = next(c for c in json.loads((copy / "matrix.json").read_text())["cells"] if c["pruning"] == "none")
    path = copy / cell["id"] / "final.json"
    final = json.loads(path.read_text())
    final["best_val_metric"] = 12.34
    path.write_text(json.dumps(final))
    _, md_path = S.write_summary(copy)
    after = md_path.read_text()
    assert after != before and "12.34 ± 0.00" in after


def test_cli_prints_the_table_and_paths(matrix, tmp_path, capsys):
    copy = copy_matrix(matrix, tmp_path)
    assert S.main([str(copy)]) == 0
    out = capsys.readouterr().out
    assert "# Summary of" in out and str(copy / "summary.csv") in out


def test_cli_rejects_a_missing_directory(tmp_path):
    with pytest.raises(SystemExit, match="not a directory"):
        S.main([str(tmp_path / "nope")])
