"""AdamWPrune: importance scores, parity with its base at target 0, the mask
invariant for every variant x base, exact sparsity, and state_dict round trips."""
import io

import pytest
import torch
from torch import nn

from adamwprune.optim.adamwprune import BASES, AdamWPrune
from adamwprune.optim.importance import IMPORTANCE, get_importance
from adamwprune.params import param_groups
from adamwprune.pruning import sparsity_at
from helpers import Tiny

START, END, INTERVAL, TARGET = 10, 60, 10, 0.7
# Short SPAM periods so resets, warm-up and clipping all happen within a test.
BASE_KWARGS = {
    "adamw": {}, "adam": {}, "adamwadv": {},
    "adamwspam": {"reset_interval": 40, "warmup_steps": 10, "clip_delay": 5, "theta": 50.0},
}


def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return Tiny().to(dtype)


def loss_at(model, step):
    g = torch.Generator().manual_seed(2000 + step)
    dtype = model.fc.weight.dtype
    x = torch.randn(8, 1, 6, 6, generator=g).to(dtype)
    y = torch.randint(0, 5, (8,), generator=g)
    return nn.functional.cross_entropy(model(x), y)


def train(model, optimizer, steps, first=0):
    for step in range(first, first + steps):
        optimizer.zero_grad()
        loss_at(model, step).backward()
        optimizer.step()


def build(base="adamw", variant="bitter0", seed=0, **kwargs):
    model = make_model(seed)
    options = dict(lr=1e-2, weight_decay=0.1, base=base, variant=variant,
                   target_sparsity=TARGET, start_step=START, end_step=END, interval=INTERVAL,
                   **BASE_KWARGS.get(base, {}))
    options.update(kwargs)
    return model, AdamWPrune(param_groups(model, options.pop("weight_decay")), **options)


def test_bitter0_score_hand_computed():
    w = torch.tensor([1.0, -2.0, 3.0])
    m = torch.tensor([0.5, -1.0, 0.0])
    v = torch.tensor([0.25, 4.0, 1.0])
    fn = get_importance("bitter0").fn
    assert fn(w, m, v, 0.0).tolist() == [1.0, 2.0, 0.0]  # w^2 |m| / sqrt(v)
    assert fn(w, m, v, 1.0).tolist() == pytest.approx([0.5 / 1.5, 4 / 3, 0.0])


@pytest.mark.parametrize("variant", ["bitter1", "bitter2"])
def test_magnitude_variants_score_hand_computed(variant):
    w = torch.tensor([1.0, -2.0, 0.0])
    score = get_importance(variant).fn(w, torch.ones(3), torch.ones(3), 1e-8)
    assert score.tolist() == [1.0, 2.0, 0.0]


def test_scores_do_not_modify_their_inputs():
    w, m, v = torch.randn(5), torch.randn(5), torch.rand(5)
    copies = [w.clone(), m.clone(), v.clone()]
    for info in IMPORTANCE.values():
        info.fn(w, m, v, 1e-8)
    assert all(torch.equal(a, b) for a, b in zip((w, m, v), copies))


def test_unknown_variant_lists_the_valid_names():
    with pytest.raises(ValueError, match="bitter0, bitter1, bitter2"):
        get_importance("bitter9")


def test_step_budget_factor_comes_from_the_variant_and_can_be_overridden():
    assert build(variant="bitter0")[1].step_budget_factor == 1.0
    assert build(variant="bitter1")[1].step_budget_factor == 1.0
    assert build(variant="bitter2")[1].step_budget_factor == 1.21
    assert build(variant="bitter2", budget_factor=1.5)[1].step_budget_factor == 1.5


