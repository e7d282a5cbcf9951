"""One-line notes that say what a choice did, before a run spends time on it.

- An override can change more than it names: `SET="OPTIMIZER_ADAMWPRUNE=y"` on a
  dense preset also turns on state pruning at AdamWPrune's default sparsity
  (defaults follow the choices). The note lists every such value.
- A run so short that the pruning ramp holds one mask update prunes to the
  target in one jump: a different method from a gradual ramp.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from .kconfig import FIELDS, load
from .pinned import describe, differences
from ..pruning.schedule import is_update_step, sparsity_at


def _asked_fields(kconf, asked: dict) -> set[str]:
    """The Config fields the overrides named themselves (a choice through a member)."""
    out = set()
    for f in FIELDS:
        if f.symbol in asked:
            out.add(f.name)
        elif f.kind == "choice":
            out.update(f.name for sym in asked if kconf.syms[sym].choice is not None
                       and kconf.syms[sym].choice.name == f.symbol)
    return out


def override_effects(config_path: Optional[Path], overrides: Sequence[tuple[str, str]]) -> list:
    """(field, before, after) the overrides changed without naming them."""
    if not overrides:
        return []
    before = load(config_path)[0].to_dict()
    after, asked, kconf = load(config_path, dict(overrides))
    named = _asked_fields(kconf, asked)
    return [d for d in differences(before, after.to_dict()) if d[0] not in named and not d[0].startswith("matrix_")]


def print_override_effects(config_path: Optional[Path], overrides: Sequence[tuple[str, str]]) -> None:
    effects = override_effects(config_path, overrides)
    if effects:
        print(f"note: the overrides also changed {describe(effects)} (defaults follow the choices; "
              "name a value in SET= to fix it)", flush=True)


def mask_updates(schedule) -> int:
    """How many mask updates raise the sparsity (at t0 the schedule is still 0)."""
    if schedule.target <= 0:
        return 0
    candidates = {*range(schedule.start, schedule.end + 1, max(1, schedule.interval)), schedule.end}
    return sum(1 for t in candidates if is_update_step(t, schedule.start, schedule.end, schedule.interval)
               and sparsity_at(t, schedule.target, schedule.start, schedule.end, schedule.schedule) > 0)


def ramp_warning(schedule, dynamic: bool = False, ramps: bool = True) -> Optional[str]:
    """A warning when the ramp holds at most one mask update, else None. Dynamic sparse
    training is at its target from step 0: warned when its masks would never move;
    a method without a ramp (SR-STE) is never warned."""
    if schedule.target <= 0 or not ramps:
        return None
    if dynamic:  # dst.DynamicSparsePruner._is_update: 0 < t < end on the schedule's update steps
        if any(is_update_step(t, schedule.start, schedule.end, schedule.interval)
               for t in range(1, schedule.end)):
            return None
        return (f"warning: no mask update before step {schedule.end} (every {schedule.interval}): the masks stay "
                "as drawn at step 0; train longer, lower PRUNING_INTERVAL or raise PRUNING_REGROW_END")
    if mask_updates(schedule) > 1:
        return None
    return (f"warning: the pruning ramp (steps {schedule.start}-{schedule.end}, every {schedule.interval}) holds "
            f"one mask update: sparsity jumps to {100 * schedule.target:.0f}% at once; train longer "
            "(EPOCHS=, MAX_ITERS=) or lower PRUNING_INTERVAL for a gradual ramp")
