"""A resumed run is several segments; env.json and final.json keep every one.

A segment is one process's part of a run: from its start (or resume) to its end,
or, for a segment that was killed, to its last checkpoint (the steps after that
are trained again by the next segment, so their time is not counted). last.pt
carries the earlier segments' figures; final.json reports the totals (wall
time, training time per step, the highest peak memory) and the list of segments
with host, git sha and times; env.json lists every segment's environment.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from .rundir import read_json

ENV_KEYS = ("host", "git_sha", "time", "device", "device_name", "world_size", "torch", "python",
            "resumed_at_step")


def env_with_history(path: Path, env: dict, resumed: bool) -> dict:
    """The new env.json: this segment's environment, and `segments`, every segment's
    (a fresh start begins a new list)."""
    previous = (read_json(path) or {}).get("segments", []) if resumed else []
    return {**env, "segments": previous + [{k: env.get(k) for k in ENV_KEYS}]}


def current(started: float, from_step: int, to_step: int, train_time_s: float, steps_run: int,
            peak_memory_bytes: Optional[int], env: dict) -> dict:
    return {"host": env.get("host"), "git_sha": env.get("git_sha"),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "from_step": from_step, "to_step": to_step, "wall_time_s": time.time() - started,
            "train_time_s": train_time_s, "steps_run": steps_run,
            "peak_memory_bytes": peak_memory_bytes}


def totals(segments: list[dict]) -> dict:
    """wall_time_s, step_time_s and peak_memory_bytes over all segments."""
    train = sum(s.get("train_time_s") or 0.0 for s in segments)
    steps = sum(s.get("steps_run") or 0 for s in segments)
    peaks = [s["peak_memory_bytes"] for s in segments if s.get("peak_memory_bytes") is not None]
    return {"wall_time_s": sum(s.get("wall_time_s") or 0.0 for s in segments),
            "step_time_s": train / steps if steps else None,
            "peak_memory_bytes": max(peaks) if peaks else None,
            "segments": segments}
