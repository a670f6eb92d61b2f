"""``mnist-textures``: MNIST digits painted in colour over photo and texture crops, at CIFAR's 3x32x32.

A set with CIFAR's shape, built offline, so that CIFAR ResNets and WideResNets run at their
native input size on embedded data. Each image is one of the 5,000 digits of ``mnist-5k``
(the same fixed 4,000 / 1,000 split as ``load_dataset("mnist-5k")``, in the same order, so
no test digit is ever shown in train) painted in a random colour, at a random scale, angle
and place, over a 32x32 crop of a ``skimage.data`` image that ships inside scikit-image.
The label is the digit's class, exact by construction.

The backgrounds are what make it harder than MNIST: crops are taken at three scales, flipped
and transposed, colour-jittered (grey textures are tinted), and both splits draw from the same
pool of images, so the test split is as hard as the train split and nothing in it is unseen in
kind. The ink is a random hue, lighter or darker than the background under the digit by a
random luminance contrast, never so faint that the digit is unreadable. Generation is fixed
(one seed per split, whatever the loader's ``seed``), like a real set's, and cached for the
process; building all 5,000 images takes about 2 s.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sdb_core.data.base import DatasetError, DataSplits, make_splits, register_dataset, stratified_split
from sdb_core.data.embedded import _SPLIT_SEED, DIGIT_LABELS, TEST_IMAGES, _mnist_5k_arrays, _reject_path

SIZE = 32
DIGIT = 28
_SPLITS = ("train", "test")
_GENERATION_SEED = 0
# Only images whose files ship inside the scikit-image wheel: none of these calls downloads.
# ``cat`` is ``chelsea`` again and is left out; ``horse`` is a flat silhouette.
_COLOUR_SOURCES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                   "retina", "colorwheel")
_GREY_SOURCES = ("brick", "grass", "gravel", "camera", "moon", "coins", "page", "text", "clock", "cell",
                 "checkerboard")
_LEVELS = 3  # crops of 32, 64 and 128 source pixels, each shrunk to 32
# The ranges below make the zoo ``cnn`` (TrainConfig(epochs=8)) reach 87-90% test accuracy
# (training seeds 0-2), against 97% on plain mnist-5k: harder than MNIST, learnable by a small net.
# Digit geometry: the 28x28 MNIST box is drawn at this many output pixels, turned by up to
# this angle, its centre moved by up to this many pixels from the image's centre.
_DIGIT_PX = (26.0, 30.0)
_MAX_ANGLE = np.deg2rad(10.0)
_MAX_SHIFT = 1.0
# |luminance(ink) - luminance(background under the digit)|, the background's texture making the
# local contrast vary around it. Never near 0, so every digit stays readable and its label true.
_CONTRAST = (0.5, 0.8)
_OPACITY = (0.85, 1.0)
# Background jitter: saturation, contrast and brightness factors. Contrast is only lowered,
# so that the texture does not drown the digit.
_BG_SATURATION = (0.3, 1.3)
_BG_CONTRAST = (0.2, 0.5)
_BG_BRIGHTNESS = (0.7, 1.3)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _shrink(img: np.ndarray) -> np.ndarray:
    """Halve a uint8 image by averaging 2x2 blocks (an odd last row or column is dropped)."""
    h, w = img.shape[0] // 2 * 2, img.shape[1] // 2 * 2
    blocks = img[:h, :w].reshape(h // 2, 2, w // 2, 2, *img.shape[2:]).astype(np.uint16)
    return ((blocks.sum(axis=(1, 3)) + 2) // 4).astype(np.uint8)


@lru_cache(maxsize=1)
def _background_pool() -> tuple[tuple[tuple[np.ndarray, ...], ...], np.ndarray]:
    """Each source image as a pyramid of uint8 levels, (H, W, 3) or grey (H, W), and which are grey."""
    import skimage.data

    pyramids = []
    for name in _COLOUR_SOURCES + _GREY_SOURCES:
        img = np.asarray(getattr(skimage.data, name)())
        if img.dtype != np.uint8 or img.ndim != (3 if name in _COLOUR_SOURCES else 2):
            raise DatasetError(f"skimage.data.{name} is {img.dtype} {img.shape}, not the expected 8-bit image")
        levels = [np.ascontiguousarray(img)]
        while len(levels) < _LEVELS:
            levels.append(_shrink(levels[-1]))
        if min(levels[-1].shape[:2]) < SIZE:
            raise DatasetError(f"skimage.data.{name} is too small for {SIZE}px crops at every scale")
        pyramids.append(tuple(levels))
    return tuple(pyramids), np.array([name in _GREY_SOURCES for name in _COLOUR_SOURCES + _GREY_SOURCES])


def _backgrounds(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` jittered 32x32 crops of the pool: (n, 32, 32, 3) float32 in [0, 1]."""
    pyramids, grey = _background_pool()
    source = rng.integers(0, len(pyramids), size=n)
    level = rng.integers(0, _LEVELS, size=n)
    corner = rng.random((n, 2))
    flips = rng.random((n, 3)) < 0.5  # vertical, horizontal, transpose: the 8 symmetries of a square
    r = np.arange(SIZE)
    rows = np.where(flips[:, :1], SIZE - 1 - r, r)
    cols = np.where(flips[:, 1:2], SIZE - 1 - r, r)
    out = np.empty((n, SIZE, SIZE, 3), dtype=np.float32)
    # One gather per (source, level): every crop of a group indexes the same array.
    for s, pyramid in enumerate(pyramids):
        for k, img in enumerate(pyramid):
            group = np.flatnonzero((source == s) & (level == k))
            y0 = (corner[group, 0] * (img.shape[0] - SIZE + 1)).astype(np.int64)
            x0 = (corner[group, 1] * (img.shape[1] - SIZE + 1)).astype(np.int64)
            crops = img[(y0[:, None] + rows[group])[:, :, None], (x0[:, None] + cols[group])[:, None, :]]
            out[group] = crops if img.ndim == 3 else crops[..., None]
    out[flips[:, 2]] = out[flips[:, 2]].transpose(0, 2, 1, 3)

    # The colour jitter is affine in the pixels, so it is applied as one 3x3 matrix and one
    # offset per crop: grey textures get a random tint over a random floor, colour photos a
    # random channel order; then all get saturation, contrast and brightness.
    is_grey = grey[source][:, None, None]
    tint = rng.uniform(0.25, 1.0, size=(n, 3))
    floor = rng.uniform(0.0, 0.3, size=(n, 3))
    order = np.eye(3)[np.argsort(rng.random((n, 3)), axis=1)]  # (n, 3, 3) permutation matrices
    first = np.where(is_grey, tint[:, None, :] * np.eye(3), order) / 255.0
    offset = np.where(is_grey[:, 0], floor * (1 - tint), 0.0)
    saturation, contrast, brightness = rng.uniform(*zip(_BG_SATURATION, _BG_CONTRAST, _BG_BRIGHTNESS), size=(n, 3)).T
    # Saturation s keeps s of each channel and moves 1 - s of it to the crop's luminance.
    sat = saturation[:, None, None] * np.eye(3) + (1 - saturation)[:, None, None] * np.outer(_LUMA, np.ones(3))
    matrix = first @ sat
    offset = (offset[:, None, :] @ sat)[:, 0]
    # Contrast c and brightness b around the crop's mean m: c * x + (b - c) * m.
    mean = ((out.mean(axis=(1, 2))[:, None, :] @ matrix)[:, 0] + offset).mean(axis=1)
    matrix = contrast[:, None, None] * matrix
    offset = contrast[:, None] * offset + ((brightness - contrast) * mean)[:, None]
    out = np.matmul(out.reshape(n, SIZE * SIZE, 3), matrix.astype(np.float32)) + offset[:, None, :].astype(np.float32)
    return np.clip(out.reshape(n, SIZE, SIZE, 3), 0.0, 1.0)


