"""What every dataset loader returns, the dataset registry, and the shared split helpers.

A loader reads raw pixels in [0, 1] and hands them to ``make_splits``, which resizes,
computes the per-channel statistics on the train split and normalises both splits, so
every set is normalised the same way: ``x = (pixel / 255 - mean) / std``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from sdb_core.registry import Registry

DATASETS: Registry = Registry("dataset")


def register_dataset(fn=None, *, name: str | None = None):
    """Register a loader ``fn(path: Path | None, *, image_size: int | None, seed: int) -> DataSplits``."""
    return DATASETS.register(fn, name=name)


class DatasetError(ValueError):
    """A dataset that cannot be loaded: the message names the path and the problem."""


@dataclass(frozen=True, eq=False)
class DataSplits:
    name: str
    train: TensorDataset
    test: TensorDataset
    num_classes: int
    in_shape: tuple[int, ...]  # (C, H, W) for images; any (C, ...) for sets built by hand (signals, features)
    mean: tuple[float, ...]  # per channel (the first dimension of in_shape), or one value (a plain number too)
    std: tuple[float, ...]
    labels: list[str]  # one name per class, in class-index order, or none ([]: numbered)

    def __post_init__(self) -> None:
        # One value for every channel may come as a plain number (0.5, np.float32(0.5)): kept as the one-value
        # tuple that everything reading mean and std iterates over. No labels (None) are numbered ones: [].
        for what in ("mean", "std"):
            v = getattr(self, what)
            if not isinstance(v, str) and np.ndim(v) == 0:
                object.__setattr__(self, what, (float(v),))
        if self.labels is None:
            object.__setattr__(self, "labels", [])

    def normalize(self, raw: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Normalise raw values in [0, 1] like this set's inputs: one input (C, ...) of the inputs' rank, or a
        batch (N, C, ...); an image may have another size than the set's."""
        x = raw.float() if isinstance(raw, torch.Tensor) else torch.from_numpy(np.asarray(raw, dtype=np.float32))
        rank, c = len(self.in_shape), self.in_shape[0]
        if x.dim() not in (rank, rank + 1) or x.shape[-rank] != c:
            raise ValueError(f"expected one input {tuple(self.in_shape)} or a batch of them, with C={c} "
                             f"channels first, got {tuple(x.shape)}")
        shape = (-1, *([1] * (rank - 1)))
        return (x - torch.tensor(self.mean).view(shape)) / torch.tensor(self.std).view(shape)

    def checked(self) -> DataSplits:
        """These splits as the recipes take them, or a :class:`DatasetError` that says what is wrong.

        Splits built by hand (``DataSplits(...)`` from a user's own tensors) come with numpy's habits:
        float64 inputs and int32 labels (or a column of them) are converted to float32 and int64 (the
        recipes train and export in float32). What cannot be converted is refused in the owner's terms,
        not as an index or dtype error deep in a loss: integer inputs (token ids: a key cannot be blended
        into them, nor a student trained on them), NaN or Inf inputs, labels that are not class indices
        in ``[0, num_classes)``, inputs whose shape is not ``in_shape``, an empty split, label names that are not
        one per class (the bundle refuses them, after training).
        """
        if self.num_classes < 2:
            raise DatasetError(f"a classifier needs at least 2 classes, num_classes is {self.num_classes}")
        if len(self.labels) not in (0, self.num_classes):
            raise DatasetError(f"data.labels has {len(self.labels)} names for num_classes={self.num_classes}: one "
                               "name per class, in class-index order (or [] for numbered classes)")
        self._check_normalisation()
        splits = {}
        for split in ("train", "test"):
            tensors = getattr(self, split).tensors
            if len(tensors) != 2:
                raise DatasetError(f"data.{split} must hold (inputs, labels), got {len(tensors)} tensors")
            splits[split] = TensorDataset(self._checked_inputs(split, tensors[0]),
                                          self._checked_labels(split, tensors[1], len(tensors[0])))
        for split, what in (("train", "the box is trained on it"), ("test", "the box is measured on it")):
            if len(splits[split]) == 0:
                raise DatasetError(f"data.{split} is empty: {what}")
        return replace(self, **splits)

    def _check_normalisation(self) -> None:
        """``mean`` and ``std``: finite, one value or one per channel, every std > 0. A std of 0 (a constant
        channel, measured) divides by zero wherever inputs are normalised: in a box's key (a pixel key is
        normalised like the inputs: Inf, and every loss NaN) and in the service's image decoding."""
        c = self.in_shape[0] if self.in_shape else 1
        for what, values in (("mean", self.mean), ("std", self.std)):
            v = [float(a) for a in values]
            if len(v) not in (1, c) or not all(math.isfinite(a) for a in v):
                raise DatasetError(f"data.{what} is {tuple(values)}: one finite value, or one per channel ({c}), "
                                   "as a tuple")
        zero = [i for i, s in enumerate(self.std) if not float(s) > 0]
        if zero:
            raise DatasetError(f"data.std is {tuple(self.std)}: channel {zero[0]} has std {self.std[zero[0]]}, and "
                               "normalising divides by it (a constant channel: give it std 1, as the loaders do)")

    def _checked_inputs(self, split: str, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != tuple(self.in_shape):
            raise DatasetError(f"data.{split}'s inputs have shape {tuple(x.shape)}; in_shape is {tuple(self.in_shape)}, "
                               f"so they must be (N, {', '.join(map(str, self.in_shape))})")
        if not x.is_floating_point():
            from ..bundle import IDS_ADVICE

            raise DatasetError(f"data.{split}'s inputs are {x.dtype}: the recipes take real-valued inputs (students are "
                               "trained on them). Values (pixels as bytes): give them as floats, normalised as "
                               f"data.mean and data.std say. Token ids or other indices: {IDS_ADVICE}")
        # On the CPU, as the built-in sets are: the recipes move each batch to their device, and index, split and
        # stratify the labels with numpy (a set the caller built on a GPU failed there, in .numpy()).
        x = x.float().cpu()
        bad = ~torch.isfinite(x.flatten(1)).all(1) if len(x) else torch.zeros(0, dtype=torch.bool)
        if bad.any():
            raise DatasetError(f"data.{split} has {int(bad.sum())} input(s) with NaN or Inf values (the first at "
                               f"index {int(bad.nonzero()[0])})")
        return x

    def _checked_labels(self, split: str, y: torch.Tensor, n: int) -> torch.Tensor:
        if tuple(y.shape) == (n, 1):  # a column of labels, as scikit-learn and Keras keep them
            y = y.reshape(n)
        if tuple(y.shape) != (n,):
            raise DatasetError(f"data.{split}'s labels have shape {tuple(y.shape)}: one class index per input, ({n},)")
        if y.is_floating_point():
            if not torch.equal(y, y.round()):
                raise DatasetError(f"data.{split}'s labels are fractional {y.dtype}: give class indices, not "
                                   "probabilities")
        elif y.is_complex():
            raise DatasetError(f"data.{split}'s labels are {y.dtype}: give class indices")
        y = y.long().cpu()
        out = (y < 0) | (y >= self.num_classes)
        if out.any():
            raise DatasetError(f"data.{split} has {int(out.sum())} label(s) outside [0, {self.num_classes}) (e.g. "
                               f"{int(y[out][0])} at index {int(out.nonzero()[0])}): labels are class indices "
                               f"below num_classes")
        return y


def load_dataset(name: str, *, root: str | None = None, image_size: int | None = None, seed: int = 0) -> DataSplits:
    """Load a dataset by name: ``mnist-5k``, ``digits``, ``imagefolder:PATH``, ``cifar10:PATH``, ...

    The part after ':' is the path; a relative path is taken under ``root`` when given, and
    ``root`` alone is the path when the name has none. ``image_size`` resizes to a square
    (``imagefolder`` defaults to 32; other sets keep their native size). The train/test
    splits of real sets are fixed, independent of ``seed``, so that results stay comparable;
    ``seed`` is for sets that are generated.
    """
    kind, sep, raw_path = name.partition(":")
    loader = DATASETS.get(kind.strip().lower())
    path = None
    if sep and raw_path:
        path = Path(raw_path).expanduser()
        if root is not None and not path.is_absolute():
            path = Path(root).expanduser() / path
    elif root is not None:
        path = Path(root).expanduser()
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    return loader(path, image_size=image_size, seed=seed)


def list_datasets() -> list[str]:
    return DATASETS.names()


def make_splits(name: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                labels: list[str], image_size: int | None = None) -> DataSplits:
    """Build normalised splits, per channel, from float32 pixels in [0, 1], (N, C, H, W), or from values of any
    scale, float64 or float32: feature vectors (N, D) (each feature a channel) or signals (N, C, L) (each channel
    over its length), normalised in their own precision, then float32; may work in place."""
    images = np.ndim(x_train) == 4
    xs = [torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32 if images else None)) for x in (x_train, x_test)]
    if image_size is not None and images and xs[0].shape[-2:] != (image_size, image_size):
        xs = [_resize(x, image_size) for x in xs]
    xtr, xte = xs
    dims = (0, *range(2, xtr.dim()))  # all but the channel axis
    per_channel = (-1,) + (1,) * (xtr.dim() - 2)
    if images:
        mean, std = xtr.mean(dim=dims), xtr.std(dim=dims, correction=0)
    else:  # any scale: the statistics of x / max |x|, scaled back (a column of 1e200s has a variance no float holds)
        scale = xtr.abs().amax(dim=dims) if len(xtr) else torch.ones(xtr.shape[1], dtype=xtr.dtype)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        unit = xtr / scale.view(per_channel)
        mean, std = unit.mean(dim=dims) * scale, unit.std(dim=dims, correction=0) * scale
    # A constant channel has std 0; dividing by 1 keeps it finite instead of inventing a scale.
    std = torch.where(std > 0, std, torch.ones_like(std))
    for x in (xtr, xte):
        x.sub_(mean.view(per_channel)).div_(std.view(per_channel))
    xtr, xte = xtr.float(), xte.float()
    ys = [torch.as_tensor(np.asarray(y), dtype=torch.int64) for y in (y_train, y_test)]
    return DataSplits(
        name=name, train=TensorDataset(xtr, ys[0]), test=TensorDataset(xte, ys[1]),
        num_classes=len(labels), in_shape=tuple(int(d) for d in xtr.shape[1:]),
        mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std), labels=list(labels),
    )


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if len(x) == 0:
        return x.new_zeros((0, x.shape[1], size, size))
    out = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out.clamp_(0.0, 1.0)


