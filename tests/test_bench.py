"""`make bench` end to end on small shapes: the figures the performance issue asks
for are in the JSON, and the timed steps really pruned (so the times are of real work)."""
import json
import subprocess
import sys

import pytest

from adamwprune.bench import TARGET
from adamwprune.config.kconfig import ROOT
from adamwprune.optim import cpu_kernels


# gpt2-mini's width with one layer and a 2,048-token vocabulary: 1.38M parameters (16.1M
# for gpt2-mini, whose 50,257-token embedding dominates), still above the 1M from which
# AdamWPrune takes the fused CPU path (adamwprune_cpu.FAST_MIN_NUMEL). Added to the
# bench's shape sets for this run only; `make bench` times its own.
SHAPE = "gpt2-mini-1l"
RUN_BENCH = f"""
import sys
from adamwprune import bench
from adamwprune.models.gpt2 import GPT, gpt_config
shape_models = bench.shape_models
bench.shape_models = lambda: {{**shape_models(),
                               {SHAPE!r}: lambda: GPT(gpt_config("mini", n_layer=1, vocab_size=2048))}}
sys.exit(bench.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    r = subprocess.run([sys.executable, "-c", RUN_BENCH, "--shapes", SHAPE,
                        "--repeats", "2", "--warmup", "1", "--engine-steps", "5,15",
                        "--engine-rounds", "1", "--device", "cpu", "--out", str(out),
                        "--inference-models", ""],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    (path,) = out.glob("*.json")
    return json.loads(path.read_text()), r.stdout


def test_json_holds_the_four_headline_figures(bench):
    result, _ = bench
    ratios = result["step_ratio_vs_adamw"][SHAPE]
    for key in ("adamwprune_ramp", "adamwprune_after", "magnitude_ramp", "movement_after",
                "adamwprune_clip_ramp", "adamwprune_clip_after"):
        assert ratios[key] > 0
    assert "adamw_clip_ramp" not in ratios  # the clipping rows' baseline
    # an amortised difference of two medians: noise on a loaded machine can make it < 0
    assert -1 < result["mask_update_fraction"][SHAPE]["adamwprune"] < 1
    assert result["engine_overhead_ratio"] > 0
    extra = result["extra_state_bytes_per_param"][SHAPE]
    assert extra["adamwprune"] == 0.0  # pruned entries recognised from the state
    assert 0 < extra["magnitude"] < extra["movement"]  # a bool mask; fp32 scores + mask


def test_every_method_reached_the_target_in_the_timed_steps(bench):
    result, stdout = bench
    shape = result["shapes"][SHAPE]
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
        paths = result["shapes"][SHAPE]["update_paths"][method]
        assert set(paths) == {"cpu-fused"} and paths["cpu-fused"] > 100, (method, paths)
    paths = result["shapes"][SHAPE]["update_paths"]["adamwprune_2:4"]
    assert set(paths) == {"cpu"} and paths["cpu"] > 100, paths  # the N:M group kernels
