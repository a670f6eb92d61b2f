"""An image's pixels as floats in [0, 1], whatever its bit depth, however its EXIF says it is turned and whatever of
it is transparent: one reading for training data and served images; and the walk that refuses, before Pillow reads
it, a PNG or JPEG built to cost far more to decode than its size says.

Pillow's ``convert("L"/"RGB")`` clips a 16-bit or 32-bit image's values at 255, so a 16-bit PNG or TIFF
(microscopy, X-ray, depth) came out black and white. Such an image is read as floats over its depth instead,
never through 8 bits. Torch-free: the service decodes requests' images with it.
"""
from __future__ import annotations

import io
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

_SIXTEEN_BIT = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
HIGH_DEPTH = _SIXTEEN_BIT | {"I", "F"}  # one band each (Pillow has no high-depth colour mode)

# ----------------------------------------------------------------------------- the walk before decoding
# A progressive JPEG's decoder passes over every block of the picture once a scan, however few bytes the scan holds:
# a 4000x4000 JPEG of one 31-byte scan repeated 10,000 times (373 KB) took 8-12 s of CPU. Encoders write far fewer:
# libjpeg's (Pillow's, libjpeg-turbo's) progressive default 10 for colour, 6 for grey, 18 for CMYK; mozjpeg's scan
# search keeps some of 64 candidates (23 for grey). 100 is ~0.1 s more for the largest picture served (16 M pixels).
MAX_JPEG_SCANS = 100
# Pillow reads a PNG's chunks, and a JPEG's markers before its first scan, one at a time in Python holding the GIL:
# a PNG of 583,000 empty chunks took 2.1 s (other callers' predicts ~230 ms meanwhile), a JPEG of 1.75 M empty
# comments 1.6 s. Real files hold a few dozen (metadata, an ICC profile in pieces, a progressive JPEG's tables).
MAX_SEGMENTS = 4096
# Pixel data may be split over many IDAT chunks: libpng writes 8 KB each (8,192 for 64 MB), so this bound is past any
# real file and keeps both this walk and Pillow's reading of them to ~50 ms.
MAX_IDAT_CHUNKS = 65_536
# Bytes that are no marker between a JPEG's markers before its first scan: Pillow skips them one at a time.
MAX_STRAY_BYTES = 65_536

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# An APNG's frames (fcTL, fdAT) are pixel data as IDAT is, counted with it: Pillow reads the first frame and stops,
# and a 2,100-frame animation, a real file, was refused as one of "extra metadata".
_PIXEL_CHUNKS = frozenset({b"IDAT", b"fdAT", b"fcTL"})
JPEG_SIGNATURE = b"\xff\xd8\xff"  # what Pillow opens as a JPEG
# A marker: 0xFF and a byte that is none of 0x00 (a 0xFF byte of entropy-coded data), 0xD0-0xD7 (restart markers,
# inside a scan's data) or 0xFF (fill before a marker). One byte of look-ahead: linear in any run of 0xFF.
_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_EOI, _SOS = 0xD9, 0xDA
_NO_LENGTH = frozenset({0x01, 0xD8})  # TEM, SOI: markers without a segment (EOI and RST are met apart)
_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # SOFn: where a JPEG says its size (DHT, JPG, DAC not)


class CostlyImage(ValueError):
    """A PNG or JPEG built to cost far more to decode than its size says, refused before decoding: what the
    message says is the reason, for the caller's 4xx."""


@dataclass(frozen=True)
class Layout:
    """What :func:`image_layout` read of a PNG or JPEG without decoding it."""

    format: str  # "PNG" or "JPEG"
    width: int  # 0 where the file does not say (Pillow's reading refuses it)
    height: int


def image_layout(data: bytes) -> Layout | None:
    """A PNG's chunks or a JPEG's markers, walked without decoding (segment lengths skipped, a JPEG's scans searched
    for their end in C): its size, and :class:`CostlyImage` when it holds more scans, chunks or markers than any
    real file (the bounds above). None for data that is neither (by its signature, as Pillow tells them apart)."""
    if data.startswith(PNG_SIGNATURE):
        return _png_layout(data)
    if data.startswith(JPEG_SIGNATURE):
        return _jpeg_layout(data)
    return None


def _png_layout(data: bytes) -> Layout:
    width = height = others = idats = 0
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind == b"IEND":
            break
        if kind in _PIXEL_CHUNKS:
            idats += 1
            if idats > MAX_IDAT_CHUNKS:
                raise CostlyImage(f"a PNG whose pixel data is split into more than {MAX_IDAT_CHUNKS} chunks (IDAT, an "
                                  "animation's fdAT and fcTL) is refused: save it again (any editor writes it in a "
                                  "few)")
        else:
            others += 1
            if others > MAX_SEGMENTS:
                raise CostlyImage(f"a PNG of more than {MAX_SEGMENTS} chunks besides its pixel data is refused (real "
                                  "files hold a few dozen): save it again without the extra metadata")
            if kind == b"IHDR" and length >= 8 and pos + 16 <= len(data):
                width, height = struct.unpack_from(">II", data, pos + 8)
        pos += 12 + length  # length, type, data, CRC
    return Layout("PNG", width, height)


