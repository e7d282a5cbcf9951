"""Magnitude, movement, state and null pruners: exact sparsity, the mask
invariant for every optimizer, hand-computed scores, and state_dict round trips."""
import io

import pytest
import torch
from torch import nn

from adamwprune.optim.adamwprune import AdamWPrune
from adamwprune.params import param_groups
from adamwprune.pruning import (MagnitudePruner, MovementPruner, NoPruner, StatePruner,
                                export_state_dict, measure_sparsity, sparsity_at,
                                zero_optimizer_state)
from helpers import Tiny

START, END, INTERVAL, TARGET = 10, 60, 10, 0.7


def batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)


def loss_at(model, step):
    x, y = batch(step)
    return nn.functional.cross_entropy(model(x), y)


OPTIMIZERS = {
    "sgd_momentum": lambda groups: torch.optim.SGD(groups, lr=0.05, momentum=0.9),
    "adam": lambda groups: torch.optim.Adam(groups, lr=1e-2),
    "adamw": lambda groups: torch.optim.AdamW(groups, lr=1e-2),
    "adamw_amsgrad": lambda groups: torch.optim.AdamW(groups, lr=1e-2, amsgrad=True),
}
PRUNERS = {"magnitude": MagnitudePruner, "movement": MovementPruner}


def build(pruner_name, optimizer_name="adamw", scope="global", schedule="cubic", seed=0):
    torch.manual_seed(seed)
    model = Tiny()
    pruner = PRUNERS[pruner_name](model, TARGET, START, END, INTERVAL, schedule, scope)
    optimizer = OPTIMIZERS[optimizer_name](param_groups(model, weight_decay=0.1))
    pruner.attach(optimizer)
    return model, optimizer, pruner


def pruned_masks(pruner):
    if isinstance(pruner, MovementPruner):
        return pruner.masks()
    return pruner.masks


def train(model, optimizer, pruner, steps, first=0):
    for step in range(first, first + steps):
        optimizer.zero_grad()
        loss_at(model, step).backward()
        optimizer.step()
        pruner.step()


@pytest.mark.parametrize("pruner_name", PRUNERS)
@pytest.mark.parametrize("optimizer_name", OPTIMIZERS)
def test_mask_invariant_holds_for_every_optimizer(pruner_name, optimizer_name):
    model, optimizer, pruner = build(pruner_name, optimizer_name)
    for step in range(150):
        masks = {name: m.clone() for name, m in pruned_masks(pruner).items()}
        optimizer.zero_grad()
        loss_at(model, step).backward()
        for name, _, p in pruner.prunable:
            assert not p.grad[masks[name]].any(), f"gradient at pruned entries of {name}"
        optimizer.step()
        pruner.step()
        for name, module, p in pruner.prunable:
            mask = pruned_masks(pruner)[name]
            if pruner_name == "magnitude":
                assert mask[masks[name]].all(), "magnitude masks must be monotone"
            assert not module.weight[mask].any(), f"effective weight at pruned entries of {name}"
            for key, value in optimizer.state[p].items():
                if torch.is_tensor(value) and value.shape == p.shape:
                    assert not value[mask].any(), f"{key} at pruned entries of {name}"
    assert pruner.current_sparsity() == pytest.approx(round(TARGET * 356) / 356, abs=0)


@pytest.mark.parametrize("pruner_name", PRUNERS)
@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("schedule", ["cubic", "linear"])
def test_pruners_hit_scheduled_sparsity_exactly_at_every_update(pruner_name, scope, schedule):
    model, optimizer, pruner = build(pruner_name, scope=scope, schedule=schedule)
    sizes = [p.numel() for _, _, p in pruner.prunable]
    for step in range(END + 5):
        train(model, optimizer, pruner, 1, first=step)
        t = step + 1
        if t < START or (t - START) % INTERVAL and t != END:
            continue
        s = sparsity_at(t, TARGET, START, END, schedule)
        counts = [int(m.sum()) for m in pruned_masks(pruner).values()]
        if scope == "global":
            assert sum(counts) == round(s * sum(sizes))
        else:
            assert counts == [round(s * n) for n in sizes]
        zeros = sum(int((module.weight == 0).sum()) for _, module, _ in pruner.prunable)
        assert zeros == sum(counts)


