"""RigL and SET against hand-checked cases and their invariants."""
import copy
import math

import pytest
import torch
from torch import nn

from adamwprune import param_groups
from adamwprune.pruning.dst import RigLPruner, SETPruner, drop_fraction_at


def test_drop_fraction_decays_by_cosine_to_zero_at_the_end():
    assert drop_fraction_at(0, 0.3, 100) == pytest.approx(0.3)
    assert drop_fraction_at(50, 0.3, 100) == pytest.approx(0.15)
    assert drop_fraction_at(25, 0.3, 100) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))
    assert drop_fraction_at(100, 0.3, 100) == pytest.approx(0.0)


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6), nn.ReLU(), nn.Linear(6, 3))


@pytest.mark.parametrize("cls", [RigLPruner, SETPruner])
@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_sparse_from_step_zero_with_exact_counts_per_layer(cls, distribution):
    model = _net()
    pruner = cls(model, 0.8, 0, 30, 10, distribution=distribution)
    model(torch.zeros(1, 12))  # the first forward puts the step-0 masks on the weights
    for (name, _, p), density in zip(pruner.prunable, pruner.densities):
        active = int((~pruner.masks[name]).sum())
        assert active == round(density * p.numel())
        assert not p[pruner.masks[name]].any()
    if distribution == "uniform":
        assert all(d == pytest.approx(0.2) for d in pruner.densities)


def test_rigl_drops_the_smallest_weights_and_grows_the_largest_gradients():
    layer = nn.Linear(4, 2, bias=False)
    grad = torch.tensor([[0.1, 0.9, -0.2, 0.05], [0.3, -0.8, 0.0, 0.7]])
    layer.weight.register_hook(lambda g: g * 0 + grad)  # before the pruner's: "backward" gives grad
    pruner = RigLPruner(layer, 0.5, 0, 20, 10, drop_fraction=1.0, distribution="uniform")
    layer(torch.zeros(1, 4))
    with torch.no_grad():  # the active set is what the random initial mask chose
        active = ~pruner.masks["weight"]
        layer.weight.copy_(torch.tensor([[0.5, -0.1, 0.3, 0.2], [-0.4, 0.05, 0.6, -0.7]]))
        layer.weight.masked_fill_(~active, 0)
    opt = torch.optim.SGD(layer.parameters(), lr=0.0)  # lr 0: the weights stay as set
    pruner.attach(opt)
    pruner.t = 9  # the next step() is the update at t = 10: alpha_t = 1.0 / 2
    layer(torch.ones(1, 4)).sum().backward()
    opt.step()
    w = layer.weight.detach().clone()
    pruner.step()
    n_active = int(active.sum())
    k = round(0.5 * n_active)
    flat_active = active.flatten()
    order = sorted(range(8), key=lambda i: (abs(float(w.flatten()[i])), i))
    dropped = [i for i in order if flat_active[i]][:k]
    kept = [i for i in range(8) if flat_active[i] and i not in dropped]
    candidates = [i for i in range(8) if i not in kept]
    grown = sorted(candidates, key=lambda i: (-abs(float(grad.flatten()[i])), i))[:k]
    expected = torch.ones(8, dtype=torch.bool)
    expected[kept + grown] = False
    assert torch.equal(pruner.masks["weight"].flatten(), expected)
    assert int((~pruner.masks["weight"]).sum()) == n_active  # constant sparsity
    after = layer.weight.detach().flatten()
    for i in range(8):  # grown at 0 unless it was active before; kept keep their value
        if i in kept or (i in grown and flat_active[i]):
            assert after[i] == w.flatten()[i]
        else:
            assert after[i] == 0


def _train(model, opt, pruner, steps, start=0):
    for t in range(start, start + steps):
        gen = torch.Generator().manual_seed(t)
        x = torch.randn(16, 12, generator=gen)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()


