"""SPAM: Spike-Aware Adam with Momentum Reset."""

import math
from collections.abc import Callable, Iterable
from numbers import Integral, Real

import torch
from torch.optim import Optimizer

# The warm-up after a reset starts at 1 - 0.99 = 0.01 of the full update, as in
# the official code (CosineDecay(0.99, warmup_steps) in TianjinYellow/SPAM-Optimizer).
_WARMUP_DEPTH = 0.99


def _check_real(name: str, value, low: float, high: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"Invalid {name}: {value!r} (must be a real number)")
    in_range = low <= value and (high is None or value < high)  # False for NaN
    if not in_range:
        bound = f">= {low}" if high is None else f"in [{low}, {high})"
        raise ValueError(f"Invalid {name}: {value} (must be {bound})")


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
        raise ValueError(f"Invalid {name}: {value!r} (must be an integer >= {low})")


def _check_group(group: dict) -> None:
    """Raise ValueError naming the first invalid SPAM hyper-parameter in `group`."""
    _check_real("learning rate (lr)", group["lr"], 0.0)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (must be a pair (beta1, beta2))")
    _check_real("beta1 (betas[0])", betas[0], 0.0, 1.0)
    _check_real("beta2 (betas[1])", betas[1], 0.0, 1.0)
    _check_real("eps", group["eps"], 0.0)
    _check_real("weight_decay", group["weight_decay"], 0.0)
    _check_real("theta (spike threshold; 0 disables clipping)", group["theta"], 0.0)
    _check_int("reset_interval (momentum reset period, steps)", group["reset_interval"], 1)
    _check_int("warmup_steps (steps of warm-up after a reset)", group["warmup_steps"], 0)
    _check_int("clip_delay (steps after a reset before clipping)", group["clip_delay"], 0)


def warmup_factor(count: int, reset_interval: int, warmup_steps: int) -> float:
    """The update scale s of the `count`-th step (1-based), rule 5 of SPAM.

    k = steps since the last momentum reset (the reset step itself has k = 0);
    s = 1 - 0.99 * (1 + cos(pi * k / (N + 1))) / 2 for k < N, else 1; s = 1 before
    the first reset. The arithmetic follows torch's CosineAnnealingLR closed form
    with T_max = N + 1 and eta_min = 0, which is what the official code evaluates.
    """
    if count < reset_interval:
        return 1.0
    k = count % reset_interval
    if k >= warmup_steps:
        return 1.0
    return 1.0 - _WARMUP_DEPTH * (1 + math.cos(math.pi * k / (warmup_steps + 1))) / 2


