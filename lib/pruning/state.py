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

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        # Imported here: adamwprune.optim.adamwprune imports this package.
        from adamwprune.optim.adamwprune import AdamWPrune

        if not isinstance(optimizer, AdamWPrune):
            raise ValueError(f"StatePruner needs an AdamWPrune optimizer, got "
                             f"{type(optimizer).__name__}; use another pruner for it")
        self._check_matches(optimizer)
        self.optimizer = optimizer

    def _check_matches(self, optimizer) -> None:
        mine = (self.target_sparsity, self.start_step, self.end_step, self.interval,
                self.schedule, self.scope, self.pattern)
        theirs = (optimizer.target_sparsity, optimizer.start_step, optimizer.end_step,
                  optimizer.interval, optimizer.schedule, optimizer.scope, optimizer.pattern)
        if (self.target_sparsity > 0 or optimizer.target_sparsity > 0) and mine != theirs:
            raise ValueError(f"StatePruner (target, start, end, interval, schedule, scope, "
                             f"pattern) = "
                             f"{mine} but its AdamWPrune has {theirs}; build both from one config")
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
