"""Datasets by name: ``load_dataset("mnist-5k")``, ``"digits"``, ``"mnist-textures"``, ``"imagefolder:PATH"``,
``"cifar10:PATH"``, ``"npz:PATH"``.

Every loader returns a ``DataSplits``: normalised float32 (N, C, H, W) train and test tensors,
int64 labels, and what a deployment needs to normalise new inputs (mean, std, class names).
Nothing is downloaded and nothing is cached on disk.
"""
from sdb_core.data import cifar, embedded, imagefolder, npz, textures  # noqa: F401  (registers the loaders)
from sdb_core.data.base import (
    DATASETS,
    DatasetError,
    DataSplits,
    list_datasets,
    load_dataset,
    register_dataset,
    stratified_split,
    transfer_split,
)

__all__ = [
    "DATASETS", "DataSplits", "DatasetError", "list_datasets", "load_dataset", "register_dataset",
    "stratified_split", "transfer_split",
]
