"""Sparsity patterns and layer densities: N:M groups and ERK (ALGORITHMS.md,
"Sparsity patterns" and "Dynamic sparse training").

N:M (Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks"; NVIDIA's 2:4):
in every group of M consecutive weights along the reduction dimension (Linear:
the input dimension of ``weight[out, in]``; Conv2d: the flattened ``in x kh x kw``)
at most N are non-zero, so the final sparsity is 1 - N/M. Within a group the N
entries of highest importance are kept (ties by index). Gradual N:M follows
torchao's block sparsifier: the schedule ramps the *fraction of groups* made N:M
from 0 to 1, lowest-importance groups first; a group's importance is the sum of
the scores of the M - N entries that making it N:M removes (what it would lose),
ranked globally or per tensor. A tensor whose reduction dimension is not a
multiple of M stays dense.

ERK (Evci et al. 2020, "Rigging the Lottery"): the density of a layer is
proportional to (sum of its dims) / (product of its dims), scaled so that the
total meets the target; a layer that would exceed density 1 is dense and the
others are rescaled.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

import torch

from adamwprune.pruning.selection import _prune_lowest, num_to_prune

UNSTRUCTURED = "unstructured"
DISTRIBUTIONS = ("uniform", "erk")
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(pattern: str) -> Optional[tuple[int, int]]:
    """``"unstructured"`` -> None; ``"N:M"`` -> (N, M) with 0 < N < M; else ValueError."""
    if pattern == UNSTRUCTURED:
        return None
    match = _NM.match(pattern) if isinstance(pattern, str) else None
    if match is None:
        raise ValueError(f"unknown sparsity pattern {pattern!r}; valid: 'unstructured' or 'N:M' "
                         "such as '2:4'")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"sparsity pattern {pattern!r}: need 0 < N < M (e.g. '2:4')")
    return n, m


def nm_sparsity(pattern: str) -> float:
    """The sparsity an N:M pattern reaches in the tensors it applies to: 1 - N/M."""
    nm = parse_pattern(pattern)
    if nm is None:
        raise ValueError("an unstructured pattern has no fixed sparsity")
    return 1.0 - nm[0] / nm[1]


def reduction_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as (rows, reduction dimension): Linear (out, in), Conv2d (out, in*kh*kw)."""
    return t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)


def nm_applies(shape: Sequence[int], m: int) -> bool:
    """Whether N:M groups of size ``m`` tile the reduction dimension of ``shape``."""
    reduction = 1
    for size in shape[1:] if len(shape) > 1 else shape:
        reduction *= size
    return reduction % m == 0


