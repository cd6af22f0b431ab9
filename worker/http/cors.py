"""CORS for browser apps that call the worker directly (--cors-allow-origins; off by default).

A preflight (OPTIONS with Origin and Access-Control-Request-Method) from an allowed origin is answered 204 before
auth (browsers send no credentials with it); every other answer to an allowed origin carries
Access-Control-Allow-Origin, set in on_response_prepare so streams get it too.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ALLOWED_METHODS = "GET, POST, DELETE, OPTIONS"
# Headers a browser app may read from answers: the job id (to cancel), the correlation id, how long to back off.
EXPOSED_HEADERS = "X-Job-Id, X-Correlation-Id, Retry-After"
DEFAULT_ALLOWED_HEADERS = "Authorization, X-Api-Key, Content-Type, X-Correlation-Id"
PREFLIGHT_MAX_AGE_S = "600"


class Cors:
    def __init__(self, origins: list[str]) -> None:
        self.any = "*" in origins
        self.origins = frozenset(origins)

    def allowed(self, origin: str | None) -> str | None:
        """The Access-Control-Allow-Origin value for this origin, or None when it is not allowed."""
        if origin is None:
            return None
        if self.any:
            return "*"
        return origin if origin.rstrip("/") in self.origins else None

    @web.middleware
    async def preflight(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            allow = self.allowed(request.headers.get("Origin"))
            if allow is not None:
                asked = request.headers.get("Access-Control-Request-Headers")
                return web.Response(status=204, headers={
                    "Access-Control-Allow-Methods": ALLOWED_METHODS,
                    "Access-Control-Allow-Headers": asked or DEFAULT_ALLOWED_HEADERS,
                    "Access-Control-Max-Age": PREFLIGHT_MAX_AGE_S,
                })
        return await handler(request)

    async def on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        allow = self.allowed(request.headers.get("Origin"))
        if allow is None:
            return
        response.headers["Access-Control-Allow-Origin"] = allow
        response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
        if allow != "*":
            response.headers.add("Vary", "Origin")
