"""Image data sets, and how the batches of a run are read and augmented.

- `digits`: scikit-learn's 8x8 handwritten digits (1,797 real images, 10 classes), shipped with
  the package as `fastdarts/data/digits.npz` (from the UCI optical digits test set). Its first
  1,437 images are the training split (the search's, and the training run's), the last 360 the
  test split; both hold every class in near-equal numbers.
- `cifar10`, `cifar100`: the standard `cifar-10-batches-py` and `cifar-100-python` directories of
  pickled batches (CIFAR-100 with its 100 fine labels), read without torchvision.
- `folder`: a directory of images with one sub-folder per class (torchvision's ImageFolder layout),
  decoded with Pillow; each image's shorter side is resized to `image_size` and its centre cropped
  to a square. Split by sub-folders when there is a `train/` (see `folder_split`), else a seeded,
  per-class 80/20 split.
- `imagenet`: the same layout (`train/` and `val/`) with DARTS's ImageNet pipeline: a random
  resized crop, a flip and colour jitter of the full-resolution image for training, the centre
  crop of the image resized to 8/7 of `image_size` for testing.

Data that fit in memory are held as float32 tensors (ImageData) and augmented batch-wise on them;
a folder whose decoded images would take more than `preload_mb` stays on disk (ImageFiles), and
DataLoader worker processes read, decode and augment its batches ahead of the steps. A batch is
described by a BatchJob (its indices and a seed for its randomness), so it comes out the same
whichever process makes it and however far ahead: held in memory or read from disk, with any
number of workers, in a run resumed midway. Nothing is ever downloaded.
"""

from __future__ import annotations

import math
import os
import pickle
import signal
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance

from .errors import DataError, path_stat, summary

DATASETS = ("digits", "cifar10", "cifar100", "folder", "imagenet")
SEARCH_DATASETS = ("digits", "cifar10", "cifar100", "folder")  # imagenet is for training a found cell
# The data sets read from a directory, and what --data must name for each.
DATA_DIRECTORIES = {
    "cifar10": "the cifar-10-batches-py directory",
    "cifar100": "the cifar-100-python directory",
    "folder": "a directory of images with one sub-folder per class",
    "imagenet": "a directory with train/ and val/, one sub-folder per class in each",
}
IMAGE_DATASETS = ("folder", "imagenet")  # decoded from image files, at any --image_size
SPLITS = ("train", "valid", "test")
_DIGITS_FILE = Path(__file__).with_name("data") / "digits.npz"
DIGITS_TRAIN_SIZE = 1437  # 80 %; the remaining 360 images are the test split
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
CIFAR10_MEAN = (0.49139968, 0.48215827, 0.44653124)
CIFAR10_STD = (0.24703233, 0.24348505, 0.26158768)
CIFAR100_MEAN = (0.50707516, 0.48654887, 0.44091784)
CIFAR100_STD = (0.26733429, 0.25643846, 0.27615047)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The file names torchvision's ImageFolder reads as images (any case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# A folder without train/: this share of each class's images is the test split, drawn with SPLIT_SEED,
# which is fixed so that a search, the training of its cell and every --seeds run hold out the same images.
TEST_FRACTION = 0.2
SPLIT_SEED = 0
PRELOAD_CHUNK = 256  # images decoded per job when a folder is loaded into memory


# ----------------------------------------------------------------------------------------------
# Batches


def part_slice(n: int, part: tuple[int, int] | None) -> slice:
    """Where the `index`-th of `count` near-equal consecutive parts of a batch of `n` lies (torch.tensor_split's
    parts: the first `n % count` take one more); the whole batch when `part` is None."""
    if part is None:
        return slice(None)
    index, count = part
    size, extra = divmod(n, count)
    start = index * size + min(index, extra)
    return slice(start, start + size + (index < extra))