@pytest.mark.parametrize("pruner_name", PRUNERS)
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_pruners_are_exact_when_every_score_ties(pruner_name, scope):
    model = Tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # |w| = 0 everywhere; movement scores are 0 before any backward
    pruner = PRUNERS[pruner_name](model, 0.5, 0, 1, 1, scope=scope)
    pruner.step()
    masks = list(pruned_masks(pruner).values())
    if scope == "global":
        assert sum(int(m.sum()) for m in masks) == round(0.5 * 356)  # 178: all of conv + 142 of fc
        assert masks[0].all() and masks[1].reshape(-1)[:142].all() and not masks[1].reshape(-1)[142:].any()
    else:
        assert [int(m.sum()) for m in masks] == [18, 160]


def test_magnitude_prunes_lowest_magnitudes_hand_computed():
    model = nn.Sequential(nn.Linear(3, 2, bias=False), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.5, -3.0, 0.1], [2.0, -0.2, 1.0]]))
        model[1].weight.copy_(torch.tensor([[-0.3, 4.0], [0.05, 1.5]]))
    pruner = MagnitudePruner(model, 0.5, 0, 1, 1)  # 10 weights, k = 5
    pruner.step()  # lowest |w|: 0.05, 0.1, 0.2, 0.3, 0.5
    assert pruner.masks["0.weight"].tolist() == [[True, False, True], [False, True, False]]
    assert pruner.masks["1.weight"].tolist() == [[True, False], [True, False]]
    assert model[0].weight.tolist() == [[0.0, -3.0, 0.0], [2.0, 0.0, 1.0]]
    assert pruner.current_sparsity() == 0.5


def test_magnitude_masks_are_monotone_when_survivors_tie_with_pruned():
    model = nn.Sequential(nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, 4.0, 1.0, 2.0]]))
    pruner = MagnitudePruner(model, 0.5, 0, 1, 1)
    pruner.step()  # t = 1 = end: prune |w| = 1, 2
    assert pruner.masks["0.weight"].tolist() == [[False, False, True, True]]
    with torch.no_grad():
        model[0].weight.zero_()  # every score now ties at 0; index order would pick 0, 1
    pruner.t = 0
    pruner.step()
    assert pruner.masks["0.weight"].tolist() == [[False, False, True, True]]


def test_movement_score_after_a_known_backward_hand_computed():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[2.0, 3.0]]))
    pruner = MovementPruner(model, 0.5, 0, 10, 10)
    x = torch.tensor([[1.0, -1.0], [2.0, 1.0]])
    model(x).sum().backward()  # dL/dw' = column sums of x = [3, 0]
    assert pruner.scores()["weight"].tolist() == [[-6.0, 0.0]]
    with torch.no_grad():
        pruner.masks()["weight"].copy_(torch.tensor([[True, False]]))
    model.parametrizations.weight.original.grad = None
    model(x).sum().backward()
    # Straight-through: the masked entry still accumulates -g' * w = -3 * 2.
    assert pruner.scores()["weight"].tolist() == [[-12.0, 0.0]]
    assert model.parametrizations.weight.original.grad.tolist() == [[0.0, 0.0]]
    assert model.weight.tolist() == [[0.0, 3.0]]


def test_movement_masks_can_regrow():
    model = nn.Linear(4, 1, bias=False)
    pruner = MovementPruner(model, 0.5, 1, 3, 1, schedule="linear")
    scores = pruner.scores()["weight"]
    pruner.step()
    scores.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    pruner.step()  # t = 2, s = 0.25: prune entry 0
    assert pruner.masks()["weight"].tolist() == [[True, False, False, False]]
    scores.copy_(torch.tensor([[9.0, 2.0, 3.0, 1.0]]))
    pruner.step()  # t = 3, s = 0.5: entry 0 comes back
    assert pruner.masks()["weight"].tolist() == [[False, True, False, True]]


def test_movement_hits_target_sparsity_exactly():
    model, optimizer, pruner = build("movement")
    train(model, optimizer, pruner, END + 3)
    assert int(sum(m.sum() for m in pruner.masks().values())) == round(TARGET * 356)
    assert pruner.current_sparsity() == round(TARGET * 356) / 356


