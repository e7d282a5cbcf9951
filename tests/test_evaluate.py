"""`make evaluate`: the run's own checkpoint, on the dataset it is given (issue 13 item 3,
issue 12 item 7)."""
import json
import struct

import pytest
import torch

from adamwprune.run import checkpoint
from adamwprune import cli as CLI
from adamwprune.config import kconfig as C
from adamwprune.cli import load_task
from adamwprune.engine.trainer import Trainer

TINY = {"MODEL": "lenet5", "DATASET": "synthetic", "DATA_SYNTHETIC_SIZE": "64", "BATCH_SIZE": "16",
        "DEVICE": "cpu", "MAX_ITERS": "4", "TRAIN_EVAL_INTERVAL": "2", "RUN_MONITOR_INTERVAL": "0.2",
        "OPTIMIZER": "adamw", "PRUNING": "none"}


@pytest.fixture(scope="module")
def lenet_run(tmp_path_factory):
    cfg, _, _ = C.load(None, TINY)
    path = tmp_path_factory.mktemp("evaluate") / "run"
    Trainer(load_task("lenet5"), cfg, path, config_text="").fit()
    return path


def _evaluate(capsys, *args):
    capsys.readouterr()
    code = CLI.main(["evaluate", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _write_mnist(root, n_train, n_test):
    """torchvision's raw MNIST layout with random digits: <root>/MNIST/raw/*-ubyte."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, 10, (n,), dtype=torch.uint8, generator=g)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.numpy().tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.numpy().tobytes())


def test_evaluate_on_another_dataset_of_the_task_records_what_it_evaluated(lenet_run, tmp_path, capsys):
    _write_mnist(tmp_path / "mnist", n_train=5010, n_test=37)
    code, out, err = _evaluate(capsys, "--run", str(lenet_run), "--dataset", "mnist",
                               "--data-dir", str(tmp_path / "mnist"))
    assert code == 0, err
    result = json.loads((lenet_run / "eval.json").read_text())
    assert result["model"] == "lenet5" and result["dataset"] == "mnist"
    assert result["data_dir"] == str(tmp_path / "mnist") and result["n_examples"] == 37
    assert result["metric_name"] == "accuracy" and 0.0 <= result["metric"] <= 100.0 and result["loss"] > 0
    assert "37 examples" in out and "mnist test split" in out


def test_data_dir_for_a_dataset_that_reads_no_files_is_one_line(lenet_run, capsys):
    code, _, err = _evaluate(capsys, "--run", str(lenet_run), "--dataset", "mnist_embedded", "--data-dir", "/data")
    assert code == 2 and err.count("\n") == 1 and "reads no files" in err


def test_a_dataset_of_another_task_is_one_line_listing_the_valid_ones(lenet_run, capsys):
    code, _, err = _evaluate(capsys, "--run", str(lenet_run), "--dataset", "cifar10")
    assert code == 2 and err.count("\n") == 1
    assert "not a dataset of the lenet5 task (valid: mnist, mnist_embedded, synthetic)" in err


def test_evaluate_refuses_a_checkpoint_of_another_model(lenet_run, tmp_path, capsys):
    """A ResNet-18 best.pt copied into a LeNet-5 run: refused, nothing written."""
    import shutil

    run = shutil.copytree(lenet_run, tmp_path / "run")
    (run / "eval.json").unlink(missing_ok=True)
    resnet_cfg, _, _ = C.load(None, {"MODEL": "resnet18", "DATASET": "synthetic"})
    checkpoint.save_atomic({"format": 1, "step": 3, "model": {"conv1.weight": torch.zeros(1)},
                            "config": resnet_cfg.to_dict()}, run / "best.pt")
    code, _, err = _evaluate(capsys, "--run", str(run))
    assert code == 2 and err.count("\n") == 1
    assert "resnet18" in err and "lenet5" in err and not (run / "eval.json").exists()


def test_mismatched_weight_names_are_one_line(lenet_run, tmp_path, capsys):
    import shutil

    run = shutil.copytree(lenet_run, tmp_path / "run")
    state = checkpoint.load(run / "best.pt")
    state["model"] = {f"module.{k}": v for k, v in state["model"].items()}  # a DDP-prefixed state dict
    checkpoint.save_atomic(state, run / "best.pt")
    code, _, err = _evaluate(capsys, "--run", str(run))
    n = len(state["model"])
    assert code == 2 and err.count("\n") == 1
    assert f"{n} missing" in err and f"{n} unexpected (e.g. module." in err


def test_eval_json_of_the_run_itself_equals_its_test_metric_at_best(lenet_run, capsys):
    code, _, err = _evaluate(capsys, "--run", str(lenet_run))
    assert code == 0, err
    result = json.loads((lenet_run / "eval.json").read_text())
    final = json.loads((lenet_run / "final.json").read_text())
    assert result["metric"] == pytest.approx(final["test_metric_at_best"]) and result["data_dir"] is None
    assert result["dataset"] == "synthetic" and result["n_examples"] > 0
