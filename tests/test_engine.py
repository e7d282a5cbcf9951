"""The training engine end to end on LeNet-5 with tiny data: run directory, resume, divergence."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from adamwprune.config import kconfig as C
from adamwprune.cli import load_task
from adamwprune.config.kconfig import ROOT
from adamwprune.engine.trainer import Trainer
from helpers import cli, write_config

TINY = {"MODEL": "lenet5", "DATASET": "synthetic", "DATA_SYNTHETIC_SIZE": "128", "BATCH_SIZE": "16",
        "DEVICE": "cpu", "TRAIN_EVAL_INTERVAL": "8", "RUN_MONITOR_INTERVAL": "0.05"}


def tiny_cfg(**extra):
    cfg, _, _ = C.load(None, {**TINY, **{k: str(v) for k, v in extra.items()}})
    return cfg


def run(cfg, path, resume=False):
    trainer = Trainer(load_task(cfg.model), cfg, path, config_text="")
    return trainer, trainer.fit(resume=resume)


def test_lenet5_trains_end_to_end_and_writes_the_run_directory(tmp_path):
    cfg = tiny_cfg(OPTIMIZER="adamw", PRUNING="magnitude", PRUNING_TARGET_SPARSITY="0.5", MAX_ITERS=24)
    _, final = run(cfg, tmp_path / "run")
    d = tmp_path / "run"
    for name in (".config", "config.json", "env.json", "metrics.jsonl", "memory.jsonl", "last.pt", "best.pt",
                 "final.json"):
        assert (d / name).exists(), name
    assert final["status"] == "completed" and final["steps"] == 24
    assert final["final_sparsity"] == pytest.approx(round(0.5 * 61470) / 61470, abs=1e-12)
    assert final["params_total"] == 61706 and final["params_prunable"] == 61470
    rows = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [8, 16, 24]
    for key in ("epoch", "train_loss", "val_metric", "test_metric", "sparsity", "lr", "elapsed_s"):
        assert key in rows[0]
    env = json.loads((d / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["device"] == "cpu"
    assert final["memory"]["parameters"]["bytes"] == 61706 * 4
    # best is chosen on validation among evaluations at the final sparsity (after the ramp);
    # its test metric is the one at that step
    end = json.loads((d / "config.json").read_text())["schedule"]["end"]
    assert 0 < end < 24
    best = max((r for r in rows if r["step"] >= end), key=lambda r: r["val_metric"])
    assert final["best_step"] == best["step"] and final["test_metric_at_best"] == best["test_metric"]


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("optimizer,pruning", [("adamw", "magnitude"), ("sgd", "movement"),
                                               ("adamwprune", "state")])
def test_resume_from_last_pt_is_bit_identical(tmp_path, monkeypatch, optimizer, pruning):
    cfg = tiny_cfg(OPTIMIZER=optimizer, PRUNING=pruning, PRUNING_TARGET_SPARSITY="0.6", MAX_ITERS=40,
                   CHECKPOINT_INTERVAL=12, PRUNING_INTERVAL=4, LR_SCHEDULE_COSINE="y")
    _, ref_final = run(cfg, tmp_path / "ref")
    ref = torch.load(tmp_path / "ref" / "last.pt", weights_only=True)

    original = Trainer.train_step

    def dying_step(self):
        if self.step == 30:  # last.pt was written at 24
            raise Interrupt()
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", dying_step)
    with pytest.raises(Interrupt):
        run(cfg, tmp_path / "cut")
    assert not (tmp_path / "cut" / "final.json").exists()
    monkeypatch.setattr(Trainer, "train_step", original)
    _, final = run(cfg, tmp_path / "cut", resume=True)
    got = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    for k, v in ref["model"].items():
        assert torch.equal(v, got["model"][k]), k
    assert final["final_sparsity"] == ref_final["final_sparsity"]
    strip = lambda p: [{k: v for k, v in json.loads(l).items() if k != "elapsed_s"}
                       for l in p.read_text().splitlines()]
    assert strip(tmp_path / "cut" / "metrics.jsonl") == strip(tmp_path / "ref" / "metrics.jsonl")


class _NanFromStep:
    """A task whose loss is NaN from a given step on (counted in loss calls)."""

    def __init__(self, task, first_bad: int):
        self._task, self.first_bad, self.calls = task, first_bad, 0

    def __getattr__(self, name):
        return getattr(self._task, name)

    def loss(self, model, batch):
        self.calls += 1
        loss = self._task.loss(model, batch)
        return loss * float("nan") if self.calls >= self.first_bad else loss


@pytest.mark.parametrize("optimizer,pruning", [("sgd", "magnitude"), ("adamwprune", "state")])
def test_nan_loss_is_reported_at_its_step_and_never_checkpointed(tmp_path, optimizer, pruning):
    # The loss is read one step late (no device sync per step); the NaN must still be
    # named at its own step, stop the run before the next update, and no checkpoint
    # or metrics row may come from a step at or after it. Step 8 is also a mask update.
    cfg = tiny_cfg(OPTIMIZER=optimizer, PRUNING=pruning, PRUNING_INTERVAL=4, MAX_ITERS=40,
                   CHECKPOINT_INTERVAL=2, TRAIN_EVAL_INTERVAL=4)
    trainer = Trainer(_NanFromStep(load_task(cfg.model), 8), cfg, tmp_path / "run", config_text="")
    final = trainer.fit()
    assert final["status"] == "diverged"
    assert "loss is nan at step 8" in final["message"], final["message"]
    assert final["steps"] == 8  # step 8's update ran; step 9's did not
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 6
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4] and all(r["train_loss"] == r["train_loss"] for r in rows)


def test_an_optimizer_error_on_a_nan_step_is_divergence_not_a_crash(tmp_path, monkeypatch):
    # The NaN step's update runs before its loss is read; an update that fails on NaN
    # scores (as AdamWPrune's mask selection does) must end as "diverged".
    from adamwprune.optim import AdamWPrune

    original = AdamWPrune.step

    def strict_step(self, closure=None):
        if any(torch.isnan(p.grad).any() for g in self.param_groups for p in g["params"]
               if p.grad is not None):
            raise ValueError("pruning scores contain NaN")
        return original(self, closure)

    monkeypatch.setattr(AdamWPrune, "step", strict_step)
    cfg = tiny_cfg(OPTIMIZER="adamwprune", PRUNING="state", MAX_ITERS=40)
    trainer = Trainer(_NanFromStep(load_task(cfg.model), 5), cfg, tmp_path / "run", config_text="")
    final = trainer.fit()
    assert final["status"] == "diverged" and "loss is nan at step 5" in final["message"]
    assert final["steps"] == 4


def test_loss_readback_reads_the_queued_loss_once_and_names_the_step():
    from adamwprune.engine.trainer import DivergedError, LossReadback

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lb = LossReadback()
    assert lb.read() is None
    lb.put(1, torch.tensor(2.5, device=device))
    assert lb.read() == 2.5 and lb.read() == 2.5
    lb.put(2, torch.tensor(float("inf"), device=device))
    with pytest.raises(DivergedError, match="loss is inf at step 2"):
        lb.read()


def test_nan_loss_stops_with_status_diverged(tmp_path, capsys):
    cfg = tiny_cfg(OPTIMIZER="sgd", PRUNING="none", LR="90", MAX_ITERS=300)
    _, final = run(cfg, tmp_path / "run")
    assert final["status"] == "diverged"
    assert "diverged" in final["message"] and "LR=" in final["message"]
    assert final["steps"] < 300
    assert json.loads((tmp_path / "run" / "final.json").read_text())["status"] == "diverged"


def _write_config(tmp_path, **extra):
    return write_config(tmp_path, {**TINY, "OPTIMIZER": "adamw", "PRUNING": "magnitude",
                                   "RUN_RESULTS_DIR": str(tmp_path / "results"), **extra})


def test_kill_9_then_continue_finishes_the_run_in_place(tmp_path):
    cfg_path = _write_config(tmp_path, MAX_ITERS="240", CHECKPOINT_INTERVAL="20", TRAIN_EVAL_INTERVAL="60",
                             RUN_THREADS="1")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # the uninterrupted reference runs alongside (one thread each: they share the cores)
    ref = subprocess.Popen([sys.executable, "-m", "adamwprune", "run", "--config", str(cfg_path),
                            "--run-dir", str(tmp_path / "ref")], cwd=ROOT, env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _kill_9_and_continue(tmp_path, cfg_path, env)
        out, _ = ref.communicate(timeout=300)
        assert ref.returncode == 0, out
    finally:
        if ref.poll() is None:
            ref.kill()
            ref.communicate()
    results = tmp_path / "results"
    (run,) = results.iterdir()
    a = json.loads((tmp_path / "ref" / "final.json").read_text())
    b = json.loads((run / "final.json").read_text())
    for key in ("best_val_metric", "test_metric_at_best", "final_sparsity", "steps", "best_step"):
        assert a[key] == b[key], key


def _kill_9_and_continue(tmp_path, cfg_path, env):
    proc = subprocess.Popen([sys.executable, "-m", "adamwprune", "run", "--config", str(cfg_path)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    results = tmp_path / "results"
    while time.time() < deadline and not list(results.glob("*/last.pt")):
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    runs = list(results.iterdir())
    assert len(runs) == 1 and not (runs[0] / "final.json").exists()
    cont = cli("continue", "--results", str(results))
    assert cont.returncode == 0, cont.stderr
    assert "resumed at step" in cont.stdout
    assert list(results.iterdir()) == runs  # same directory, nothing new
    assert cli("continue", "--results", str(results)).stdout.startswith("nothing to continue")


def test_evaluate_writes_eval_json(tmp_path):
    cfg = tiny_cfg(OPTIMIZER="adamw", PRUNING="none", MAX_ITERS=8)
    run(cfg, tmp_path / "run")
    r = cli("evaluate", "--run", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "run" / "eval.json").read_text())
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert out["test_metric"] == pytest.approx(final["test_metric_at_best"])


def test_corrupt_checkpoint_gives_one_clear_line(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "best.pt").write_bytes(b"not a checkpoint")
    r = cli("evaluate", "--run", str(d))
    assert r.returncode == 2
    assert "corrupt checkpoint" in r.stderr and "delete it" in r.stderr and r.stderr.count("\n") == 1


def test_direct_script_maps_flags_onto_the_config(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "--optimizer", "adamw", "--pruning-method", "magnitude",
                        "--target-sparsity", "0.5", "--max-iters", "6", "--dataset", "synthetic", "--device",
                        "cpu", "--results-dir", str(tmp_path)], cwd=ROOT / "lenet5", capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    (run_dir,) = tmp_path.iterdir()
    cfg = json.loads((run_dir / "config.json").read_text())["config"]
    assert (cfg["optimizer"], cfg["pruning"], cfg["target_sparsity"], cfg["max_iters"]) == \
        ("adamw", "magnitude", 0.5, 6)
    bad = subprocess.run([sys.executable, "train.py", "--target-sparsity", "1.5"], cwd=ROOT / "lenet5",
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "PRUNING_TARGET_SPARSITY" in bad.stderr


@pytest.mark.parametrize("tracker", ["trackio", "wandb"])
def test_tracked_run_works_offline(tmp_path, tracker):
    # In a fresh process: trackio fixes its store directory when first imported.
    if importlib.util.find_spec(tracker) is None:
        pytest.skip(f"{tracker} is not installed")
    cfg_path = _write_config(tmp_path, MAX_ITERS="8", PRUNING="none", TRACKER=tracker)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "TRACKIO_"))}
    env["HOME"] = str(tmp_path / "home")  # no wandb credentials anywhere
    r = subprocess.run([sys.executable, "-m", "adamwprune", "run", "--config", str(cfg_path), "--run-dir",
                        str(tmp_path / "results" / "run")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    if tracker == "wandb":
        assert "offline" in r.stdout
        assert list((tmp_path / "results" / "run" / "wandb").glob("offline-run-*"))
    else:
        assert list((tmp_path / "results" / "trackio").iterdir())


def test_unknown_tracker_is_refused():
    with pytest.raises(C.ConfigError, match="TRACKER=mlflow"):
        tiny_cfg(TRACKER="mlflow")
