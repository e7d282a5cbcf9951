"""The slurm launcher's settings and messages (no cluster needed; tests/test_slurm.py runs one)."""
import json

import pytest

from adamwprune.config import kconfig as C
from adamwprune.run import matrix
from adamwprune.launch import slurm
from helpers import cli, write_config

BASE = {"MODEL": "lenet5", "DATASET": "synthetic", "DEVICE": "cpu", "OPTIMIZER": "adamw", "PRUNING": "none",
        "MATRIX": "y", "MATRIX_OPTIMIZER_ADAMW": "y", "MATRIX_OPTIMIZER_SGD": "y", "LAUNCHER": "slurm"}


def test_slurm_settings_come_from_kconfig_and_become_sbatch_options():
    cfg, _, _ = C.load(None, {**BASE, "SLURM_PARTITION": "gpu", "SLURM_TIME_MIN": "30", "SLURM_GPUS_PER_TASK": "1",
                              "SLURM_MEM_GB": "16", "SLURM_CPUS_PER_TASK": "8", "SLURM_ARRAY_PARALLELISM": "4",
                              "SLURM_SBATCH_EXTRA": "--account=proj --qos high --exclusive"})
    p = slurm.Settings.from_config(cfg).parameters("adamwprune-x", 10)
    assert {k: p[k] for k in ("partition", "time", "gpus_per_task", "mem", "cpus_per_task", "array_parallelism",
                              "signal_delay_s")} == {"partition": "gpu", "time": 30, "gpus_per_task": 1, "mem": "16GB",
                                                     "cpus_per_task": 8, "array_parallelism": 4, "signal_delay_s": 90}
    assert p["additional_parameters"] == {"requeue": True, "account": "proj", "qos": "high", "exclusive": True}
    default = slurm.Settings.from_config(C.load(None, BASE)[0]).parameters("x", 3)
    assert "partition" not in default and "gpus_per_task" not in default and "mem" not in default
    assert default["array_parallelism"] == 3 and default["time"] == 240


def test_submitit_accepts_the_parameters():
    import submitit.slurm.slurm as ss

    cfg, _, _ = C.load(None, {**BASE, "SLURM_SBATCH_EXTRA": "--hold"})
    text = ss._make_sbatch_string(command="true", folder="/tmp/x", map_count=3,
                                  **slurm.Settings.from_config(cfg).parameters("adamwprune-x", 3))
    for line in ("#SBATCH --time=240", "#SBATCH --signal=USR2@90", "#SBATCH --requeue", "#SBATCH --hold",
                 "#SBATCH --array=0-2%3", "#SBATCH --cpus-per-task=1"):
        assert line in text.splitlines(), text


@pytest.mark.parametrize("extra,why", [("-A proj", "not a long sbatch option"), ("account=x", "not a long")])
def test_short_or_bare_sbatch_options_are_refused(extra, why):
    cfg, _, _ = C.load(None, {**BASE, "SLURM_SBATCH_EXTRA": extra})
    with pytest.raises(C.ConfigError, match=why):
        slurm.Settings.from_config(cfg)


def test_settings_that_cannot_work_are_one_line_errors():
    cfg, _, _ = C.load(None, {**BASE, "SLURM_TIME_MIN": "1", "SLURM_SIGNAL_DELAY": "60"})
    with pytest.raises(C.ConfigError, match="SLURM_SIGNAL_DELAY=60: not shorter than the time limit"):
        slurm.Settings.from_config(cfg)
    cfg, _, _ = C.load(None, {**BASE, "NPROC": "2", "SLURM_GPUS_PER_TASK": "1", "BATCH_SIZE": "64"})
    with pytest.raises(C.ConfigError, match="RUN_NPROC=2 runs 2 ranks in one Slurm task: set SLURM_GPUS_PER_TASK=2"):
        slurm.Settings.from_config(cfg)
    with pytest.raises(C.ConfigError, match=r"CONFIG_LAUNCHER_SLURM=y: its dependencies are not met \(depends on MATRIX\)"):
        C.load(None, {"LAUNCHER": "slurm"})


