"""SGD, Adam, AdamW and AdamWAdv match their references in float64, params and state."""

import copy
import math

import pytest
import torch

from adamwprune.optim import AdamWAdv

# Candidates under test: name -> constructor(param_groups). Every optimizer of the
# registry is checked against its reference here or in the file REFERENCE_TESTS names
# (test_every_registry_optimizer_has_a_reference_test below).
HP = {"lr": 0.05, "weight_decay": 0.1}
CANDIDATES = {
    "sgd": lambda groups: torch.optim.SGD(groups, lr=HP["lr"], momentum=0.9),
    "sgd_nesterov": lambda groups: torch.optim.SGD(
        groups, lr=HP["lr"], momentum=0.9, nesterov=True
    ),
    "adam": lambda groups: torch.optim.Adam(groups, lr=HP["lr"]),
    "adamw": lambda groups: torch.optim.AdamW(groups, lr=HP["lr"]),
    "adamwadv": lambda groups: AdamWAdv(groups, lr=HP["lr"], max_grad_norm=0.5),
}


class ClippedAdamW(torch.optim.AdamW):
    """Reference for AdamWAdv: clip_grad_norm_ over all params, then AdamW(amsgrad=True)."""

    def __init__(self, groups, lr, max_grad_norm):
        super().__init__(groups, lr=lr, amsgrad=True)
        self.max_grad_norm = max_grad_norm

    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        return super().step(closure)


# What each candidate must match: torch.optim's classes (ALGORITHMS.md: "same math as").
REFERENCES = {
    "sgd": CANDIDATES["sgd"],
    "sgd_nesterov": CANDIDATES["sgd_nesterov"],
    "adam": CANDIDATES["adam"],
    "adamw": CANDIDATES["adamw"],
    "adamwadv": lambda groups: ClippedAdamW(groups, lr=HP["lr"], max_grad_norm=0.5),
}


