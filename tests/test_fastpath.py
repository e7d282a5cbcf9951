"""AdamWPrune's fused CPU path against its plain path (float64: parameters and every
state tensor), for each base it supports, with pruning happening; its exact top-k
(ties, NaN), its fallbacks (bracket miss, undo overflow, stand-alone update) and
its state_dict compatibility with the plain path."""
import io

import pytest
import torch
from torch import nn

from adamwprune.optim import adamwprune_cpu, cpu_kernels
from adamwprune.optim.adamwprune import AdamWPrune
from adamwprune.params import param_groups
from adamwprune.pruning import sparsity_at

pytestmark = pytest.mark.skipif(cpu_kernels.load() is None,
                                reason=f"CPU kernels unavailable: {cpu_kernels.load_error()}")

START, END, INTERVAL, TARGET, STEPS = 20, 220, 20, 0.7, 300


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 3)
        self.fc = nn.Linear(8 * 36, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def build(fast, dtype=torch.float64, seed=0, lr=1e-2, **kwargs):
    torch.manual_seed(seed)
    model = Net().to(dtype)
    options = dict(lr=lr, target_sparsity=TARGET, start_step=START, end_step=END, interval=INTERVAL)
    options.update(kwargs)
    return model, AdamWPrune(param_groups(model, 0.1), fast=fast, **options)


def train(model, optimizer, steps, first=0):
    dtype = model.fc.weight.dtype
    for step in range(first, first + steps):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(16, 2, 8, 8, generator=g).to(dtype)
        y = torch.randint(0, 10, (16,), generator=g)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def assert_same(model_a, opt_a, model_b, opt_b, rtol=1e-10, atol=1e-13):
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a == 0, b == 0), "different entries are zero"
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
        assert opt_a.state[a].keys() == opt_b.state[b].keys()
        for key, value in opt_a.state[a].items():
            assert value.dtype == opt_b.state[b][key].dtype, key
            torch.testing.assert_close(value, opt_b.state[b][key], rtol=rtol, atol=atol)


def forbid_plain(monkeypatch, optimizer):
    """Fail if the plain step or the plain mask update runs."""
    def fail(*args, **kwargs):
        raise AssertionError("the plain path ran")

    monkeypatch.setattr(optimizer.base_optimizer, "step", fail)
    monkeypatch.setattr(optimizer, "_prune_plain", fail)


BASE_CASES = [("adamw", {}), ("adam", {}), ("adamwadv", {"max_grad_norm": 0.0}),
              ("adamw", {"amsgrad": True}), ("adamw", {"maximize": True})]


@pytest.mark.parametrize("variant", ["bitter0", "bitter1"])
@pytest.mark.parametrize("base,extra", BASE_CASES, ids=lambda c: str(c))
def test_fast_path_matches_plain_float64(monkeypatch, base, extra, variant):
    plain = build(False, base=base, variant=variant, **extra)
    fast = build(True, base=base, variant=variant, **extra)
    forbid_plain(monkeypatch, fast[1])
    train(*plain, STEPS)
    train(*fast, STEPS)
    assert_same(*plain, *fast)
    n = sum(p.numel() for p in (fast[0].conv.weight, fast[0].fc.weight))
    zeros = sum(int((p == 0).sum()) for p in (fast[0].conv.weight, fast[0].fc.weight))
    assert zeros == round(TARGET * n)


def test_fast_path_hits_every_scheduled_sparsity_exactly(monkeypatch):
    model, optimizer = build(True, variant="bitter0")
    forbid_plain(monkeypatch, optimizer)
    prunable = (model.conv.weight, model.fc.weight)
    n = sum(p.numel() for p in prunable)
    for step in range(END + 5):
        train(model, optimizer, 1, first=step)
        t = step + 1
        if t == END or (START <= t <= END and (t - START) % INTERVAL == 0):
            zeros = [p == 0 for p in prunable]
            assert sum(int(z.sum()) for z in zeros) == round(sparsity_at(t, TARGET, START, END) * n)
            for p, z in zip(prunable, zeros):
                for key in ("exp_avg", "exp_avg_sq"):
                    assert not optimizer.state[p][key][z].any(), key


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_stand_alone_fast_update_matches_plain_with_spam_base(monkeypatch, scope):
    # SPAM's step is the base's own; the mask update is the kernels' stand-alone one.
    kwargs = dict(base="adamwspam", scope=scope, reset_interval=40, warmup_steps=10, clip_delay=5)
    plain, fast = build(False, **kwargs), build(True, **kwargs)
    monkeypatch.setattr(fast[1], "_prune_plain", lambda *a: pytest.fail("plain mask update ran"))
    train(*plain, STEPS)
    train(*fast, STEPS)
    assert_same(*plain, *fast)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sparsity", [0.1, 0.45, 0.9, 1.0])
def test_ties_are_broken_by_index_like_the_plain_path(dtype, sparsity):
    # lr = 0 keeps the weights, so |w| of quantised weights ties exactly in both paths.
    def run(fast):
        torch.manual_seed(3)
        model = Net().to(dtype)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_((p * 8).round() / 8)
        optimizer = AdamWPrune(param_groups(model, 0.0), lr=0.0, variant="bitter1", fast=fast,
                               target_sparsity=sparsity, start_step=1, end_step=1, interval=1)
        train(model, optimizer, 2)
        return model

    plain, fast = run(False), run(True)
    for a, b in zip(plain.parameters(), fast.parameters()):
        assert torch.equal(a == 0, b == 0)


