"""The pruner contract, the null pruner, and helpers every pruner shares.

Step convention (docs/architecture.md): the engine calls ``optimizer.step()``
then ``pruner.step()``; after that call ``t`` steps are done, the schedule is
evaluated at ``t`` and masks are recomputed on update steps.
"""
from __future__ import annotations

from numbers import Integral
from typing import Any, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from adamwprune.params import prunable_parameters
from adamwprune.pruning.schedule import (PruneSchedule, is_update_step, schedule_from,
                                         schedule_keywords, sparsity_at,
                                         validate_schedule)
from adamwprune.pruning.patterns import MaskRule
from adamwprune.pruning.selection import validate_scope

Prunable = list[tuple[str, nn.Module, torch.Tensor]]


@torch.no_grad()
def zero_optimizer_state(optimizer: Optional[torch.optim.Optimizer], param: torch.Tensor,
                         pruned_mask: torch.Tensor) -> None:
    """Zero, at the pruned entries, every state tensor of ``param``'s shape.

    Chosen by shape, not by name, so it covers ``exp_avg``, ``exp_avg_sq``,
    ``max_exp_avg_sq``, ``momentum_buffer`` and any optimizer's own buffers alike.
    """
    if optimizer is None:
        return
    state = optimizer.state.get(param)
    if not state:
        return
    for value in state.values():
        if torch.is_tensor(value) and value.shape == param.shape:
            value.masked_fill_(pruned_mask, 0)


@torch.no_grad()
def measure_sparsity(prunable: Prunable) -> float:
    """Fraction of exact zeros in the effective weights (``module.weight``)."""
    zeros = 0
    total = 0
    for _, module, _ in prunable:
        weight = module.weight
        zeros += int((weight == 0).sum())
        total += weight.numel()
    return zeros / total if total else 0.0


def export_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A plain state_dict: parametrized tensors under their original key
    (``"x.weight"`` holds the effective weight, e.g. ``w * mask``), without the
    ``parametrizations.*`` entries, so a model without parametrizations loads it."""
    effective: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        prefix = f"{module_name}." if module_name else ""
        with torch.no_grad():
            for tensor_name in module.parametrizations:
                effective[f"{prefix}parametrizations.{tensor_name}."] = (
                    f"{prefix}{tensor_name}", getattr(module, tensor_name).detach())
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        owner = next((p for p in effective if key.startswith(p)), None)
        if owner is None:
            out[key] = value
        elif effective[owner][0] not in out:
            name, tensor = effective[owner]
            out[name] = tensor
    return out


def _check_int(label: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
        raise ValueError(f"{label} must be an integer >= {low}, got {value!r}")


class Pruner:
    """Base class: schedule, step counter, sparsity measurement, state_dict.

    Subclasses implement :meth:`_update_masks` (called on update steps with the
    scheduled sparsity) and :meth:`memory_bytes`, and extend ``state_dict``.
    """

    def __init__(self, model: nn.Module, target_sparsity: float, start_step: int,
                 end_step: int, interval: int, schedule: str = "cubic",
                 scope: str = "global", prune_embeddings: bool = False,
                 optimizer: Optional[torch.optim.Optimizer] = None,
                 pattern: str = "unstructured") -> None:
        validate_schedule(target_sparsity, start_step, end_step, schedule)
        _check_int("pruning interval", interval, 1)
        validate_scope(scope)
        self.model = model
        self._target = float(target_sparsity)
        self.start_step = int(start_step)
        self.end_step = int(end_step)
        self.interval = int(interval)
        self.schedule = schedule
        self.scope = scope
        self.prune_embeddings = prune_embeddings
        self.prunable: Prunable = prunable_parameters(model, prune_embeddings)
        # scope + pattern: how an update chooses (adamwprune.pruning.patterns)
        self.rule = MaskRule([p.shape for _, _, p in self.prunable], self._target, scope, pattern)
        self.pattern = pattern
        self.t = 0
        self.optimizer: Optional[torch.optim.Optimizer] = None
        if optimizer is not None:
            self.attach(optimizer)

    @classmethod
    def from_schedule(cls, model: nn.Module, schedule: PruneSchedule,
                      optimizer: Optional[torch.optim.Optimizer] = None, **kwargs: Any) -> "Pruner":
        """Build from one :class:`PruneSchedule` (what the registry does): every schedule
        keyword this class takes comes from it; ``kwargs`` are the class's other options.
        The pruner's ``prune_schedule`` is then this very object."""
        pruner = cls(model, **schedule_keywords(cls, schedule, kwargs))
        pruner._schedule_record = schedule
        if optimizer is not None:
            pruner.attach(optimizer)
        return pruner

    @property
    def prune_schedule(self) -> PruneSchedule:
        """The PruneSchedule this pruner follows (the one it was built from, if any)."""
        record = getattr(self, "_schedule_record", None)
        return record if record is not None else schedule_from(self)

    @property
    def target_sparsity(self) -> float:
        return self._target

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer whose state is zeroed at pruned entries."""
        self.optimizer = optimizer

    def sparsity_at(self, t: int) -> float:
        return sparsity_at(t, self._target, self.start_step, self.end_step, self.schedule)

    def step(self) -> None:
        """Count one optimizer step; recompute masks if this is an update step."""
        self.t += 1
        if is_update_step(self.t, self.start_step, self.end_step, self.interval):
            self._update_masks(self.sparsity_at(self.t))

    def _update_masks(self, sparsity: float) -> None:
        raise NotImplementedError

    def current_sparsity(self) -> float:
        """Exact zeros / numel over the prunable effective weights."""
        return measure_sparsity(self.prunable)

    def dense_tensors(self) -> list[str]:
        """Prunable tensors the pattern leaves dense (N:M groups do not tile them)."""
        return [self.prunable[i][0] for i in self.rule.dense()]

    def memory_bytes(self) -> dict[str, int]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.t}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t = int(state["step"])

    def _load_named(self, saved: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
                    what: str) -> None:
        """Copy ``saved[name]`` into ``targets[name]`` in place, checking names and shapes."""
        if set(saved) != set(targets):
            raise ValueError(f"{what} in the checkpoint are for {sorted(saved)}, but this "
                             f"pruner has {sorted(targets)}; was it saved from another model?")
        for name, tensor in targets.items():
            if saved[name].shape != tensor.shape:
                raise ValueError(f"{what}[{name!r}] has shape {tuple(saved[name].shape)}, "
                                 f"expected {tuple(tensor.shape)}")
            tensor.copy_(saved[name])


class NoPruner(Pruner):
    """The null pruner: same API, prunes nothing, holds no buffers.

    Accepts the pruner arguments so a registry can build every pruner the same
    way; its target sparsity is 0 whatever is passed.
    """

    def __init__(self, model: nn.Module, target_sparsity: float = 0.0, start_step: int = 0,
                 end_step: int = 0, interval: int = 1, schedule: str = "cubic",
                 scope: str = "global", prune_embeddings: bool = False,
                 optimizer: Optional[torch.optim.Optimizer] = None,
                 pattern: str = "unstructured") -> None:
        super().__init__(model, 0.0, start_step, max(end_step, start_step), interval,
                         schedule, scope, prune_embeddings, optimizer, pattern)

    def step(self) -> None:
        self.t += 1

    def memory_bytes(self) -> dict[str, int]:
        return {}
