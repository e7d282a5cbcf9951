"""Every pruning method and pattern of the registry, chosen in Kconfig and trained by
the engine: what final.json reports is what the weights hold, and a resume is exact."""
import json

import pytest
import torch

from adamwprune.config import kconfig as C
from adamwprune.cli import load_task
from adamwprune.engine.trainer import Budget, Trainer
from adamwprune.params import param_groups
from adamwprune.registry import PRUNERS, build_optimizer, build_pruner
from torch import nn

TINY = {"MODEL": "lenet5", "DATASET": "synthetic", "DATA_SYNTHETIC_SIZE": "128", "BATCH_SIZE": "16",
        "DEVICE": "cpu", "TRAIN_EVAL_INTERVAL": "8", "RUN_MONITOR_INTERVAL": "0.05", "MAX_ITERS": "32",
        "CHECKPOINT_INTERVAL": "8"}
EVERY4 = {"PRUNING_INTERVAL": "4"}
NM = {"PRUNING_PATTERN": "nm", "PRUNING_NM_N": "2", "PRUNING_NM_M": "4"}
# (optimizer, method, extra Kconfig, pattern, distribution, target)
CASES = {
    "rigl-erk": ("adamw", "rigl", {"PRUNING_TARGET_SPARSITY": "0.8"}, "unstructured", "erk", 0.8),
    "set-uniform": ("adamw", "set", {"PRUNING_TARGET_SPARSITY": "0.8", "PRUNING_DISTRIBUTION": "uniform"},
                    "unstructured", "uniform", 0.8),
    "state_regrow": ("adamwprune", "state_regrow", {"PRUNING_TARGET_SPARSITY": "0.8"}, "unstructured", "erk", 0.8),
    "srste-2:4": ("adamw", "srste", {}, "2:4", None, 0.5),
    "magnitude-2:4": ("adamw", "magnitude", NM, "2:4", None, 0.5),
    "movement-2:4": ("adamw", "movement", NM, "2:4", None, 0.5),
    "state-2:4": ("adamwprune", "state", NM, "2:4", None, 0.5),
    "magnitude-erk-scope": ("adamw", "magnitude", {"PRUNING_TARGET_SPARSITY": "0.7", "PRUNING_SCOPE": "erk"},
                            "unstructured", None, 0.7),
}


def _cfg(case, **extra):
    opt, method, more, *_ = CASES[case]
    interval = {} if method == "srste" else EVERY4  # SR-STE masks every forward
    cfg, _, _ = C.load(None, {**TINY, **interval, "OPTIMIZER": opt, "PRUNING": method, **more, **extra})
    return cfg


def _run(cfg, path, resume=False):
    return Trainer(load_task(cfg.model), cfg, path, config_text="").fit(resume=resume)


def _weights(path):
    return torch.load(path / "last.pt", weights_only=True)["model"]


def _effective_weights(cfg, path):
    """The weights the model computes with, rebuilt from last.pt: through each method's
    masks (movement and SR-STE keep dense originals behind a parametrization)."""
    model = load_task(cfg.model).build_model(cfg)
    schedule = Budget.from_config(cfg, 1).schedule
    opt = build_optimizer(cfg.optimizer, param_groups(model, 0.0), cfg, schedule, cfg.pruning)
    pruner = build_pruner(cfg.pruning, model, opt, schedule, cfg.optimizer)
    state = torch.load(path / "last.pt", weights_only=True)
    model.load_state_dict(state["model"])
    pruner.load_state_dict(state["pruner"])
    return {f"{name}.weight": m.weight.detach() for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d))}


def _nm_ok(w, n, m):
    w = w.reshape(w.shape[0], -1)
    return bool(((w.reshape(w.shape[0], -1, m) != 0).sum(-1) <= n).all())


def test_every_registry_method_has_a_case_here():
    assert {c[1] for c in CASES.values()} == {p for p, info in PRUNERS.items() if info.prunes}


@pytest.mark.parametrize("case", list(CASES))
def test_each_method_trains_from_kconfig_and_reports_its_pattern(tmp_path, case):
    _, method, _, pattern, distribution, target = CASES[case]
    cfg = _cfg(case)
    final = _run(cfg, tmp_path / "run")
    assert final["status"] == "completed"
    assert (final["pattern"], final["distribution"]) == (pattern, distribution)
    assert final["target_sparsity"] == pytest.approx(target)
    prunable = _effective_weights(cfg, tmp_path / "run")
    zeros = sum(int((v == 0).sum()) for v in prunable.values())
    total = sum(v.numel() for v in prunable.values())
    assert final["final_sparsity"] == pytest.approx(zeros / total, abs=1e-9)
    if pattern == "2:4":
        # LeNet-5's convolutions (reduction 25 and 150) do not divide into groups of 4
        dense = set(final["dense_tensors"])
        assert dense == {"features.0.weight", "features.3.weight"}
        for name, w in prunable.items():
            if name in dense:
                assert w.reshape(w.shape[0], -1).shape[1] % 4 and not (w == 0).any(), name
            else:
                assert _nm_ok(w, 2, 4), name  # exactly 2 of every 4 left (none were 0 by chance)
                assert int((w == 0).sum()) == w.numel() // 2, name
    elif PRUNERS[method].dynamic:
        # sparse from step 0 at the target; grown weights start at 0, so a few more may be 0
        assert target - 1e-3 <= final["final_sparsity"] <= target + 0.03
    else:
        assert final["final_sparsity"] == pytest.approx(target, abs=1e-3)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("case", ["rigl-erk", "set-uniform", "state_regrow", "srste-2:4", "magnitude-2:4"])
