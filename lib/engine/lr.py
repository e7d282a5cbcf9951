"""Learning-rate schedules: pure functions of the optimizer step."""
from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine", "warmup_cosine")


def lr_at(step: int, total: int, peak: float, schedule: str = "constant", warmup: int = 0,
          min_ratio: float = 0.0) -> float:
    """The learning rate for optimizer step `step` (0-based) of a `total`-step run.

    cosine: min + (peak - min) * (1 + cos(pi * step / total)) / 2.
    warmup_cosine: linear from peak / (warmup + 1) to peak over `warmup` steps
    (nanoGPT's form), then cosine over the remaining steps.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r} (valid: {', '.join(SCHEDULES)})")
    if schedule == "constant":
        return peak
    floor = peak * min_ratio
    if schedule == "warmup_cosine":
        if step < warmup:
            return peak * (step + 1) / (warmup + 1)
        span = max(1, total - warmup)
        progress = min(1.0, (step - warmup) / span)
    else:
        progress = min(1.0, step / max(1, total))
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
