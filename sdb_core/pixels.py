"""An image's pixels as floats in [0, 1], whatever its bit depth and however its EXIF says it is turned: one reading
for training data and served images.

Pillow's ``convert("L"/"RGB")`` clips a 16-bit or 32-bit image's values at 255, so a 16-bit PNG or TIFF
(microscopy, X-ray, depth) came out black and white. Such an image is read as floats over its depth instead,
never through 8 bits. Torch-free: the service decodes requests' images with it.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

_SIXTEEN_BIT = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
HIGH_DEPTH = _SIXTEEN_BIT | {"I", "F"}  # one band each (Pillow has no high-depth colour mode)


def _depth(im: Image.Image) -> float:
    """The value white has in ``im``: 65535 for 16 bits; for 32-bit integers and floats, the smallest of 1, 255
    and 65535 that holds the image's largest value (their files do not say which range they use)."""
    if im.mode in _SIXTEEN_BIT:
        return 65535.0
    top = im.getextrema()[1]
    if im.mode == "F" and top <= 1.0:
        return 1.0
    return 255.0 if top <= 255 else 65535.0


_ORIENTATION = 0x0112  # EXIF's Orientation tag: 1 is as stored; 2-8 a mirror and/or a quarter turn


def upright(im: Image.Image) -> Image.Image:
    """``im`` as viewers show it: turned by its EXIF orientation. A phone stores a portrait photo sideways with
    a tag that browsers, viewers and the console's preview honour; read as stored, a model saw it on its side.
    The image itself when it has no such tag (nothing decoded or copied)."""
    try:
        turned = im.getexif().get(_ORIENTATION, 1) not in (1, None)
    except (OSError, ValueError, SyntaxError):  # a malformed EXIF block: the pixels as stored
        return im
    return ImageOps.exif_transpose(im) if turned else im


def upright_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) of ``im`` as :func:`upright` turns it. Its EXIF is read as :func:`upright` reads it: for a PNG
    whose EXIF follows its pixels, that decodes them (call it on a loaded image)."""
    try:
        sideways = im.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8)  # a quarter turn: width and height swap
    except (OSError, ValueError, SyntaxError):
        sideways = False
    return (im.height, im.width) if sideways else (im.width, im.height)


def unit_pixels(im: Image.Image, mode: str, size: tuple[int, int]) -> np.ndarray:
    """``im``, :func:`upright`, in ``mode`` ("L": (H, W), "RGB": (H, W, 3)) resized (bilinear) to ``size`` (W, H),
    in [0, 1]."""
    im = upright(im)
    if im.mode in HIGH_DEPTH:
        depth = _depth(im)
        values = np.asarray(im.convert("F").resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
        values = np.clip(values / depth, 0.0, 1.0)
        return np.repeat(values[..., None], 3, axis=2) if mode == "RGB" else values
    return np.asarray(im.convert(mode).resize(size, Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