def test_resume_of_each_new_method_is_bit_identical(tmp_path, monkeypatch, case):
    cfg = _cfg(case)
    _run(cfg, tmp_path / "ref")
    original = Trainer.train_step

    def dying_step(self):
        if self.step == 20:  # last.pt was written at 16
            raise Interrupt()
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", dying_step)
    with pytest.raises(Interrupt):
        _run(cfg, tmp_path / "cut")
    monkeypatch.setattr(Trainer, "train_step", original)
    _run(cfg, tmp_path / "cut", resume=True)
    ref, got = _weights(tmp_path / "ref"), _weights(tmp_path / "cut")
    for k, v in ref.items():
        assert torch.equal(v, got[k]), k
    strip = lambda p: [{k: v for k, v in json.loads(l).items() if k != "elapsed_s"}
                       for l in (p / "metrics.jsonl").read_text().splitlines()]
    assert strip(tmp_path / "cut") == strip(tmp_path / "ref")


@pytest.mark.parametrize("sets,match", [
    ({"OPTIMIZER": "adamw", "PRUNING": "rigl", "PRUNING_PATTERN": "nm"}, "PRUNING_PATTERN"),
    ({"OPTIMIZER": "adamw", "PRUNING": "srste", "PRUNING_PATTERN": "unstructured"}, "PRUNING_PATTERN"),
    ({"OPTIMIZER": "adamw", "PRUNING": "rigl", "PRUNING_RAMP_START": "0.2"}, "PRUNING_RAMP_START"),
    ({"OPTIMIZER": "adamw", "PRUNING": "magnitude", "PRUNING_DROP_FRACTION": "0.2"}, "PRUNING_DROP_FRACTION"),
    ({"OPTIMIZER": "adamw", "PRUNING": "state_regrow"}, "PRUNING"),
])
def test_options_that_do_not_apply_are_refused_in_one_line(sets, match):
    with pytest.raises(C.ConfigError, match=match) as e:
        C.load(None, {**TINY, **sets})
    assert "\n" not in str(e.value)


def test_nm_with_n_not_below_m_is_refused():
    cfg = _cfg("magnitude-2:4", PRUNING_NM_N="4", PRUNING_NM_M="4")
    with pytest.raises(C.ConfigError, match="0 < N < M"):
        _run(cfg, "/nonexistent/never-written")


def test_matrix_makes_only_the_cells_each_method_supports():
    from adamwprune.run.cells import expand_base

    sel = {"MATRIX": "y", "MATRIX_MODEL_LENET5": "y", "MATRIX_OPTIMIZER_ADAMW": "y",
           "MATRIX_OPTIMIZER_ADAMWPRUNE": "y", "MATRIX_PRUNING_NONE": "n", "MATRIX_PRUNING_MAGNITUDE": "y",
           "MATRIX_PRUNING_STATE_REGROW": "y", "MATRIX_PRUNING_SRSTE": "y", "MATRIX_PRUNING_RIGL": "y",
           "MATRIX_PATTERN_NM": "y", "MATRIX_DISTRIBUTION_UNIFORM": "y", "MATRIX_SPARSITY_50": "n",
           "MATRIX_SPARSITY_70": "n", "MATRIX_SPARSITY_90": "y", "MATRIX_VARIANT_BITTER0": "y"}
    cfg, _, _ = C.load(None, {"MODEL": "lenet5", "OPTIMIZER": "adamw", "PRUNING": "none", **sel})
    got = {(c.optimizer, c.pruning, c.pattern, c.distribution, round(c.sparsity, 3)) for c in expand_base(cfg)}
    assert got == {
        ("adamw", "magnitude", "unstructured", None, 0.9), ("adamw", "magnitude", "2:4", None, 0.5),
        ("adamw", "srste", "2:4", None, 0.5),  # N:M only
        ("adamw", "rigl", "unstructured", "erk", 0.9), ("adamw", "rigl", "unstructured", "uniform", 0.9),
        # state_regrow needs AdamWPrune, which prunes itself: no magnitude/srste/rigl over it
        ("adamwprune", "state_regrow", "unstructured", "erk", 0.9),
        ("adamwprune", "state_regrow", "unstructured", "uniform", 0.9),
    }
    ids = [c.id for c in expand_base(cfg)]
    assert len(ids) == len(set(ids))
    assert "lenet5_adamw_magnitude_50_nm2-4_s1" in ids and "lenet5_adamw_rigl_90_uniform_s1" in ids
