"""Bearer-token auth: every route but the probes, /metrics and /openapi.json, compared in constant time."""

from __future__ import annotations

import hmac

from aiohttp import web

from worker.http.errors import ApiError

# Open to anyone who can reach the port: liveness and readiness probes, loading progress, Prometheus, and the
# OpenAPI document (it describes the routes, nothing about the model or its requests).
OPEN_PATHS = frozenset({"/health", "/v1/ready", "/v1/loading/progress", "/metrics", "/openapi.json"})


def _route_path(request: web.Request) -> str | None:
    """The path of the route that will answer (what the router matched), not the raw request path."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else None


def bearer_auth(token: str):
    expected = token.encode("utf-8")

    @web.middleware
    async def middleware(request: web.Request, handler):
        if _route_path(request) not in OPEN_PATHS:
            # RFC 6750: "Bearer" (the scheme is case-insensitive), then the token. Header bytes that are not UTF-8
            # arrive as surrogates: they are kept as the bytes they were, and simply do not match.
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            given_bytes = given.strip(" ").encode("utf-8", "surrogateescape")
            # compare_digest's time depends on the length only, never on where the first difference is.
            token_ok = hmac.compare_digest(given_bytes, expected)
            if not (token_ok and scheme.lower() == "bearer"):
                raise ApiError(401, "unauthorized", "missing or wrong bearer token",
                               headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return middleware
