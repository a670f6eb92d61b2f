"""Reading a request body once, for every route that takes one: JSON, a ``.npy`` tensor, image files
or a raw image.

A route names the media types it accepts; :func:`read_body` answers 415 for any other and
hands back what was sent: the parsed JSON object, the ``.npy`` array (read by :mod:`service.npy`,
its header checked before its data, so the route passes how to check the shape), or the uploaded
files and form fields (a raw ``image/png|jpeg`` body is the file ``file``). What the contents mean
(tensors, images, options) is the route's to check, with :mod:`service.tensors`. :func:`read_bytes`
decodes a body sent gzip- or deflate-compressed (the protocol's clients compress on request): JSON and raw
image bodies may come so; a ``.npy`` or multipart body, read as it streams in, is taken as sent only.
:func:`wants_npy` reads the ``Accept`` header for the routes that can answer ``.npy``.
"""
from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from .errors import ApiError, bad_request, invalid
from .npy import NPY, read_npy
from .tensors import parse_json

JSON, MULTIPART, PNG, JPEG = "application/json", "multipart/form-data", "image/png", "image/jpeg"
IMAGE_TYPES = (PNG, JPEG)

# Content codings a request body may come in (RFC 9110 8.4.1; x-gzip is gzip's old name): the Open Inference
# Protocol's clients compress on request (tritonclient: request_compression_algorithm "gzip" or "deflate").
_CODINGS = {"gzip": 31, "x-gzip": 31, "deflate": 15}  # zlib's wbits: the gzip container; the zlib one
# Inflating costs ~1 ms a MB of output: a body this large is inflated off the event loop.
_INLINE_INFLATE_BYTES = 64 << 10
# Members of one gzip body: clients send one; 8 MiB of empty 20-byte members would be 400,000 decoders.
_MAX_GZIP_MEMBERS = 16


def inflate(data: bytes, coding: str, max_bytes: int) -> bytes:
    """``data`` decoded from ``coding`` (gzip, its members one after another; deflate, the zlib format or, as some
    clients send it, raw); 413 past ``max_bytes`` of output, which is never exceeded in memory; 400 for a stream
    that is corrupt, truncated or followed by other bytes."""
    wbits = _CODINGS[coding]
    out: list[bytes] = []
    total, rest = 0, data
    while True:
        d = zlib.decompressobj(wbits)
        try:
            chunk = d.decompress(rest, max_bytes - total + 1)
        except zlib.error:
            if wbits == 15 and not out:  # "deflate" as raw deflate, without the zlib header
                wbits = -15
                continue
            raise bad_request(f"the body is not valid {coding} data", "malformed_body") from None
        total += len(chunk)
        if total > max_bytes:
            raise ApiError(413, "payload_too_large", f"the body inflates past this route's limit of {max_bytes} "
                           "bytes (SDB_MAX_PAYLOAD_BYTES)")
        if not d.eof:
            raise bad_request(f"the {coding} body is truncated", "malformed_body")
        out.append(chunk)
        rest = d.unused_data
        if not rest:
            return out[0] if len(out) == 1 else b"".join(out)
        if wbits != 31 or len(out) == _MAX_GZIP_MEMBERS:
            raise bad_request(f"bytes follow the end of the {coding} stream"
                              + (f" (at most {_MAX_GZIP_MEMBERS} gzip members)" if wbits == 31 else ""),
                              "malformed_body")


def content_coding(request: Request) -> str:
    """The body's ``Content-Encoding``, lower case; ``identity`` when none is named."""
    return request.headers.get("content-encoding", "").strip().lower() or "identity"  # an empty header names none


async def read_bytes(request: Request, max_bytes: int) -> bytes:
    """The body's bytes, decoded from its ``Content-Encoding`` (gzip or deflate: :func:`inflate`, at most
    ``max_bytes``); 415 for another coding or several."""
    raw = await request.body()
    coding = content_coding(request)
    if coding == "identity":
        return raw
    if coding not in _CODINGS:
        raise ApiError(415, "unsupported_media_type", f"Content-Encoding {coding[:40]!r} is not served: send gzip, "
                       "deflate or identity (one coding)")
    if len(raw) > _INLINE_INFLATE_BYTES:
        return await run_in_threadpool(inflate, raw, coding, max_bytes)
    return inflate(raw, coding, max_bytes)


@dataclass(frozen=True, slots=True)
class Body:
    """What a request sent: ``json`` for a JSON body, ``tensor`` for a ``.npy`` one, else ``files``
    and ``fields``."""

    json: dict | None = None
    files: dict[str, bytes] = field(default_factory=dict)  # field name → upload; a raw image is "file"
    fields: dict[str, str] = field(default_factory=dict)  # multipart text fields
    tensor: np.ndarray | None = None  # a .npy body: float32, of the shape the route's check gave
    uploads: tuple[bytes, ...] = ()  # the files uploaded as "file" in the order sent (several: several samples)
    names: tuple[str, ...] = ()  # the field name of every uploaded file, in the order sent (each name as often)


def media_type(request: Request) -> str:
    """The body's media type; a request that names none is taken as JSON."""
    return request.headers.get("content-type", JSON).split(";")[0].strip().lower()


