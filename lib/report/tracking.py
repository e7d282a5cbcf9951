"""Experiment trackers: trackio (local-first) and Weights & Biases, behind one interface.

    tracker = build_trackers(["trackio", "wandb"], project=project_name("lenet5"),
                             run_name=run_dir.name, group=cell, config=cfg.to_dict(),
                             directory=run_dir)
    tracker.log(row_to_metrics(row), step=row["step"])   # every evaluation
    tracker.log(final_to_metrics(final), step=final["steps"])
    tracker.finish(final["status"])

`build_trackers([])` (or `["none"]`) returns a `NullTracker`, otherwise a `FanOut`
over the named trackers. A tracker that cannot start, or fails while logging, is
reported in one line and left out (`FanOut.failed` names it): tracking must never
stop a training run. Asking for a tracker whose package is not installed raises
`TrackerUnavailable` (one line) before anything is started.

trackio logs to a local SQLite store, by default `<results>/trackio/` (the parent of
the run directory), shared by every run so its dashboard compares them;
`trackio_view()` opens that dashboard. wandb logs online when credentials are found
on disk or in the environment (checked without network), otherwise offline into the
run directory, with one notice line; it never prompts.

Every model logs the same keys (`TRAIN_LOSS`, `VAL_METRIC`, ...): the task's metric
name (accuracy, perplexity) goes into the config, not into the key.

Run `python -m adamwprune.report.tracking view [--project P | --model M] [--dir D]` for the
trackio dashboard. Only rank 0 of a distributed job should build trackers.
"""
from __future__ import annotations

import argparse
import configparser
import contextlib
import hashlib
import importlib
import importlib.util
import io
import netrc
import numbers
import os
import socket
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union
from urllib.parse import urlsplit

from ..paths import ROOT

TRACKERS = ("trackio", "wandb")
NONE = "none"

# ------------------------------------------------------------- canonical keys
TRAIN_LOSS = "train/loss"
VAL_LOSS = "val/loss"
VAL_METRIC = "val/metric"
TEST_LOSS = "test/loss"
TEST_METRIC = "test/metric"
SPARSITY = "sparsity"
LR = "lr"
EPOCH = "epoch"
ELAPSED_S = "elapsed_s"
STEP_TIME_S = "step_time_s"
MEMORY_PEAK_BYTES = "memory/peak_bytes"

# metrics.jsonl column -> tracker key. `step` is the x-axis, passed separately.
ROW_KEYS = {
    "train_loss": TRAIN_LOSS, "val_loss": VAL_LOSS, "val_metric": VAL_METRIC,
    "test_loss": TEST_LOSS, "test_metric": TEST_METRIC, "sparsity": SPARSITY, "lr": LR,
    "epoch": EPOCH, "elapsed_s": ELAPSED_S, "step_time_s": STEP_TIME_S,
}

# final.json field -> tracker key, logged once at the end of a run.
FINAL_KEYS = {
    "best_val_metric": "final/best_val_metric", "best_step": "final/best_step",
    "test_metric_at_best": "final/test_metric_at_best", "final_sparsity": "final/sparsity",
    "wall_time_s": "final/wall_time_s", "steps": "final/steps", "step_time_s": STEP_TIME_S,
    "peak_memory_bytes": MEMORY_PEAK_BYTES,
}
# memory_report() components -> memory/<component>_bytes
MEMORY_COMPONENTS = ("parameters", "gradients", "optimizer_state", "pruning_buffers", "total")

# An unreachable W&B server must not hold a run at its start for wandb's default
# 90 s; 30 s still covers a slow but working connection, after which we go offline.
WANDB_INIT_TIMEOUT_S = 30.0
WANDB_HOST = "https://api.wandb.ai"


class TrackerUnavailable(ValueError):
    """A requested tracker cannot run here (package missing); the message is one line.

    A ValueError so the command line's boundary reports it like a configuration error.
    """


class TrackerError(RuntimeError):
    """A tracker was set up in a way it cannot honour; the message is one line."""


def _notice(message: str) -> None:
    print(f"[adamwprune] {message}", flush=True)


# ------------------------------------------------------------------- names
def parse_tracker_names(spec: Union[str, Sequence[str], None]) -> list[str]:
    """"trackio,wandb" / ["wandb"] / "none" / "" -> the tracker names, validated."""
    items = spec.replace(",", " ").split() if isinstance(spec, str) else list(spec or [])
    names = [str(n).strip().lower() for n in items if str(n).strip()]
    if names == [NONE]:
        return []
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ValueError(f"unknown tracker {unknown[0]!r}: TRACKER takes none, or one or more of "
                         f"{', '.join(TRACKERS)} separated by commas")
    return list(dict.fromkeys(names))


