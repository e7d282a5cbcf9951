"""Importance scores for AdamWPrune (higher = more important, pruned last).

Each score is a function ``fn(w, exp_avg, exp_avg_sq, eps) -> Tensor`` of the
weight and the Adam moments the optimizer already holds; it returns a new tensor
(fp32 at least) and never modifies its inputs. Adding a variant is one function
and one record in ``IMPORTANCE``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

ScoreFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def _score_dtype(w: torch.Tensor) -> torch.dtype:
    # Rank half-precision weights in fp32; keep fp64 exact for reference tests.
    return torch.promote_types(w.dtype, torch.float32)


def hybrid_score(w: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 eps: float) -> torch.Tensor:
    """bitter0: |w| * |m| * |w| / (sqrt(v) + eps) = w^2 * |m| / (sqrt(v) + eps)."""
    dtype = _score_dtype(w)
    denom = exp_avg_sq.to(dtype).sqrt().add_(eps)
    return w.to(dtype).square().mul_(exp_avg.to(dtype).abs()).div_(denom)


def magnitude_score(w: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                    eps: float) -> torch.Tensor:
    """bitter1 / bitter2: |w|."""
    return w.to(_score_dtype(w)).abs()


@dataclass(frozen=True)
class ImportanceInfo:
    """One AdamWPrune variant.

    ``budget_factor_default``: the engine multiplies the run's total step budget
    by it while the sparsity ramp keeps its end step (1.0 = same budget).
    """

    name: str
    fn: ScoreFn
    budget_factor_default: float
    description: str
    # Whether the score reads the moments (then a mask update on a step where the base
    # resets them, SPAM's momentum reset, ranks before that reset).
    uses_moments: bool = True


IMPORTANCE: dict[str, ImportanceInfo] = {
    "bitter0": ImportanceInfo(
        "bitter0", hybrid_score, 1.0,
        "hybrid: w^2 * |m| / (sqrt(v) + eps)"),
    "bitter1": ImportanceInfo(
        "bitter1", magnitude_score, 1.0,
        "pure magnitude: |w|", uses_moments=False),
    # 1.21 is the seed's setting (12,100 vs 10,000 GPT-2 iterations): the compute
    # a cheaper pruning step saves, spent on more iterations.
    "bitter2": ImportanceInfo(
        "bitter2", magnitude_score, 1.21,
        "scale-aware: |w|, with the step budget multiplied by 1.21", uses_moments=False),
}


def get_importance(name: str) -> ImportanceInfo:
    """The registered variant ``name``; ValueError listing the valid names."""
    try:
        return IMPORTANCE[name]
    except KeyError:
        raise ValueError(f"unknown AdamWPrune variant {name!r}; valid: "
                         f"{', '.join(sorted(IMPORTANCE))}") from None
