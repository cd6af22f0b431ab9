"""Every error is JSON: {"error": {"code", "message", ...}} with the right status; never an HTML page."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from loguru import logger


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.code, self.message, self.headers, self.extra = status, code, message, headers, extra


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any):
    return web.json_response({"error": {"code": code, "message": message, **extra}}, status=status, headers=headers)


_HTTP_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
}


@web.middleware
async def json_errors(request: web.Request, handler):
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.code, exc.message, exc.headers, **exc.extra)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "http_error")
        message = exc.reason if exc.status != 413 else f"request body is larger than {request.app._client_max_size} bytes"
        return error_response(exc.status, code, message)
    except Exception:
        logger.exception(f"unhandled error on {request.method} {request.path}")
        return error_response(500, "internal_error", "the worker hit an unexpected error; it is logged")
