"""Dynamic sparse training: RigL and SET (ALGORITHMS.md, "Dynamic sparse training").

Masks change at constant sparsity. Sparse from step 0: each prunable tensor gets
a random mask with its density (uniform, or ERK: ``adamwprune.pruning.patterns``).
Every ``interval`` steps from ``start_step`` until ``end_step`` (T_end, 75 % of the
budget by default in Kconfig runs), each tensor drops the fraction
alpha_t = (alpha / 2) * (1 + cos(pi * t / T_end)) of its active weights with the
smallest |w| and grows as many entries among the others (the inactive ones and
those just dropped): RigL (Evci et al., ICML 2020, "Rigging the Lottery") by the
largest |g| of that step's dense gradient, SET (Mocanu et al., Nature
Communications 2018) at random. A grown weight starts at 0 with zeroed optimizer
state (one dropped and grown back in the same update keeps its value). Each
tensor holds exactly its number of active entries at every step; a weight grown at
0 counts as zero in the measured sparsity until its first update moves it.

Masks are kept like magnitude pruning's: pruned weights are 0, a gradient hook
zeroes their gradient, and the optimizer state there is zeroed (or, without an
optimizer, the weights are re-masked before every forward and after every step).
The step-0 masks are drawn when the pruner is built and applied to the weights by
the model's first forward (a forward pre-hook), so building the pruner over loaded
weights and then loading its state (a resume) never zeroes live weights. ``scope``
and ``schedule`` do not apply (``distribution`` sets each layer's density; the
sparsity is constant): anything but their defaults is refused. RigL's dense gradient is
the gradient the hook sees before masking, summed over micro-batches, on the steps
whose ``step()`` updates the masks only, and averaged over DDP ranks before it is
used, so masks stay identical on every rank; SET's random draws and the initial
masks come from generators seeded by (seed, step, tensor), the same on every rank
and after a resume.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from adamwprune.pruning.base import Pruner, zero_optimizer_state
from adamwprune.pruning.patterns import DISTRIBUTIONS, layer_densities
from adamwprune.pruning.schedule import is_update_step
from adamwprune.pruning.selection import _prune_lowest, num_to_prune

_INIT_STREAM, _GROW_STREAM = 104_729, 15_485_863


def _generator(seed: int, stream: int, step: int, index: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 2_654_435_761 + stream * 1_000_003 + step * 7_919 + index) % (2**63 - 1))
    return g


def drop_fraction_at(t: int, alpha: float, end: int) -> float:
    """alpha_t = (alpha / 2) * (1 + cos(pi * t / T_end)) (RigL's cosine decay)."""
    return alpha / 2 * (1 + math.cos(math.pi * min(t, end) / end)) if end > 0 else 0.0


class DynamicSparsePruner(Pruner):
    """Constant sparsity, changing masks. Subclasses say how to grow (:meth:`_grow_scores`)."""

    uses_gradient = False

    def __init__(self, model: nn.Module, target_sparsity: float, start_step: int, end_step: int,
                 interval: int, schedule: str = "cubic", scope: str = "global",
                 prune_embeddings: bool = False, optimizer: Optional[torch.optim.Optimizer] = None,
                 drop_fraction: float = 0.3, distribution: str = "erk", seed: int = 0) -> None:
        if scope != "global" or schedule != "cubic":
            raise ValueError(f"{type(self).__name__}: scope and schedule do not apply to dynamic "
                             "sparse training (distribution= sets each layer's density; the "
                             "sparsity is constant); leave them at their defaults")
        super().__init__(model, target_sparsity, start_step, end_step, interval, schedule, scope,
                         prune_embeddings, None)
        if isinstance(drop_fraction, bool) or not isinstance(drop_fraction, Real) or \
                not 0.0 <= drop_fraction <= 1.0:
            raise ValueError(f"drop_fraction must be a number in [0, 1], got {drop_fraction!r}")
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"unknown layer distribution {distribution!r}; valid: "
                             f"{', '.join(DISTRIBUTIONS)}")
        self.drop_fraction, self.distribution, self.seed = float(drop_fraction), distribution, seed
        shapes = [tuple(p.shape) for _, _, p in self.prunable]
        self.densities = layer_densities(shapes, self._target, distribution)
        self.masks: dict[str, torch.Tensor] = {}  # True = pruned
        for i, ((name, _, p), density) in enumerate(zip(self.prunable, self.densities)):
            order = torch.randperm(p.numel(), generator=_generator(seed, _INIT_STREAM, 0, i))
            pruned = torch.ones(p.numel(), dtype=torch.bool)
            pruned[order[:round(density * p.numel())]] = False
            self.masks[name] = pruned.reshape(p.shape).to(p.device)
        self._dense_grads: dict[str, torch.Tensor] = {}
        self._hooks = [p.register_hook(self._gradient_masker(name)) for name, _, p in self.prunable]
        self._applied = False  # the masks reach the weights at the first forward
        self._forward_hook = model.register_forward_pre_hook(self._before_forward)
        if optimizer is not None:
            self.attach(optimizer)

    def _before_forward(self, module, args) -> None:
        if not self._applied or self.optimizer is None:
            self._apply_masks()

    @torch.no_grad()
    def _apply_masks(self) -> None:
        for name, _, p in self.prunable:
            p.masked_fill_(self.masks[name], 0)
            zero_optimizer_state(self.optimizer, p, self.masks[name])
        self._applied = True

    # -- gradients
    def _gradient_masker(self, name: str):
        def mask_gradient(grad: torch.Tensor) -> torch.Tensor:
            if self.uses_gradient and self._next_is_update():
                held = self._dense_grads.get(name)
                self._dense_grads[name] = grad.detach().clone() if held is None else held + grad
            return grad.masked_fill(self.masks[name], 0)
        return mask_gradient

    def _next_is_update(self) -> bool:
        return self._is_update(self.t + 1)

    def _is_update(self, t: int) -> bool:
        return 0 < t < self.end_step and is_update_step(t, self.start_step, self.end_step,
                                                         self.interval)

    # -- steps
    def step(self) -> None:
        self.t += 1
        if self._is_update(self.t):
            self._update_masks(drop_fraction_at(self.t, self.drop_fraction, self.end_step))
        self._dense_grads = {}
        if self.optimizer is None:
            self._apply_masks()

    @torch.no_grad()
    def _update_masks(self, fraction: float) -> None:
        grads = self._reduced_dense_grads() if self.uses_gradient else {}
        for i, (name, _, p) in enumerate(self.prunable):
            old = self.masks[name]
            active = ~old
            k = num_to_prune(fraction, int(active.sum()))
            if k == 0:
                continue
            drop_score = p.detach().abs().masked_fill(old, float("inf"))
            (dropped,) = _prune_lowest([drop_score], k)
            kept = active & ~dropped
            grow = self._grow_scores(name, p, i, grads).masked_fill(kept, float("-inf"))
            (grown,) = _prune_lowest([-grow], k)  # the k largest, ties by index
            new = ~(kept | grown)
            reset = (active & new) | (grown & old)  # truly dropped, and newly grown
            p.masked_fill_(reset, 0)
            if p.grad is not None:
                p.grad.masked_fill_(new, 0)
            zero_optimizer_state(self.optimizer, p, reset)
            self.masks[name] = new

    def _reduced_dense_grads(self) -> dict[str, torch.Tensor]:
        grads = self._dense_grads
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for g in grads.values():
                dist.all_reduce(g)
                g.div_(dist.get_world_size())
        return grads

    def _grow_scores(self, name: str, p: torch.Tensor, index: int,
                     grads: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    # -- accounting and checkpoints
    def memory_bytes(self) -> dict[str, int]:
        return {"masks": sum(m.numel() * m.element_size() for m in self.masks.values())}

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.t, "masks": dict(self.masks), "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"the checkpoint's masks were drawn with seed {state['seed']}, this "
                             f"pruner's seed is {self.seed}")
        self._load_named(state["masks"], self.masks, "masks")

    def remove(self) -> None:
        """Remove the gradient hooks (the weights keep their zeros)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._forward_hook.remove()


class RigLPruner(DynamicSparsePruner):
    """RigL: drop the smallest |w|, grow the largest |g| of the step's dense gradient."""

    uses_gradient = True

    def _grow_scores(self, name, p, index, grads):
        g = grads.get(name)
        if g is None:  # no backward reached this tensor: nothing to prefer
            return torch.zeros_like(p, dtype=torch.float32)
        return g.abs().to(torch.promote_types(g.dtype, torch.float32))


class SETPruner(DynamicSparsePruner):
    """SET: drop the smallest |w|, grow at random (seeded by seed, step and tensor)."""

    def _grow_scores(self, name, p, index, grads):
        gen = _generator(self.seed, _GROW_STREAM, self.t, index)
        return torch.rand(p.shape, generator=gen).to(p.device)
