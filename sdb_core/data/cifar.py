"""``cifar10:PATH`` and ``cifar100:PATH``: the python-pickle releases of CIFAR on the user's disk.

PATH is the folder holding the batch files or its parent (holding ``cifar-10-batches-py`` or
``cifar-100-python``). Pickle is the format of these releases, so it is read, but through an
unpickler that only rebuilds numpy arrays: a tampered file cannot run code, it is rejected.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdb_core.data.base import DatasetError, DataSplits, make_splits, register_dataset

# What numpy arrays, bytes and lists need to be unpickled under protocols 2 to 5, nothing more.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


@dataclass(frozen=True)
class _Layout:
    name: str
    folder: str
    train: tuple[str, ...]
    test: str
    label_key: str
    meta: str
    names_key: str
    num_classes: int


CIFAR10 = _Layout("cifar10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch",
                  "labels", "batches.meta", "label_names", 10)
CIFAR100 = _Layout("cifar100", "cifar-100-python", ("train",), "test", "fine_labels", "meta", "fine_label_names", 100)


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR file")
        return super().find_class(module, name)


def _load_dict(file: Path) -> dict[str, object]:
    try:
        with open(file, "rb") as f:
            obj = _ArraysOnly(f, encoding="bytes").load()
    except Exception as e:  # a corrupt pickle can raise nearly anything; all mean "malformed"
        raise DatasetError(f"malformed CIFAR pickle {file}: {type(e).__name__}: {e}") from e
    if not isinstance(obj, dict):
        raise DatasetError(f"malformed CIFAR pickle {file}: expected a dict, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _batch(file: Path, layout: _Layout) -> tuple[np.ndarray, np.ndarray]:
    d = _load_dict(file)
    missing = [k for k in ("data", layout.label_key) if k not in d]
    if missing:
        raise DatasetError(f"malformed CIFAR pickle {file}: missing keys {missing}")
    data, labels = d["data"], np.asarray(d[layout.label_key])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise DatasetError(f"malformed CIFAR pickle {file}: 'data' must be uint8 (N, 3072), got {shape}")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"malformed CIFAR pickle {file}: {len(data)} images but labels of shape {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= layout.num_classes):
        raise DatasetError(f"malformed CIFAR pickle {file}: labels outside 0..{layout.num_classes - 1}")
    return data, labels.astype(np.int64)


def _find_folder(path: Path | None, layout: _Layout) -> Path:
    if path is None:
        raise DatasetError(f"{layout.name} needs a path: '{layout.name}:PATH'")
    if not path.exists():
        raise DatasetError(f"{layout.name} path {path} does not exist")
    for folder in (path, path / layout.folder):
        if (folder / layout.test).is_file() or (folder / layout.train[0]).is_file():
            return folder
    raise DatasetError(
        f"no {layout.name} files in {path}: expected {', '.join(layout.train)} and {layout.test} "
        f"there or in {path / layout.folder}"
    )


def _class_names(folder: Path, layout: _Layout) -> list[str]:
    file = folder / layout.meta
    if not file.is_file():
        return [str(i) for i in range(layout.num_classes)]
    names = _load_dict(file).get(layout.names_key)
    if not isinstance(names, list) or len(names) != layout.num_classes:
        raise DatasetError(f"malformed CIFAR meta {file}: '{layout.names_key}' must list {layout.num_classes} names")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def _load(path: Path | None, layout: _Layout, image_size: int | None) -> DataSplits:
    folder = _find_folder(path, layout)
    for f in (*layout.train, layout.test):
        if not (folder / f).is_file():
            raise DatasetError(f"{layout.name} file {folder / f} is missing")
    parts = [_batch(folder / f, layout) for f in layout.train]
    x_test, y_test = _batch(folder / layout.test, layout)
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    labels = _class_names(folder, layout)

    def pixels(x: np.ndarray) -> np.ndarray:
        out = x.reshape(-1, 3, 32, 32).astype(np.float32)
        out /= 255.0
        return out

    return make_splits(f"{layout.name}:{path}", pixels(x_train), y_train, pixels(x_test), y_test, labels, image_size)


@register_dataset
def cifar10(path: Path | None, *, image_size: int | None = None, seed: int = 0) -> DataSplits:
    return _load(path, CIFAR10, image_size)


@register_dataset
def cifar100(path: Path | None, *, image_size: int | None = None, seed: int = 0) -> DataSplits:
    return _load(path, CIFAR100, image_size)