def _place_digits(rng: np.random.Generator, digits: np.ndarray) -> np.ndarray:
    """Each 28x28 digit scaled, turned and moved onto a 32x32 canvas: (n, 32, 32) float32 in [0, 1]."""
    n = len(digits)
    px = rng.uniform(*_DIGIT_PX, size=n)
    angle = rng.uniform(-_MAX_ANGLE, _MAX_ANGLE, size=n)
    shift = rng.uniform(-_MAX_SHIFT, _MAX_SHIFT, size=(n, 2))  # (x, y) output pixels
    # affine_grid maps output coordinates (in [-1, 1] over 32 px) to input ones (over 28 px):
    # input = R(-angle) (output_px - shift) / (px / 28) in input pixels, over the half-widths.
    cos, sin = np.cos(angle), np.sin(angle)
    inv = np.stack([np.stack([cos, sin], 1), np.stack([-sin, cos], 1)], 1)  # R(-angle), (n, 2, 2)
    per_px = (DIGIT / px)[:, None, None] / (DIGIT / 2)
    theta = np.concatenate([inv * per_px * (SIZE / 2), -(inv * per_px) @ shift[:, :, None]], axis=2)
    grid = F.affine_grid(torch.from_numpy(theta.astype(np.float32)), [n, 1, SIZE, SIZE], align_corners=False)
    src = torch.from_numpy(np.ascontiguousarray(digits, dtype=np.float32)).view(n, 1, DIGIT, DIGIT)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[:, 0].clamp_(0.0, 1.0).numpy()


