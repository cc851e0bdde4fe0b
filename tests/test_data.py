import pickle

import numpy as np
import pytest
import torch

from fastdarts.data import (
    CIFAR10_TRAIN_FILES,
    load_cifar10,
    load_digits,
    random_batch,
    random_crop_flip,
    random_cutout,
    shuffled_batches,
    split_indices,
    write_cifar10_batch,
)
from fastdarts.errors import DataError


def make_cifar_dir(root, per_batch=4, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for name in (*CIFAR10_TRAIN_FILES, "test_batch"):
        write_cifar10_batch(root / name, rng.integers(0, 256, (per_batch, 3, 32, 32)), rng.integers(0, 10, per_batch))
    return root


def test_digits_are_bundled_split_and_normalised():
    train, test = load_digits("train"), load_digits("test")
    assert train.images.shape == (1437, 1, 8, 8) and test.images.shape == (360, 1, 8, 8)
    both = torch.cat([train.images, test.images])
    assert both.min() == 0 and both.max() == 1
    for data in (train, test):
        assert data.num_classes == 10
        x, y = data.batch(torch.arange(len(data)))
        assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05
        assert torch.bincount(y, minlength=10).min() >= 30  # every class, in near-equal numbers


def test_cutout_zeroes_one_clipped_square_per_image():
    x = torch.ones(64, 2, 8, 8)
    out = random_cutout(x, 4, torch.Generator().manual_seed(0))
    zeros = (out == 0).all(1)  # the same square in every channel
    assert torch.equal(zeros, (out == 0).any(1))
    sizes = zeros.sum((1, 2))
    assert sizes.max() == 16 and sizes.min() >= 4  # whole inside, or clipped at a corner to 2x2
    for mask in zeros:  # a rectangle: its bounding box is full
        rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
        assert mask.sum() == len(rows) * len(cols)
    assert torch.equal(random_cutout(x, 4, torch.Generator().manual_seed(0)), out)


def test_cifar10_reader_round_trip(tmp_path):
    root = make_cifar_dir(tmp_path / "cifar-10-batches-py")
    data = load_cifar10(root)
    assert data.images.shape == (20, 3, 32, 32) and data.labels.dtype == torch.int64
    # The parent directory works too, and pixels come back exactly.
    again = load_cifar10(tmp_path)
    assert torch.equal(again.images, data.images)
    with open(root / "data_batch_1", "rb") as f:
        raw = pickle.load(f)
    assert torch.equal((data.images[:4] * 255).round().to(torch.uint8).reshape(4, -1), torch.from_numpy(raw["data"]))


def test_cifar10_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_cifar10(tmp_path / "nope")
    root = make_cifar_dir(tmp_path / "c")
    (root / "data_batch_3").unlink()
    with pytest.raises(DataError, match="missing data_batch_3"):
        load_cifar10(root)
    (root / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot read CIFAR-10 batch"):
        load_cifar10(root)


@pytest.mark.parametrize(
    "data,labels,message",
    [
        (np.full((2, 3072), 0.5, np.float32), [0, 1], "holds data that are not integers"),  # normalised pixels
        (np.full((2, 3072), 256, np.int64), [0, 1], "must be pixel values in 0..255"),
        (np.full((2, 3072), -1, np.int16), [0, 1], "must be pixel values in 0..255"),
        (np.zeros((2, 3072), np.uint8), [0.0, 1.5], "holds labels that are not integers"),
        (np.zeros((2, 3072), np.uint8), ["a", "b"], "holds labels that are not integers"),
    ],
    ids=["float-pixels", "pixel-256", "pixel-negative", "float-labels", "string-labels"],
)
def test_cifar10_batch_with_values_a_cast_would_change_is_refused(tmp_path, data, labels, message):
    root = make_cifar_dir(tmp_path / "c")
    with open(root / "data_batch_2", "wb") as f:
        pickle.dump({"data": data, "labels": labels}, f)
    with pytest.raises(DataError, match=rf"data_batch_2: CIFAR-10 .*{message}"):
        load_cifar10(root)


def test_augmentation_is_a_shifted_crop_with_zero_padding():
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(50, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    out = random_crop_flip(x, 1, False, g)
    assert out.shape == x.shape
    # Every output is the input shifted by at most one pixel, with zeros coming in.
    padded = torch.nn.functional.pad(x[0], (1, 1, 1, 1))
    windows = {tuple(padded[0, dy : dy + 4, dx : dx + 4].flatten().tolist()) for dy in range(3) for dx in range(3)}
    assert all(tuple(o.flatten().tolist()) in windows for o in out)
    assert len({tuple(o.flatten().tolist()) for o in out}) > 3
    flipped = random_crop_flip(x, 0, True, g)
    assert {tuple(o[0, 0].tolist()) for o in flipped} == {(0.0, 1.0, 2.0, 3.0), (3.0, 2.0, 1.0, 0.0)}


def test_split_and_batches():
    train, val = split_indices(11, 0.5)
    assert train.tolist() == [0, 1, 2, 3, 4] and val.tolist() == list(range(5, 11))
    g = torch.Generator().manual_seed(0)
    batches = shuffled_batches(train, 2, g)
    assert [len(b) for b in batches] == [2, 3]  # a last batch of one image joins the one before
    assert sorted(torch.cat(batches).tolist()) == train.tolist()
    assert [len(b) for b in shuffled_batches(torch.arange(6), 2, g)] == [2, 2, 2]
    assert [len(b) for b in shuffled_batches(torch.arange(1), 2, g)] == [1]
    b = random_batch(val, 4, g)
    assert len(set(b.tolist())) == 4 and set(b.tolist()) <= set(val.tolist())
    with pytest.raises(DataError, match="empty"):
        split_indices(3, 0.1)