def test_movement_export_loads_into_a_plain_model():
    model, optimizer, pruner = build("movement")
    train(model, optimizer, pruner, 40)
    plain = Tiny()
    plain.load_state_dict(export_state_dict(model))
    x, _ = batch(0)
    assert torch.equal(plain(x), model(x))
    zeros = int((plain.conv.weight == 0).sum() + (plain.fc.weight == 0).sum())
    assert zeros / 356 == pruner.current_sparsity() > 0.3


def test_movement_squash_leaves_plain_masked_weights():
    model, optimizer, pruner = build("movement")
    train(model, optimizer, pruner, 40)
    x, _ = batch(0)
    before = model(x)
    param = pruner.prunable[1][2]
    pruner.squash()
    assert not hasattr(model.fc, "parametrizations")
    assert model.fc.weight is param
    assert torch.equal(model(x), before)


def save_and_reload(model, optimizer, pruner, rebuild):
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "pruner": pruner.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    model2, optimizer2, pruner2 = rebuild()
    model2.load_state_dict(saved["model"])
    optimizer2.load_state_dict(saved["optimizer"])
    pruner2.load_state_dict(saved["pruner"])
    return model2, optimizer2, pruner2


@pytest.mark.parametrize("pruner_name", PRUNERS)
@pytest.mark.parametrize("optimizer_name", ["sgd_momentum", "adamw"])
def test_state_dict_round_trip_mid_ramp_is_bitwise(pruner_name, optimizer_name):
    rebuild = lambda: build(pruner_name, optimizer_name, seed=1)  # noqa: E731
    model, optimizer, pruner = rebuild()
    train(model, optimizer, pruner, 35)
    model2, optimizer2, pruner2 = save_and_reload(model, optimizer, pruner, rebuild)
    train(model, optimizer, pruner, 40, first=35)
    train(model2, optimizer2, pruner2, 40, first=35)
    assert pruner2.t == pruner.t == 75
    for (k, a), (k2, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    for a, b in zip(pruned_masks(pruner).values(), pruned_masks(pruner2).values()):
        assert torch.equal(a, b)
    if pruner_name == "movement":
        for a, b in zip(pruner.scores().values(), pruner2.scores().values()):
            assert torch.equal(a, b)


def test_memory_bytes_report_masks_and_scores():
    assert build("magnitude")[2].memory_bytes() == {"masks": 356}
    assert build("movement")[2].memory_bytes() == {"scores": 4 * 356, "masks": 356}
    assert NoPruner(Tiny()).memory_bytes() == {}


def test_no_pruner_counts_steps_and_changes_nothing():
    model = Tiny()
    before = [p.clone() for p in model.parameters()]
    pruner = NoPruner(model, 0.9, 0, 10, 1)
    for _ in range(12):
        pruner.step()
    assert pruner.t == 12 and pruner.target_sparsity == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert pruner.current_sparsity() == 0.0
    pruner.load_state_dict(pruner.state_dict())
    assert len(pruner.prunable) == 2


def test_zero_optimizer_state_picks_tensors_by_shape_not_name():
    p = nn.Parameter(torch.ones(2, 3))
    optimizer = torch.optim.SGD([p], lr=0.1)
    optimizer.state[p] = {"odd_name": torch.ones(2, 3), "step": torch.tensor(5.0),
                          "row": torch.ones(3), "count": 7}
    mask = torch.tensor([[True, False, False], [False, False, True]])
    zero_optimizer_state(optimizer, p, mask)
    assert optimizer.state[p]["odd_name"].tolist() == [[0, 1, 1], [1, 1, 0]]
    assert optimizer.state[p]["step"] == 5.0 and optimizer.state[p]["row"].tolist() == [1, 1, 1]


def test_measure_sparsity_counts_exact_zeros_of_effective_weights():
    model = nn.Linear(4, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0, 1e-30, -0.0, 2.0], [1.0, 0.0, 3.0, 4.0]]))
        model.bias.zero_()
    assert measure_sparsity([("weight", model, model.weight)]) == 3 / 8


@pytest.mark.parametrize("kwargs", [
    dict(target_sparsity=1.2), dict(start_step=5, end_step=2), dict(interval=0),
    dict(schedule="step"), dict(scope="row")])
@pytest.mark.parametrize("pruner_name", PRUNERS)
def test_invalid_pruner_arguments_raise_value_error(kwargs, pruner_name):
    args = dict(target_sparsity=0.5, start_step=0, end_step=10, interval=2)
    args.update(kwargs)
    with pytest.raises(ValueError):
        PRUNERS[pruner_name](Tiny(), **args)