@pytest.mark.parametrize("cls", [RigLPruner, SETPruner])
def test_constant_sparsity_at_every_step_while_masks_change(cls):
    model = _net(1)
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-2)
    pruner = cls(model, 0.7, 0, 60, 5, optimizer=opt)
    counts = {name: int((~m).sum()) for name, m in pruner.masks.items()}
    first = {name: m.clone() for name, m in pruner.masks.items()}
    for _ in range(12):
        _train(model, opt, pruner, 5, start=pruner.t)
        assert {name: int((~m).sum()) for name, m in pruner.masks.items()} == counts
        for name, _, p in pruner.prunable:
            assert not p[pruner.masks[name]].any()
            state = opt.state[p]
            for key in ("exp_avg", "exp_avg_sq"):
                assert not state[key][pruner.masks[name]].any()
    assert any(not torch.equal(first[n], m) for n, m in pruner.masks.items()), "masks never changed"


@pytest.mark.parametrize("cls", [RigLPruner, SETPruner])
def test_resume_from_state_dicts_is_bit_exact(cls):
    def build():
        model = _net(2)
        opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-2)
        return model, opt, cls(model, 0.6, 0, 40, 4, optimizer=opt, seed=7)

    model, opt, pruner = build()
    _train(model, opt, pruner, 10)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), pruner.state_dict()))
    _train(model, opt, pruner, 20, start=10)
    model2, opt2, pruner2 = build()
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    pruner2.load_state_dict(saved[2])
    _train(model2, opt2, pruner2, 20, start=10)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert all(torch.equal(pruner.masks[n], pruner2.masks[n]) for n in pruner.masks)


def test_set_draws_depend_on_the_seed():
    masks = []
    for seed in (1, 1, 2):
        model = _net(3)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        pruner = SETPruner(model, 0.5, 0, 30, 3, optimizer=opt, seed=seed)
        _train(model, opt, pruner, 9)
        masks.append(torch.cat([m.flatten() for m in pruner.masks.values()]))
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])


def test_without_an_optimizer_the_masks_hold():
    model = _net(4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = RigLPruner(model, 0.75, 0, 30, 3)  # no optimizer: re-masked after each step
    _train(model, opt, pruner, 20)
    for name, _, p in pruner.prunable:
        assert not p[pruner.masks[name]].any()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="drop_fraction"):
        RigLPruner(_net(), 0.5, 0, 10, 2, drop_fraction=1.5)
    with pytest.raises(ValueError, match="distribution"):
        SETPruner(_net(), 0.5, 0, 10, 2, distribution="gaussian")


# ------------------------------------------------------- AdamWPrune that regrows
def _regrow_opt(model, **kw):
    from adamwprune import AdamWPrune

    kw = {"lr": 1e-2, "target_sparsity": 0.7, "start_step": 0, "end_step": 60, "interval": 5,
          "regrow": "gradient", "variant": "bitter0", **kw}
    return AdamWPrune(param_groups(model, 0.01), **kw)


class _NoPruner:
    def step(self):
        pass


@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_adamwprune_regrow_keeps_each_layers_sparsity_while_masks_change(distribution):
    model = _net(5)
    opt = _regrow_opt(model, distribution=distribution)
    items = opt._prunable()
    opt._before_update()  # draws the step-0 masks (the first step would)
    counts = [int(opt.pruned_entries(p).sum()) for p, _ in items]
    first = [opt.pruned_entries(p).clone() for p, _ in items]
    for _ in range(12):
        _train(model, opt, _NoPruner(), 5, start=opt.pruning_step)
        assert [int(opt.pruned_entries(p).sum()) for p, _ in items] == counts
        for p, _ in items:
            mask = opt.pruned_entries(p)
            assert not p[mask].any() and not opt.state[p]["exp_avg"][mask].any()
    assert any(not torch.equal(a, opt.pruned_entries(p)) for a, (p, _) in zip(first, items))