@dataclass(frozen=True)
class BatchJob:
    """One batch to make: the images at `indices`, augmented with randomness drawn from `seed`
    (crop and flip, then a `cutout`-pixel cutout when > 0), or as they are when `seed` is None.

    `part` (index, count): make only that part of the batch (part_slice), each image exactly as it
    would be in the whole batch; one process's share of a global batch (fastdarts.distributed)."""

    indices: torch.Tensor
    seed: int | None = None
    cutout: int = 0
    part: tuple[int, int] | None = None


def step_seed(seed: int, epoch: int, step: int, draw: int) -> int:
    """The seed of one random draw of a run's step (`draw` numbers the step's draws: its training
    batch, its validation batch, ...), from the run's seed, the epoch and the step alone."""
    return int(np.random.SeedSequence([seed % 2**64, epoch, step, draw]).generate_state(1)[0])


def to_device(batch: tuple[torch.Tensor, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's images and labels on the device the run computes on (made on the CPU, as every batch is)."""
    x, y = batch
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


class Images:
    """What every data set offers a run; subclasses say how to get the pixels of a batch."""

    labels: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def pixels(self, indices: torch.Tensor, generator: torch.Generator | None, augment: bool,
               keep: slice = slice(None)) -> torch.Tensor:  # fmt: skip
        """The images at `indices[keep]` in [0, 1] as float32 `[N, C, H, W]`, randomly cropped and flipped when
        `augment` (the draws made for all of `indices`, so that `keep` picks images augmented as in the whole batch)."""
        raise NotImplementedError

    def batch(self, indices: torch.Tensor, generator: torch.Generator | None = None, augment: bool = False,
              cutout: int = 0, keep: slice = slice(None)):  # fmt: skip
        """The normalised images and labels at `indices[keep]`; augmented when `augment`, then (as DARTS does,
        after normalising) a `cutout`-pixel square cut out when `cutout` > 0, each as in the batch of all `indices`."""
        x = self.pixels(indices, generator, augment, keep)
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        x = (x - mean) / std
        if cutout > 0:
            x = random_cutout(x, cutout, generator, len(indices), keep)
        return x, self.labels[indices[keep]]

    def make(self, job: BatchJob):
        if job.part is None:  # the whole batch, as it always was
            if job.seed is None:
                return self.batch(job.indices)
            return self.batch(job.indices, torch.Generator().manual_seed(job.seed), augment=True, cutout=job.cutout)
        keep = part_slice(len(job.indices), job.part)
        if job.seed is None:
            return self.batch(job.indices[keep])
        generator = torch.Generator().manual_seed(job.seed)
        return self.batch(job.indices, generator, augment=True, cutout=job.cutout, keep=keep)

    def iterate(self, jobs: Iterable[BatchJob]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of `jobs`, in order, each made when it is asked for."""
        for job in jobs:
            yield self.make(job)


@dataclass
class ImageData(Images):
    """Images in [0, 1] as float32 `[N, C, H, W]`, int64 labels, and how to augment and normalise them."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int
    flip: bool

    @property
    def in_channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    def pixels(self, indices, generator, augment, keep=slice(None)):
        x = self.images[indices[keep]]
        if augment:
            x = random_crop_flip(x, self.crop_padding, self.flip, generator, len(indices), keep)
        return x


def random_crop_flip(x: torch.Tensor, padding: int, flip: bool, generator: torch.Generator | None,
                     drawn: int | None = None, keep: slice = slice(None)) -> torch.Tensor:  # fmt: skip
    """Per image: a random crop of the zero-padded image (torchvision's RandomCrop) and a coin-flip mirror.
    With `drawn`, the draws are made for a batch of `drawn` images, of which `x` is the part `keep`."""
    n, _, h, w = x.shape
    drawn = n if drawn is None else drawn
    if padding > 0:
        padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (drawn,), generator=generator)[keep]
        dx = torch.randint(0, 2 * padding + 1, (drawn,), generator=generator)[keep]
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
        x = padded[torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]
    if flip:
        mirror = torch.rand(drawn, generator=generator)[keep] < 0.5
        x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
    return x


def random_cutout(x: torch.Tensor, length: int, generator: torch.Generator | None, drawn: int | None = None,
                  keep: slice = slice(None)) -> torch.Tensor:  # fmt: skip
    """Per image, zero a `length` x `length` square centred at a uniformly random pixel, clipped at
    the border (DARTS's Cutout). With `drawn`, as random_crop_flip."""
    n, _, h, w = x.shape
    drawn = n if drawn is None else drawn
    cy = torch.randint(0, h, (drawn,), generator=generator)[keep]
    cx = torch.randint(0, w, (drawn,), generator=generator)[keep]
    rows, cols = torch.arange(h), torch.arange(w)
    inside_y = (rows >= (cy - length // 2)[:, None]) & (rows < (cy + length - length // 2)[:, None])
    inside_x = (cols >= (cx - length // 2)[:, None]) & (cols < (cx + length - length // 2)[:, None])
    cut = inside_y[:, :, None] & inside_x[:, None, :]
    return x.masked_fill(cut[:, None], 0.0)


# ----------------------------------------------------------------------------------------------
# Bundled digits, CIFAR-10 and CIFAR-100


def load_digits(split: str = "train") -> ImageData:
    with np.load(_DIGITS_FILE) as f:
        images = torch.from_numpy(f["images"].astype(np.float32) / 16.0).unsqueeze(1)
        labels = torch.from_numpy(f["labels"].astype(np.int64))
    part = slice(0, DIGITS_TRAIN_SIZE) if split == "train" else slice(DIGITS_TRAIN_SIZE, None)
    images, labels = images[part], labels[part]
    # Mirroring changes what a digit means, so digits get only a one-pixel random shift.
    return ImageData(images, labels, 10, mean=(0.3053,), std=(0.3760,), crop_padding=1, flip=False)


@dataclass(frozen=True)
class CifarLayout:
    """Where a CIFAR directory keeps its pickled batches and what their labels are called."""

    name: str  # as messages name the data set
    directory: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


CIFAR10 = CifarLayout("CIFAR-10", "cifar-10-batches-py", CIFAR10_TRAIN_FILES, (CIFAR10_TEST_FILE,), "labels", 10,
                      CIFAR10_MEAN, CIFAR10_STD)  # fmt: skip
CIFAR100 = CifarLayout("CIFAR-100", "cifar-100-python", ("train",), ("test",), "fine_labels", 100, CIFAR100_MEAN,
                       CIFAR100_STD)  # fmt: skip


def load_cifar(root: str | Path, split: str = "train", layout: CifarLayout = CIFAR10) -> ImageData:
    """Read `root` (the layout's directory, or its parent) without torchvision."""
    root = _directory(root, f"{layout.name} data")
    if _is_directory(root / layout.directory):
        root = root / layout.directory
    files = layout.train_files if split == "train" else layout.test_files
    missing = [name for name in files if not (root / name).is_file()]
    if missing:
        raise DataError(f"{root} is not a {layout.directory} directory: missing {', '.join(missing)}")
    images, labels = [], []
    for name in files:
        batch = _read_cifar_batch(root / name, layout)
        images.append(batch[0])
        labels.append(batch[1])
    x = torch.from_numpy(np.concatenate(images)).float().div_(255.0)
    y = torch.from_numpy(np.concatenate(labels))
    if len(y) == 0:  # nothing to train or score on: a run would fail at its first evaluation
        raise DataError(f"{root}: the {layout.name} {split} files hold no images")
    return ImageData(x, y, layout.num_classes, layout.mean, layout.std, crop_padding=4, flip=True)


def load_cifar10(root: str | Path, split: str = "train") -> ImageData:
    return load_cifar(root, split, CIFAR10)


def load_cifar100(root: str | Path, split: str = "train") -> ImageData:
    return load_cifar(root, split, CIFAR100)


def _read_cifar_batch(path: Path, layout: CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except Exception as e:  # pickle raises many kinds of error on a damaged file: name the file, in one line
        raise DataError(f"{path}: cannot read {layout.name} batch ({summary(e)})") from None
    key = layout.label_key
    if not isinstance(entry, dict) or "data" not in entry or key not in entry:
        raise DataError(f"{path}: not a {layout.name} batch (expected a pickled dict with 'data' and '{key}')")
    data = _integers(entry["data"], "data", path, layout)
    labels = _integers(entry[key], "labels", path, layout)
    if data.size and (data.min() < 0 or data.max() > 255):
        raise DataError(f"{path}: {layout.name} data must be pixel values in 0..255")
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.ndim != 1 or len(labels) != len(data):
        raise DataError(f"{path}: {layout.name} batch has data of shape {data.shape} and {labels.size} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= layout.num_classes):
        raise DataError(f"{path}: {layout.name} labels must lie in 0..{layout.num_classes - 1}")
    # Both checked above, so the casts keep every value (a real batch's uint8 pixels are not copied).
    return data.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _integers(values, name: str, path: Path, layout: CifarLayout) -> np.ndarray:
    """`values` as an array of integers in their own dtype, or a DataError: casting floats (normalised pixels, say)
    to integers would change them without a word. The caller checks the range before it casts."""
    try:
        array = np.asarray(values)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: {layout.name} batch holds {name} that are not numbers ({e})") from None
    if array.size and array.dtype.kind not in "iu":
        raise DataError(f"{path}: {layout.name} batch holds {name} that are not integers ({array.dtype} values)")
    return array


def _write_cifar_batch(path: str | Path, images, labels, label_key: str) -> None:
    images = np.asarray(images, dtype=np.uint8)
    entry = {"batch_label": Path(path).name, label_key: list(map(int, labels)), "data": images.reshape(len(images), -1)}
    with open(path, "wb") as f:
        pickle.dump(entry, f)


def write_cifar10_batch(path: str | Path, images: np.ndarray, labels) -> None:
    """Write images `[N, 3, 32, 32]` uint8 as one pickled CIFAR-10 batch (for tests and small demos)."""
    _write_cifar_batch(path, images, labels, CIFAR10.label_key)


def write_cifar100_batch(path: str | Path, images: np.ndarray, fine_labels) -> None:
    """Write images `[N, 3, 32, 32]` uint8 and labels 0..99 as a CIFAR-100 file (`train` or `test`)."""
    _write_cifar_batch(path, images, fine_labels, CIFAR100.label_key)


# ----------------------------------------------------------------------------------------------
# Folders of images


@dataclass
class FolderSplit:
    """The images of one split of a folder data set: paths relative to `root`, labels, the class names."""

    root: Path
    files: list[str]
    labels: list[int]
    classes: list[str]


def folder_split(root: str | Path, split: str) -> FolderSplit | None:
    """The `split` ("train", "valid" or "test") of the folder data set in `root`.

    With a `train/` sub-folder: `train/` is the training split, `val/` the validation split (the
    search's architecture data), and `test/`, or else `val/`, the test split; without `val/` and
    `test/`, the test split is drawn from `train/` as below. Without `train/`: every sub-folder of
    `root` is a class, and TEST_FRACTION of each class's images (one at least, from a class of two
    or more) is the test split. The classes are the training split's sub-folders, in name order;
    a class folder may hold its images in sub-folders of its own. Returns None for "valid" when
    there is no `val/`. Each split's images come in a fixed shuffled order, so that the first part
    of the training split (DARTS's --train_portion) holds every class.
    """
    root = _directory(root, "folder data")
    train_dir = root / "train"
    held_out = [name for name in ("val", "test") if _is_directory(root / name)]
    if not _is_directory(train_dir):
        if held_out:
            raise DataError(f"{root} has a {held_out[0]}/ folder but no train/ folder")
        train_dir = root
    classes = _class_names(train_dir)
    if split == "valid":
        if train_dir == root or "val" not in held_out:
            return None
        return _shuffled(_scan(root / "val", classes, train_dir), split)
    if train_dir != root and held_out:
        if split == "train":
            return _shuffled(_scan(train_dir, classes), split)
        return _shuffled(_scan(root / ("test" if "test" in held_out else "val"), classes, train_dir), split)
    everything = _scan(train_dir, classes)
    labels = np.array(everything.labels)
    rng = np.random.default_rng(SPLIT_SEED)
    in_test = np.zeros(len(labels), dtype=bool)
    for c in range(len(classes)):
        members = np.flatnonzero(labels == c)
        count = max(1, round(TEST_FRACTION * len(members))) if len(members) > 1 else 0
        in_test[rng.permutation(members)[:count]] = True
    chosen = np.flatnonzero(in_test if split == "test" else ~in_test)
    if len(chosen) == 0:
        raise DataError(f"{train_dir}: too few images to hold out a test split (each class needs two or more)")
    files = [everything.files[i] for i in chosen]
    return _shuffled(FolderSplit(train_dir, files, labels[chosen].tolist(), classes), split)


def _shuffled(part: FolderSplit, split: str) -> FolderSplit:
    order = np.random.default_rng([SPLIT_SEED, SPLITS.index(split)]).permutation(len(part.files))
    return FolderSplit(part.root, [part.files[i] for i in order], [part.labels[i] for i in order], part.classes)


def _subfolders(directory: Path) -> list[str]:
    """The names of the sub-folders of `directory`, hidden ones left out, in name order."""
    try:
        with os.scandir(directory) as entries:
            return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())
    except OSError as e:
        raise DataError(f"{directory}: cannot list the class folders ({e.strerror})") from None


def _class_names(directory: Path) -> list[str]:
    names = _subfolders(directory)
    if len(names) < 2:
        raise DataError(
            f"{directory} holds {len(names)} class folder(s); a folder data set needs one sub-folder of images "
            "per class, two classes at least"
        )
    return names


def _scan(directory: Path, classes: list[str], train_dir: Path | None = None) -> FolderSplit:
    """The images of every class folder in `directory`; in a held-out split (`train_dir` given) a class
    may be missing, but no folder may name a class the training split lacks."""
    if train_dir is not None:
        unknown = sorted(set(_subfolders(directory)) - set(classes))
        if unknown:
            raise DataError(f"{directory / unknown[0]}: class {unknown[0]!r} has no folder in {train_dir}")
    files, labels = [], []
    for label, name in enumerate(classes):
        folder = directory / name
        if train_dir is not None and not _is_directory(folder):
            continue
        found = sorted(_image_files(folder, directory))
        if not found and train_dir is None:
            raise DataError(f"{folder} holds no images (files ending in {', '.join(IMAGE_EXTENSIONS)})")
        files += found
        labels += [label] * len(found)
    if not files:
        raise DataError(f"{directory} holds no images in its class folders")
    return FolderSplit(directory, files, labels, classes)


def _image_files(folder: Path, relative_to: Path) -> Iterator[str]:
    def fail(error: OSError):
        raise DataError(f"{error.filename}: cannot list the folder ({error.strerror})")

    for dirpath, dirnames, filenames in os.walk(folder, onerror=fail, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # hidden folders, as hidden files, are skipped
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                yield os.path.relpath(os.path.join(dirpath, name), relative_to)


@dataclass
class ImageFiles(Images):
    """A split of a folder data set read from disk: each batch's images are decoded, resized and
    augmented when it is made, by `workers` DataLoader processes ahead of the steps (by the calling
    process when `workers` is 0).

    `augmentation` "crop" makes every image as ImageData holds a preloaded folder (shorter side
    resized to `image_size`, centre square) and augments it the same way (a random crop of the
    image padded by image_size // 8, a flip). "imagenet" is DARTS's ImageNet pipeline: training
    batches take a random resized crop (8 % to 100 % of the area, aspect ratio 3/4 to 4/3) of the
    full-resolution image, a flip and colour jitter (brightness, contrast and saturation 0.4, hue
    0.2), test batches the centre crop of the image resized to 8/7 of `image_size` (256 for 224).
    """

    root: str
    files: np.ndarray  # relative paths as bytes, one buffer: workers read it without copying it page by page
    labels: torch.Tensor
    num_classes: int
    image_size: int
    augmentation: str
    workers: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    in_channels: int = 3

    def path(self, index: int) -> str:
        return os.path.join(self.root, os.fsdecode(self.files[index]))

    def pixels(self, indices, generator, augment, keep=slice(None)):
        size = self.image_size
        if self.augmentation == "imagenet":
            if augment:
                # The other images' draws are replayed from their headers, so that this part's images, and the
                # draws that follow (cutout), are those of the whole batch.
                start, stop, _ = keep.indices(len(indices))
                for i in indices[:start].tolist():
                    _imagenet_draws(*_image_size(self.path(i)), generator)
                images = [_imagenet_train_image(self.path(i), size, generator) for i in indices[keep].tolist()]
                for i in indices[stop:].tolist():
                    _imagenet_draws(*_image_size(self.path(i)), generator)
            else:
                images = [_centre_square(_open_rgb(self.path(i), _RESIZE * size), size, 1 / _RESIZE)
                          for i in indices[keep].tolist()]  # fmt: skip
            return _to_tensor(images)
        x = _to_tensor([_centre_square(_open_rgb(self.path(i), size), size) for i in indices[keep].tolist()])
        if augment:
            x = random_crop_flip(x, size // 8, True, generator, len(indices), keep)
        return x

    def iterate(self, jobs):
        if self.workers == 0:
            yield from super().iterate(jobs)
            return
        yield from _in_workers(self.make, [(job,) for job in jobs], self.workers)

    def preload(self) -> ImageData:
        """The split decoded into memory (by the workers), augmented there the way it would be here."""
        if self.augmentation != "crop":
            raise ValueError("only a folder with the crop augmentation can be held in memory")
        chunks = torch.arange(len(self)).split(PRELOAD_CHUNK)
        jobs = [(chunk, None, False) for chunk in chunks]
        parts = _in_workers(self.pixels, jobs, self.workers) if self.workers else (self.pixels(*j) for j in jobs)
        size = self.image_size
        images = torch.empty(len(self), 3, size, size)
        for chunk, part in zip(chunks, parts):
            images[chunk] = part
        return ImageData(images, self.labels, self.num_classes, self.mean, self.std, self.image_size // 8, True)


# DARTS's ImageNet test images: resized to 256 for a 224-pixel centre crop.
_RESIZE = 256 / 224


def _open_rgb(path: str, draft: float | None = None) -> Image.Image:
    """The image at `path` in RGB; with `draft`, a JPEG may be decoded at a reduced scale that keeps both
    sides at least `draft` pixels (libjpeg's DCT scaling: a large photo decodes several times faster)."""
    try:
        with Image.open(path) as image:
            if draft is not None:
                image.draft("RGB", (math.ceil(draft), math.ceil(draft)))
            return image.convert("RGB")
    except Exception as e:  # Pillow's decoders raise many kinds of error on a damaged file: name the file, in one line
        raise DataError(f"{path}: cannot read the image ({summary(e)})") from None


def _centre_square(image: Image.Image, size: int, fraction: float = 1.0) -> Image.Image:
    """The centre square of side `fraction` x the shorter side, resized to `size` x `size` (one bilinear,
    antialiased resampling: torchvision's Resize of the shorter side, then CenterCrop)."""
    w, h = image.size
    side = min(w, h) * fraction
    left, top = (w - side) / 2, (h - side) / 2
    return image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _imagenet_train_image(path: str, size: int, generator: torch.Generator) -> Image.Image:
    """torchvision's RandomResizedCrop(size), RandomHorizontalFlip() and ColorJitter(0.4, 0.4, 0.4, 0.2), as DARTS
    trains on ImageNet, drawn from `generator`."""
    image = _open_rgb(path)
    box, mirror, factors, order = _imagenet_draws(*image.size, generator)
    image = image.resize((size, size), Image.Resampling.BILINEAR, box=box)
    if mirror:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for k in order:  # the four adjustments in a random order
        if k == 0:
            image = ImageEnhance.Brightness(image).enhance(factors[0])
        elif k == 1:
            image = ImageEnhance.Contrast(image).enhance(factors[1])
        elif k == 2:
            image = ImageEnhance.Color(image).enhance(factors[2])
        else:
            image = _shift_hue(image, factors[3])
    return image


def _image_size(path: str) -> tuple[int, int]:
    """The width and height of the image at `path`, from its header (nothing is decoded)."""
    try:
        with Image.open(path) as image:
            return image.size
    except Exception as e:
        raise DataError(f"{path}: cannot read the image ({summary(e)})") from None


def _imagenet_draws(w: int, h: int, generator: torch.Generator):
    """The random draws of _imagenet_train_image for a `w` x `h` image, in its order: the crop box, the mirror
    coin, the jitter factors and their order. They depend on the image's size alone, so a process making its
    part of a batch replays those of the batch's other images from their headers."""
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    for _ in range(10):
        area = w * h * _uniform(generator, *scale)
        aspect = math.exp(_uniform(generator, math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (), generator=generator))
            left = int(torch.randint(0, w - cw + 1, (), generator=generator))
            break
    else:  # ten misses: the centre crop of the allowed aspect ratio nearest the image's
        aspect = min(max(w / h, ratio[0]), ratio[1])
        cw, ch = min(w, round(h * aspect)), min(h, round(w / aspect))
        top, left = (h - ch) // 2, (w - cw) // 2
    mirror = float(torch.rand((), generator=generator)) < 0.5
    factors = [_uniform(generator, 0.6, 1.4) for _ in range(3)] + [_uniform(generator, -0.2, 0.2)]
    order = torch.randperm(4, generator=generator).tolist()
    return (left, top, left + cw, top + ch), mirror, factors, order


def _shift_hue(image: Image.Image, shift: float) -> Image.Image:
    """Rotate the hue by `shift` turns (torchvision's adjust_hue on a PIL image: 8-bit hue, wrapping around)."""
    hue, saturation, value = image.convert("HSV").split()
    turned = (np.asarray(hue, dtype=np.int16) + round(shift * 255)) % 256
    return Image.merge("HSV", (Image.fromarray(turned.astype(np.uint8)), saturation, value)).convert("RGB")


def _to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    pixels = np.stack([np.asarray(image, dtype=np.uint8) for image in images])  # [N, H, W, 3]
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous().float().div_(255.0)


class _Failed:
    """A DataError met in a worker process, carried to the main process as a value: raised there, it
    stays one line (the DataLoader would wrap an exception in the worker's traceback)."""

    def __init__(self, message: str):
        self.message = message


class _Jobs(torch.utils.data.Dataset):
    """Item i is `make(*jobs[i])`: a whole batch, made in a worker process."""

    def __init__(self, make, jobs: list[tuple]):
        self.make, self.jobs = make, jobs

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i):
        try:
            return self.make(*self.jobs[i])
        except DataError as e:
            return _Failed(str(e))


def _quiet_worker(worker_id: int) -> None:
    # Ctrl-C or a scheduler's SIGTERM reaches the whole process group: the main process finishes its
    # step and saves, and it ends the workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _in_workers(make, jobs: list[tuple], workers: int) -> Iterator:
    """`make(*job)` for every job, in order, computed by `workers` processes that keep two jobs each ahead."""
    # The loader's own generator: it draws the workers' base seed (which nothing here uses), and drawing it
    # from torch's global one would shift the run's drop-path masks against a run resumed mid-epoch.
    loader = torch.utils.data.DataLoader(_Jobs(make, jobs), batch_size=None, num_workers=workers,
                                         worker_init_fn=_quiet_worker, prefetch_factor=2,
                                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    made = iter(loader)
    try:
        for item in made:
            if isinstance(item, _Failed):
                raise DataError(item.message)
            yield item
    finally:
        del made  # the iterator's finaliser ends the workers, also when the caller stops early


# ----------------------------------------------------------------------------------------------
# Choosing a data set


def load_dataset(name: str, root: str | Path | None = None, split: str = "train", *, image_size: int | None = None,
                 workers: int = 0, preload_mb: float = 2048) -> Images | None:  # fmt: skip
    """The `split` ("train", "valid" or "test") of data set `name`, read from `root` when it needs a directory.

    "valid" is a validation split of the data set's own (a folder's `val/`), None when it has none.
    Folders are decoded at `image_size` (default 32, imagenet 224) by `workers` processes and held in
    memory when their float32 pixels take at most `preload_mb` MiB; imagenet is always read from disk.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name in DATA_DIRECTORIES and root is None:
        raise DataError(f"--dataset {name} needs --data DIR ({DATA_DIRECTORIES[name]})")
    if name in IMAGE_DATASETS:
        part = folder_split(root, split)
        if part is None:
            return None
        size = image_size or (224 if name == "imagenet" else 32)
        augmentation = "imagenet" if name == "imagenet" else "crop"
        files = np.array([os.fsencode(f) for f in part.files], dtype=np.bytes_)
        data = ImageFiles(str(part.root), files, torch.tensor(part.labels, dtype=torch.int64), len(part.classes),
                          size, augmentation, workers)  # fmt: skip
        if augmentation == "crop" and len(data) * 3 * size * size * 4 <= preload_mb * 2**20:
            return data.preload()
        return data
    if split == "valid":
        return None
    if name == "digits":
        return load_digits(split)
    return load_cifar(root, split, CIFAR10 if name == "cifar10" else CIFAR100)


def split_indices(n: int, train_portion: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DARTS's split: the first `train_portion` of the training set trains the weights, the rest alpha."""
    split = int(np.floor(train_portion * n))
    if split == 0 or split == n:
        raise DataError(f"train_portion {train_portion} leaves an empty half of {n} training images")
    return torch.arange(split), torch.arange(split, n)


def shuffled_batches(indices: torch.Tensor, batch_size: int, generator: torch.Generator,
                     processes: int = 1) -> list[torch.Tensor]:  # fmt: skip
    """One epoch of random batches over `indices` (the last one may be smaller), like SubsetRandomSampler. A last
    batch of one image joins the one before it: batch norm cannot take batch statistics of a single image."""
    order = indices[torch.randperm(len(indices), generator=generator)]
    return fit_last_batch(list(order.split(batch_size)), processes)


def fit_last_batch(batches: list[torch.Tensor], processes: int = 1) -> list[torch.Tensor]:
    """`batches` with a last batch too small to give each of `processes` two images joined to the one before it
    (one process: a last batch of one image; batch norm cannot take batch statistics of a single image)."""
    if len(batches) > 1 and len(batches[-1]) < 2 * processes:
        batches = [*batches[:-2], torch.cat(batches[-2:])]
    return batches


def random_batch(indices: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """A fresh random batch without replacement, as DARTS draws its validation batch every step."""
    return indices[torch.randperm(len(indices), generator=generator)[:batch_size]]


def _is_directory(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a name too long to look up, say: not a directory we can use
        return False


def _directory(root: str | Path, what: str) -> Path:
    """`root` as a Path, checked to be a directory; a DataError naming `what` otherwise."""
    root = Path(root)
    status = path_stat(root, f"{what} directory", DataError)
    if status is None:
        raise DataError(f"{what} directory {root} does not exist")
    if not stat.S_ISDIR(status.st_mode):
        raise DataError(f"{what} path {root} is not a directory")
    return root
