"""Memory/utilisation sampler that runs beside every training run, and `gputop`.

A `MemorySampler` is a daemon thread that asks one *backend* for the state of
every device once per `interval_s` and appends one JSON line per sample to
`memory.jsonl` in the run directory. Backends, in the order `detect_backend()`
tries them:

  nvml        pynvml (nvidia-ml-py): memory, utilisation, power, temperature and
              the memory of our own processes (nvmlDeviceGetComputeRunningProcesses)
  nvidia-smi  the CSV query interface, plus --query-compute-apps for our processes
  rocm-smi    its --json output (no per-process memory)
  psutil      no GPU: host memory, with our process tree's RSS as "process" memory

A sample (one line of the timeline):

  {"t": 12.5, "wall": 1767000000.0, "phase": "train", "backend": "nvml",
   "process_bytes": int|None, "rss_bytes": int|None,
   "devices": [{"index", "used_bytes", "total_bytes", "process_bytes",
                "util_pct", "power_w", "temp_c"}]}

`t` is seconds since the sampler started, `wall` the Unix time (so a resumed
run's appended timeline can be ordered), `process_bytes` the sum over devices
of the memory our process tree holds (None where the backend cannot say) and
`rss_bytes` the resident memory of our process tree, recorded by every backend.
The psutil backend reports the host as one device with index None.

The sampler must never crash training: a failing backend is logged once, the
sample is taken with psutil instead, and after `_MAX_FAILURES` consecutive
failures the sampler stays on psutil.

Run `python -m adamwprune.monitor` for a live terminal view (`--once` prints one
frame; `--results DIR` adds the state of a matrix of runs).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, TypedDict

import psutil

log = logging.getLogger(__name__)

MIB = 1 << 20
GIB = 1 << 30
# Folders under results/ that are not runs: trackio's store, the benchmark's output.
NOT_RUNS = ("trackio", "bench")
# A failing backend is retried this many samples before the sampler gives up on
# it: one nvidia-smi timeout should not lose the GPU view for the whole run.
_MAX_FAILURES = 3
# nvidia-smi/rocm-smi normally answer in ~50-300 ms; a wedged driver must not
# hang the sampler (and, through stop(), the end of training) for ever.
_COMMAND_TIMEOUT_S = 10.0

NVIDIA_SMI_GPU_FIELDS = (
    "index", "uuid", "memory.used", "memory.total",
    "utilization.gpu", "power.draw", "temperature.gpu",
)
NVIDIA_SMI_GPU_QUERY = (
    "nvidia-smi", "--query-gpu=" + ",".join(NVIDIA_SMI_GPU_FIELDS),
    "--format=csv,noheader,nounits",
)
NVIDIA_SMI_APPS_QUERY = (
    "nvidia-smi", "--query-compute-apps=pid,gpu_uuid,used_memory",
    "--format=csv,noheader,nounits",
)
ROCM_SMI_QUERY = (
    "rocm-smi", "--showmeminfo", "vram", "--showuse", "--showpower",
    "--showtemp", "--json",
)
# rocm-smi renamed some keys across releases (MI300 reports socket power, and
# its edge sensor reads N/A), so each field is the first key present.
ROCM_USED_KEYS = ("VRAM Total Used Memory (B)",)
ROCM_TOTAL_KEYS = ("VRAM Total Memory (B)",)
ROCM_UTIL_KEYS = ("GPU use (%)",)
ROCM_POWER_KEYS = (
    "Average Graphics Package Power (W)",
    "Current Socket Graphics Package Power (W)",
    "Socket Graphics Package Power (W)",
)
ROCM_TEMP_KEYS = (
    "Temperature (Sensor edge) (C)",
    "Temperature (Sensor junction) (C)",
)

METRICS = ("process_gpu", "device_used", "process_rss")  # headline preference


class Device(TypedDict):
    index: int | None
    used_bytes: int | None
    total_bytes: int | None
    process_bytes: int | None
    util_pct: float | None
    power_w: float | None
    temp_c: float | None


class Sample(TypedDict):
    t: float
    wall: float
    phase: str
    backend: str
    process_bytes: int | None
    rss_bytes: int | None
    devices: list[Device]


class BackendError(RuntimeError):
    """A backend cannot produce a sample (no device, tool missing, bad output)."""


def _device(index, used=None, total=None, process=None, util=None, power=None,
            temp=None) -> Device:
    return {"index": index, "used_bytes": used, "total_bytes": total,
            "process_bytes": process, "util_pct": util, "power_w": power,
            "temp_c": temp}


def _num(text) -> float | None:
    """A number from a tool's field; None for "[N/A]", "[Not Supported]", ""."""
    try:
        return float(str(text).strip())
    except ValueError:
        return None