def test_cells_never_get_the_launcher_symbols(tmp_path):
    path = write_config(tmp_path, {**BASE, "RUN_RESULTS_DIR": str(tmp_path / "results")}, defconfig="t")
    mdir = matrix.create(path, [("LAUNCHER", "slurm"), ("SLURM_TIME_MIN", "9"), ("EPOCHS", "2")], tmp_path / "r")
    meta, cells = matrix.load_cells(mdir)
    cmd = matrix.cell_command(mdir, cells[0], meta, resume=True)
    assert "--override=EPOCHS=2" in cmd and cmd[-1] == "--resume"
    assert not [a for a in cmd if "LAUNCHER" in a or "SLURM" in a]


def test_continue_takes_launcher_settings_only(tmp_path):
    path = write_config(tmp_path, {**BASE, "RUN_RESULTS_DIR": str(tmp_path / "results")}, defconfig="t")
    mdir = matrix.create(path, [], tmp_path / "results")
    r = cli("continue", "--dir", str(mdir), "--set", "OPT_LR=0.5")
    assert r.returncode == 2 and "`make continue` takes launcher settings only" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1


def test_continue_takes_jobs(tmp_path, monkeypatch):
    """JOBS= (cells at once) is how the matrix runs, not what a cell trains: continue takes it."""
    from adamwprune import cli as cli_mod

    local = {k: v for k, v in BASE.items() if k != "LAUNCHER"}
    path = write_config(tmp_path, {**local, "RUN_RESULTS_DIR": str(tmp_path / "results")}, defconfig="t")
    mdir = matrix.create(path, [("JOBS", "1")], tmp_path / "results")
    seen = {}
    monkeypatch.setattr(matrix, "run", lambda d, **kw: seen.update(kw) or 0)
    assert cli_mod.continue_target(mdir, launcher_set=[("JOBS", "2")]) == 0
    assert seen["jobs"] == 2
    assert cli_mod.continue_target(mdir) == 0 and seen["jobs"] is None  # the matrix's own JOBS


def test_status_of_a_slurm_matrix_says_which_task_runs_each_cell(tmp_path, monkeypatch):
    path = write_config(tmp_path, {**BASE, "RUN_RESULTS_DIR": str(tmp_path / "results")}, defconfig="t")
    mdir = matrix.create(path, [], tmp_path / "results")
    _, cells = matrix.load_cells(mdir)
    (mdir / slurm.SLURM_JSON).write_text(json.dumps({"submissions": [
        {"job_id": "7", "tasks": {"7_0": cells[0].id, "7_1": cells[1].id}}]}))
    for c in cells:
        (mdir / c.id).mkdir(exist_ok=True)
        (mdir / c.id / "cell.json").write_text(json.dumps({"status": "running", "launcher": "slurm"}))
    states = {"7_0": slurm.TaskState("7_0", "PENDING", 1, "", "BeginTime"),
              "7_1": slurm.TaskState("7_1", "RUNNING", 0, "node3", "None")}
    monkeypatch.setattr(slurm, "query", lambda tasks: states)
    view = slurm.StatusView(mdir)
    assert view.header() == "; slurm job arrays 7"
    assert view.cell(cells[0].id, "interrupted") == ("requeued", "slurm 7_0 PENDING (BeginTime), requeued 1x")
    assert view.cell(cells[1].id, "interrupted") == ("running", "slurm 7_1 RUNNING on node3")
    with pytest.raises(slurm.SlurmError, match="2 of its Slurm tasks are still queued or running"):
        slurm.refuse_if_active(mdir)

    def unavailable(tasks):
        raise slurm.SlurmError("squeue failed: no cluster")

    monkeypatch.setattr(slurm, "query", unavailable)
    view = slurm.StatusView(mdir)
    assert view.cell(cells[0].id, "interrupted") == ("unknown", "slurm 7_0")
    assert "Slurm not available: squeue failed: no cluster" in view.header()


def test_without_sbatch_the_slurm_launcher_says_where_to_run(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    cfg, _, _ = C.load(None, BASE)
    path = write_config(tmp_path, {**BASE, "RUN_RESULTS_DIR": str(tmp_path / "results")}, defconfig="t")
    mdir = matrix.create(path, [], tmp_path / "results")
    with pytest.raises(slurm.SlurmError, match="sbatch/srun are not on PATH.*slurm-local.sh start"):
        slurm.run_matrix(mdir, cfg)


def test_launcher_settings_on_continue_of_a_single_run_are_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    r = cli("continue", "--dir", str(run), "--launcher", "slurm")
    assert r.returncode == 2 and "is a single run" in r.stderr and "LAUNCHER= and SET=" in r.stderr, r.stderr
