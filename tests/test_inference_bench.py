"""make bench's sparse_inference_speedup section and make bench-inference RUN=, end to end
on small models: the figures are in the JSON and the sparse forwards really ran sparse."""
import json
import subprocess
import sys

import pytest

from adamwprune.config import kconfig as C
from adamwprune.cli import load_task
from adamwprune.config.kconfig import ROOT
from adamwprune.engine.trainer import Trainer
from adamwprune.inference import cpu_kernels
from adamwprune.inference.bench import bench_run, main


@pytest.fixture(scope="module")
def section(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    r = subprocess.run([sys.executable, "-m", "adamwprune.bench", "--shapes", "", "--engine-steps", "0,0",
                        "--inference-models", "gpt2-mini", "--inference-repeats", "1",
                        "--inference-sparsities", "0.5,0.95",
                        "--device", "cpu", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (path,) = out.glob("*.json")
    return json.loads(path.read_text())["sparse_inference_speedup"], r.stdout


def test_section_times_every_model_sparsity_and_batch(section):
    result, stdout = section
    assert result["sparsities"] == [0.5, 0.95]
    for s in ("0.5", "0.95"):
        per = result["models"]["gpt2-mini"][s]
        assert list(per) == ["1", "512"]
        for r in per.values():
            assert r["speedup"] > 0 and r["times"]["dense"]["n"] == 1
    assert result["models"]["gpt2-mini"]["0.95"]["512"]["input_shape"] == [2, 256]
    assert "whole forward" in stdout and "Linear layers alone" in stdout


def test_gpt_linear_shapes_are_timed_against_dense_and_torch_csr(section):
    result, _ = section
    shapes = result["linear"]["gpt2-mini"]
    assert set(shapes) == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
    r = shapes["mlp.c_fc"]["0.95"]["512"]
    assert set(r["times"]) == {"dense", "sparse", "torch_csr"}
    assert r["weight_bytes"]["sparse"] < 0.2 * r["weight_bytes"]["dense"]
    if cpu_kernels.load() is not None:
        assert r["sparse_path"] == "kernel"
    assert result["headline"]["models"]["gpt2-mini"]["0.95"]["1"] > 0


def test_sparse_models_hold_fewer_weight_bytes_and_report_peak_memory(section):
    result, _ = section
    r = result["models"]["gpt2-mini"]["0.95"]["1"]
    assert r["sparse_layers"] == 4 * 4  # every block Linear; the tied head stays dense
    assert r["memory"]["sparse"]["weights_bytes"] < r["memory"]["dense"]["weights_bytes"]
    dense, sparse = r["memory"]["dense"], r["memory"]["sparse"]
    assert dense["peak_rss_bytes"] >= dense["rss_before_forward_bytes"] > dense["weights_bytes"]
    # measured in processes that hold one form each: the sparse one is smaller by about
    # the dense bytes of the 3.1 M pruned weights (12.6 MB) less their CSR (0.9 MB)
    assert dense["rss_before_forward_bytes"] - sparse["rss_before_forward_bytes"] > 5 * 2**20
    low = result["models"]["gpt2-mini"]["0.5"]["1"]
    assert low["sparse_layers"] == 0  # below the default 70 %: left dense


def test_bench_inference_on_a_run_writes_inference_json(tmp_path):
    cfg, _, _ = C.load(None, {"MODEL": "lenet5", "DATASET": "synthetic", "DATA_SYNTHETIC_SIZE": "128",
                              "BATCH_SIZE": "16", "DEVICE": "cpu", "TRAIN_EVAL_INTERVAL": "8",
                              "OPTIMIZER": "adamw", "PRUNING": "magnitude", "MAX_ITERS": "16",
                              "PRUNING_TARGET_SPARSITY": "0.9", "RUN_MONITOR_INTERVAL": "0.05"})
    Trainer(load_task("lenet5"), cfg, tmp_path / "run", config_text="").fit()
    result = bench_run(tmp_path / "run", repeats=1, warmup=1)
    assert json.loads((tmp_path / "run" / "inference.json").read_text())["run"] == result["run"]
    assert result["weights"].endswith("best.pt") and set(result["batches"]) == {"1", "128"}
    for r in result["batches"].values():  # convolutions chosen by measurement, memory per form
        assert r["layers"] == 5 and r["speedup"] > 0
        assert r["memory"]["sparse"]["peak_rss_bytes"] > 0 and r["memory"]["dense"]["peak_rss_bytes"] > 0
    assert result["prunable_sparsity"] == pytest.approx(0.9, abs=1e-4)


def test_bench_inference_refuses_a_run_without_best_pt(tmp_path, capsys):
    assert main(["--run", str(tmp_path)]) == 2
    assert "no best.pt" in capsys.readouterr().err
