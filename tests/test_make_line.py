"""The make line says what it does: variables work or are refused, choices say what they
changed, the checkout stays clean (issue 13, "Wrong words" and "Friction")."""
import os
import subprocess
import time

import kconfiglib
import pytest

from adamwprune import cli as CLI
from adamwprune.config import kconfig as C
from adamwprune.config import cli as kconfig_cli
from adamwprune.run import matrix
from adamwprune import monitor
from adamwprune.config import notes
from adamwprune.config.kconfig import ROOT
from adamwprune.registry import PruneSchedule
from helpers import write_config


def make(*args):
    return subprocess.run(["make", "--no-print-directory", "-n", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_a_make_line_variable_that_is_not_ours_is_refused_with_the_fix():
    r = make("RUN_RESULTS_DIR=/tmp/elsewhere", "help")
    assert r.returncode != 0
    assert "RUN_RESULTS_DIR=/tmp/elsewhere is not a make variable" in r.stderr
    assert 'SET="RUN_RESULTS_DIR=..."' in r.stderr
    assert make("EPOCHS=3", "DIR=x", "ACCEPT_CONFIG_CHANGES=1", "help").returncode == 0


def test_continue_and_status_look_under_the_results_dir_the_config_names(tmp_path, capsys):
    path = write_config(tmp_path, {"MODEL": "lenet5", "RUN_RESULTS_DIR": str(tmp_path / "elsewhere")})
    assert CLI.main(["continue", "--config", str(path)]) == 0
    assert f"every run under {tmp_path / 'elsewhere'} has finished" in capsys.readouterr().out
    assert CLI.main(["status", "--config", str(path), "--set", f"RUN_RESULTS_DIR={tmp_path / 'other'}"]) == 0
    assert f"no matrix under {tmp_path / 'other'}" in capsys.readouterr().out
    assert CLI.main(["continue", "--config", str(path), "--override", "SEED=3"]) == 2
    assert "takes no training overrides (SEED)" in capsys.readouterr().err


def test_trackio_test_logs_where_trackio_view_looks():
    lines = make("trackio-test", "trackio-view").stdout.splitlines()
    test = next(line for line in lines if "tracker_test.py trackio" in line).split()
    view = next(line for line in lines if "tracking view" in line).split()
    results = test[test.index("--dir") + 1]  # tracker_test.py stores trackio runs in <results>/trackio
    assert os.path.normpath(os.path.join(results, "trackio")) == os.path.normpath(view[view.index("--dir") + 1])


def test_gputop_picks_the_newest_results_directory_by_time_not_name(tmp_path):
    old, new = tmp_path / "20991231-000000_b", tmp_path / "20000101-000000_a"
    for path in (old, new):
        path.mkdir()
    os.utime(old, (time.time() - 100, time.time() - 100))
    (tmp_path / "trackio").mkdir()  # trackio's store is not a run
    assert monitor.newest_results_dir(tmp_path) == new


def test_savedefconfig_and_update_graphs_leave_the_checkout_clean():
    r = subprocess.run(["git", "check-ignore", "defconfig", "images/lenet5/lenet5_val_curves.png"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.stdout.split() == ["defconfig", "images/lenet5/lenet5_val_curves.png"]


def test_menuconfig_keeps_the_preset_name_a_matrix_is_named_after(tmp_path, monkeypatch):
    config = write_config(tmp_path, {"MODEL": "lenet5"}, defconfig="lenet5-compare")
    # What `make menuconfig` does on save: kconfiglib writes KCONFIG_CONFIG_HEADER first.
    monkeypatch.setenv("KCONFIG_CONFIG_HEADER", kconfig_cli.config_header(config))
    monkeypatch.setenv("srctree", str(ROOT))
    kconf = kconfiglib.Kconfig(str(ROOT / "Kconfig"), warn_to_stderr=False)
    kconf.load_config(str(config))
    kconf.write_config(str(config))
    assert matrix.config_name(config) == "lenet5-compare"


def test_an_override_says_what_else_it_changed(tmp_path, capsys):
    assert kconfig_cli.main(["--config", str(tmp_path / ".config"), "defconfig", "lenet5-adamw",
                             "--set", "OPTIMIZER_ADAMWPRUNE=y"]) == 0
    out = capsys.readouterr().out
    assert "note: the overrides also changed" in out
    assert "CONFIG_PRUNING none -> state" in out and "CONFIG_PRUNING_TARGET_SPARSITY unset -> 0.7" in out
    assert "CONFIG_OPTIMIZER" not in out.split("also changed", 1)[1].split("CONFIG_PRUNING ", 1)[0]


def test_an_out_of_range_sparsity_is_reported_as_out_of_range_on_a_dense_preset():
    with pytest.raises(C.ConfigError, match=r"PRUNING_TARGET_SPARSITY=\"1.5\": outside the range \[0, 0.999\]"):
        C.load(ROOT / "lenet5" / "defconfigs" / "lenet5-adamw", {"PRUNING_TARGET_SPARSITY": "1.5"})


@pytest.mark.parametrize("start,end,interval,warned", [(1, 2, 50, True), (0, 0, 1, True), (10, 60, 50, True), (10, 80, 50, False),
                                                       (10, 80, 10, False)])
def test_a_ramp_with_one_mask_update_warns(start, end, interval, warned):
    warning = notes.ramp_warning(PruneSchedule(target=0.7, start=start, end=end, interval=interval))
    assert (warning is not None) == warned
    assert notes.ramp_warning(PruneSchedule(target=0.0, start=start, end=end, interval=interval)) is None


def _gpt2_config(tmp_path):
    return write_config(tmp_path, {"MODEL": "gpt2", "DATASET": "text", "DEVICE": "cpu", "GPT2_SIZE": "tiny",
                                   "GPT2_TEXT_SOURCE": str(tmp_path / "no-corpus"), "DATA_DIR": str(tmp_path / "d")})


def test_a_gpt2_preset_whose_corpus_is_missing_says_where_to_get_it(tmp_path, capsys):
    assert CLI.main(["run", "--config", str(_gpt2_config(tmp_path)), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / "no-corpus") in err and "gutenberg.org" in err


def test_a_gpt2_run_that_cannot_load_its_tokenizer_offline_is_one_line(tmp_path, capsys, monkeypatch):
    from adamwprune.data import tokens

    (tmp_path / "no-corpus").mkdir()
    (tmp_path / "no-corpus" / "a.txt").write_text("to be or not to be")

    def offline(name="gpt2"):
        raise tokens.DataPrepError("cannot load the tiktoken 'gpt2' BPE files (ConnectionError), probably offline")

    monkeypatch.setattr(tokens, "get_encoding", offline)
    assert CLI.main(["run", "--config", str(_gpt2_config(tmp_path)), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "probably offline" in err


def test_dynamic_sparse_training_is_warned_only_when_its_masks_never_move():
    from adamwprune.config import notes
    from adamwprune.registry import PruneSchedule

    moving = PruneSchedule(target=0.9, start=0, end=46, interval=20)
    frozen = PruneSchedule(target=0.9, start=0, end=46, interval=50)
    assert notes.ramp_warning(moving, dynamic=True) is None
    assert "masks stay as drawn" in notes.ramp_warning(frozen, dynamic=True)
    assert notes.ramp_warning(frozen, ramps=False) is None  # SR-STE: a mask at every forward