def is_json(media: str) -> bool:
    """Whether a body of ``media`` (:func:`media_type`) is read as JSON: ``application/json``, a structured
    ``application/…+json`` type, or none named (an empty header; a route's pydantic body takes none: JSON_ONLY)."""
    return media in (JSON, "") or (media.startswith("application/") and media.endswith("+json"))


def unsupported(media: str, accept: tuple[str, ...], what: str | None = None) -> ApiError:
    """The 415 for a body of ``media`` ("": it named none), naming the types the route takes (``what``: the route,
    "… takes")."""
    choices = ", ".join(accept[:-1]) + " or " + accept[-1] if len(accept) > 1 else accept[0]
    sent = f", not {media}" if media else " and name it in Content-Type (this body named none)"
    return ApiError(415, "unsupported_media_type", f"{what + ' takes' if what else 'send'} {choices}{sent}")


async def _json_only(request: Request) -> None:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if (media and is_json(media)) or (not media and not await request.body()):  # no body at all: its fields' 422
        return
    raise unsupported(media, (JSON,))


# The dependency of a route whose body is a pydantic model, which FastAPI parses only from a body its Content-Type
# says is JSON (strict_content_type: a body that names no type too), and passed any other to the model as bytes:
# a 422 "Input should be a valid dictionary" that said nothing of the type (curl -d sends form-urlencoded). The
# body was read already (FastAPI reads it before the dependencies). NOT_JSON: its 415 in the route's answers.
JSON_ONLY = Depends(_json_only)
NOT_JSON = "a body sent as another media type than JSON, or naming none (Content-Type: application/json)"


def _payload_limit(request: Request) -> int:
    return request.app.state.settings.max_payload_bytes


async def read_json(request: Request) -> dict:
    """The body as a JSON object, whatever its content type, inflated from its ``Content-Encoding``."""
    return parse_json(await read_bytes(request, _payload_limit(request)))


async def read_body(request: Request, accept: tuple[str, ...], *, what: str | None = None,
                    max_files: int = 64, max_fields: int = 16,
                    batch: Callable[[tuple[int, ...]], tuple[int, ...]] | None = None,
                    max_bytes: int | None = None, samples: int | None = None) -> Body:
    """The body, if its media type is one of ``accept``; 415 naming them otherwise.

    ``what`` names the route in the 415 message ("distill takes …"); without it, "send …".
    ``max_files`` and ``max_fields`` bound a multipart form before it is parsed; ``samples``: the most images a route
    that reads each file as a sample takes, whose form past ``max_files`` is a 422 ``too_many_samples`` (Starlette's
    400 "Too many files" said nothing a client could act on: the SDK halves a batch on the 422). A route that takes
    ``.npy`` gives ``batch``, the input shape for an array's shape (422 for one it refuses), and
    ``max_bytes``, the largest array it reads: both are checked from the header, before the data.
    """
    media = media_type(request)
    # a .npy or multipart body is read as it streams in: as sent
    if content_coding(request) != "identity" and not is_json(media) and media not in IMAGE_TYPES:
        raise ApiError(415, "unsupported_media_type", f"a {media} body is read as sent: send it without "
                       "Content-Encoding (JSON and image bodies may come gzip or deflate)")
    if media == NPY and NPY in accept:
        if batch is None or max_bytes is None:
            raise TypeError("read_body: a route that takes .npy gives batch and max_bytes")
        return Body(tensor=await read_npy(request.stream(), batch, max_bytes))
    if media == MULTIPART and MULTIPART in accept:
        try:
            form = await request.form(max_files=max_files, max_fields=max_fields)
        except HTTPException as e:
            if samples is not None and str(e.detail).startswith("Too many files"):
                raise invalid(f"over {samples} images in one request; at most {samples}", "too_many_samples") from None
            raise
        # One value per name, the last sent, as the form's mapping view gives them; every upload in `uploads`.
        items = list(form.items())
        uploads = [(k, v) for k, v in form.multi_items() if isinstance(v, UploadFile)]
        data = {id(v): await v.read() for _, v in uploads}
        return Body(files={k: data[id(v)] for k, v in items if isinstance(v, UploadFile)},
                    fields={k: v for k, v in items if isinstance(v, str)},
                    uploads=tuple(data[id(v)] for k, v in uploads if k == "file"),  # another part is no sample
                    names=tuple(k for k, _ in uploads))
    if media in IMAGE_TYPES and media in accept:
        raw = await read_bytes(request, _payload_limit(request))
        return Body(files={"file": raw}, uploads=(raw,), names=("file",))
    if is_json(media) and JSON in accept:
        return Body(json=await read_json(request))
    raise unsupported(media, accept, what)


def wants_npy(request: Request) -> bool:
    """Whether the ``Accept`` header asks for a ``.npy`` answer: ``application/x-npy`` named with a
    weight (q) above zero and at least JSON's. No header, ``*/*`` and anything else keep JSON."""
    accept = request.headers.get("accept", "").lower()
    if NPY not in accept:  # the common case, JSON, in one test
        return False
    npy_q, json_q = 0.0, 0.0
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if media == NPY:
            npy_q = max(npy_q, q)
        elif media in (JSON, "application/*", "*/*"):
            json_q = max(json_q, q)
    return npy_q > 0 and npy_q >= json_q
