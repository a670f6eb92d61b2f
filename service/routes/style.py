"""``POST /v1/style/{name}``: stylize an image with a hosted style bundle; the answer is a PNG.

A style bundle (task ``style``, from the ``style`` job kind) is fully convolutional: the
output has the input's size. ``fast`` bundles take one image; ``adain`` bundles take a
content image, a style image and ``alpha`` (1 = all style, 0 = the content reconstructed).
Bodies: ``multipart/form-data`` (``file``, and ``style`` for AdaIN, ``alpha`` as a field),
JSON (``{"image": base64, "style": base64, "alpha": 0.8}``) or a raw ``image/png|jpeg``
body (no style image, so fast bundles only). ``alpha`` may also be a query parameter (in both places: the same).

Images are checked before any model runs: PNG or JPEG only, each side between
``MIN_SIDE`` and ``MAX_SIDE`` pixels (a stylization costs time and memory in proportion
to the pixels, and ONNX Runtime would happily take a 10,000² image and the server with it).
"""
from __future__ import annotations

import base64
import binascii
import io

import numpy as np
from fastapi import APIRouter, Query, Request
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from sdb_core.bundle import INPUT_NAME
from sdb_core.pixels import CostlyImage, open_checked, unit_pixels

from ..bodies import IMAGE_TYPES, JSON, MULTIPART, Body, read_body
from ..deps import SERVING_DOC, ModelName, ServingDep
from ..errors import ApiError, bad_request, invalid
from ..inference import require_predict, stylized
from ..registry import HostedModel, ModelHost
from ..schemas import AUTH, NO_NUL, given_options, json_body_doc, options, responses
from ..tensors import MAX_IMAGE_PIXELS, image_format

router = APIRouter(prefix="/v1/style", tags=["style"])

MAX_SIDE = 1024
MIN_SIDE = 16
_BODY_TYPES = (MULTIPART, JSON, *IMAGE_TYPES)


class StyleRequest(BaseModel):
    image: str = Field(description="the content image, PNG or JPEG, base64")
    style: str | None = Field(None, description="the style image (AdaIN bundles only), PNG or JPEG, base64")
    alpha: float | None = Field(None, ge=0.0, le=1.0, description="AdaIN's content-style trade-off; "
                                 "null or omitted: the query's alpha, else 1")


class StyleOptions(BaseModel):
    alpha: float | None = Field(None, ge=0.0, le=1.0)


_UPLOAD_DOC = {"multipart/form-data": {"schema": {
    "type": "object", "properties": {"file": {"type": "string", "format": "binary"},
                                     "style": {"type": "string", "format": "binary"},
                                     "alpha": {"type": "number"}}, "required": ["file"]}},
    "image/png": {"schema": {"type": "string", "format": "binary"}},
    "image/jpeg": {"schema": {"type": "string", "format": "binary"}}}


def decode(data: bytes, what: str) -> np.ndarray:
    """PNG/JPEG bytes → (1, 3, H, W) float32 in [0, 1], read as predict and the style jobs read images
    (:func:`~sdb_core.pixels.unit_pixels`: over its depth, upright, over white); 415 unreadable, 413 too large,
    422 too small."""
    try:
        img = open_checked(data)
        if image_format(img) is None:
            raise ApiError(415, "unsupported_image", f"{what}: image format {img.format} is not PNG or JPEG")
        if img.width * img.height > MAX_IMAGE_PIXELS or max(img.width, img.height) > MAX_SIDE:
            raise ApiError(413, "image_too_large", f"{what} is {img.width}x{img.height} pixels; this endpoint "
                           f"takes at most {MAX_SIDE} pixels a side")
        if min(img.width, img.height) < MIN_SIDE:
            raise invalid(f"{what} is {img.width}x{img.height} pixels; at least {MIN_SIDE} a side", "image_too_small")
        rgb = unit_pixels(img, "RGB")
    except ApiError:
        raise
    except CostlyImage as e:
        raise ApiError(415, "unsupported_image", f"{what}: {e}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError,
            MemoryError):
        raise ApiError(415, "unsupported_image", f"{what} is not a readable PNG or JPEG image") from None
    return np.ascontiguousarray(rgb.transpose(2, 0, 1)[None], dtype=np.float32)


def encode_png(x: np.ndarray) -> bytes:
    """(3, H, W) in [0, 1] → PNG bytes."""
    arr = (np.clip(x, 0.0, 1.0).transpose(1, 2, 0) * 255.0 + 0.5).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def _pad(x: np.ndarray, multiple: int) -> np.ndarray:
    """Reflect-pad H and W up to a multiple of the network's down-sampling factor."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if not ph and not pw:
        return x
    mode = "reflect" if ph < h and pw < w else "edge"
    return np.pad(x, ((0, 0), (0, 0), (0, ph), (0, pw)), mode=mode)


def style_feeds(meta: dict, content: np.ndarray, style: np.ndarray | None, alpha: float) -> dict[str, np.ndarray]:
    """The bundle's named inputs, images padded to its down-sampling factor (the output is cropped back)."""
    info = meta.get("style", {})
    multiple = int(info.get("multiple", 1))
    feeds = {INPUT_NAME: _pad(content, multiple)}
    if info.get("method") == "adain":
        feeds["style"] = _pad(style, multiple)
        feeds["alpha"] = np.full((1,), alpha, dtype=np.float32)
    return feeds


