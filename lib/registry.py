"""Registries of optimizers and pruners: literal tables of frozen records.

The engine picks entries by the name Kconfig chose and never branches on a
method's name; what differs between methods is in the record (capabilities) or
in the object the record builds. Tests are parametrized over these tables, so a
new entry is tested the moment it is registered.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from .optim.importance import IMPORTANCE as _IMPORTANCE
from .pruning.patterns import DISTRIBUTIONS as _DISTRIBUTIONS
from .pruning.schedule import PruneSchedule  # noqa: F401  (the one schedule record; imported from here too)


# The models: each is a folder <name>/ with train.py (its TASK), Kconfig and defconfigs.
MODELS = ("lenet5", "resnet18", "resnet50", "gpt2")
# AdamWPrune's importance scores (adamwprune.optim.importance.IMPORTANCE).
VARIANTS = tuple(_IMPORTANCE)
# Pattern kinds of a matrix axis: "nm" stands for the N:M of PRUNING_NM_N/M.
PATTERN_KINDS = ("unstructured", "nm")
DISTRIBUTIONS = _DISTRIBUTIONS  # layer densities of dynamic sparse training


@dataclass(frozen=True)
class OptimInfo:
    name: str
    build: Callable[[list, Any, PruneSchedule], torch.optim.Optimizer]
    summary: str
    # True when the optimizer prunes by itself (paired with the "state" pruner or none).
    prunes_itself: bool = False
    # Weight decay added to the gradient (L2), which Adam normalises: under a pruner
    # that keeps dense weights under its mask (movement) they collapse towards 0.
    coupled_decay: bool = False


@dataclass(frozen=True)
class PrunerInfo:
    name: str
    build: Callable[[nn.Module, torch.optim.Optimizer, PruneSchedule], Any]
    summary: str
    # True when the optimizer itself prunes (AdamWPrune): it receives the schedule.
    optimizer_prunes: bool = False
    # Optimizers this pruner works with (None = any).
    requires_optimizer: Optional[tuple[str, ...]] = None
    # False for the null pruner (dense training).
    prunes: bool = True
    # The pattern kinds (PATTERN_KINDS) its masks can take; () for dense training.
    patterns: tuple[str, ...] = ("unstructured",)
    # Dynamic sparse training: sparse from step 0, masks change at constant sparsity,
    # layer densities from a distribution (PruneSchedule.distribution).
    dynamic: bool = False
    # Ranks by AdamWPrune's importance score: its cells are split by variant.
    uses_variant: bool = False
    # Follows the shared sparsity ramp (PRUNING_RAMP_START/END); SR-STE applies its
    # N:M mask from the first forward instead.
    ramps: bool = True
    # For a pruner of AdamWPrune's: the pruner a base optimizer B uses for the same kind
    # of pruning (AdamWPrune bitter1 over B *is* B + magnitude); figures and the fairness
    # tests pair the two.
    baseline: Optional[str] = None


def _fast(groups: list) -> dict:
    """Fused kernels where torch has them for these tensors (the fair, fastest AdamW)."""
    params = [p for g in groups for p in g["params"]]
    ok = all(p.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) for p in params)
    return {"fused": True} if ok and params else {}


def _adam_kwargs(cfg) -> dict:
    return dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)


def _sgd(groups, cfg, _schedule):
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay, **_fast(groups))


def _adam(groups, cfg, _schedule):
    return torch.optim.Adam(groups, amsgrad=cfg.amsgrad, **_adam_kwargs(cfg), **_fast(groups))


def _adamw(groups, cfg, _schedule):
    return torch.optim.AdamW(groups, amsgrad=cfg.amsgrad, **_adam_kwargs(cfg), **_fast(groups))


def _adamwadv(groups, cfg, _schedule):
    from .optim.adamwadv import AdamWAdv

    # Clipping is the engine's (TRAIN_GRAD_CLIP defaults to 1.0 for AdamWAdv).
    return AdamWAdv(groups, amsgrad=cfg.amsgrad, max_grad_norm=0.0, **_adam_kwargs(cfg))


def _spam_kwargs(cfg) -> dict:
    return dict(theta=cfg.spam_theta, reset_interval=cfg.spam_reset_interval,
                warmup_steps=cfg.spam_warmup_steps, clip_delay=cfg.spam_clip_delay)


def _adamwspam(groups, cfg, _schedule):
    from .optim.spam import AdamWSpam

    return AdamWSpam(groups, **_adam_kwargs(cfg), **_spam_kwargs(cfg))


# Bases whose stand-alone entry above runs torch's fused kernel: AdamWPrune's plain
# path uses the same kernel on the CPU, so that "AdamWPrune over B" and "B + a pruner"
# differ only by the pruning (bitter1 and magnitude train to the same weights). On
# CUDA the base stays unfused: AdamWPrune's own GPU kernels take its steps there.
_FUSED_BASES = ("adam", "adamw")


def _adamwprune(groups, cfg, schedule: PruneSchedule):
    from .optim.adamwprune import AdamWPrune

    base_kwargs: dict = {}
    on_cpu = all(p.device.type == "cpu" for g in groups for p in g["params"])
    if cfg.adamwprune_base in _FUSED_BASES and on_cpu:
        base_kwargs.update(_fast(groups))
    if cfg.adamwprune_base == "adamwspam":
        base_kwargs.update(_spam_kwargs(cfg))
    else:
        base_kwargs["amsgrad"] = cfg.amsgrad
    if cfg.adamwprune_base == "adamwadv":
        base_kwargs["max_grad_norm"] = 0.0
    if cfg.adamwprune_budget_factor is not None:
        base_kwargs["budget_factor"] = cfg.adamwprune_budget_factor
    return AdamWPrune.from_schedule(groups, schedule, base=cfg.adamwprune_base,
                                    variant=cfg.adamwprune_variant, **_regrow_kwargs(cfg),
                                    **_adam_kwargs(cfg), **base_kwargs)


def _regrow_kwargs(cfg) -> dict:
    """AdamWPrune as a dynamic sparse trainer when the run's pruning method is (its drop
    fraction, distribution and seed then come from the schedule)."""
    if not (cfg.pruning and PRUNERS[cfg.pruning].dynamic):
        return {}
    return dict(regrow="gradient")


OPTIMIZERS: dict[str, OptimInfo] = {
    "sgd": OptimInfo("sgd", _sgd, "torch.optim.SGD with momentum (optional Nesterov)",
                     coupled_decay=True),
    "adam": OptimInfo("adam", _adam, "torch.optim.Adam (coupled L2 decay)", coupled_decay=True),
    "adamw": OptimInfo("adamw", _adamw, "torch.optim.AdamW (decoupled decay)"),
    "adamwadv": OptimInfo("adamwadv", _adamwadv, "AdamW + AMSGrad + cosine lr + clipping"),
    "adamwspam": OptimInfo("adamwspam", _adamwspam, "SPAM (Huang et al., ICLR 2025)"),
    "adamwprune": OptimInfo("adamwprune", _adamwprune, "prunes from its own Adam state", prunes_itself=True),
}


def _none(model, optimizer, schedule):
    from .pruning import NoPruner

    return NoPruner(model, optimizer=optimizer)


def _built(where: str):
    """A pruner built from the run's PruneSchedule (Pruner.from_schedule maps its fields
    onto the constructor's keywords). ``where``: "<module of adamwprune.pruning>.<Class>"."""
    def build(model, optimizer, s: PruneSchedule):
        import importlib

        module, cls_name = where.rsplit(".", 1)
        cls = getattr(importlib.import_module(f"adamwprune.pruning.{module}"), cls_name)
        return cls.from_schedule(model, s, optimizer=optimizer)
    return build


