"""AdamWPrune as a dynamic sparse trainer (``regrow="gradient"``; ALGORITHMS.md,
"Dynamic sparse training"): this project's own method.

Sparse from step 0 like RigL: each prunable tensor gets a random mask with its
density (uniform or ERK), marked in its own state (v = -0.0), nothing else stored.
Every ``interval`` steps from ``start_step`` until ``end_step`` (T_end), before the
base step, each tensor drops the fraction alpha_t = (alpha / 2) * (1 + cos(pi * t /
T_end)) of its active entries with the lowest importance score (the variant:
bitter0 w^2 |m| / (sqrt(v) + eps), or |w|), computed from the state it holds, and
grows as many entries among the others by the largest |g| of the dense gradient
``step()`` is given (it is dense: AdamWPrune masks it only inside the step; under
DDP it is already averaged, so masks stay identical on every rank). A grown entry
starts at w = m = v = 0 (+0.0: live) and that same step updates it with its
gradient; a dropped one is pruned (w = m = v_max = 0, v = -0.0). Each tensor holds
exactly its number of active entries at every step.
"""
from __future__ import annotations

import torch

from adamwprune.pruning.base import zero_optimizer_state
from adamwprune.pruning.dst import _INIT_STREAM, _generator
from adamwprune.pruning.patterns import layer_densities
from adamwprune.pruning.selection import _prune_lowest, num_to_prune

REGROW = ("gradient",)


@torch.no_grad()
def initial_masks(opt, ensure_state) -> None:
    """Random masks with each prunable tensor's density, marked in its state."""
    items = opt._prunable()
    densities = layer_densities([tuple(p.shape) for p, _ in items], opt.target_sparsity,
                                opt.distribution)
    for i, ((p, group), density) in enumerate(zip(items, densities)):
        ensure_state(p, group)
        order = torch.randperm(p.numel(), generator=_generator(opt.seed, _INIT_STREAM, 0, i))
        pruned = torch.ones(p.numel(), dtype=torch.bool)
        pruned[order[:round(density * p.numel())]] = False
        _mark(opt, p, pruned.reshape(p.shape).to(p.device))


def _mark(opt, p: torch.Tensor, mask: torch.Tensor) -> None:
    p.masked_fill_(mask, 0)
    zero_optimizer_state(opt, p, mask)
    opt.state[p]["exp_avg_sq"].masked_fill_(mask, -0.0)


@torch.no_grad()
def update(opt, fraction: float) -> None:
    """One drop/grow update before the base step (see the module docstring)."""
    for p, group in opt._prunable():
        state = opt.state[p]
        old = opt.pruned_entries(p)
        active = ~old
        k = num_to_prune(fraction, int(active.sum()))
        if k == 0 or p.grad is None:
            continue
        score = opt.importance.fn(p, state["exp_avg"], state["exp_avg_sq"], group["eps"])
        (dropped,) = _prune_lowest([score.masked_fill_(old, float("inf"))], k)
        kept = active & ~dropped
        grow = p.grad.detach().abs().to(score.dtype).masked_fill_(kept, float("-inf"))
        (grown,) = _prune_lowest([-grow], k)
        new = ~(kept | grown)
        fresh = grown & old  # newly grown: live at w = m = v = 0
        p.masked_fill_(fresh, 0)
        zero_optimizer_state(opt, p, fresh)
        state["exp_avg_sq"].masked_fill_(fresh, 0.0)
        _mark(opt, p, new & active)
