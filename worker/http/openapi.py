"""The OpenAPI 3.1 document of the worker's routes, served at GET /openapi.json.

Request bodies come from the pydantic models that validate them (`model_json_schema`), so the document cannot
drift from what the routes accept. Response bodies are built as plain dicts in the routes; their schemas are
written out here and checked against the live worker by tests/integration/test_schemathesis.py.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from aiohttp import web
from pydantic.json_schema import models_json_schema

import worker
from worker.engine.outputs import StopReason
from worker.http.auth import OPEN_PATHS
from worker.http.routes_openai import (
    NEUTRAL,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    Message,
    TokenizeRequest,
)
from worker.http.schemas import InferenceRequest

REF = "#/components/schemas/{model}"


def ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(model=name)}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


_INT = {"type": "integer"}
_NUM = {"type": "number"}
_STR = {"type": "string"}
STOP_REASONS = [reason.value for reason in StopReason]
FINISH_REASONS = ["stop", "length"]


def _obj(required: dict[str, Any], optional: dict[str, Any] | None = None, *, closed: bool = True) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {**required, **(optional or {})},
        "required": list(required),
        "additionalProperties": not closed,
    }


def _response_schemas() -> dict[str, Any]:
    usage = _obj({"prompt_tokens": _INT, "completion_tokens": _INT, "total_tokens": _INT,
                  "prompt_tokens_details": _obj({"cached_tokens": _INT})})
    return {
        "ModelInfo": _obj({
            "ref": _STR, "architecture": _STR, "quantization": _STR, "n_params": _INT, "n_ctx_train": _INT,
            "n_vocab": _INT, "size_bytes": _INT, "format": {"enum": ["gguf", "safetensors"]},
        }),
        "Health": _obj({
            "status": {"enum": ["loading", "ready", "draining", "failed"]},
            "worker_id": _STR,
            "model": _nullable(ref("ModelInfo")),
            "backend": _STR,
            "device": _STR,
            "slots": _obj({"total": _INT, "busy": _INT}),
            "queue": _obj({"waiting": _INT, "max": _INT}),
        }),
        "Ready": _obj(
            {"ready": {"type": "boolean"}, "state": {"enum": ["loading", "ready", "draining", "failed"]}},
            {"model": ref("ModelInfo"), "progress": _NUM, "progress_url": _STR, "error": _STR},
        ),
        "Error": {
            "description": "Every native error: a snake_case code, a sentence, and fields that fit the code "
                           "(field, prompt_tokens, n_ctx, job_id, progress).",
            **_obj({"error": _obj({"code": _STR, "message": _STR}, {"field": _nullable(_STR)}, closed=False)}),
        },
        "OpenAIError": _obj({"error": _obj({
            "message": _STR, "type": {"enum": ["invalid_request_error", "server_error"]},
            "param": _nullable(_STR), "code": _STR,
        })}),
        "InferenceResult": _obj(
            {"job_id": _STR, "text": _STR, "tokens_out": _INT, "prompt_tokens": _INT,
             "stop_reason": {"enum": STOP_REASONS}, "ttft_ms": _nullable(_NUM), "decode_time_ms": _NUM,
             "tokens_per_sec": _NUM, "cached_tokens": _INT},
            {"stop_sequence_matched": _STR},
        ),
        "Cancelling": _obj({"job_id": _STR, "status": {"const": "cancelling"}}),
        "Usage": usage,
        "Completion": _obj({
            "id": _STR, "object": {"const": "text_completion"}, "created": _INT, "model": _STR,
            "choices": {"type": "array", "minItems": 1, "maxItems": 1, "items": _obj({
                "index": _INT, "text": _STR, "logprobs": {"type": "null"}, "finish_reason": {"enum": FINISH_REASONS},
            })},
            "usage": ref("Usage"),
        }),
        "ChatCompletion": _obj({
            "id": _STR, "object": {"const": "chat.completion"}, "created": _INT, "model": _STR,
            "choices": {"type": "array", "minItems": 1, "maxItems": 1, "items": _obj({
                "index": _INT,
                "message": _obj({"role": {"const": "assistant"}, "content": _STR}),
                "logprobs": {"type": "null"},
                "finish_reason": {"enum": FINISH_REASONS},
            })},
            "usage": ref("Usage"),
        }),
        "ModelObject": _obj({"id": _STR, "object": {"const": "model"}, "created": _INT, "owned_by": _STR,
                             "meta": ref("ModelInfo")}),
        "ModelList": _obj({"object": {"const": "list"}, "data": {"type": "array", "items": ref("ModelObject")}}),
        "Tokens": _obj({"tokens": {"type": "array", "items": _INT}}),
        "Text": _obj({"text": _STR}),
        # The events of a native stream (text/event-stream: `event: <type>` and `data: <json>`), for reference.
        "StartedEvent": _obj({"type": {"const": "started"}, "job_id": _STR, "model": _STR, "prompt_tokens": _INT,
                              "started_at": _STR}),
        "TokenEvent": _obj({"type": {"const": "token"}, "t": _STR, "i": _INT}),
        "NarrationEvent": _obj({"type": {"const": "narration"}, "actor": _STR, "action": _STR, "human": _STR},
                               closed=False),
        "EndEvent": _obj(
            {"type": {"const": "end"}, "job_id": _STR, "tokens_out": _INT, "prompt_tokens": _INT,
             "ttft_ms": _nullable(_NUM), "decode_time_ms": _NUM, "tokens_per_sec": _NUM,
             "stop_reason": {"enum": STOP_REASONS}, "cached_tokens": _INT},
            {"stop_sequence_matched": _STR},
        ),
        "ErrorEvent": _obj({"type": {"const": "error"}, "code": _STR, "message": _STR}),
        # /v1/loading/progress
        "ProgressEvent": _obj({"type": {"const": "progress"}, "stage": _STR, "progress": _NUM},
                              {"layers_loaded": _INT, "layers_total": _INT}),
        "ReadyEvent": _obj({"type": {"const": "ready"}, "model": _nullable(ref("ModelInfo"))}),
        # The chunks of an OpenAI stream (`data: <json>` ... `data: [DONE]`).
        "CompletionChunk": _obj(
            {"id": _STR, "object": {"const": "text_completion"}, "created": _INT, "model": _STR,
             "choices": {"type": "array", "maxItems": 1, "items": _obj({
                 "index": _INT, "text": _STR, "logprobs": {"type": "null"},
                 "finish_reason": _nullable({"enum": FINISH_REASONS})})}},
            {"usage": _nullable(ref("Usage"))},
        ),
        "ChatCompletionChunk": _obj(
            {"id": _STR, "object": {"const": "chat.completion.chunk"}, "created": _INT, "model": _STR,
             "choices": {"type": "array", "maxItems": 1, "items": _obj({
                 "index": _INT,
                 "delta": _obj({}, {"role": {"const": "assistant"}, "content": _STR}),
                 "logprobs": {"type": "null"},
                 "finish_reason": _nullable({"enum": FINISH_REASONS})})}},
            {"usage": _nullable(ref("Usage"))},
        ),
    }


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _error(description: str, openai: bool, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": _json(ref("OpenAIError" if openai else "Error"))}
    if headers:
        out["headers"] = headers
    return out


_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before trying again", "schema": _STR}}


def _json_data(schema: dict[str, Any]) -> dict[str, Any]:
    """An SSE `data` field that holds JSON of this schema."""
    return {"type": "string", "contentMediaType": "application/json", "contentSchema": schema}


def _sse(description: str, event: dict[str, Any]) -> dict[str, Any]:
    """A text/event-stream; as OpenAPI does before 3.2 (itemSchema), the schema describes one event: an object of
    the SSE fields (event, data, id, retry)."""
    return {"text/event-stream": {"schema": {"description": description, **event}}}


def _named_events(**events: str) -> dict[str, Any]:
    """Events whose `event:` line names the type, and whose data is that type's JSON object."""
    return {"oneOf": [
        {"type": "object", "required": ["event", "data"],
         "properties": {"event": {"const": name}, "data": _json_data(ref(schema))}}
        for name, schema in events.items()
    ]}


