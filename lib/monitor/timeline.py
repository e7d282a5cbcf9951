"""The sampled timeline (memory.jsonl): reading it and summarising it per phase."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable


from .backends import METRICS, Sample, _sum_known

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------
# Timeline and summaries


def read_timeline(path: str | os.PathLike) -> list[Sample]:
    """Samples from a memory.jsonl. A line cut short by a kill is skipped (at
    the end, or in the middle when a resumed run appended after it)."""
    samples, lines = [], Path(path).read_text(errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            samples.append(json.loads(line))
        except json.JSONDecodeError:
            if number != len(lines):
                log.warning("%s:%d: skipped a malformed sample line", path, number)
    return samples


def sample_metrics(sample: Sample) -> dict[str, int]:
    """The headline candidates present in one sample, by METRICS name."""
    out = {}
    if sample["backend"] != "psutil":  # psutil's "device" is the host, not a GPU
        if sample.get("process_bytes") is not None:
            out["process_gpu"] = sample["process_bytes"]
        used = _sum_known(d.get("used_bytes") for d in sample.get("devices", []))
        if used is not None:
            out["device_used"] = used
    if sample.get("rss_bytes") is not None:
        out["process_rss"] = sample["rss_bytes"]
    return out


class _Stat:
    __slots__ = ("count", "total", "peak", "backend")

    def __init__(self):
        self.count, self.total, self.peak, self.backend = 0, 0, 0, None

    def add(self, value: int, backend: str) -> None:
        self.count += 1
        self.total += value
        self.peak = max(self.peak, value)
        self.backend = backend


def _empty_summary(backend: str | None) -> dict:
    return {"peak_bytes": None, "mean_bytes": None, "samples": 0,
            "backend": backend, "metric": None}


def _summary_of(stats: dict[str, _Stat], backend: str | None) -> dict:
    for metric in METRICS:
        stat = stats.get(metric)
        if stat is not None:
            return {"peak_bytes": stat.peak, "mean_bytes": int(round(stat.total / stat.count)),
                    "samples": stat.count, "backend": stat.backend, "metric": metric}
    return _empty_summary(backend)


def summarize_timeline(samples: Iterable[Sample], phase: str = "train") -> dict:
    """MemorySampler.summary() rebuilt from a timeline (e.g. read_timeline())."""
    stats: dict[str, _Stat] = {}
    for sample in samples:
        if sample.get("phase") != phase:
            continue
        for metric, value in sample_metrics(sample).items():
            stats.setdefault(metric, _Stat()).add(value, sample["backend"])
    return _summary_of(stats, None)
