"""The run directory: everything needed to understand a run, final.json written last."""
from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from . import atomic
from .atomic import jsonable, write_json_atomic  # noqa: F401  (run and matrix writers import it from here)
from ..paths import ROOT


def read_json(path: Path) -> Optional[dict]:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON-lines file; a truncated last line (a crash mid-write) is skipped."""
    rows = []
    try:
        with open(path) as fh:
            for line in fh:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    except FileNotFoundError:
        pass
    return rows


def git_sha(root: Path = ROOT) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    """The machine and software a run (or a benchmark: adamwprune.bench, inference.bench) ran on."""
    env = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "git_sha": git_sha(),
        "argv": sys.argv,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if hasattr(os, "getloadavg"):
        env["load_average_at_start"] = list(os.getloadavg())
    return env


class RunDir:
    """A run directory; only rank 0 of a DDP job writes (`enabled=False` elsewhere)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.mkdir(parents=True, exist_ok=True)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def write_json(self, name: str, obj: Any) -> None:
        if self.enabled:
            write_json_atomic(self.path / name, obj)

    def append_metrics(self, row: dict) -> None:
        if not self.enabled:
            return
        atomic.append_line(self.metrics_path, json.dumps(row, default=jsonable))

    def truncate_metrics(self, max_step: int) -> None:
        """Drop rows after `max_step` (written after the checkpoint we resume from)."""
        if not self.enabled or not self.metrics_path.exists():
            return
        rows = [r for r in read_jsonl(self.metrics_path) if r.get("step", 0) <= max_step]
        atomic.write_text_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))

    def metrics(self) -> list[dict]:
        return read_jsonl(self.metrics_path)

    def final(self) -> Optional[dict]:
        return read_json(self.path / "final.json")


def run_name(model: str, optimizer: str, pruning: str, sparsity: float, variant: Optional[str],
             seed: int, extra: str = "", pattern: str = "unstructured",
             distribution: Optional[str] = None) -> str:
    """model_optimizer_pruning[_sparsity][_pattern][_distribution][_variant][_extra]_sSEED:
    what a run is, readable (extra: the swept values of a matrix cell, e.g. opt_lr-0.001).
    Which parts a method has comes from its registry record: a sparsity when it prunes,
    an N:M pattern (nm2-4) when not unstructured, the layer distribution when it is
    dynamic sparse training, AdamWPrune's variant when it ranks by that score."""
    from ..registry import PRUNERS

    info = PRUNERS.get(pruning)
    parts = [model, optimizer, pruning]
    if info is None or info.prunes:
        parts.append(f"{round(100 * sparsity)}")
    if pattern and pattern != "unstructured":
        parts.append("nm" + pattern.replace(":", "-"))
    if distribution and info is not None and info.dynamic:
        parts.append(distribution)
    if variant and (info is None or info.uses_variant):
        parts.append(variant)
    if extra:
        parts.append(extra)
    parts.append(f"s{seed}")
    return "_".join(parts)


def made_from(dirname: str, name: str) -> bool:
    """Whether a directory name is <timestamp>_<name> or <timestamp>_<name>-<n> (new_run_path's names)."""
    rest = dirname.split("_", 1)[1] if "_" in dirname else ""
    return rest == name or (rest.startswith(name + "-") and rest[len(name) + 1:].isdigit())


def latest_matrix(results: Path, name: Optional[str] = None) -> Optional[Path]:
    """The newest directory with a matrix.json under `results` (names start with their
    creation time; the modification time breaks a tie), only those made from the preset
    or matrix `name` if given; None when there is none (or no `results`)."""
    results = Path(results)
    if not results.is_dir():
        return None
    found = [p.parent for p in results.glob("*/matrix.json") if name is None or made_from(p.parent.name, name)]
    return max(found, key=lambda p: (p.name, p.stat().st_mtime)) if found else None


def new_run_path(results_dir: Path, name: str, existing: Iterable[Path] = ()) -> Path:
    """results/<timestamp>_<name>, never reusing an existing directory."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(results_dir) / f"{stamp}_{name}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path
