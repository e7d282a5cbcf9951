"""AdamWPrune: pruning during training with the state Adam already keeps.

Library use in your own training code:

    from adamwprune import AdamWPrune, param_groups
    opt = AdamWPrune(param_groups(model, weight_decay=0.01), lr=1e-3,
                     target_sparsity=0.7, start_step=100, end_step=800, interval=50)
    ...  # loss.backward(); opt.step(); opt.zero_grad()

Clip with ``adamwprune.clip_grad_norm_(opt, max_norm)`` (before ``opt.step()``):
it clips the gradient as the optimizer uses it, pruned entries masked, for
AdamWPrune and any other optimizer alike.

or any optimizer with a pruner stepped after it:

    pruner = MagnitudePruner(model, 0.7, start_step=100, end_step=800, interval=50,
                             optimizer=opt)
    ...  # opt.step(); pruner.step()

One schedule for both (what the registry does, so a comparison cannot give one
method another ramp):

    s = PruneSchedule(target=0.7, start=100, end=800, interval=50)
    opt = AdamWPrune.from_schedule(param_groups(model, 0.01), s, lr=1e-3)
    pruner = StatePruner(model, optimizer=opt)        # AdamWPrune's own schedule
    # or: MagnitudePruner.from_schedule(model, s, optimizer=torch.optim.AdamW(...))

Patterns: ``pattern="2:4"`` on AdamWPrune, MagnitudePruner, MovementPruner and
StatePruner; SRSTEPruner trains N:M from scratch. Dynamic sparse training:
RigLPruner and SETPruner (same keywords plus ``drop_fraction``, ``distribution``),
or AdamWPrune(..., regrow="gradient").
"""
from .memory import memory_report
from .optim.adamwadv import AdamWAdv
from .optim.adamwprune import AdamWPrune
from .optim.clipping import clip_grad_norm_
from .optim.spam import AdamWSpam
from .params import param_groups, prunable_parameters
from .pruning import (MagnitudePruner, MovementPruner, NoPruner, RigLPruner, SETPruner, SRSTEPruner,
                      PruneSchedule, StatePruner, sparsity_at)

__all__ = [
    "AdamWAdv", "AdamWPrune", "AdamWSpam", "MagnitudePruner", "MovementPruner", "NoPruner", "PruneSchedule",
    "RigLPruner", "SETPruner", "SRSTEPruner", "StatePruner", "clip_grad_norm_", "memory_report", "param_groups", "prunable_parameters", "sparsity_at",
]
__version__ = "0.2.0"