def _render(digits: np.ndarray, split: str) -> np.ndarray:
    """Paint ``digits`` (n, 28, 28) in [0, 1] over backgrounds: (n, 3, 32, 32) float32 in [0, 1].

    Every random choice comes from ``split``'s fixed stream, so the same digits give the same
    images; the digits themselves are the only input that changes what is drawn.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    rng = np.random.default_rng([_GENERATION_SEED, _SPLITS.index(split)])
    n = len(digits)
    bg = _backgrounds(rng, n)
    alpha = _place_digits(rng, digits)
    alpha *= rng.uniform(*_OPACITY, size=(n, 1, 1)).astype(np.float32)
    # The ink: a random hue at a luminance a random contrast above or below the background's
    # luminance under the digit (a coin toss where both sides have room, else the roomier side).
    weight = alpha / np.maximum(alpha.sum(axis=(1, 2), keepdims=True), 1e-6)
    under = (weight * (bg @ _LUMA)).sum(axis=(1, 2))
    gap = rng.uniform(*_CONTRAST, size=n)
    fits_up, fits_down = under + gap <= 1.0, under - gap >= 0.0
    up = np.where(fits_up & fits_down, rng.random(n) < 0.5, np.where(fits_up | fits_down, fits_up, under < 0.5))
    target = np.clip(np.where(up, under + gap, under - gap), 0.0, 1.0)[:, None]
    # The hue's chroma (its offset from its own grey) is shrunk until the ink fits in [0, 1],
    # so the ink's luminance is exactly the target and the contrast is what was drawn.
    hue = rng.random((n, 3))
    chroma = hue - (hue @ _LUMA)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        room = np.where(chroma > 0, (1 - target) / chroma, np.where(chroma < 0, target / -chroma, np.inf))
    ink = (target + chroma * np.minimum(room.min(axis=1, keepdims=True), 1.0)).astype(np.float32)
    a = alpha[..., None]
    img = bg * (1 - a) + ink[:, None, None, :] * a
    noise = rng.uniform(0.0, 0.05, size=(n, 1, 1, 1)).astype(np.float32)  # per image, uniform in +-noise
    img += (rng.random(img.shape, dtype=np.float32) * 2 - 1) * noise
    return np.ascontiguousarray(np.clip(img, 0.0, 1.0).transpose(0, 3, 1, 2))


def _digit_sources() -> dict[str, np.ndarray]:
    """For each split, the rows of the mnist-5k arrays its images are built from, in image order."""
    _, y = _mnist_5k_arrays()
    train, test = stratified_split(y, TEST_IMAGES["mnist-textures"], _SPLIT_SEED)
    return {"train": train, "test": test}


@lru_cache(maxsize=1)
def _textures_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    x, y = _mnist_5k_arrays()
    x = (x / 255.0).reshape(-1, DIGIT, DIGIT)
    out = {}
    for split, rows in _digit_sources().items():
        images = _render(x[rows], split)
        labels = y[rows]
        for a in (images, labels):
            a.setflags(write=False)  # shared by every load; make_splits gets copies
        out[split] = (images, labels)
    return out


@register_dataset(name="mnist-textures")
def mnist_textures(path: Path | None, *, image_size: int | None = None, seed: int = 0) -> DataSplits:
    _reject_path("mnist-textures", path)
    splits = _textures_arrays()
    (xtr, ytr), (xte, yte) = splits["train"], splits["test"]
    return make_splits("mnist-textures", xtr.copy(), ytr.copy(), xte.copy(), yte.copy(), DIGIT_LABELS, image_size)