def _openai_events(chunk: str) -> dict[str, Any]:
    """`data: <chunk>` events (an error chunk if the generation fails), then `data: [DONE]`."""
    return {"type": "object", "required": ["data"], "properties": {"data": {
        "type": "string",
        "if": {"const": "[DONE]"},
        "else": _json_data({"anyOf": [ref(chunk), ref("OpenAIError")]}),
    }}}


NATIVE_STREAM = _sse("`started`, `token`s (and `narration`s when asked), then `end` or `error`; each event's data "
                     "is a JSON object whose `type` is the event's name",
                     _named_events(started="StartedEvent", token="TokenEvent", narration="NarrationEvent",
                                   end="EndEvent", error="ErrorEvent"))
PROGRESS_STREAM = _sse("`progress` events, then `ready` or `error`; then the stream ends",
                       _named_events(progress="ProgressEvent", ready="ReadyEvent", error="ErrorEvent"))


def _errors(openai: bool, *codes: int) -> dict[str, Any]:
    text = {
        400: "invalid_request (naming the field) or context_length_exceeded",
        401: "unauthorized: missing or wrong bearer token",
        404: "not_found",
        409: "duplicate_job_id: a request with this job id is running or waiting",
        413: "body_too_large: the body is larger than --max-body-bytes",
        500: "the generation failed in llama.cpp (for example decode_failed)",
        503: "loading, draining, failed or overloaded (queue full)",
    }
    out = {}
    for code in codes:
        out[str(code)] = _error(text[code], openai, _RETRY_AFTER if code == 503 else None)
    return out


