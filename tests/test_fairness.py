"""Fair comparisons (ALGORITHMS.md, "Fair comparison rules"): every method measured
under the same rules. Each test here failed on the code before its fix."""
import copy

import pytest
import torch
from torch import nn

from adamwprune import (AdamWPrune, AdamWSpam, MagnitudePruner, MovementPruner, clip_grad_norm_,
                        param_groups)
from adamwprune.config import kconfig as C
from adamwprune.cli import load_task
from adamwprune.engine.trainer import Trainer
from adamwprune.optim import cpu_kernels
from adamwprune.optim.adamwprune import pruned_in
from adamwprune.optim.importance import hybrid_score

LENET = {"MODEL": "lenet5", "DATASET": "mnist_embedded", "DEVICE": "cpu", "BATCH_SIZE": "64",
         "MAX_ITERS": "300", "TRAIN_EVAL_INTERVAL": "300", "RUN_MONITOR_INTERVAL": "1",
         "PRUNING_TARGET_SPARSITY": "0.8", "TRAIN_GRAD_CLIP": "0.1", "PRUNING_INTERVAL": "20"}


def _train_lenet(tmp_path, name, **overrides):
    cfg, _, _ = C.load(None, {**LENET, **overrides})
    trainer = Trainer(load_task("lenet5"), cfg, tmp_path / name, config_text="")
    final = trainer.fit()
    return trainer.model, final


def test_bitter1_trains_the_same_weights_as_adamw_plus_magnitude_with_clipping(tmp_path):
    """bitter1 is base + magnitude pruning by definition; with clipping on, AdamWPrune's
    surviving gradients were clipped by a norm that included the pruned entries'."""
    a, fa = _train_lenet(tmp_path, "prune", OPTIMIZER="adamwprune", ADAMWPRUNE_VARIANT="bitter1",
                         PRUNING="state")
    b, fb = _train_lenet(tmp_path, "mag", OPTIMIZER="adamw", PRUNING="magnitude")
    assert fa["final_sparsity"] == fb["final_sparsity"] == pytest.approx(0.8, abs=1e-4)
    diffs = [float((pa.detach() - pb.detach()).abs().max()) for pa, pb in
             zip(a.state_dict().values(), b.state_dict().values())]
    assert max(diffs) <= 1e-4, diffs
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        if name.endswith("weight"):
            assert torch.equal(pa == 0, pb == 0), f"masks differ in {name}"


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def _masked_norm(model, masks):
    grads = []
    for p in model.parameters():
        g = p.grad.clone()
        if id(p) in masks:
            g[masks[id(p)]] = 0
        grads.append(g)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


@pytest.mark.parametrize("fast", [False, True])
def test_clip_grad_norm_of_adamwprune_clips_the_masked_gradient(fast):
    if fast and cpu_kernels.load() is None:
        pytest.skip(f"CPU kernels unavailable: {cpu_kernels.load_error()}")
    model = _tiny_model()
    opt = AdamWPrune(param_groups(model, 0.01), lr=1e-2, variant="bitter1", target_sparsity=0.5,
                     start_step=2, end_step=2, interval=1, fast=fast)
    x = torch.randn(8, 16)
    for _ in range(3):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    masks = {id(p): opt.pruned_entries(p) for p, _ in opt._prunable()}
    assert sum(int(m.sum()) for m in masks.values()) == round(0.5 * (16 * 32 + 32 * 4))
    model(x).square().mean().backward()
    expected = _masked_norm(model, masks)
    total = clip_grad_norm_(opt, 1e-3)
    assert float(total) == pytest.approx(float(expected), rel=1e-6)
    for p in model.parameters():  # the masked gradient is what the optimizer sees
        if id(p) in masks:
            assert not p.grad[masks[id(p)]].any()


def test_clipping_then_step_matches_hand_scaled_gradients_on_the_fast_path():
    if cpu_kernels.load() is None:
        pytest.skip(f"CPU kernels unavailable: {cpu_kernels.load_error()}")
    models = [_tiny_model(1) for _ in range(2)]
    for m in models:
        m.double()
    opts = [AdamWPrune(param_groups(m, 0.01), lr=1e-2, variant="bitter0", target_sparsity=0.6,
                       start_step=1, end_step=4, interval=1, fast=fast)
            for m, fast in zip(models, (True, False))]
    x = torch.randn(8, 16, dtype=torch.float64)
    for _ in range(8):
        for m, o in zip(models, opts):
            m(x).square().mean().backward()
            clip_grad_norm_(o, 0.05)
            o.step()
            o.zero_grad()
    for pa, pb in zip(models[0].parameters(), models[1].parameters()):
        assert torch.allclose(pa, pb, rtol=0, atol=1e-12)
        assert torch.equal(pa == 0, pb == 0)


