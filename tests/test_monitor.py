"""The memory sampler, its backends, parsers, timeline and the gputop CLI.

Everything runs on a CPU: GPU backends are exercised through recorded tool
output and a fake NVML module.
"""

import json
import logging
import os
import subprocess
import sys
import time

import pytest

from adamwprune import monitor
from adamwprune.monitor import (
    MIB,
    MemorySampler,
    NvidiaSmiBackend,
    NvmlBackend,
    PsutilBackend,
    RocmSmiBackend,
    detect_backend,
    parse_nvidia_smi,
    parse_rocm_smi,
    read_timeline,
    summarize_timeline,
)

INTERVAL = 0.05
GIB = 1 << 30
OUR_PID = os.getpid()

# Recorded from a 2x A100 node (uuids shortened), query NVIDIA_SMI_GPU_FIELDS:
# GPU 1 reports no utilisation and no power (a MIG-enabled device does this).
NVIDIA_SMI_GPUS = """\
0, GPU-5c3f8e2a-1b7d-4c9e-a1f0-2d6b9e8c7a10, 30520, 81920, 97, 352.41, 64
1, GPU-9a1e4b7c-3d2f-4e8a-b6c5-7f0d1e2a3b45, 1024, 81920, [N/A], [Not Supported], 38
"""
# Our process on GPU 0 plus another user's job; on GPU 1 our entry is [N/A].
NVIDIA_SMI_APPS = f"""\
{OUR_PID}, GPU-5c3f8e2a-1b7d-4c9e-a1f0-2d6b9e8c7a10, 29800
4242, GPU-5c3f8e2a-1b7d-4c9e-a1f0-2d6b9e8c7a10, 300
{OUR_PID}, GPU-9a1e4b7c-3d2f-4e8a-b6c5-7f0d1e2a3b45, [N/A]
"""

# rocm-smi 6.x on MI250X (average power) and MI300X (socket power, edge N/A).
ROCM_SMI_MI250X = """\
{"card0": {"Temperature (Sensor edge) (C)": "41.0", "Temperature (Sensor junction) (C)": "44.0",
           "Temperature (Sensor memory) (C)": "52.0", "Average Graphics Package Power (W)": "231.0",
           "GPU use (%)": "88", "VRAM Total Memory (B)": "68702699520",
           "VRAM Total Used Memory (B)": "21474836480"},
 "card1": {"Temperature (Sensor edge) (C)": "36.0", "Temperature (Sensor junction) (C)": "38.0",
           "Temperature (Sensor memory) (C)": "45.0", "Average Graphics Package Power (W)": "N/A",
           "GPU use (%)": "0", "VRAM Total Memory (B)": "68702699520",
           "VRAM Total Used Memory (B)": "11452416"}}
"""
ROCM_SMI_MI300X = """\
WARNING: AMD GPU device(s) is/are in a low-power state. Check power control/runtime_status

{"card0": {"Temperature (Sensor edge) (C)": "N/A", "Temperature (Sensor junction) (C)": "35.0",
           "Temperature (Sensor memory) (C)": "30.0",
           "Current Socket Graphics Package Power (W)": "133.0", "GPU use (%)": "0",
           "VRAM Total Memory (B)": "205822885888", "VRAM Total Used Memory (B)": "295874560"},
 "system": {"Driver version": "6.8.5"}}
"""


class FakeNVMLError(Exception):
    """Stands in for pynvml.NVMLError_NotSupported."""


class FakeProc:
    def __init__(self, pid, used):
        self.pid, self.usedGpuMemory = pid, used


class FakeNVML:
    """The subset of pynvml the backend calls; device 1 has no power sensor."""

    NVML_TEMPERATURE_GPU = 0

    def __init__(self, procs=None):
        self.procs = procs if procs is not None else {
            0: [FakeProc(OUR_PID, 3 * GIB), FakeProc(4242, GIB)], 1: []}
        self.used = {0: 5 * GIB, 1: GIB}
        self.initialised = self.shut_down = False

    def nvmlInit(self):
        self.initialised = True

    def nvmlShutdown(self):
        self.shut_down = True

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetMemoryInfo(self, h):
        return type("Mem", (), {"used": self.used[h], "total": 80 * GIB})()

    def nvmlDeviceGetUtilizationRates(self, h):
        return type("Util", (), {"gpu": 90 if h == 0 else 0, "memory": 40})()

    def nvmlDeviceGetPowerUsage(self, h):
        if h == 1:
            raise FakeNVMLError("Not Supported")
        return 350_500  # milliwatts

    def nvmlDeviceGetTemperature(self, h, sensor):
        return 60 + h

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return self.procs[h]


