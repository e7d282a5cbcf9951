"""What a trained (pruned) model costs to use: FLOPs per example and compression.

ShrinkBench (Blalock et al., MLSys 2020) asks every pruning result to report, next
to its accuracy, the compression ratio and the theoretical speed-up, because a
sparsity alone does not say how much smaller or cheaper a model became. Computed
once per run, at the end, from the effective weights (``module.weight``, i.e.
w * mask for a parametrized module), and stored in final.json:

* ``params_prunable_nonzero``: non-zero entries of the prunable weights;
  ``compression_ratio`` = prunable parameters / non-zero prunable parameters
  (1.0 dense, 10.0 at 90 % sparsity).
* ``flops_per_example``: forward FLOPs of one example (an image; for GPT-2 one
  sequence of GPT2_BLOCK_SIZE tokens) as ``adamwprune.report.flops.count_flops`` counts
  them (``torch.utils.flop_counter``: matrix products, convolutions and attention, 2
  FLOPs per multiply-add; element-wise work is not counted).
* ``flops_per_example_nonzero``: the same with each prunable layer's FLOPs scaled by
  the density of its weight (non-zero / numel): what a kernel that skips zero
  weights would do. ``flops_speedup`` = dense / non-zero.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from .flops import count_flops


@torch.no_grad()
def weight_density(module: nn.Module) -> float:
    """Non-zero fraction of the module's effective weight."""
    weight = module.weight
    return float(torch.count_nonzero(weight)) / weight.numel() if weight.numel() else 1.0


@torch.no_grad()
def flops_per_example(model: nn.Module, forward, batch_size: int) -> tuple[int, int]:
    """(dense, non-zero) forward FLOPs per example of ``forward()``, which runs ``model``
    on one batch of ``batch_size`` examples (``adamwprune.report.flops.count_flops``)."""
    was_training = model.training
    model.eval()
    try:
        flops = count_flops(model, forward)
    finally:
        model.train(was_training)
    return round(flops.dense / batch_size), round(flops.nonzero / batch_size)


@torch.no_grad()
def nonzero_count(modules: Iterable[nn.Module]) -> int:
    return sum(int(torch.count_nonzero(m.weight)) for m in modules)


def run_costs(task, model: nn.Module, split, cfg, device: torch.device, prunable) -> dict:
    """The cost figures of final.json for ``model`` after training (see the module docstring).

    The example batch is the first evaluation batch of ``split`` (the validation split):
    its FLOPs over its number of examples.
    """
    total = sum(m.weight.numel() for _, m, _ in prunable)
    nonzero = nonzero_count(m for _, m, _ in prunable)
    out: dict[str, Optional[float]] = {
        "params_prunable_nonzero": nonzero,
        "compression_ratio": total / nonzero if nonzero else None,
    }
    x, y = next(iter(task.eval_batches(split, cfg, 0, 1)))
    batch = (x.to(device), y.to(device))
    dense, sparse = flops_per_example(model, lambda: task.loss(model, batch), int(x.shape[0]))
    out.update(flops_per_example=dense, flops_per_example_nonzero=sparse,
               flops_speedup=dense / sparse if sparse else None)
    return out


def final_costs(trainer) -> dict:
    """run_costs for a finished engine.Trainer (rank 0 only). A model the counter cannot
    run records why instead of losing the run's final.json."""
    if not trainer.dist.is_main:
        return {}
    try:
        return run_costs(trainer.task, trainer.model, trainer.data.val, trainer.cfg, trainer.device,
                         trainer.pruner.prunable)
    except Exception as exc:  # noqa: BLE001 - reported in final.json, never silent
        return {"costs_error": f"{type(exc).__name__}: {exc}"}