def project_name(model: str, host: Optional[str] = None, path: Union[str, Path, None] = None) -> str:
    """`{model}-{5 hex}`: stable for one machine and checkout, different across them.

    Two checkouts (or machines) running the same model then fill separate projects
    instead of mixing their runs in one dashboard.
    """
    host = socket.gethostname() if host is None else host
    path = ROOT if path is None else Path(path)
    digest = hashlib.sha256(f"{host}\0{Path(path).resolve()}".encode()).hexdigest()
    return f"{model}-{digest[:5]}"


# ----------------------------------------------------------------- metrics
def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def row_to_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """A metrics.jsonl row -> canonical keys; missing and None values are left out."""
    out = {}
    for column, key in ROW_KEYS.items():
        value = _number(row.get(column))
        if value is not None:
            out[key] = value
    return out


def final_to_metrics(final: Mapping[str, Any]) -> dict[str, float]:
    """final.json -> the end-of-run keys (final/..., step_time_s, memory/...)."""
    out = {}
    for field, key in FINAL_KEYS.items():
        value = _number(final.get(field))
        if value is not None:
            out[key] = value
    sampled = final.get("sampled_memory") or {}
    for field in ("peak_bytes", "mean_bytes"):
        value = _number(sampled.get(field))
        if value is not None:
            out[f"memory/sampled_{field}"] = value
    report = final.get("memory") or {}
    for component in MEMORY_COMPONENTS:
        value = _number((report.get(component) or {}).get("bytes"))
        if value is not None:
            out[f"memory/{component}_bytes"] = value
    return out


# ---------------------------------------------------------------- trackers
class Tracker:
    """The interface; this base is also the null tracker ("no tracking" is an object)."""

    name = NONE

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        pass

    def log_config(self, config: Mapping[str, Any]) -> None:
        pass

    def finish(self, status: str = "completed") -> None:
        pass

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish("completed" if exc_type is None else "failed")


class NullTracker(Tracker):
    pass


class FanOut(Tracker):
    """Sends every call to each tracker; one that raises is reported once and dropped."""

    def __init__(self, trackers: Sequence[Tracker], failed: Sequence[str] = ()):
        self.trackers = list(trackers)
        self.name = ",".join(t.name for t in self.trackers)
        self.failed = list(failed)  # names of trackers that could not start or were dropped

    def _each(self, what: str, call) -> None:
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as exc:  # tracking must never end a training run
                self.trackers.remove(tracker)
                self.failed.append(tracker.name)
                detail = str(exc).splitlines()[0] if str(exc) else ""
                _notice(f"{tracker.name}: {what} failed ({type(exc).__name__}: {detail}); "
                        f"{tracker.name} is off for the rest of this run")

    def log(self, metrics, step):
        self._each("log", lambda t: t.log(metrics, step))

    def log_config(self, config):
        self._each("log_config", lambda t: t.log_config(config))

    def finish(self, status="completed"):
        self._each("finish", lambda t: t.finish(status))
        self.trackers = []


