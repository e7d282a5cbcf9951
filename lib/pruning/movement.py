"""Movement pruning (Sanh, Wolf & Rush, NeurIPS 2020), hard movement / top-k."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import parametrize

from adamwprune.params import weight_parameter
from adamwprune.pruning.base import Pruner, zero_optimizer_state
from adamwprune.pruning.schedule import last_update_step


class MovementMask(nn.Module):
    """Parametrization ``w -> w * M`` that also accumulates the movement score.

    ``mask`` (bool, True = pruned) is a persistent buffer, so the model's own
    state_dict reproduces its forward pass; ``scores`` (fp32) is a
    non-persistent buffer, moved with the model but saved by the pruner.
    When the effective weight w' is used with autograd on, a hook on w' adds
    -dL/dw' * w to the scores during backward (straight-through: pruned entries
    keep accumulating). Each use of w' adds its share, so weights used twice
    (tied modules) or over several micro-batches get the full gradient.
    """

    def __init__(self, shape: torch.Size, device: torch.device) -> None:
        super().__init__()
        self.register_buffer("mask", torch.zeros(shape, dtype=torch.bool, device=device))
        self.register_buffer("scores", torch.zeros(shape, dtype=torch.float32, device=device),
                             persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        effective = weight.masked_fill(self.mask, 0)
        if effective.requires_grad:
            dense = weight.detach()
            scores = self.scores

            def accumulate(grad: torch.Tensor) -> None:
                scores.sub_(grad * dense)

            effective.register_hook(accumulate)
        return effective


class MovementPruner(Pruner):
    """Keep the top (1 - s) of the movement scores S; masks may regrow.

    S starts at 0 and, at every step, S <- S - g' * w, where g' = dL/dw' is the
    gradient of the effective weight w' = w * M (so S accumulates the first-order
    loss decrease of moving w away from 0). On update steps exactly
    round(s * N) entries of lowest S are masked (ties by index); an entry may
    come back, so the dense w is kept and the mask is applied in the forward pass
    through ``torch.nn.utils.parametrize``. The gradient reaching w at masked
    entries is 0 (autograd through the mask). S is not trained by any optimizer.

    Optimizer state is zeroed at masked entries after every step, not only when
    an entry is newly masked: the dense w is still there, and coupled weight
    decay (Adam, SGD) would otherwise write lambda * w into m, v or the momentum
    buffer at entries that receive no gradient.

    Under DDP each rank accumulates S from its local gradients; S is averaged
    across ranks before masks are computed (S is linear in g, so this equals the
    score of the averaged gradient), keeping masks identical on every rank.

    Buffers: S (fp32, 4 B/entry) + mask (bool, 1 B/entry). Build the pruner after
    the model is on its device and before the optimizer is created or attached
    (the parameter objects are kept, so either order works for the optimizer).
    """

    def __init__(self, model: nn.Module, target_sparsity: float, start_step: int,
                 end_step: int, interval: int, schedule: str = "cubic",
                 scope: str = "global", prune_embeddings: bool = False,
                 optimizer: Optional[torch.optim.Optimizer] = None,
                 pattern: str = "unstructured") -> None:
        super().__init__(model, target_sparsity, start_step, end_step, interval, schedule,
                         scope, prune_embeddings, optimizer, pattern)
        self._masks: dict[str, MovementMask] = {}
        modules = list(model.modules())  # registering adds modules; iterate a snapshot
        for name, _, param in self.prunable:
            masker = MovementMask(param.shape, param.device)
            # A weight shared by several modules (tied embedding and head, with
            # prune_embeddings) gets one parametrization on each of them.
            for module in modules:
                if isinstance(getattr(module, "weight", None), torch.Tensor) and \
                        weight_parameter(module) is param:
                    parametrize.register_parametrization(module, "weight", masker)
            self._masks[name] = masker

    def scores(self) -> dict[str, torch.Tensor]:
        return {name: m.scores for name, m in self._masks.items()}

    def masks(self) -> dict[str, torch.Tensor]:
        """Bool masks, True = pruned."""
        return {name: m.mask for name, m in self._masks.items()}

    def step(self) -> None:
        super().step()
        last = last_update_step(self.t, self.start_step, self.end_step, self.interval)
        if last is None or self.sparsity_at(last) == 0:
            return  # nothing masked yet
        for name, _, param in self.prunable:
            zero_optimizer_state(self.optimizer, param, self._masks[name].mask)

    @torch.no_grad()
    def _update_masks(self, sparsity: float) -> None:
        self._average_scores_across_ranks()
        maskers = [self._masks[name] for name, _, _ in self.prunable]
        pruned = self.rule.masks([m.scores for m in maskers], sparsity)
        for masker, new in zip(maskers, pruned):
            masker.mask.copy_(new)

    def _average_scores_across_ranks(self) -> None:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        world = dist.get_world_size()
        for masker in self._masks.values():
            dist.all_reduce(masker.scores, op=dist.ReduceOp.SUM)
            masker.scores.div_(world)

    def memory_bytes(self) -> dict[str, int]:
        return {
            "scores": sum(m.scores.numel() * m.scores.element_size() for m in self._masks.values()),
            "masks": sum(m.mask.numel() * m.mask.element_size() for m in self._masks.values()),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.t, "masks": self.masks(), "scores": self.scores()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._load_named(state["masks"], self.masks(), "masks")
        self._load_named(state["scores"], self.scores(), "scores")

    @torch.no_grad()
    def squash(self) -> None:
        """Remove the parametrizations, leaving ``weight = w * mask`` as a plain
        parameter (the same Parameter object). The pruner is unusable afterwards."""
        maskers = {id(m) for m in self._masks.values()}
        for module in list(self.model.modules()):
            if parametrize.is_parametrized(module, "weight") and any(
                    id(p) in maskers for p in module.parametrizations.weight):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        self._masks = {}
