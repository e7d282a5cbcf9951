"""FLOPs per forward, dense and non-zero, against hand counts."""
import torch

from adamwprune.report.flops import count_flops
from adamwprune.models.gpt2 import GPT, gpt_config
from adamwprune.models.lenet5 import LeNet5

# LeNet-5 on one 32x32 image, 2 FLOPs per multiply-add:
# conv1 6x28x28 outputs x 1*5*5, conv2 16x10x10 x 6*5*5, fc 400->120->84->10
LENET_LAYERS = {"features.0.weight": 2 * 6 * 28 * 28 * 25, "features.3.weight": 2 * 16 * 10 * 10 * 150,
                "classifier.1.weight": 2 * 400 * 120, "classifier.3.weight": 2 * 120 * 84,
                "classifier.5.weight": 2 * 84 * 10}


def test_lenet5_dense_flops_match_the_hand_count():
    model = LeNet5()
    flops = count_flops(model, lambda: model(torch.zeros(1, 1, 32, 32)))
    assert flops.dense == flops.nonzero == sum(LENET_LAYERS.values()) == 833_040
    assert {k: v["dense"] for k, v in flops.layers.items()} == LENET_LAYERS


def test_nonzero_flops_leave_out_the_zero_weights_of_each_layer():
    model = LeNet5()
    with torch.no_grad():
        model.features[0].weight[:3] = 0          # half of conv1's 6 filters
        model.classifier[1].weight[:, :100] = 0   # a quarter of fc1's inputs
    flops = count_flops(model, lambda: model(torch.zeros(1, 1, 32, 32)))
    assert flops.layers["features.0.weight"]["nonzero"] == LENET_LAYERS["features.0.weight"] // 2
    assert flops.layers["classifier.1.weight"]["nonzero"] == 2 * 300 * 120
    saved = LENET_LAYERS["features.0.weight"] // 2 + 2 * 100 * 120
    assert flops.dense - flops.nonzero == saved


def test_gpt_flops_count_attention_and_the_dense_tied_head():
    cfg = gpt_config("tiny", vocab_size=96)
    model = GPT(cfg).eval()
    t, c, L = 16, cfg.n_embd, cfg.n_layer
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.zero_()
    flops = count_flops(model, lambda: model(torch.zeros(1, t, dtype=torch.long)))
    linear = 2 * t * 12 * c * c * L       # qkv 3C^2, proj C^2, fc 4C^2, proj 4C^2
    attention = 2 * 2 * t * t * c * L     # QK^T and AV, as torch's counter counts them
    head = 2 * t * c * cfg.vocab_size     # tied to the embedding: never pruned
    assert flops.dense == linear + attention + head
    assert flops.dense - flops.nonzero == 2 * t * 4 * c * c
    assert "lm_head.weight" not in flops.layers
