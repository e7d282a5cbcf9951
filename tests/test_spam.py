"""AdamWSpam: hand-traced steps, a float64 reference, state_dict and validation."""

import copy
import io
import math

import pytest
import torch

from adamwprune.optim import AdamWSpam
from adamwprune.optim.spam import warmup_factor


def _exact(value: float):
    """The hand-traced value to float64 rounding: a few ulps, since torch's CPU
    kernels may fuse a multiply-add (FMA on AVX-512 machines) where Python rounds twice."""
    return pytest.approx(value, rel=4 * 2.0 ** -52, abs=1e-15)


def _scalar_param(value: float = 1.0) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.tensor([value], dtype=torch.float64))


def _step(opt: AdamWSpam, p: torch.Tensor, grad: float) -> None:
    p.grad = torch.tensor([grad], dtype=torch.float64)
    opt.step()


# ---------------------------------------------------------------------------
# (1) Hand-traced one-element cases
# ---------------------------------------------------------------------------


def test_hand_traced_steps_through_a_momentum_reset():
    # reset_interval 2 -> reset at c = 2; warmup_steps 1 -> s = 0.01 at the reset
    # step and 1 from the next; clip_delay 100 keeps clipping off.
    p = _scalar_param(1.0)
    opt = AdamWSpam(
        [p], lr=0.1, betas=(0.5, 0.5), eps=0.0, weight_decay=0.5,
        reset_interval=2, warmup_steps=1, clip_delay=100,
    )

    # c = 1, t = 1, s = 1 (no reset yet), g = 2.
    _step(opt, p, 2.0)
    m1 = 0.5 * 0.0 + 0.5 * 2.0                      # 1.0
    v1 = 0.5 * 0.0 + 0.5 * 2.0 * 2.0                # 2.0
    bias1 = math.sqrt(1 - 0.5) / (1 - 0.5)          # sqrt(2)
    w = 1.0 - 1.0 * 0.1 * bias1 * m1 / math.sqrt(v1)  # 0.9
    w1 = w - 0.1 * 0.5 * w                          # decay: 0.855
    assert opt.state[p]["exp_avg"].item() == _exact(m1)
    assert opt.state[p]["exp_avg_sq"].item() == _exact(v1)
    assert p.item() == _exact(w1)
    assert w1 == _exact(0.855)

    # c = 2: reset m = v = 0 first; t = 2 (not reset); k = 0 -> s = 0.01; g = 4.
    _step(opt, p, 4.0)
    s2 = 1 - 0.99 * (1 + math.cos(0.0)) / 2         # 0.01
    m2 = 0.5 * 0.0 + 0.5 * 4.0                      # 2.0, not 0.5*1 + 0.5*4
    v2 = 0.5 * 0.0 + 0.5 * 4.0 * 4.0                # 8.0
    bias2 = math.sqrt(1 - 0.5**2) / (1 - 0.5**2)    # t = 2, not 1
    w = w1 - s2 * 0.1 * bias2 * m2 / math.sqrt(v2)
    w2 = w - 0.1 * 0.5 * w                          # decay not scaled by s
    assert s2 == _exact(0.01)
    assert opt.state[p]["step"].item() == 2
    assert opt.state[p]["exp_avg"].item() == _exact(m2)
    assert opt.state[p]["exp_avg_sq"].item() == _exact(v2)
    assert p.item() == _exact(w2)

    # c = 3: k = 1 = warmup_steps -> s = 1; t = 3; g = 2.
    _step(opt, p, 2.0)
    m3 = 0.5 * m2 + 0.5 * 2.0                       # 2.0
    v3 = 0.5 * v2 + 0.5 * 2.0 * 2.0                 # 6.0
    bias3 = math.sqrt(1 - 0.5**3) / (1 - 0.5**3)
    w = w2 - 1.0 * 0.1 * bias3 * m3 / math.sqrt(v3)
    w3 = w - 0.1 * 0.5 * w
    assert opt.state[p]["exp_avg"].item() == _exact(m3)
    assert opt.state[p]["exp_avg_sq"].item() == _exact(v3)
    assert p.item() == _exact(w3)