async def _style_model(host: ModelHost, name: str, version: str | None) -> HostedModel:
    model = await host.aget(name, version)  # may load it from disk: off the event loop
    if model.task != "style":
        raise bad_request(f"model {name!r} is a {model.task} model, not a style "
                          f"model: use POST /v1/models/{name}/predict", "wrong_task")
    return model


def _images(body: Body, alpha_query: float | None) -> tuple[bytes, bytes | None, float | None]:
    """The content image, the style image if sent, and alpha, from whichever body was sent. alpha follows the
    inference routes' rule for an option in the body and the query (a null or empty one is not given; two
    different values are a 422), so a generated client's ``"alpha": null`` leaves ``?alpha=`` in force."""
    query = {} if alpha_query is None else {"alpha": alpha_query}
    if body.json is not None:
        alpha = given_options(StyleOptions, body.json, query, "JSON body").alpha
        req = options(StyleRequest, {**body.json, "alpha": alpha})
        return _b64(req.image, "image"), (_b64(req.style, "style") if req.style else None), req.alpha
    repeated = sorted({n for n in body.names if n in ("file", "style") and body.names.count(n) > 1})
    if repeated:  # one content image (and one style): the last of several was styled without a word
        raise invalid(f"field {repeated[0]!r} is sent {body.names.count(repeated[0])} times: this route styles one "
                      "content image (with at most one style image) per request", "invalid_request")
    content = body.files.get("file")
    if content is None:
        raise invalid("multipart body has no file: send the content image as field 'file'", "invalid_request")
    if "style" in body.fields:
        raise invalid("field 'style' must be an image file", "invalid_request")
    if "alpha" in body.files:
        raise invalid("field 'alpha' must be a number, not a file", "invalid_request")
    opts = given_options(StyleOptions, body.fields, query, "form")
    return content, body.files.get("style"), opts.alpha


def _b64(s: str, what: str) -> bytes:
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"{what} is not valid base64", "invalid_request") from None


# A 16x16 grey PNG: the smallest image the route takes, for the example.
_PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAABAAAAAQCAAAAAA6mKC9AAAAEUlEQVR4nGNsYEAFTAwjWgAAmZAAoC0n3a4AAAAASUVORK5CYII="


@router.post("/{name}", summary="Stylize an image (PNG out)", response_class=Response,
             responses={200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                              "description": "the stylized image, PNG"},
                        **responses(400, *AUTH, 404, 413, 415, 503, why={
                            400: "a body that is not a JSON object, or a model that is not a style model",
                            401: "a key that is not valid; or none, when predict needs one (public_predict off)",
                            413: "over the payload limit, or an image over 1024 pixels a side",
                            415: "a media type the route does not take, or an image that is not a readable PNG or JPEG",
                            422: "an image under 16 pixels a side, bad base64, a style image where none is "
                                 "taken (or none where one is needed), alpha out of [0, 1], or alpha in the body and the "
                                 "query with different values (conflicting_options)"})},
             openapi_extra={**json_body_doc(StyleRequest, *_UPLOAD_DOC.items(),
                                            example={"image": _PNG_B64, "alpha": 0.8}), **SERVING_DOC})
async def style(name: ModelName, request: Request, s: ServingDep,
                version: str | None = Query(None, description="a version of the model; default the highest",
                                            pattern=NO_NUL),
                alpha: float | None = Query(None, ge=0.0, le=1.0, description="AdaIN only: 1 all style")) -> Response:
    require_predict(s.key, name, s.settings.public_predict)
    model = await _style_model(s.host, name, version)
    method = model.meta.get("style", {}).get("method")
    body = await read_body(request, _BODY_TYPES, max_files=2, max_fields=4)
    content_bytes, style_bytes, alpha_value = _images(body, alpha)
    if method == "adain" and style_bytes is None:
        raise invalid(f"model {name!r} is an AdaIN model: send a style image too (field 'style')", "missing_style")
    if method != "adain" and (style_bytes is not None or alpha_value is not None):
        raise invalid(f"model {name!r} was trained for one style: it takes no style image and no alpha",
                      "unexpected_style")

    def prepare() -> tuple[dict[str, np.ndarray], tuple[int, ...]]:  # grows with the image: off the event loop
        content = decode(content_bytes, "content image")
        style_img = decode(style_bytes, "style image") if style_bytes is not None else None
        alpha_used = 1.0 if alpha_value is None else alpha_value
        return style_feeds(model.meta, content, style_img, alpha_used), content.shape[-2:]

    feeds, (h, w) = await run_in_threadpool(prepare)
    out = await stylized(model, feeds, s.key, s.keyring, s.metrics)
    png = await run_in_threadpool(lambda: encode_png(out[0, :, :h, :w]))  # cropped back to the content's size
    return Response(png, media_type="image/png", headers={"X-Model-Version": model.version})