_BODY_ERRORS = (400, 401, 413, 503)


def _operation(summary: str, *, tag: str, responses: dict[str, Any], body: str | None = None,
               parameters: list[dict[str, Any]] | None = None, open_route: bool = False) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "tags": [tag], "responses": responses}
    if body is not None:
        op["requestBody"] = {"required": True, "content": _json(ref(body))}
    if parameters:
        op["parameters"] = parameters
    if open_route:
        op["security"] = []
    return op


def _paths() -> dict[str, Any]:
    def ok(description: str, content: dict[str, Any]) -> dict[str, Any]:
        return {"description": description, "content": content}

    def gen_ok(schema: str, stream: dict[str, Any]) -> dict[str, Any]:
        return ok("the whole answer (stream false) or its event stream (stream true)", {**_json(ref(schema)),
                                                                                          **stream})

    paths: dict[str, Any] = {
        "/health": {"get": _operation(
            "Liveness: the worker's state, model, slots and queue", tag="probes", open_route=True,
            responses={"200": ok("while the process serves", _json(ref("Health")))})},
        "/v1/ready": {"get": _operation(
            "Readiness: 200 once the model is loaded", tag="probes", open_route=True,
            responses={"200": ok("ready", _json(ref("Ready"))),
                       "503": ok("loading, draining or failed", _json(ref("Ready")))})},
        "/v1/loading/progress": {"get": _operation(
            "Loading progress as server-sent events: progress, then ready or error", tag="probes", open_route=True,
            responses={"200": ok("progress events, then ready or error; then the stream ends", PROGRESS_STREAM)})},
        "/metrics": {"get": _operation(
            "Prometheus metrics", tag="probes", open_route=True,
            responses={"200": ok("Prometheus text format", {"text/plain": {"schema": _STR}})})},
        "/openapi.json": {"get": _operation(
            "This document", tag="probes", open_route=True,
            responses={"200": ok("OpenAPI 3.1", _json({"type": "object"}))})},
        "/v1/inference": {"post": _operation(
            "Generate: a token stream (SSE) or, with stream false, one JSON object", tag="native",
            body="InferenceRequest",
            responses={"200": gen_ok("InferenceResult", NATIVE_STREAM), **_errors(False, *_BODY_ERRORS, 409, 500)})},
        "/v1/inference/{job_id}": {"delete": _operation(
            "Cancel a running or waiting request; its stream ends with stop_reason cancelled", tag="native",
            parameters=[{"name": "job_id", "in": "path", "required": True, "schema": _STR}],
            responses={"202": ok("cancelling", _json(ref("Cancelling"))), **_errors(False, 401, 404, 503)})},
        "/v1/completions": {"post": _operation(
            "OpenAI text completion", tag="openai", body="CompletionRequest",
            responses={"200": gen_ok("Completion", _sse("OpenAI text completion chunks, then [DONE]",
                                                        _openai_events("CompletionChunk"))),
                       **_errors(True, *_BODY_ERRORS, 409, 500)})},
        "/v1/chat/completions": {"post": _operation(
            "OpenAI chat completion, with the model's own chat template", tag="openai", body="ChatRequest",
            responses={"200": gen_ok("ChatCompletion", _sse("OpenAI chat completion chunks, then [DONE]",
                                                            _openai_events("ChatCompletionChunk"))),
                       **_errors(True, *_BODY_ERRORS, 409, 500)})},
        "/v1/models": {"get": _operation(
            "The served model, as OpenAI's model list", tag="openai",
            responses={"200": ok("one model", _json(ref("ModelList"))), **_errors(True, 401, 503)})},
        "/v1/models/{model_id}": {"get": _operation(
            "The served model by its id", tag="openai",
            parameters=[{"name": "model_id", "in": "path", "required": True, "schema": _STR}],
            responses={"200": ok("the model", _json(ref("ModelObject"))), **_errors(True, 401, 404, 503)})},
        "/v1/tokenize": {"post": _operation(
            "Text to token ids", tag="openai", body="TokenizeRequest",
            responses={"200": ok("the tokens", _json(ref("Tokens"))), **_errors(True, *_BODY_ERRORS)})},
        "/v1/detokenize": {"post": _operation(
            "Token ids to text", tag="openai", body="DetokenizeRequest",
            responses={"200": ok("the text", _json(ref("Text"))), **_errors(True, *_BODY_ERRORS)})},
    }
    for path, item in paths.items():  # one source of truth for what is open: auth.OPEN_PATHS
        for op in item.values():
            assert ("security" in op) == (path in OPEN_PATHS), path
    return paths


