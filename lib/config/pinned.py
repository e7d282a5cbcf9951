"""A run's resolved configuration is fixed when the run is created.

`config.json` of a run (or of a matrix cell, written when the matrix is created)
holds the full resolved configuration. Whenever the run is started again (`make
continue`, a matrix cell resumed or started late), the configuration the current
Kconfig tree resolves is compared with it: a `git pull` that changed a default
must not silently give an interrupted run, or the rest of a matrix, other values
than its finished part. A difference stops with the list of symbols (old -> new);
`make continue ACCEPT_CONFIG_CHANGES=1` accepts it, and the change is recorded
in config.json under `config_changes`.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable, Optional

from .kconfig import FIELD_BY_NAME, ConfigError
from ..run.rundir import git_sha, read_json, write_json_atomic

# Fields that say how a run is executed, not what it computes: they may differ
# when a run is resumed elsewhere (the matrix sets RUN_THREADS from the cores).
RUNTIME_FIELDS = frozenset({"threads", "log_interval", "monitor_interval", "checkpoint_interval",
                            "tracker_trackio", "tracker_wandb", "results_dir", "matrix_jobs"})
ACCEPT_HINT = "`make continue ACCEPT_CONFIG_CHANGES=1` accepts the new values (recorded in config.json)"
_ABSENT = "(absent)"


class ConfigChanged(ConfigError):
    """The current Kconfig resolves a run's configuration differently from its creation."""


def differences(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """(field, old value, new value) for every field that differs, runtime fields aside."""
    keys = sorted((set(old) | set(new)) - RUNTIME_FIELDS)
    return [(k, old.get(k, _ABSENT), new.get(k, _ABSENT)) for k in keys
            if old.get(k, _ABSENT) != new.get(k, _ABSENT)]


def symbol(field: str) -> str:
    f = FIELD_BY_NAME.get(field)
    return f"CONFIG_{f.symbol}" if f else field


def describe(diffs: Iterable[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{symbol(k)} {_fmt(a)} -> {_fmt(b)}" for k, a, b in diffs)


def _fmt(v: Any) -> str:
    return "unset" if v is None else str(v)


def pinned(run_dir: Path) -> Optional[dict]:
    """The configuration fixed at the run's creation, or None (a run that never started)."""
    stored = read_json(Path(run_dir) / "config.json") or {}
    return stored.get("config")


def check(run_dir: Path, new: dict, accept: bool) -> list[tuple[str, Any, Any]]:
    """The differences between `run_dir`'s pinned configuration and `new`; raises
    ConfigChanged unless `accept` (then the caller records them)."""
    old = pinned(run_dir)
    diffs = differences(old, new) if old is not None else []
    if diffs and not accept:
        raise ConfigChanged(f"{run_dir}: the current Kconfig resolves this run's configuration differently "
                            f"from when it was created: {describe(diffs)}; {ACCEPT_HINT}, or check out the "
                            "code the run was started with")
    return diffs


def record(run_dir: Path, new: dict, diffs: list[tuple[str, Any, Any]]) -> None:
    """Pin `new` in config.json and append the accepted change to its history."""
    path = Path(run_dir) / "config.json"
    stored = read_json(path) or {}
    history = list(stored.get("config_changes", []))
    history.append(change_entry(diffs))
    write_json_atomic(path, {**stored, "config": new, "config_changes": history})


def change_entry(diffs: list[tuple[str, Any, Any]]) -> dict:
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git_sha": git_sha(),
            "changes": [[symbol(k), a, b] for k, a, b in diffs]}


def pin(run_dir: Path, cfg: dict, overrides: list) -> None:
    """Write a new cell's config.json (its configuration, fixed from now on)."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(run_dir) / "config.json",
                      {"config": cfg, "overrides": {"pairs": [list(p) for p in overrides]},
                       "pinned": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
