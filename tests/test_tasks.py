"""Every model's task through the engine: synthetic smoke runs, GPT-2 on real text, DDP."""
import json
import os
import subprocess
import sys

import pytest

from adamwprune.config import kconfig as C
from adamwprune.cli import load_task
from adamwprune.config.kconfig import ROOT
from adamwprune.engine.trainer import Trainer

SMOKE = {
    "lenet5": {},
    "resnet18": {"BATCH_SIZE": "4", "DATA_SYNTHETIC_SIZE": "8"},
    "resnet50": {"BATCH_SIZE": "2", "DATA_SYNTHETIC_SIZE": "4"},
    "gpt2": {"GPT2_SIZE": "tiny", "GPT2_BLOCK_SIZE": "32", "BATCH_SIZE": "4", "TRAIN_EVAL_BATCHES": "1"},
}
PARAMS = {"lenet5": 61_706, "resnet18": 11_173_962, "resnet50": 23_705_252}


@pytest.mark.parametrize("model", list(SMOKE))
def test_each_model_trains_two_steps_on_synthetic_data(tmp_path, model):
    """What `make DATASET=synthetic MAX_ITERS=2` does, for every model."""
    cfg, _, _ = C.load(None, {"MODEL": model, "DATASET": "synthetic", "MAX_ITERS": "2", "DEVICE": "cpu",
                              "OPTIMIZER": "adamwprune", "PRUNING": "state", "PRUNING_TARGET_SPARSITY": "0.5",
                              "RUN_MONITOR_INTERVAL": "0.2", **SMOKE[model]})
    final = Trainer(load_task(model), cfg, tmp_path / "run", config_text="").fit()
    assert final["status"] == "completed" and final["steps"] == 2
    if model in PARAMS:
        assert final["params_total"] == PARAMS[model]
    assert 0 < final["params_prunable"] < final["params_total"]
    # the end of the ramp is inside the budget, so the target is met exactly
    assert abs(final["final_sparsity"] - 0.5) < 1e-4


def test_gpt2_tiny_on_shakespeare_validation_loss_falls(tmp_path):
    cfg, _, _ = C.load(ROOT / "gpt2" / "defconfigs" / "gpt2-shakespeare-tiny",
                       {"DATA_DIR": str(tmp_path / "data"), "MAX_ITERS": "40", "TRAIN_EVAL_INTERVAL": "20", "BATCH_SIZE": "4",
                        "TRAIN_EVAL_BATCHES": "2", "GPT2_TOKEN_BUDGET": "200000", "RUN_MONITOR_INTERVAL": "0.2"})
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(ROOT.parent / "shared" / "data" / "tiktoken-cache"))
    final = Trainer(load_task("gpt2"), cfg, tmp_path / "run", config_text="").fit()
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert final["status"] == "completed"
    assert final["metric_name"] == "perplexity" and not final["higher_is_better"]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] < 11.0
    assert (tmp_path / "data" / "tokens" / "shakespeare-200000" / "meta.json").exists()


def _ddp_start(tmp_path, nproc):
    """The run with NPROC=nproc started in the background; a function that waits for it
    and gives its metrics rows and run directory."""
    cmd = [sys.executable, "-m", "adamwprune", "run", "--config", str(ROOT / "gpt2" / "defconfigs" /
                                                                     "gpt2-shakespeare-tiny")]
    for k, v in {"DATASET": "synthetic", "MAX_ITERS": "4", "TRAIN_EVAL_INTERVAL": "2", "BATCH_SIZE": "8",
                 "NPROC": str(nproc), "RUN_THREADS": "1", "RUN_MONITOR_INTERVAL": "0.2",
                 "GPT2_BLOCK_SIZE": "32", "TRAIN_EVAL_BATCHES": "2"}.items():
        cmd.append(f"--override={k}={v}")
    run_dir = tmp_path / f"n{nproc}"
    proc = subprocess.Popen(cmd + ["--run-dir", str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)

    def finished():
        try:
            out, _ = proc.communicate(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 0, out[-4000:]
        return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()], run_dir
    return finished


def test_two_process_gloo_ddp_matches_one_process_with_the_same_global_batch(tmp_path):
    # both at once: one thread per process, and the 1-process run mostly overlaps the 2-rank one
    one_finished, two_finished = _ddp_start(tmp_path, 1), _ddp_start(tmp_path, 2)
    try:
        two, run_dir = two_finished()
    finally:
        one, _ = one_finished()
    assert [r["step"] for r in one] == [r["step"] for r in two] == [2, 4]
    for a, b in zip(one, two):
        for key in ("train_loss", "val_loss", "test_loss", "sparsity"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    env = json.loads((run_dir / "env.json").read_text())
    assert env["world_size"] == 2
    assert json.loads((run_dir / "final.json").read_text())["status"] == "completed"
