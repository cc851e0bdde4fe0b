"""Image data sets held as tensors, with the DARTS augmentation done batch-wise on the tensors.

- `digits`: scikit-learn's 8x8 handwritten digits (1,797 real images, 10 classes), shipped with
  the package as `fastdarts/data/digits.npz` (from the UCI optical digits test set). Its first
  1,437 images are the training split (the search's, and the training run's), the last 360 the
  test split; both hold every class in near-equal numbers.
- `cifar10`: the standard `cifar-10-batches-py` directory of pickled batches, read without
  torchvision.
Nothing is ever downloaded.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DataError

DATASETS = ("digits", "cifar10")
_DIGITS_FILE = Path(__file__).with_name("data") / "digits.npz"
DIGITS_TRAIN_SIZE = 1437  # 80 %; the remaining 360 images are the test split
SPLITS = ("train", "test")
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"


@dataclass
class ImageData:
    """Images in [0, 1] as float32 `[N, C, H, W]`, int64 labels, and how to augment and normalise them."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int
    flip: bool

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def in_channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    def batch(self, indices: torch.Tensor, generator: torch.Generator | None = None, augment: bool = False,
              cutout: int = 0):  # fmt: skip
        """The normalised images and labels at `indices`; random crop and flip when `augment`, then
        (as DARTS does, after normalising) a `cutout`-pixel square cut out when `cutout` > 0."""
        x = self.images[indices]
        if augment:
            x = random_crop_flip(x, self.crop_padding, self.flip, generator)
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        x = (x - mean) / std
        if cutout > 0:
            x = random_cutout(x, cutout, generator)
        return x, self.labels[indices]


def random_crop_flip(x: torch.Tensor, padding: int, flip: bool, generator: torch.Generator | None) -> torch.Tensor:
    """Per image: a random crop of the zero-padded image (torchvision's RandomCrop) and a coin-flip mirror."""
    n, _, h, w = x.shape
    if padding > 0:
        padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
        x = padded[torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]
    if flip:
        mirror = torch.rand(n, generator=generator) < 0.5
        x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
    return x


def random_cutout(x: torch.Tensor, length: int, generator: torch.Generator | None) -> torch.Tensor:
    """Per image, zero a `length` x `length` square centred at a uniformly random pixel, clipped at
    the border (DARTS's Cutout)."""
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n,), generator=generator)
    cx = torch.randint(0, w, (n,), generator=generator)
    rows, cols = torch.arange(h), torch.arange(w)
    inside_y = (rows >= (cy - length // 2)[:, None]) & (rows < (cy + length - length // 2)[:, None])
    inside_x = (cols >= (cx - length // 2)[:, None]) & (cols < (cx + length - length // 2)[:, None])
    cut = inside_y[:, :, None] & inside_x[:, None, :]
    return x.masked_fill(cut[:, None], 0.0)


def load_digits(split: str = "train") -> ImageData:
    with np.load(_DIGITS_FILE) as f:
        images = torch.from_numpy(f["images"].astype(np.float32) / 16.0).unsqueeze(1)
        labels = torch.from_numpy(f["labels"].astype(np.int64))
    part = slice(0, DIGITS_TRAIN_SIZE) if split == "train" else slice(DIGITS_TRAIN_SIZE, None)
    images, labels = images[part], labels[part]
    # Mirroring changes what a digit means, so digits get only a one-pixel random shift.
    return ImageData(images, labels, 10, mean=(0.3053,), std=(0.3760,), crop_padding=1, flip=False)


CIFAR10_MEAN = (0.49139968, 0.48215827, 0.44653124)
CIFAR10_STD = (0.24703233, 0.24348505, 0.26158768)


def load_cifar10(root: str | Path, split: str = "train") -> ImageData:
    """Read `root` (the `cifar-10-batches-py` directory, or its parent) without torchvision."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"CIFAR-10 data directory {root} does not exist")
    if not root.is_dir():
        raise DataError(f"CIFAR-10 data path {root} is not a directory")
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    files = CIFAR10_TRAIN_FILES if split == "train" else (CIFAR10_TEST_FILE,)
    missing = [name for name in files if not (root / name).is_file()]
    if missing:
        raise DataError(f"{root} is not a cifar-10-batches-py directory: missing {', '.join(missing)}")
    images, labels = [], []
    for name in files:
        batch = _read_cifar_batch(root / name)
        images.append(batch[0])
        labels.append(batch[1])
    x = torch.from_numpy(np.concatenate(images)).float().div_(255.0)
    y = torch.from_numpy(np.concatenate(labels))
    return ImageData(x, y, 10, CIFAR10_MEAN, CIFAR10_STD, crop_padding=4, flip=True)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"{path}: cannot read CIFAR-10 batch ({type(e).__name__}: {e})") from None
    if not isinstance(entry, dict) or "data" not in entry or "labels" not in entry:
        raise DataError(f"{path}: not a CIFAR-10 batch (expected a pickled dict with 'data' and 'labels')")
    data = np.asarray(entry["data"], dtype=np.uint8)
    labels = np.asarray(entry["labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DataError(f"{path}: CIFAR-10 batch has data of shape {data.shape} and {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: CIFAR-10 labels must lie in 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def write_cifar10_batch(path: str | Path, images: np.ndarray, labels) -> None:
    """Write images `[N, 3, 32, 32]` uint8 as one pickled CIFAR-10 batch (for tests and small demos)."""
    images = np.asarray(images, dtype=np.uint8)
    entry = {"batch_label": Path(path).name, "labels": list(map(int, labels)), "data": images.reshape(len(images), -1)}
    with open(path, "wb") as f:
        pickle.dump(entry, f)


def load_dataset(name: str, root: str | Path | None = None, split: str = "train") -> ImageData:
    """The `split` ("train" or "test") of data set `name`, read from `root` when it needs a directory."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if name == "digits":
        return load_digits(split)
    if name == "cifar10":
        if root is None:
            raise DataError("--dataset cifar10 needs --data DIR (the cifar-10-batches-py directory)")
        return load_cifar10(root, split)
    raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def split_indices(n: int, train_portion: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DARTS's split: the first `train_portion` of the training set trains the weights, the rest alpha."""
    split = int(np.floor(train_portion * n))
    if split == 0 or split == n:
        raise DataError(f"train_portion {train_portion} leaves an empty half of {n} training images")
    return torch.arange(split), torch.arange(split, n)


def shuffled_batches(indices: torch.Tensor, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch of random batches over `indices` (the last one may be smaller), like SubsetRandomSampler."""
    order = indices[torch.randperm(len(indices), generator=generator)]
    return list(order.split(batch_size))


def random_batch(indices: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """A fresh random batch without replacement, as DARTS draws its validation batch every step."""
    return indices[torch.randperm(len(indices), generator=generator)[:batch_size]]
