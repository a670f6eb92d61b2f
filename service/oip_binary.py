"""The Open Inference Protocol's binary tensor data extension: bodies of a JSON header and raw tensors.

A request whose ``Inference-Header-Content-Length`` header is N carries the JSON inference header in
its first N bytes; every input whose ``parameters.binary_data_size`` is set has its data, that many
bytes, after it, concatenated in input order (the rest send ``data`` in the JSON). A response does
the same for the outputs asked in binary. Tensors are row-major and little-endian; BOOL is one byte;
a BYTES tensor is its elements one after the other, each a 4-byte little-endian length and the bytes.
gRPC's ``raw_input_contents`` and ``raw_output_contents`` are the same bytes (:func:`from_raw`,
:func:`to_raw`).

Every size is checked against the header and the body before any data is read: a body whose sizes
do not add up, a header length past the body, a size that does not match the datatype and shape,
truncated bytes: a 400 that says which, and nothing runs. The payload limit (``SDB_MAX_PAYLOAD_BYTES``)
is the middleware's, on the whole body, before it is read.
"""
from __future__ import annotations

import math
import struct
from collections.abc import Sequence

import numpy as np
import orjson

from .errors import ApiError, bad_request, quoted
from .tensors import parse_json

HEADER_LENGTH = "Inference-Header-Content-Length"
OCTET_STREAM = "application/octet-stream"
# Every fixed-size datatype of the protocol, as little-endian numpy dtypes (BF16: its 16 bits, unread).
DTYPES = {"BOOL": np.dtype("u1"), "UINT8": np.dtype("u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
          "UINT64": np.dtype("<u8"), "INT8": np.dtype("i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
          "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
          "BF16": np.dtype("<u2")}
_LENGTH = struct.Struct("<I")


def split(body: bytes, header_length: str | None) -> tuple[dict, memoryview]:
    """The JSON header and the bytes after it (empty without ``Inference-Header-Content-Length``)."""
    if header_length is None:
        return parse_json(body), memoryview(b"")
    text = header_length.strip()
    if not text.isascii() or not text.isdigit():
        raise bad_request(f"{HEADER_LENGTH} must be a byte count, not {header_length[:40]!r}", "malformed_body")
    # More digits than the body's length has is past it: no int() of an unbounded string (Python refuses
    # one of over 4300 digits with a ValueError, and the digits may be thousands).
    n = int(text) if len(text.lstrip("0")) <= len(str(len(body))) else len(body) + 1
    if n == 0 or n > len(body):
        raise bad_request(f"{HEADER_LENGTH} {text[:40]} is past the body of {len(body)} bytes" if n else
                          f"{HEADER_LENGTH} is 0: the JSON header cannot be empty", "malformed_body")
    view = memoryview(body)
    return parse_json(view[:n]), view[n:]


def _size(tensor: dict, i: int) -> int | None:
    params = tensor.get("parameters")
    if params is None:
        return None
    if not isinstance(params, dict):
        raise bad_request(f"inputs[{i}].parameters must be an object", "malformed_body")
    for shm in ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"):
        if shm in params:
            raise bad_request(f"inputs[{i}]: shared memory is not served; send the data in the body",
                              "malformed_body")
    size = params.get("binary_data_size")
    if size is None:
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise bad_request(f"inputs[{i}].parameters.binary_data_size must be a non-negative integer", "malformed_body")
    return size


def input_chunks(inputs: Sequence, binary: memoryview, has_header: bool) -> list[memoryview | None]:
    """Each input's raw bytes, in order (None: its data is in the JSON), once the sizes add up to the body."""
    chunks: list[memoryview | None] = []
    offset = 0
    for i, t in enumerate(inputs):
        size = _size(t, i) if isinstance(t, dict) else None
        if size is None:
            chunks.append(None)
            continue
        if not has_header:
            raise bad_request(f"inputs[{i}] has binary_data_size but the request has no {HEADER_LENGTH} header",
                              "malformed_body")
        if "data" in t:
            raise bad_request(f"inputs[{i}] has both data and binary_data_size", "malformed_body")
        if offset + size > len(binary):
            raise bad_request(f"inputs[{i}] declares {size} bytes but only {len(binary) - offset} remain in the "
                              "body (truncated)", "malformed_body")
        chunks.append(binary[offset:offset + size])
        offset += size
    if offset != len(binary):
        raise bad_request(f"the body has {len(binary) - offset} bytes after the tensors its header declares "
                          f"({offset} bytes): the sizes do not add up", "malformed_body")
    return chunks


def _bytes_elements(raw: memoryview, what: str, count: int) -> list[tuple[int, int]]:
    """Where each length-prefixed element of a BYTES tensor starts and ends; 400 as soon as there are more
    than ``count`` (a body of millions of empty elements is refused at ``count`` + 1, not read to its end)."""
    out, offset = [], 0
    while offset < len(raw):
        if len(out) == count:
            raise bad_request(f"{what}: more BYTES elements than the {count} its shape needs (bytes go on past "
                              f"byte {offset})", "malformed_body")
        if offset + 4 > len(raw):
            raise bad_request(f"{what}: a BYTES element's 4-byte length is cut off at byte {offset}", "malformed_body")
        (n,) = _LENGTH.unpack_from(raw, offset)
        if offset + 4 + n > len(raw):
            raise bad_request(f"{what}: a BYTES element of {n} bytes at byte {offset} is past the tensor's "
                              f"{len(raw)} bytes (truncated)", "malformed_body")
        out.append((offset + 4, offset + 4 + n))
        offset += 4 + n
    return out


def check(datatype: str, shape: Sequence[int], raw: memoryview, what: str) -> list[tuple[int, int]] | None:
    """400 unless ``raw`` is exactly a ``datatype`` tensor of ``shape``; BYTES: where its elements lie."""
    count = math.prod(shape)
    if not isinstance(datatype, str):
        raise bad_request(f"{what}: datatype must be a string", "malformed_body")
    if datatype == "BYTES":
        spans = _bytes_elements(raw, what, count)
        if len(spans) != count:
            raise bad_request(f"{what}: {len(spans)} BYTES elements; shape {list(shape)} needs {count}",
                              "malformed_body")
        return spans
    dtype = DTYPES.get(datatype)
    if dtype is None:
        raise bad_request(f"{what}: datatype {quoted(datatype)} is not one of the protocol's", "malformed_body")
    if len(raw) != count * dtype.itemsize:
        raise bad_request(f"{what}: {len(raw)} bytes of {datatype} data; shape {list(shape)} needs "
                          f"{count * dtype.itemsize}", "malformed_body")
    return None


def from_raw(datatype: str, shape: Sequence[int], raw: memoryview, what: str = "input") -> np.ndarray:
    """The tensor ``raw`` holds (checked first: 400 on any size that does not match), shaped ``shape``.

    Numbers are a read-only view of the body (no copy); BOOL is True for any non-zero byte; BYTES an
    object array of ``bytes``."""
    spans = check(datatype, shape, raw, what)
    if spans is not None:
        out = np.empty(len(spans), dtype=object)
        out[:] = [bytes(raw[a:b]) for a, b in spans]
        return out.reshape(shape)
    arr = np.frombuffer(raw, dtype=DTYPES[datatype]).reshape(shape)
    return arr != 0 if datatype == "BOOL" else arr


def to_raw(datatype: str, data: np.ndarray) -> bytes:
    """A tensor's bytes as the protocol sends them (cast to ``datatype``, row-major, little-endian)."""
    if datatype == "BYTES":
        return b"".join(_LENGTH.pack(len(b)) + b for b in (bytes(e) for e in np.asarray(data, object).ravel()))
    dtype = DTYPES.get(datatype)
    if dtype is None:
        raise ApiError(500, "internal_error", f"no binary form for datatype {datatype!r}")
    return np.ascontiguousarray(data, dtype=bool if datatype == "BOOL" else dtype).tobytes()


def encode(header: dict, chunks: Sequence[bytes]) -> tuple[bytes, int | None]:
    """A body of ``header`` as JSON then ``chunks``; the header's length when there are chunks, else None."""
    head = orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return head, None
    return b"".join((head, *chunks)), len(head)
