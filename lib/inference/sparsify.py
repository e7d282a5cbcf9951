"""Which layers of a pruned model to compute sparse on the CPU, and the swap itself.

    from adamwprune.inference import sparsify
    choices = sparsify(model.eval())                          # Linear layers by sparsity
    choices = sparsify(model.eval(), lambda: model(x))        # every layer by measurement

Without an example forward, each (untied) Linear of at least ``min_sparsity`` zeros
becomes a SparseLinear and convolutions stay dense. With one, each Linear and Conv2d
of at least ``min_sparsity`` is timed on the input it really receives in that forward,
dense against sparse (median of ``repeats`` after a warm-up), and swapped only where
the sparse product was faster: so a convolution goes sparse only where a measured
sparse path beats the dense one (on this project's CPU mostly the deep layers at
batch 1; `make bench` lists how many were swapped). A head tied to an embedding stays
dense.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from .sparse_linear import SparseConv2d, SparseLinear

# Measured with `make bench` (sparse_inference_speedup) on this project's 2-core CPU:
# on GPT-2's Linear shapes the kernel beats dense at 70 % and above at 1 and 512 tokens.
DEFAULT_MIN_SPARSITY = 0.7


@dataclass
class LayerChoice:
    name: str
    kind: str
    sparsity: float
    sparse: bool
    reason: str
    dense_ms: Optional[float] = None
    sparse_ms: Optional[float] = None

    def to_dict(self) -> dict:
        return asdict(self)


def _tied(model: nn.Module) -> set[int]:
    """Weights that more than one module uses (a head tied to an embedding)."""
    count: dict[int, int] = {}
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor):
            count[id(w)] = count.get(id(w), 0) + 1
    return {k for k, n in count.items() if n > 1}


def _candidates(model: nn.Module):
    tied = _tied(model)
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            conv = type(child) is nn.Conv2d and child.groups == 1 and child.padding_mode == "zeros" \
                and not isinstance(child.padding, str)
            if (type(child) is nn.Linear or conv) and id(child.weight) not in tied:
                name = f"{parent_name}.{child_name}" if parent_name else child_name
                yield name, parent, child_name, child


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _record_inputs(model: nn.Module, modules: list[nn.Module], forward: Callable[[], Any]) -> dict:
    seen: dict[int, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.setdefault(id(mod), args[0]))
             for m in modules]
    try:
        forward()
    finally:
        for h in hooks:
            h.remove()
    return seen


@torch.no_grad()
def sparsify(model: nn.Module, example: Optional[Callable[[], Any]] = None,
             min_sparsity: float = DEFAULT_MIN_SPARSITY, use_kernel: Optional[bool] = None,
             repeats: int = 5) -> list[LayerChoice]:
    """Swap sparse enough layers of ``model`` (in place) for sparse ones; returns the choices."""
    found = list(_candidates(model))
    inputs = _record_inputs(model, [c for *_, c in found], example) if example else {}
    choices = []
    for name, parent, child_name, child in found:
        kind = type(child).__name__
        numel = child.weight.numel()
        zeros = numel - int(torch.count_nonzero(child.weight))
        sparsity = zeros / numel
        if zeros < round(min_sparsity * numel):  # counts: a layer pruned to 70 % is >= 70 %
            choices.append(LayerChoice(name, kind, sparsity, False, f"below {min_sparsity:.0%} zeros"))
            continue
        make = SparseLinear if kind == "Linear" else SparseConv2d
        if id(child) not in inputs:
            sparse = kind == "Linear"
            reason = "by sparsity" if sparse else "convolutions go sparse only where measured faster"
            choices.append(LayerChoice(name, kind, sparsity, sparse, reason))
            if sparse:
                setattr(parent, child_name, make(child, use_kernel))
            continue
        x, replacement = inputs[id(child)], make(child, use_kernel)
        dense_ms = _median_ms(lambda: child(x), repeats)
        sparse_ms = _median_ms(lambda: replacement(x), repeats)
        faster = sparse_ms < dense_ms
        choices.append(LayerChoice(name, kind, sparsity, faster, "measured", dense_ms, sparse_ms))
        if faster:
            setattr(parent, child_name, replacement)
    return choices