class AdamWSpam(Optimizer):
    r"""SPAM: Adam with momentum reset, spike-aware clipping and decoupled decay.

    Huang, Zhu, Jin, Liu, Wang & Liu, "SPAM: Spike-Aware Adam with Momentum Reset
    for Stable LLM Training", ICLR 2025, arXiv:2501.06842 (official code:
    TianjinYellow/SPAM-Optimizer).

    Let c be the global step number (1 for the first call to :meth:`step`), t a
    parameter's own step count, lr the group's learning rate and lambda its
    weight decay. For every parameter, in this order:

    1. Momentum reset: if ``c % reset_interval == 0``, m = 0 and v = 0. The
       parameter's ``step`` (t, for bias correction) is *not* reset.
    2. Spike clipping, with v as it is before this step's moment update: if
       ``c >= clip_delay`` and ``c % reset_interval >= clip_delay``, then wherever
       g^2 > theta * v, g <- sign(g) * sqrt(theta * v). ``theta = 0`` turns
       clipping off, as in the official code.
    3. m <- beta1 * m + (1 - beta1) * g;  v <- beta2 * v + (1 - beta2) * g^2.
    4. w <- w - s * lr * (sqrt(1 - beta2^t) / (1 - beta1^t)) * m / (sqrt(v) + eps).
    5. s (:func:`warmup_factor`): with k = c % reset_interval steps since the last
       reset, s = 1 - 0.99 * (1 + cos(pi * k / (N + 1))) / 2 for k < N
       (N = ``warmup_steps``), else 1; s = 1 before the first reset.
    6. w <- w - lr * lambda * w (after the update, not scaled by s).

    Differences from ``torch.optim.AdamW``:

    * momentum reset, spike clipping and the warm-up factor s (rules 1, 2, 5);
    * eps is added to sqrt(v), not to sqrt(v / (1 - beta2^t)), and the default
      eps is 1e-6 (both as in the official code);
    * weight decay is applied after the Adam update (torch applies it before) and
      defaults to 0;
    * no amsgrad, maximize, foreach, fused or capturable options; sparse
      gradients are rejected.

    Differences from the official code: the gradient is clipped in a copy
    (``p.grad`` is left unchanged); at a reset step every parameter with state
    is reset, including those without a gradient at that step; the global step
    count lives in each param group under ``"spam_step"``, so ``state_dict()``
    round-trips it (the official code keeps it under a string key of
    ``self.state``).

    Args:
        params: parameters or param groups to optimize.
        lr: learning rate.
        betas: coefficients of the running averages of g and g^2.
        eps: added to sqrt(v) in the denominator.
        weight_decay: decoupled weight decay lambda.
        theta: spike threshold (a gradient is a spike where g^2 > theta * v).
        reset_interval: momentum reset period Delta T, in steps.
        warmup_steps: steps N over which s rises back to 1 after a reset.
        clip_delay: steps K after a reset (and after the start) before clipping,
            so that v has accumulated enough history to judge spikes.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        theta: float = 5000.0,
        reset_interval: int = 500,
        warmup_steps: int = 150,
        clip_delay: int = 20,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "theta": theta,
            "reset_interval": reset_interval,
            "warmup_steps": warmup_steps,
            "clip_delay": clip_delay,
        }
        _check_group(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group; it joins the optimizer's global step count, not step 0."""
        super().add_param_group(param_group)  # fills in the defaults
        group = self.param_groups[-1]
        try:
            _check_group(group)
        except ValueError:
            self.param_groups.pop()
            raise
        others = self.param_groups[:-1]
        group["spam_step"] = others[0]["spam_step"] if others else 0

    @property
    def global_step(self) -> int:
        """Number of completed calls to :meth:`step` (T in the SPAM rules)."""
        return self.param_groups[0]["spam_step"]

    def resets_moments_next_step(self) -> bool:
        """Whether the next :meth:`step` starts with a momentum reset (rule 1)."""
        count = self.global_step + 1
        return any(count % group["reset_interval"] == 0 for group in self.param_groups)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one SPAM step; `closure` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        count = self.global_step + 1
        for group in self.param_groups:
            if count % group["reset_interval"] == 0:
                self._reset_moments(group)
            scale = warmup_factor(count, group["reset_interval"], group["warmup_steps"])
            clip = (
                group["theta"] != 0
                and count >= group["clip_delay"]
                and count % group["reset_interval"] >= group["clip_delay"]
            )
            for p in group["params"]:
                if p.grad is not None:
                    self._update_param(p, group, scale, clip)
        for group in self.param_groups:
            group["spam_step"] = count
        return loss

    def _reset_moments(self, group: dict) -> None:
        for p in group["params"]:
            state = self.state[p]
            if "exp_avg" in state:
                state["exp_avg"].zero_()
                state["exp_avg_sq"].zero_()

    def _update_param(self, p: torch.Tensor, group: dict, scale: float, clip: bool) -> None:
        grad = p.grad
        if grad.is_sparse:
            raise RuntimeError("AdamWSpam does not support sparse gradients")
        state = self.state[p]
        if not state:
            # Like torch, keep the step count as a float32 CPU tensor.
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        beta1, beta2 = group["betas"]
        lr, theta = group["lr"], group["theta"]

        if clip:
            # Uses v before this step's update; builds a new tensor, p.grad is untouched.
            bound = (exp_avg_sq * theta).sqrt_()
            grad = torch.where(grad * grad > exp_avg_sq * theta, grad.sign() * bound, grad)

        state["step"] += 1
        t = state["step"].item()
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

        step_size = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
        update = exp_avg_sq.sqrt().add_(group["eps"])
        torch.div(exp_avg, update, out=update)
        p.add_(update, alpha=-step_size * scale)
        if group["weight_decay"] != 0:
            p.add_(p, alpha=-lr * group["weight_decay"])