def test_load_state_dict_rejects_masks_of_another_model():
    pruner = MagnitudePruner(Tiny(), 0.5, 0, 10, 1)
    other = MagnitudePruner(nn.Sequential(nn.Linear(3, 3)), 0.5, 0, 10, 1)
    with pytest.raises(ValueError, match="another model"):
        pruner.load_state_dict(other.state_dict())


def build_state(target=TARGET, pruner_target=TARGET):
    torch.manual_seed(0)
    model = Tiny()
    optimizer = AdamWPrune(param_groups(model, 0.1), lr=1e-2, variant="bitter1",
                           target_sparsity=target, start_step=START, end_step=END,
                           interval=INTERVAL)
    return model, optimizer, StatePruner(model, pruner_target, START, END, INTERVAL,
                                         optimizer=optimizer)


def test_state_pruner_measures_the_sparsity_adamwprune_makes():
    model, optimizer, pruner = build_state()
    train(model, optimizer, pruner, END + 2)
    assert pruner.t == optimizer.pruning_step == END + 2
    assert pruner.current_sparsity() == round(TARGET * 356) / 356
    assert pruner.memory_bytes() == {}
    assert pruner.state_dict() == {"step": END + 2}


def test_state_pruner_rejects_other_optimizers_and_other_schedules():
    model = Tiny()
    with pytest.raises(ValueError, match="AdamWPrune"):
        StatePruner(model, TARGET, START, END, INTERVAL,
                    optimizer=torch.optim.AdamW(model.parameters()))
    with pytest.raises(ValueError, match="one config"):
        build_state(pruner_target=0.5)
    with pytest.raises(ValueError, match="one config"):
        build_state(pruner_target=0.0)
    only_fc = AdamWPrune([{"params": [model.fc.weight], "prune": True},
                          {"params": [model.conv.weight, model.conv.bias, model.fc.bias]}],
                         target_sparsity=TARGET, start_step=START, end_step=END, interval=INTERVAL)
    with pytest.raises(ValueError, match="prunable weights"):
        StatePruner(model, TARGET, START, END, INTERVAL, optimizer=only_fc)
    pruner = StatePruner(model, TARGET, START, END, INTERVAL)
    with pytest.raises(ValueError, match="attach"):
        pruner.memory_bytes()


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(7, 4)
        self.lm_head = nn.Linear(4, 7, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        return self.lm_head(self.wte(idx))


def test_movement_on_a_tied_table_masks_both_uses_and_sums_their_scores():
    torch.manual_seed(0)
    idx = torch.tensor([[1, 3, 3, 6]])
    dense = TiedLM()
    model = TiedLM()
    model.load_state_dict(dense.state_dict())
    pruner = MovementPruner(model, 0.5, 0, 1, 1, prune_embeddings=True)
    assert [name for name, _, _ in pruner.prunable] == ["wte.weight"]
    dense(idx).sum().backward()  # mask is all False: same gradient as the dense model
    model(idx).sum().backward()
    w = dense.wte.weight.detach()
    assert torch.allclose(pruner.scores()["wte.weight"], -dense.wte.weight.grad * w)
    pruner.step()
    assert torch.equal(model.wte.weight, model.lm_head.weight)
    assert int((model.lm_head.weight == 0).sum()) == 14
    assert pruner.memory_bytes() == {"scores": 28 * 4, "masks": 28}


def test_movement_scores_are_averaged_across_ranks_before_selection(monkeypatch):
    import torch.distributed as dist

    model = nn.Linear(4, 1, bias=False)
    pruner = MovementPruner(model, 0.5, 0, 1, 1)
    pruner.scores()["weight"].copy_(torch.tensor([[4.0, 3.0, 2.0, 1.0]]))  # this rank
    other_rank = torch.tensor([[-8.0, 0.0, 4.0, 6.0]])

    def all_reduce(tensor, op):
        assert op == dist.ReduceOp.SUM
        tensor.add_(other_rank)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    pruner.step()
    assert pruner.scores()["weight"].tolist() == [[-2.0, 1.5, 3.0, 3.5]]
    assert pruner.masks()["weight"].tolist() == [[True, True, False, False]]