# ------------------------------------------------------- the pruned-entry encoding
def _zero_input_problem():
    """112 weights (Linear 8 -> 14); 4 input features stay exactly 0 for the first 30
    steps and the weights reading them start at 0, so w = m = v = 0 there while they
    are perfectly alive (56 such entries)."""
    torch.manual_seed(0)
    model = nn.Linear(8, 14, bias=False)
    with torch.no_grad():
        model.weight[:, 4:] = 0
    return model


def _run_zero_input(model, opt, steps=60):
    torch.manual_seed(1)
    target = torch.randn(14, 8)
    for t in range(steps):
        x = torch.randn(32, 8)
        if t < 30:
            x[:, 4:] = 0
        loss = (model(x) - x @ target.T).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("fast", [False, True])
def test_live_zero_weights_are_not_taken_for_pruned(fast):
    if fast and cpu_kernels.load() is None:
        pytest.skip(f"CPU kernels unavailable: {cpu_kernels.load_error()}")
    model = _zero_input_problem()
    opt = AdamWPrune(param_groups(model, 0.0), lr=1e-2, variant="bitter0", target_sparsity=0.2,
                     start_step=5, end_step=5, interval=1, fast=fast)
    _run_zero_input(model, opt)
    v = opt.state[model.weight]["exp_avg_sq"]
    assert int(pruned_in(v).sum()) == round(0.2 * 112)  # exactly k pruned, no more
    # every weight not pruned came alive once its input did: only the pruned are 0
    assert int((model.weight == 0).sum()) == round(0.2 * 112)
    assert torch.equal(model.weight == 0, pruned_in(v))


def test_pruned_encoding_survives_state_dict_and_resume():
    model = _zero_input_problem()
    opt = AdamWPrune(param_groups(model, 0.0), lr=1e-2, variant="bitter0", target_sparsity=0.2,
                     start_step=5, end_step=40, interval=5)
    _run_zero_input(model, opt, steps=20)
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _run_zero_input(model, opt, steps=40)
    other = _zero_input_problem()
    other.load_state_dict(saved_model)
    opt2 = AdamWPrune(param_groups(other, 0.0), lr=1e-2, variant="bitter0", target_sparsity=0.2,
                      start_step=5, end_step=40, interval=5)
    opt2.load_state_dict(saved)
    assert torch.equal(pruned_in(opt2.state[other.weight]["exp_avg_sq"]),
                       pruned_in(saved["state"][0]["exp_avg_sq"]))
    _run_zero_input(other, opt2, steps=40)
    assert torch.equal(model.weight, other.weight)


def test_a_state_dict_from_before_the_encoding_is_converted():
    model = _zero_input_problem()
    opt = AdamWPrune(param_groups(model, 0.0), lr=1e-2, variant="bitter1", target_sparsity=0.5,
                     start_step=2, end_step=2, interval=1)
    _run_zero_input(model, opt, steps=50)
    old = opt.state_dict()
    old["pruning"] = {"step": old["pruning"]["step"]}  # what version 0.1.0 wrote
    old["state"][0]["exp_avg_sq"] = old["state"][0]["exp_avg_sq"].abs()  # +0.0 where pruned
    opt2 = AdamWPrune(param_groups(model, 0.0), lr=1e-2, variant="bitter1", target_sparsity=0.5,
                      start_step=2, end_step=2, interval=1)
    opt2.load_state_dict(old)
    _run_zero_input(model, opt2, steps=1)  # converted before the next step's update
    assert int(pruned_in(opt2.state[model.weight]["exp_avg_sq"]).sum()) == 56


# ------------------------------------------------- a pruner without an optimizer
def _user_loop(model, opt, pruner, steps=40):
    torch.manual_seed(2)
    for _ in range(steps):
        x = torch.randn(16, 16)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-3),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
}


