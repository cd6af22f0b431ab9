"""Bearer-token auth: every route but the probes and /metrics, compared in constant time."""

from __future__ import annotations

import hmac

from aiohttp import web

from worker.http.errors import ApiError

OPEN_PATHS = frozenset({"/health", "/v1/ready", "/v1/loading/progress", "/metrics"})


def bearer_auth(token: str):
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def middleware(request: web.Request, handler):
        if request.path not in OPEN_PATHS:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                raise ApiError(401, "unauthorized", "missing or wrong bearer token",
                               headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return middleware
