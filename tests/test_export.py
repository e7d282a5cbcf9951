"""make export: plain and compressed files, round trips, sizes, the re-evaluated metric."""
import json

import pytest
import torch
from safetensors.torch import load_file, load_model

from adamwprune.config import kconfig as C
from adamwprune.cli import load_task, main
from adamwprune.engine.trainer import Trainer
from adamwprune.export import choose_pattern, export_run, read_compressed, write_compressed
from adamwprune.models.lenet5 import LeNet5

LENET = {"MODEL": "lenet5", "DATASET": "synthetic", "DATA_SYNTHETIC_SIZE": "128", "BATCH_SIZE": "16",
         "DEVICE": "cpu", "TRAIN_EVAL_INTERVAL": "8", "RUN_MONITOR_INTERVAL": "0.05",
         "OPTIMIZER": "adamw", "PRUNING": "magnitude", "PRUNING_TARGET_SPARSITY": "0.9",
         "MAX_ITERS": "16"}


def two_four(rows, cols, generator=None):
    """A dense tensor with exactly 2 non-zeros in every group of 4 along the rows."""
    w = torch.randn(rows, cols, generator=generator)
    groups = w.view(-1, 4)
    keep = groups.abs().topk(2, dim=1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, keep, True)
    return (groups * mask).view(rows, cols)


def unstructured(shape, sparsity, generator=None):
    w = torch.randn(shape, generator=generator)
    return w * (torch.rand(shape, generator=generator) >= sparsity)


@pytest.fixture(scope="module")
def lenet_run(tmp_path_factory):
    cfg, _, _ = C.load(None, LENET)
    path = tmp_path_factory.mktemp("lenet") / "run"
    Trainer(load_task("lenet5"), cfg, path, config_text="").fit()
    report = export_run(path, quiet=True)
    return path, report


def test_export_refuses_a_run_without_best_pt_in_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert main(["export", "--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no best.pt" in err and str(tmp_path) in err
    assert not (tmp_path / "export").exists()


def test_exported_metric_equals_the_runs_test_metric(lenet_run):
    path, report = lenet_run
    m = report["test_metric"]
    rows = [json.loads(l) for l in (path / "metrics.jsonl").read_text().splitlines()]
    best_step = json.loads((path / "final.json").read_text())["best_step"]
    logged = next(r["test_metric"] for r in rows if r["step"] == best_step)
    assert m["run"] == logged == m["exported"] == m["decompressed"] and m["all_equal"]
    assert json.loads((path / "export" / "export.json").read_text())["test_metric"] == m


def test_plain_safetensors_load_into_the_model_class_without_pruners(lenet_run):
    path, _ = lenet_run
    best = torch.load(path / "best.pt", weights_only=True)["model"]
    model = LeNet5()
    load_model(model, str(path / "export" / "model.safetensors"))
    for key, value in model.state_dict().items():
        assert torch.equal(value, best[key]), key
    assert set(load_file(str(path / "export" / "model.safetensors"))) == set(best)


def test_compressed_copy_decompresses_to_identical_tensors_and_is_small(lenet_run):
    path, report = lenet_run
    plain = load_file(str(path / "export" / "model.safetensors"))
    restored = read_compressed(path / "export" / "compressed")
    assert set(restored) == set(plain)
    assert all(torch.equal(restored[k], plain[k]) for k in plain)
    assert report["round_trip"]["decompressed_tensors_identical"]
    config = json.loads((path / "export" / "compressed" / "config.json").read_text())
    assert config["quantization_config"]["sparsity_config"]["format"] == "sparse-bitmask"
    pr = report["prunable"]
    assert pr["sparsity"] == pytest.approx(0.9, abs=1e-4)
    assert pr["compressed_ratio_to_dense_fp32"] <= 0.2
    files = report["files"]
    assert files["compressed/model.safetensors"]["bytes"] == (
        path / "export" / "compressed" / "model.safetensors").stat().st_size
    assert files["compressed/model.safetensors"]["ratio_to_dense_fp32"] <= 0.2


def test_export_json_has_per_tensor_sparsity_and_flops(lenet_run):
    _, report = lenet_run
    prunable = {k: v for k, v in report["tensors"].items() if v["prunable"]}
    assert len(prunable) == report["prunable"]["tensors"] == 5
    assert sum(v["nonzero"] for v in prunable.values()) == report["prunable"]["nonzero"]
    for v in report["tensors"].values():
        assert v["sparsity"] == pytest.approx(1 - v["nonzero"] / v["numel"])
    assert report["tensors"]["features.0.weight"]["prunable"]
    assert not report["tensors"]["features.0.bias"]["prunable"]
    fl = report["flops_per_example"]
    assert 0 < fl["nonzero"] < fl["dense"] and set(fl["layers"]) == set(prunable)


def test_a_second_export_replaces_the_first_whole(lenet_run):
    path, _ = lenet_run
    (path / "export" / "stale.txt").write_text("from an earlier export")
    export_run(path, quiet=True)
    assert not (path / "export" / "stale.txt").exists()
    assert not list(path.glob(".export*"))


@pytest.mark.parametrize("shape", [(64, 96), (8, 4, 3, 3)])
def test_sparse_bitmask_round_trip_is_bit_exact(tmp_path, shape):
    g = torch.Generator().manual_seed(0)
    state = {"a.weight": unstructured(shape, 0.9, g), "a.bias": torch.randn(shape[0], generator=g)}
    info = write_compressed(state, ["a.weight"], tmp_path, "unstructured")
    restored = read_compressed(tmp_path)
    assert info["format"] == "sparse-bitmask"
    assert all(torch.equal(restored[k], state[k]) for k in state) and set(restored) == set(state)


def test_two_four_round_trip_is_bit_exact_and_small(tmp_path):
    g = torch.Generator().manual_seed(1)
    state = {"fc.weight": two_four(256, 512, g), "conv.weight": two_four(16, 36, g).view(16, 4, 3, 3),
             "odd.weight": torch.randn(8, 6, generator=g)}  # 6 inputs: 2:4 does not apply, left dense
    info = write_compressed(state, list(state), tmp_path, "2:4")
    assert info["format"] == "sparse-24-bitmask" and info["left_dense"] == ["odd"]
    restored = read_compressed(tmp_path)
    assert all(torch.equal(restored[k], state[k]) for k in state)
    size = (tmp_path / "model.safetensors").stat().st_size
    assert size <= 0.6 * 4 * sum(t.numel() for t in state.values())


def test_unstructured_file_at_90_percent_is_at_most_a_fifth_of_dense(tmp_path):
    state = {"fc.weight": unstructured((768, 3072), 0.9, torch.Generator().manual_seed(2))}
    write_compressed(state, ["fc.weight"], tmp_path, "unstructured")
    assert (tmp_path / "model.safetensors").stat().st_size <= 0.2 * 4 * 768 * 3072


def test_pattern_comes_from_the_config_else_from_the_weights():
    g = torch.Generator().manual_seed(3)
    nm = {"fc.weight": two_four(32, 64, g)}
    dense_ish = {"fc.weight": unstructured((32, 64), 0.5, g)}
    assert choose_pattern({"pattern": "unstructured"}, nm)[0] == "unstructured"
    assert choose_pattern({}, nm)[0] == "2:4"
    assert choose_pattern({}, dense_ish)[0] == "unstructured"
    # 95 % unstructured can satisfy "2 zeros per group" by chance: still unstructured
    assert choose_pattern({}, {"fc.weight": unstructured((8, 16), 0.97, g)})[0] == "unstructured"