def stratified_split(y: np.ndarray, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) indices with each class's share of the test split proportional to its size.

    Rounding goes to the largest remainders so the test split has exactly ``n_test`` items, and
    no class gives up its last example while another can still give one. When ``n_test`` leaves room for
    it, every class that can spare an example (two or more) gives at least one, taken from the classes
    furthest above their share: a rare class's quota rounds to 0 (2 of 642 examples, n_test 97: 0.3), and a
    held-out split without it measures nothing of it. Where every quota is 1 or more, nothing changes.
    """
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    n_test = min(n_test, int((counts - 1).sum()))
    quota = counts * n_test / len(y)
    take = np.minimum(np.floor(quota).astype(int), counts - 1)
    spare = counts >= 2
    if ((take == 0) & spare).any() and n_test >= spare.sum():
        take[spare] = np.maximum(take[spare], 1)
        while take.sum() > n_test:  # some class has 2 or more here: n_test >= one per sparing class
            k = int(np.argmax(np.where(take > 1, take - quota, -np.inf)))
            take[k] -= 1
    order = np.argsort(-(quota - take), kind="stable")
    while take.sum() < n_test:
        for k in order:
            if take.sum() < n_test and take[k] < counts[k] - 1:
                take[k] += 1
    test = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:t] for c, t in zip(classes, take)])
    mask = np.zeros(len(y), dtype=bool)
    mask[test] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def transfer_split(data: DataSplits, n: int, seed: int) -> TensorDataset:
    """``n`` examples of the TRAIN split, seeded and as class-balanced as the class sizes allow.

    Used to build distillation transfer sets. Each class is shuffled and dealt out in rounds
    (one example per class per round, classes in random order), then the first ``n`` are kept:
    a class that runs short simply stops contributing and the others fill in.
    """
    x, y = data.train.tensors
    chosen = transfer_indices(data, n, seed)
    return TensorDataset(x[chosen], y[chosen])


def transfer_indices(data: DataSplits, n: int, seed: int) -> torch.Tensor:
    """The indices into the train split that ``transfer_split`` takes, in its order."""
    _, y = data.train.tensors
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(y):
        raise ValueError(f"n must be an int in [1, {len(y)}] (the train split size), got {n!r}")
    rng = np.random.default_rng(seed)
    labels = y.numpy()
    rank = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rank[rng.permutation(idx)] = np.arange(len(idx))
    chosen = np.lexsort((rng.random(len(labels)), rank))[:n]
    return torch.from_numpy(rng.permutation(chosen))
