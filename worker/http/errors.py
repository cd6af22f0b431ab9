"""Every error is JSON: {"error": {"code", "message", ...}} (OpenAI's shape on the OpenAI routes) with the right
status; never an HTML page."""

from __future__ import annotations

import asyncio
import re
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from loguru import logger

from worker.engine.outputs import SubmitError


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.code, self.message, self.headers, self.extra = status, code, message, headers, extra


# Why the engine refused a job, as an HTTP status.
_SUBMIT_STATUS = {"overloaded": 503, "draining": 503, "duplicate_job_id": 409}


def submit_error(exc: SubmitError) -> ApiError:
    status = _SUBMIT_STATUS.get(exc.code, 503)
    return ApiError(status, exc.code, str(exc), headers={"Retry-After": "1"} if status == 503 else None)


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any):
    return web.json_response({"error": {"code": code, "message": message, **extra}}, status=status, headers=headers)


# The OpenAI-compatible routes answer in OpenAI's error shape, so OpenAI clients raise their typed errors.
OPENAI_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/tokenize", "/v1/detokenize"})


def is_openai_path(path: str) -> bool:
    return path in OPENAI_PATHS or path.startswith("/v1/models/")


def openai_error(status: int, code: str, message: str, field: str | None = None, **_extra: Any) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"message": message, "type": kind, "param": field, "code": code}


def openai_error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any):
    return web.json_response({"error": openai_error(status, code, message, **extra)}, status=status, headers=headers)


_HTTP_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
    417: "expectation_failed",
    500: "internal_error",
}


@web.middleware
async def json_errors(request: web.Request, handler):
    respond = openai_error_response if is_openai_path(request.path) else error_response
    try:
        return await handler(request)
    except ApiError as exc:
        request["error_code"] = exc.code  # counted in errors_total by the metrics middleware
        return respond(exc.status, exc.code, exc.message, exc.headers, **exc.extra)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = request["error_code"] = _HTTP_CODES.get(exc.status, "http_error")
        message = (exc.reason if exc.status != 413
                   else f"request body is larger than {request.app._client_max_size} bytes")
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None  # 405 says what is allowed
        return respond(exc.status, code, message, allow)
    except (RequestPayloadError, HttpProcessingError) as exc:
        # The body could not be read as sent: a Content-Encoding it does not match (not gzip, not deflate), a broken
        # chunk. The client's fault: 400, never 500.
        request["error_code"] = "invalid_request"
        reason = " ".join(str(getattr(exc, "message", None) or exc).split())
        reason = re.sub(r"^\d{3}, message: ", "", reason)[:200]  # RequestPayloadError's str() leads with a status
        return respond(400, "invalid_request", f"the request body could not be read: {reason}")
    except ConnectionResetError:
        # The client went away while its answer was being written: nobody is left to answer, and it is no error of
        # the worker's. Routes that stream catch this themselves; this is the net under the others. aiohttp finds
        # the connection closed when it tries to send this, and drops it (counted as 499, like a cancelled handler).
        logger.debug(f"client went away during {request.method} {request.path}")
        return web.Response(status=499, reason="Client Closed Request")
    except Exception:
        logger.exception(f"unhandled error on {request.method} {request.path}")
        request["error_code"] = "internal_error"
        return respond(500, "internal_error", "the worker hit an unexpected error; it is logged")


class JsonErrorProtocol(RequestHandler):
    """aiohttp answers a request its HTTP parser refused (a malformed header, a line past the limits) in plain text,
    before any route or middleware sees it; this answers in the contract's JSON shape instead, with the same status,
    and the connection is still closed."""

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs it; raises if an answer has already begun
        code = _HTTP_CODES.get(status, "http_error")
        if status >= 500 or not message:
            text = ("the worker hit an unexpected error; it is logged" if status >= 500
                    else HTTPStatus(status).phrase)
        else:
            text = "malformed HTTP request: " + " ".join(str(message).split())[:200]
        respond = openai_error_response if is_openai_path(request.path) else error_response
        response = respond(status, code, text)
        response.force_close()
        return response


class JsonErrorServer(web.Server):
    """The protocol factory aiohttp's site listens with, making JsonErrorProtocol connections."""

    def __call__(self) -> RequestHandler:
        return JsonErrorProtocol(self, loop=self._loop, **self._kwargs)


class JsonErrorRunner(web.AppRunner):
    """web.AppRunner whose connections answer the HTTP parser's own refusals in JSON (JsonErrorProtocol)."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return JsonErrorServer(server.request_handler, request_factory=server.request_factory,
                               handler_cancellation=server.handler_cancellation, loop=asyncio.get_running_loop(),
                               **server._kwargs)
