"""MemorySampler: the daemon thread that samples a backend beside every run."""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

import psutil

from .backends import (_COMMAND_TIMEOUT_S, _MAX_FAILURES, BACKENDS, PsutilBackend, Sample, _maybe,
                       _sum_known, detect_backend, make_backend, process_family, rss_bytes)
from .timeline import _Stat, _summary_of, sample_metrics

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------
# The sampler


class MemorySampler:
    """Append one JSON line per `interval_s` to `path` from a daemon thread.

    `backend`: None (detect_backend()), a name from BACKENDS, or an object with
    `name`, `read(pids) -> list[Device]` and `close()`; the sampler owns it
    and closes it in stop(). `pid`: the process to
    attribute memory to, with its descendants (default: this process).

        with MemorySampler(run_dir / "memory.jsonl") as sampler:
            ...                       # phase "setup"
            sampler.set_phase("train")
            ...
        sampler.summary("train")      # {"peak_bytes", "mean_bytes", ...}
    """

    def __init__(self, path, interval_s: float = 1.0, backend=None, pid: int | None = None):
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0 seconds, got {interval_s!r}")
        if isinstance(backend, str) and backend not in BACKENDS:
            raise ValueError(f"unknown monitor backend {backend!r}; valid: {', '.join(BACKENDS)}")
        self.pid = os.getpid() if pid is None else pid
        if not psutil.pid_exists(self.pid):
            raise ValueError(f"pid {self.pid} does not exist; pass a running process or None")
        self.path, self.interval_s = Path(path), float(interval_s)
        self._backend_arg, self._backend = backend, None
        self._phase = "setup"
        self._stats: dict[str, dict[str, _Stat]] = {}
        self._lock = threading.Lock()
        self._wake, self._stopping = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        self._file = None
        self._t0 = 0.0
        self._failures = 0
        self._logged: set[str] = set()

    @property
    def backend(self) -> str | None:
        return None if self._backend is None else self._backend.name

    @property
    def phase(self) -> str:
        return self._phase

    def __enter__(self) -> "MemorySampler":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "MemorySampler":
        if self._thread is not None:
            raise RuntimeError("MemorySampler.start() called twice")
        self._backend = self._resolve_backend()
        self._file = self._open()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)
        self._thread.start()
        return self

    def set_phase(self, name: str) -> None:
        """Label the following samples; samples once at once so a phase shorter
        than the interval still has one."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"phase must be a non-empty string, got {name!r}")
        self._phase = name
        self._wake.set()

    def stop(self) -> None:
        """Stop the thread, take a final sample, close the file. Idempotent."""
        if self._thread is None or self._stopping.is_set():
            return
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout=self.interval_s + 2 * _COMMAND_TIMEOUT_S)
        if self._thread.is_alive():  # a wedged driver call; the daemon dies with us
            self._log_once("join", "memory sampler did not stop; final sample skipped")
            return
        self._safe_sample()
        if self._file is not None:
            self._file.close()
        self._backend.close()

    def summary(self, phase: str = "train") -> dict:
        """Peak and mean of the headline metric over samples of `phase` only."""
        with self._lock:
            return _summary_of(dict(self._stats.get(phase, {})), self.backend)

    # -- internals --------------------------------------------------------

    def _resolve_backend(self):
        arg = self._backend_arg
        if arg is None:
            return detect_backend()
        if isinstance(arg, str):
            try:
                return make_backend(arg)
            except Exception as exc:
                self._log_once("resolve", "monitor backend %s unavailable (%s); using psutil",
                               arg, exc)
                return PsutilBackend()
        return arg

    def _open(self):
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self.path, "a+", encoding="utf-8")
            handle.seek(0, os.SEEK_END)
            if handle.tell() > 0:  # after a kill -9, end the cut line first
                handle.seek(handle.tell() - 1)
                if handle.read(1) != "\n":
                    handle.write("\n")
            return handle
        except OSError as exc:
            self._log_once("open", "cannot write %s (%s); memory kept in summary only",
                           self.path, exc)
            return None

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._safe_sample()
            self._wake.wait(self.interval_s)
            self._wake.clear()

    def _safe_sample(self) -> None:
        try:
            with self._lock:
                self._take_sample()
        except Exception as exc:  # never let monitoring take training down
            self._log_once("sample", "memory sample failed: %r", exc)

    def _take_sample(self) -> None:
        procs = process_family(self.pid)
        pids = {p.pid for p in procs}
        backend, devices = self._read_devices(pids)
        sample: Sample = {
            "t": round(time.monotonic() - self._t0, 6),
            "wall": round(time.time(), 3),
            "phase": self._phase,
            "backend": backend.name,
            "process_bytes": _sum_known(d["process_bytes"] for d in devices),
            "rss_bytes": rss_bytes(procs),
            "devices": devices,
        }
        by_metric = self._stats.setdefault(sample["phase"], {})
        for metric, value in sample_metrics(sample).items():
            by_metric.setdefault(metric, _Stat()).add(value, backend.name)
        self._write(sample)

    def _read_devices(self, pids: set[int]):
        try:
            devices = self._backend.read(pids)
            self._failures = 0
            return self._backend, devices
        except Exception as exc:
            if isinstance(self._backend, PsutilBackend):
                raise
            self._failures += 1
            self._log_once("read", "monitor backend %s failed (%r); sampling with psutil",
                           self._backend.name, exc)
            if self._failures >= _MAX_FAILURES:
                log.warning("monitor backend %s failed %d times in a row; staying on psutil",
                            self._backend.name, self._failures)
                _maybe(self._backend.close)
                self._backend = PsutilBackend()
            fallback = PsutilBackend()
            return fallback, fallback.read(pids)

    def _write(self, sample: Sample) -> None:
        if self._file is None:
            return
        try:
            # flush per line: a kill -9 loses at most the line being written
            self._file.write(json.dumps(sample) + "\n")
            self._file.flush()
        except (OSError, ValueError) as exc:  # disk full, closed file
            self._log_once("write", "cannot append to %s: %s", self.path, exc)

    def _log_once(self, key: str, message: str, *args) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.warning(message, *args)
