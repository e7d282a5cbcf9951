"""N:M patterns through the pruners (magnitude, movement, SR-STE) and the ERK scope."""
import pytest
import torch
from torch import nn

from adamwprune import AdamWPrune, MagnitudePruner, MovementPruner, param_groups
from adamwprune.pruning.patterns import erk_densities
from adamwprune.pruning.schedule import sparsity_at
from adamwprune.pruning.srste import SRSTEPruner


class Net(nn.Module):
    """A conv the 4-groups tile (reduction 4*2*2 = 16), one they do not (1*3*3 = 9), a linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 3, 2)
        self.odd = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        a = torch.relu(self.conv(x[:, :4]))          # (b, 3, 4, 4)
        b = torch.relu(self.odd(x[:, 4:5]))          # (b, 4, 3, 3)
        return self.fc(torch.cat([a.mean((2, 3)), b.mean((2, 3)),
                                  a.amax((2, 3)), b.amax((2, 3))[:, :2]], 1))


def _train(model, opt, pruner, steps, check=None):
    torch.manual_seed(5)
    for t in range(steps):
        x = torch.randn(8, 5, 5, 5)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if pruner is not None:
            pruner.step()
        if check:
            check(t + 1)


def _groups(w, m=4):
    return (w.detach().reshape(w.shape[0], -1).reshape(-1, m) == 0).sum(dim=1)


@pytest.mark.parametrize("cls", [MagnitudePruner, MovementPruner])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_2_4_is_exact_at_the_end_and_gradual_on_the_way(cls, scope):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-2)
    pruner = cls(model, 0.5, 2, 20, 2, scope=scope, optimizer=opt, pattern="2:4")
    seen = []

    def check(t):
        if 2 <= t <= 20 and (t - 2) % 2 == 0:
            groups = torch.cat([_groups(model.conv.weight), _groups(model.fc.weight)])
            n_sparse = int((groups >= 2).sum())
            seen.append(n_sparse)
            if scope == "global":
                assert n_sparse == round(sparsity_at(t, 1.0, 2, 20) * groups.numel())

    _train(model, opt, pruner, 30, check)
    assert (_groups(model.conv.weight) == 2).all() and (_groups(model.fc.weight) == 2).all()
    assert not (model.odd.weight == 0).any()  # 9 does not divide by 4: dense
    assert pruner.dense_tensors() == ["odd.weight"]
    assert seen == sorted(seen) and 0 < seen[1] < seen[-1]  # the groups ramp in


def test_nm_needs_the_patterns_own_sparsity():
    with pytest.raises(ValueError, match="target_sparsity=0.5"):
        MagnitudePruner(Net(), 0.7, 0, 10, 1, pattern="2:4")
    with pytest.raises(ValueError, match="ERK scope"):
        MagnitudePruner(Net(), 0.5, 0, 10, 1, scope="erk", pattern="2:4")
    # 0 with a pattern would prune nothing, silently: refused
    with pytest.raises(ValueError, match="prunes nothing"):
        MagnitudePruner(Net(), 0.0, 0, 10, 1, pattern="2:4")
    with pytest.raises(ValueError, match="prunes nothing"):
        AdamWPrune(param_groups(Net(), 0.0), target_sparsity=0.0, end_step=10, pattern="2:4")


def test_adamwprune_with_a_pattern_and_no_target_prunes_to_the_patterns_sparsity():
    model = Net()
    opt = AdamWPrune(param_groups(model, 0.0), lr=1e-2, pattern="2:4", start_step=0, end_step=4, interval=2)
    assert opt.target_sparsity == 0.5
    _train(model, opt, None, 6)
    assert (_groups(model.conv.weight) >= 2).all() and (_groups(model.fc.weight) >= 2).all()
    assert (model.odd.weight != 0).all()  # 4-groups do not tile its 1*3*3 inputs: dense


def test_erk_scope_gives_each_layer_its_erk_sparsity():
    torch.manual_seed(1)
    model = Net()
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-2)
    pruner = MagnitudePruner(model, 0.6, 0, 10, 2, scope="erk", optimizer=opt)
    _train(model, opt, pruner, 12)
    shapes = [tuple(p.shape) for _, _, p in pruner.prunable]
    for (_, _, p), d in zip(pruner.prunable, erk_densities(shapes, 0.6)):
        assert int((p == 0).sum()) == round((1 - d) * p.numel())


def test_srste_forward_is_2_4_and_gradients_are_sparse_refined():
    torch.manual_seed(2)
    layer = nn.Linear(8, 2, bias=False)
    pruner = SRSTEPruner(layer, pattern="2:4", decay=0.5)
    w = layer.parametrizations.weight.original.detach().clone()
    eff = layer.weight.detach()
    assert (_groups(eff) == 2).all()
    keep = eff != 0
    expected_keep = torch.zeros_like(keep)
    for r in range(2):
        for g in range(2):
            block = w[r, 4 * g:4 * g + 4].abs()
            top = sorted(range(4), key=lambda i: (-float(block[i]), i))[:2]
            for i in top:
                expected_keep[r, 4 * g + i] = True
    assert torch.equal(keep, expected_keep)
    x = torch.randn(3, 8)
    layer(x).sum().backward()
    g_eff = torch.ones(3, 2).T @ x                           # dL/dw' of sum(x @ w'.T)
    expected = g_eff + 0.5 * w * ~expected_keep              # straight-through + refine term
    assert torch.allclose(layer.parametrizations.weight.original.grad, expected, atol=1e-6)
    assert pruner.current_sparsity() == 0.5


def test_srste_trains_at_exact_2_4_and_keeps_dense_weights():
    torch.manual_seed(3)
    model = Net()
    pruner = SRSTEPruner(model, 0.5, pattern="2:4")
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-2)
    _train(model, opt, pruner, 15)
    assert (_groups(model.conv.weight) == 2).all() and (_groups(model.fc.weight) == 2).all()
    dense = model.fc.parametrizations.weight.original
    assert int((dense == 0).sum()) == 0  # the pruned entries are kept and trained
    with pytest.raises(ValueError, match="N:M"):
        SRSTEPruner(Net(), pattern="unstructured")


def test_adamwprune_bitter1_at_2_4_trains_as_adamw_plus_magnitude_at_2_4():
    from adamwprune import AdamWPrune

    models = [Net() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opt_a = AdamWPrune(param_groups(models[0], 0.01), lr=1e-2, variant="bitter1",
                       target_sparsity=0.5, start_step=2, end_step=20, interval=2, pattern="2:4")
    opt_b = torch.optim.AdamW(param_groups(models[1], 0.01), lr=1e-2)
    pruner_b = MagnitudePruner(models[1], 0.5, 2, 20, 2, optimizer=opt_b, pattern="2:4")

    class Count:
        def step(self):
            pass

    _train(models[0], opt_a, Count(), 25)
    _train(models[1], opt_b, pruner_b, 25)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)
    assert (_groups(models[0].fc.weight) == 2).all()
    assert opt_a.dense_tensors() == ["odd.weight"]