def test_hand_traced_spike_is_clipped_to_sqrt_theta_v():
    # theta 4, clip_delay 2: clipping starts at c = 2; no reset within the test.
    p = _scalar_param(1.0)
    opt = AdamWSpam(
        [p], lr=0.1, betas=(0.5, 0.5), eps=0.0, theta=4.0,
        reset_interval=1000, warmup_steps=0, clip_delay=2,
    )

    # c = 1 < clip_delay: no clipping. g = 2.
    _step(opt, p, 2.0)
    v1 = 0.5 * 2.0 * 2.0                            # 2.0
    w1 = 1.0 - 0.1 * (math.sqrt(0.5) / 0.5) * 1.0 / math.sqrt(v1)  # 0.9

    # c = 2: theta * v = 4 * 2 = 8; g = -10, g^2 = 100 > 8 -> g = -sqrt(8).
    _step(opt, p, -10.0)
    g2 = -math.sqrt(4.0 * v1)
    m2 = 0.5 * 1.0 + 0.5 * g2                       # 0.5 - sqrt(2)
    v2 = 0.5 * v1 + 0.5 * g2 * g2                   # 5.0
    w2 = w1 - 0.1 * (math.sqrt(0.75) / 0.75) * m2 / math.sqrt(v2)
    assert opt.state[p]["exp_avg"].item() == _exact(m2)
    assert opt.state[p]["exp_avg_sq"].item() == _exact(v2)
    assert p.item() == _exact(w2)
    assert p.grad.item() == -10.0  # clipped in a copy, p.grad untouched

    # c = 3: theta * v = 20; g = 1, g^2 = 1 <= 20 -> unchanged.
    _step(opt, p, 1.0)
    m3 = 0.5 * m2 + 0.5 * 1.0
    v3 = 0.5 * v2 + 0.5 * 1.0                       # 3.0
    w3 = w2 - 0.1 * (math.sqrt(0.875) / 0.875) * m3 / math.sqrt(v3)
    assert opt.state[p]["exp_avg"].item() == _exact(m3)
    assert opt.state[p]["exp_avg_sq"].item() == _exact(v3)
    assert p.item() == _exact(w3)


def test_clipping_waits_clip_delay_steps_after_each_reset():
    # reset_interval 4, clip_delay 2: clipping at c = 2, 3, then not at c = 4, 5
    # (4 % 4 = 0 and 5 % 4 = 1 are < 2), again from c = 6. Right after a reset
    # v = 0, so any gradient would be "clipped" to 0 if clipping were on.
    p = _scalar_param(0.0)
    opt = AdamWSpam(
        [p], lr=0.1, betas=(0.5, 0.5), eps=1e-12, theta=4.0,
        reset_interval=4, warmup_steps=0, clip_delay=2,
    )
    for _ in range(3):  # m = v = 0.5, 0.75, 0.875; g^2 = 1 <= 4 v from c = 2
        _step(opt, p, 1.0)
    assert opt.state[p]["exp_avg"].item() == _exact(0.875)

    _step(opt, p, 3.0)  # c = 4: reset, not clipped although 9 > 4 * 0
    assert opt.state[p]["exp_avg"].item() == _exact(0.5 * 3.0)
    assert opt.state[p]["exp_avg_sq"].item() == _exact(0.5 * 9.0)

    _step(opt, p, 30.0)  # c = 5: not clipped although 900 > 4 * 4.5
    m5 = 0.5 * 1.5 + 0.5 * 30.0                     # 15.75
    v5 = 0.5 * 4.5 + 0.5 * 900.0                    # 452.25
    assert opt.state[p]["exp_avg"].item() == _exact(m5)

    _step(opt, p, 100.0)  # c = 6: 10000 > 4 * 452.25 = 1809 -> g = sqrt(1809)
    m6 = 0.5 * m5 + 0.5 * math.sqrt(4.0 * v5)
    assert opt.state[p]["exp_avg"].item() == pytest.approx(m6, abs=1e-13)


def test_warmup_factor_follows_the_cosine_rule():
    # Before the first reset s = 1, whatever the warm-up.
    assert warmup_factor(1, 10, 3) == 1.0
    assert warmup_factor(9, 10, 3) == 1.0
    # N = 3: k = 0 -> 0.01; k = 2 -> 1 - 0.99 * (1 + cos(pi/2)) / 2 = 0.505; k >= 3 -> 1.
    assert warmup_factor(10, 10, 3) == _exact(0.01)
    assert warmup_factor(11, 10, 3) == _exact(
        1 - 0.99 * (1 + math.cos(math.pi / 4)) / 2)
    assert warmup_factor(12, 10, 3) == _exact(0.505)
    assert warmup_factor(13, 10, 3) == 1.0
    assert warmup_factor(20, 10, 3) == _exact(0.01)
    assert warmup_factor(20, 10, 0) == 1.0


