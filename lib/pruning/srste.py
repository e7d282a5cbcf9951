"""SR-STE: N:M sparsity trained from scratch (Zhou et al., ICLR 2021, "Learning N:M
Fine-grained Structured Sparse Neural Networks From Scratch").

The dense weights w are kept and trained. Every forward uses w' = w * M, where M is
the N:M mask of |w| recomputed at that forward (the N largest |w| of every group of
M consecutive weights along the reduction dimension; ties by index). Backward is
straight-through with the sparse-refined term: the gradient reaching w is
g = g' + lambda_w * (not M) * w, where g' = dL/dw' (so pruned entries keep
learning, and are pulled towards 0 so that the mask settles); lambda_w = 2e-4 by
default. From ``start_step`` on (0: from scratch) the forward is N:M-sparse; the
sparsity is 1 - N/M in every tensor the groups tile, and the others stay dense.
"""
from __future__ import annotations

from numbers import Real
from typing import Any, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from adamwprune.params import weight_parameter
from adamwprune.pruning.base import Pruner
from adamwprune.pruning.patterns import nm_applies, nm_masks, nm_sparsity, parse_pattern


class _SparseRefined(torch.autograd.Function):
    """w -> w * keep in forward; g' + decay * (not keep) * w to w in backward."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, keep: torch.Tensor, decay: float) -> torch.Tensor:
        ctx.save_for_backward(w, keep)
        ctx.decay = decay
        return w * keep

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w, keep = ctx.saved_tensors
        return grad + ctx.decay * w * ~keep, None, None


class SRSTEMask(nn.Module):
    """Parametrization: the N:M mask of |w| at every forward, sparse-refined STE backward."""

    def __init__(self, n: int, m: int, decay: float) -> None:
        super().__init__()
        self.n, self.m, self.decay, self.active = n, m, decay, True

    def keep(self, weight: torch.Tensor) -> torch.Tensor:
        (pruned,) = nm_masks([weight.detach().abs()], self.n, self.m, 1.0)
        return ~pruned

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return weight
        return _SparseRefined.apply(weight, self.keep(weight), self.decay)


class SRSTEPruner(Pruner):
    """N:M from scratch with SR-STE (see the module docstring).

    Same constructor as the other pruners; ``target_sparsity`` must be the pattern's
    1 - N/M (or None), the schedule's end and interval do not apply (the mask is
    recomputed at every forward). Buffers: none (the mask lives for one forward).
    """

    def __init__(self, model: nn.Module, target_sparsity: Optional[float] = None,
                 start_step: int = 0, end_step: Optional[int] = None, interval: int = 1,
                 schedule: str = "cubic", scope: str = "global", prune_embeddings: bool = False,
                 optimizer: Optional[torch.optim.Optimizer] = None, pattern: str = "2:4",
                 decay: float = 2e-4) -> None:
        nm = parse_pattern(pattern)
        if nm is None:
            raise ValueError("SR-STE trains an N:M pattern; give pattern='N:M' (e.g. '2:4'), "
                             "not 'unstructured'")
        if target_sparsity is None:
            target_sparsity = nm_sparsity(pattern)
        if isinstance(decay, bool) or not isinstance(decay, Real) or not decay >= 0:
            raise ValueError(f"SR-STE decay (lambda_w) must be a number >= 0, got {decay!r}")
        if end_step not in (None, start_step) or interval != 1 or schedule != "cubic" or \
                scope != "global":
            raise ValueError("SRSTEPruner: end_step, interval, schedule and scope do not apply "
                             "(the N:M mask is recomputed at every forward from start_step on); "
                             "leave them at their defaults")
        end = start_step if end_step is None else max(end_step, start_step)
        super().__init__(model, target_sparsity, start_step, end, interval, schedule, scope,
                         prune_embeddings, optimizer, pattern)
        self.decay = float(decay)
        self._maskers: dict[str, SRSTEMask] = {}
        modules = list(model.modules())
        for name, _, param in self.prunable:
            if not nm_applies(param.shape, nm[1]):
                continue  # stays dense (reported by dense_tensors())
            masker = SRSTEMask(*nm, self.decay)
            masker.active = self.start_step == 0
            for module in modules:
                if isinstance(getattr(module, "weight", None), torch.Tensor) and \
                        weight_parameter(module) is param:
                    parametrize.register_parametrization(module, "weight", masker)
            self._maskers[name] = masker

    def step(self) -> None:
        self.t += 1
        for masker in self._maskers.values():
            masker.active = self.t >= self.start_step

    def _update_masks(self, sparsity: float) -> None:  # the mask follows every forward
        return None

    def memory_bytes(self) -> dict[str, int]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.t}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for masker in self._maskers.values():
            masker.active = self.t >= self.start_step

    @torch.no_grad()
    def squash(self) -> None:
        """Remove the parametrizations, leaving ``weight = w * M`` as a plain parameter."""
        maskers = {id(m) for m in self._maskers.values()}
        for module in list(self.model.modules()):
            if parametrize.is_parametrized(module, "weight") and any(
                    id(p) in maskers for p in module.parametrizations.weight):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        self._maskers = {}