@pytest.mark.parametrize("variant,expected", [
    # w = [1, 2, 3, 4]; entry 2 gets no gradient, so bitter0 scores it 0 (m = 0).
    ("bitter0", [True, False, True, False]),
    ("bitter1", [True, True, False, False]),
])
def test_adamwprune_prunes_lowest_score_of_its_variant(variant, expected):
    model = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    # lr = 0: the step leaves w as it is and only fills m and v.
    optimizer = AdamWPrune(param_groups(model, 0.0), lr=0.0, variant=variant,
                           target_sparsity=0.5, start_step=1, end_step=1, interval=1)
    model(torch.tensor([[1.0, 1.0, 0.0, 1.0]])).sum().backward()
    optimizer.step()
    assert (model.weight == 0).tolist() == [expected]
    for key in ("exp_avg", "exp_avg_sq"):
        assert (optimizer.state[model.weight][key][0][torch.tensor(expected)] == 0).all()


def base_cases():
    cases = [(name, None) for name in BASES]
    cases += [("adamw", True), ("adam", True), ("adamwadv", False)]
    return cases


@pytest.mark.parametrize("base,amsgrad", base_cases())
def test_target_zero_is_identical_to_base_float64(base, amsgrad):
    extra = dict(BASE_KWARGS[base])
    if amsgrad is not None:
        extra["amsgrad"] = amsgrad
    reference_model = make_model(3, torch.float64)
    reference = BASES[base].load()(param_groups(reference_model, 0.1), lr=1e-2, **extra)
    model = make_model(3, torch.float64)
    optimizer = AdamWPrune(param_groups(model, 0.1), lr=1e-2, base=base, variant="bitter0",
                           target_sparsity=0.0, **extra)
    train(reference_model, reference, 90)
    train(model, optimizer, 90)
    for p_ref, p in zip(reference_model.parameters(), model.parameters()):
        assert torch.equal(p_ref, p)
        assert reference.state[p_ref].keys() == optimizer.state[p].keys()
        for key, value in reference.state[p_ref].items():
            assert torch.equal(value, optimizer.state[p][key]), key


@pytest.mark.parametrize("base", list(BASES))
def test_before_start_step_is_identical_to_base_float64(base):
    reference_model = make_model(4, torch.float64)
    reference = BASES[base].load()(param_groups(reference_model, 0.1), lr=1e-2,
                                   **BASE_KWARGS.get(base, {}))
    model = make_model(4, torch.float64)
    optimizer = AdamWPrune(param_groups(model, 0.1), lr=1e-2, base=base, target_sparsity=0.5,
                           start_step=50, end_step=80, **BASE_KWARGS[base])
    train(reference_model, reference, 50)
    train(model, optimizer, 50)
    assert all(torch.equal(a, b) for a, b in zip(reference_model.parameters(), model.parameters()))


def state_tensors(optimizer, p):
    return {k: v for k, v in optimizer.state[p].items() if torch.is_tensor(v) and v.shape == p.shape}


@pytest.mark.parametrize("variant", list(IMPORTANCE))
@pytest.mark.parametrize("base", list(BASES))
def test_mask_invariant_holds_for_every_variant_and_base(base, variant):
    model, optimizer = build(base, variant)
    prunable = [model.conv.weight, model.fc.weight]
    n = sum(p.numel() for p in prunable)
    pruned = [torch.zeros_like(p, dtype=torch.bool) for p in prunable]
    seen_by_base = []

    def record_gradients(opt, args, kwargs):
        seen_by_base.append([p.grad[m].abs().sum().item() for p, m in zip(prunable, pruned)])

    optimizer.base_optimizer.register_step_pre_hook(record_gradients)
    for step in range(120):
        train(model, optimizer, 1, first=step)
        assert seen_by_base[-1] == [0.0, 0.0], "the base step saw gradient at pruned entries"
        zeros = [p == 0 for p in prunable]
        for p, was, now in zip(prunable, pruned, zeros):
            assert now[was].all(), "a pruned entry came back"
            for key, value in state_tensors(optimizer, p).items():
                assert not value[now].any(), f"{key} nonzero at pruned entries"
        t = step + 1
        if t == END or (START <= t <= END and (t - START) % INTERVAL == 0):
            assert sum(int(z.sum()) for z in zeros) == round(sparsity_at(t, TARGET, START, END) * n)
        else:
            assert all(torch.equal(a, b) for a, b in zip(zeros, pruned)), "pruned off schedule"
        pruned = zeros
    assert sum(int(z.sum()) for z in pruned) == round(TARGET * n)
    assert not (model.conv.bias == 0).any() and not (model.fc.bias == 0).any()


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_layer_and_global_scope_hit_target_exactly(scope):
    model, optimizer = build(scope=scope, schedule="linear")
    train(model, optimizer, END)
    counts = [int((p == 0).sum()) for p in (model.conv.weight, model.fc.weight)]
    if scope == "layer":
        assert counts == [round(TARGET * 36), round(TARGET * 320)]
    else:
        assert sum(counts) == round(TARGET * 356)


