"""The web console: ``/`` and ``/console`` serve its page, ``/console/static/…`` its assets (docs/console.md).

The page is static (``service/console/``: one HTML file, a few ES modules, one stylesheet; no build
step, nothing fetched from elsewhere). It holds no data and no secret: it calls the REST API with the
key the owner signs in with, kept in the tab's ``sessionStorage`` and sent only as
``Authorization: Bearer``. Every answer carries a strict Content-Security-Policy: scripts from this
origin only (no inline script), no framing.
"""
from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

from fastapi import APIRouter, Request
from starlette.responses import Response

from ..errors import not_found

router = APIRouter(tags=["console"], include_in_schema=False)

CONSOLE_DIR = Path(__file__).resolve().parent.parent / "console"
STATIC_DIR = CONSOLE_DIR / "static"
TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".png": "image/png",
         ".json": "application/json", ".svg": "image/svg+xml"}
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
       "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
           "Referrer-Policy": "no-referrer", "Cross-Origin-Opener-Policy": "same-origin"}


@cache
def _assets() -> dict[str, Path]:
    """Every servable asset by its path under static/ (read once: the set is fixed at install)."""
    return {p.relative_to(STATIC_DIR).as_posix(): p for p in STATIC_DIR.rglob("*")
            if p.is_file() and p.suffix in TYPES}


@cache
def _read(p: Path, mtime_ns: int) -> tuple[bytes, str]:
    body = p.read_bytes()
    return body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def _file(request: Request, p: Path, media_type: str) -> Response:
    """The file, or 304 when the browser holds this version: revalidated on every load (no-cache), so a
    new release is seen at once and an unchanged one costs no body."""
    body, etag = _read(p, p.stat().st_mtime_ns)
    headers = {**HEADERS, "Cache-Control": "no-cache", "ETag": etag}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(body, media_type=media_type, headers=headers)


@router.get("/")
def root(request: Request) -> Response:
    return _file(request, CONSOLE_DIR / "index.html", "text/html; charset=utf-8")


@router.get("/console")
def console(request: Request) -> Response:
    return _file(request, CONSOLE_DIR / "index.html", "text/html; charset=utf-8")


@router.get("/console/static/{path:path}")
def asset(path: str, request: Request) -> Response:
    p = _assets().get(path)  # a name from the fixed set: no path from the request reaches the disk
    if p is None:
        raise not_found(f"no console asset {path!r}", "not_found")
    return _file(request, p, TYPES[p.suffix])