class ScriptedBackend:
    """A GPU-like backend whose memory the test sets; raises while `fail` > 0."""

    name = "fake"

    def __init__(self, used=GIB, process=GIB, fail=0):
        self.used, self.process, self.fail = used, process, fail
        self.reads = 0
        self.closed = False

    def read(self, pids):
        self.reads += 1
        if self.fail:
            self.fail -= 1
            raise RuntimeError("driver went away")
        return [monitor._device(0, self.used, 80 * GIB, self.process, 50.0, 300.0, 60.0)]

    def close(self):
        self.closed = True


def _run_sampler(path, backend, phases, dwell=0.15):
    """Run a sampler through `phases`, (name, setup_fn) pairs, `dwell` s each."""
    sampler = MemorySampler(path, interval_s=INTERVAL, backend=backend)
    with sampler:
        for name, before in phases:
            if before:
                before()
            if name != "setup":
                sampler.set_phase(name)
            time.sleep(dwell)
    return sampler


# -- psutil --------------------------------------------------------------------


def test_psutil_backend_reports_positive_rss_for_this_process():
    (host,) = PsutilBackend().read({OUR_PID})
    assert host["index"] is None
    assert host["process_bytes"] > 0
    assert 0 < host["used_bytes"] <= host["total_bytes"]


def test_rss_of_process_family_includes_children():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        deadline = time.time() + 2
        while len(monitor.process_family(OUR_PID)) < 2 and time.time() < deadline:
            time.sleep(0.01)
        family = monitor.process_family(OUR_PID)
        assert child.pid in {p.pid for p in family}
        assert monitor.rss_bytes(family) > monitor.rss_bytes(family[:1])
    finally:
        child.kill()
        child.wait()


# -- sampler -------------------------------------------------------------------


def test_sampler_writes_timeline_with_increasing_t_and_phases(tmp_path):
    path = tmp_path / "run" / "memory.jsonl"
    _run_sampler(path, "psutil", [("setup", None), ("train", None), ("eval", None)])
    samples = read_timeline(path)
    ts = [s["t"] for s in samples]
    assert ts == sorted(ts) and len(set(ts)) == len(ts)
    phases = [s["phase"] for s in samples]
    # each phase shows up, in order, as one contiguous block
    assert [p for i, p in enumerate(phases) if i == 0 or phases[i - 1] != p] == \
        ["setup", "train", "eval"]
    assert phases.count("train") >= 2
    assert all(s["backend"] == "psutil" and s["rss_bytes"] > 0 for s in samples)
    assert all(set(s["devices"][0]) == set(monitor.Device.__annotations__) for s in samples)


def test_summary_covers_only_the_requested_phase(tmp_path):
    path = tmp_path / "memory.jsonl"
    backend = ScriptedBackend(used=10 * GIB, process=8 * GIB)

    def shrink():
        backend.used, backend.process = 3 * GIB, 2 * GIB

    sampler = _run_sampler(path, backend, [("setup", None), ("train", shrink)])
    train = sampler.summary("train")
    assert train["metric"] == "process_gpu" and train["backend"] == "fake"
    assert train["peak_bytes"] == train["mean_bytes"] == 2 * GIB
    assert sampler.summary("setup")["peak_bytes"] == 8 * GIB
    samples = read_timeline(path)
    assert train["samples"] == sum(s["phase"] == "train" for s in samples)
    assert summarize_timeline(samples, "train") == train
    assert sampler.summary("eval") == {"peak_bytes": None, "mean_bytes": None, "samples": 0,
                                       "backend": "fake", "metric": None}
    assert backend.closed


