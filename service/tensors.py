"""Request bodies to model inputs: JSON arrays, ``.npy`` arrays and images, checked before any model runs.

JSON is parsed by orjson (C) and turned into one numpy array in one call: no Python
loop over elements; a ``.npy`` body (:mod:`service.npy`) is read into one array with no parsing
at all, its shape checked (:func:`batch_shape`) from its header before its data is read. Every way an input can be wrong ends in an :class:`ApiError`
(400 unparseable, 422 wrong shape/type/values, 415 unreadable image).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
from PIL import Image, UnidentifiedImageError

from sdb_core.pixels import CostlyImage, image_layout, open_checked, unit_pixels, upright_size

from .errors import ApiError, bad_request, invalid

IMAGE_FORMATS = ("PNG", "JPEG")
# Pillow names a JPEG that carries a second picture (a phone camera's depth map or preview, the CIPA
# multi-picture format) MPO; its first frame is the photo, read as any JPEG.
_JPEG_ALIASES = {"MPO": "JPEG"}
MAX_IMAGE_PIXELS = 16_000_000  # decoded size bound: a small upload may not unpack into gigabytes
# All the images of one request together: 530 blank 4000x4000 PNGs fit in an 8 MB body and took 55 s of CPU
# to decode; this bound is ~1 s (photos of 12 MP: 8 a request; resize them before sending for more).
MAX_REQUEST_PIXELS = 100_000_000
# Resizing costs memory in proportion to the longest side too (Pillow's filter weights): a 16,000,000x1 image,
# 16 KB as a PNG, within the pixel bound, took 260 MB to resize (1x16,000,000: 520 MB); one 65,536 a side ~30 MB.
MAX_IMAGE_SIDE = 65_536


# Arrays and objects cost a JSON parser and numpy ~15x what numbers do, a byte: 8 MB of one-value rows
# (``[0],[0],...``) or empty lists held the event loop (every caller, HTTP and gRPC alike) 0.7-0.8 s, where 8 MB of
# floats takes 0.05 s. A tensor's nesting needs one list a row; this bound is past what any body within the payload
# limit needs but rows of a few values (a channels-last image nested pixel by pixel: one 512x512 RGB is over; for
# those, flat rows of the input's values, or .npy / binary tensors), and parses in ~50 ms. Bodies up to
# JSON_COUNTED_ABOVE bytes are not counted (they cannot cost more than ~5 ms). Counted as a JSON body streams in
# (service.middleware: every route's, FastAPI's body models parse before a key is checked) and once inflated here.
MAX_JSON_CONTAINERS = 1 << 18
JSON_COUNTED_ABOVE = 1 << 16


def parse_json(body: bytes | memoryview) -> dict:
    if not body:
        raise bad_request("empty body: expected a JSON object", "malformed_body")
    if len(body) > JSON_COUNTED_ABOVE and (containers := json_containers(body)) > MAX_JSON_CONTAINERS:
        # an inflated body (Content-Encoding), or one that reached the app another way than the middleware
        raise ApiError(413, "payload_too_large", too_many_containers(containers))
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise bad_request(f"body is not valid JSON ({e.msg} at char {e.pos})", "malformed_body") from None
    if not isinstance(obj, dict):
        raise bad_request("body must be a JSON object", "malformed_body")
    return obj


def json_containers(body: bytes | memoryview) -> int:
    """How many ``[`` and ``{`` ``body`` holds (strings' own included: an over-count, never an under-count)."""
    data = body if isinstance(body, bytes) else bytes(body)  # a binary request's JSON header: a view
    return data.count(b"[") + data.count(b"{")


def too_many_containers(containers: int) -> str:
    """What a 413 for a JSON body of ``containers`` arrays and objects says."""
    return (f"a JSON body holds at most {MAX_JSON_CONTAINERS} arrays and objects; this one ~{containers}: send fewer "
            "samples a request, each sample as one flat row of its values, or the tensor as .npy (Content-Type: "
            "application/x-npy) or v2 binary")


def to_array(value: Any, what: str = "inputs") -> np.ndarray:
    """A rectangular array of numbers, as float32; 422 for anything else."""
    if not isinstance(value, list):
        raise invalid(f"{what} must be an array of numbers", "invalid_input")
    try:
        arr = np.array(value)
    except (ValueError, TypeError, OverflowError):
        raise invalid(f"{what} must be a rectangular array of numbers (ragged or mixed)", "invalid_shape") from None
    if arr.dtype.kind not in "fiu":
        raise invalid(f"{what} must contain numbers only, not {_kind_name(arr.dtype)}", "invalid_dtype")
    if arr.size == 0:
        raise invalid(f"{what} is empty", "invalid_shape")
    return finite_float32(arr, what)


def finite_float32(arr: np.ndarray, what: str = "inputs") -> np.ndarray:
    """``arr`` as float32 (no copy when it is one); 422 for NaN, Inf or values beyond float32's range."""
    with np.errstate(over="ignore"):
        out = arr.astype(np.float32, copy=False)
    if not np.isfinite(out).all():
        raise invalid(f"{what} has NaN, Inf or values beyond float32 range", "non_finite")
    return out


def _kind_name(dtype: np.dtype) -> str:
    return {"b": "booleans", "U": "strings", "S": "strings", "O": "objects or nulls"}.get(dtype.kind, str(dtype))


def as_batch(arr: np.ndarray, in_shape: Sequence[int], max_samples: int) -> np.ndarray:
    """(N, *in_shape) from a batch, one sample, or flat rows of prod(in_shape) values."""
    return np.ascontiguousarray(arr.reshape(batch_shape(arr.shape, in_shape, max_samples)))


def batch_shape(shape: Sequence[int], in_shape: Sequence[int], max_samples: int) -> tuple[int, ...]:
    """The (N, *in_shape) that inputs of ``shape`` are (a batch, one sample, or flat rows of prod(in_shape)
    values), checked before any value is read: 422 for another shape, no sample, or over ``max_samples``."""
    shape, sample = tuple(shape), tuple(in_shape)
    if shape == sample:
        out = (1, *sample)
    elif len(shape) == 2 and shape[1] == math.prod(sample):
        out = (shape[0], *sample)
    elif shape[1:] == sample:
        out = shape
    else:
        raise invalid(f"inputs have shape {list(shape)}; this model takes [N, {', '.join(map(str, sample))}] "
                      f"(or one sample, or rows of {math.prod(sample)} values)", "invalid_shape")
    if out[0] == 0:
        raise invalid("inputs is empty", "invalid_shape")
    if out[0] > max_samples:
        raise invalid(f"{out[0]} samples in one request; at most {max_samples}", "too_many_samples")
    return out


def image_format(img: Image.Image) -> str | None:
    """The accepted format (one of IMAGE_FORMATS) an opened image is in, or None."""
    fmt = _JPEG_ALIASES.get(img.format, img.format)
    return fmt if fmt in IMAGE_FORMATS else None


def images_to_inputs(blobs: Sequence[bytes], in_shape: Sequence[int], normalize: dict,
                     sizes: list[tuple[int, int]] | None = None) -> np.ndarray:
    """The images of one request → (N, C, H, W) (:func:`image_to_input` each); 413 before any is decoded when
    together they declare more than MAX_REQUEST_PIXELS. ``sizes``: each image's (width, height) as shown (its
    EXIF turn applied) is appended to it."""
    total = sum(_declared_pixels(b) for b in blobs)
    if total > MAX_REQUEST_PIXELS:
        raise ApiError(413, "images_too_large", f"the {len(blobs)} images of this request hold {total} pixels; at "
                       f"most {MAX_REQUEST_PIXELS} in one request: send fewer, or smaller (the model takes "
                       f"{'x'.join(map(str, in_shape[1:]))})")
    return np.stack([image_to_input(b, in_shape, normalize, sizes) for b in blobs])


def _declared_pixels(data: bytes) -> int:
    """Width x height from the image's header (:func:`~sdb_core.pixels.image_layout`: nothing decoded, Pillow not
    opened), at most MAX_IMAGE_PIXELS; 0 for what is no PNG or JPEG, or a costly one. :func:`image_to_input` refuses
    those and one over MAX_IMAGE_PIXELS on their own, with their reason."""
    try:
        layout = image_layout(data)
    except CostlyImage:
        return 0
    return 0 if layout is None else min(layout.width * layout.height, MAX_IMAGE_PIXELS)


def image_to_input(data: bytes, in_shape: Sequence[int], normalize: dict,
                   sizes: list[tuple[int, int]] | None = None) -> np.ndarray:
    """One PNG/JPEG → (C, H, W) normalised like the bundle's training data; 422 for a model that takes no images.
    ``sizes``: the image's (width, height) as shown is appended to it (read once it is decoded: a PNG's EXIF may
    follow its pixels, and reading it decodes them)."""
    if len(in_shape) != 3:
        raise invalid(f"this model takes inputs of shape {list(in_shape)}, not images: send them as arrays",
                      "invalid_shape")
    c, h, w = in_shape
    try:
        img = open_checked(data)  # the one Pillow opening of this image, once its walk passed it
        if image_format(img) is None:
            raise ApiError(415, "unsupported_image", f"image format {img.format} is not PNG or JPEG")
        if img.width * img.height > MAX_IMAGE_PIXELS or max(img.width, img.height) > MAX_IMAGE_SIDE:
            raise ApiError(415, "unsupported_image", f"image of {img.width}×{img.height} pixels is too large "
                           f"(at most {MAX_IMAGE_PIXELS} pixels, {MAX_IMAGE_SIDE} a side)")
        img.load()
        if sizes is not None:
            sizes.append(upright_size(img))
        if c not in (1, 3):
            raise invalid(f"this model takes {c}-channel inputs; images must be sent as arrays", "invalid_shape")
        pixels = unit_pixels(img, "L" if c == 1 else "RGB", (w, h)) * 255.0  # on the 0-255 scale ``normalize`` has
    except ApiError:
        raise
    except CostlyImage as e:
        raise ApiError(415, "unsupported_image", str(e)) from None
    except Image.DecompressionBombError:  # Pillow's own bound, met on opening an image of some 180 M pixels or more
        raise ApiError(415, "unsupported_image", f"the image is too large (at most {MAX_IMAGE_PIXELS} pixels, "
                       f"{MAX_IMAGE_SIDE} a side)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, MemoryError):
        raise ApiError(415, "unsupported_image", "the upload is not a readable PNG or JPEG image") from None
    pixels = pixels[None] if c == 1 else pixels.transpose(2, 0, 1)
    mean = np.asarray(normalize["mean"], np.float32).reshape(-1, 1, 1)
    std = np.asarray(normalize["std"], np.float32).reshape(-1, 1, 1)
    return ((pixels / float(normalize.get("scale", 255.0)) - mean) / std).astype(np.float32)


def softmax(z: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    # The largest logit taken off before dividing: at a tiny temperature z / T overflows to Inf, and Inf - Inf is NaN;
    # (z - max) / T is at most 0 (the top logit exactly 0), so the answer tends to the one-hot it should.
    # T divides in float64: in float32 a T below ~1e-45 is 0, and the top logit's 0 / 0 NaN.
    dtype = z.dtype
    z = z - z.max(axis=1, keepdims=True)
    with np.errstate(over="ignore"):  # to -Inf, whose exp is the 0 it should be
        e = np.exp(z / np.float64(temperature) if temperature != 1.0 else z)
    return (e / e.sum(axis=1, keepdims=True)).astype(dtype, copy=False)