def _group_costs(score: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group of m (flat group order): the cost of making it N:M (sum of its m - n
    lowest scores) and, per entry, whether it is among its group's m - n lowest
    (ties by index)."""
    groups = reduction_rows(score).reshape(-1, m)
    order = torch.sort(groups, dim=1, stable=True).indices[:, :m - n]
    lowest = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, order, True)
    costs = torch.where(lowest, groups, torch.zeros((), dtype=groups.dtype, device=groups.device))
    return costs.sum(dim=1), lowest.reshape(score.shape)


@torch.no_grad()
def nm_masks(scores: list[torch.Tensor], n: int, m: int, fraction: float,
             scope: str = "global") -> list[torch.Tensor]:
    """Bool masks (True = pruned): in round(fraction * G) groups of lowest cost (G: the
    groups of the tensors N:M applies to, all together for global scope, per tensor
    for "layer"), the m - n lowest-score entries. Tensors N:M does not tile get no
    pruning. Already-pruned entries should carry -inf (monotone masks: their groups
    cost -inf and are chosen first)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction of N:M groups must be in [0, 1], got {fraction}")
    masks = [torch.zeros(s.shape, dtype=torch.bool, device=s.device) for s in scores]
    tiled = [i for i, s in enumerate(scores) if nm_applies(s.shape, m)]
    if not tiled:
        return masks
    parts = {i: _group_costs(scores[i], n, m) for i in tiled}
    sets = [tiled] if scope == "global" else [[i] for i in tiled]
    for members in sets:
        costs = [parts[i][0] for i in members]
        k = num_to_prune(fraction, sum(c.numel() for c in costs))
        chosen = _prune_lowest(costs, k)
        for i, groups in zip(members, chosen):
            lowest = parts[i][1]
            rows = reduction_rows(lowest).reshape(-1, m)
            masks[i] = (rows & groups.unsqueeze(1)).reshape(lowest.shape)
    return masks


def erk_densities(shapes: Sequence[Sequence[int]], sparsity: float) -> list[float]:
    """ERK density per tensor for a total sparsity ``sparsity`` over all of them."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    numels = [_numel(s) for s in shapes]
    raw = [sum(s) / n for s, n in zip(shapes, numels)]
    keep_total = (1.0 - sparsity) * sum(numels)
    dense: set[int] = set()
    while True:
        rest = [i for i in range(len(shapes)) if i not in dense]
        budget = keep_total - sum(numels[i] for i in dense)
        weight = sum(raw[i] * numels[i] for i in rest)
        scale = budget / weight if weight else 0.0
        over = [i for i in rest if scale * raw[i] > 1.0]
        if not over:
            return [1.0 if i in dense else scale * raw[i] for i in range(len(shapes))]
        dense.update(over)


def layer_densities(shapes: Sequence[Sequence[int]], sparsity: float,
                    distribution: str) -> list[float]:
    """Per-tensor densities for a total sparsity: uniform (every tensor 1 - s) or ERK."""
    if distribution == "uniform":
        return [1.0 - sparsity] * len(shapes)
    if distribution == "erk":
        return erk_densities(shapes, sparsity)
    raise ValueError(f"unknown layer distribution {distribution!r}; valid: "
                     f"{', '.join(DISTRIBUTIONS)}")


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


class MaskRule:
    """How one mask update chooses, for a fixed list of tensors: the scope (one global
    ranking, per tensor, or per tensor at its ERK sparsity) and the pattern
    (unstructured, or N:M groups). ``masks(scores, s)`` returns the bool masks
    (True = pruned) for the scheduled sparsity s of the run, whose target is
    ``target``: unstructured pruning removes round(s * N) entries in the scope; N:M
    makes round(s / target * G) groups N:M (``target`` must then be 1 - N/M)."""

    def __init__(self, shapes: Sequence[Sequence[int]], target: float, scope: str = "global",
                 pattern: str = UNSTRUCTURED) -> None:
        from adamwprune.pruning.selection import validate_scope

        validate_scope(scope)
        self.nm = parse_pattern(pattern)
        self.pattern, self.scope, self.target = pattern, scope, float(target)
        if self.nm is not None:
            if scope == "erk":
                raise ValueError(f"the ERK scope does not apply to the {pattern} pattern (its groups "
                                 "fix every layer's density); use scope 'global' or 'layer'")
            if not self.target:
                raise ValueError(f"pattern {pattern} with target_sparsity 0 prunes nothing: give "
                                 f"target_sparsity={nm_sparsity(pattern):g} or pattern 'unstructured'")
            if abs(self.target - nm_sparsity(pattern)) > 1e-9:
                raise ValueError(f"pattern {pattern} prunes to {nm_sparsity(pattern):g}: pass "
                                 f"target_sparsity={nm_sparsity(pattern):g}, not {self.target:g}")
        self.shapes = [tuple(s) for s in shapes]
        self.densities = (erk_densities(self.shapes, self.target) if scope == "erk" and self.target
                          else None)

    def dense(self) -> list[int]:
        """Indices of the tensors the pattern leaves dense (N:M groups do not tile them)."""
        if self.nm is None:
            return []
        return [i for i, s in enumerate(self.shapes) if not nm_applies(s, self.nm[1])]

    def masks(self, scores: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
        from adamwprune.pruning.selection import prune_masks

        if self.nm is not None:
            fraction = min(1.0, sparsity / self.target) if self.target else 0.0
            return nm_masks(scores, *self.nm, fraction, self.scope)
        if self.scope == "erk":
            scale = sparsity / self.target if self.target else 0.0
            return [prune_masks([s], min(1.0, scale * (1.0 - d)), "layer")[0]
                    for s, d in zip(scores, self.densities or [1.0] * len(scores))]
        return prune_masks(scores, sparsity, self.scope)