def test_adamwprune_regrow_drops_by_importance_and_grows_by_gradient():
    from adamwprune.optim.importance import magnitude_score

    layer = nn.Linear(4, 2, bias=False)
    opt = _regrow_opt(layer, target_sparsity=0.5, end_step=20, interval=10, drop_fraction=1.0,
                      variant="bitter1", distribution="uniform", lr=0.0, weight_decay=0.0)
    (p, _), = opt._prunable()
    opt._before_update()  # draws the step-0 masks (the first step would)
    old = opt.pruned_entries(p).clone()
    with torch.no_grad():
        p.copy_(torch.tensor([[0.5, -0.1, 0.3, 0.2], [-0.4, 0.05, 0.6, -0.7]]))
        p.masked_fill_(old, 0)
    opt.pruning_step = 9  # the next step (t = 10) regrows with alpha_t = 0.5
    p.grad = torch.tensor([[0.1, 0.9, -0.2, 0.05], [0.3, -0.8, 0.0, 0.7]])
    w = p.detach().clone()
    opt.step()
    active = ~old.flatten()
    k = round(0.5 * int(active.sum()))
    score = magnitude_score(w, None, None, 0.0).flatten()
    dropped = sorted([i for i in range(8) if active[i]], key=lambda i: (float(score[i]), i))[:k]
    kept = [i for i in range(8) if active[i] and i not in dropped]
    grown = sorted([i for i in range(8) if i not in kept],
                   key=lambda i: (-abs(float(p.grad.flatten()[i])), i))[:k]
    expected = torch.ones(8, dtype=torch.bool)
    expected[kept + grown] = False
    assert torch.equal(opt.pruned_entries(p).flatten(), expected)


def test_adamwprune_regrow_resumes_bit_exactly():
    def build():
        model = _net(6)
        return model, _regrow_opt(model, seed=3)

    model, opt = build()
    _train(model, opt, _NoPruner(), 12)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    _train(model, opt, _NoPruner(), 20, start=12)
    model2, opt2 = build()
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    _train(model2, opt2, _NoPruner(), 20, start=12)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_adamwprune_regrow_refuses_options_that_do_not_apply():
    from adamwprune import AdamWPrune

    model = _net()
    for kw, match in (({"scope": "layer"}, "distribution"), ({"pattern": "2:4"}, "unstructured"),
                      ({"target_sparsity": 0.0}, "sparse from step 0"),
                      ({"regrow": "random"}, "unknown regrow")):
        with pytest.raises(ValueError, match=match):
            AdamWPrune(param_groups(model, 0.0), **{"regrow": "gradient", "target_sparsity": 0.5,
                                                    "end_step": 10, **kw})


@pytest.mark.parametrize("cls", [RigLPruner, SETPruner])
def test_built_over_loaded_weights_then_loaded_the_resume_is_exact(cls):
    """The usual resume order: load the model, build optimizer and pruner, load their
    states. Building must not zero live weights (the step-0 masks wait for a forward)."""
    def fresh():
        model = _net(8)
        opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-2)
        return model, opt, cls(model, 0.6, 0, 40, 4, optimizer=opt, seed=7)

    model, opt, pruner = fresh()
    _train(model, opt, pruner, 12)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), pruner.state_dict()))
    _train(model, opt, pruner, 16, start=12)
    model2 = _net(8)
    model2.load_state_dict(saved[0])
    opt2 = torch.optim.AdamW(param_groups(model2, 0.01), lr=1e-2)
    opt2.load_state_dict(saved[1])
    pruner2 = cls(model2, 0.6, 0, 40, 4, optimizer=opt2, seed=7)
    pruner2.load_state_dict(saved[2])
    _train(model2, opt2, pruner2, 16, start=12)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_adamwprune_regrow_built_over_loaded_weights_then_loaded_resumes_exactly():
    model = _net(9)
    opt = _regrow_opt(model, seed=3)
    _train(model, opt, _NoPruner(), 12)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    _train(model, opt, _NoPruner(), 16, start=12)
    model2 = _net(9)
    model2.load_state_dict(saved[0])
    opt2 = _regrow_opt(model2, seed=3)  # over trained weights: must not draw masks into them
    opt2.load_state_dict(saved[1])
    _train(model2, opt2, _NoPruner(), 16, start=12)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_dynamic_sparse_pruners_refuse_options_that_do_not_apply():
    with pytest.raises(ValueError, match="do not apply"):
        RigLPruner(_net(), 0.5, 0, 10, 2, scope="layer")
    with pytest.raises(ValueError, match="do not apply"):
        SETPruner(_net(), 0.5, 0, 10, 2, schedule="linear")
    from adamwprune import AdamWPrune

    with pytest.raises(ValueError, match="schedule does not apply"):
        AdamWPrune(param_groups(_net(), 0.0), target_sparsity=0.5, end_step=10,
                   regrow="gradient", schedule="linear")