# Fields that pydantic sees as `Any` because a validator of their own checks them: what that validator accepts.
_STOP_STRING = {"type": "string", "minLength": 1, "maxLength": 100}
_TOKEN_IDS = {"type": "array", "minItems": 1, "items": _INT}
_ANY_FIELDS: dict[str, dict[str, Any]] = {
    "stop": {"description": "one stop string or up to 4; each 1 to 100 bytes of UTF-8",
             "anyOf": [{"type": "null"}, _STOP_STRING, {"type": "array", "maxItems": 4, "items": _STOP_STRING}]},
    "prompt": {"description": "text, or token ids; a batch of exactly one of either is taken too",
               "anyOf": [_STR, _TOKEN_IDS, {"type": "array", "minItems": 1, "maxItems": 1,
                                             "items": {"anyOf": [_STR, _TOKEN_IDS]}}]},
    "content": {"description": "text, or a list of text parts (joined with newlines)",
                "anyOf": [_STR, {"type": "array", "items": {
                    "type": "object", "required": ["type", "text"],
                    "properties": {"type": {"const": "text"}, "text": _STR}}}]},
}


def _request_schemas() -> dict[str, Any]:
    models = (InferenceRequest, CompletionRequest, ChatRequest, TokenizeRequest, DetokenizeRequest)
    _, top = models_json_schema([(m, "validation") for m in models], ref_template=REF)
    defs = top["$defs"]
    for model in (CompletionRequest, ChatRequest, Message):
        props = defs[model.__name__]["properties"]
        for name, schema in _ANY_FIELDS.items():
            if name in props:
                props[name] = {"title": props[name].get("title", name), **schema}
        for name in model.unsupported:  # accepted only at a value that asks for nothing
            props[name] = {"title": props[name].get("title", name), "enum": list(NEUTRAL[name]),
                           "description": "not supported by this worker: leave it out, or send a neutral value"}
    return defs


@cache
def document() -> dict[str, Any]:
    """The whole OpenAPI document (built once; it depends on code only, never on settings)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "llm-worker-rbee",
            "version": worker.__version__,
            "description": "A llama.cpp worker: one model, one device, token streams over SSE. Every route but "
                           "the probes, /metrics and this document needs the bearer token when the worker has "
                           "one (--api-token).",
        },
        "paths": _paths(),
        "components": {
            "schemas": {**_request_schemas(), **_response_schemas()},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(document())


def setup(app: web.Application) -> None:
    app.router.add_get("/openapi.json", openapi_json)
