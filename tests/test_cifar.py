import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.datasets import CIFAR10

from adamwprune.data import cifar
from adamwprune.data.cifar import CIFAR_STATS, crop_flip, load_cifar, synthetic_images

PER_BATCH = 6  # images per training pickle (the real files hold 10,000)
N_TEST = 5


def _dump(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _images(first: int, n: int) -> np.ndarray:
    """Rows of 3072 bytes (R plane, G plane, B plane, each row-major 32x32) whose
    first byte is the image's global index, so the tests can follow each image."""
    rows = (np.arange(3072)[None, :] * 7 + np.arange(first, first + n)[:, None] * 13) % 256
    rows[:, 0] = np.arange(first, first + n)
    return rows.astype(np.uint8)


def write_cifar10(root: Path) -> None:
    """Tiny CIFAR-10 in torchvision's 'cifar-10-batches-py' layout and pickle format."""
    folder = root / "cifar-10-batches-py"
    for b in range(5):
        first = b * PER_BATCH
        _dump(folder / f"data_batch_{b + 1}", {
            "batch_label": f"training batch {b + 1} of 5",
            "labels": [(first + i) % 10 for i in range(PER_BATCH)],
            "data": _images(first, PER_BATCH),
            "filenames": [f"img_{first + i}.png" for i in range(PER_BATCH)]})
    _dump(folder / "test_batch", {"batch_label": "testing batch 1 of 1",
                                  "labels": [i % 10 for i in range(N_TEST)],
                                  "data": _images(200, N_TEST),
                                  "filenames": [f"test_{i}.png" for i in range(N_TEST)]})
    _dump(folder / "batches.meta", {"num_cases_per_batch": PER_BATCH, "num_vis": 3072,
                                    "label_names": [f"class{i}" for i in range(10)]})


def write_cifar100(root: Path, n_train: int = 12) -> None:
    """Tiny CIFAR-100 in torchvision's 'cifar-100-python' layout and pickle format."""
    folder = root / "cifar-100-python"
    for split, n, first in (("train", n_train, 0), ("test", N_TEST, 200)):
        _dump(folder / split, {"batch_label": f"{split} batch",
                               "fine_labels": [(first + i) * 7 % 100 for i in range(n)],
                               "coarse_labels": [(first + i) % 20 for i in range(n)],
                               "data": _images(first, n),
                               "filenames": [f"{split}_{i}.png" for i in range(n)]})
    _dump(folder / "meta", {"fine_label_names": [f"f{i}" for i in range(100)],
                            "coarse_label_names": [f"c{i}" for i in range(20)]})


def test_load_cifar10_reads_torchvision_pickles_into_uint8_nchw(tmp_path):
    write_cifar10(tmp_path)
    train, val, test = load_cifar(tmp_path, "cifar10", val_size=4, seed=0)
    assert (len(train), len(val), len(test)) == (26, 4, N_TEST)
    assert train.x.dtype == torch.uint8 and train.x.shape[1:] == (3, 32, 32)
    assert train.y.dtype == torch.int64
    # Train and val partition the 30 training images; labels follow their image.
    index = torch.cat([train.x[:, 0, 0, 0], val.x[:, 0, 0, 0]]).long()
    assert sorted(index.tolist()) == list(range(30))
    assert torch.equal(torch.cat([train.y, val.y]), index % 10)
    # Byte k of a row is plane k // 1024, row (k % 1024) // 32, column k % 32.
    img = test.x[2]
    k = 1 * 1024 + 5 * 32 + 9
    assert img[1, 5, 9].item() == (k * 7 + 202 * 13) % 256
    assert test.y.tolist() == [0, 1, 2, 3, 4]


def test_load_cifar100_uses_fine_labels(tmp_path):
    write_cifar100(tmp_path)
    train, val, test = load_cifar(tmp_path, "cifar100", val_size=2, seed=1)
    assert (len(train), len(val), len(test)) == (10, 2, N_TEST)
    index = torch.cat([train.x[:, 0, 0, 0], val.x[:, 0, 0, 0]]).long()
    assert torch.equal(torch.cat([train.y, val.y]), index * 7 % 100)


def test_validation_split_depends_only_on_seed(tmp_path):
    write_cifar10(tmp_path)
    _, val_a, _ = load_cifar(tmp_path, val_size=4, seed=3)
    _, val_b, _ = load_cifar(tmp_path, val_size=4, seed=3)
    _, val_c, _ = load_cifar(tmp_path, val_size=4, seed=4)
    assert torch.equal(val_a.x, val_b.x)
    assert not torch.equal(val_a.x, val_c.x)


def test_normalize_uses_the_cifar100_channel_stats(tmp_path):
    write_cifar100(tmp_path)
    _, _, test = load_cifar(tmp_path, "cifar100", val_size=2)
    x, _ = next(test.eval_batches(N_TEST))
    mean, std = CIFAR_STATS["cifar100"]
    raw = test.x[:N_TEST].float() / 255
    expected = (raw - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert x.dtype == torch.float32
    assert torch.allclose(x, expected, atol=1e-6)


def test_missing_files_name_the_folder_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="'cifar-10-batches-py' folder there "
                                                r"\(DATA_DIR=.*\) or run once with internet"):
        load_cifar(tmp_path / "nowhere", "cifar10")
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        load_cifar(tmp_path, "cifar100")


def test_failed_download_gives_the_same_clear_error(tmp_path, monkeypatch):
    class Offline(CIFAR10):
        def __init__(self, *args, **kwargs):
            raise OSError("Name or service not known")

    monkeypatch.setitem(cifar._DATASETS, "cifar10", Offline)
    with pytest.raises(FileNotFoundError, match="download failed .*DATA_DIR="):
        load_cifar(tmp_path, "cifar10", download=True)


def test_unknown_dataset_name_lists_valid_names(tmp_path):
    with pytest.raises(ValueError, match="cifar10, cifar100"):
        load_cifar(tmp_path, "svhn")


def test_augmented_batches_are_a_function_of_seed_and_step(tmp_path):
    write_cifar10(tmp_path)
    train, _, _ = load_cifar(tmp_path, val_size=4)
    x1, y1 = train.train_batch(step=7, batch_size=8, seed=0)
    x2, y2 = train.train_batch(step=7, batch_size=8, seed=0)
    x3, _ = train.train_batch(step=8, batch_size=8, seed=0)
    assert x1.shape == (8, 3, 32, 32) and x1.dtype == torch.float32
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)


