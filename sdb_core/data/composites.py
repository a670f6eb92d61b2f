"""Multi-label digit composites: a grid of embedded MNIST digits, labelled by which digits appear.

``make_composites(n, split="train", grid=2, seed=0)`` returns ``(images, labels)``: images
(n, 1, 28*grid, 28*grid) float32 pixels in [0, 1], labels (n, 10) float32 multi-hot. Each cell
holds one digit of the chosen split of ``mnist-5k`` (the same fixed 4,000 / 1,000 split as
``load_dataset("mnist-5k")``, so train composites never show a test digit) or stays empty.
Labels are exact by construction: label c is 1 iff some cell holds a digit of class c.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from sdb_core.data.base import stratified_split
from sdb_core.data.embedded import _SPLIT_SEED, _mnist_5k_arrays

DIGIT = 28
NUM_LABELS = 10
# A cell is empty with this chance, so the number of digits per image varies and an image
# with a digit class absent is common (multi-label, not a fixed-size set). A composite is
# never entirely empty: an image with no positive label teaches nothing.
EMPTY_CELL = 0.25
_SPLITS = ("train", "test")


@lru_cache(maxsize=1)
def _digits_by_split() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    x, y = _mnist_5k_arrays()
    x = (x / 255.0).reshape(-1, DIGIT, DIGIT).astype(np.float32)
    train, test = stratified_split(y, 1000, _SPLIT_SEED)
    return {"train": (x[train], y[train]), "test": (x[test], y[test])}


def _draw(n: int, split: str, grid: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Which cells are filled (n, cells) and the index of the digit drawn for each (n, cells)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid must be an int >= 1, got {grid!r}")
    # The split and grid are part of the stream so that train and test (or 2x2 and 3x3) sets of
    # one seed are not the same draws.
    rng = np.random.default_rng([int(seed), _SPLITS.index(split), grid])
    cells = grid * grid
    filled = rng.random((n, cells)) >= EMPTY_CELL
    none = ~filled.any(axis=1)
    filled[none, rng.integers(0, cells, size=int(none.sum()))] = True
    pick = rng.integers(0, len(_digits_by_split()[split][0]), size=(n, cells))
    return filled, pick


def make_composites(n: int, *, split: str = "train", grid: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` composites of ``grid`` x ``grid`` cells from ``split``'s digits; deterministic in all arguments."""
    filled, pick = _draw(n, split, grid, seed)
    digits, classes = _digits_by_split()[split]
    images = np.zeros((n, 1, DIGIT * grid, DIGIT * grid), dtype=np.float32)
    labels = np.zeros((n, NUM_LABELS), dtype=np.float32)
    for c in range(grid * grid):
        r, k = divmod(c, grid)
        rows = np.flatnonzero(filled[:, c])
        images[rows, 0, r * DIGIT:(r + 1) * DIGIT, k * DIGIT:(k + 1) * DIGIT] = digits[pick[rows, c]]
        labels[rows, classes[pick[rows, c]]] = 1.0
    return images, labels


def composite_cells(n: int, *, split: str = "train", grid: int = 2, seed: int = 0) -> np.ndarray:
    """The digit class placed in every cell of ``make_composites``'s images, -1 for empty: (n, grid*grid).

    Re-draws the same stream, so it describes exactly the images of the same arguments.
    """
    filled, pick = _draw(n, split, grid, seed)
    return np.where(filled, _digits_by_split()[split][1][pick], -1)