def _import(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        raise TrackerUnavailable(f"TRACKER={name} needs the {name} package: "
                                 f"pip install '.[{name}]' (or pip install {name})") from None


# ------------------------------------------------------------------ trackio
def trackio_dir(directory: Union[str, Path, None] = None, run_dir: Union[str, Path, None] = None) -> Path:
    """Where trackio stores: `directory`, else $TRACKIO_DIR, else `<run_dir>/../trackio`."""
    if directory:
        return Path(directory).resolve()
    if os.environ.get("TRACKIO_DIR"):
        return Path(os.environ["TRACKIO_DIR"]).resolve()
    if run_dir is None:
        return (ROOT / "results" / "trackio").resolve()
    return (Path(run_dir).resolve().parent / "trackio")


def import_trackio(store: Path):
    """trackio, storing in `store`. trackio reads TRACKIO_DIR once, when it is imported."""
    store = Path(store).resolve()
    if sys.modules.get("trackio") is None:
        os.environ["TRACKIO_DIR"] = str(store)
    trackio = _import("trackio")
    actual = Path(trackio.utils.TRACKIO_DIR).resolve()
    if actual != store:
        raise TrackerError(f"trackio was already imported in this process with TRACKIO_DIR={actual}; "
                           f"it cannot switch to {store}: use one trackio directory per process")
    return trackio


def _trackio_config(config: Mapping[str, Any]) -> dict:
    # trackio reserves config keys starting with "_" for itself.
    return {(f"cfg{k}" if str(k).startswith("_") else k): v for k, v in config.items()}


class TrackioTracker(Tracker):
    name = "trackio"

    def __init__(self, *, project: str, run_name: str, group: Optional[str], config: Mapping,
                 store: Path, resume: bool = False):
        self.trackio = import_trackio(store)
        self.store, self.project = Path(store).resolve(), project
        # trackio prints several lines, including a `trackio show` hint that ignores
        # our TRACKIO_DIR; we print one line of our own instead.
        with contextlib.redirect_stdout(io.StringIO()):
            # GPU/CPU auto-logging is off: the run's own sampler writes memory.jsonl.
            self.run = self.trackio.init(project=project, name=run_name, group=group,
                                         config=_trackio_config(config),
                                         resume="allow" if resume else "never", embed=False,
                                         auto_log_gpu=False, auto_log_cpu=False)
        _notice(f"trackio: project {project}, run {run_name} in {self.store} "
                f"(view: make trackio-view)")

    def log(self, metrics, step):
        self.run.log(dict(metrics), step=int(step))

    def log_config(self, config):
        # trackio stores a run's config with its first log() call only; clearing its
        # (private) flag makes the next log() store the updated config. An update made
        # before the first log() always lands; a later one lands unless trackio's
        # sender (every 0.5 s) batches it with the run's first rows, whose config wins.
        self.run.config.update(_trackio_config(config))
        self.run._config_logged = False

    def finish(self, status="completed"):
        with contextlib.redirect_stdout(io.StringIO()):
            self.trackio.finish()


def _has_display() -> bool:
    # Without a display, Python's webbrowser falls back to a console browser (lynx,
    # w3m) that would take over the terminal of a remote session.
    if sys.platform.startswith("linux"):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


def trackio_view(project: Optional[str], directory: Union[str, Path, None] = None,
                 open_browser: Optional[bool] = None) -> None:
    """Open trackio's local dashboard on `project` (all projects when None); blocks.

    `open_browser=None` opens a browser tab only where there is a display.
    """
    store = trackio_dir(directory)
    if not any(store.glob("*.db")):
        raise TrackerError(f"no trackio data in {store}: train with TRACKER=trackio first "
                           f"(make trackio-test logs a sample run)")
    if project is not None and not (store / f"{project}.db").exists():
        found = sorted(p.stem for p in store.glob("*.db"))
        _notice(f"trackio: no project {project} in {store}; showing all of {', '.join(found)}")
        project = None
    trackio = import_trackio(store)
    _notice(f"trackio: dashboard for {project or 'all projects'} in {store} (Ctrl-C stops it)")
    trackio.show(project=project, open_browser=_has_display() if open_browser is None else open_browser)


# -------------------------------------------------------------------- wandb
def _wandb_settings_file(env: Mapping[str, str], home: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    base = Path(env["WANDB_CONFIG_DIR"]).expanduser() if env.get("WANDB_CONFIG_DIR") else home / ".config" / "wandb"
    with contextlib.suppress(OSError, configparser.Error):
        parser.read(base / "settings")
    return parser


def _netrc_path(env: Mapping[str, str], home: Path) -> Path:
    if env.get("NETRC"):
        return Path(env["NETRC"]).expanduser()
    windows = home / "_netrc"
    return windows if windows.exists() and not (home / ".netrc").exists() else home / ".netrc"


def wandb_credentials(env: Optional[Mapping[str, str]] = None, home: Union[str, Path, None] = None) -> Optional[str]:
    """Where W&B credentials are (a description), or None; reads files only, no network.

    The sources wandb itself uses: WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE, a .netrc
    entry for the W&B host (what `wandb login` writes) and an api_key in wandb's
    settings file. The host is WANDB_BASE_URL, else the settings file's base_url.
    """
    env = os.environ if env is None else env
    home = Path(home) if home is not None else Path(env.get("HOME") or Path.home())
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        if env.get(var):
            return var
    settings = _wandb_settings_file(env, home)
    base_url = env.get("WANDB_BASE_URL") or settings.get("default", "base_url", fallback=WANDB_HOST)
    host, path = urlsplit(base_url).netloc, _netrc_path(env, home)
    try:
        entry = netrc.netrc(str(path)).authenticators(host) if host else None
    except (OSError, netrc.NetrcParseError):
        entry = None
    if entry and entry[2]:
        return str(path)
    if settings.get("default", "api_key", fallback=""):
        return "wandb settings file"
    return None


def wandb_mode(env: Optional[Mapping[str, str]] = None, home: Union[str, Path, None] = None) -> tuple[str, str]:
    """("online" | "offline" | "disabled", why). Never "online" without credentials."""
    env = os.environ if env is None else env
    if env.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        return "disabled", "WANDB_DISABLED is set"
    asked = env.get("WANDB_MODE", "").lower()
    if asked in ("offline", "dryrun", "disabled"):
        return ("disabled" if asked == "disabled" else "offline"), f"WANDB_MODE={asked}"
    source = wandb_credentials(env, home)
    if source is None:
        return "offline", "no W&B credentials (WANDB_API_KEY, ~/.netrc from `wandb login`)"
    return "online", f"credentials from {source}"


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, *, project: str, run_name: str, group: Optional[str], config: Mapping,
                 directory: Path, resume: bool = False):
        self.wandb = _import("wandb")
        # Settings(silent=True) covers the run; this also quiets wandb's login lines.
        os.environ.setdefault("WANDB_SILENT", "true")
        self.directory = Path(directory).resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        mode, why = wandb_mode()
        # A stable id lets `make continue` append to the run it resumes.
        run_id = hashlib.sha256(f"{project}\0{self.directory}".encode()).hexdigest()[:16]
        kwargs = dict(project=project, name=run_name, group=group, config=dict(config),
                      dir=str(self.directory), id=run_id, resume="allow" if resume else None)
        try:
            self.run = self._init(mode, kwargs)
        except Exception as exc:
            if mode != "online":
                raise
            why = f"online start failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            # wandb's service still holds the failed run's id; a fresh service frees it.
            self.wandb.teardown()
            mode, self.run = "offline", self._init("offline", kwargs)
        self.mode = mode
        self._announce(mode, why, project, run_name)

    def _init(self, mode: str, kwargs: dict):
        settings = self.wandb.Settings(mode=mode, silent=True, console="off", save_code=False,
                                       init_timeout=WANDB_INIT_TIMEOUT_S)
        return self.wandb.init(settings=settings, mode=mode, **kwargs)

    def _announce(self, mode: str, why: str, project: str, run_name: str) -> None:
        where = self.directory / "wandb"
        if mode == "online":
            _notice(f"wandb: project {project}, run {run_name} online ({why}): {self.run.url}")
        elif mode == "offline":
            _notice(f"wandb: {why}; logging offline to {where} "
                    f"(upload later: wandb sync {where}/offline-run-*)")
        else:
            _notice(f"wandb: disabled ({why}); nothing is logged")

    def log(self, metrics, step):
        self.run.log(dict(metrics), step=int(step))

    def log_config(self, config):
        self.run.config.update(dict(config), allow_val_change=True)

    def finish(self, status="completed"):
        self.run.summary["status"] = status
        self.run.finish(exit_code=0 if status == "completed" else 1)


# ------------------------------------------------------------------ factory
def build_trackers(names: Union[str, Sequence[str], None], *, project: str, run_name: str,
                   group: Optional[str], config: Mapping[str, Any], directory: Union[str, Path],
                   trackio_directory: Union[str, Path, None] = None, resume: bool = False) -> Tracker:
    """The trackers `names` asks for, started; `directory` is the run directory.

    Every requested package is checked before any tracker starts, so a missing one
    fails in one line with nothing half-initialised.
    """
    names = parse_tracker_names(names)
    for name in names:
        if sys.modules.get(name) is None and importlib.util.find_spec(name) is None:
            _import(name)  # raises TrackerUnavailable
    started, failed = [], []
    common = dict(project=project, run_name=run_name, group=group, config=config, resume=resume)
    for name in names:
        try:
            if name == "trackio":
                started.append(TrackioTracker(store=trackio_dir(trackio_directory, directory), **common))
            else:
                started.append(WandbTracker(directory=directory, **common))
        except (TrackerUnavailable, TrackerError):
            raise
        except Exception as exc:  # a tracker that cannot start must not stop the run
            failed.append(name)
            detail = str(exc).splitlines()[0] if str(exc) else ""
            _notice(f"{name}: could not start ({type(exc).__name__}: {detail}); "
                    f"this run is not tracked by {name}")
    # Even one tracker goes through FanOut, which keeps its failures from ending the run.
    return FanOut(started, failed) if names else NullTracker()


# ---------------------------------------------------------------------- CLI
def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m adamwprune.report.tracking")
    sub = p.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("view", help="open the local trackio dashboard")
    v.add_argument("--project", help="a trackio project (default: all projects in the directory)")
    v.add_argument("--model", help="the project of this model on this machine and checkout")
    v.add_argument("--dir", help="trackio directory (default: $TRACKIO_DIR, else results/trackio)")
    v.add_argument("--no-browser", action="store_true",
                   help="do not open a browser tab (none is opened without a display)")
    args = p.parse_args(argv)
    project = args.project or (project_name(args.model) if args.model else None)
    try:
        trackio_view(project, args.dir, open_browser=False if args.no_browser else None)
    except (TrackerUnavailable, TrackerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
