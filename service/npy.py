"""``.npy`` bodies (``application/x-npy``): the binary tensor encoding of the v1 inference routes.

A request body is one ``.npy`` array (numpy's own format: a short text header naming dtype, order and
shape, then the raw values), read strictly: float16/32/64, little-endian or native, C order, the
model's shape. The header is parsed first (``numpy.lib.format``'s literal reader: nothing is ever
unpickled, an object array is refused from its header alone), and the shape, the sample count and
the data's size are checked before any value is read. The data is then read in one buffer and viewed
as an array, with no per-element work but the float32 conversion and the finiteness check.
"""
from __future__ import annotations

import io
import math
import re
import tokenize
from collections.abc import AsyncIterator, Callable

import numpy as np
from numpy.lib import format as npformat

from .errors import ApiError, bad_request, invalid
from .tensors import finite_float32

NPY = "application/x-npy"
MAGIC = npformat.MAGIC_PREFIX  # b"\x93NUMPY"
MAX_HEADER_BYTES = 10_000  # numpy's own bound on a header it reads (np.load's max_header_size)
FLOAT_SIZES = (2, 4, 8)  # float16, float32, float64

Shape = tuple[int, ...]


def _malformed(why: str) -> ApiError:
    return bad_request(f"body is not a valid .npy array: {why}", "malformed_body")


def parse_header(buf: bytes | bytearray) -> tuple[np.dtype, bool, Shape, int] | None:
    """(dtype, fortran_order, shape, data offset) from the start of a ``.npy`` body; None while ``buf``
    is too short to hold the whole header. 400 for anything that is not a ``.npy`` header."""
    if len(buf) < len(MAGIC) + 2:
        if not MAGIC.startswith(bytes(buf[:len(MAGIC)])):
            raise _malformed("it does not start with the .npy magic string")
        return None
    if bytes(buf[:len(MAGIC)]) != MAGIC:
        raise _malformed("it does not start with the .npy magic string")
    version = (buf[6], buf[7])
    if version == (1, 0):
        size_bytes = 2
    elif version in ((2, 0), (3, 0)):
        size_bytes = 4
    else:
        raise _malformed(f"format version {version[0]}.{version[1]} is not 1.0, 2.0 or 3.0")
    start = 8 + size_bytes
    if len(buf) < start:
        return None
    header_len = int.from_bytes(buf[8:start], "little")
    if header_len > MAX_HEADER_BYTES:
        raise _malformed(f"a header of {header_len} bytes (at most {MAX_HEADER_BYTES})")
    if len(buf) < start + header_len:
        return None
    # A float dtype's header is ASCII in every version, so the 2.0 reader reads a 3.0 header too.
    reader = npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
    fp = io.BytesIO(bytes(buf[8:start + header_len]))
    try:
        shape, fortran_order, dtype = reader(fp, max_header_size=MAX_HEADER_BYTES)
    except tokenize.TokenError:  # numpy re-tokenizes a 1.0/2.0 header its literal reader refused: an unclosed bracket
        raise _malformed("the header is not a dict literal (it ends inside a bracket)") from None
    except (ValueError, TypeError, SyntaxError, UnicodeDecodeError) as e:
        # numpy's text may show a parsed node's repr ("<ast.Call object at 0x7f...>"): no server address in it
        said = re.sub(r" object at 0x[0-9a-fA-F]+", " object", str(e).splitlines()[0][:200]) if str(e) else ""
        raise _malformed(said or "unreadable header") from None
    if any(n < 0 for n in shape):
        raise _malformed(f"a negative dimension in shape {list(shape)}")
    return dtype, bool(fortran_order), tuple(int(n) for n in shape), start + header_len


def check_dtype(dtype: np.dtype, fortran_order: bool, what: str = "inputs") -> None:
    """422 for anything but a plain float16/32/64 array, little-endian or native, in C order."""
    if dtype.hasobject:
        raise invalid(f"{what} is an object (pickle) array: refused unread; send float32", "invalid_dtype")
    if dtype.kind != "f" or dtype.itemsize not in FLOAT_SIZES or dtype.fields is not None:
        raise invalid(f"{what} has dtype {dtype.str}; send float32 (or float16, float64)", "invalid_dtype")
    if dtype.byteorder not in ("<", "="):
        raise invalid(f"{what} is big-endian ({dtype.str}); send little-endian {dtype.str.replace('>', '<')}",
                      "invalid_dtype")
    if fortran_order:
        raise invalid(f"{what} is in Fortran order; send a C-order array (np.ascontiguousarray)", "invalid_layout")


async def read_npy(chunks: AsyncIterator[bytes], batch: Callable[[Shape], Shape], max_bytes: int,
                   what: str = "inputs") -> np.ndarray:
    """One ``.npy`` array from a body's ``chunks``, as float32 of the shape ``batch`` gives for the header's
    (``batch`` raises the route's 422 for a shape it refuses). Checked before the data is read: the header
    (400), the dtype and order (422), the shape and sample count (422), the data's size (413 over
    ``max_bytes``). Then 400 for a body shorter or longer than the header says, 422 for NaN or Inf."""
    buf = bytearray()
    header = None
    async for chunk in chunks:
        buf += chunk
        header = parse_header(buf)
        if header is not None:
            break
    if header is None:
        raise _malformed("the body ends inside the header" if buf else "the body is empty")
    dtype, fortran_order, shape, offset = header
    check_dtype(dtype, fortran_order, what)
    target = batch(shape)
    end = offset + math.prod(shape) * dtype.itemsize
    if end > max_bytes:
        raise ApiError(413, "payload_too_large", f"an array of {end} bytes is over the {max_bytes}-byte limit")
    async for chunk in chunks:
        buf += chunk
        if len(buf) > end:
            break
    if len(buf) != end:
        short = len(buf) < end
        raise _malformed(f"the header announces {end - offset} bytes of data; the body has "
                         f"{'only ' if short else 'more than '}{len(buf) - offset}" + (" (truncated)" if short else ""))
    arr = np.frombuffer(buf, dtype=dtype, offset=offset).reshape(target)
    return finite_float32(arr, what)


def encode(arr: np.ndarray) -> bytes:
    """``arr`` as a ``.npy`` (format 1.0, little-endian, C order), what ``np.load`` reads back."""
    arr = np.ascontiguousarray(arr)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    fp = io.BytesIO()
    npformat.write_array_header_1_0(fp, npformat.header_data_from_array_1_0(arr))
    fp.write(arr.data)
    return fp.getvalue()