def _make_params(seed=0):
    """A weight matrix (decay group) and a bias (no-decay group), float64."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    bias = torch.randn(4, generator=gen, dtype=torch.float64)
    return [torch.nn.Parameter(weight), torch.nn.Parameter(bias)]


def _groups(params):
    return [
        {"params": [params[0]], "weight_decay": HP["weight_decay"]},
        {"params": [params[1]], "weight_decay": 0.0},
    ]


def _data(seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(16, 4, generator=gen, dtype=torch.float64)
    return x, y


def _train(opt, params, steps=25):
    x, y = _data()
    for _ in range(steps):
        opt.zero_grad()
        # Scaled up so the gradient norm exceeds AdamWAdv's max_grad_norm.
        loss = 10 * ((x @ params[0].T + params[1] - y) ** 2).mean()
        loss.backward()
        opt.step()


def _assert_same(opt_a, params_a, opt_b, params_b):
    for pa, pb in zip(params_a, params_b, strict=True):
        torch.testing.assert_close(pa.detach(), pb.detach(), rtol=0, atol=1e-12)
        state_a, state_b = opt_a.state[pa], opt_b.state[pb]
        assert state_a.keys() == state_b.keys() and state_a
        for key in state_a:
            torch.testing.assert_close(state_a[key], state_b[key], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", sorted(CANDIDATES))
def test_optimizer_matches_reference_float64(name):
    params_a, params_b = _make_params(), _make_params()
    opt_a = CANDIDATES[name](_groups(params_a))
    opt_b = REFERENCES[name](_groups(params_b))
    _train(opt_a, params_a)
    _train(opt_b, params_b)
    _assert_same(opt_a, params_a, opt_b, params_b)
    assert (params_a[0] - _make_params()[0]).abs().max() > 1e-3  # the weights moved


# ---------------------------------------------------------------------------
# The references themselves against the formulas of ALGORITHMS.md, written out
# per tensor, so the table above compares against something known to be right.
# ---------------------------------------------------------------------------


def _spec_sgd(w, g, state, lr, wd, nesterov, momentum=0.9):
    g = g + wd * w
    buf = state.get("momentum_buffer")
    buf = g.clone() if buf is None else momentum * buf + g
    state["momentum_buffer"] = buf
    return w - lr * (g + momentum * buf if nesterov else buf)


def _spec_adam(w, g, state, lr, wd, decoupled, betas=(0.9, 0.999), eps=1e-8):
    if decoupled:
        w = w * (1 - lr * wd)
    else:
        g = g + wd * w
    t = state["step"] = state.get("step", 0) + 1
    m = state["exp_avg"] = betas[0] * state.get("exp_avg", 0) + (1 - betas[0]) * g
    v = state["exp_avg_sq"] = betas[1] * state.get("exp_avg_sq", 0) + (1 - betas[1]) * g * g
    m_hat, v_hat = m / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
    return w - lr * m_hat / (v_hat.sqrt() + eps)


SPEC_UPDATES = {
    "sgd": lambda w, g, s, wd: _spec_sgd(w, g, s, HP["lr"], wd, nesterov=False),
    "sgd_nesterov": lambda w, g, s, wd: _spec_sgd(w, g, s, HP["lr"], wd, nesterov=True),
    "adam": lambda w, g, s, wd: _spec_adam(w, g, s, HP["lr"], wd, decoupled=False),
    "adamw": lambda w, g, s, wd: _spec_adam(w, g, s, HP["lr"], wd, decoupled=True),
}


@pytest.mark.parametrize("name", sorted(SPEC_UPDATES))
def test_torch_reference_matches_spec_formulas_float64(name):
    params = _make_params()
    opt = REFERENCES[name](_groups(params))
    weights = [p.detach().clone() for p in params]
    decays = [HP["weight_decay"], 0.0]
    states = [{}, {}]
    gen = torch.Generator().manual_seed(2)
    for _ in range(25):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        update = SPEC_UPDATES[name]
        weights = [update(w, g, s, wd) for w, g, s, wd in zip(weights, grads, states, decays)]
    for p, w, s in zip(params, weights, states):
        torch.testing.assert_close(p.detach(), w, rtol=0, atol=1e-12)
        for key, value in s.items():
            if key != "step":
                torch.testing.assert_close(opt.state[p][key], value, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------
# AdamWAdv specifics
# ---------------------------------------------------------------------------


def test_adamwadv_clips_the_joint_gradient_norm():
    params = _make_params()
    opt = AdamWAdv(_groups(params), max_grad_norm=0.5)
    for p in params:
        p.grad = torch.full_like(p, 3.0)  # joint norm 3 * sqrt(16) = 12 > 0.5
    opt.step()
    norm = math.sqrt(sum((p.grad**2).sum().item() for p in params))
    assert norm == pytest.approx(0.5, rel=1e-6)


def test_adamwadv_without_clipping_is_amsgrad_adamw():
    params_a, params_b = _make_params(), _make_params()
    opt_a = AdamWAdv(_groups(params_a), lr=HP["lr"], max_grad_norm=0.0)
    opt_b = torch.optim.AdamW(_groups(params_b), lr=HP["lr"], amsgrad=True)
    _train(opt_a, params_a)
    _train(opt_b, params_b)
    _assert_same(opt_a, params_a, opt_b, params_b)


def test_adamwadv_differs_from_unclipped_adamw():
    # Guards test_optimizer_matches_reference_float64["adamwadv"]: clipping is active there.
    params_a, params_b = _make_params(), _make_params()
    opt_a = CANDIDATES["adamwadv"](_groups(params_a))
    opt_b = torch.optim.AdamW(_groups(params_b), lr=HP["lr"], amsgrad=True)
    _train(opt_a, params_a)
    _train(opt_b, params_b)
    assert not torch.allclose(params_a[0], params_b[0], rtol=0, atol=1e-9)


def test_adamwadv_takes_adamw_positional_arguments_and_defaults():
    params = _make_params()
    opt = AdamWAdv(params, 2e-3, (0.8, 0.99), 1e-7, 0.05)
    group = opt.param_groups[0]
    hyper = (group["lr"], group["betas"], group["eps"], group["weight_decay"])
    assert hyper == (2e-3, (0.8, 0.99), 1e-7, 0.05)
    assert group["amsgrad"] is True and opt.max_grad_norm == 1.0
    assert isinstance(opt, torch.optim.AdamW)


def test_adamwadv_keeps_amsgrad_state_and_round_trips():
    params_a = _make_params()
    opt_a = AdamWAdv(_groups(params_a), lr=HP["lr"])
    _train(opt_a, params_a, steps=3)
    assert "max_exp_avg_sq" in opt_a.state[params_a[0]]
    params_b = [torch.nn.Parameter(p.detach().clone()) for p in params_a]
    opt_b = AdamWAdv(_groups(params_b), lr=HP["lr"])
    # A deep copy, as a checkpoint would be: state_dict() shares its tensors.
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    _train(opt_a, params_a, steps=3)
    _train(opt_b, params_b, steps=3)
    for pa, pb in zip(params_a, params_b):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), "1.0", True])
def test_adamwadv_rejects_invalid_max_grad_norm(bad):
    with pytest.raises(ValueError, match="max_grad_norm"):
        AdamWAdv(_make_params(), max_grad_norm=bad)


def test_adamwadv_rejects_invalid_adamw_hyperparameters():
    with pytest.raises(ValueError, match="learning rate"):
        AdamWAdv(_make_params(), lr=-1.0)


def test_adamwadv_runs_step_hooks_once():
    # Creating a plain AdamW first makes torch wrap AdamW.step with its hook runner.
    torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))])
    params = _make_params()
    opt = AdamWAdv(params)
    calls = []
    opt.register_step_pre_hook(lambda *args: calls.append("pre"))
    opt.register_step_post_hook(lambda *args: calls.append("post"))
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert calls == ["pre", "post"]


# Where each registry optimizer is checked against a reference written from the spec.
REFERENCE_TESTS = {
    "sgd": "tests/test_optimizers.py::test_optimizer_matches_reference_float64",
    "adam": "tests/test_optimizers.py::test_optimizer_matches_reference_float64",
    "adamw": "tests/test_optimizers.py::test_optimizer_matches_reference_float64",
    "adamwadv": "tests/test_optimizers.py::test_optimizer_matches_reference_float64",
    "adamwspam": "tests/test_spam.py::test_matches_official_spam_reference_float64_over_1300_steps",
    "adamwprune": "tests/test_adamwprune.py::test_target_zero_is_identical_to_base_float64",
}


def test_every_registry_optimizer_has_a_reference_test():
    """A registered optimizer with no reference test (or a test named here that does
    not exist) fails here; the candidates of this file are registry names."""
    import importlib
    import pathlib

    from adamwprune.registry import OPTIMIZERS

    assert set(REFERENCE_TESTS) == set(OPTIMIZERS)
    here = {n.split("_")[0] for n in CANDIDATES}
    assert here <= set(OPTIMIZERS)
    for name, where in REFERENCE_TESTS.items():
        path, func = where.split("::")
        if path == "tests/test_optimizers.py":
            assert name in CANDIDATES, name
        module = importlib.import_module(pathlib.Path(path).stem)
        assert callable(getattr(module, func, None)), where
