"""Per-component byte accounting, counted from the tensors."""
import json

import pytest
import torch
from torch import nn

from adamwprune.memory import memory_report, optimizer_state_bytes
from adamwprune.optim.adamwprune import AdamWPrune
from adamwprune.params import param_groups
from adamwprune.pruning import MagnitudePruner, MovementPruner, NoPruner, StatePruner


def model_and_step(make_optimizer, dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2, bias=False)).to(dtype)  # 16 + 8 = 24
    optimizer = make_optimizer(model)
    model(torch.randn(5, 3, dtype=dtype)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_adamw_state_bytes_per_key_hand_computed():
    _, optimizer = model_and_step(lambda m: torch.optim.AdamW(m.parameters()))
    # 3 tensors of 12 + 4 + 8 fp32 entries; one fp32 scalar `step` per tensor.
    assert optimizer_state_bytes(optimizer) == {"step": 3 * 4, "exp_avg": 24 * 4,
                                                "exp_avg_sq": 24 * 4}


def test_amsgrad_and_momentum_state_keys_are_counted():
    _, adamw = model_and_step(lambda m: torch.optim.AdamW(m.parameters(), amsgrad=True))
    assert optimizer_state_bytes(adamw)["max_exp_avg_sq"] == 24 * 4
    _, sgd = model_and_step(lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9))
    assert optimizer_state_bytes(sgd) == {"momentum_buffer": 24 * 4}
    assert optimizer_state_bytes(None) == {}


def test_fp32_adamw_holds_sixteen_bytes_per_param_plus_step_counters():
    model, optimizer = model_and_step(lambda m: torch.optim.AdamW(m.parameters()))
    report = memory_report(model, optimizer, NoPruner(model))
    assert report["parameter_count"] == 24
    assert report["parameters"] == {"bytes": 96, "bytes_per_param": 4.0}
    assert report["gradients"]["bytes"] == 96 and "as if allocated" in report["gradients"]["counted_as"]
    assert report["optimizer_state"]["bytes"] == 96 * 2 + 12
    assert report["optimizer_state"]["per_key"]["exp_avg"] == {"bytes": 96, "bytes_per_param": 4.0}
    assert report["pruning_buffers"] == {"bytes": 0, "bytes_per_param": 0.0, "per_component": {}}
    assert report["total"]["bytes"] == 96 * 4 + 12
    assert report["total"]["bytes_per_param"] == pytest.approx(16.5)
    json.dumps(report)


def test_gradients_count_only_parameters_that_require_grad():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2, bias=False))
    model[0].requires_grad_(False)
    report = memory_report(model, None, None)
    assert report["gradients"]["bytes"] == 8 * 4
    assert report["optimizer_state"]["bytes"] == 0


def test_pruning_buffers_of_magnitude_and_movement_pruners():
    model, optimizer = model_and_step(lambda m: torch.optim.AdamW(m.parameters()))
    report = memory_report(model, optimizer, MagnitudePruner(model, 0.5, 0, 10, 1))
    assert report["pruning_buffers"]["per_component"]["masks"]["bytes"] == 20  # bool masks
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2, bias=False))
    pruner = MovementPruner(model, 0.5, 0, 10, 1)
    optimizer = torch.optim.AdamW(param_groups(model, 0.0))
    report = memory_report(model, optimizer, pruner)
    assert report["parameter_count"] == 24  # scores and masks are buffers, not parameters
    assert report["pruning_buffers"]["bytes"] == 20 * 4 + 20
    assert report["pruning_buffers"]["bytes_per_param"] == pytest.approx(100 / 24)
    json.dumps(report)


class BitMaskOptimizer(AdamWPrune):
    """An AdamWPrune that reports a bit-packed mask, to test the merge."""

    def pruning_buffer_bytes(self):
        return {"mask_bits": 3}


def test_adamwprune_buffers_are_counted_once_through_state_pruner():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2, bias=False))
    optimizer = AdamWPrune(param_groups(model, 0.0), target_sparsity=0.5, end_step=10)
    report = memory_report(model, optimizer, StatePruner(model, 0.5, 0, 10, 100, optimizer=optimizer))
    assert report["pruning_buffers"]["bytes"] == 0
    optimizer = BitMaskOptimizer(param_groups(model, 0.0), target_sparsity=0.5, end_step=10)
    report = memory_report(model, optimizer, StatePruner(model, 0.5, 0, 10, 100, optimizer=optimizer))
    assert report["pruning_buffers"]["per_component"] == {"mask_bits": {"bytes": 3, "bytes_per_param": 3 / 24}}


def test_half_precision_parameters_are_counted_at_their_size():
    model, optimizer = model_and_step(lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
                                      dtype=torch.bfloat16)
    report = memory_report(model, optimizer, None)
    assert report["parameters"]["bytes_per_param"] == 2.0
    assert report["optimizer_state"]["bytes"] == 0
