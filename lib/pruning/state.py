"""StatePruner: AdamWPrune seen through the pruner interface."""
from __future__ import annotations

import torch

from adamwprune.pruning.base import Pruner


class StatePruner(Pruner):
    """The pruner view of an :class:`adamwprune.optim.adamwprune.AdamWPrune`.

    The optimizer prunes inside its own ``step()``; this object only counts
    steps, measures sparsity from the weights and reports the optimizer's
    pruning buffers, so the engine treats every method alike. Its schedule
    arguments must match the optimizer's (one schedule per comparison), and
    the optimizer's ``"prune"`` groups must hold exactly the prunable weights.
    The optimizer may be given here or later through :meth:`attach`.
    """

    def __init__(self, model, target_sparsity=None, start_step=None, end_step=None,
                 interval=None, schedule: str = "cubic", scope: str = "global",
                 prune_embeddings: bool = False, optimizer=None,
                 pattern: str = "unstructured") -> None:
        given = (target_sparsity, start_step, end_step, interval)
        if all(v is None for v in given):
            # StatePruner(model, optimizer=opt): the schedule is the optimizer's own
            record = getattr(optimizer, "prune_schedule", None)
            if record is None:
                raise ValueError("StatePruner needs its AdamWPrune optimizer (StatePruner(model, "
                                 "optimizer=opt)) or the schedule keywords")
            target_sparsity, start_step, end_step, interval, schedule, scope, pattern = record.ramp()
            self._schedule_record = record
        elif any(v is None for v in given):
            raise ValueError("StatePruner: give all of target_sparsity, start_step, end_step and "
                             "interval, or none of them (then they are its optimizer's)")
        super().__init__(model, target_sparsity, start_step, end_step, interval, schedule, scope,
                         prune_embeddings, optimizer, pattern)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        if not getattr(optimizer, "prunes_in_step", False):
            raise ValueError(f"StatePruner needs an AdamWPrune optimizer, got "
                             f"{type(optimizer).__name__}; use another pruner for it")
        self._check_matches(optimizer)
        self.optimizer = optimizer

    def _check_matches(self, optimizer) -> None:
        mine, theirs = self.prune_schedule, optimizer.prune_schedule
        # Built from one config (the registry), both hold the same PruneSchedule object.
        if mine is not theirs and (mine.target > 0 or theirs.target > 0) and mine.ramp() != theirs.ramp():
            raise ValueError(f"StatePruner (target, start, end, interval, schedule, scope, "
                             f"pattern) = {mine.ramp()} but its AdamWPrune has {theirs.ramp()}; "
                             "build both from one config (one PruneSchedule: from_schedule)")
        in_groups = {id(p) for g in optimizer.param_groups if g["prune"] for p in g["params"]}
        prunable = {id(p) for _, _, p in self.prunable}
        if optimizer.target_sparsity > 0 and in_groups != prunable:
            raise ValueError("the AdamWPrune \"prune\" groups do not hold exactly the model's "
                             "prunable weights; build them with adamwprune.params.param_groups("
                             "model, weight_decay, prune_embeddings) using the same prune_embeddings")

    def step(self) -> None:
        """Count the step; the pruning itself happened in ``optimizer.step()``."""
        self.t += 1

    def memory_bytes(self) -> dict[str, int]:
        if self.optimizer is None:
            raise ValueError("StatePruner has no optimizer; call attach(optimizer) first")
        return dict(self.optimizer.pruning_buffer_bytes())
