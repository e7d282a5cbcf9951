"""`make bench` end to end on small shapes: the figures the performance issue asks
for are in the JSON, and the timed steps really pruned (so the times are of real work)."""
import json
import subprocess
import sys

import pytest

from adamwprune.bench import TARGET
from adamwprune.config import ROOT
from adamwprune.optim import cpu_kernels


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    r = subprocess.run([sys.executable, "-m", "adamwprune.bench", "--shapes", "gpt2-mini",
                        "--repeats", "2", "--warmup", "1", "--engine-steps", "5,15",
                        "--engine-rounds", "1", "--device", "cpu", "--out", str(out),
                        "--inference-models", ""],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    (path,) = out.glob("*.json")
    return json.loads(path.read_text()), r.stdout


def test_json_holds_the_four_headline_figures(bench):
    result, _ = bench
    ratios = result["step_ratio_vs_adamw"]["gpt2-mini"]
    for key in ("adamwprune_ramp", "adamwprune_after", "magnitude_ramp", "movement_after",
                "adamwprune_clip_ramp", "adamwprune_clip_after"):
        assert ratios[key] > 0
    assert "adamw_clip_ramp" not in ratios  # the clipping rows' baseline
    # an amortised difference of two medians: noise on a loaded machine can make it < 0
    assert -1 < result["mask_update_fraction"]["gpt2-mini"]["adamwprune"] < 1
    assert result["engine_overhead_ratio"] > 0
    extra = result["extra_state_bytes_per_param"]["gpt2-mini"]
    assert extra["adamwprune"] == 0.0  # pruned entries recognised from the state
    assert 0 < extra["magnitude"] < extra["movement"]  # a bool mask; fp32 scores + mask


def test_every_method_reached_the_target_in_the_timed_steps(bench):
    result, stdout = bench
    shape = result["shapes"]["gpt2-mini"]
    assert set(shape["sparsity_after_ramp"]) == {"adamwprune", "adamwprune_clip", "adamwprune_2:4",
                                                 "magnitude", "movement"}
    for method, sparsity in shape["sparsity_after_ramp"].items():
        target = 0.5 if method.endswith("2:4") else TARGET
        assert sparsity == pytest.approx(target, abs=1e-3), method
    assert "sparsity after the ramp (target 0.9)" in stdout


@pytest.mark.skipif(cpu_kernels.load() is None, reason="no C compiler: the plain path runs")
def test_adamwprune_updates_ran_in_the_fused_cpu_kernel(bench):
    result, _ = bench
    for method in ("adamwprune", "adamwprune_clip"):  # clipping keeps the step fused
        paths = result["shapes"]["gpt2-mini"]["update_paths"][method]
        assert set(paths) == {"cpu-fused"} and paths["cpu-fused"] > 100, (method, paths)
    paths = result["shapes"]["gpt2-mini"]["update_paths"]["adamwprune_2:4"]
    assert set(paths) == {"cpu"} and paths["cpu"] > 100, paths  # the N:M group kernels
