"""Magnitude pruning on the shared schedule, with monotone masks."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from adamwprune.pruning.base import Pruner, zero_optimizer_state


class MagnitudePruner(Pruner):
    """Prune the entries of smallest |w| (Zhu & Gupta 2017 schedule).

    On update steps the lowest-|w| entries are pruned, exactly round(s * N) in
    all (global scope) or per tensor (layer scope). Masks are monotone: already
    pruned entries get score -inf, so they stay pruned. A pruned entry is set to
    0 in the weight and in every optimizer-state tensor of the weight's shape,
    and a tensor hook zeroes its gradient before it is accumulated into
    ``p.grad``; with w = g = state = 0 no optimizer (momentum, coupled or
    decoupled decay, AMSGrad) can revive it, so no per-step re-masking is needed.
    Without an optimizer (``optimizer=None``, as torch.ao.pruning's sparsifiers are
    used) its state cannot be zeroed, and momentum would move pruned weights again:
    the masks are then re-applied to the weights before every forward of the model
    (a forward pre-hook) and after every ``step()``, so every forward, in either order
    of ``optimizer.step()`` and ``pruner.step()``, sees exactly the pruned weights at 0.

    Buffers: one bool mask per prunable tensor (True = pruned), 1 B/entry.
    Build the pruner after the model is on its device.
    """

    def __init__(self, model: nn.Module, target_sparsity: float, start_step: int,
                 end_step: int, interval: int, schedule: str = "cubic",
                 scope: str = "global", prune_embeddings: bool = False,
                 optimizer: Optional[torch.optim.Optimizer] = None,
                 pattern: str = "unstructured") -> None:
        super().__init__(model, target_sparsity, start_step, end_step, interval, schedule,
                         scope, prune_embeddings, optimizer, pattern)
        self.masks: dict[str, torch.Tensor] = {
            name: torch.zeros_like(p, dtype=torch.bool) for name, _, p in self.prunable}
        self._hooks = [p.register_hook(self._gradient_masker(name))
                       for name, _, p in self.prunable]
        self._masked = False  # some entry is pruned (then re-masking without optimizer)
        self._forward_hook = model.register_forward_pre_hook(self._before_forward)

    def _before_forward(self, module, args) -> None:
        if self.optimizer is None and self._masked:
            self._remask()

    @torch.no_grad()
    def _remask(self) -> None:
        for name, _, p in self.prunable:
            p.masked_fill_(self.masks[name], 0)

    def step(self) -> None:
        super().step()
        if self.optimizer is None and self._masked:
            self._remask()

    def _gradient_masker(self, name: str):
        def mask_gradient(grad: torch.Tensor) -> torch.Tensor:
            return grad.masked_fill(self.masks[name], 0)
        return mask_gradient

    @torch.no_grad()
    def _update_masks(self, sparsity: float) -> None:
        scores = []
        for name, _, p in self.prunable:
            score = p.detach().abs()
            score.masked_fill_(self.masks[name], float("-inf"))
            scores.append(score)
        pruned = self.rule.masks(scores, sparsity)
        del scores
        for (name, _, p), new in zip(self.prunable, pruned):
            mask = self.masks[name]
            mask |= new  # equals `new` while the schedule is non-decreasing
            p.masked_fill_(mask, 0)
            if p.grad is not None:
                p.grad.masked_fill_(mask, 0)
            zero_optimizer_state(self.optimizer, p, mask)
        self._masked = self._masked or sparsity > 0

    def memory_bytes(self) -> dict[str, int]:
        return {"masks": sum(m.numel() * m.element_size() for m in self.masks.values())}

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.t, "masks": dict(self.masks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._load_named(state["masks"], self.masks, "masks")
        self._masked = any(bool(m.any()) for m in self.masks.values())

    def remove(self) -> None:
        """Remove the gradient hooks (the weights keep their zeros)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._forward_hook.remove()
