"""make claims: each seed claim judged from the study matrices, with n, spread and Welch's p."""
import shutil

import pytest

from adamwprune.report import claims as K
from test_summary import shared_matrix


def row(method, values, target=0.5, higher=True, bpp=16.0, seeds=None, **fields):
    n = len(values)
    mean = sum(values) / n
    std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return {"method": method, "model": "m", "target_sparsity": target, "higher_is_better": higher,
            "n_seeds": n, "test_values": list(values), "test_mean": mean, "test_std": std,
            "seeds": seeds or list(range(1, n + 1)), "bpp_total": bpp, "records": [],
            "optimizer": method, "pruning": "none" if target == 0 else "magnitude", **fields}


def claim(expect="better", measure="test", targets=(0.5,)):
    return K.Claim("k", "A beats B", "p", {"optimizer": "a"}, {"optimizer": "b"}, targets, expect, measure)


def test_a_clear_win_at_every_sparsity_is_supported_and_a_tie_is_not():
    rows = [row("a", [90.0, 90.2, 90.1]), row("b", [85.0, 85.3, 85.1]),
            row("a", [80.0, 81.0, 79.0], target=0.9), row("b", [80.5, 79.5, 80.2], target=0.9)]
    comps = [K.compare(claim(targets=(0.5, 0.9)), rows, t) for t in (0.5, 0.9)]
    assert comps[0].outcome == "a" and comps[0].p < 0.05
    assert comps[1].outcome == "none" and comps[1].p >= 0.05
    assert K.verdict(claim(targets=(0.5, 0.9)), comps) == "partly supported"
    assert K.verdict(claim(), comps[:1]) == "supported"
    assert K.verdict(claim(), comps[1:]) == "not supported"


def test_lower_is_better_metrics_and_a_loss_are_read_the_right_way():
    rows = [row("a", [7.0, 7.1, 7.05], higher=False), row("b", [6.0, 6.1, 6.05], higher=False)]
    c = K.compare(claim(), rows, 0.5)
    assert c.outcome == "b" and K.verdict(claim(), [c]) == "not supported"


def test_same_needs_no_difference_and_close_means_and_identical_seeds_are_named():
    same = [row("a", [6.0, 6.1, 6.2]), row("b", [6.0, 6.1, 6.2])]
    c = K.compare(claim("same"), same, 0.5)
    assert c.outcome == "identical" and K.verdict(claim("same"), [c]) == "supported"
    far = [row("a", [5.0, 7.0, 9.0]), row("b", [6.0, 6.1, 6.2])]  # no p < 0.05, but means 14 % apart
    c = K.compare(claim("same"), far, 0.5)
    assert c.outcome == "none" and K.verdict(claim("same"), [c]).startswith("inconclusive")
    apart = [row("a", [6.0, 6.1, 6.2]), row("b", [7.0, 7.1, 7.2])]
    c = K.compare(claim("same"), apart, 0.5)
    assert c.outcome == "b" and K.verdict(claim("same"), [c]) == "not supported"


def test_bytes_are_compared_exactly_without_a_test():
    rows = [row("a", [1.0, 2.0], bpp=16.0), row("b", [1.0, 2.0], bpp=17.0)]
    c = K.compare(claim(measure="bytes"), rows, 0.5)
    assert c.outcome == "a" and c.p is None
    assert "5.9 % fewer bytes" in K._outcome(c, claim(measure="bytes"))


def test_one_seed_is_not_testable_and_a_missing_method_says_so():
    rows = [row("a", [90.0]), row("b", [85.0, 85.2])]
    c = K.compare(claim(), rows, 0.5)
    assert c.outcome == "untestable" and "n < 2" in c.why
    assert K.verdict(claim(), [c]).startswith("not testable here: n < 2")
    c = K.compare(claim(), rows[:1], 0.5)
    assert c.outcome == "missing" and K.verdict(claim(), [c]).startswith("not testable here")


def test_a_selector_that_picks_two_rows_is_an_error():
    with pytest.raises(ValueError, match="picks 2 rows"):
        K.select([row("a", [1.0, 2.0]), row("a", [1.0, 3.0])], {"optimizer": "a"}, 0.5)


def test_claims_are_judged_from_a_real_matrix_and_missing_studies_say_how_to_run_them(tmp_path_factory,
                                                                                      tmp_path):
    matrix = shared_matrix(tmp_path_factory)  # 2 seeds of adamw + magnitude 50 %, 1 of the dense run
    results = tmp_path / "results"
    shutil.copytree(matrix, results / "20990101-000000_fixture")
    claims = (K.Claim("x", "magnitude beats dense", "fixture", {"optimizer": "adamw", "pruning": "magnitude"},
                      {"optimizer": "adamw", "pruning": "none"}, (0.5,)),
              K.Claim("y", "a study not run", "lenet5-compare", {}, {}, (0.5,)))
    got = K.evaluate(results, claims)
    (comp,) = got[0].comparisons
    assert comp.a["n_seeds"] == 2 and comp.b["n_seeds"] == 1 and comp.a["target_sparsity"] == 0.5
    assert got[0].verdict.startswith("not testable here: n < 2")
    assert got[1].verdict.startswith("not testable here: no `lenet5-compare` matrix")
    assert "make defconfig DEFCONFIG=lenet5-compare" in got[1].verdict
    table = K.render(got)
    assert "adamw + magnitude" in table and "(n=2)" in table and "(n=1)" in table


def test_every_shipped_claim_names_a_shipped_preset():
    from adamwprune.config import kconfig as C

    presets = {p.name for p in C.list_defconfigs()}
    assert {c.preset for c in K.CLAIMS} <= presets


def test_cli_refuses_a_missing_results_directory(tmp_path, capsys):
    assert K.main(["--results", str(tmp_path / "nothing")]) == 2
    assert "no results directory" in capsys.readouterr().err
