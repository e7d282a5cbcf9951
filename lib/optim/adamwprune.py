"""AdamWPrune: an Adam-family optimizer that prunes from the state it already holds."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Callable, Iterable, Optional

import torch

from adamwprune.optim.importance import get_importance
from adamwprune.pruning.base import zero_optimizer_state
from adamwprune.pruning.schedule import (is_update_step, last_update_step, sparsity_at,
                                         validate_schedule)
from adamwprune.pruning.selection import prune_masks, validate_scope


@dataclass(frozen=True)
class BaseInfo:
    """A base optimizer AdamWPrune can wrap. ``module``/``cls`` are imported on
    first use, so this module imports even where a base is unavailable."""

    name: str
    module: str
    cls: str
    has_amsgrad: bool

    def load(self) -> type:
        return getattr(importlib.import_module(self.module), self.cls)


BASES: dict[str, BaseInfo] = {
    "adamw": BaseInfo("adamw", "torch.optim", "AdamW", True),
    "adam": BaseInfo("adam", "torch.optim", "Adam", True),
    "adamwadv": BaseInfo("adamwadv", "adamwprune.optim.adamwadv", "AdamWAdv", True),
    "adamwspam": BaseInfo("adamwspam", "adamwprune.optim.spam", "AdamWSpam", False),
}


def _check_int(label: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
        raise ValueError(f"{label} must be an integer >= {low}, got {value!r}")


class AdamWPrune(torch.optim.Optimizer):
    r"""Adam-family optimizer that prunes its parameters from its own state.

    Idea (AdamWPrune, after the seed project): Adam already holds, per weight,
    m (``exp_avg``) and v (``exp_avg_sq``); ranking entries by a score built
    from w, m and v needs no extra per-weight buffer, and a pruned entry is
    recognisable from its state alone (w = m = v = 0), so no mask is stored.

    Each :meth:`step`:

    1. If masks are in force (an update step with sparsity > 0 has passed), the
       gradient is zeroed wherever w == 0 and v == 0 (the pruned entries) in
       groups marked ``"prune": True``.
    2. The base optimizer's step (``base``: AdamW, Adam, AdamWAdv or AdamWSpam),
       e.g. for AdamW: w <- w (1 - lr lambda); m <- b1 m + (1 - b1) g;
       v <- b2 v + (1 - b2) g^2; w <- w - lr m_hat / (sqrt(v_hat) + eps).
    3. The pruning step counter t += 1. If t is an update step of the shared
       schedule (``adamwprune.pruning.schedule``; cubic or linear from
       ``start_step`` to ``end_step`` every ``interval`` steps), every entry of a
       prune group is scored by the variant (``adamwprune.optim.importance``;
       bitter0: w^2 |m| / (sqrt(v) + eps), bitter1/bitter2: |w|), already pruned
       entries get -inf (monotone masks), and exactly round(s(t) * N) entries of
       lowest score (global or per-tensor ranking, ties by index) are pruned:
       w and every state tensor of w's shape are set to 0 there.

    With w = m = v (= v_max) = 0 and g = 0 an entry stays 0 under every base, so
    the mask invariant holds without a mask. With ``target_sparsity = 0`` the
    steps are exactly the base's.

    Differences from ``torch.optim.AdamW``: the base's update (which may be
    Adam's coupled L2, AdamWAdv's clipping + AMSGrad or SPAM's); the pruning in
    steps 1 and 3; ``eps``, ``weight_decay`` and ``amsgrad`` default to the
    base's own defaults (None); ``state_dict()`` carries an extra
    ``"pruning": {"step": t}`` entry. Param groups and per-parameter state are
    the base optimizer's own objects, under torch's key names.

    Args:
        params: parameters or groups; only groups with ``"prune": True`` are
            pruned (``adamwprune.params.param_groups`` marks them).
        base: one of ``BASES``; ``base_kwargs`` go to its constructor.
        variant: importance score, one of ``adamwprune.optim.importance.IMPORTANCE``.
        target_sparsity, start_step, end_step, interval, schedule, scope: the
            shared pruning schedule and ranking scope; ``end_step`` is required
            when ``target_sparsity > 0``.
        budget_factor: overrides the variant's step-budget factor (bitter2: 1.21),
            read by the engine through :attr:`step_budget_factor`.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: Optional[float] = None,
                 weight_decay: Optional[float] = None, base: str = "adamw",
                 variant: str = "bitter0", target_sparsity: float = 0.0, start_step: int = 0,
                 end_step: Optional[int] = None, interval: int = 100, schedule: str = "cubic",
                 scope: str = "global", amsgrad: Optional[bool] = None,
                 budget_factor: Optional[float] = None, **base_kwargs: Any) -> None:
        if base not in BASES:
            raise ValueError(f"unknown AdamWPrune base {base!r}; valid: {', '.join(BASES)}")
        info = BASES[base]
        self.importance = get_importance(variant)
        if end_step is None:
            if target_sparsity:
                raise ValueError("AdamWPrune needs end_step (where the sparsity ramp ends) "
                                 "when target_sparsity > 0")
            end_step = start_step
        validate_schedule(target_sparsity, start_step, end_step, schedule)
        _check_int("pruning interval", interval, 1)
        validate_scope(scope)
        if budget_factor is not None and (isinstance(budget_factor, bool) or not isinstance(
                budget_factor, Real) or not budget_factor > 0):
            raise ValueError(f"budget_factor must be a number > 0, got {budget_factor!r}")
        if amsgrad is not None and not info.has_amsgrad:
            raise ValueError(f"base {base!r} has no AMSGrad option; leave amsgrad unset")

        kwargs = dict(lr=lr, betas=betas, **base_kwargs)
        for key, value in (("eps", eps), ("weight_decay", weight_decay), ("amsgrad", amsgrad)):
            if value is not None:
                kwargs[key] = value
        base_optimizer = info.load()(list(params), **kwargs)
        # Optimizer.__init__ re-adds the base's own group dicts (filling "prune");
        # then the group list and the state become the base's objects.
        super().__init__(base_optimizer.param_groups, dict(base_optimizer.defaults, prune=False))
        self.base_optimizer = base_optimizer
        self.param_groups = base_optimizer.param_groups
        self.state = base_optimizer.state

        self.base = base
        self.variant = variant
        self.target_sparsity = float(target_sparsity)
        self.start_step, self.end_step, self.interval = int(start_step), int(end_step), int(interval)
        self.schedule, self.scope = schedule, scope
        self._budget_factor = budget_factor
        self.pruning_step = 0
        if self.target_sparsity > 0 and not any(g["prune"] for g in self.param_groups):
            raise ValueError("target_sparsity > 0 but no param group has \"prune\": True; build "
                             "the groups with adamwprune.params.param_groups(model, ...)")

    @property
    def step_budget_factor(self) -> float:
        """Factor on the total step budget (the ramp's end step is unchanged)."""
        if self._budget_factor is not None:
            return float(self._budget_factor)
        return self.importance.budget_factor_default

    def pruning_buffer_bytes(self) -> dict[str, int]:
        """Buffers held for pruning beyond the base's state: none (no stored mask)."""
        return {}

    def add_param_group(self, param_group: dict) -> None:
        if not hasattr(self, "base_optimizer"):  # called from Optimizer.__init__
            super().add_param_group(param_group)
            return
        self.base_optimizer.add_param_group(param_group)
        self.param_groups[-1].setdefault("prune", False)

    def _prunable(self) -> list[tuple[torch.Tensor, dict]]:
        return [(p, g) for g in self.param_groups if g["prune"] for p in g["params"]]

    def masks_in_force(self) -> bool:
        """Whether some update step with sparsity > 0 has been taken."""
        last = last_update_step(self.pruning_step, self.start_step, self.end_step, self.interval)
        return last is not None and self._sparsity_at(last) > 0

    def _sparsity_at(self, t: int) -> float:
        return sparsity_at(t, self.target_sparsity, self.start_step, self.end_step, self.schedule)

    def pruned_entries(self, p: torch.Tensor) -> torch.Tensor:
        """Bool mask of pruned entries, read from the state: w == 0 and v == 0
        (only w == 0 for a parameter without state yet)."""
        pruned = p == 0
        exp_avg_sq = self.state[p].get("exp_avg_sq") if p in self.state else None
        if exp_avg_sq is not None:
            pruned &= exp_avg_sq == 0
        return pruned

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.masks_in_force():
            for p, _ in self._prunable():
                if p.grad is not None:
                    p.grad.masked_fill_(self.pruned_entries(p), 0)
        self.base_optimizer.step()
        self.pruning_step += 1
        if self.target_sparsity > 0 and is_update_step(
                self.pruning_step, self.start_step, self.end_step, self.interval):
            self._prune(self._sparsity_at(self.pruning_step))
        return loss

    @torch.no_grad()
    def _prune(self, sparsity: float) -> None:
        prunable = self._prunable()
        scores = []
        for p, group in prunable:
            state = self.state[p] if p in self.state else {}
            if "exp_avg" in state:
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            else:  # no gradient has reached p yet
                exp_avg = exp_avg_sq = torch.zeros_like(p)
            score = self.importance.fn(p, exp_avg, exp_avg_sq, group["eps"])
            score.masked_fill_(self.pruned_entries(p), float("-inf"))
            scores.append(score)
        masks = prune_masks(scores, sparsity, self.scope)
        del scores
        for (p, _), mask in zip(prunable, masks):
            p.masked_fill_(mask, 0)
            zero_optimizer_state(self, p, mask)

    def state_dict(self) -> dict[str, Any]:
        state = self.base_optimizer.state_dict()
        state["pruning"] = {"step": self.pruning_step}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        pruning = state_dict.pop("pruning", None)
        if pruning is None:
            raise ValueError("this state_dict has no \"pruning\" entry; it was not saved "
                             "from an AdamWPrune optimizer")
        self.base_optimizer.load_state_dict(state_dict)
        # torch's load_state_dict replaces the base's group list and state dict.
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.pruning_step = int(pruning["step"])