def _jpeg_layout(data: bytes) -> Layout:
    width = height = markers = scans = stray = 0
    pos = 2  # past SOI
    while (found := _MARKER.search(data, pos)) is not None:
        if scans == 0:  # before the first scan: what lies between markers is stray (after it, a scan's data)
            stray += found.start() - pos
        markers += 1
        if markers > MAX_SEGMENTS or stray > MAX_STRAY_BYTES:
            raise CostlyImage(f"a JPEG of more than {MAX_SEGMENTS} markers, or {MAX_STRAY_BYTES} stray bytes between "
                              "them, is refused (real files hold a few dozen): save it again")
        code, pos = data[found.start() + 1], found.end()
        if code == _EOI:  # the picture ends (an MPO's second picture, read by no one here, may follow)
            return Layout("JPEG", width, height)
        if code in _NO_LENGTH or pos + 2 > len(data):
            continue
        length = int.from_bytes(data[pos:pos + 2], "big")
        if code in _FRAMES and length >= 7 and pos + 7 <= len(data):
            height, width = struct.unpack_from(">HH", data, pos + 3)
        elif code == _SOS:
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise CostlyImage(f"a JPEG of more than {MAX_JPEG_SCANS} scans is refused (a progressive JPEG's "
                                  "encoder writes about 10, each a pass over the whole picture): save it again")
        pos += length
    return Layout("JPEG", width, height)  # no end marker: Pillow refuses it as truncated


def open_checked(data: bytes, formats: Sequence[str] | None = None) -> Image.Image:
    """``data`` opened by Pillow (in one of ``formats``; any it knows when None) once :func:`image_layout` passed it:
    :class:`CostlyImage` (a ValueError) when not. A JPEG cut short stays refused as truncated when it is loaded: a
    browser shows what it has and grey after it, and a prediction on grey is no answer."""
    image_layout(data)
    return Image.open(io.BytesIO(data), formats=formats)


# ----------------------------------------------------------------------------- pixels as shown
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
# How each orientation is undone (Pillow's ImageOps.exif_transpose's table)
_TURNS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
          5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
          8: Image.Transpose.ROTATE_90}


def _orientation(im: Image.Image) -> int:
    """``im``'s EXIF orientation (1 when none, or unreadable), read where browsers read it: its EXIF block (a JPEG's
    APP1 Exif segment, a PNG's eXIf chunk, as Pillow keeps it in ``info``), or a TIFF's own tags. Not XMP's
    ``tiff:Orientation``, which Pillow's ``getexif`` falls back to and browsers ignore: they show such an image
    as stored. Loads ``im``: a PNG's eXIf chunk may follow its pixels."""
    im.load()
    block = im.info.get("exif")
    if block is None:
        tags = getattr(im, "tag_v2", None)  # a TIFF: EXIF's tags are its own
        value = tags.get(_ORIENTATION, 1) if tags is not None else 1
    else:
        exif = Image.Exif()
        try:
            exif.load(block)
            value = exif.get(_ORIENTATION, 1)
        except (OSError, ValueError, SyntaxError, EOFError, struct.error):  # a malformed block: as stored
            return 1
    return value if value in _TURNS else 1


def upright(im: Image.Image) -> Image.Image:
    """``im`` as viewers show it: turned by its EXIF orientation. A phone stores a portrait photo sideways with
    a tag that browsers, viewers and the console's preview honour; read as stored, a model saw it on its side.
    The image itself when it has no such tag (loaded, not copied)."""
    turn = _TURNS.get(_orientation(im))
    if turn is None:
        return im
    turned = im.transpose(turn)
    turned.info.pop("exif", None)  # turned once: upright(upright(im)) is upright(im)
    return turned


def upright_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) of ``im`` as :func:`upright` turns it (``im`` loaded, as :func:`upright` loads it)."""
    sideways = _orientation(im) in (5, 6, 7, 8)  # a quarter turn: width and height swap
    return (im.height, im.width) if sideways else (im.width, im.height)


_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


def on_white(im: Image.Image) -> Image.Image:
    """``im`` with what is transparent in it (an alpha channel, a palette's or a colour key's transparency) laid over
    white, as a browser shows it on a white page and the console's preview on its own: a digit drawn in black on a
    transparent canvas was read by its colour channels alone, black on black, a uniform input. The image itself
    when nothing in it is transparent (8-bit modes: :func:`unit_pixels` lays a 16-bit one over its own white)."""
    if im.mode not in _ALPHA_MODES and "transparency" not in im.info:
        return im
    return Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))


def _high_depth_values(im: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """A one-band 16- or 32-bit ``im`` resized to ``size`` as floats over its depth, its colour key's pixels (a 16-bit
    grey PNG's transparency) white."""
    depth = _depth(im)
    values = im.convert("F")
    if (key := im.info.get("transparency")) is not None:
        flat = np.array(values, dtype=np.float32)
        flat[np.asarray(im) == key] = depth
        values = Image.fromarray(flat, "F")
    return np.clip(np.asarray(values.resize(size, Image.Resampling.BILINEAR), dtype=np.float32) / depth, 0.0, 1.0)


def unit_pixels(im: Image.Image, mode: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """``im``, :func:`upright` and :func:`on_white`, in ``mode`` ("L": (H, W), "RGB": (H, W, 3)) resized (bilinear)
    to ``size`` (W, H; its own, upright, when None), in [0, 1]."""
    im = upright(im)
    size = size or im.size
    if im.mode in HIGH_DEPTH:
        values = _high_depth_values(im, size)
        return np.repeat(values[..., None], 3, axis=2) if mode == "RGB" else values
    return np.asarray(on_white(im).convert(mode).resize(size, Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
