"""A run's configuration is fixed at creation; a changed default stops `make continue`
with the list of differing symbols, unless accepted (issue 13, item 2)."""
import json
import shutil

import pytest

from adamwprune import cli as CLI
from adamwprune.config import kconfig as C
from adamwprune.run import matrix
from adamwprune.config import pinned
from adamwprune.config.kconfig import ROOT
from helpers import write_config

BASE = {"MODEL": "lenet5", "DATASET": "synthetic", "DATA_SYNTHETIC_SIZE": "64", "BATCH_SIZE": "16",
        "DEVICE": "cpu", "MAX_ITERS": "4", "TRAIN_EVAL_INTERVAL": "2", "RUN_MONITOR_INTERVAL": "0.2"}


def changed_tree(tmp_path):
    """A copy of the Kconfig tree where TRAIN_WARMUP_STEPS defaults to 3 instead of 0
    (what a `git pull` may bring)."""
    root = tmp_path / "tree"
    for path in [*ROOT.glob("Kconfig*"), *ROOT.glob("*/Kconfig")]:
        dest = root / path.relative_to(ROOT)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
    text = (root / "Kconfig").read_text()
    old = "\tdefault 700 if MODEL_GPT2\n\tdefault 0\n"
    assert text.count(old) == 1
    (root / "Kconfig").write_text(text.replace(old, "\tdefault 700 if MODEL_GPT2\n\tdefault 3\n"))
    return root


def _matrix(tmp_path):
    path = write_config(tmp_path, {**BASE, "MATRIX": "y", "OPTIMIZER": "adamw", "MATRIX_OPTIMIZER_ADAMW": "y",
                                   "MATRIX_PRUNING_NONE": "y", "MATRIX_SEEDS": "2"}, defconfig="pin-test")
    return matrix.create(path, [], tmp_path / "results")


def test_every_cell_of_a_new_matrix_has_its_full_configuration_pinned(tmp_path):
    mdir = _matrix(tmp_path)
    for cell in json.loads((mdir / "matrix.json").read_text())["cells"]:
        stored = pinned.pinned(mdir / cell["id"])
        assert stored["seed"] == cell["seed"] and stored["warmup_steps"] == 0 and stored["matrix"] is False
        assert set(stored) == {f.name for f in C.FIELDS}


def test_a_resumed_matrix_after_a_changed_default_stops_with_the_differing_symbols(tmp_path, monkeypatch, capsys):
    mdir = _matrix(tmp_path)
    tree = changed_tree(tmp_path)
    with pytest.raises(pinned.ConfigChanged) as err:
        matrix.run(mdir, root=tree)
    assert "CONFIG_TRAIN_WARMUP_STEPS 0 -> 3" in str(err.value) and "2 unfinished cell(s)" in str(err.value)
    assert not list(mdir.glob("*/cell.json"))  # nothing ran
    monkeypatch.setattr(CLI, "ROOT", tree)  # `make continue` after the pull
    assert CLI.main(["continue", "--dir", str(mdir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CONFIG_TRAIN_WARMUP_STEPS 0 -> 3" in err and "ACCEPT_CONFIG_CHANGES=1" in err


def test_accepting_the_change_pins_the_new_values_and_records_it_in_the_matrix(tmp_path):
    mdir = _matrix(tmp_path)
    meta, cells = matrix.load_cells(mdir)
    matrix._check_config(mdir, cells, meta, accept=True, root=changed_tree(tmp_path))
    assert all(pinned.pinned(mdir / c.id)["warmup_steps"] == 3 for c in cells)
    entry = json.loads((mdir / "matrix.json").read_text())["config_changes"][-1]
    assert entry["changes"] == [["CONFIG_TRAIN_WARMUP_STEPS", 0, 3]] and entry["cells"] == sorted(c.id for c in cells)
    history = json.loads((mdir / cells[0].id / "config.json").read_text())["config_changes"]
    assert history[-1]["changes"] == [["CONFIG_TRAIN_WARMUP_STEPS", 0, 3]]
    from adamwprune.report.summary import write_summary

    md = write_summary(mdir)[1].read_text()  # the summary does not compare them as one experiment silently
    assert "Configuration changed on resume" in md and "CONFIG_TRAIN_WARMUP_STEPS 0 -> 3" in md


def _run_from_minimal_config(tmp_path):
    """An interrupted single run whose .config is a minimal file (as a preset is)."""
    kconf = C.load(None, BASE)[2]
    path = tmp_path / "defconfig"
    path.write_text(C.minimal_text(kconf))
    run = tmp_path / "results" / "run"
    assert CLI.main(["run", "--config", str(path), "--run-dir", str(run)]) == 0
    (run / "final.json").unlink()
    return run


def test_continue_of_a_single_run_after_a_changed_default_stops_then_accepts(tmp_path, monkeypatch, capsys):
    run = _run_from_minimal_config(tmp_path)
    monkeypatch.setattr(CLI, "ROOT", changed_tree(tmp_path))
    capsys.readouterr()
    assert CLI.main(["continue", "--dir", str(run)]) == 2
    assert "CONFIG_TRAIN_WARMUP_STEPS 0 -> 3" in capsys.readouterr().err
    assert not (run / "final.json").exists()
    assert CLI.main(["continue", "--dir", str(run), "--accept-config-changes"]) == 0
    stored = json.loads((run / "config.json").read_text())
    assert stored["config"]["warmup_steps"] == 3
    assert stored["config_changes"][-1]["changes"] == [["CONFIG_TRAIN_WARMUP_STEPS", 0, 3]]
    assert json.loads((run / "final.json").read_text())["status"] == "completed"


def test_runtime_settings_may_differ_on_resume():
    old = {"threads": 1, "log_interval": 10, "lr": 0.1}
    assert pinned.differences(old, {"threads": 2, "log_interval": 5, "lr": 0.1}) == []
    assert pinned.differences(old, {**old, "lr": 0.2}) == [("lr", 0.1, 0.2)]
