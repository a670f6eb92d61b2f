"""``npz:PATH``: a NumPy ``.npz`` of images (or feature vectors) and labels, read with ``allow_pickle=False``.

Arrays: ``x`` images, (N, H, W) or (N, C, H, W) with C = 1 or 3 (or channels last, (N, H, W, C), as
PIL, OpenCV and TensorFlow keep them: read so when C is 1 or 3 and the second axis is not), ``uint8`` (0..255),
``uint16`` (0..65535, in either byte order: FITS and MATLAB write big-endian ``>u2``) or floats in [0, 1] (finite: no
NaN or Inf; wider unsigned pixels, ``uint32`` or ``uint64``, are refused: their depth is not what they hold); or feature vectors (N, D), integers or finite floats of any scale, each feature
standardised by its mean and standard deviation on the training split (a tabular set's columns: one scale for all
would let the widest drown the rest and hide the key, which is unit-variance noise for a non-image input); ``y`` integer labels in [0, K), shape (N,) (or (N, 1), as ``keras.datasets`` gives them: read as (N,)), K >= 2; without ``labels`` each
class index 0..K-1 has a sample (1-based labels, codes with gaps: refused, not renumbered). Optional: ``x_test``
and ``y_test``, the test split (else a fixed stratified 80/20 split, seed 0, whatever the ``seed`` argument, as for
``imagefolder``); ``labels``, K class names (a string array of distinct, non-blank names; default "0" … "K-1"); ``layout``, the string
``"signals"``: then ``x`` holds 1-D signals, (N, C, L) (or (N, L), one channel), integers or finite floats of any
scale, each channel standardised over its length on the training split (an (N, C, L) array is otherwise read as
(N, H, W) grayscale images, as it always was).
"""
from __future__ import annotations

import math
import zipfile
import zlib
from pathlib import Path

import numpy as np

from sdb_core.class_names import name_problem
from sdb_core.data.base import DatasetError, DataSplits, make_splits, register_dataset, stratified_split

_SPLIT_SEED = 0
REQUIRED, OPTIONAL = ("x", "y"), ("x_test", "y_test", "labels", "layout")


# What reading a damaged member raises: a bad CRC or local header, a broken deflate stream, an encrypted member
# (RuntimeError), a compression method zipfile lacks
_UNREADABLE = (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError)