def test_a_nan_at_the_threshold_raises_like_the_plain_path():
    for fast in (False, True):
        model, optimizer = build(fast, lr=0.0, variant="bitter1", start_step=1, end_step=1,
                                 target_sparsity=0.5)
        with torch.no_grad():
            model.fc.weight[:, :250] = float("nan")
            model.conv.weight.fill_(float("nan"))
        with pytest.raises(ValueError, match="NaN"):
            train(model, optimizer, 1)


def test_a_missed_bracket_restores_and_prunes_exactly(monkeypatch):
    calls = []

    def wrong_bracket(kernels, dtype, args, variant, total, k):
        calls.append(k)
        key = cpu_kernels.NBINS  # far below every score: everything lands above it
        return 1, 1 + key, 4096, 4096

    monkeypatch.setattr(adamwprune_cpu, "_fused_bracket", wrong_bracket)
    plain, fast = build(False), build(True)
    train(*plain, STEPS)
    train(*fast, STEPS)
    assert calls, "the fused update did not run"
    assert_same(*plain, *fast)


def test_an_overflowing_undo_log_restores_and_prunes_exactly(monkeypatch):
    original_bracket = adamwprune_cpu._fused_bracket
    original_step = cpu_kernels.Kernels.adam_step_prune
    overflows = []

    def tiny_undo(*args):
        bracket = original_bracket(*args)
        return None if bracket is None else (bracket[0], bracket[1], 1, bracket[3])

    def step_prune(self, *args):
        stats = original_step(self, *args)
        overflows.append(stats[3])
        return stats

    monkeypatch.setattr(adamwprune_cpu, "_fused_bracket", tiny_undo)
    monkeypatch.setattr(cpu_kernels.Kernels, "adam_step_prune", step_prune)
    plain, fast = build(False), build(True)
    train(*plain, STEPS)
    train(*fast, STEPS)
    assert any(overflows), "the undo log never overflowed"
    assert_same(*plain, *fast)


def test_float32_fast_path_agrees_with_plain_to_rounding():
    plain, fast = build(False, torch.float32), build(True, torch.float32)
    train(*plain, 100)
    train(*fast, 100)
    n = sum(p.numel() for p in (fast[0].conv.weight, fast[0].fc.weight))
    for model in (plain[0], fast[0]):
        zeros = sum(int((p == 0).sum()) for p in (model.conv.weight, model.fc.weight))
        assert zeros == round(sparsity_at(100, TARGET, START, END) * n)
    for a, b in zip(plain[0].parameters(), fast[0].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_state_dict_moves_between_fast_and_plain_paths():
    fast = build(True, seed=5)
    train(*fast, 90)
    buffer = io.BytesIO()
    torch.save({"model": fast[0].state_dict(), "optimizer": fast[1].state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    plain = build(False, seed=5)
    plain[0].load_state_dict(saved["model"])
    plain[1].load_state_dict(saved["optimizer"])
    assert_same(*fast, *plain, rtol=0, atol=0)
    train(*fast, 90, first=90)
    train(*plain, 90, first=90)
    assert_same(*fast, *plain)


def test_a_hook_on_the_base_sends_the_step_through_the_plain_path():
    model, optimizer = build(True)
    seen = []
    optimizer.base_optimizer.register_step_pre_hook(lambda *args: seen.append(1))
    train(model, optimizer, 3)
    assert len(seen) == 3


def test_auto_uses_the_fast_path_only_from_fast_min_numel(monkeypatch):
    assert build(None)[1]._kernels() is None
    monkeypatch.setattr(adamwprune_cpu, "FAST_MIN_NUMEL", 100)
    assert build(None)[1]._kernels() is not None
    assert build(False)[1]._kernels() is None


def test_fast_true_without_a_compiler_is_a_value_error(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "load", lambda: None)
    with pytest.raises(ValueError, match="fast=True"):
        build(True)
    assert build(None)[1]._kernels() is None  # auto falls back silently


def test_a_prunable_tensor_without_gradient_uses_the_stand_alone_update():
    plain, fast = build(False), build(True)
    for model, optimizer in (plain, fast):
        model.conv.weight.requires_grad_(False)  # never gets a gradient, still pruned
        train(model, optimizer, STEPS)
    assert_same(*plain, *fast)
    assert int((fast[0].conv.weight == 0).sum()) > 0


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("variant", ["bitter0", "bitter1"])
def test_nm_updates_in_the_kernel_match_the_plain_path(scope, variant):
    """2:4 mask updates through nm_hist/nm_apply == the plain N:M rule, in float64; the
    conv (reduction 2 x 3 x 3 = 18) stays dense."""
    plain, fast = (build(f, variant=variant, target_sparsity=0.5, scope=scope, pattern="2:4")
                   for f in (False, True))
    for model, optimizer in (plain, fast):
        train(model, optimizer, STEPS)
    assert fast[1].update_paths["cpu"] > 0 and "plain" not in fast[1].update_paths
    assert_same(*plain, *fast)
    groups = (fast[0].fc.weight == 0).reshape(-1, 4).sum(dim=1)
    assert (groups == 2).all()
    assert not (fast[0].conv.weight == 0).any()
    assert fast[1].dense_tensors() == ["conv.weight"]