def _mib_to_bytes(text) -> int | None:
    value = _num(text)
    return None if value is None else int(round(value * MIB))


def _sum_known(values: Iterable[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


# --------------------------------------------------------------------------
# Pure parsers


def parse_nvidia_smi_apps(text: str | None, pids: Iterable[int]) -> dict[str, int | None]:
    """Memory per GPU uuid held by `pids`, from --query-compute-apps CSV.

    A GPU where one of our processes is listed with "[N/A]" memory (MIG, WDDM)
    maps to None; a GPU where none of them is listed is absent.
    """
    wanted = set(pids)
    found: dict[str, list[int | None]] = {}
    for line in (text or "").splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3 or not parts[0].isdigit() or int(parts[0]) not in wanted:
            continue
        found.setdefault(parts[1], []).append(_mib_to_bytes(parts[2]))
    return {uuid: _sum_known(values) for uuid, values in found.items()}


def parse_nvidia_smi(text: str, apps_text: str | None = None,
                     pids: Iterable[int] = ()) -> list[Device]:
    """Devices from `nvidia-smi --query-gpu=<NVIDIA_SMI_GPU_FIELDS> --format=csv,noheader,nounits`.

    Memory is MiB in the output; fields the GPU does not report ("[N/A]",
    "[Not Supported]") become None. Lines that are not device rows (e.g. "No
    devices were found") are skipped. `apps_text`, the compute-apps CSV, gives
    each device's `process_bytes` for `pids`.
    """
    ours = parse_nvidia_smi_apps(apps_text, pids)
    devices = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != len(NVIDIA_SMI_GPU_FIELDS) or not parts[0].isdigit():
            continue
        index, uuid, used, total, util, power, temp = parts
        devices.append(_device(
            int(index), _mib_to_bytes(used), _mib_to_bytes(total), ours.get(uuid),
            _num(util), _num(power), _num(temp)))
    return devices


def _first(fields: dict, keys: tuple[str, ...]) -> float | None:
    for key in keys:
        value = _num(fields.get(key, ""))
        if value is not None:
            return value
    return None


def _json_object(text: str) -> dict:
    """The JSON object in `text`; rocm-smi may print warnings before it."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise ValueError(f"no JSON object in rocm-smi output: {text[:200]!r}")
    return json.loads(text[start:end + 1])


def parse_rocm_smi(json_text: str) -> list[Device]:
    """Devices from `rocm-smi --showmeminfo vram --showuse --showpower --showtemp --json`.

    Keys "card<N>" are devices (anything else, e.g. "system", is skipped);
    values are strings, memory in bytes, "N/A" becomes None.
    """
    devices = []
    for key, fields in _json_object(json_text).items():
        match = re.fullmatch(r"card(\d+)", key)
        if not match or not isinstance(fields, dict):
            continue
        used, total = _first(fields, ROCM_USED_KEYS), _first(fields, ROCM_TOTAL_KEYS)
        devices.append(_device(
            int(match[1]),
            None if used is None else int(used),
            None if total is None else int(total),
            None,
            _first(fields, ROCM_UTIL_KEYS),
            _first(fields, ROCM_POWER_KEYS),
            _first(fields, ROCM_TEMP_KEYS)))
    return sorted(devices, key=lambda d: d["index"])


# --------------------------------------------------------------------------
# Process tree


def process_family(pid: int) -> list[psutil.Process]:
    """`pid` and its descendants (DataLoader workers); [] if `pid` is gone."""
    try:
        proc = psutil.Process(pid)
        return [proc] + proc.children(recursive=True)
    except psutil.Error:
        return []


def rss_bytes(procs: Iterable[psutil.Process]) -> int | None:
    """Summed RSS. Forked workers share pages with the parent, so this is an
    upper bound; USS would be exact but costs a page-map walk per sample."""
    total, seen = 0, False
    for proc in procs:
        try:
            total += proc.memory_info().rss
            seen = True
        except psutil.Error:  # a worker exited between listing and reading
            continue
    return total if seen else None


# --------------------------------------------------------------------------
# Backends: read(pids) -> list[Device]; close()


def _run_command(args: tuple[str, ...]) -> str:
    """stdout of `args`. The exit status is not checked: rocm-smi exits non-zero
    when one field is unsupported yet prints valid output; parsers judge it."""
    done = subprocess.run(list(args), capture_output=True, text=True,
                          timeout=_COMMAND_TIMEOUT_S, check=False)
    return done.stdout


def _maybe(fn: Callable, *args):
    """fn(*args), or None when the device does not support that query."""
    try:
        return fn(*args)
    except Exception:  # NVMLError_NotSupported and friends: a missing field
        return None


class NvmlBackend:
    """NVML through pynvml; `nvml` may be any module-like object (tests fake it)."""

    name = "nvml"

    def __init__(self, nvml=None):
        if nvml is None:
            import pynvml as nvml
        self.nvml = nvml
        nvml.nvmlInit()
        count = nvml.nvmlDeviceGetCount()
        if count < 1:
            nvml.nvmlShutdown()
            raise BackendError("NVML sees no device")
        self.handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]

    def _process_bytes(self, handle, pids: set[int]) -> int | None:
        procs = _maybe(self.nvml.nvmlDeviceGetComputeRunningProcesses, handle) or []
        mine = [p for p in procs if p.pid in pids]
        # None when not listed: inside a container NVML reports host PIDs, and
        # "0 bytes" would then be a confident wrong answer.
        return _sum_known(p.usedGpuMemory for p in mine) if mine else None

    def read(self, pids: set[int]) -> list[Device]:
        nvml, devices = self.nvml, []
        for index, handle in enumerate(self.handles):
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            util = _maybe(lambda h: nvml.nvmlDeviceGetUtilizationRates(h).gpu, handle)
            milliwatts = _maybe(nvml.nvmlDeviceGetPowerUsage, handle)
            temp = _maybe(nvml.nvmlDeviceGetTemperature, handle,
                          getattr(nvml, "NVML_TEMPERATURE_GPU", 0))
            devices.append(_device(
                index, int(mem.used), int(mem.total), self._process_bytes(handle, pids),
                None if util is None else float(util),
                None if milliwatts is None else milliwatts / 1000.0,
                None if temp is None else float(temp)))
        return devices

    def close(self) -> None:
        _maybe(self.nvml.nvmlShutdown)


class NvidiaSmiBackend:
    """`nvidia-smi` CSV queries; `run(args) -> stdout` is injectable for tests."""

    name = "nvidia-smi"

    def __init__(self, run: Callable[[tuple[str, ...]], str] | None = None):
        self.run = run or _run_command

    def read(self, pids: set[int]) -> list[Device]:
        gpu_text = self.run(NVIDIA_SMI_GPU_QUERY)
        apps_text = _maybe(self.run, NVIDIA_SMI_APPS_QUERY) if pids else None
        devices = parse_nvidia_smi(gpu_text, apps_text, pids)
        if not devices:
            raise BackendError(f"nvidia-smi listed no device: {gpu_text[:200]!r}")
        return devices

    def close(self) -> None:
        pass


class RocmSmiBackend:
    """`rocm-smi --json`; `run(args) -> stdout` is injectable for tests."""

    name = "rocm-smi"

    def __init__(self, run: Callable[[tuple[str, ...]], str] | None = None):
        self.run = run or _run_command

    def read(self, pids: set[int]) -> list[Device]:
        devices = parse_rocm_smi(self.run(ROCM_SMI_QUERY))
        if not devices:
            raise BackendError("rocm-smi listed no card")
        return devices

    def close(self) -> None:
        pass


class PsutilBackend:
    """No GPU: the host as one device (index None); our RSS as process memory."""

    name = "psutil"

    def read(self, pids: set[int]) -> list[Device]:
        vm = psutil.virtual_memory()
        procs = []
        for pid in pids:
            try:
                procs.append(psutil.Process(pid))
            except psutil.Error:
                continue
        # total - available, not vm.used: psutil computes `used` differently
        # per platform, while `available` is what a new allocation can get.
        return [_device(None, int(vm.total - vm.available), int(vm.total),
                        rss_bytes(procs), psutil.cpu_percent(interval=None))]

    def close(self) -> None:
        pass


BACKENDS = {
    "nvml": NvmlBackend,
    "nvidia-smi": NvidiaSmiBackend,
    "rocm-smi": RocmSmiBackend,
    "psutil": PsutilBackend,
}


def make_backend(name: str):
    """The backend called `name` (one of BACKENDS), probed once."""
    if name not in BACKENDS:
        raise ValueError(f"unknown monitor backend {name!r}; valid: {', '.join(BACKENDS)}")
    backend = BACKENDS[name]()
    try:
        backend.read(set())
    except Exception:
        backend.close()
        raise
    return backend


def detect_backend(nvml=None, run: Callable | None = None,
                   which: Callable[[str], str | None] = shutil.which):
    """The first backend that answers: NVML, nvidia-smi, rocm-smi, else psutil."""
    candidates = (
        ("nvml", lambda: NvmlBackend(nvml)),
        ("nvidia-smi", lambda: which("nvidia-smi") and NvidiaSmiBackend(run)),
        ("rocm-smi", lambda: which("rocm-smi") and RocmSmiBackend(run)),
    )
    for name, factory in candidates:
        backend = None
        try:
            backend = factory()
            if backend:
                backend.read(set())
                return backend
        except Exception as exc:  # absent library, no device, odd output
            log.debug("monitor backend %s unavailable: %s", name, exc)
            if backend:
                backend.close()
    return PsutilBackend()


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


# --------------------------------------------------------------------------
# gputop


def format_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    if n >= GIB:
        return f"{n / GIB:.1f} GiB"
    return f"{n / MIB:.0f} MiB"


def _format_value(value, unit: str) -> str:
    return "-" if value is None else f"{value:.0f}{unit}"


def render_devices(backend_name: str, devices: list[Device]) -> list[str]:
    if backend_name == "psutil":
        host = devices[0]
        return [f"host  memory {format_bytes(host['used_bytes'])} / "
                f"{format_bytes(host['total_bytes'])}   cpu {_format_value(host['util_pct'], '%')}"]
    lines = [f"{'GPU':<4}{'used / total':>24}{'util':>7}{'power':>8}{'temp':>7}{'ours':>11}"]
    for d in devices:
        used = f"{format_bytes(d['used_bytes'])} / {format_bytes(d['total_bytes'])}"
        lines.append(
            f"{d['index']:<4}{used:>24}{_format_value(d['util_pct'], '%'):>7}"
            f"{_format_value(d['power_w'], ' W'):>8}{_format_value(d['temp_c'], ' C'):>7}"
            f"{format_bytes(d['process_bytes']):>11}")
    return lines


def _last_record(path: Path) -> dict | None:
    """The last complete JSON line of a (possibly growing) jsonl file."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 65536))
            tail = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    for line in reversed(tail.splitlines()):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return None


def scan_matrix(results_dir) -> list[dict]:
    """One entry per cell of the matrix: name, status (done / running / pending, as
    adamwprune.matrix.cell_state judges it), the last metrics.jsonl row, and seconds
    since metrics.jsonl last changed."""
    from .matrix import cell_state, load_cells

    path = Path(results_dir)
    try:
        names = [c.id for c in load_cells(path)[1]]
    except FileNotFoundError:  # not a matrix: every subfolder with a run in it
        names = sorted(p.name for p in path.iterdir() if (p / "config.json").exists())
    summary = {"done": "done", "diverged": "done", "running": "running", "interrupted": "running"}
    cells = []
    for name in names:
        cell = path / name
        metrics = cell / "metrics.jsonl"
        status = summary.get(cell_state(cell), "pending")
        last = _last_record(metrics) if metrics.exists() else None
        age = time.time() - metrics.stat().st_mtime if metrics.exists() else None
        cells.append({"name": name, "status": status, "last": last, "age_s": age})
    return cells


def render_matrix(results_dir) -> list[str]:
    path = Path(results_dir)
    if not path.is_dir():
        return [f"results: {path} is not a directory"]
    cells = scan_matrix(path)
    counts = {s: sum(c["status"] == s for c in cells) for s in ("done", "running", "pending")}
    lines = [f"matrix {path.name}: {counts['done']} done, {counts['running']} running, "
             f"{counts['pending']} pending"]
    for cell in (c for c in cells if c["status"] == "running"):
        last = cell["last"] or {}
        step = last.get("step", "-")
        metric = last.get("val_metric")
        age = "-" if cell["age_s"] is None else f"{cell['age_s']:.0f}s ago"
        extra = "" if metric is None else f"  val {metric:.4g}"
        lines.append(f"  running {cell['name']}  step {step}{extra}  (updated {age})")
    return lines


def newest_results_dir(results_root) -> Path | None:
    """The most recently modified run or matrix directory under `results_root` (by
    time: names sort by when a run was *created*, not by when it last wrote)."""
    root = Path(results_root)
    found = [p for p in root.iterdir() if p.is_dir() and p.name not in NOT_RUNS] if root.is_dir() else []
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def render_frame(backend, results_dir=None) -> str:
    """One screen of gputop as text; a failing backend falls back to psutil."""
    try:
        name, note, devices = backend.name, "", backend.read(set())
    except Exception as exc:
        name, note = "psutil", f" ({backend.name} failed: {exc})"
        devices = PsutilBackend().read(set())
    lines = [f"gputop  {time.strftime('%Y-%m-%d %H:%M:%S')}  backend {name}{note}", ""]
    lines += render_devices(name, devices)
    if results_dir is not None:
        lines += [""] + render_matrix(results_dir)
    return "\n".join(lines)


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m adamwprune.monitor",
        description="gputop: live device memory (or host RSS) and matrix progress")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between frames")
    parser.add_argument("--once", action="store_true", help="print one frame and exit")
    parser.add_argument("--results", metavar="DIR",
                        help="a matrix dir, results/<timestamp>_<name>/, one subfolder per cell "
                             "(default: the newest directory under --results-root)")
    parser.add_argument("--results-root", metavar="DIR", default="results")
    parser.add_argument("--backend", choices=("auto", *BACKENDS), default="auto")
    args = parser.parse_args(argv)
    if args.results is None:
        args.results = newest_results_dir(args.results_root)
    if not args.interval > 0:
        parser.error(f"--interval must be > 0 seconds, got {args.interval}")
    return args


def _live(backend, args) -> None:
    try:
        from rich.live import Live
        from rich.text import Text
    except ImportError:
        Live = None
    if Live is not None and sys.stdout.isatty():
        with Live(Text(render_frame(backend, args.results)), auto_refresh=False) as live:
            while True:
                time.sleep(args.interval)
                live.update(Text(render_frame(backend, args.results)), refresh=True)
    else:
        # home + clear screen on a terminal; a pipe gets one frame after another
        clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
        while True:
            print(clear + render_frame(backend, args.results), flush=True)
            time.sleep(args.interval)


def main(argv=None) -> int:
    args = _parse_args(argv)
    try:
        backend = detect_backend() if args.backend == "auto" else make_backend(args.backend)
    except Exception as exc:
        print(f"gputop: backend {args.backend} unavailable: {exc}", file=sys.stderr)
        return 2
    try:
        if args.once:
            print(render_frame(backend, args.results))
        else:
            _live(backend, args)
    except KeyboardInterrupt:
        pass
    finally:
        backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
