"""Which parameters are pruned, and how parameters are grouped for an optimizer.

Prunable tensors are the weights of ``nn.Conv2d`` and ``nn.Linear``. Embedding
tables, and a ``Linear`` whose weight *is* an embedding's weight (a tied
``lm_head``), are left out unless ``prune_embeddings`` is set: pruning a tied
head prunes the embedding table (ALGORITHMS.md, "Selecting what to prune").
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

_PRUNABLE_TYPES = (nn.Conv2d, nn.Linear)


def weight_parameter(module: nn.Module) -> torch.Tensor:
    """The trained tensor behind ``module.weight``.

    For a module whose weight is parametrized (``torch.nn.utils.parametrize``),
    ``module.weight`` is computed on every access; the parameter the optimizer
    updates is ``module.parametrizations.weight.original``.
    """
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def prunable_parameters(model: nn.Module, prune_embeddings: bool = False
                        ) -> list[tuple[str, nn.Module, torch.Tensor]]:
    """``(name, module, param)`` for every prunable weight, in module order.

    ``name`` is ``"<module path>.weight"`` (the key a plain model's state_dict
    uses, also when the weight is parametrized); ``param`` is the trained tensor
    (see :func:`weight_parameter`). A tensor shared by several modules appears once.
    """
    embedding_weights = {id(weight_parameter(m)) for m in model.modules()
                         if isinstance(m, nn.Embedding)}
    found: list[tuple[str, nn.Module, torch.Tensor]] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        if isinstance(module, _PRUNABLE_TYPES):
            param = weight_parameter(module)
            if id(param) in embedding_weights and not prune_embeddings:
                continue
        elif isinstance(module, nn.Embedding) and prune_embeddings:
            param = weight_parameter(module)
        else:
            continue
        if id(param) in seen:
            continue
        seen.add(id(param))
        name = f"{module_name}.weight" if module_name else "weight"
        found.append((name, module, param))
    return found


def param_groups(model: nn.Module, weight_decay: float, prune_embeddings: bool = False
                 ) -> list[dict]:
    """Optimizer parameter groups: decay + prune, decay only, no decay.

    Decay applies to tensors with ``dim >= 2`` and ``weight_decay`` is set on that
    group only; biases and normalisation parameters get 0. Prunable tensors
    (:func:`prunable_parameters`) sit in the group marked ``"prune": True``, the
    flag AdamWPrune reads; torch's optimizers keep the extra key untouched.
    Each group also carries ``"param_names"``, torch's own key for parameter
    names (kept in ``state_dict()``). Tied parameters appear once; parameters
    that do not require grad are left out; empty groups are omitted.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    prunable = {id(p) for _, _, p in prunable_parameters(model, prune_embeddings)}
    decay_prune = {"params": [], "param_names": [], "weight_decay": weight_decay, "prune": True}
    decay = {"params": [], "param_names": [], "weight_decay": weight_decay, "prune": False}
    no_decay = {"params": [], "param_names": [], "weight_decay": 0.0, "prune": False}
    # named_parameters() removes duplicates, so a tied weight is listed once.
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in prunable:
            group = decay_prune
        elif param.dim() >= 2:
            group = decay
        else:
            group = no_decay
        group["params"].append(param)
        group["param_names"].append(name)
    return [g for g in (decay_prune, decay, no_decay) if g["params"]]