# ---------------------------------------------------------------------------
# (2) float64 reference: a plain transcription of the official code
# ---------------------------------------------------------------------------


class OfficialSpamReference:
    """Scalar transcription of the official SPAM AdamW.step (no density masks).

    Transcribed from TianjinYellow/SPAM-Optimizer's SPAM.py (as mirrored in
    ffuhu/SPAM-tests, galore_torch/SPAM.py), keeping its bookkeeping as written:
    `total_step` and `current_step` counters, the warm-up from CosineDecay(0.99,
    warmup_steps), i.e. torch's CosineAnnealingLR closed form with T_max =
    warmup_steps + 1 and eta_min = 0, and `current_step = 0` set at the end of
    the step before a reset. Each tensor is a list of Python floats.
    """

    def __init__(self, tensors, weight_decays, lr, betas, eps, warmup_steps,
                 threshold, delta_t, grad_accu_steps):
        self.w = [list(t) for t in tensors]
        self.m = [[0.0] * len(t) for t in tensors]
        self.v = [[0.0] * len(t) for t in tensors]
        self.steps = [0] * len(tensors)
        self.wd = list(weight_decays)
        self.lr, (self.beta1, self.beta2), self.eps = lr, betas, eps
        self.warmup_steps, self.thres = warmup_steps, threshold
        self.delta_t, self.grad_accu_steps = delta_t, grad_accu_steps
        self.total_step = 0
        self.current_step = warmup_steps + 1
        self.resets = self.clipped = 0

    def _death_rate(self, current_step):
        if current_step >= self.warmup_steps:
            return 0.0
        t_max, eta_min, base = self.warmup_steps + 1, 0.0, 0.99
        return eta_min + (base - eta_min) * (1 + math.cos(math.pi * current_step / t_max)) / 2

    def step(self, grads):
        scale_factor = 1 - self._death_rate(self.current_step)
        reset = (self.total_step + 1) % self.delta_t == 0
        self.resets += reset
        for i, grad in enumerate(grads):
            grad = list(grad)
            m, v = self.m[i], self.v[i]
            if reset:
                m[:] = [0.0] * len(m)
                v[:] = [0.0] * len(v)
            self.steps[i] += 1
            current_step = self.total_step + 1
            if self.thres != 0 and current_step >= self.grad_accu_steps:
                if current_step % self.delta_t >= self.grad_accu_steps:
                    for j, g in enumerate(grad):
                        if g**2 > self.thres * v[j]:
                            sign = 1.0 if g > 0 else -1.0
                            grad[j] = sign * math.sqrt(v[j] * self.thres)
                            self.clipped += 1
            step_size = self.lr
            bias_correction1 = 1.0 - self.beta1 ** self.steps[i]
            bias_correction2 = 1.0 - self.beta2 ** self.steps[i]
            step_size *= math.sqrt(bias_correction2) / bias_correction1
            w = self.w[i]
            for j, g in enumerate(grad):
                m[j] = m[j] * self.beta1 + (1.0 - self.beta1) * g
                v[j] = v[j] * self.beta2 + (1.0 - self.beta2) * g * g
                norm_grad = m[j] / (math.sqrt(v[j]) + self.eps)
                w[j] = w[j] + (-step_size * scale_factor) * norm_grad
                if self.wd[i] > 0:
                    w[j] = w[j] + (-self.lr * self.wd[i]) * w[j]
        self.total_step += 1
        self.current_step += 1
        if self.total_step != 0 and (self.total_step + 1) % self.delta_t == 0:
            self.current_step = 0


def _spiky_grad(w, target, noise, spike):
    """A quadratic-loss gradient (w - target) plus noise, times 1e3 on spike entries."""
    return [(wj - tj + nj) * (1e3 if sj else 1.0)
            for wj, tj, nj, sj in zip(w, target, noise, spike)]


