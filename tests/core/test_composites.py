"""Multi-label digit composites: labels are exactly the digits placed, splits never mix, draws repeat."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sdb_core.data import load_dataset
from sdb_core.data.composites import composite_cells, make_composites


@pytest.fixture(scope="module")
def digit_index() -> dict[str, dict[bytes, int]]:
    """Every mnist-5k digit of each split, keyed by its 8-bit pixels, read through the public loader."""
    data = load_dataset("mnist-5k")
    out = {}
    for split in ("train", "test"):
        x, y = getattr(data, split).tensors
        raw = x * torch.tensor(data.std).view(-1, 1, 1) + torch.tensor(data.mean).view(-1, 1, 1)
        pix = (raw * 255).round().clamp(0, 255).to(torch.uint8).numpy().reshape(len(x), -1)
        out[split] = {row.tobytes(): int(c) for row, c in zip(pix, y.tolist())}
    return out


def cells_of(images: np.ndarray, grid: int) -> np.ndarray:
    """(n, grid*grid, 784) 8-bit crops in row-major cell order."""
    n = len(images)
    crops = images.reshape(n, grid, 28, grid, 28).transpose(0, 1, 3, 2, 4).reshape(n, grid * grid, 784)
    return np.round(crops * 255).astype(np.uint8)


@pytest.mark.parametrize("split,grid", [("train", 2), ("test", 2), ("test", 3)])
def test_labels_are_exactly_the_digits_placed(digit_index, split, grid):
    images, labels = make_composites(200, split=split, grid=grid, seed=3)
    assert images.shape == (200, 1, 28 * grid, 28 * grid) and images.dtype == np.float32
    assert labels.shape == (200, 10) and labels.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    other = "test" if split == "train" else "train"
    crops = cells_of(images, grid)
    placed = composite_cells(200, split=split, grid=grid, seed=3)
    empty_seen = 0
    for i in range(200):
        found = set()
        for c in range(grid * grid):
            key = crops[i, c].tobytes()
            if not crops[i, c].any():
                empty_seen += 1
                assert placed[i, c] == -1
                continue
            # Each filled cell is one whole digit of this split, never one of the other split.
            assert key in digit_index[split] and key not in digit_index[other]
            assert digit_index[split][key] == placed[i, c]
            found.add(digit_index[split][key])
        assert found, "a composite with no digit"
        assert set(np.flatnonzero(labels[i]).tolist()) == found
    assert empty_seen > 0  # some cells are empty, so the number of digits varies


def test_deterministic_and_seeded():
    a = make_composites(50, seed=1)
    b = make_composites(50, seed=1)
    c = make_composites(50, seed=2)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    assert not np.array_equal(make_composites(50, split="test", seed=1)[0], a[0])


def test_every_label_occurs_and_none_is_constant():
    _, labels = make_composites(1000, seed=0)
    rate = labels.mean(0)
    assert (rate > 0.15).all() and (rate < 0.4).all()
    assert (labels.sum(1) >= 1).all() and (labels.sum(1) <= 4).all()


@pytest.mark.parametrize("kwargs", [{"n": -1}, {"n": 2, "split": "val"}, {"n": 2, "grid": 0}, {"n": 1.5}])
def test_bad_arguments(kwargs):
    n = kwargs.pop("n")
    with pytest.raises(ValueError):
        make_composites(n, **kwargs)
