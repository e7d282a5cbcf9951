"""Matrix axes over any Kconfig symbol (MATRIX_SWEEP) and tuned values (MATRIX_TUNED_FROM)."""
import json

import pytest

from adamwprune.config import kconfig as C
from adamwprune import graphs as G
from adamwprune.run import matrix
from adamwprune.run import cells as cells_mod
from adamwprune.config import sweep
from adamwprune.report import summary as S
from adamwprune.cli import load_task
from adamwprune.engine.trainer import Trainer
from adamwprune.config.cli import main as kconfig_main
from helpers import cli, write_config

TINY = {"MODEL": "lenet5", "DATASET": "synthetic", "DATA_SYNTHETIC_SIZE": "64", "BATCH_SIZE": "16", "DEVICE": "cpu",
        "MAX_ITERS": "8", "TRAIN_EVAL_INTERVAL": "4", "RUN_MONITOR_INTERVAL": "0.1", "MATRIX": "y",
        "MATRIX_OPTIMIZER_ADAMWPRUNE": "n", "MATRIX_PRUNING_STATE": "n", "MATRIX_SPARSITY_70": "n",
        "MATRIX_SPARSITY_90": "n"}
def single(sel):
    """The non-matrix part of a selection: what a cell starts from."""
    return {k: v for k, v in sel.items() if not k.startswith("MATRIX")}


GRID = {**TINY, "MATRIX_OPTIMIZER_SGD": "y", "MATRIX_OPTIMIZER_ADAMW": "y", "MATRIX_PRUNING_NONE": "y",
        "MATRIX_SWEEP": "OPT_LR=0.001,0.01,0.1"}


# ------------------------------------------------------------------ parsing
def test_sweep_items_parse_into_axes_with_symbols_normalised():
    assert sweep.parse("CONFIG_OPT_LR=0.1,0.3 LR_SCHEDULE=cosine TRAIN_EPOCHS=1,2") == [
        ("OPT_LR", ["0.1", "0.3"]), ("LR_SCHEDULE", ["cosine"]), ("TRAIN_EPOCHS", ["1", "2"])]
    assert sweep.parse("LR=0.1") == [("OPT_LR", ["0.1"])]  # make-line shorthand
    assert sweep.combinations(sweep.parse("A=1,2 B=x,y")) == [
        (("A", "1"), ("B", "x")), (("A", "1"), ("B", "y")), (("A", "2"), ("B", "x")), (("A", "2"), ("B", "y"))]
    assert sweep.combinations([]) == [()]
    assert sweep.id_part((("OPT_LR", "3e-4"), ("GPT2_TEXT_SOURCE", "a/b c"))) == "opt_lr-3e-4_gpt2_text_source-a_b_c"


@pytest.mark.parametrize("text, why", [("OPT_LR", "is not SYMBOL=v1,v2"), ("OPT_LR=0.1,,0.2", "empty value"),
                                       ("OPT_LR=0.1,0.1", "twice"), ("OPTIMIZER=sgd", "own selections"),
                                       ("MATRIX_SEEDS=2", "own selections"), ("LR=1 OPT_LR=2", "names OPT_LR twice")])
def test_malformed_sweeps_are_refused_naming_the_item(text, why):
    with pytest.raises(sweep.SweepError, match=why):
        sweep.parse(text)


@pytest.mark.parametrize("text, item, why", [
    ("OPT_LR=0.01,abc", "OPT_LR=abc", 'CONFIG_OPT_LR="abc": not a number'),
    ("NO_SUCH_SYMBOL=1", "NO_SUCH_SYMBOL=1", "NO_SUCH_SYMBOL=1: unknown symbol"),
    ("TRAIN_EPOCHS=0", "TRAIN_EPOCHS=0", "outside the range 1..100000"),
    # momentum exists for SGD only: the AdamW cells of the matrix could not take it
    ("OPT_MOMENTUM=0.5", "OPT_MOMENTUM=0.5",
     "its dependencies are not met (depends on OPTIMIZER_SGD) (in the lenet5, adamw, none cells)"),
])
def test_a_bad_swept_value_is_one_config_error_when_the_config_loads(text, item, why):
    with pytest.raises(C.ConfigError) as e:
        C.load(None, {**GRID, "MATRIX_SWEEP": text})
    assert str(e.value).startswith(f"MATRIX_SWEEP {item}: ")
    assert why in str(e.value) and "\n" not in str(e.value)


def test_defconfig_refuses_a_bad_sweep_in_one_line(tmp_path, capsys):
    code = kconfig_main(["--config", str(tmp_path / ".config"), "defconfig", "lenet5-lr-grid",
                         "--set", 'MATRIX_SWEEP="OPT_LR=0.1,fast"'])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not (tmp_path / ".config").exists()
    assert err.startswith("error:") and 'MATRIX_SWEEP OPT_LR=fast: CONFIG_OPT_LR="fast": not a number' in err
    assert len(err.splitlines()) == 1


