"""Welch's t-test over seeds and the winner rule of `make summary` (ShrinkBench's checklist)."""
import math

import pytest

from adamwprune.report import stats
from adamwprune.report import summary as S
from test_summary import copy_matrix, rec, shared_matrix


def test_welch_p_value_matches_the_hand_computed_one():
    # means 2 and 3, variances 1 and 1, n 3 and 3: t = -1 / sqrt(2/3) = -1.2247, Welch df = 4;
    # two-sided p = 2 * P(T_4 > 1.2247) = 0.28786 (t-distribution table)
    p, why = stats.welch([1.0, 2.0, 3.0], [2.0, 3.0, 4.0])
    assert why is None and p == pytest.approx(0.28786, abs=1e-5)


def test_welch_needs_two_seeds_a_side_and_some_spread():
    assert stats.welch([1.0], [2.0, 3.0]) == (None, "n < 2 (n = 1 and 2)")
    p, why = stats.welch([1.0, 1.0], [2.0, 2.0])
    assert p is None and "no spread" in why


def three(method, vals, tests, target=0.5, higher=True):
    return [rec(method, v, t, seed, higher=higher, target=target) for seed, (v, t) in enumerate(zip(vals, tests), 1)]


def test_a_winner_is_named_only_when_better_than_every_method_at_p_below_005():
    records = (three("a", [90, 91, 92], [90.0, 90.5, 91.0]) + three("b", [80, 81, 82], [80.0, 80.5, 81.0])
               + three("c", [70, 71, 72], [89.0, 91.0, 93.0]))
    (group,) = stats.significance(S.summarize(records))
    assert group["best"] == "a + magnitude"
    verdicts = {e["row"]["optimizer"]: e["vs_best"] and e["vs_best"]["verdict"] for e in group["entries"]}
    assert verdicts["b"] == "worse (p < 0.05)"
    assert verdicts["c"] == "no significant difference"  # same mean, wide spread
    assert group["winner"] is None
    records = three("a", [90, 91, 92], [90.0, 90.5, 91.0]) + three("b", [80, 81, 82], [80.0, 80.5, 81.0])
    (group,) = stats.significance(S.summarize(records))
    assert group["winner"] == "a + magnitude"


def test_validation_chooses_even_when_another_method_is_better_on_test():
    records = three("a", [90, 91, 92], [80.0, 80.5, 81.0]) + three("b", [80, 81, 82], [90.0, 90.5, 91.0])
    (group,) = stats.significance(S.summarize(records))
    assert group["best"] == "a + magnitude" and group["winner"] is None
    other = next(e for e in group["entries"] if not e["is_best"])
    assert other["vs_best"]["verdict"] == "better on test (p < 0.05)"
    assert other["vs_best"]["delta"] == pytest.approx(10.0)


def test_pruned_methods_are_compared_with_the_best_dense_configuration():
    records = (three("dense", [95, 96, 97], [95.0, 95.5, 96.0], target=0.0)
               + three("a", [90, 91, 92], [90.0, 90.5, 91.0]))
    for r in records[:3]:
        r["pruning"] = "none"
    groups = {g["target_sparsity"]: g for g in stats.significance(S.summarize(records))}
    (entry,) = groups[0.5]["entries"]
    assert groups[0.5]["dense"] == "dense + none"
    assert entry["vs_dense"]["verdict"] == "worse (p < 0.05)" and entry["vs_dense"]["p"] < 0.05
    assert groups[0.0]["entries"][0]["vs_dense"] is None


def test_lower_is_better_metrics_win_by_being_smaller():
    records = (three("a", [5, 5.1, 5.2], [5.0, 5.1, 5.2], higher=False)
               + three("b", [6, 6.1, 6.2], [6.0, 6.1, 6.2], higher=False))
    (group,) = stats.significance(S.summarize(records))
    assert group["winner"] == "a + magnitude"


def test_summary_md_and_csv_show_p_values_compression_and_flops(tmp_path_factory, tmp_path):
    matrix = copy_matrix(shared_matrix(tmp_path_factory), tmp_path)
    csv_path, md_path = S.write_summary(matrix)
    md = md_path.read_text()
    assert "## Significance over seeds (Welch's t-test on the test metric)" in md
    assert "### lenet5, 50.0% target sparsity:" in md and "p vs best" in md
    # adamw + magnitude at 50 % has 2 seeds; adamwprune bitter1 has 1: not testable
    assert "not testable: n < 2 (n = " in md
    assert "2.00x" in md  # compression at 50 %
    header = csv_path.read_text().splitlines()[0].split(",")
    for col in ("p_vs_best", "verdict_vs_best", "p_vs_dense", "compression_ratio", "flops_per_example",
                "flops_per_example_nonzero", "sweep"):
        assert col in header
    rows = S.summarize(S.collect(matrix))
    dense = next(r for r in rows if r["pruning"] == "none")
    assert dense["compression_ratio"] == 1.0 and dense["flops_per_example"] > 0
    pruned = next(r for r in rows if r["pruning"] == "magnitude" and r["target_sparsity"] == 0.5)
    assert math.isclose(pruned["compression_ratio"], 61_470 / (61_470 - round(0.5 * 61_470)))
    assert pruned["flops_per_example_nonzero"] < pruned["flops_per_example"] == dense["flops_per_example"]
