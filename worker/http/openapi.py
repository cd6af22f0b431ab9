"""The OpenAPI 3.1 document of the worker's routes, served at GET /openapi.json.

Generated, never written by hand: the paths are the app's own route table, each route says what it takes and gives
on its handler (routedoc.documented), and every schema is the pydantic model that validates the request or builds the
response (`model_json_schema`). tests/integration/test_schemathesis.py checks the live worker against it.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

import worker
from worker.http.auth import OPEN_PATHS
from worker.http.errors import AnthropicError, Error, ErrorStyle, OpenAIError, add_routes, style_for
from worker.http.routedoc import RouteDoc, StreamDoc, documented, route_doc

REF = "#/components/schemas/{model}"

_ERRORS = {
    400: ("invalid_request (naming the field), invalid_constraint, context_length_exceeded, or constraint_failed (a"
          " constraint found, as the tokens came, to be impossible to follow)"),
    401: "unauthorized: missing or wrong token (bearer or x-api-key)",
    404: "not_found",
    409: "duplicate_job_id: a request with this job id is running or waiting",
    413: "body_too_large: the body is larger than --max-body-bytes",
    500: "the generation failed in llama.cpp (for example decode_failed)",
    503: "loading, draining, failed or overloaded (queue full)",
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before trying again", "schema": {"type": "string"}}}


def ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _json_data(schema: dict[str, Any]) -> dict[str, Any]:
    """An SSE `data` field that holds JSON of this schema."""
    return {"type": "string", "contentMediaType": "application/json", "contentSchema": schema}


def _stream(doc: StreamDoc, error: type[BaseModel]) -> dict[str, Any]:
    """A text/event-stream; as OpenAPI does before 3.2 (itemSchema), the schema describes one event: an object of the
    SSE fields (event, data, id, retry)."""
    if doc.dialect == "named":
        event: dict[str, Any] = {"oneOf": [
            {"type": "object", "required": ["event", "data"],
             "properties": {"event": {"const": model.model_fields["type"].default}, "data": _json_data(ref(model))}}
            for model in doc.events]}
    else:  # `data: <chunk>` events (an error object if the generation fails), then `data: [DONE]`
        event = {"type": "object", "required": ["data"], "properties": {"data": {
            "type": "string", "if": {"const": "[DONE]"},
            "else": _json_data({"anyOf": [*(ref(m) for m in doc.events), ref(error)]})}}}
    return {"text/event-stream": {"schema": {"description": doc.description, **event}}}


def _operation(path: str, doc: RouteDoc, style: ErrorStyle) -> dict[str, Any]:
    errors: dict[ErrorStyle, type[BaseModel]] = {ErrorStyle.OPENAI: OpenAIError, ErrorStyle.ANTHROPIC: AnthropicError}
    error = errors.get(style, Error)
    content: dict[str, Any] = {}
    if doc.ok is not None:
        content.update(_json(ref(doc.ok)))
    if doc.ok_content:
        content.update(doc.ok_content)
    if doc.stream is not None:
        content.update(_stream(doc.stream, error))
    responses: dict[str, Any] = {str(doc.ok_status): {"description": doc.ok_description, "content": content}}
    if doc.not_ready is not None:
        responses["503"] = {"description": "loading, draining or failed", "content": _json(ref(doc.not_ready))}
    for status in doc.errors:
        responses[str(status)] = {"description": _ERRORS[status], "content": _json(ref(error)),
                                  **({"headers": _RETRY_AFTER} if status == 503 else {})}
    op: dict[str, Any] = {"summary": doc.summary, "tags": [doc.tag], "responses": responses}
    if doc.body is not None:
        op["requestBody"] = {"required": True, "content": _json(ref(doc.body))}
    if doc.path_parameters:
        op["parameters"] = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                            for name in doc.path_parameters]
    if path in OPEN_PATHS:  # one source of truth for what is open: auth.OPEN_PATHS
        op["security"] = []
    return op


def _documented_routes(app: web.Application) -> list[tuple[str, str, RouteDoc]]:
    found = []
    for route in app.router.routes():
        doc = route_doc(route.handler)
        if route.method == "HEAD" or route.resource is None:
            continue
        assert doc is not None, f"{route.method} {route.resource.canonical} has no route_doc"
        found.append((route.method.lower(), route.resource.canonical, doc))
    return found


def build(app: web.Application) -> dict[str, Any]:
    """The whole document for this app's routes (it depends on code only, never on settings)."""
    paths: dict[str, Any] = {}
    models: dict[tuple[type[BaseModel], JsonSchemaMode], None] = {(Error, "serialization"): None,
                                                                  (OpenAIError, "serialization"): None,
                                                                  (AnthropicError, "serialization"): None}
    for method, path, doc in _documented_routes(app):
        style = style_for(app, path)
        paths.setdefault(path, {})[method] = _operation(path, doc, style)
        if doc.body is not None:
            models[(doc.body, "validation")] = None
        for model in (doc.ok, doc.not_ready, *(doc.stream.events if doc.stream else ())):
            if model is not None:
                models[(model, "serialization")] = None
    _, top = models_json_schema(list(models), ref_template=REF)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "llm-worker-rbee",
            "version": worker.__version__,
            "description": "A llama.cpp worker: one model, one device, token streams over SSE. Every route but "
                           "the probes, /metrics and this document needs the token when the worker has one "
                           "(--api-token), as a bearer token or as an x-api-key header.",
        },
        "paths": paths,
        "components": {"schemas": top["$defs"], "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"}}},
        "security": [{"bearer": []}, {"apiKey": []}],
    }


_DOCUMENT = web.AppKey("openapi_document", dict)  # filled on first use (the app is frozen by then)
routes = web.RouteTableDef()


def document(app: web.Application) -> dict[str, Any]:
    """The document, built once per app."""
    cached = app.get(_DOCUMENT)
    if cached is None:
        return build(app)
    if not cached:
        cached.update(build(app))
    return cached


@routes.get("/openapi.json")
@documented(RouteDoc("This document", "probes", ok_description="OpenAPI 3.1",
                     ok_content=_json({"type": "object"})))
async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(document(request.app))


def setup(app: web.Application) -> None:
    add_routes(app, routes, ErrorStyle.NATIVE)
    app[_DOCUMENT] = {}