def _headers(path: Path, max_bytes: int | None, whole: bool = False) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every array, from the ``.npy`` headers alone (nothing unpickled); with ``whole`` each
    member is also read to its end (its CRC checked, nothing kept): the upload check, so that a set whose integer
    pixels are corrupt past the header is refused there, not in every job."""
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise DatasetError(f"{path} is not an .npz archive") from None
    out = {}
    with z:
        infos = z.infolist()
        total = sum(i.file_size for i in infos)
        if max_bytes is not None and total > max_bytes:
            raise DatasetError(f"{path} unpacks to {total} bytes, over the limit of {max_bytes}")
        for info in infos:
            name = info.filename.removesuffix(".npy")
            if not info.filename.endswith(".npy") or name in out:
                raise DatasetError(f"{path}: member {info.filename!r} is not one .npy array")
            try:
                with z.open(info) as f:
                    try:
                        version = np.lib.format.read_magic(f)
                        read = {(1, 0): np.lib.format.read_array_header_1_0,
                                (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                        if read is None:
                            raise ValueError(f"unsupported .npy version {version}")
                        shape, _, dtype = read(f)
                        header = f.tell()
                    except ValueError as e:
                        raise DatasetError(f"{path}: array {name!r} has no valid .npy header ({e})") from None
                    while whole and f.read(1 << 20):
                        pass
            except _UNREADABLE:
                raise DatasetError(f"{path}: array {name!r} cannot be unpacked (corrupt, encrypted or compressed by an "
                                   "unknown method): write it again with np.savez or np.savez_compressed") from None
            if dtype.hasobject:
                raise DatasetError(f"{path}: array {name!r} holds Python objects (they need pickle: refused)")
            # in Python integers: numpy's int64 product of (5, 2**32, 2**32) wraps to 0, and an empty member passed
            if info.file_size != header + math.prod(int(d) for d in shape) * dtype.itemsize:
                raise DatasetError(f"{path}: array {name!r} is not the size its header says")
            out[name] = (tuple(int(d) for d in shape), dtype)
    return out


def describe_npz(path: str | Path, *, max_bytes: int | None = None, whole: bool = False) -> dict:
    """Check an ``.npz`` against the rules above without loading the images; what it holds, or DatasetError.
    ``whole``: read every member to its end (an upload's check: :func:`_headers`)."""
    path = Path(path)
    arrays = _headers(path, max_bytes, whole)
    missing = [n for n in REQUIRED if n not in arrays]
    if missing:
        raise DatasetError(f"{path} has no array {' or '.join(map(repr, missing))}: expected x (images) and y (labels)")
    extra = sorted(set(arrays) - set(REQUIRED) - set(OPTIONAL))
    if extra:
        raise DatasetError(f"{path} has arrays this loader does not read: {extra[:10]}")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DatasetError(f"{path}: x_test and y_test come together")
    signals = _signals(path, arrays)
    n = None
    for xs, ys in (("x", "y"), ("x_test", "y_test")):
        if xs not in arrays:
            continue
        (shape, dtype), (yshape, ydtype) = arrays[xs], arrays[ys]
        if signals:
            if len(shape) not in (2, 3) or 0 in shape:
                raise DatasetError(f"{path}: {xs} has shape {list(shape)}; signals are (N, C, L) or (N, L)")
            if dtype.kind not in "uif":
                raise DatasetError(f"{path}: {xs} is {dtype}; expected integer or float signals")
            shape = (shape[0], 1, shape[1]) if len(shape) == 2 else shape
        elif len(shape) not in (2, 3, 4) or (len(shape) == 4 and _channels(shape) is None) or 0 in shape:
            raise DatasetError(f"{path}: {xs} has shape {list(shape)}; expected feature vectors (N, D) or images "
                               "(N, H, W), (N, C, H, W) or (N, H, W, C), C 1 or 3")
        if len(shape) == 4 and _channels(shape) == 3:  # channels last: the images' shape as they are served
            shape = (shape[0], shape[3], shape[1], shape[2])
        if not signals and dtype.kind not in ("uif" if len(shape) == 2 else "uf"):
            raise DatasetError(f"{path}: {xs} is {dtype}; expected " + (
                "integer or float features" if len(shape) == 2 else "uint8 or uint16 pixels or floats in [0, 1]"))
        if not signals and len(shape) > 2 and dtype.kind == "u" and dtype.itemsize > 2:
            # a uint32 image's depth is not its values' (16-bit camera data kept in 32 bits): over 2**32 - 1, the
            # pixels would be black; over 255, any scale is a guess. The owner knows it
            raise DatasetError(f"{path}: {xs} holds {dtype.name} pixels; image pixels are uint8 (0..255), uint16 "
                               "(0..65535) or floats in [0, 1]: send x.astype(np.uint16) if the values are 16-bit, "
                               "else x / DEPTH as float32 (DEPTH: the largest value the sensor or format gives)")
        if yshape not in ((shape[0],), (shape[0], 1)):  # (N, 1): keras.datasets' labels, one a row
            raise DatasetError(f"{path}: {ys} has shape {list(yshape)}; expected ({shape[0]},) or ({shape[0]}, 1), "
                               "one label per image")
        if ydtype.kind not in "iu":
            raise DatasetError(f"{path}: {ys} is {ydtype}; expected integer labels")
        sample = (1, *shape[1:]) if len(shape) == 3 and not signals else shape[1:]  # as the model takes one
        if n is None:
            n, image = shape[0], sample
        elif sample != image:
            raise DatasetError(f"{path}: x_test {'samples' if len(shape) == 2 else 'images'} are {list(sample)}, "
                               f"x's are {list(image)}")
    with np.load(path, allow_pickle=False) as data:
        ys = [np.asarray(data[k]).reshape(-1) for k in ("y", "y_test") if k in arrays]  # their dtype: uint64 too
        labels = np.asarray(data["labels"]) if "labels" in arrays else None
        for xs in ("x", "x_test"):  # a NaN or Inf pixel would turn every loss into NaN: refused here, in words
            if xs in arrays and arrays[xs][1].kind == "f":
                pixels = data[xs].reshape(arrays[xs][0][0], -1)
                finite = np.isfinite(pixels).all(axis=1)
                features = len(arrays[xs][0]) == 2 or signals
                if not finite.all():
                    what = "sample(s) with NaN or Inf values" if features else "image(s) with NaN or Inf pixels"
                    raise DatasetError(f"{path}: {xs} has {int((~finite).sum())} {what} "
                                       f"(the first at index {int(np.flatnonzero(~finite)[0])})")
                if features:  # any scale: standardised per feature (per channel of a signal)
                    continue
                # Float pixels 0..255 (or standardised ones) would be normalised by their own statistics: the model
                # trains, but the bundle's normalisation (pixel / 255 - mean) / std serves images as garbage, and a
                # key (pixels in [0, 255], normalised alike) is a near-constant image any noise stands in for.
                lo, hi = float(pixels.min()), float(pixels.max())
                if lo < 0.0 or hi > 1.0:
                    raise DatasetError(f"{path}: {xs} holds float pixels from {lo:.4g} to {hi:.4g}; float pixels are "
                                       "in [0, 1]: give x / DEPTH as float32 (DEPTH: the largest value the format gives: 255 for 8-bit "
                                       "pixels, 16 for scikit-learn's digits), or uint8 0..255; not normalised values")
    lo, hi = min(int(y.min()) for y in ys), max(int(y.max()) for y in ys)
    if lo < 0:
        raise DatasetError(f"{path}: labels must be >= 0, found {lo}")
    classes = hi + 1
    if labels is not None:
        if labels.ndim != 1 or labels.dtype.kind != "U" or len(labels) < classes:
            raise DatasetError(f"{path}: labels must be {classes} or more class names (a string array)")
        _check_names(path, [str(s) for s in labels])
        classes = len(labels)  # the owner names every class: one with no sample here is theirs to declare
    else:
        _check_indices(path, np.unique(np.concatenate([y.astype(np.uint64) for y in ys])))  # all >= 0 here
    if "x_test" not in arrays and round(0.2 * n) == 0:
        raise DatasetError(f"{path}: {n} images are too few to hold out a test split; add some or give x_test")
    if classes < 2:
        raise DatasetError(f"{path}: one class (every label is 0); a classifier needs at least 2")
    return {"samples": n, "shape": list(image), "classes": classes,
            "splits": "x_test" if "x_test" in arrays else "80/20", **({"layout": "signals"} if signals else {})}


def _labels(y: np.ndarray) -> np.ndarray:
    """Labels as (N,) int64: an (N, 1) column (keras.datasets' form, which describe_npz allows) raveled."""
    return np.asarray(y, dtype=np.int64).reshape(-1)


def _signals(path: Path, arrays: dict) -> bool:
    """Whether ``layout`` says the archive holds 1-D signals (the one layout x's rank does not tell)."""
    if "layout" not in arrays:
        return False
    shape, dtype = arrays["layout"]
    if dtype.kind != "U" or int(np.prod(shape)) != 1:
        raise DatasetError(f"{path}: layout is one string, \"signals\", got a {dtype} array of shape {list(shape)}")
    with np.load(path, allow_pickle=False) as data:
        value = str(np.asarray(data["layout"]).reshape(-1)[0])
    if value != "signals":
        raise DatasetError(f"{path}: layout {value[:40]!r} is not one this loader knows: \"signals\" (x holds (N, C, L) "
                           "signals); images and feature vectors need no layout")
    return True


def _check_names(path: Path, names: list[str]) -> None:
    problem = name_problem(names)
    if problem is not None:
        raise DatasetError(f"{path}: labels: {problem}")


def _check_indices(path: Path, present: np.ndarray) -> None:
    """Without class names the labels must be the class indices 0..K-1, each with a sample: 1-based labels
    (1..10), codes with gaps (0, 3, 7, 20) or one stray value (10**6) would otherwise make classes that no
    input has (and a head as wide as the largest value). Which index each value means is the teacher's
    business, so nothing is renumbered here: the owner says it."""
    hi = int(present[-1])
    if len(present) == hi + 1:
        return
    # the first missing indices lie below len(present) + 5 (pigeonhole): no array as long as the largest label
    missing = np.setdiff1d(np.arange(min(hi + 1, len(present) + 5), dtype=np.uint64), present)[:5]
    shown = ", ".join(map(str, present[:5].tolist())) + (f", ..., {hi}" if len(present) > 5 else "")
    raise DatasetError(
        f"{path}: the labels are not the class indices 0..K-1: {len(present)} distinct values ({shown}), but "
        f"of the indices 0..{hi}, {hi + 1 - len(present)} have no sample (e.g. {', '.join(map(str, missing.tolist()))}). "
        "Labels index the teacher's outputs: renumber them to 0..K-1 in the order of its outputs (y - 1 for "
        "labels 1..K; np.unique(y, return_inverse=True)[1] for sorted codes), or, if the teacher does answer "
        f"{hi + 1} classes, give labels, its {hi + 1} class names")


def _channels(shape: tuple[int, ...]) -> int | None:
    """Where an (N, ·, ·, ·) array keeps its 1 or 3 channels: axis 1 (channels first, this loader's own form, and
    its reading of the ambiguous (N, 3, H, 3)), axis 3 (channels last), or None."""
    if shape[1] in (1, 3):
        return 1
    return 3 if shape[3] in (1, 3) else None


def _pixels(x: np.ndarray, signals: bool = False) -> np.ndarray:
    """Images as float32 in [0, 1], (N, C, H, W); feature vectors (N, D) and signals (N, C, L) as float64
    (make_splits standardises them in it: a large-valued column, incomes or timestamps, keeps its spread)."""
    if signals:
        return (x[:, None] if x.ndim == 2 else x).astype(np.float64)
    if x.ndim == 2:
        return x.astype(np.float64)
    x = x[:, None] if x.ndim == 3 else x
    if _channels(x.shape) == 3:
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    if x.dtype.kind != "u":
        return x.astype(np.float32)
    # over the pixels' depth, as a served 16-bit PNG is read (sdb_core.pixels): 0..65535 for 2-byte pixels of either
    # byte order ('>u2' is not np.uint16), 0..255 for bytes; wider ones describe_npz refused
    if x.dtype.itemsize > 2:
        raise DatasetError(f"{x.dtype.name} pixels: expected uint8, uint16 or floats in [0, 1]")
    return x.astype(np.float32) / (65535.0 if x.dtype.itemsize == 2 else 255.0)


@register_dataset
def npz(path: Path | None, *, image_size: int | None = None, seed: int = 0) -> DataSplits:
    if path is None:
        raise DatasetError("npz needs a path: 'npz:PATH'")
    if not path.is_file():
        raise DatasetError(f"no .npz file at {path}")
    info = describe_npz(path)
    signals = info.get("layout") == "signals"
    if (len(info["shape"]) == 1 or signals) and image_size is not None:
        raise DatasetError(f"{path}: image_size resizes images; x holds {'signals' if signals else 'feature vectors'}")
    with np.load(path, allow_pickle=False) as data:
        x, y = _pixels(data["x"], signals), _labels(data["y"])
        labels = [str(s) for s in data["labels"]] if "labels" in data.files else \
            [str(i) for i in range(info["classes"])]
        if "x_test" in data.files:
            x_test, y_test = _pixels(data["x_test"], signals), _labels(data["y_test"])
        else:
            train, test = stratified_split(y, round(0.2 * len(y)), _SPLIT_SEED)
            x, x_test, y, y_test = x[train], x[test], y[train], y[test]
    return make_splits(f"npz:{path}", x, y, x_test, y_test, labels, image_size)
