"""Exact top-k selection of the entries to prune.

Exactly k = round(s * N) entries are pruned: the k lowest scores, ties broken by
index (the lower flat index is pruned first; for global scope the index is the
position in the concatenation of the tensors in list order). The k-th smallest
score v comes from ``kthvalue``; every score below v is pruned and the remaining
``k - count(< v)`` entries are taken from the scores equal to v, in index order.
A bare ``score <= v`` would over-prune whenever v is tied (e.g. all zeros).
"""
from __future__ import annotations

import torch

SCOPES = ("global", "layer", "erk")


def validate_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise ValueError(f"unknown pruning scope {scope!r}; valid: {', '.join(SCOPES)}")


def num_to_prune(sparsity: float, numel: int) -> int:
    """k = round(s * N), Python's ``round``."""
    return int(round(sparsity * numel))


def _first_true(flags: torch.Tensor, count: int) -> torch.Tensor:
    """``flags`` with only its first ``count`` True entries (flat order) kept."""
    flat = flags.reshape(-1)
    # int32 halves the temporary; a single tensor never holds 2**31 entries here.
    rank = flat.cumsum(0, dtype=torch.int32)
    return (flat & (rank <= count)).view(flags.shape)


def _prune_lowest(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Masks (True = pruned) of the k lowest entries of the concatenated scores."""
    total = sum(s.numel() for s in scores)
    if k <= 0:
        return [torch.zeros(s.shape, dtype=torch.bool, device=s.device) for s in scores]
    if k >= total:
        return [torch.ones(s.shape, dtype=torch.bool, device=s.device) for s in scores]
    if len(scores) == 1:
        flat = scores[0].reshape(-1)
    else:
        flat = torch.cat([s.reshape(-1) for s in scores])
    kth = flat.kthvalue(k).values
    del flat
    if torch.isnan(kth):
        raise ValueError("pruning scores contain NaN where the k-th smallest lies; "
                         "the run has diverged (check lr and loss)")
    masks = [s < kth for s in scores]
    ties_left = k - int(sum(int(m.sum()) for m in masks))
    for score, mask in zip(scores, masks):
        if ties_left == 0:
            break
        ties = score == kth
        n_ties = int(ties.sum())
        if n_ties <= ties_left:
            mask |= ties
            ties_left -= n_ties
        else:
            mask |= _first_true(ties, ties_left)
            ties_left = 0
    assert ties_left == 0, "kthvalue and the tie count disagree"
    return masks


@torch.no_grad()
def prune_masks(scores: list[torch.Tensor], sparsity: float, scope: str = "global"
                ) -> list[torch.Tensor]:
    """Bool masks, True where PRUNED, with exactly round(s * N) entries pruned.

    ``scope="global"``: N is the total over all tensors, one ranking across them.
    ``scope="layer"``: each tensor gets round(s * N_i) with its own ranking.
    Lowest scores are pruned; ties go to the lower index. Scores are not modified.
    Give already-pruned entries ``-inf`` to keep masks monotone.
    """
    if scope not in ("global", "layer"):
        raise ValueError(f"prune_masks ranks globally or per layer, not {scope!r} (the ERK "
                         "scope's per-layer sparsities: adamwprune.pruning.patterns.MaskRule)")
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    if not scores:
        return []
    if scope == "layer":
        return [_prune_lowest([s], num_to_prune(sparsity, s.numel()))[0] for s in scores]
    total = sum(s.numel() for s in scores)
    return _prune_lowest(list(scores), num_to_prune(sparsity, total))
