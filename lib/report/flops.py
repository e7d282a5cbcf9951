"""Forward FLOPs of a model, dense and non-zero (the two counts ShrinkBench asks for).

A multiply-add is 2 FLOPs. The dense count is ``torch.utils.flop_counter``'s over one
forward (matrix products, convolutions, attention, whose causal mask is not
subtracted); element-wise work (norms, activations, softmax) is not counted, as there. The non-zero count is the same
forward with the multiply-adds of zero weights left out of the prunable layers
(``adamwprune.params.prunable_parameters``): a layer whose weight has density d does
d of its dense FLOPs, because each weight entry takes part in the same number of
multiply-adds (one per token for a Linear, one per output position for a Conv2d).

    from adamwprune.report.flops import count_flops
    flops = count_flops(model, lambda: model(x))            # x: one example
    flops.dense, flops.nonzero, flops.layers["fc.weight"]

``example_flops`` counts one example of a task's evaluation split, which is what
``export.json`` reports (and what a run summary can store per example).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ..params import prunable_parameters


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one forward: ``dense``, ``nonzero``, and per prunable layer
    ``layers[name] = {"dense": ..., "nonzero": ...}`` (``name`` as in a state_dict)."""

    dense: int
    nonzero: int
    layers: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"dense": self.dense, "nonzero": self.nonzero, "layers": self.layers}


def _layer_flops(module: nn.Module, output: torch.Tensor) -> int:
    """Dense FLOPs of a Linear or Conv2d forward that produced ``output``."""
    if isinstance(module, nn.Linear):
        return 2 * module.in_features * output.numel()
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return 2 * (module.in_channels // module.groups) * kh * kw * output.numel()
    return 0  # a pruned embedding: a lookup, no multiply-adds


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


# torch's counter knows the CUDA attention kernels but not the CPU one that
# scaled_dot_product_attention dispatches to; counted with the same formula.
_EXTRA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


@torch.no_grad()
def count_flops(model: nn.Module, forward: Callable[[], Any],
                prune_embeddings: bool = False) -> FlopCount:
    """Dense and non-zero FLOPs of ``forward()`` (which runs ``model`` once)."""
    layers: dict[str, dict[str, int]] = {}
    handles = []
    for name, module, _ in prunable_parameters(model, prune_embeddings):
        def hook(mod, _inputs, output, name=name):
            weight = mod.weight
            dense = _layer_flops(mod, output)
            nonzero = dense * int(torch.count_nonzero(weight)) // max(1, weight.numel())
            entry = layers.setdefault(name, {"dense": 0, "nonzero": 0})
            entry["dense"] += dense
            entry["nonzero"] += nonzero
        handles.append(module.register_forward_hook(hook))
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA)
    try:
        with counter:
            forward()
    finally:
        for h in handles:
            h.remove()
    dense = int(counter.get_total_flops())
    saved = sum(v["dense"] - v["nonzero"] for v in layers.values())
    return FlopCount(dense=dense, nonzero=dense - saved, layers=layers)


def example_flops(task, model: nn.Module, split, cfg, prune_embeddings: bool = False) -> FlopCount:
    """FLOPs of one example (the first of ``split``'s evaluation batches) through the
    task's own evaluation forward (so e.g. an upsampling stem is counted as trained)."""
    xb, yb = next(iter(task.eval_batches(split, cfg, 0, 1)))
    device = next(model.parameters()).device
    batch = (xb[:1].to(device), yb[:1].to(device))
    was_training = model.training
    model.eval()
    try:
        return count_flops(model, lambda: task.eval_sums(model, batch), prune_embeddings)
    finally:
        model.train(was_training)
