"""Gradient-norm clipping that sees the masked gradient, for every optimizer.

A pruner that masks gradients during backward (magnitude: a gradient hook;
movement: the mask in the forward pass) hands torch's ``clip_grad_norm_`` an
already masked gradient. AdamWPrune masks inside its own ``step()``; clipped
before that, its surviving gradients would be scaled by a norm that includes
the pruned entries' gradients, and clipped harder than a baseline's
(ALGORITHMS.md, "Fair comparison rules"). :func:`clip_grad_norm_` asks the
optimizer to clip when it knows how (``optimizer.clip_grad_norm_``, which masks
first) and otherwise clips the optimizer's parameters as torch does.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def clip_grad_norm_(optimizer: torch.optim.Optimizer, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False) -> torch.Tensor:
    """Clip the joint gradient norm of ``optimizer``'s parameters to ``max_norm``, on
    the gradient as the optimizer will use it (pruned entries masked); returns the
    total norm, as ``torch.nn.utils.clip_grad_norm_``. Call it between
    ``loss.backward()`` and ``optimizer.step()``."""
    own = getattr(optimizer, "clip_grad_norm_", None)
    if callable(own):
        return own(max_norm, norm_type=norm_type, error_if_nonfinite=error_if_nonfinite)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite)
