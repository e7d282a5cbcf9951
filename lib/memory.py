"""Per-component byte accounting: parameters, gradients, optimizer state, pruning buffers.

Counts come from the tensors themselves (numel * element_size), not from
constants. The measured peak (allocator, NVML, RSS) is ``adamwprune.monitor``'s.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Optional

import torch
from torch import nn


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def optimizer_state_bytes(optimizer: Optional[torch.optim.Optimizer]) -> dict[str, int]:
    """Bytes of optimizer state per key (``exp_avg``, ``exp_avg_sq``, ``step``, ...),
    summed over parameters; tensors only (scalar ``step`` tensors included)."""
    totals: dict[str, int] = defaultdict(int)
    if optimizer is None:
        return {}
    for param_state in optimizer.state.values():
        if not isinstance(param_state, dict):
            continue
        for key, value in param_state.items():
            if torch.is_tensor(value):
                totals[str(key)] += _nbytes(value)
    return dict(totals)


def _entry(nbytes: int, n_params: int) -> dict[str, float]:
    return {"bytes": int(nbytes), "bytes_per_param": nbytes / n_params if n_params else 0.0}


def pruning_buffer_bytes(optimizer: Optional[torch.optim.Optimizer], pruner: Any) -> dict[str, int]:
    """The pruner's buffers and the optimizer's own pruning buffers, by component.

    Merged by component name: a pruner that reports its optimizer's buffers
    (StatePruner) under the same key is counted once.
    """
    buffers: dict[str, int] = {}
    report = getattr(optimizer, "pruning_buffer_bytes", None)
    if callable(report):
        buffers.update(report())
    if pruner is not None:
        buffers.update(pruner.memory_bytes())
    return buffers


def memory_report(model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                  pruner: Any) -> dict[str, Any]:
    """Bytes and bytes/parameter per component, as a JSON-able dict.

    ``bytes_per_param`` divides by the model's total parameter count (tied
    tensors counted once). Gradients are counted as if allocated for every
    parameter that requires grad, whether or not ``.grad`` exists right now.
    """
    params = list(model.parameters())  # deduplicated by torch
    n_params = sum(p.numel() for p in params)
    param_bytes = sum(_nbytes(p) for p in params)
    grad_bytes = sum(_nbytes(p) for p in params if p.requires_grad)
    state = optimizer_state_bytes(optimizer)
    buffers = pruning_buffer_bytes(optimizer, pruner)
    state_total = sum(state.values())
    buffer_total = sum(buffers.values())
    return {
        "parameter_count": n_params,
        "parameters": _entry(param_bytes, n_params),
        "gradients": dict(_entry(grad_bytes, n_params),
                          counted_as="numel * element_size of every parameter that "
                                     "requires grad, as if allocated"),
        "optimizer_state": dict(_entry(state_total, n_params),
                                per_key={k: _entry(v, n_params) for k, v in state.items()}),
        "pruning_buffers": dict(_entry(buffer_total, n_params),
                                per_component={k: _entry(v, n_params) for k, v in buffers.items()}),
        "total": _entry(param_bytes + grad_bytes + state_total + buffer_total, n_params),
    }