def _sample(backend, process, used, rss, phase="train"):
    devices = [monitor._device(i, u, 80 * GIB) for i, u in enumerate(used)]
    return {"t": 0.0, "phase": phase, "backend": backend, "process_bytes": process,
            "rss_bytes": rss, "devices": devices}


def test_summary_headline_prefers_process_gpu_then_device_used_then_rss():
    gpu = [_sample("nvml", 2 * GIB, [5 * GIB], GIB), _sample("nvml", 4 * GIB, [7 * GIB], GIB),
           _sample("nvml", 9 * GIB, [9 * GIB], GIB, phase="eval")]
    assert summarize_timeline(gpu) == {"peak_bytes": 4 * GIB, "mean_bytes": 3 * GIB,
                                       "samples": 2, "backend": "nvml", "metric": "process_gpu"}
    # container: NVML lists host PIDs, so ours is never found; two GPUs are summed
    hidden = [_sample("nvidia-smi", None, [GIB, 2 * GIB], GIB),
              _sample("nvidia-smi", None, [2 * GIB, 3 * GIB], GIB)]
    assert summarize_timeline(hidden) == {"peak_bytes": 5 * GIB, "mean_bytes": 4 * GIB,
                                          "samples": 2, "backend": "nvidia-smi",
                                          "metric": "device_used"}
    cpu = [_sample("psutil", 100 * MIB, [8 * GIB], 100 * MIB),
           _sample("psutil", 300 * MIB, [8 * GIB], 300 * MIB)]
    assert summarize_timeline(cpu) == {"peak_bytes": 300 * MIB, "mean_bytes": 200 * MIB,
                                       "samples": 2, "backend": "psutil", "metric": "process_rss"}


def test_set_phase_rejects_an_empty_name(tmp_path):
    with pytest.raises(ValueError, match="phase"):
        MemorySampler(tmp_path / "m.jsonl", interval_s=INTERVAL).set_phase("")


