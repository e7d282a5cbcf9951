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

Modules: `backends` (the four backends, their pure parsers, our process tree),
`timeline` (reading memory.jsonl and its per-phase summary), `sampler`
(MemorySampler), `gputop` (the terminal view).
"""
from .backends import (BACKENDS, GIB, METRICS, MIB, NOT_RUNS, NVIDIA_SMI_APPS_QUERY, NVIDIA_SMI_GPU_QUERY,
                       BackendError, Device,
                       NvidiaSmiBackend, NvmlBackend, PsutilBackend, RocmSmiBackend, Sample, _MAX_FAILURES,
                       _device, _sum_known, detect_backend, make_backend, parse_nvidia_smi,
                       parse_nvidia_smi_apps, parse_rocm_smi, process_family, rss_bytes)
from .gputop import (format_bytes, main, newest_results_dir, render_devices, render_frame,
                     render_matrix, scan_matrix)
from .sampler import MemorySampler
from .timeline import read_timeline, sample_metrics, summarize_timeline

__all__ = [
    "read_timeline", "sample_metrics", "summarize_timeline",
    "BACKENDS",
    "BackendError",
    "Device",
    "GIB",
    "METRICS",
    "MIB",
    "MemorySampler",
    "NOT_RUNS",
    "NVIDIA_SMI_APPS_QUERY",
    "NVIDIA_SMI_GPU_QUERY",
    "NvidiaSmiBackend",
    "NvmlBackend",
    "PsutilBackend",
    "RocmSmiBackend",
    "Sample",
    "_MAX_FAILURES",
    "_device",
    "_sum_known",
    "detect_backend",
    "format_bytes",
    "main",
    "make_backend",
    "newest_results_dir",
    "parse_nvidia_smi",
    "parse_nvidia_smi_apps",
    "parse_rocm_smi",
    "process_family",
    "render_devices",
    "render_frame",
    "render_matrix",
    "rss_bytes",
    "scan_matrix",
]