def test_matches_official_spam_reference_float64_over_1300_steps():
    steps, sizes, weight_decays = 1300, (12, 5), (0.1, 0.0)
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(n, generator=gen, dtype=torch.float64) for n in sizes]
    targets = [torch.randn(n, generator=gen, dtype=torch.float64).tolist() for n in sizes]
    noise = [torch.randn(steps, n, generator=gen, dtype=torch.float64).tolist() for n in sizes]
    # Spikes on about 1 % of entries, including inside the clip-delay window after resets.
    spikes = [(torch.rand(steps, n, generator=gen) < 0.01).tolist() for n in sizes]

    params = [torch.nn.Parameter(t.clone()) for t in init]
    opt = AdamWSpam(
        [{"params": [p], "weight_decay": wd} for p, wd in zip(params, weight_decays)],
        lr=1e-2,  # large enough that the weights move well away from their start
    )
    ref = OfficialSpamReference(
        [t.tolist() for t in init], weight_decays, lr=1e-2, betas=(0.9, 0.999), eps=1e-6,
        warmup_steps=150, threshold=5000, delta_t=500, grad_accu_steps=20,
    )
    for step in range(steps):
        grads = [_spiky_grad(w, tg, nz[step], sp[step])
                 for w, tg, nz, sp in zip(ref.w, targets, noise, spikes)]
        for p, tg, nz, sp in zip(params, targets, noise, spikes):
            grad = _spiky_grad(p.tolist(), tg, nz[step], sp[step])
            p.grad = torch.tensor(grad, dtype=torch.float64)
        opt.step()
        ref.step(grads)

    assert ref.resets == 2 and opt.global_step == steps
    assert ref.clipped > 20  # the comparison exercised the spike clipping
    # torch may fuse m * beta1 + (1 - beta1) * g into one rounding where the scalar
    # reference rounds twice, so the two agree to a few ulp, not bitwise; v reaches
    # ~1e3 after spikes, hence a relative as well as an absolute 1e-12.
    tol = {"rtol": 1e-12, "atol": 1e-12}
    for i, p in enumerate(params):
        state = opt.state[p]
        for ours, theirs in ((p.detach(), ref.w[i]), (state["exp_avg"], ref.m[i]),
                             (state["exp_avg_sq"], ref.v[i])):
            torch.testing.assert_close(ours, torch.tensor(theirs, dtype=torch.float64), **tol)
        assert state["step"].item() == steps
        assert (p.detach() - init[i]).abs().max() > 0.1


# ---------------------------------------------------------------------------
# (3) state_dict round trip
# ---------------------------------------------------------------------------


def _two_groups(params):
    return [{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}]


def _run(opt, params, grads):
    for g in grads:
        for p, gp in zip(params, g):
            p.grad = gp.clone()
        opt.step()


@pytest.mark.parametrize("split", [3, 7], ids=["before_reset", "after_reset"])
def test_state_dict_round_trip_continues_bitwise(split):
    # reset_interval 5: resets at c = 5, 10; split 3 crosses the first reset after
    # loading, split 7 loads in the middle of the warm-up that follows it.
    hp = dict(lr=1e-2, weight_decay=0.1, theta=2.0, reset_interval=5, warmup_steps=3, clip_delay=1)
    gen = torch.Generator().manual_seed(1)
    init = [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in ((3, 4), (4,))]
    grads = [[torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in init]
             for _ in range(12)]

    params_a = [torch.nn.Parameter(t.clone()) for t in init]
    opt_a = AdamWSpam(_two_groups(params_a), **hp)
    _run(opt_a, params_a, grads[:split])

    buffer = io.BytesIO()
    torch.save(opt_a.state_dict(), buffer)
    buffer.seek(0)
    params_b = [torch.nn.Parameter(p.detach().clone()) for p in params_a]
    opt_b = AdamWSpam(_two_groups(params_b), **hp)
    opt_b.load_state_dict(torch.load(buffer))
    assert opt_b.global_step == split

    _run(opt_a, params_a, grads[split:])
    _run(opt_b, params_b, grads[split:])
    for pa, pb in zip(params_a, params_b):
        assert torch.equal(pa, pb)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_a.state[pa][key], opt_b.state[pb][key])
    assert opt_b.global_step == opt_a.global_step == 12