def save_and_reload(optimizer, model, rebuild):
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    model2, optimizer2 = rebuild()
    model2.load_state_dict(saved["model"])
    optimizer2.load_state_dict(saved["optimizer"])
    return model2, optimizer2


@pytest.mark.parametrize("base", ["adamw", "adamwspam"])
def test_state_dict_round_trip_mid_ramp_is_bitwise(base):
    rebuild = lambda: build(base, "bitter0", seed=5)  # noqa: E731
    model, optimizer = rebuild()
    train(model, optimizer, 35)
    model2, optimizer2 = save_and_reload(optimizer, model, rebuild)
    assert optimizer2.pruning_step == 35
    assert optimizer2.param_groups is optimizer2.base_optimizer.param_groups
    assert optimizer2.state is optimizer2.base_optimizer.state
    train(model, optimizer, 45, first=35)
    train(model2, optimizer2, 45, first=35)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    for p, p2 in zip(model.parameters(), model2.parameters()):
        for key, value in optimizer.state[p].items():
            assert torch.equal(value, optimizer2.state[p2][key]), key


def test_param_groups_and_state_are_shared_with_the_base():
    model, optimizer = build()
    optimizer.param_groups[0]["lr"] = 0.5
    assert optimizer.base_optimizer.param_groups[0]["lr"] == 0.5
    train(model, optimizer, 1)
    assert optimizer.state[model.fc.weight] is optimizer.base_optimizer.state[model.fc.weight]
    assert set(optimizer.state[model.fc.weight]) == {"step", "exp_avg", "exp_avg_sq"}
    saved = optimizer.state_dict()
    assert saved["pruning"] == {"step": 1, "encoding": "exp_avg_sq=-0.0"}
    assert [g["prune"] for g in saved["param_groups"]] == [True, False]


def test_added_param_group_goes_to_the_base_and_is_not_pruned():
    model, optimizer = build()
    extra = nn.Parameter(torch.randn(3, 3))
    optimizer.add_param_group({"params": [extra], "param_names": ["extra"]})
    assert optimizer.param_groups[-1]["prune"] is False
    assert len(optimizer.base_optimizer.param_groups) == 3
    extra.sum().backward()
    optimizer.step()
    assert "exp_avg" in optimizer.state[extra]


def test_no_pruning_buffers_are_held():
    assert build()[1].pruning_buffer_bytes() == {}


@pytest.mark.parametrize("kwargs,match", [
    (dict(end_step=None), "end_step"),
    (dict(base="sgd"), "adamw, adam, adamwadv, adamwspam"),
    (dict(variant="bitter7"), "bitter0"),
    (dict(target_sparsity=1.5), "target sparsity"),
    (dict(interval=0), "interval"),
    (dict(scope="row"), "scope"),
    (dict(schedule="exp"), "schedule"),
    (dict(budget_factor=0.0), "budget_factor"),
    (dict(base="adamwspam", amsgrad=True), "AMSGrad"),
])
def test_invalid_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build(**kwargs)


def test_pruning_without_a_prune_group_raises_value_error():
    model = make_model()
    with pytest.raises(ValueError, match="prune"):
        AdamWPrune(model.parameters(), target_sparsity=0.5, end_step=10)
