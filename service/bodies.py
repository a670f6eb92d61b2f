"""Reading a request body once, for every route that takes one: JSON, image files or a raw image.

A route names the media types it accepts; :func:`read_body` answers 415 for any other and
hands back what was sent: the parsed JSON object, or the uploaded files and form fields
(a raw ``image/png|jpeg`` body is the file ``file``). What the contents mean (tensors,
images, options) is the route's to check, with :mod:`service.tensors`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request
from starlette.datastructures import UploadFile

from .errors import ApiError
from .tensors import parse_json

JSON, MULTIPART, PNG, JPEG = "application/json", "multipart/form-data", "image/png", "image/jpeg"
IMAGE_TYPES = (PNG, JPEG)


@dataclass(frozen=True, slots=True)
class Body:
    """What a request sent: ``json`` for a JSON body, else ``files`` and ``fields``."""

    json: dict | None = None
    files: dict[str, bytes] = field(default_factory=dict)  # field name → upload; a raw image is "file"
    fields: dict[str, str] = field(default_factory=dict)  # multipart text fields


def media_type(request: Request) -> str:
    """The body's media type; a request that names none is taken as JSON."""
    return request.headers.get("content-type", JSON).split(";")[0].strip().lower()


async def read_json(request: Request) -> dict:
    """The body as a JSON object, whatever its content type (the v2 protocol names none)."""
    return parse_json(await request.body())


async def read_body(request: Request, accept: tuple[str, ...], *, what: str | None = None,
                    max_files: int = 64, max_fields: int = 16) -> Body:
    """The body, if its media type is one of ``accept``; 415 naming them otherwise.

    ``what`` names the route in the 415 message ("distill takes …"); without it, "send …".
    ``max_files`` and ``max_fields`` bound a multipart form before it is parsed.
    """
    media = media_type(request)
    if media == MULTIPART and MULTIPART in accept:
        form = await request.form(max_files=max_files, max_fields=max_fields)
        # One value per name, the last sent, as the form's mapping view gives them.
        items = list(form.items())
        return Body(files={k: await v.read() for k, v in items if isinstance(v, UploadFile)},
                    fields={k: v for k, v in items if isinstance(v, str)})
    if media in IMAGE_TYPES and media in accept:
        return Body(files={"file": await request.body()})
    if media in (JSON, "") and JSON in accept:
        return Body(json=await read_json(request))
    choices = ", ".join(accept[:-1]) + " or " + accept[-1] if len(accept) > 1 else accept[0]
    raise ApiError(415, "unsupported_media_type", f"{what + ' takes' if what else 'send'} {choices}, not {media}")
