"""Every error is JSON with the right status, never an HTML page: {"error": {"code", "message", ...}} on the native
routes, OpenAI's {"error": {"message", "type", "param", "code"}} on the OpenAI ones, Anthropic's
{"type": "error", "error": {"type", "message"}} on /v1/messages. Which shape is the route's:
each route table is added with its ErrorStyle (add_routes), and requests that match no route of a method take the
style of the route their path belongs to."""

from __future__ import annotations

import re
from enum import Enum
from http import HTTPStatus
from typing import Any, Literal

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field

from worker.engine.outputs import SubmitError


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.code, self.message, self.headers, self.extra = status, code, message, headers, extra


def failed_status(code: str) -> int:
    """A job that failed while it ran, as an HTTP status: its constraint could not be followed (a grammar with no
    end, a pattern too large, found as tokens came) is the request's doing, and a retry would fail the same way
    (the OpenAI SDK retries a 5xx); anything else failed in llama.cpp."""
    return 400 if code == "constraint_failed" else 500


# Why the engine refused a job, as an HTTP status.
_SUBMIT_STATUS = {"overloaded": 503, "draining": 503, "duplicate_job_id": 409}


def submit_error(exc: SubmitError) -> ApiError:
    status = _SUBMIT_STATUS.get(exc.code, 503)
    return ApiError(status, exc.code, str(exc), headers={"Retry-After": "1"} if status == 503 else None)


class ErrorStyle(str, Enum):
    NATIVE = "native"
    OPENAI = "openai"
    ANTHROPIC = "anthropic"


class ErrorBody(BaseModel):
    """A native error: a snake_case code, a sentence, and fields that fit the code (field, prompt_tokens, n_ctx,
    job_id, progress)."""

    model_config = ConfigDict(extra="allow")
    code: str
    message: str
    field: str | None = Field(None, description="the request field at fault, where there is one")


class Error(BaseModel):
    model_config = ConfigDict(extra="forbid")
    error: ErrorBody


class OpenAIErrorBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    message: str
    type: Literal["invalid_request_error", "server_error"]
    param: str | None
    code: str


class OpenAIError(BaseModel):
    model_config = ConfigDict(extra="forbid")
    error: OpenAIErrorBody


class AnthropicErrorBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str = Field(description="invalid_request_error, authentication_error, not_found_error, "
                      "request_too_large, api_error, overloaded_error, ...")
    message: str


class AnthropicError(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["error"] = "error"
    error: AnthropicErrorBody


# Anthropic's error types by status (the SDK picks its exception by status; the type is for people and logs).
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 408: "timeout_error", 409: "invalid_request_error",
                    413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


def anthropic_error_type(status: int) -> str:
    return _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_body(style: ErrorStyle, status: int, code: str, message: str, **extra: Any) -> BaseModel:
    """The error object in a route's style (also an OpenAI stream's error chunk)."""
    if style is ErrorStyle.ANTHROPIC:
        # type given, not defaulted: the error's dump leaves out unset fields (exclude_unset)
        return AnthropicError(type="error", error=AnthropicErrorBody(type=anthropic_error_type(status),
                                                                     message=message))
    if style is ErrorStyle.OPENAI:
        kind: Literal["invalid_request_error", "server_error"] = (
            "invalid_request_error" if status < 500 else "server_error")
        return OpenAIError(error=OpenAIErrorBody(message=message, type=kind, param=extra.get("field"), code=code))
    return Error(error=ErrorBody(code=code, message=message, **extra))


def error_response(style: ErrorStyle, status: int, code: str, message: str, headers: dict[str, str] | None = None,
                   **extra: Any) -> web.Response:
    body = error_body(style, status, code, message, **extra).model_dump(mode="json", exclude_unset=True)
    return web.json_response(body, status=status, headers=headers)


# ---- which style a request gets: its route's -----------------------------------------------------------------

_STYLES = web.AppKey("error_styles", dict)  # resource (as registered) -> ErrorStyle


def add_routes(app: web.Application, routes: web.RouteTableDef, style: ErrorStyle) -> None:
    """Register a route table; every route in it answers errors in `style`."""
    styles = app.setdefault(_STYLES, {})
    for route in app.add_routes(routes):
        if route.resource is not None:
            styles[route.resource] = style


def style_for(app: web.Application, path: str, resource: Any = None) -> ErrorStyle:
    """The style of the matched route's resource; with none (a wrong method, a refused request line), of the
    registered resource whose path this is; else native."""
    return known_style(app, path, resource) or ErrorStyle.NATIVE


def known_style(app: web.Application, path: str, resource: Any = None) -> ErrorStyle | None:
    """style_for's answer where a registered route tells it; None where none does."""
    styles: dict[Any, ErrorStyle] = app.get(_STYLES, {})
    if resource is not None and resource in styles:
        return styles[resource]
    for known, style in styles.items():
        info = known.get_info()
        if info.get("path") == path or ("pattern" in info and info["pattern"].fullmatch(path)):
            return style
    return None


def request_style(request: web.Request) -> ErrorStyle:
    return style_for(request.app, request.path, request.match_info.route.resource)


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
    style = request_style(request)

    def respond(status: int, code: str, message: str, headers: dict[str, str] | None = None,
                **extra: Any) -> web.Response:
        return error_response(style, status, code, message, headers, **extra)

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
        reason = " ".join(str(message or "").split())
        if status < 500 and (encoding := _UNDECODABLE.search(reason)):
            # aiohttp's own words end with the Python package that would decode it: no advice for a client
            status, text = 415, (f"Content-Encoding {encoding[1]} is not supported: send the body unencoded, gzip or "
                                 "deflate")
        elif status >= 500 or not reason:
            text = ("the worker hit an unexpected error; it is logged" if status >= 500
                    else HTTPStatus(status).phrase)
        else:
            text = "malformed HTTP request: " + reason[:200]
        code = _HTTP_CODES.get(status, "http_error")
        # Where the parser refused the request before its path was known (aiohttp gives a placeholder request), the
        # route's style cannot be told: the body is one that OpenAI's, Anthropic's and the native clients all read
        app = getattr(self._manager.request_handler, "__self__", None) if self._manager else None
        style = known_style(app, request.path) if isinstance(app, web.Application) else None
        body = (error_body(style, status, code, text).model_dump(mode="json", exclude_unset=True) if style is not None
                else any_style_error(status, code, text))
        response = web.json_response(body, status=status)
        response.force_close()
        return response


_UNDECODABLE = re.compile(r"Can not decode content-encoding: ([\w-]+)")


def any_style_error(status: int, code: str, message: str) -> dict[str, Any]:
    """An error body in all three styles at once: OpenAI's `error` {message, type, param, code}, Anthropic's `type`
    and `error` {type, message}, the native `error` {code, message}."""
    return {"type": "error", "error": {"message": message, "type": anthropic_error_type(status), "param": None,
                                       "code": code}}