def test_dry_run_refuses_a_bad_sweep_in_one_line(tmp_path):
    path = write_config(tmp_path, {**GRID, "MATRIX_SWEEP": "OPT_LR=0.1"})
    path.write_text(path.read_text().replace('CONFIG_MATRIX_SWEEP="OPT_LR=0.1"', 'CONFIG_MATRIX_SWEEP="OPT_WEIGHT_DECAY=-1"'))
    r = cli("dry-run", "--config", str(path))
    assert r.returncode == 2 and "MATRIX_SWEEP OPT_WEIGHT_DECAY=-1" in r.stderr and "outside the range" in r.stderr


# ---------------------------------------------------------------- expansion
def test_every_cell_runs_once_per_combination_and_its_id_and_config_carry_the_values():
    cfg, _, _ = C.load(None, {**GRID, "MATRIX_PRUNING_MAGNITUDE": "y", "MATRIX_SWEEP": "LR=0.01,0.1 OPT_WEIGHT_DECAY=0,0.1"})
    cells = matrix.expand(cfg)
    assert len(cells) == len(cells_mod.expand_base(cfg)) * 4 == 16
    assert len({c.id for c in cells}) == 16
    cell = next(c for c in cells if c.id == "lenet5_sgd_magnitude_50_opt_lr-0.1_opt_weight_decay-0_s1")
    assert cell.sweep == (("OPT_LR", "0.1"), ("OPT_WEIGHT_DECAY", "0"))
    one, _, _ = C.load(None, {**single(GRID), **dict(cell.overrides), "MATRIX": "n"})
    assert (one.optimizer, one.pruning, one.lr, one.weight_decay, one.seed) == ("sgd", "magnitude", 0.1, 0.0, 1)


def test_cells_round_trip_through_matrix_json(tmp_path):
    path = write_config(tmp_path, {**GRID, "RUN_RESULTS_DIR": str(tmp_path / "r")}, defconfig="grid-test")
    mdir = matrix.create(path, [], tmp_path / "r")
    cfg, _, _ = C.load(path)
    _, cells = matrix.load_cells(mdir)
    assert cells == matrix.expand(cfg) and cells[0].sweep == (("OPT_LR", "0.001"),)


# -------------------------------------------------------------------- tuning
def _run_matrix(tmp_path, name, sel):
    """A matrix created by matrix.create and its cells trained in this process (fast)."""
    results = tmp_path / "results"
    (tmp_path / name).mkdir()
    path = write_config(tmp_path / name, {**sel, "RUN_RESULTS_DIR": str(results)}, defconfig=name)
    mdir = matrix.create(path, [], results)
    _, cells = matrix.load_cells(mdir)
    for cell in cells:
        cfg, _, _ = C.load(mdir / "defconfig", {**dict(cell.overrides), "MATRIX": "n"})
        Trainer(load_task(cfg.model), cfg, mdir / cell.id, config_text="").fit()
    return path, mdir


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    return _run_matrix(tmp_path_factory.mktemp("tune"), "grid-test", GRID)


def _expected_choice(mdir, optimizer):
    spec = json.loads((mdir / "matrix.json").read_text())
    best = None
    for c in spec["cells"]:
        if c["optimizer"] == optimizer:
            final = json.loads((mdir / c["id"] / "final.json").read_text())
            if best is None or final["best_val_metric"] > best[0]:
                best = (final["best_val_metric"], dict(c["sweep"])["OPT_LR"])
    return best[1]


def test_grid_cells_trained_at_their_swept_value(grid):
    _, mdir = grid
    for c in json.loads((mdir / "matrix.json").read_text())["cells"]:
        cfg = json.loads((mdir / c["id"] / "config.json").read_text())["config"]
        assert cfg["lr"] == float(dict(c["sweep"])["OPT_LR"])


def test_comparison_takes_the_value_best_on_validation_and_adamwprune_its_bases(grid, tmp_path):
    _, gdir = grid
    comp = {**TINY, "MATRIX_OPTIMIZER_SGD": "y", "MATRIX_OPTIMIZER_ADAMW": "y", "MATRIX_OPTIMIZER_ADAMWPRUNE": "y",
            "MATRIX_PRUNING_NONE": "y", "MATRIX_PRUNING_MAGNITUDE": "y", "MATRIX_PRUNING_STATE": "y",
            "MATRIX_SEEDS": "2", "MATRIX_TUNED_FROM": str(gdir), "OPTIMIZER": "adamwprune"}
    cfg, _, _ = C.load(None, comp)
    cells = matrix.expand(cfg)
    want = {"sgd": _expected_choice(gdir, "sgd"), "adamw": _expected_choice(gdir, "adamw")}
    want["adamwprune"] = want["adamw"]  # base adamw: identical hyper-parameters
    for c in cells:
        assert c.tuned == (("OPT_LR", want[c.optimizer]),), c.id
        one, _, _ = C.load(None, {**single(comp), **dict(c.overrides), "MATRIX": "n"})
        assert one.lr == float(want[c.optimizer])
    assert {c.optimizer for c in cells} == {"sgd", "adamw", "adamwprune"}
    # the preset's name works too: the newest matrix of that name under RUN_RESULTS_DIR
    by_name, _, _ = C.load(None, {**comp, "MATRIX_TUNED_FROM": "grid-test", "RUN_RESULTS_DIR": str(gdir.parent)})
    assert matrix.expand(by_name) == cells


