import math

import pytest
import torch

from adamwprune.models.gpt2 import GPT, GPT2_PRESETS, GPTConfig, gpt_config
from adamwprune.models.resnet import resnet18_cifar, resnet50_cifar


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_resnet18_cifar_has_11173962_parameters():
    assert n_params(resnet18_cifar()) == 11_173_962


def test_resnet50_cifar_stem_has_23705252_parameters_for_100_classes():
    model = resnet50_cifar()
    # 25,557,032 (torchvision, 1000 classes) - 9,408 (7x7 stem) + 1,728 (3x3 stem)
    # - 2,049,000 (fc 1000) + 204,900 (fc 100).
    assert n_params(model) == 23_705_252
    assert not model.needs_upsample and model.input_size == 32


def test_resnet50_imagenet_stem_asks_for_upsampled_inputs():
    model = resnet50_cifar(stem="imagenet")
    assert n_params(model) == 23_712_932
    assert model.needs_upsample and model.input_size == 224
    assert isinstance(model.stem[-1], torch.nn.MaxPool2d)


def test_resnet_rejects_unknown_stem():
    with pytest.raises(ValueError, match="cifar, imagenet"):
        resnet50_cifar(stem="tiny")


def test_resnet_init_is_kaiming_for_conv_and_identity_for_bn():
    model = resnet18_cifar()
    conv = model.layer3[0].conv2  # 256 out channels, 3x3: fan_out = 2304
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / 2304), rel=0.05)
    bn = model.layer3[0].bn2
    assert torch.equal(bn.weight, torch.ones_like(bn.weight))
    assert torch.equal(bn.bias, torch.zeros_like(bn.bias))


@pytest.mark.parametrize("build, classes", [(resnet18_cifar, 10), (resnet50_cifar, 100)])
def test_resnet_training_step_on_two_images(build, classes):
    torch.manual_seed(0)
    model = build()
    x = torch.randn(2, 3, 32, 32)
    y = torch.tensor([1, 7])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.fc.weight.detach().clone()
    logits = model(x)
    assert logits.shape == (2, classes)
    loss = torch.nn.functional.cross_entropy(logits, y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())
    assert not torch.equal(before, model.fc.weight)


def test_gpt2_preset_has_124475904_parameters_with_tied_embedding():
    with torch.device("meta"):
        model = GPT(GPT2_PRESETS["gpt2"])
    assert model.lm_head.weight is model.transformer.wte.weight
    # 124,475,904 with the vocabulary padded to 50,304; the position embedding
    # (1024 x 768) is the non-embedding difference.
    assert model.num_params(non_embedding=False) == 124_475_904
    assert model.num_params() == 124_475_904 - 1024 * 768
    logits, loss = model(torch.zeros(2, 8, dtype=torch.long, device="meta"))
    assert logits.shape == (2, 8, 50304) and loss is None


def test_gpt2_flops_per_token_is_6n_plus_attention():
    model = GPT(GPT2_PRESETS["tiny"])
    n, cfg = model.num_params(), model.config
    assert model.flops_per_token() == 6 * n + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    assert model.flops_per_token(seq_len=8) == 6 * n + 12 * 2 * 64 * 8


def test_gpt2_residual_projections_use_scaled_init():
    torch.manual_seed(0)
    model = GPT(gpt_config("mini", n_layer=8))
    c_proj = model.transformer.h[0].mlp.c_proj.weight  # 256 x 1024 samples
    c_fc = model.transformer.h[0].mlp.c_fc.weight
    assert c_proj.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.03)
    assert c_fc.std().item() == pytest.approx(0.02, rel=0.03)


def test_gpt2_tiny_is_causal():
    torch.manual_seed(0)
    model = GPT(GPT2_PRESETS["tiny"]).eval()
    idx = torch.randint(0, 50257, (1, 16))
    changed = idx.clone()
    changed[0, 10] = (idx[0, 10] + 1) % 50257
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_gpt2_tiny_training_steps_lower_the_loss():
    torch.manual_seed(0)
    model = GPT(GPT2_PRESETS["tiny"])
    idx = torch.randint(0, 50257, (4, 33))
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # At init the prediction is close to uniform over the padded vocabulary.
    assert losses[0] == pytest.approx(math.log(50304), abs=0.1)
    assert losses[-1] < losses[0] - 1.0
    assert model.lm_head.weight is model.transformer.wte.weight


def test_gpt2_rejects_sequences_longer_than_block_size():
    model = GPT(GPT2_PRESETS["tiny"])
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_gpt_config_validation_and_presets():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="valid presets: gpt2, gpt2-medium, small, mini, baby, tiny"):
        gpt_config("gpt3")
    assert gpt_config("gpt2", block_size=256).block_size == 256
    assert all(c.vocab_size == 50304 for c in GPT2_PRESETS.values())


def test_gpt2_without_bias_drops_only_the_bias_tensors_and_keeps_every_name():
    with_bias = dict(GPT(gpt_config("baby", vocab_size=65)).named_parameters())
    without = dict(GPT(gpt_config("baby", vocab_size=65, bias=False)).named_parameters())
    assert set(without) == {n for n in with_bias if not n.endswith(".bias")}
    assert all(without[n].shape == with_bias[n].shape for n in without)
    # nanoGPT's baby GPT (4 x 4 x 128, block 64, 65 characters, no biases): 804,096 parameters
    assert sum(p.numel() for p in without.values()) == 804_096
