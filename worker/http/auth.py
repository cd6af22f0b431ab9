"""Token auth: every route but the probes, /metrics and /openapi.json, compared in constant time. The token comes as
`Authorization: Bearer <token>` (OpenAI's clients) or as `x-api-key: <token>` (Anthropic's), on any route; a request
that sends both must have it right in both. More than one of either header is refused on every route."""

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


def check_auth(request: web.Request, token: str | None) -> None:
    """Raise ApiError unless the request may reach its route: one Authorization and one x-api-key header at most (two
    could be read differently by a proxy in front, which might check the last where this checks the first), and the
    token where one is set and the route is not open: as a bearer token, or as x-api-key, or right in both."""
    given_headers = request.headers.getall("Authorization", [])
    api_keys = request.headers.getall("x-api-key", [])
    for name, found in (("Authorization", given_headers), ("x-api-key", api_keys)):
        if len(found) > 1:
            raise ApiError(400, "invalid_request", f"the request has {len(found)} {name} headers; send exactly one")
    if token is None or _route_path(request) in OPEN_PATHS:
        return
    expected = token.encode("utf-8")
    if given_headers or not api_keys:
        # RFC 6750: "Bearer" (the scheme is case-insensitive), then the token. Header bytes that are not UTF-8 arrive
        # as surrogates: they are kept as the bytes they were, and simply do not match.
        scheme, _, given = (given_headers[0] if given_headers else "").partition(" ")
        if not (_same(given.strip(" "), expected) and scheme.lower() == "bearer"):
            raise ApiError(401, "unauthorized", "missing or wrong bearer token",
                           headers={"WWW-Authenticate": "Bearer"})
    if api_keys and not _same(api_keys[0].strip(" "), expected):
        raise ApiError(401, "unauthorized", "wrong x-api-key", headers={"WWW-Authenticate": "Bearer"})


def _same(given: str, expected: bytes) -> bool:
    # compare_digest's time depends on the length only, never on where the first difference is.
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected)


def bearer_auth(token: str | None):
    """The middleware: check_auth on every request (with no token, only the one-Authorization-header rule)."""

    @web.middleware
    async def middleware(request: web.Request, handler):
        check_auth(request, token)
        return await handler(request)

    return middleware