def test_crop_flip_keeps_shape_dtype_and_is_deterministic():
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    a = crop_flip(x, torch.Generator().manual_seed(1))
    b = crop_flip(x, torch.Generator().manual_seed(1))
    c = crop_flip(x, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_crop_flip_of_a_2x2_image_gives_only_padded_windows_and_their_mirrors():
    img = torch.tensor([[1, 2], [3, 4]], dtype=torch.uint8)
    # The nine 2x2 windows of the image padded by one zero pixel, by hand.
    windows = [[[0, 0], [0, 1]], [[0, 0], [1, 2]], [[0, 0], [2, 0]],
               [[0, 1], [0, 3]], [[1, 2], [3, 4]], [[2, 0], [4, 0]],
               [[0, 3], [0, 0]], [[3, 4], [0, 0]], [[4, 0], [0, 0]]]
    allowed = {str(w) for w in windows} | {str([row[::-1] for row in w]) for w in windows}
    out = crop_flip(img.expand(400, 1, 2, 2), torch.Generator().manual_seed(0), pad=1)
    seen = {str(o[0].tolist()) for o in out}
    assert seen <= allowed
    assert len(seen) == 18  # 400 draws reach every window, flipped and not


def test_crop_flip_matches_a_per_image_reference():
    x = torch.randint(1, 256, (32, 3, 32, 32), dtype=torch.uint8)
    out = crop_flip(x, torch.Generator().manual_seed(5))
    padded = F.pad(x, (4, 4, 4, 4))
    for i in range(len(x)):
        matches = [(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (False, True)
                   if torch.equal(out[i], _window(padded[i], dy, dx, flip))]
        assert len(matches) == 1  # random pixels: exactly one crop and flip fits
    g = torch.Generator().manual_seed(5)  # the draws in crop_flip's documented order
    dy, dx = torch.randint(0, 9, (32,), generator=g), torch.randint(0, 9, (32,), generator=g)
    flip = torch.rand(32, generator=g) < 0.5
    for i in range(len(x)):
        assert torch.equal(out[i], _window(padded[i], dy[i], dx[i], bool(flip[i])))


def _window(img: torch.Tensor, dy, dx, flip: bool) -> torch.Tensor:
    crop = img[:, dy:dy + 32, dx:dx + 32]
    return crop.flip(-1) if flip else crop


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_crop_flip_on_cuda_matches_cpu():
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    cpu = crop_flip(x, torch.Generator().manual_seed(9))
    gpu = crop_flip(x.cuda(), torch.Generator().manual_seed(9))
    assert torch.equal(cpu, gpu.cpu())


def test_synthetic_images_are_deterministic_and_learnable_shapes():
    a = synthetic_images(40, 8, 8, shape=(3, 32, 32), num_classes=4, seed=0)
    b = synthetic_images(40, 8, 8, shape=(3, 32, 32), num_classes=4, seed=0)
    assert [len(d) for d in a] == [40, 8, 8]
    assert torch.equal(a[0].x, b[0].x) and torch.equal(a[2].y, b[2].y)
    assert a[0].x.dtype == torch.uint8 and int(a[0].y.max()) < 4
    # Samples of one class sit closer to each other than to another class.
    x, y = a[0].x.float().flatten(1), a[0].y
    c0, c1 = x[y == 0], x[y == 1]
    assert torch.cdist(c0, c0).mean() < torch.cdist(c0, c1).mean()
    xb, _ = a[0].train_batch(0, 8, seed=0)
    assert xb.shape == (8, 3, 32, 32) and xb.dtype == torch.float32
