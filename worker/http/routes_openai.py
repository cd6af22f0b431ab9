"""The OpenAI-compatible API: /v1/completions, /v1/chat/completions, /v1/models, /v1/tokenize, /v1/detokenize.

Generation goes through jobs.submit_job like the native route. The wire format is protocol_openai's models; errors
take OpenAI's shape ({"error": {"message", "type", "param", "code"}}: the routes are added with ErrorStyle.OPENAI), so
the openai SDK raises its typed exceptions.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web
from pydantic import MISSING, BaseModel, ValidationError

from worker.engine.outputs import Failed, Finished, TokenText
from worker.http import chat
from worker.http.errors import ApiError, ErrorStyle, add_routes, error_body
from worker.http.jobs import JobStream, submit_job
from worker.http.protocol_native import ModelCard
from worker.http.protocol_openai import (
    FINISH_REASONS,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatRequest,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionRequest,
    Delta,
    DetokenizeRequest,
    ModelList,
    ModelObject,
    Strict,
    Text,
    TokenizeRequest,
    Tokens,
    Usage,
)
from worker.http.routedoc import RouteDoc, StreamDoc, documented
from worker.http.schemas import read_json
from worker.http.sse import EventStream
from worker.http.state import STATE
from worker.llamacpp import ModelInfo

routes = web.RouteTableDef()

M = TypeVar("M", bound=Strict)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat runs to the end of the context
BODY_ERRORS = (400, 401, 413, 503)


def _parse(model: type[M], body: Any) -> M:
    """Validate a body; a problem is a 400 whose param is the dotted path of the field."""
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", "body must be a JSON object")
    try:
        req = model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        path = ".".join(str(p) for p in err.get("loc", ()))
        if err.get("type") == "extra_forbidden":
            raise ApiError(400, "invalid_request", f"unrecognized request argument supplied: {path}",
                           field=path) from None
        if err.get("type") == "missing":
            raise ApiError(400, "invalid_request", f"missing required parameter: {path}", field=path) from None
        raise ApiError(400, "invalid_request", f"{path}: {err['msg'].removeprefix('Value error, ')}",
                       field=path or None) from None
    req.check_supported()
    return req


def _check_token_ids(tokens: list[int], n_vocab: int, param: str) -> None:
    bad = next((t for t in tokens if not 0 <= t < n_vocab), None)
    if bad is not None:
        raise ApiError(400, "invalid_request", f"{param}: token id {bad} is outside the vocabulary [0, {n_vocab})",
                       field=param)


@dataclass
class Reply:
    """The response objects of one request; chat and text completions differ only in names and where text goes."""

    chat: bool
    model: str
    include_usage: bool = False
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"

    def whole(self, text: str, end: Finished) -> ChatCompletion | Completion:
        finish = FINISH_REASONS[end.stop_reason]
        if self.chat:
            return ChatCompletion(id=self.id, created=self.created, model=self.model, usage=Usage.of(end), choices=[
                ChatChoice(index=0, message=AssistantMessage(content=text), finish_reason=finish)])
        return Completion(id=self.id, created=self.created, model=self.model, usage=Usage.of(end), choices=[
            CompletionChoice(index=0, text=text, finish_reason=finish)])

    def chunk(self, text: str | None = None, *, finish: Any = None, role: bool = False,
              usage: Finished | None = None) -> ChatCompletionChunk | CompletionChunk:
        """A chunk with text or a finish reason (the role on a chat stream's first); with `usage`, the last chunk
        (no choices). With include_usage every other chunk has `"usage": null`, as OpenAI's."""
        extra: dict[str, Any] = {}
        if self.include_usage:
            extra["usage"] = Usage.of(usage) if usage is not None else None
        if self.chat:
            delta = Delta(role="assistant" if role else MISSING, content=text if text is not None else MISSING)
            chat_choices = [] if usage else [ChatChunkChoice(index=0, delta=delta, finish_reason=finish)]
            return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=chat_choices,
                                       **extra)
        text_choices = [] if usage else [CompletionChunkChoice(index=0, text=text or "", finish_reason=finish)]
        return CompletionChunk(id=self.id, created=self.created, model=self.model, choices=text_choices, **extra)


async def _respond(request: web.Request, job: JobStream, reply: Reply, stream: bool) -> web.StreamResponse:
    if not stream:
        text, end = await job.collect()
        return _json(reply.whole(text, end))

    events = EventStream(request, job.stream_headers(request))
    async with job:
        await events.open()
        if reply.chat:  # the role at once: a client sees the answer begin before the prompt is decoded
            events.add(reply.chunk("", role=True))
            await events.flush()
        finished = None
        async for batch in job.batches():
            for out in batch:
                if isinstance(out, TokenText):
                    events.add(reply.chunk(out.text))
                elif isinstance(out, Finished):
                    finished = out
                    events.add(reply.chunk(finish=FINISH_REASONS[out.stop_reason]))
                elif isinstance(out, Failed):
                    events.add(error_body(ErrorStyle.OPENAI, 500, out.code, out.message))
            await events.flush()
        if finished is not None and reply.include_usage:
            events.add(reply.chunk(usage=finished))
        await events.close(done=True)
    return events.response


def _json(body: BaseModel, status: int = 200) -> web.Response:
    return web.Response(body=body.model_dump_json(), status=status, content_type="application/json")


_CHAT_STREAM = StreamDoc("OpenAI chat completion chunks, then [DONE]", "openai", (ChatCompletionChunk,))
_COMPLETION_STREAM = StreamDoc("OpenAI text completion chunks, then [DONE]", "openai", (CompletionChunk,))