def test_fresh_optimizer_loading_a_state_dict_differs_from_one_that_did_not():
    # Guards the round-trip test: without the loaded global step the warm-up and
    # resets would fall on other steps and the trajectories would differ.
    hp = dict(lr=1e-2, reset_interval=5, warmup_steps=3)
    p_a, p_b = _scalar_param(1.0), _scalar_param(1.0)
    opt_a, opt_b = AdamWSpam([p_a], **hp), AdamWSpam([p_b], **hp)
    _run(opt_a, [p_a], [[torch.ones(1, dtype=torch.float64)]] * 4)
    state = copy.deepcopy(opt_a.state_dict())
    state["param_groups"][0]["spam_step"] = 0
    opt_b.load_state_dict(state)
    p_b.data.copy_(p_a.data)
    _run(opt_a, [p_a], [[torch.ones(1, dtype=torch.float64)]])
    _run(opt_b, [p_b], [[torch.ones(1, dtype=torch.float64)]])
    assert not torch.equal(p_a, p_b)


# ---------------------------------------------------------------------------
# (4) validation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1e-3}, "learning rate"),
        ({"lr": float("nan")}, "learning rate"),
        ({"betas": (1.0, 0.999)}, "beta1"),
        ({"betas": (0.9, -0.1)}, "beta2"),
        ({"betas": (0.9,)}, "betas"),
        ({"eps": -1e-6}, "eps"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"theta": -1.0}, "theta"),
        ({"theta": float("nan")}, "theta"),
        ({"reset_interval": 0}, "reset_interval"),
        ({"reset_interval": 2.5}, "reset_interval"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": True}, "warmup_steps"),
        ({"clip_delay": -1}, "clip_delay"),
    ],
)
def test_invalid_hyperparameters_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdamWSpam([_scalar_param()], **kwargs)


def test_invalid_per_group_hyperparameter_raises_value_error():
    with pytest.raises(ValueError, match="reset_interval"):
        AdamWSpam([{"params": [_scalar_param()], "reset_interval": 0}])
    opt = AdamWSpam([_scalar_param()])
    with pytest.raises(ValueError, match="theta"):
        opt.add_param_group({"params": [_scalar_param()], "theta": -1.0})
    assert len(opt.param_groups) == 1  # the rejected group was not kept


# ---------------------------------------------------------------------------
# (5) bias-correction step counts survive a momentum reset
# ---------------------------------------------------------------------------


def test_momentum_reset_keeps_per_parameter_step_count():
    p = _scalar_param(1.0)
    opt = AdamWSpam([p], lr=1e-3, betas=(0.5, 0.5), reset_interval=3, warmup_steps=0)
    m = 0.0
    for c in range(1, 8):
        _step(opt, p, 2.0)
        m = 0.5 * (0.0 if c % 3 == 0 else m) + 0.5 * 2.0  # m restarts at c = 3, 6
        assert opt.state[p]["exp_avg"].item() == _exact(m)
        assert opt.state[p]["step"].item() == c


# ---------------------------------------------------------------------------
# Other behaviour
# ---------------------------------------------------------------------------


def test_float64_state_and_parameters_keep_their_dtype():
    p = torch.nn.Parameter(torch.randn(2, 3, dtype=torch.float64))
    opt = AdamWSpam([p])
    p.grad = torch.randn(2, 3, dtype=torch.float64)
    opt.step()
    assert p.dtype == torch.float64
    assert opt.state[p]["exp_avg"].dtype == opt.state[p]["exp_avg_sq"].dtype == torch.float64
    assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"}


def test_added_param_group_joins_the_global_step_count():
    p, q = _scalar_param(), _scalar_param()
    opt = AdamWSpam([p])
    for _ in range(3):
        _step(opt, p, 1.0)
    opt.add_param_group({"params": [q]})
    assert [g["spam_step"] for g in opt.param_groups] == [3, 3]


def test_parameters_without_gradient_are_left_alone():
    p, q = _scalar_param(1.0), _scalar_param(2.0)
    opt = AdamWSpam([p, q], weight_decay=0.1)
    _step(opt, p, 1.0)
    assert q.item() == 2.0 and not opt.state[q]


def test_closure_loss_is_returned():
    p = _scalar_param(3.0)
    opt = AdamWSpam([p])

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 9.0
    assert p.item() < 3.0
