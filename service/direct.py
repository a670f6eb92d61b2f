"""The inference routes, called straight from the service middleware: FastAPI's routing, exception
middleware and request handling stepped over.

A route whose endpoint is marked :func:`direct` (it takes the request alone, reads its own path
parameters, caller and body, and returns a response) is still declared with FastAPI, so the OpenAPI
document and every other route are as before; but a request for it is matched here, against these few
routes, and its endpoint called at once. FastAPI's generic path (matching the request against every
route in turn, solving an empty dependency list, the exit stack, the exception middleware's lookup)
was about a third of a binary v2 infer's CPU, at thousands of requests a second. Errors are answered
by :func:`service.errors.response_for`, as the exception handlers answer them on the other routes.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable

from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect, Request
from starlette.routing import get_route_path
from starlette.types import Receive, Scope, Send

from .errors import HANDLED, response_for
from .metrics import ERROR_CODE

_MARK = "_sdb_direct"


def direct(endpoint: Callable) -> Callable:
    """Mark an endpoint ``async def f(request: Request) -> Response`` to be called directly."""
    params = list(inspect.signature(endpoint).parameters.values())
    if len(params) != 1 or not inspect.iscoroutinefunction(endpoint):
        raise TypeError(f"{endpoint.__name__}: a direct endpoint is async and takes the request alone "
                        "(no dependency would be solved for it)")
    setattr(endpoint, _MARK, True)
    return endpoint


class DirectRoutes:
    def __init__(self, routes: Iterable):
        self.routes: list[APIRoute] = [r for r in routes if isinstance(r, APIRoute) and getattr(r.endpoint, _MARK,
                                                                                             False)]

    def match(self, scope: Scope) -> APIRoute | None:
        """The direct route a request is for (None: FastAPI's router takes it, 405s and 404s included)."""
        method, path = scope["method"], get_route_path(scope)
        for route in self.routes:
            if method in route.methods:
                m = route.path_regex.match(path)
                if m is not None:
                    scope["path_params"] = {k: route.param_convertors[k].convert(v) for k, v in m.groupdict().items()}
                    scope["route"], scope["endpoint"] = route, route.endpoint
                    return route
        return None

    @staticmethod
    async def serve(route: APIRoute, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            response = await route.endpoint(Request(scope, receive))
        except HANDLED as e:
            response = response_for(e)
            scope[ERROR_CODE] = response.code
        except ClientDisconnect:
            return  # nobody to answer (the middleware counts the request as the client's: 499)
        await response(scope, receive, send)
