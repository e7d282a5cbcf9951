"""What a model folder's train.py provides to the engine: a Task.

A task builds the model and the data splits, computes the training loss of a
batch, and turns evaluation batches into sums (so DDP ranks can add them up)
and the sums into (loss, metric). Everything else is the engine's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
import importlib.util
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..paths import ROOT


@dataclass
class Splits:
    """train: has train_batch(step, batch_size, seed, rank, world_size) and
    steps_per_epoch(batch_size); val/test: have eval_batches(batch_size, ...)."""

    train: Any
    val: Any
    test: Any


class Task(Protocol):
    name: str
    metric_name: str
    higher_is_better: bool

    def build_model(self, cfg) -> nn.Module: ...

    def build_data(self, cfg) -> Splits: ...

    def loss(self, model: nn.Module, batch) -> torch.Tensor: ...

    def eval_sums(self, model: nn.Module, batch) -> dict[str, torch.Tensor]: ...

    def finish_eval(self, sums: dict[str, float]) -> tuple[float, float]: ...

    def eval_batches(self, split, cfg, rank: int, world_size: int): ...


class ClassificationTask:
    """Cross-entropy classification with accuracy in percent (higher is better)."""

    metric_name = "accuracy"
    higher_is_better = True
    eval_batch_size = 1000

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    @torch.no_grad()
    def eval_sums(self, model: nn.Module, batch) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = model(x)
        return {
            "loss": F.cross_entropy(logits.float(), y, reduction="sum"),
            "correct": (logits.argmax(dim=1) == y).sum(),
            "count": torch.tensor(y.numel(), device=y.device),
        }

    def finish_eval(self, sums: dict[str, float]) -> tuple[float, float]:
        n = max(1.0, sums["count"])
        return sums["loss"] / n, 100.0 * sums["correct"] / n

    def eval_batches(self, split, cfg, rank: int, world_size: int):
        # TRAIN_EVAL_BATCHES counts batches of the whole split, not of each rank.
        return split.eval_batches(self.eval_batch_size, rank=rank, world_size=world_size,
                                  max_batches=cfg.eval_batches or 0)


def perplexity(mean_loss: float) -> float:
    """exp(loss), saturating instead of overflowing for a diverged model."""
    return math.exp(min(mean_loss, 700.0))


class CifarTask(ClassificationTask):
    """A CIFAR classifier: channels-last on GPU, optional upsampling for ImageNet stems."""

    def __init__(self, name: str, dataset: str, num_classes: int, build):
        self.name, self.dataset, self.num_classes, self._build = name, dataset, num_classes, build
        self.channels_last = False
        self.input_size = 32

    def build_model(self, cfg) -> nn.Module:
        model = self._build(cfg)
        self.input_size = getattr(model, "input_size", 32)
        self.channels_last = bool(cfg.resnet_channels_last) and cfg.device != "cpu" and torch.cuda.is_available()
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def build_data(self, cfg) -> Splits:
        from ..config.kconfig import resolve_path
        from ..data import cifar

        if cfg.dataset == "synthetic":
            n = cfg.synthetic_size
            return Splits(*cifar.synthetic_images(n, max(1, n // 4), max(1, n // 4),
                                                  num_classes=self.num_classes, seed=cfg.seed, augment=True))
        if cfg.dataset != self.dataset:
            raise ValueError(f"{self.name} trains on {self.dataset} or synthetic, not {cfg.dataset!r}")
        return Splits(*cifar.load_cifar(resolve_path(cfg.data_dir), self.dataset, cfg.val_size, cfg.seed,
                                        download=cfg.data_download))

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_size != x.shape[-1]:
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return super().loss(model, (self._prepare(x), y))

    def eval_sums(self, model: nn.Module, batch) -> dict[str, torch.Tensor]:
        x, y = batch
        return super().eval_sums(model, (self._prepare(x), y))


def load_task(model: str, root: Path = ROOT):
    """The TASK object of <root>/<model>/train.py."""
    path = root / model / "train.py"
    if not path.is_file():
        from ..config.errors import ConfigError

        raise ConfigError(f"model {model!r} has no task file at {path}")
    spec = importlib.util.spec_from_file_location(f"adamwprune_task_{model}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TASK
