"""Data containers shared by every task.

Training batches are a pure function of (seed, step): the permutation of epoch e
comes from a generator seeded with (seed, e), and augmentation from a generator
seeded with (seed, step). That makes resume bit-exact without saving loader state,
and lets each DDP rank take its own slice of the same global batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

# Large odd constants keep the (seed, epoch) and (seed, step) streams apart.
_EPOCH_STREAM = 1_000_003
_STEP_STREAM = 7_919


def generator_for(seed: int, stream: int, index: int) -> torch.Generator:
    """A CPU generator whose state depends only on (seed, stream, index)."""
    g = torch.Generator()
    g.manual_seed((seed * 2_654_435_761 + stream * 97 + index) % (2**63 - 1))
    return g


@dataclass
class ArrayData:
    """Samples held in memory: x (N, ...) and integer labels y (N,).

    `transform(x_batch, generator)` runs on each training batch (augmentation on
    whole batches, on whatever device the batch is on); `normalize(x_batch)` runs
    on every batch, train and evaluation alike.
    """

    x: torch.Tensor
    y: torch.Tensor
    normalize: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    transform: Optional[Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = None

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def steps_per_epoch(self, batch_size: int) -> int:
        """Full batches per epoch (the last partial batch is dropped in training)."""
        if batch_size > len(self):
            raise ValueError(
                f"batch size {batch_size} is larger than the training set ({len(self)} samples); "
                "lower BATCH_SIZE")
        return len(self) // batch_size

    def train_batch(self, step: int, batch_size: int, seed: int, rank: int = 0,
                    world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The global batch of `step`, this rank's slice of it."""
        spe = self.steps_per_epoch(batch_size)
        epoch, i = divmod(step, spe)
        perm = torch.randperm(len(self), generator=generator_for(seed, _EPOCH_STREAM, epoch))
        idx = perm[i * batch_size:(i + 1) * batch_size]
        per_rank = batch_size // world_size
        idx = idx[rank * per_rank:(rank + 1) * per_rank]
        x, y = self.x[idx], self.y[idx]
        if self.transform is not None:
            x = self.transform(x, generator_for(seed, _STEP_STREAM, step))
        if self.normalize is not None:
            x = self.normalize(x)
        return x, y

    def eval_batches(self, batch_size: int, rank: int = 0, world_size: int = 1,
                     max_batches: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every sample once, in order (the first `max_batches` batches if > 0); ranks
        take interleaved batches, so any number of ranks sees the same batches as one."""
        n = len(self)
        for b, start in enumerate(range(0, n, batch_size)):
            if max_batches and b >= max_batches:
                break
            if b % world_size != rank:
                continue
            x, y = self.x[start:start + batch_size], self.y[start:start + batch_size]
            if self.normalize is not None:
                x = self.normalize(x)
            yield x, y


def split_indices(n: int, n_val: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random split of range(n) into (train, val) index tensors."""
    if not 0 < n_val < n:
        raise ValueError(f"validation split of {n_val} samples is impossible with {n} samples")
    perm = torch.randperm(n, generator=generator_for(seed, 0, 0))
    return perm[n_val:].sort().values, perm[:n_val].sort().values