_RANKS = ("unstructured", "nm")
PRUNERS: dict[str, PrunerInfo] = {
    "none": PrunerInfo("none", _none, "dense training", prunes=False, patterns=()),
    "magnitude": PrunerInfo("magnitude", _built("magnitude.MagnitudePruner"), "|w|, monotone masks",
                            patterns=_RANKS),
    "movement": PrunerInfo("movement", _built("movement.MovementPruner"),
                           "Sanh et al. hard movement, scores in fp32", patterns=_RANKS),
    "state": PrunerInfo("state", _built("state.StatePruner"), "AdamWPrune prunes from its own state",
                        optimizer_prunes=True, requires_optimizer=("adamwprune",), patterns=_RANKS,
                        uses_variant=True, baseline="magnitude"),
    "state_regrow": PrunerInfo("state_regrow", _built("state.StatePruner"), "AdamWPrune drops by its score, regrows by |g|",
                               optimizer_prunes=True, requires_optimizer=("adamwprune",),
                               dynamic=True, uses_variant=True, baseline="rigl"),
    "srste": PrunerInfo("srste", _built("srste.SRSTEPruner"), "SR-STE: N:M from scratch (Zhou et al. 2021)",
                        patterns=("nm",), ramps=False),
    "rigl": PrunerInfo("rigl", _built("dst.RigLPruner"), "RigL: drop |w|, grow |g| (Evci et al. 2020)",
                       dynamic=True),
    "set": PrunerInfo("set", _built("dst.SETPruner"), "SET: drop |w|, grow at random (Mocanu et al. 2018)",
                      dynamic=True),
}


def pattern_of(cfg) -> str:
    """The run's mask pattern: "unstructured" or "N:M" (PRUNING_PATTERN, PRUNING_NM_N/M)."""
    if cfg.prune_pattern == "nm":
        return f"{cfg.nm_n}:{cfg.nm_m}"
    return "unstructured"


def target_of(cfg) -> float:
    """The run's target sparsity: PRUNING_TARGET_SPARSITY, or 1 - N/M for an N:M pattern."""
    if not PRUNERS[cfg.pruning].prunes:
        return 0.0
    if cfg.prune_pattern == "nm":
        if not 0 < cfg.nm_n < cfg.nm_m:
            from .config.errors import ConfigError

            raise ConfigError(f"PRUNING_NM_N={cfg.nm_n}, PRUNING_NM_M={cfg.nm_m}: N:M keeps N of every M "
                              "entries, so 0 < N < M (2:4 is the GPU pattern)")
        return 1.0 - cfg.nm_n / cfg.nm_m
    return cfg.target_sparsity


def _lookup(table: dict, name: str, what: str):
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r} (valid: {', '.join(table)})") from None


def build_optimizer(name: str, groups: list, cfg, schedule: PruneSchedule,
                    pruner: str = "none") -> torch.optim.Optimizer:
    """The optimizer `name`; it receives the schedule only if it does the pruning itself."""
    info = _lookup(OPTIMIZERS, name, "optimizer")
    pinfo = _lookup(PRUNERS, pruner, "pruning method")
    return info.build(groups, cfg, schedule if pinfo.optimizer_prunes else PruneSchedule())


def build_pruner(name: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                 schedule: PruneSchedule, optimizer_name: str):
    info = _lookup(PRUNERS, name, "pruning method")
    if info.requires_optimizer and optimizer_name not in info.requires_optimizer:
        raise ValueError(f"pruning method {name!r} needs optimizer {' or '.join(info.requires_optimizer)}, "
                         f"not {optimizer_name!r}")
    return info.build(model, optimizer, schedule)
