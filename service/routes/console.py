"""The web console: ``/`` and ``/console`` serve its page, ``/console/static/…`` its assets (docs/console.md).

The page is static (``service/console/``: one HTML file, a few ES modules, one stylesheet; no build
step, nothing fetched from elsewhere). It holds no data and no secret: it calls the REST API with the
key the owner signs in with, kept in the tab's ``sessionStorage`` and sent only as
``Authorization: Bearer``. Every answer carries a strict Content-Security-Policy: scripts from this
origin only (no inline script), no framing.

Behind a proxy that serves it under a path prefix (``SDB_ROOT_PATH``, the request's root path), the page is
served with that prefix put in: before its asset URLs, and in its ``sdb-root`` meta tag, which the modules put
before every URL of this server they ask for or link to (``url()`` in ``static/lib.js``).
"""
from __future__ import annotations

import hashlib
import html
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


PAGE = CONSOLE_DIR / "index.html"
# What the page holds at the host's root, and where the root path goes in it (nothing else in it starts so).
ASSET_REFS, ROOT_META = '="/console/static/', '<meta name="sdb-root" content="">'


def _with_root(page: str, root: str) -> str:
    """The page for a service under the path prefix ``root`` ("" at the host's root, else like "/sdb")."""
    if not root:
        return page
    quoted = html.escape(root, quote=True)  # a validated prefix needs none; an ASGI server's own must not break out
    return (page.replace(ASSET_REFS, f'="{quoted}/console/static/')
                .replace(ROOT_META, f'<meta name="sdb-root" content="{quoted}">'))


@cache
def _read(p: Path, mtime_ns: int, root: str) -> tuple[bytes, str]:
    """The file's body (the page with ``root`` put in) and its ETag: one per root path, as the bodies differ."""
    body = p.read_bytes()
    if p == PAGE:
        body = _with_root(body.decode(), root).encode()
    return body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def _file(request: Request, p: Path, media_type: str) -> Response:
    """The file, or 304 when the browser holds this version: revalidated on every load (no-cache), so a
    new release is seen at once and an unchanged one costs no body."""
    body, etag = _read(p, p.stat().st_mtime_ns, request.scope.get("root_path", "").rstrip("/"))
    headers = {**HEADERS, "Cache-Control": "no-cache", "ETag": etag}
    if _holds(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type=media_type, headers=headers)


def _holds(if_none_match: str | None, etag: str) -> bool:
    """Whether If-None-Match names this version, compared weakly as RFC 9110 has it for this header: a proxy that
    compresses the page (nginx's gzip) makes its ETag weak (W/"..."), and the browser sends that back; a list of
    tags, or "*", holds it too. (Our tags are hex in quotes: no comma inside one.)"""
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    return any(tag.strip().removeprefix("W/") == etag for tag in if_none_match.split(","))


@router.get("/")
@router.get("/console")
@router.get("/console/")  # typed with a slash too: slashes are not redirected (service/app.py), so it was a 404
def page(request: Request) -> Response:
    return _file(request, PAGE, "text/html; charset=utf-8")


@router.get("/console/static/{path:path}")
def asset(path: str, request: Request) -> Response:
    p = _assets().get(path)  # a name from the fixed set: no path from the request reaches the disk
    if p is None:
        raise not_found(f"no console asset {path!r}", "not_found")
    return _file(request, p, TYPES[p.suffix])
