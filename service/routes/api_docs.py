"""The API's documentation page, ``/docs`` (Swagger UI), served whole from this server.

FastAPI's own pages (``/docs``, ``/redoc``) load Swagger UI and ReDoc from a CDN at floating major versions, start
them with an inline script and send no Content-Security-Policy: code from another site, fetched at run time, running
on the console's origin, where it could read the key the console keeps in the tab's ``sessionStorage``. Here Swagger
UI is the ``fastapi-offline`` package's copy (pinned in pyproject.toml), its start-up script this module's own file,
and every answer carries a CSP that lets scripts come from this origin only, and no framing. ReDoc is not served: it
fetches its logo from its maker's site; ``/openapi.json`` is the contract either way.
"""
from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter
from starlette.responses import Response

from ..errors import not_found

router = APIRouter(include_in_schema=False)

# Swagger UI styles its elements inline and draws its icons from data: URLs.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "font-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
           "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}

# Relative URLs: under a proxy's prefix (root_path) /p/docs loads /p/docs/static/... and /p/openapi.json.
SWAGGER = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>SDB API</title>
<link rel="icon" href="docs/static/favicon.png">
<link rel="stylesheet" href="docs/static/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="docs/static/swagger-ui-bundle.js"></script>
<script src="docs/static/swagger-start.js"></script></body></html>
"""
SWAGGER_START = """window.ui = SwaggerUIBundle({
  url: "openapi.json", dom_id: "#swagger-ui", layout: "BaseLayout", deepLinking: true, showExtensions: true,
  showCommonExtensions: true, presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
});
"""
_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".png": "image/png"}


@cache
def _bundled() -> dict[str, Path]:
    import fastapi_offline

    static = Path(fastapi_offline.__file__).resolve().parent / "static"
    return {name: static / name for name in ("swagger-ui-bundle.js", "swagger-ui.css", "favicon.png")}


def _asset(name: str) -> bytes | None:
    if name == "swagger-start.js":
        return SWAGGER_START.encode()
    path = _bundled().get(name)  # a name from the fixed set: no path from the request reaches the disk or a cache
    return _read(path) if path is not None and path.is_file() else None


@cache
def _read(path: Path) -> bytes:
    return path.read_bytes()


@router.get("/docs")
def swagger() -> Response:
    return Response(SWAGGER, media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/docs/static/{name}")
def asset(name: str) -> Response:
    body = _asset(name)
    if body is None:
        raise not_found(f"no documentation asset {name[:100]!r}", "not_found")
    return Response(body, media_type=_TYPES[Path(name).suffix], headers=HEADERS)
