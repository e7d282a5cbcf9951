"""A resumed run keeps every segment in env.json and final.json and reports totals (issue 13)."""
import json

import pytest

from adamwprune.config import kconfig as C
from adamwprune.run import segments
from adamwprune.cli import load_task
from adamwprune.engine.trainer import Trainer

TINY = {"MODEL": "lenet5", "DATASET": "synthetic", "DATA_SYNTHETIC_SIZE": "128", "BATCH_SIZE": "16",
        "DEVICE": "cpu", "TRAIN_EVAL_INTERVAL": "8", "RUN_MONITOR_INTERVAL": "0.05", "MAX_ITERS": "24",
        "TRAIN_CHECKPOINT_INTERVAL": "8", "OPTIMIZER": "adamw", "PRUNING": "none"}


class Interrupt(Exception):
    pass


def test_a_resumed_run_keeps_every_segment_and_reports_totals(tmp_path, monkeypatch):
    cfg, _, _ = C.load(None, TINY)
    original = Trainer.train_step

    def dying_step(self):
        if self.step == 12:  # last.pt was written at step 8
            raise Interrupt()
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", dying_step)
    with pytest.raises(Interrupt):
        Trainer(load_task("lenet5"), cfg, tmp_path, config_text="").fit()
    monkeypatch.setattr(Trainer, "train_step", original)
    final = Trainer(load_task("lenet5"), cfg, tmp_path, config_text="").fit(resume=True)

    env = json.loads((tmp_path / "env.json").read_text())
    assert [s["resumed_at_step"] for s in env["segments"]] == [None, 8]
    assert all(s["host"] and "git_sha" in s and s["time"] for s in env["segments"])
    segs = final["segments"]
    assert [(s["from_step"], s["to_step"]) for s in segs] == [(0, 8), (8, 24)]
    assert sum(s["steps_run"] for s in segs) == 24  # the 4 steps lost after the checkpoint are not counted
    assert final["wall_time_s"] == pytest.approx(sum(s["wall_time_s"] for s in segs))
    assert final["step_time_s"] == pytest.approx(sum(s["train_time_s"] for s in segs) / 24)
    assert final["peak_memory_bytes"] == max(s["peak_memory_bytes"] for s in segs)
    assert json.loads((tmp_path / "final.json").read_text())["segments"] == segs


def test_a_fresh_start_begins_a_new_segment_list(tmp_path):
    (tmp_path / "env.json").write_text(json.dumps({"segments": [{"host": "old"}]}))
    assert segments.env_with_history(tmp_path / "env.json", {"host": "new"}, resumed=False)["segments"] == [
        {k: ("new" if k == "host" else None) for k in segments.ENV_KEYS}]
