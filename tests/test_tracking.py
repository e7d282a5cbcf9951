"""Experiment trackers: naming, key mapping, credentials, offline wandb, local trackio.

Nothing here touches the network or the real home directory: HOME, NETRC and the
WANDB_* / TRACKIO_* variables are replaced by temporary ones. Tests that need the
trackio or wandb package skip without it (they are optional extras).
"""
import importlib.util
import json
import os
import queue
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import types
import urllib.request

import pytest

from adamwprune.report import tracking as T
from adamwprune.report.tracking import (FanOut, NullTracker, TrackerError, TrackerUnavailable, build_trackers,
                                 final_to_metrics, parse_tracker_names, project_name, row_to_metrics,
                                 wandb_credentials, wandb_mode)

SCRIPT = T.ROOT / "scripts" / "tracker_test.py"
ROW = {"step": 40, "epoch": 2.5, "train_loss": 0.31, "val_loss": 0.35, "val_metric": 97.5,
       "test_loss": 0.36, "test_metric": 97.1, "sparsity": 0.5, "lr": 1e-3, "elapsed_s": 12.0}


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    """No real credentials or tracker settings are visible; returns the fake HOME."""
    home = tmp_path / "home"
    home.mkdir()
    for var in list(os.environ):
        if var.startswith(("WANDB_", "TRACKIO_")) or var in ("NETRC", "HF_TOKEN"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_SILENT", "true")  # restored afterwards; WandbTracker sets it too
    monkeypatch.setenv("HF_HOME", str(home / ".cache" / "huggingface"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / ".config" / "wandb"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(home / ".cache" / "wandb"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(home / ".local" / "share" / "wandb"))
    return home


def kwargs(tmp_path, **extra):
    return dict(project="lenet5-abcde", run_name="20260101-000000_lenet5", group="lenet5-adamw",
                config={"model": "lenet5", "lr": 1e-3}, directory=tmp_path / "run", **extra)


# ------------------------------------------------------------------ naming
def test_project_name_is_model_dash_five_hex_and_stable():
    name = project_name("lenet5", host="node1", path="/work/a")
    assert re.fullmatch(r"lenet5-[0-9a-f]{5}", name)
    assert project_name("lenet5", host="node1", path="/work/a") == name


def test_project_name_differs_by_host_and_by_checkout_path():
    base = project_name("gpt2", host="node1", path="/work/a")
    assert project_name("gpt2", host="node2", path="/work/a") != base
    assert project_name("gpt2", host="node1", path="/work/b") != base


def test_project_name_defaults_to_this_host_and_this_checkout():
    assert project_name("resnet18") == project_name("resnet18", host=socket.gethostname(), path=T.ROOT)


def test_parse_tracker_names_accepts_none_lists_and_comma_separated():
    assert parse_tracker_names("none") == parse_tracker_names("") == parse_tracker_names(None) == []
    assert parse_tracker_names(["none"]) == []
    assert parse_tracker_names("trackio,wandb") == ["trackio", "wandb"]
    assert parse_tracker_names(" wandb , trackio,wandb") == ["wandb", "trackio"]
    for bad in ("tensorboard", "none,wandb"):
        with pytest.raises(ValueError, match="none, or one or more of trackio, wandb"):
            parse_tracker_names(bad)


# ----------------------------------------------------------------- metrics
def test_row_to_metrics_maps_every_engine_column_to_its_key():
    assert row_to_metrics(ROW) == {
        "train/loss": 0.31, "val/loss": 0.35, "val/metric": 97.5, "test/loss": 0.36,
        "test/metric": 97.1, "sparsity": 0.5, "lr": 1e-3, "epoch": 2.5, "elapsed_s": 12.0}


def test_row_to_metrics_leaves_out_missing_and_none_values_and_the_step():
    assert row_to_metrics({"step": 3, "train_loss": None, "val_metric": 10, "flag": True}) == {"val/metric": 10.0}


def test_final_to_metrics_maps_summary_and_memory():
    final = {"best_val_metric": 98.0, "best_step": 30, "test_metric_at_best": 97.0, "final_sparsity": 0.9,
             "steps": 40, "wall_time_s": 50.0, "step_time_s": 0.02, "peak_memory_bytes": 1000,
             "sampled_memory": {"peak_bytes": 900, "mean_bytes": 800, "backend": "nvml"},
             "memory": {"parameters": {"bytes": 10, "bytes_per_param": 4.0}, "total": {"bytes": 40}},
             "status": "completed"}
    assert final_to_metrics(final) == {
        "final/best_val_metric": 98.0, "final/best_step": 30.0, "final/test_metric_at_best": 97.0,
        "final/sparsity": 0.9, "final/steps": 40.0, "final/wall_time_s": 50.0, "step_time_s": 0.02,
        "memory/peak_bytes": 1000.0, "memory/sampled_peak_bytes": 900.0, "memory/sampled_mean_bytes": 800.0,
        "memory/parameters_bytes": 10.0, "memory/total_bytes": 40.0}


# ---------------------------------------------------------------- trackers
def test_no_tracker_is_a_null_object(tmp_path):
    for names in ([], ["none"], "none"):
        tracker = build_trackers(names, **kwargs(tmp_path))
        assert isinstance(tracker, NullTracker)
        with tracker as t:
            t.log({"train/loss": 1.0}, step=1)
            t.log_config({"a": 1})
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["trackio", "wandb"])
def test_missing_package_fails_in_one_line_naming_the_install(name, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, name, None)  # makes `import name` fail
    with pytest.raises(TrackerUnavailable) as err:
        build_trackers([name], **kwargs(tmp_path))
    message = str(err.value)
    assert "\n" not in message
    assert message == (f"TRACKER={name} needs the {name} package: pip install '.[{name}]' "
                       f"(or pip install {name})")


def test_missing_package_starts_no_other_tracker(tmp_path, monkeypatch):
    started = []
    fake = types.ModuleType("trackio")
    fake.init = lambda **kw: started.append(kw)
    monkeypatch.setitem(sys.modules, "trackio", fake)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(TrackerUnavailable, match="TRACKER=wandb"):
        build_trackers(["trackio", "wandb"], **kwargs(tmp_path))
    assert started == []


class Recorder(T.Tracker):
    def __init__(self, name, fail_on=None):
        self.name, self.fail_on, self.calls = name, fail_on, []

    def log(self, metrics, step):
        if self.fail_on == "log":
            raise OSError("disk full\nsecond line")
        self.calls.append(("log", dict(metrics), step))

    def finish(self, status="completed"):
        self.calls.append(("finish", status))


def test_fanout_drops_a_failing_tracker_with_one_line_and_keeps_the_others(capsys):
    good, bad = Recorder("trackio"), Recorder("wandb", fail_on="log")
    fan = FanOut([good, bad])
    fan.log({"lr": 0.1}, step=1)
    fan.log({"lr": 0.2}, step=2)
    fan.finish("diverged")
    out = capsys.readouterr().out.splitlines()
    assert out == ["[adamwprune] wandb: log failed (OSError: disk full); wandb is off for the rest of this run"]
    assert good.calls == [("log", {"lr": 0.1}, 1), ("log", {"lr": 0.2}, 2), ("finish", "diverged")]
    assert bad.calls == [] and fan.failed == ["wandb"]


def test_context_manager_finishes_failed_on_an_exception():
    rec = Recorder("trackio")
    with pytest.raises(KeyError):
        with FanOut([rec]):
            raise KeyError("x")
    assert rec.calls == [("finish", "failed")]


# ------------------------------------------------------------ credentials
def test_no_credentials_in_an_empty_home(clean_env):
    assert wandb_credentials() is None
    assert wandb_mode() == ("offline", "no W&B credentials (WANDB_API_KEY, ~/.netrc from `wandb login`)")


def test_api_key_in_the_environment_means_online(clean_env, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_credentials() == "WANDB_API_KEY"
    assert wandb_mode()[0] == "online"


def test_netrc_entry_for_the_wandb_host_is_found(clean_env):
    (clean_env / ".netrc").write_text("machine example.org login a password b\n"
                                      "machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert wandb_credentials() == str(clean_env / ".netrc")


def test_netrc_for_another_host_or_without_password_is_not_credentials(clean_env):
    (clean_env / ".netrc").write_text("machine example.org login a password b\n"
                                      "machine api.wandb.ai login user\n")
    assert wandb_credentials() is None


def test_netrc_location_from_NETRC_and_host_from_WANDB_BASE_URL(clean_env, tmp_path, monkeypatch):
    path = tmp_path / "elsewhere.netrc"
    path.write_text("machine wandb.corp.example login user password secret\n")
    monkeypatch.setenv("NETRC", str(path))
    assert wandb_credentials() is None  # the default host has no entry
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.corp.example")
    assert wandb_credentials() == str(path)


def test_settings_file_gives_base_url_and_api_key(clean_env):
    settings = clean_env / ".config" / "wandb" / "settings"
    settings.parent.mkdir(parents=True)
    (clean_env / ".netrc").write_text("machine wandb.corp.example login user password secret\n")
    settings.write_text("[default]\nbase_url = https://wandb.corp.example\n")
    assert wandb_credentials() == str(clean_env / ".netrc")
    (clean_env / ".netrc").unlink()
    settings.write_text("[default]\napi_key = " + "s" * 40 + "\n")
    assert wandb_credentials() == "wandb settings file"


def test_unreadable_netrc_is_no_credentials_not_a_crash(clean_env):
    (clean_env / ".netrc").write_text("machine api.wandb.ai login\n  macdef broken")
    assert wandb_credentials() is None


def test_wandb_mode_respects_the_users_offline_and_disabled(clean_env, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode() == ("offline", "WANDB_MODE=offline")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode()[0] == "disabled"
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY")
    assert wandb_mode()[0] == "offline"  # online needs credentials we do not have
    monkeypatch.setenv("WANDB_DISABLED", "true")
    assert wandb_mode()[0] == "disabled"


# ------------------------------------------------------------------- wandb
def fake_wandb(fail_online: bool, fail_offline: bool = False):
    calls = []

    class Run:
        url = "https://wandb.example/run"
        summary, config = {}, {}

        def log(self, metrics, step):
            calls.append(("log", metrics, step))

        def finish(self, exit_code):
            calls.append(("finish", exit_code, dict(self.summary)))

    def init(settings, mode, **kw):
        calls.append(("init", mode, settings, kw))
        if fail_online and mode == "online":
            raise ConnectionError("api.wandb.ai unreachable")
        if fail_offline and mode == "offline":
            raise PermissionError("read-only file system\nmore detail")
        return Run()

    module = types.ModuleType("wandb")
    module.Settings, module.init = dict, init
    module.teardown = lambda: calls.append(("teardown",))
    return module, calls


def test_wandb_falls_back_to_offline_when_online_start_fails(clean_env, tmp_path, monkeypatch, capsys):
    module, calls = fake_wandb(fail_online=True)
    monkeypatch.setitem(sys.modules, "wandb", module)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    tracker = build_trackers(["wandb"], **kwargs(tmp_path))
    tracker.log({"lr": 1.0}, step=3)
    tracker.finish("diverged")
    assert [c[:2] for c in calls[:3]] == [("init", "online"), ("teardown",), ("init", "offline")]
    _, mode, settings, kw = calls[2]
    assert settings["silent"] and settings["console"] == "off" and settings["mode"] == "offline"
    assert settings["init_timeout"] == T.WANDB_INIT_TIMEOUT_S
    assert kw["project"] == "lenet5-abcde" and kw["name"] == "20260101-000000_lenet5"
    assert kw["group"] == "lenet5-adamw" and kw["config"] == {"model": "lenet5", "lr": 1e-3}
    assert kw["dir"] == str((tmp_path / "run").resolve())
    assert calls[3:] == [("log", {"lr": 1.0}, 3), ("finish", 1, {"status": "diverged"})]
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "online start failed (ConnectionError: api.wandb.ai unreachable)" in out[0]
    assert "logging offline to" in out[0]


def test_a_tracker_that_cannot_start_is_reported_and_the_run_goes_on(clean_env, tmp_path, monkeypatch, capsys):
    module, calls = fake_wandb(fail_online=False, fail_offline=True)
    monkeypatch.setitem(sys.modules, "wandb", module)
    tracker = build_trackers(["wandb"], **kwargs(tmp_path))
    tracker.log({"lr": 1.0}, step=1)
    tracker.finish("completed")
    assert tracker.failed == ["wandb"] and tracker.trackers == []
    assert capsys.readouterr().out.splitlines() == [
        "[adamwprune] wandb: could not start (PermissionError: read-only file system); "
        "this run is not tracked by wandb"]


def test_wandb_logs_offline_into_the_run_directory_without_credentials(clean_env, tmp_path, capsys):
    wandb = pytest.importorskip("wandb")
    tracker = build_trackers(["wandb"], **kwargs(tmp_path))
    try:
        for step in range(1, 6):
            tracker.log(row_to_metrics(dict(ROW, step=step, train_loss=1.0 / step)), step=step)
        tracker.log_config({"total_steps": 5})
        tracker.finish("completed")
    finally:
        wandb.teardown()
    assert tracker.failed == []
    out = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(out) == 1 and out[0].startswith("[adamwprune] wandb: no W&B credentials")
    (record,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    data = record.read_bytes()
    assert b"train/loss" in data and b"lenet5-abcde" in data and b"20260101-000000_lenet5" in data


# ------------------------------------------------------------------ trackio
def test_trackio_directory_argument_then_environment_then_beside_the_run(tmp_path, monkeypatch):
    monkeypatch.delenv("TRACKIO_DIR", raising=False)
    run = tmp_path / "results" / "20260101_lenet5"
    assert T.trackio_dir(None, run) == (tmp_path / "results" / "trackio").resolve()
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "env"))
    assert T.trackio_dir(None, run) == (tmp_path / "env").resolve()
    assert T.trackio_dir(tmp_path / "arg", run) == (tmp_path / "arg").resolve()


def test_trackio_cannot_switch_directory_once_imported(tmp_path, monkeypatch):
    fake = types.ModuleType("trackio")
    fake.utils = types.SimpleNamespace(TRACKIO_DIR=tmp_path / "a")
    monkeypatch.setitem(sys.modules, "trackio", fake)
    assert T.import_trackio(tmp_path / "a") is fake
    with pytest.raises(TrackerError, match="already imported .* use one trackio directory per process"):
        T.import_trackio(tmp_path / "b")


def test_trackio_config_keys_starting_with_underscore_are_renamed():
    assert T._trackio_config({"_x": 1, "y": 2}) == {"cfg_x": 1, "y": 2}


def test_trackio_view_without_data_says_how_to_get_some(tmp_path):
    with pytest.raises(TrackerError, match="no trackio data in .*TRACKER=trackio"):
        T.trackio_view("lenet5-abcde", tmp_path / "empty")


@pytest.fixture(scope="module")
def script():
    """scripts/tracker_test.py as a module, for the runs that can stay in this process."""
    spec = importlib.util.spec_from_file_location("tracker_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trackio_results(tmp_path_factory):
    """The tracker test script's trackio run, in a subprocess: trackio fixes its
    directory when it is first imported."""
    pytest.importorskip("trackio")
    tmp = tmp_path_factory.mktemp("trackio")
    home = tmp / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "TRACKIO_"))}
    env.update(HOME=str(home), HF_HOME=str(home / "hf"))
    done = subprocess.run([sys.executable, str(SCRIPT), "trackio", "--dir", str(tmp / "results")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return tmp, done.stdout


def test_tracker_test_script_logs_to_trackio_in_the_results_tree(trackio_results):
    tmp, stdout = trackio_results
    project = project_name("tracker-test")
    db = tmp / "results" / "trackio" / f"{project}.db"
    assert f"in {db.parent}" in stdout and f"--project {project}" in stdout
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT step, metrics FROM metrics ORDER BY id").fetchall()
        (config,) = conn.execute("SELECT config FROM configs").fetchone()
    assert [r[0] for r in rows] == list(range(1, 21)) + [20]  # 20 evaluations, then the final keys
    assert set(json.loads(rows[0][1])) == set(T.ROW_KEYS.values()) - {T.STEP_TIME_S}
    assert json.loads(rows[-1][1])["final/steps"] == 20
    config = json.loads(config)
    assert config["_Group"] == "tracker-test" and config["total_steps"] == 20
    assert not (tmp / "home" / "hf" / "trackio").exists()


def test_tracker_test_script_logs_wandb_offline(script, clean_env, tmp_path, capsys):
    wandb = pytest.importorskip("wandb")
    try:
        assert script.main(["wandb", "--dir", str(tmp_path / "results")]) == 0
    finally:
        wandb.teardown()
    out = capsys.readouterr().out
    assert "no W&B credentials" in out and "wandb sync" in out
    assert list((tmp_path / "results").glob("*_tracker-test-wandb/wandb/offline-run-*/run-*.wandb"))


def test_tracker_test_script_without_the_package_fails_in_one_line(script, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)
    assert script.main(["wandb", "--dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == ("error: TRACKER=wandb needs the wandb package: pip install '.[wandb]' "
                                       "(or pip install wandb)\n")


def test_trackio_view_serves_the_logged_runs(trackio_results):
    tmp, _ = trackio_results
    store, project = tmp / "results" / "trackio", project_name("tracker-test")
    env = dict(os.environ, PYTHONUNBUFFERED="1", HOME=str(tmp / "home"))
    view = subprocess.Popen([sys.executable, "-m", "adamwprune.report.tracking", "view", "--project", project,
                             "--dir", str(store), "--no-browser"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in view.stdout], daemon=True).start()
    try:
        url, deadline = None, time.time() + 60
        while url is None:
            line = lines.get(timeout=max(0.1, deadline - time.time()))  # queue.Empty fails the test
            match = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
            url = match.group(1) if match else None
        request = urllib.request.Request(f"{url}/api/get_runs_for_project", method="POST",
                                         data=json.dumps({"data": [project]}).encode(),
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as reply:
            runs = json.load(reply)["data"]
        assert [r["name"].endswith("_tracker-test-trackio") for r in runs] == [True]
    finally:
        view.terminate()
        view.wait(timeout=10)

def closed_local_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_wandb_with_credentials_but_no_server_goes_offline_in_bounded_time(clean_env, tmp_path, monkeypatch,
                                                                         capsys):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setattr(T, "WANDB_INIT_TIMEOUT_S", 2.0)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_local_port()}")
    started = time.time()
    try:
        tracker = build_trackers(["wandb"], **kwargs(tmp_path))
        tracker.log({"train/loss": 1.0}, step=1)
        tracker.finish("completed")
    finally:
        wandb.teardown()
    assert time.time() - started < 30
    out = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(out) == 1 and "online start failed" in out[0] and "logging offline" in out[0]
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
