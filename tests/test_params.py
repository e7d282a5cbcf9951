"""Prunable parameters and optimizer parameter groups."""
import torch
from torch import nn
from torch.nn.utils import parametrize

from adamwprune.params import param_groups, prunable_parameters


class TiedLM(nn.Module):
    """Embedding + conv + linear + norm + a head tied to the embedding."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(11, 6)
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(6, 6)
        self.ln = nn.LayerNorm(6)
        self.lm_head = nn.Linear(6, 11, bias=False)
        self.lm_head.weight = self.wte.weight


class Double(nn.Module):
    def forward(self, w):
        return 2 * w


def test_prunable_are_conv_and_linear_weights_without_tied_head():
    model = TiedLM()
    found = prunable_parameters(model)
    assert [name for name, _, _ in found] == ["conv.weight", "fc.weight"]
    assert found[0][1] is model.conv and found[0][2] is model.conv.weight
    assert found[1][2] is model.fc.weight


def test_prune_embeddings_includes_the_tied_table_once():
    model = TiedLM()
    found = prunable_parameters(model, prune_embeddings=True)
    assert [name for name, _, _ in found] == ["wte.weight", "conv.weight", "fc.weight"]
    assert found[0][2] is model.wte.weight


def test_untied_linear_head_is_prunable():
    model = TiedLM()
    model.lm_head.weight = nn.Parameter(torch.randn(11, 6))
    names = [name for name, _, _ in prunable_parameters(model)]
    assert names == ["conv.weight", "fc.weight", "lm_head.weight"]


def test_parametrized_weight_yields_the_original_parameter():
    model = TiedLM()
    original = model.fc.weight
    parametrize.register_parametrization(model.fc, "weight", Double())
    found = dict((name, p) for name, _, p in prunable_parameters(model))
    assert found["fc.weight"] is model.fc.parametrizations.weight.original
    assert found["fc.weight"] is original


def test_param_groups_split_decay_prune_no_decay():
    model = TiedLM()
    groups = param_groups(model, 0.1)
    assert [(g["weight_decay"], g["prune"]) for g in groups] == [(0.1, True), (0.1, False), (0.0, False)]
    assert groups[0]["param_names"] == ["conv.weight", "fc.weight"]
    assert groups[1]["param_names"] == ["wte.weight"]  # tied head listed once, with the table
    assert groups[2]["param_names"] == ["conv.bias", "fc.bias", "ln.weight", "ln.bias"]
    for g in groups:
        assert [p.dim() >= 2 for p in g["params"]] == [g["weight_decay"] > 0] * len(g["params"])
    all_params = [p for g in groups for p in g["params"]]
    assert len(all_params) == len({id(p) for p in all_params}) == len(list(model.parameters()))


def test_param_groups_with_prune_embeddings_moves_table_to_prune_group():
    groups = param_groups(TiedLM(), 0.1, prune_embeddings=True)
    assert groups[0]["param_names"] == ["wte.weight", "conv.weight", "fc.weight"]
    assert [g["prune"] for g in groups] == [True, False]  # decay-no-prune group is empty


def test_param_groups_omit_frozen_parameters_and_empty_groups():
    model = nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    groups = param_groups(model, 0.0)
    assert len(groups) == 1 and groups[0]["param_names"] == ["weight"]


def test_torch_optimizers_accept_groups_and_keep_names_and_flags():
    model = TiedLM()
    for cls in (torch.optim.SGD, torch.optim.AdamW, torch.optim.Adam):
        opt = cls(param_groups(model, 0.05), lr=0.1)
        saved = opt.state_dict()["param_groups"]
        assert [g["prune"] for g in saved] == [True, False, False]
        assert saved[0]["param_names"] == ["conv.weight", "fc.weight"]
        assert [g["weight_decay"] for g in saved] == [0.05, 0.05, 0.0]