@pytest.mark.parametrize("attach", [False, True], ids=["no-optimizer", "optimizer"])
@pytest.mark.parametrize("make_opt", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
@pytest.mark.parametrize("cls", [MagnitudePruner, MovementPruner])
def test_a_pruner_keeps_its_sparsity_in_a_plain_user_loop(cls, make_opt, attach):
    model = _tiny_model(3)
    opt = make_opt(model.parameters())
    pruner = cls(model, 0.6, 10, 20, 5, **({"optimizer": opt} if attach else {}))
    _user_loop(model, opt, pruner)
    n = 16 * 32 + 32 * 4
    assert pruner.current_sparsity() == round(0.6 * n) / n


# -------------------------------------------------- SPAM's reset and the mask
def test_a_mask_update_on_a_spam_reset_step_ranks_the_moments_before_the_reset():
    torch.manual_seed(4)
    model = _tiny_model(4)
    opt = AdamWPrune(param_groups(model, 0.0), lr=1e-2, base="adamwspam", variant="bitter0",
                     target_sparsity=0.5, start_step=10, end_step=10, interval=1,
                     reset_interval=10, warmup_steps=5)
    x = torch.randn(16, 16)
    for _ in range(9):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    # step 10 resets m and v; the mask must rank the scores of the moments it has now
    model(x).square().mean().backward()
    items = opt._prunable()
    scores = [hybrid_score(p, opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"], g["eps"])
              for p, g in items]
    flat = torch.cat([s.flatten() for s in scores])
    k = round(0.5 * flat.numel())
    expected = torch.zeros_like(flat, dtype=torch.bool)
    expected[torch.sort(flat, stable=True).indices[:k]] = True
    opt.step()
    got = torch.cat([opt.pruned_entries(p).flatten() for p, _ in items])
    assert torch.equal(got, expected)


def test_spam_knows_when_its_next_step_resets():
    opt = AdamWSpam([torch.zeros(2, requires_grad=True)], reset_interval=3)
    flags = []
    for _ in range(6):
        flags.append(opt.resets_moments_next_step())
        opt.param_groups[0]["spam_step"] += 1
    assert flags == [False, False, True, False, False, True]


# -------------------------------- a base and AdamWPrune over it: same hyper-parameters
HYPER = ("lr", "beta1", "beta2", "eps", "weight_decay", "grad_clip", "amsgrad", "momentum",
         "lr_schedule", "warmup_steps", "min_lr_ratio", "spam_theta", "spam_reset_interval",
         "spam_warmup_steps", "spam_clip_delay")
BASES = ("adamw", "adam", "adamwadv", "adamwspam")


def _hyper(cfg):
    return {k: getattr(cfg, k) for k in HYPER}


def _as_adamwprune(pruning: str) -> str:
    """AdamWPrune's pruner for the kind of pruning a base optimizer's run does (the registry's
    ``baseline`` read backwards; SET's random growth has AdamWPrune regrow as its counterpart)."""
    from adamwprune.registry import PRUNERS

    dynamic = PRUNERS[pruning].dynamic if pruning in PRUNERS else False
    found = [n for n, p in PRUNERS.items() if p.baseline and p.dynamic == dynamic]
    return found[0] if found else "state"


def _counterpart(pairs: dict, cfg) -> dict:
    """The same run with the other side of the pair: B alone <-> AdamWPrune over B."""
    pairs = {k: v for k, v in pairs.items() if k not in ("OPTIMIZER", "ADAMWPRUNE_BASE",
                                                         "ADAMWPRUNE_VARIANT", "PRUNING")}
    if cfg.optimizer == "adamwprune":
        from adamwprune.registry import PRUNERS

        return {**pairs, "OPTIMIZER": cfg.adamwprune_base,
                "PRUNING": PRUNERS[cfg.pruning].baseline or "magnitude"}
    return {**pairs, "OPTIMIZER": "adamwprune", "ADAMWPRUNE_BASE": cfg.optimizer,
            "PRUNING": _as_adamwprune(cfg.pruning)}


def _runs_of(path):
    """(file, overrides) of every run a shipped defconfig describes: each matrix cell,
    or the single run."""
    from adamwprune.run import matrix

    cfg, _, _ = C.load(path)
    if cfg.matrix_tuned_from:
        # The grid it names is a run's result, absent here. Tuned values reach a base and
        # AdamWPrune over it alike (tests/test_sweep.py), so the cells without them are checked.
        cfg, _, _ = C.load(path, {"MATRIX_TUNED_FROM": ""})
    if not matrix.is_matrix(cfg):
        return cfg, [{}]
    return cfg, [dict(cell.overrides, MATRIX="n") for cell in matrix.expand(cfg)]


@pytest.mark.parametrize("path", C.list_defconfigs(), ids=lambda p: p.name)
def test_every_preset_gives_a_base_and_adamwprune_over_it_the_same_hyperparameters(path):
    _, runs = _runs_of(path)
    checked = 0
    for pairs in runs:
        cfg, _, _ = C.load(path, pairs)
        if cfg.optimizer not in BASES + ("adamwprune",):
            continue
        other, _, _ = C.load(path, _counterpart(pairs, cfg))
        assert cfg.update_rule == other.update_rule
        assert _hyper(cfg) == _hyper(other), (pairs, _hyper(cfg), _hyper(other))
        checked += 1
    assert checked or all(C.load(path, p)[0].optimizer == "sgd" for p in runs)


def test_summary_notes_movement_under_coupled_decay():
    from adamwprune.report.summary import method_notes

    rec = lambda opt, wd, pruning="movement": {"optimizer": opt, "pruning": pruning,
                                               "weight_decay": wd}
    (note,) = method_notes([rec("adam", 0.1), rec("adamw", 0.1)])
    assert "coupled L2 decay (adam)" in note
    assert method_notes([rec("adamw", 0.1), rec("adam", 0.0), rec("sgd", 5e-4, "magnitude")]) == []



# ------------------------------------------------------------ review follow-ups
def test_an_old_state_dict_loaded_before_the_model_is_still_converted():
    model = _zero_input_problem()
    opt = AdamWPrune(param_groups(model, 0.0), lr=1e-2, variant="bitter1", target_sparsity=0.5,
                     start_step=2, end_step=2, interval=1)
    _run_zero_input(model, opt, steps=50)
    weights, old = copy.deepcopy(model.state_dict()), opt.state_dict()
    old["pruning"] = {"step": old["pruning"]["step"]}
    old["state"][0]["exp_avg_sq"] = old["state"][0]["exp_avg_sq"].abs()
    other = _zero_input_problem()
    opt2 = AdamWPrune(param_groups(other, 0.0), lr=1e-2, variant="bitter1", target_sparsity=0.5,
                      start_step=2, end_step=2, interval=1)
    opt2.load_state_dict(old)      # the optimizer first: the weights are not the run's yet
    other.load_state_dict(weights)
    _run_zero_input(other, opt2, steps=5)
    assert int(pruned_in(opt2.state[other.weight]["exp_avg_sq"]).sum()) == 56
    assert int((other.weight == 0).sum()) == 56


def test_a_state_dict_with_an_unknown_encoding_is_refused_before_anything_loads():
    model = _zero_input_problem()
    opt = AdamWPrune(param_groups(model, 0.0), lr=1e-2, target_sparsity=0.2, start_step=5,
                     end_step=5, interval=1)
    _run_zero_input(model, opt, steps=3)
    saved = opt.state_dict()
    saved["pruning"]["encoding"] = "bitmask"
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="bitmask"):
        opt.load_state_dict(saved)
    assert opt.state_dict()["state"][0]["step"] == before["state"][0]["step"]


@pytest.mark.parametrize("fast", [False, True])
def test_a_clip_factor_is_dropped_when_the_gradients_change(fast):
    """clip, then model.zero_grad() and a new backward without clipping: the step must
    not scale the new gradients by the old factor."""
    if fast and cpu_kernels.load() is None:
        pytest.skip(f"CPU kernels unavailable: {cpu_kernels.load_error()}")
    results = []
    for clip_first in (True, False):
        model = _tiny_model(6).double()
        opt = AdamWPrune(param_groups(model, 0.01), lr=1e-2, target_sparsity=0.5, start_step=1,
                         end_step=1, interval=1, fast=fast)
        x = torch.randn(8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        model(x).square().mean().backward()
        if clip_first:
            clip_grad_norm_(opt, 1e-4)
        model.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_nm_on_the_fast_path_with_no_tensor_the_groups_tile():
    if cpu_kernels.load() is None:
        pytest.skip(f"CPU kernels unavailable: {cpu_kernels.load_error()}")
    model = nn.Sequential(nn.Linear(3, 6), nn.Linear(6, 5))
    opt = AdamWPrune(param_groups(model, 0.0), lr=1e-2, target_sparsity=0.5, start_step=1,
                     end_step=1, interval=1, pattern="2:4", fast=True)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    assert not any((p == 0).any() for p in model.parameters())
    assert opt.dense_tensors() == ["0.weight", "1.weight"]


def test_a_prune_group_tensor_without_state_does_not_break_the_step():
    model = _tiny_model(7)
    opt = AdamWPrune(param_groups(model, 0.0), lr=1e-2, target_sparsity=0.5, start_step=1,
                     end_step=1, interval=1)
    x = torch.randn(4, 16)
    for _ in range(2):
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
    extra = nn.Parameter(torch.randn(3, 3))
    opt.add_param_group({"params": [extra], "param_names": ["extra"], "prune": True})
    model(x).sum().backward()
    opt.step()  # extra has no gradient and no state


def test_float16_with_an_eps_that_rounds_to_zero_is_refused():
    model = _tiny_model(8).half()
    with pytest.raises(ValueError, match="float16"):
        AdamWPrune(param_groups(model, 0.0), lr=1e-2, eps=1e-8)
    AdamWPrune(param_groups(model, 0.0), lr=1e-2, eps=1e-7)


@pytest.mark.parametrize("pruner_first", [False, True])
def test_without_an_optimizer_every_forward_sees_the_mask(pruner_first):
    model = _tiny_model(9)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = MagnitudePruner(model, 0.6, 4, 4, 1)
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append(pruner.current_sparsity()))
    torch.manual_seed(2)
    for _ in range(20):
        loss = model(torch.randn(16, 16)).square().mean()
        opt.zero_grad()
        loss.backward()
        if pruner_first:
            pruner.step()
            opt.step()
        else:
            opt.step()
            pruner.step()
    n = 16 * 32 + 32 * 4
    assert seen[5:] == [round(0.6 * n) / n] * 15
