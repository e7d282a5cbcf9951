"""Pruning methods on one schedule, with exact top-k selection."""
from adamwprune.pruning.dst import RigLPruner, SETPruner
from adamwprune.pruning.srste import SRSTEPruner
from adamwprune.pruning.base import (NoPruner, Pruner, export_state_dict, measure_sparsity,
                                     zero_optimizer_state)
from adamwprune.pruning.magnitude import MagnitudePruner
from adamwprune.pruning.movement import MovementMask, MovementPruner
from adamwprune.pruning.schedule import PruneSchedule, is_update_step, last_update_step, sparsity_at
from adamwprune.pruning.selection import num_to_prune, prune_masks
from adamwprune.pruning.state import StatePruner

__all__ = [
    "MagnitudePruner", "MovementMask", "MovementPruner", "NoPruner", "PruneSchedule", "Pruner", "RigLPruner",
    "SETPruner", "SRSTEPruner", "StatePruner",
    "export_state_dict", "is_update_step", "last_update_step", "measure_sparsity",
    "num_to_prune", "prune_masks", "sparsity_at", "zero_optimizer_state",
]
