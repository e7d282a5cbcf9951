"""FLOPs per example (dense and non-zero) and the compression ratio in final.json."""
import pytest
import torch
from torch import nn

from adamwprune.config import kconfig as C
from adamwprune.cli import load_task
from adamwprune.report.costs import flops_per_example, weight_density
from adamwprune.engine.trainer import Trainer
from helpers import Tiny

# LeNet-5 forward, 2 FLOPs per multiply-add, counted by hand from the layer shapes:
# conv1 6@28x28 x (1x5x5), conv2 16@10x10 x (6x5x5), fc 400->120, 120->84, 84->10
LENET5_LAYER_FLOPS = [2 * 6 * 28 * 28 * 25, 2 * 16 * 10 * 10 * 150, 2 * 400 * 120, 2 * 120 * 84, 2 * 84 * 10]


def test_flops_of_the_tiny_net_are_twice_its_multiply_adds_per_example():
    net, x = Tiny(), torch.randn(3, 1, 6, 6)
    dense, nonzero = flops_per_example(net, lambda: net(x), batch_size=3)
    assert dense == nonzero == 2 * (4 * 4 * 4 * 9) + 2 * 64 * 5


def test_non_zero_flops_scale_each_layer_by_its_weight_density():
    net, x = Tiny(), torch.randn(2, 1, 6, 6)
    with torch.no_grad():
        net.fc.weight.view(-1)[:80] = 0.0    # 80 of 320: density 0.75
        net.conv.weight.view(-1)[:9] = 0.0   # 9 of 36: density 0.75
    assert weight_density(net.fc) == weight_density(net.conv) == 0.75
    dense, nonzero = flops_per_example(net, lambda: net(x), batch_size=2)
    assert nonzero == round(0.75 * dense)
    assert net.training  # left as it was


def test_final_json_holds_compression_and_flops_of_the_pruned_model(tmp_path):
    cfg, _, _ = C.load(None, {"MODEL": "lenet5", "DATASET": "synthetic", "DATA_SYNTHETIC_SIZE": "64",
                              "BATCH_SIZE": "16", "DEVICE": "cpu", "MAX_ITERS": "12", "TRAIN_EVAL_INTERVAL": "12",
                              "OPTIMIZER": "adamw", "PRUNING": "magnitude", "PRUNING_TARGET_SPARSITY": "0.9",
                              "PRUNING_RAMP_END": "0.5", "RUN_MONITOR_INTERVAL": "0.1"})
    trainer = Trainer(load_task("lenet5"), cfg, tmp_path / "run", config_text="")
    final = trainer.fit()
    assert final["flops_per_example"] == sum(LENET5_LAYER_FLOPS)
    kept = round(0.1 * 61_470)  # exact top-k: round(s * N) pruned
    assert final["params_prunable_nonzero"] == kept
    assert final["compression_ratio"] == pytest.approx(61_470 / kept)
    layers = [m for m in trainer.model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    expected = sum(f * float((m.weight != 0).sum()) / m.weight.numel() for f, m in zip(LENET5_LAYER_FLOPS, layers))
    assert final["flops_per_example_nonzero"] == round(expected)
    assert final["flops_speedup"] > 1.0 and "costs_error" not in final


def test_a_dense_gpt2_counts_its_matmuls_and_attention_per_sequence(tmp_path):
    cfg, _, _ = C.load(None, {"MODEL": "gpt2", "DATASET": "synthetic", "GPT2_SIZE": "tiny", "GPT2_BLOCK_SIZE": "16",
                              "BATCH_SIZE": "4", "DEVICE": "cpu", "MAX_ITERS": "2", "TRAIN_EVAL_BATCHES": "1",
                              "OPTIMIZER": "adamw", "PRUNING": "none", "RUN_MONITOR_INTERVAL": "0.1"})
    final = Trainer(load_task("gpt2"), cfg, tmp_path / "run", config_text="").fit()
    # per token: 2 x (weights of the 2 blocks' Linears + the tied head); 16 tokens per example
    per_token = 2 * (2 * (64 * 192 + 64 * 64 + 2 * 64 * 256) + 64 * 50304)
    # attention, as torch's counter counts it (the causal mask is not subtracted):
    # QK^T and AV, 2 x T x T x C multiply-adds each per layer, 2 FLOPs each
    attention = 2 * (2 * 2 * 16 * 16 * 64)
    assert final["flops_per_example"] == final["flops_per_example_nonzero"] == 16 * per_token + attention
    assert final["compression_ratio"] == 1.0