@routes.post("/v1/chat/completions")
@documented(RouteDoc("OpenAI chat completion, with the model's own chat template", "openai", body=ChatRequest,
                     ok=ChatCompletion, stream=_CHAT_STREAM, errors=(*BODY_ERRORS, 409, 500),
                     ok_description="the whole answer (stream false) or its event stream (stream true)"))
async def chat_completions(request: web.Request) -> web.StreamResponse:
    runtime = request.app[STATE].require_ready()
    req = _parse(ChatRequest, await read_json(request))
    model = runtime.model
    info = model.info
    if not info.chat_template:
        raise ApiError(400, "no_chat_template",
                       f"the model {info.ref} has no chat template (tokenizer.chat_template in its GGUF); "
                       "use /v1/completions with a prompt in the model's own format", field="messages")
    try:
        prompt = chat.render(info.chat_template, [m.for_template() for m in req.messages], bos_token=info.bos,
                             eos_token=info.eos)
    except chat.TemplateCompileError as exc:
        raise ApiError(500, "chat_template_error", str(exc)) from None
    except chat.TemplateRenderError as exc:
        raise ApiError(400, "invalid_request", f"the model's chat template refused these messages: {exc}",
                       field="messages") from None
    tokens = await asyncio.to_thread(model.prompt_tokens, prompt)
    max_tokens = req.max_completion_tokens or req.max_tokens or max(runtime.engine.ctx_size - len(tokens), 1)
    reply = Reply(chat=True, model=info.ref, include_usage=req.include_usage)
    job = await submit_job(request, tokens, req.sampling(), max_tokens=max_tokens, stop=req.stop,
                           ignore_eos=bool(req.ignore_eos), job_id=reply.id)
    return await _respond(request, job, reply, bool(req.stream))


@routes.post("/v1/completions")
@documented(RouteDoc("OpenAI text completion", "openai", body=CompletionRequest, ok=Completion,
                     stream=_COMPLETION_STREAM, errors=(*BODY_ERRORS, 409, 500),
                     ok_description="the whole answer (stream false) or its event stream (stream true)"))
async def completions(request: web.Request) -> web.StreamResponse:
    model = request.app[STATE].require_ready().model
    req = _parse(CompletionRequest, await read_json(request))
    if isinstance(req.prompt, str):
        tokens = await asyncio.to_thread(model.prompt_tokens, req.prompt)
    else:
        _check_token_ids(req.prompt, model.n_vocab, "prompt")
        tokens = req.prompt
    reply = Reply(chat=False, model=model.info.ref, include_usage=req.include_usage)
    max_tokens = req.max_tokens if req.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS
    job = await submit_job(request, tokens, req.sampling(), max_tokens=max_tokens, stop=req.stop,
                           ignore_eos=bool(req.ignore_eos), job_id=reply.id)
    return await _respond(request, job, reply, bool(req.stream))


def _model_object(info: ModelInfo) -> ModelObject:
    try:
        created = int(os.path.getmtime(info.path))
    except OSError:
        created = 0
    return ModelObject(id=info.ref, created=created, owned_by="llm-worker-rbee", meta=ModelCard(**info.public()))


@routes.get("/v1/models")
@documented(RouteDoc("The served model, as OpenAI's model list", "openai", ok=ModelList, ok_description="one model",
                     errors=(401, 503)))
async def list_models(request: web.Request) -> web.Response:
    model = request.app[STATE].require_ready().model
    return _json(ModelList(data=[_model_object(model.info)]))


@routes.get("/v1/models/{model_id:.+}")
@documented(RouteDoc("The served model by its id", "openai", ok=ModelObject, ok_description="the model",
                     errors=(401, 404, 503), path_parameters=("model_id",)))
async def get_model(request: web.Request) -> web.Response:
    info = request.app[STATE].require_ready().model.info
    model_id = request.match_info["model_id"]
    if model_id != info.ref:
        raise ApiError(404, "model_not_found",
                       f"the model {model_id!r} does not exist; this worker serves {info.ref!r}", field="model")
    return _json(_model_object(info))


@routes.post("/v1/tokenize")
@documented(RouteDoc("Text to token ids", "openai", body=TokenizeRequest, ok=Tokens, ok_description="the tokens",
                     errors=BODY_ERRORS))
async def tokenize(request: web.Request) -> web.Response:
    model = request.app[STATE].require_ready().model
    req = _parse(TokenizeRequest, await read_json(request))

    def run() -> list[int]:
        if req.add_special and req.parse_special:
            return model.prompt_tokens(req.text)  # exactly what a completion prompt of this text gets
        return model.tokenize(req.text, add_special=req.add_special, parse_special=req.parse_special)

    return _json(Tokens(tokens=await asyncio.to_thread(run)))


@routes.post("/v1/detokenize")
@documented(RouteDoc("Token ids to text", "openai", body=DetokenizeRequest, ok=Text, ok_description="the text",
                     errors=BODY_ERRORS))
async def detokenize(request: web.Request) -> web.Response:
    model = request.app[STATE].require_ready().model
    req = _parse(DetokenizeRequest, await read_json(request))
    _check_token_ids(req.tokens, model.n_vocab, "tokens")
    return _json(Text(text=await asyncio.to_thread(model.detokenize, req.tokens)))


def setup(app: web.Application) -> None:
    add_routes(app, routes, ErrorStyle.OPENAI)
