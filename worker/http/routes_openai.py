"""The OpenAI-compatible API: /v1/completions, /v1/chat/completions, /v1/models, /v1/tokenize, /v1/detokenize.

Generation goes through jobs.submit_job like the native route. Errors take OpenAI's shape
({"error": {"message", "type", "param", "code"}}) in errors.json_errors, so the openai SDK raises its typed exceptions.
Unknown request fields are refused as OpenAI refuses them; OpenAI fields this worker does not implement are accepted
only at their neutral value (null, false, 1, "none", ...), so a client that sends them explicitly unset still works.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from worker.engine.outputs import Failed, Finished, StopReason, TokenText
from worker.engine.sampling import (
    MinP,
    OpenAISeed,
    OpenAITopP,
    Penalty,
    RepetitionPenalty,
    SamplingParams,
    Temperature,
    TopK,
)
from worker.http import chat, tokenizing
from worker.http.errors import ApiError, openai_error
from worker.http.jobs import JobStream, submit_job
from worker.http.schemas import read_json
from worker.http.state import STATE
from worker.llamacpp import ModelInfo

routes = web.RouteTableDef()

M = TypeVar("M", bound="_Strict")

# The engine's stop reasons in OpenAI's terms: anything that cut the text short before the model ended it is "length".
FINISH_REASONS = {StopReason.EOS: "stop", StopReason.STOP_SEQUENCE: "stop", StopReason.MAX_TOKENS: "length",
                  StopReason.TIMEOUT: "length", StopReason.CANCELLED: "length"}
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat runs to the end of the context
SAMPLING_FIELDS = {"temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                   "frequency_penalty", "seed"}

# OpenAI parameters this worker does not implement, with the values that ask for nothing.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "web_search_options": (None,),
    "reasoning_effort": (None,),
    "verbosity": (None,),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    "tool_calls": (None, []),
}


def _is_neutral(value: Any, neutral: tuple[Any, ...]) -> bool:
    return any(type(value) is type(n) and value == n for n in neutral)  # type-exact: 0 is not False


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    unsupported: ClassVar[tuple[str, ...]] = ()

    def check_supported(self) -> None:
        for name in self.unsupported:
            if not _is_neutral(getattr(self, name), NEUTRAL[name]):
                raise ApiError(400, "unsupported_parameter",
                               f"'{name}' is not supported by this worker; leave it out or null", field=name)


class StreamOptions(_Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # padding against length side channels: accepted, nothing to pad


class _Generate(_Strict):
    """What both completion routes accept."""

    unsupported: ClassVar[tuple[str, ...]] = ("logit_bias",)

    model: str | None = None  # one worker serves one model: any name is served by it (as llama-server does)
    max_tokens: int | None = Field(None, ge=1)
    temperature: Temperature | None = None
    top_p: OpenAITopP | None = None
    top_k: TopK | None = None  # native extras, as llama.cpp's server takes them
    min_p: MinP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    ignore_eos: bool | None = None  # vLLM's extra, for benchmarks: generate exactly max_tokens
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    stop: Any = Field(None, validate_default=True)
    seed: OpenAISeed | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logit_bias: Any = None
    # Accepted and ignored: they change nothing about the text.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: Any) -> list[str]:
        stops = [] if v is None else [v] if isinstance(v, str) else v
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError("must be a string or a list of strings")
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s or len(s.encode("utf-8")) > 100 for s in stops):
            raise ValueError("each stop sequence is 1 to 100 bytes")
        return stops

    def check_supported(self) -> None:
        super().check_supported()
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "invalid_request", "'stream_options' is only allowed when 'stream' is true",
                           field="stream_options")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def sampling(self) -> SamplingParams:
        return SamplingParams.given(**self.model_dump(include=SAMPLING_FIELDS))


class Message(_Strict):
    unsupported: ClassVar[tuple[str, ...]] = ("tool_calls", "function_call", "audio")

    role: Literal["system", "developer", "user", "assistant"]
    content: Any
    name: str | None = None
    # What a client echoes back from an earlier response: fine while empty.
    refusal: str | None = None
    annotations: list[Any] | None = None
    tool_calls: Any = None
    function_call: Any = None
    audio: Any = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, v: Any) -> Any:
        if isinstance(v, str):
            return v
        if not isinstance(v, list):
            raise ValueError("must be a string or a list of text parts")
        for i, part in enumerate(v):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"part {i} is {kind!r}; only text parts {{'type': 'text', 'text': ...}} are supported")
        return v

    def for_template(self) -> dict[str, Any]:
        text = self.content if isinstance(self.content, str) else "\n".join(p["text"] for p in self.content)
        message = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatRequest(_Generate):
    unsupported: ClassVar[tuple[str, ...]] = (
        "logit_bias", "logprobs", "top_logprobs", "tools", "tool_choice", "functions", "function_call",
        "response_format", "modalities", "audio", "prediction", "web_search_options", "reasoning_effort", "verbosity",
    )

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: Any = None
    top_logprobs: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    # Accepted and ignored.
    parallel_tool_calls: bool | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        for i, message in enumerate(self.messages):
            try:
                message.check_supported()
            except ApiError as exc:
                exc.extra["field"] = f"messages.{i}.{exc.extra['field']}"
                raise


class CompletionRequest(_Generate):
    unsupported: ClassVar[tuple[str, ...]] = ("logit_bias", "logprobs", "best_of", "echo", "suffix")

    prompt: Any
    logprobs: Any = None
    best_of: Any = None
    echo: Any = None
    suffix: Any = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: Any) -> str | list[int]:
        if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)):
            v = v[0]  # a batch of one
        if isinstance(v, str):
            return v
        if isinstance(v, list) and v and all(type(t) is int for t in v):
            return v
        if isinstance(v, list) and len(v) > 1 and all(isinstance(p, (str, list)) for p in v):
            raise ValueError("several prompts in one request are not supported; send one request per prompt")
        raise ValueError("must be a string or a non-empty list of token ids")


class TokenizeRequest(_Strict):
    model: str | None = None
    text: str
    add_special: bool = True  # BOS where the model wants one (never twice), as a completion prompt gets it
    parse_special: bool = True  # "<|im_start|>" in the text is that special token, as in prompts


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


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


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def _usage(end: Finished) -> dict[str, Any]:
    prompt, completion = end.prompt_tokens, end.tokens_out
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": end.cached_tokens}}


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

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, text: str, end: Finished) -> dict[str, Any]:
        finish = FINISH_REASONS[end.stop_reason]
        choice: dict[str, Any]
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {**self._head("chat.completion" if self.chat else "text_completion"), "choices": [choice],
                "usage": _usage(end)}

    def chunk(self, text: str | None = None, *, finish: str | None = None, role: str | None = None) -> bytes:
        choice: dict[str, Any]
        if self.chat:
            delta = {**({"role": role} if role else {}), **({"content": text} if text is not None else {})}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        body = {**self._head(self._chunk_object), "choices": [choice]}
        if self.include_usage:
            body["usage"] = None  # as OpenAI: every chunk has the key, only the last one a value
        return _sse(body)

    def usage_chunk(self, end: Finished) -> bytes:
        return _sse({**self._head(self._chunk_object), "choices": [], "usage": _usage(end)})

    @property
    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"


async def _respond(request: web.Request, job: JobStream, reply: Reply, stream: bool) -> web.StreamResponse:
    if not stream:
        text, end = await job.collect()
        return web.json_response(reply.whole(text, end))

    resp = job.sse_response(request)
    async with job:
        await resp.prepare(request)
        if reply.chat:
            await resp.write(reply.chunk("", role="assistant"))
        finished = None
        async for batch in job.batches():
            chunks = []
            for out in batch:
                if isinstance(out, TokenText):
                    chunks.append(reply.chunk(out.text))
                elif isinstance(out, Finished):
                    finished = out
                    chunks.append(reply.chunk(finish=FINISH_REASONS[out.stop_reason]))
                elif isinstance(out, Failed):
                    chunks.append(_sse({"error": openai_error(500, out.code, out.message)}))
            await resp.write(b"".join(chunks))
        if finished is not None and reply.include_usage:
            await resp.write(reply.usage_chunk(finished))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
    return resp


@routes.post("/v1/chat/completions")
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
    tokens = await tokenizing.prompt_tokens(request, prompt, limit=runtime.engine.ctx_size)
    max_tokens = req.max_completion_tokens or req.max_tokens or max(runtime.engine.ctx_size - len(tokens), 1)
    reply = Reply(chat=True, model=info.ref, include_usage=req.include_usage)
    job = await submit_job(request, tokens, req.sampling(), max_tokens=max_tokens, stop=req.stop,
                           ignore_eos=bool(req.ignore_eos), job_id=reply.id)
    return await _respond(request, job, reply, bool(req.stream))


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    model = request.app[STATE].require_ready().model
    req = _parse(CompletionRequest, await read_json(request))
    if isinstance(req.prompt, str):
        tokens = await tokenizing.prompt_tokens(request, req.prompt,
                                                limit=request.app[STATE].require_ready().engine.ctx_size)
    else:
        _check_token_ids(req.prompt, model.n_vocab, "prompt")
        tokens = req.prompt
    reply = Reply(chat=False, model=model.info.ref, include_usage=req.include_usage)
    max_tokens = req.max_tokens if req.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS
    job = await submit_job(request, tokens, req.sampling(), max_tokens=max_tokens, stop=req.stop,
                           ignore_eos=bool(req.ignore_eos), job_id=reply.id)
    return await _respond(request, job, reply, bool(req.stream))


def _model_object(info: ModelInfo) -> dict[str, Any]:
    try:
        created = int(os.path.getmtime(info.path))
    except OSError:
        created = 0
    return {"id": info.ref, "object": "model", "created": created, "owned_by": "llm-worker-rbee",
            "meta": info.public()}


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    model = request.app[STATE].require_ready().model
    return web.json_response({"object": "list", "data": [_model_object(model.info)]})


@routes.get("/v1/models/{model_id:.+}")
async def get_model(request: web.Request) -> web.Response:
    info = request.app[STATE].require_ready().model.info
    model_id = request.match_info["model_id"]
    if model_id != info.ref:
        raise ApiError(404, "model_not_found",
                       f"the model {model_id!r} does not exist; this worker serves {info.ref!r}", field="model")
    return web.json_response(_model_object(info))


@routes.post("/v1/tokenize")
async def tokenize(request: web.Request) -> web.StreamResponse:
    request.app[STATE].require_ready()
    req = _parse(TokenizeRequest, await read_json(request))

    if req.add_special and req.parse_special:  # exactly what a completion prompt of this text gets
        tokens = await tokenizing.prompt_tokens(request, req.text)
    else:
        tokens = await tokenizing.tokenize(request, req.text, add_special=req.add_special,
                                           parse_special=req.parse_special)
    return await tokenizing.tokens_response(request, tokens)


@routes.post("/v1/detokenize")
async def detokenize(request: web.Request) -> web.Response:
    model = request.app[STATE].require_ready().model
    req = _parse(DetokenizeRequest, await read_json(request))
    _check_token_ids(req.tokens, model.n_vocab, "tokens")
    return web.json_response({"text": await tokenizing.detokenize(request, req.tokens)})


def setup(app: web.Application) -> None:
    app.add_routes(routes)
