"""CIFAR-10 / CIFAR-100 in memory, with batched augmentation.

Images stay uint8 NCHW (150 MB for all 60,000) and are normalized per batch on
whatever device the batch is on. Files are torchvision's layout
(`<root>/cifar-10-batches-py/data_batch_1..5, test_batch`,
`<root>/cifar-100-python/train, test`); torchvision downloads them when asked.
We read the pickles ourselves rather than through `torchvision.datasets.CIFAR10`
because its constructor checks every file's MD5 against the full release, which
rejects the small files tests write in the same format.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.datasets import CIFAR10, CIFAR100

from .base import ArrayData, generator_for, split_indices

# Per-channel mean and std of each training set (pixels scaled to [0, 1]).
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_DATASETS = {"cifar10": CIFAR10, "cifar100": CIFAR100}
# Random-crop padding of the standard CIFAR recipe (He et al., 2016).
CROP_PAD = 4


def make_normalize(mean, std):
    """uint8 NCHW -> float32, (x / 255 - mean) / std per channel."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def normalize(x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32).div_(255.0)
        return x.sub_(mean_t.to(x.device)).div_(std_t.to(x.device))

    return normalize


def crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = CROP_PAD) -> torch.Tensor:
    """Random crop with `pad` pixels of zero padding, then a horizontal flip
    with probability 1/2, each image drawing its own offsets and flip.

    One gather over the whole batch: output pixel (i, r, c) is padded pixel
    (i, dy_i + r, dx_i + c), or (i, dy_i + r, dx_i + W - 1 - c) when flipped.
    Random numbers come from the CPU `generator` in a fixed order, so the
    result depends only on the generator's state, not on the device.
    """
    n, c, h, w = x.shape
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = dy[:, None] + torch.arange(h)
    cols = torch.arange(w).expand(n, w)
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + dx[:, None]
    padded = F.pad(x, (pad, pad, pad, pad))
    dev = x.device
    return padded[torch.arange(n, device=dev)[:, None, None, None],
                  torch.arange(c, device=dev)[None, :, None, None],
                  rows.to(dev)[:, None, :, None],
                  cols.to(dev)[:, None, None, :]]


def _missing_error(folder: Path, root: Path, detail: str = "") -> FileNotFoundError:
    return FileNotFoundError(
        f"CIFAR files not found in {folder}{detail}: put the torchvision "
        f"'{folder.name}' folder there (DATA_DIR={root}) or run once with internet "
        "(download enabled)")


def _read_split(name: str, root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    cls = _DATASETS[name]
    folder = root / cls.base_folder
    files = cls.train_list if train else cls.test_list
    images, labels = [], []
    for filename, _md5 in files:
        path = folder / filename
        if not path.is_file():
            raise _missing_error(folder, root, f" ({filename} is missing)")
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        images.append(np.asarray(entry["data"], dtype=np.uint8))
        labels.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
    x = torch.from_numpy(np.concatenate(images).reshape(-1, 3, 32, 32))
    return x, torch.tensor(labels, dtype=torch.int64)


def _download(name: str, root: Path) -> None:
    try:
        for train in (True, False):
            _DATASETS[name](str(root), train=train, download=True)
    except Exception as e:  # network errors come in many types (URLError, OSError, ...)
        raise _missing_error(root / _DATASETS[name].base_folder, root,
                             f" and the download failed ({type(e).__name__}: {e})") from e


def load_cifar(root, name: str = "cifar10", val_size: int = 5000, seed: int = 0,
               download: bool = False, augment: bool = True
               ) -> tuple[ArrayData, ArrayData, ArrayData]:
    """(train, val, test) with `val_size` images held out from the training set."""
    if name not in _DATASETS:
        raise ValueError(f"unknown CIFAR dataset {name!r}; valid names: {', '.join(_DATASETS)}")
    root = Path(os.path.expanduser(str(root)))
    try:
        x_full, y_full = _read_split(name, root, train=True)
    except FileNotFoundError:
        if not download:
            raise
        _download(name, root)
        x_full, y_full = _read_split(name, root, train=True)
    x_test, y_test = _read_split(name, root, train=False)
    train_idx, val_idx = split_indices(len(y_full), val_size, seed)
    normalize = make_normalize(*CIFAR_STATS[name])
    transform = crop_flip if augment else None
    return (ArrayData(x_full[train_idx], y_full[train_idx], normalize, transform),
            ArrayData(x_full[val_idx], y_full[val_idx], normalize),
            ArrayData(x_test, y_test, normalize))


def synthetic_images(n_train: int, n_val: int, n_test: int, shape=(3, 32, 32),
                     num_classes: int = 10, seed: int = 0, augment: bool = False
                     ) -> tuple[ArrayData, ArrayData, ArrayData]:
    """Random uint8 images that a model can learn: each class has a fixed random
    prototype image and every sample is its class prototype plus uniform noise
    (amplitude 64 of 255), so training-pipeline tests see the loss fall."""
    if min(n_train, n_val, n_test) < 1 or num_classes < 1:
        raise ValueError("synthetic_images needs at least one sample per split and one class")
    g = generator_for(seed, 0, 0)
    prototypes = torch.randint(0, 256, (num_classes, *shape), generator=g)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, num_classes, (n,), generator=g)
        noise = torch.randint(-64, 65, (n, *shape), generator=g)
        return (prototypes[y] + noise).clamp_(0, 255).to(torch.uint8), y

    mean, std = (0.5,) * shape[0], (0.3,) * shape[0]  # roughly the data's stats
    normalize = make_normalize(mean, std)
    transform = crop_flip if augment else None
    (xt, yt), (xv, yv), (xs, ys) = split(n_train), split(n_val), split(n_test)
    return (ArrayData(xt, yt, normalize, transform), ArrayData(xv, yv, normalize),
            ArrayData(xs, ys, normalize))
