"""Memory backends (NVML, nvidia-smi, rocm-smi, psutil), their parsers, and our process tree."""
from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
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
