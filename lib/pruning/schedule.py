"""The sparsity schedule shared by every pruning method (pure functions).

Cubic (Zhu & Gupta, "To prune, or not to prune", 2017; the default):
    s(t) = s_f + (s_0 - s_f) * (1 - (t - t_0) / (t_1 - t_0))**3   for t_0 <= t <= t_1.
Linear:
    s(t) = s_0 + (s_f - s_0) * (t - t_0) / (t_1 - t_0).
Before t_0 s = s_0, after t_1 s = s_f; with t_1 == t_0 the sparsity jumps to s_f at
t_0. ``t`` is the number of optimizer steps already taken (docs/architecture.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral, Real

SCHEDULES = ("cubic", "linear")


@dataclass(frozen=True)
class PruneSchedule:
    """The one sparsity schedule every method of a comparison shares (in steps), and
    the pattern of the mask. Dynamic sparse training (RigL, SET, AdamWPrune regrowing)
    is sparse from step 0 and updates masks from ``start`` (0) to ``end`` (T_end).

    Every pruner and AdamWPrune is built from one with ``from_schedule``; their
    ``prune_schedule`` is the object they were built from (or, built from keywords, the
    equivalent record)."""

    target: float = 0.0
    start: int = 0
    end: int = 0
    interval: int = 1
    schedule: str = "cubic"
    scope: str = "global"
    prune_embeddings: bool = False
    pattern: str = "unstructured"     # or "N:M"
    distribution: str = "erk"         # dynamic sparse training's layer densities
    drop_fraction: float = 0.3        # dynamic sparse training's alpha
    srste_decay: float = 2e-4         # SR-STE's lambda_w
    seed: int = 0                     # the random masks of dynamic sparse training

    def ramp(self) -> tuple:
        """What AdamWPrune and its StatePruner view must agree on."""
        return (self.target, self.start, self.end, self.interval, self.schedule, self.scope,
                self.pattern)


# Constructor keyword of the pruners and AdamWPrune -> PruneSchedule field.
SCHEDULE_KEYWORDS = {
    "target_sparsity": "target", "start_step": "start", "end_step": "end", "interval": "interval",
    "schedule": "schedule", "scope": "scope", "prune_embeddings": "prune_embeddings",
    "pattern": "pattern", "distribution": "distribution", "drop_fraction": "drop_fraction",
    "decay": "srste_decay", "seed": "seed",
}


def schedule_keywords(cls, schedule: PruneSchedule, kwargs: dict, exclude=()) -> dict:
    """The keyword arguments of ``cls(...)`` built from ``schedule``: the schedule's fields
    its constructor takes, plus ``kwargs`` (its other options); a keyword given both ways
    is refused."""
    import inspect

    taken = inspect.signature(cls.__init__).parameters
    given = {kw: getattr(schedule, field) for kw, field in SCHEDULE_KEYWORDS.items()
             if kw in taken and kw not in exclude}
    clash = sorted(set(given) & set(kwargs))
    if clash:
        raise ValueError(f"{cls.__name__}.from_schedule: {', '.join(clash)} come(s) from the "
                         "schedule; set them in the PruneSchedule instead")
    return {**given, **kwargs}


def schedule_from(obj, **fields) -> PruneSchedule:
    """The PruneSchedule equivalent to an object built from keywords (its attributes)."""
    values = {field: getattr(obj, kw) for kw, field in SCHEDULE_KEYWORDS.items()
              if kw != "decay" and hasattr(obj, kw) and getattr(obj, kw) is not None}
    if getattr(obj, "decay", None) is not None:
        values["srste_decay"] = obj.decay
    values.update(fields)
    return PruneSchedule(**values)


def validate_schedule(target: float, start: int, end: int, schedule: str = "cubic",
                      initial: float = 0.0) -> None:
    """Raise ValueError, saying what is wrong, for an invalid schedule."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown sparsity schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    for label, value in (("target sparsity", target), ("initial sparsity", initial)):
        if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{label} must be a number in [0, 1], got {value!r}")
    for label, value in (("start step", start), ("end step", end)):
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
            raise ValueError(f"{label} must be an integer >= 0, got {value!r}")
    if end < start:
        raise ValueError(f"end step ({end}) must be >= start step ({start})")


def sparsity_at(t: int, target: float, start: int, end: int, schedule: str = "cubic",
                initial: float = 0.0) -> float:
    """Sparsity s(t) after ``t`` optimizer steps (see the module docstring)."""
    validate_schedule(target, start, end, schedule, initial)
    if t < start:
        return float(initial)
    if t >= end:
        return float(target)
    progress = (t - start) / (end - start)
    if schedule == "cubic":
        return target + (initial - target) * (1.0 - progress) ** 3
    return initial + (target - initial) * progress


def is_update_step(t: int, start: int, end: int, interval: int) -> bool:
    """Whether masks are recomputed after ``t`` steps: every ``interval`` steps
    from ``start`` through ``end``, and at ``end``."""
    if isinstance(interval, bool) or not isinstance(interval, Integral) or interval < 1:
        raise ValueError(f"pruning interval must be an integer >= 1, got {interval!r}")
    if isinstance(start, bool) or not isinstance(start, Integral) or start < 0:
        raise ValueError(f"start step must be an integer >= 0, got {start!r}")
    if isinstance(end, bool) or not isinstance(end, Integral) or end < start:
        raise ValueError(f"end step must be an integer >= start step ({start}), got {end!r}")
    if t == end:
        return True
    return start <= t <= end and (t - start) % interval == 0


def last_update_step(t: int, start: int, end: int, interval: int) -> int | None:
    """The latest update step ``<= t`` (None before ``start``): the masks in force
    after ``t`` steps were computed at that step."""
    if t < start:
        return None
    if t >= end:
        return end
    return start + (t - start) // interval * interval