def test_matrix_json_and_summaries_record_the_grid_and_the_choice(grid, tmp_path):
    gpath, gdir = grid
    S.write_summary(gdir)
    md = (gdir / "summary.md").read_text()
    assert "## Hyper-parameter grid (MATRIX_SWEEP)" in md
    chosen = [line for line in md.splitlines() if "**chosen**" in line]
    assert len(chosen) == 2 and any(f"OPT_LR={_expected_choice(gdir, 'sgd')} " in line and "sgd + none" in line
                                    for line in chosen)
    assert "adamw + none [OPT_LR=0.001]" in md  # the method label carries the swept value
    comp = {**TINY, "MATRIX_OPTIMIZER_ADAMW": "y", "MATRIX_PRUNING_NONE": "y", "MATRIX_TUNED_FROM": str(gdir),
            "RUN_RESULTS_DIR": str(tmp_path / "r")}
    path = write_config(tmp_path, comp, defconfig="comp-test")
    cdir = matrix.create(path, [], tmp_path / "r")
    tuning = json.loads((cdir / "matrix.json").read_text())["tuning"]
    assert tuning["from"] == str(gdir)
    entry = next(e for e in tuning["choices"] if e["optimizer"] == "adamw")
    assert entry["values"] == {"OPT_LR": _expected_choice(gdir, "adamw")} and len(entry["candidates"]) == 3
    S.write_summary(cdir)
    cmd = (cdir / "summary.md").read_text()
    assert "## Hyper-parameters tuned on validation (MATRIX_TUNED_FROM)" in cmd and str(gdir) in cmd
    r = cli("dry-run", "--config", str(path))
    assert r.returncode == 0 and f"OPT_LR={entry['values']['OPT_LR']} (tuned)" in r.stdout


def test_update_graphs_draws_the_metric_against_the_swept_values(grid, tmp_path):
    _, gdir = grid
    pngs = {p.stem for p in G.update_graphs(gdir, images_root=tmp_path / "img")}
    assert "lenet5_sweep" in pngs and "lenet5_val_curves" in pngs
    report = (gdir / "graphs" / "report.md").read_text()
    assert "Validation metric against the swept values" in report and "OPT_LR=0.1" in report


def test_an_unfinished_or_missing_grid_is_a_clear_error(grid, tmp_path):
    _, gdir = grid
    broken = tmp_path / gdir.name
    import shutil

    shutil.copytree(gdir, broken)
    first = json.loads((broken / "matrix.json").read_text())["cells"][0]["id"]
    (broken / first / "final.json").unlink()
    cfg, _, _ = C.load(None, {**TINY, "MATRIX_OPTIMIZER_ADAMW": "y", "MATRIX_PRUNING_NONE": "y",
                              "MATRIX_TUNED_FROM": str(broken)})
    with pytest.raises(C.ConfigError, match="the grid is not finished .*`make continue DIR="):
        matrix.expand(cfg)
    cfg, _, _ = C.load(None, {**TINY, "MATRIX_OPTIMIZER_ADAMW": "y", "MATRIX_PRUNING_NONE": "y",
                              "MATRIX_TUNED_FROM": "never-run-grid", "RUN_RESULTS_DIR": str(tmp_path)})
    with pytest.raises(C.ConfigError, match=r"make defconfig DEFCONFIG=never-run-grid && make"):
        matrix.expand(cfg)
    cfg, _, _ = C.load(None, {**TINY, "MATRIX_OPTIMIZER_ADAM": "y", "MATRIX_PRUNING_NONE": "y",
                              "MATRIX_TUNED_FROM": str(gdir)})
    with pytest.raises(C.ConfigError, match="no completed dense lenet5 \\+ adam run"):
        matrix.expand(cfg)
    cfg, _, _ = C.load(None, {**TINY, "MATRIX_OPTIMIZER_ADAMW": "y", "MATRIX_PRUNING_NONE": "y",
                              "MATRIX_TUNED_FROM": str(gdir), "MATRIX_SWEEP": "OPT_LR=0.1,0.2"})
    with pytest.raises(C.ConfigError, match="both set OPT_LR"):
        matrix.expand(cfg)
