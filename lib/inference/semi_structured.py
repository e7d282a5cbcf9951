"""2:4 semi-structured sparsity on NVIDIA GPUs of compute capability >= 8.0.

torch's ``to_sparse_semi_structured`` packs a 2:4 weight (half the values plus 2-bit
indices) for the sparse tensor cores (cuSPARSELt, else CUTLASS); ``F.linear`` with
such a weight runs the sparse GEMM. Weights must be fp16/bf16 on CUDA and follow 2:4
along the input dimension (the pattern of ``adamwprune.export.compressed``).
Without such a GPU :func:`available` says why and nothing here runs.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

MIN_CAPABILITY = (8, 0)


def available(device: Optional[torch.device] = None) -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_CAPABILITY:
        return False, f"compute capability {cap[0]}.{cap[1]} < 8.0"
    return True, torch.cuda.get_device_name(device)


def to_two_four(weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |w| of every 4 consecutive inputs (ties by index)."""
    groups = weight.reshape(-1, 4)
    keep = torch.topk(groups.abs(), 2, dim=1, sorted=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, keep, True)
    return (groups * mask).reshape(weight.shape)


@torch.no_grad()
def semi_structured_linears(model: nn.Module) -> int:
    """Replace, in place, the weight of every (untied) 2:4 Linear on a >= 8.0 GPU by its
    semi-structured form; returns how many were replaced."""
    from torch.sparse import to_sparse_semi_structured

    from ..export.compressed import follows_two_four, two_four_eligible
    from .sparsify import _candidates

    ok, why = available()
    if not ok:
        raise RuntimeError(f"2:4 semi-structured kernels need an NVIDIA GPU of compute capability "
                           f">= 8.0 ({why})")
    count = 0
    for _, _, _, child in _candidates(model):
        w = child.weight
        if type(child) is nn.Linear and two_four_eligible(w) and follows_two_four(w):
            child.weight = nn.Parameter(to_sparse_semi_structured(w.detach()), requires_grad=False)
            count += 1
    return count