@pytest.mark.parametrize("kwargs, match", [
    ({"interval_s": 0}, "interval_s"),
    ({"backend": "cuda"}, "nvml, nvidia-smi, rocm-smi, psutil"),
])
def test_sampler_rejects_bad_arguments_with_the_fix(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        MemorySampler(tmp_path / "m.jsonl", **kwargs)


def test_failing_backend_falls_back_to_psutil_and_logs_once(tmp_path, caplog):
    path = tmp_path / "memory.jsonl"
    backend = ScriptedBackend(fail=10**6)
    with caplog.at_level(logging.WARNING, logger="adamwprune.monitor"):
        sampler = _run_sampler(path, backend, [("setup", None), ("train", None)])
    samples = read_timeline(path)
    assert len(samples) >= 4
    assert {s["backend"] for s in samples} == {"psutil"}
    assert backend.reads == monitor._MAX_FAILURES  # then abandoned for good
    assert backend.closed
    assert sum("driver went away" in r.getMessage() for r in caplog.records) == 1
    assert sampler.summary("train")["metric"] == "process_rss"
    assert sampler.summary("train")["peak_bytes"] > 0


def test_backend_that_fails_once_is_kept(tmp_path):
    path = tmp_path / "memory.jsonl"
    backend = ScriptedBackend(fail=1)
    _run_sampler(path, backend, [("setup", None)])
    backends = [s["backend"] for s in read_timeline(path)]
    assert backends[0] == "psutil" and backends[-1] == "fake"


def test_unavailable_backend_name_falls_back_to_psutil(tmp_path):
    # no NVML library on a CPU machine, or NVML works here: either way no crash
    sampler = _run_sampler(tmp_path / "m.jsonl", "rocm-smi", [("setup", None)], dwell=0.06)
    assert sampler.backend in ("rocm-smi", "psutil")
    assert read_timeline(tmp_path / "m.jsonl")


# -- timeline ------------------------------------------------------------------


def test_read_timeline_skips_a_truncated_last_line(tmp_path):
    path = tmp_path / "memory.jsonl"
    good = [{"t": 0.0, "phase": "setup"}, {"t": 1.0, "phase": "train"}]
    path.write_text("".join(json.dumps(s) + "\n" for s in good) + '{"t": 2.0, "pha')
    assert read_timeline(path) == good


def test_sampler_appending_after_a_kill_starts_a_fresh_line(tmp_path):
    path = tmp_path / "memory.jsonl"
    path.write_text(json.dumps({"t": 0.0, "phase": "train"}) + '\n{"t": 1.0, "pha')
    _run_sampler(path, "psutil", [("setup", None)], dwell=0.06)
    samples = read_timeline(path)
    assert samples[0] == {"t": 0.0, "phase": "train"}
    assert len(samples) >= 2 and all(s["backend"] == "psutil" for s in samples[1:])


# -- parsers -------------------------------------------------------------------


def test_parse_nvidia_smi_two_gpus_with_missing_fields_and_our_process():
    assert parse_nvidia_smi(NVIDIA_SMI_GPUS, NVIDIA_SMI_APPS, {OUR_PID}) == [
        {"index": 0, "used_bytes": 30520 * MIB, "total_bytes": 81920 * MIB,
         "process_bytes": 29800 * MIB, "util_pct": 97.0, "power_w": 352.41, "temp_c": 64.0},
        {"index": 1, "used_bytes": 1024 * MIB, "total_bytes": 81920 * MIB,
         "process_bytes": None, "util_pct": None, "power_w": None, "temp_c": 38.0},
    ]


def test_parse_nvidia_smi_without_our_process_or_devices():
    devices = parse_nvidia_smi(NVIDIA_SMI_GPUS, "", {OUR_PID})
    assert [d["process_bytes"] for d in devices] == [None, None]
    assert parse_nvidia_smi("No devices were found\n") == []


def test_nvidia_smi_backend_runs_both_queries_and_sums_our_memory():
    outputs = {monitor.NVIDIA_SMI_GPU_QUERY: NVIDIA_SMI_GPUS,
               monitor.NVIDIA_SMI_APPS_QUERY: NVIDIA_SMI_APPS}
    devices = NvidiaSmiBackend(run=outputs.__getitem__).read({OUR_PID})
    assert monitor._sum_known(d["process_bytes"] for d in devices) == 29800 * MIB
    with pytest.raises(monitor.BackendError, match="no device"):
        NvidiaSmiBackend(run=lambda args: "No devices were found\n").read(set())


def test_parse_rocm_smi_two_cards_with_na_power():
    assert parse_rocm_smi(ROCM_SMI_MI250X) == [
        {"index": 0, "used_bytes": 21474836480, "total_bytes": 68702699520,
         "process_bytes": None, "util_pct": 88.0, "power_w": 231.0, "temp_c": 41.0},
        {"index": 1, "used_bytes": 11452416, "total_bytes": 68702699520,
         "process_bytes": None, "util_pct": 0.0, "power_w": None, "temp_c": 36.0},
    ]


def test_parse_rocm_smi_mi300_socket_power_and_junction_temperature():
    (card,) = parse_rocm_smi(ROCM_SMI_MI300X)
    assert card == {"index": 0, "used_bytes": 295874560, "total_bytes": 205822885888,
                    "process_bytes": None, "util_pct": 0.0, "power_w": 133.0, "temp_c": 35.0}


def test_rocm_smi_backend_rejects_output_without_json():
    with pytest.raises(ValueError, match="no JSON"):
        RocmSmiBackend(run=lambda args: "ERROR: GPU[0] : Unable to open device\n").read(set())


# -- NVML ----------------------------------------------------------------------


def test_nvml_backend_on_a_fake_module():
    nvml = FakeNVML()
    backend = NvmlBackend(nvml)
    assert backend.read({OUR_PID}) == [
        {"index": 0, "used_bytes": 5 * GIB, "total_bytes": 80 * GIB,
         "process_bytes": 3 * GIB, "util_pct": 90.0, "power_w": 350.5, "temp_c": 60.0},
        {"index": 1, "used_bytes": GIB, "total_bytes": 80 * GIB,
         "process_bytes": None, "util_pct": 0.0, "power_w": None, "temp_c": 61.0},
    ]
    backend.close()
    assert nvml.initialised and nvml.shut_down


def test_detect_backend_prefers_nvml_then_falls_back_to_psutil():
    assert detect_backend(nvml=FakeNVML(), which=lambda tool: None).name == "nvml"

    class BrokenNVML(FakeNVML):
        def nvmlInit(self):
            raise FakeNVMLError("NVML Shared Library Not Found")

    assert detect_backend(nvml=BrokenNVML(), which=lambda tool: None).name == "psutil"
    smi = detect_backend(nvml=BrokenNVML(), which=lambda tool: "/usr/bin/" + tool,
                         run=lambda args: NVIDIA_SMI_GPUS if args[0] == "nvidia-smi" else "")
    assert smi.name == "nvidia-smi"
    rocm = detect_backend(nvml=BrokenNVML(), which=lambda tool: "/opt/rocm/bin/" + tool,
                          run=lambda args: ROCM_SMI_MI250X if args[0] == "rocm-smi" else "")
    assert rocm.name == "rocm-smi"


def test_sampler_with_fake_nvml_headlines_our_gpu_memory(tmp_path):
    sampler = _run_sampler(tmp_path / "m.jsonl", NvmlBackend(FakeNVML()),
                           [("setup", None), ("train", None)], dwell=0.06)
    summary = sampler.summary("train")
    assert (summary["metric"], summary["peak_bytes"], summary["backend"]) == \
        ("process_gpu", 3 * GIB, "nvml")


# -- gputop --------------------------------------------------------------------


def _matrix(tmp_path):
    """A matrix directory as adamwprune.run.matrix writes it: done, running and pending cells."""
    root = tmp_path / "20260101-120000_lenet5"
    names = ("adamw_magnitude", "adamwprune_state", "sgd_none")
    for cell in names:
        (root / cell).mkdir(parents=True)
    (root / "graphs").mkdir()  # not a cell
    cells = [{"id": n, "model": "lenet5", "optimizer": n.split("_")[0], "pruning": n.split("_")[1],
              "sparsity": 0.5, "variant": None, "seed": 1, "overrides": []} for n in names]
    (root / "matrix.json").write_text(json.dumps({"name": "lenet5", "overrides": [], "cells": cells}))
    (root / "adamw_magnitude" / "final.json").write_text('{"status": "completed"}')
    (root / "adamwprune_state" / "cell.json").write_text(json.dumps({"status": "running", "pid": os.getpid()}))
    rows = [{"step": 40, "val_metric": 0.91}, {"step": 80, "val_metric": 0.9731}]
    (root / "adamwprune_state" / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 1')
    return root


def test_scan_matrix_classifies_cells(tmp_path):
    cells = monitor.scan_matrix(_matrix(tmp_path))
    assert [(c["name"], c["status"]) for c in cells] == [
        ("adamw_magnitude", "done"), ("adamwprune_state", "running"), ("sgd_none", "pending")]
    assert cells[1]["last"]["step"] == 80


def test_gputop_once_prints_devices_and_running_cells(tmp_path, capsys):
    assert monitor.main(["--once", "--backend", "psutil", "--results",
                         str(_matrix(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "backend psutil" in out and "host  memory" in out
    assert "1 done, 1 running, 1 pending" in out
    assert "running adamwprune_state  step 80  val 0.9731" in out


def test_gputop_frame_for_gpus_and_for_a_failing_backend():
    frame = monitor.render_frame(NvmlBackend(FakeNVML()))
    assert "backend nvml" in frame and "5.0 GiB / 80.0 GiB" in frame and "350 W" in frame
    broken = monitor.render_frame(ScriptedBackend(fail=1))
    assert "backend psutil (fake failed: driver went away)" in broken


def test_gputop_module_entry_point_runs_once():
    done = subprocess.run([sys.executable, "-m", "adamwprune.monitor", "--once"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("gputop")


@pytest.mark.gpu
def test_detect_backend_finds_the_gpu_on_a_gpu_machine(tmp_path):
    backend = detect_backend()
    if backend.name == "psutil":
        pytest.skip("no GPU backend answers on this machine")
    devices = backend.read({OUR_PID})
    backend.close()
    assert devices and all(d["total_bytes"] > 0 for d in devices)
