"""The OpenAI-compatible API: /v1/completions, /v1/chat/completions, /v1/models, /v1/tokenize, /v1/detokenize, and
vLLM's tokenizer routes at the root (/tokenize, /detokenize, /tokenizer_info).

Generation goes through jobs.submit_jobs like the native route (one job per prompt and per choice). The wire format
is protocol_openai's models; errors take OpenAI's shape ({"error": {"message", "type", "param", "code"}}: the routes
are added with ErrorStyle.OPENAI), so the openai SDK raises its typed exceptions.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web
from pydantic import MISSING, BaseModel, ValidationError

from worker import chat
from worker.chat import ChatDelta, ChatParser, ChatPlan
from worker.engine.outputs import (
    Failed,
    Finished,
    Job,
    Output,
    PromptLogprobs,
    StopReason,
    TokenLogprob,
    TokenText,
    choice_job_id,
)
from worker.http import tokenizing
from worker.http.chat_path import check_room, submit_chat
from worker.http.errors import ApiError, ErrorStyle, add_routes, error_body, failed_status
from worker.http.jobs import JobResult, JobSpec, JobStream, checked_constraint, submit_jobs
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
    CompletionLogprobsWriter,
    CompletionRequest,
    Delta,
    DetokenizeRequest,
    FinishReason,
    FunctionCallOut,
    FunctionDelta,
    Message,
    ModelList,
    ModelObject,
    PromptTokensDetails,
    Strict,
    Text,
    TokenizeRequest,
    TokenizerInfo,
    Tokens,
    ToolCallDeltaOut,
    ToolCallOut,
    Usage,
    VllmDetokenizeRequest,
    VllmDetokenizeResponse,
    VllmTokenizeRequest,
    VllmTokenizeResponse,
    chat_logprobs,
)
from worker.http.routedoc import RouteDoc, StreamDoc, documented
from worker.http.schemas import field_path, read_json
from worker.http.sse import EventStream
from worker.http.state import STATE, WorkerState
from worker.llamacpp import ModelInfo

routes = web.RouteTableDef()

M = TypeVar("M", bound=Strict)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat runs to the end of the context
BODY_ERRORS = (400, 401, 413, 503)


def parse_body(model: type[M], body: Any) -> M:
    """Validate a body; a problem is a 400 whose param is the dotted path of the field."""
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", "body must be a JSON object")
    try:
        req = model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        path = field_path(err.get("loc", ()))
        if err.get("type") == "extra_forbidden":
            raise ApiError(400, "invalid_request", f"unrecognized request argument supplied: {path}",
                           field=path) from None
        if err.get("type") == "missing":
            raise ApiError(400, "invalid_request", f"missing required parameter: {path}", field=path) from None
        message = err["msg"].removeprefix("Value error, ")
        raise ApiError(400, "invalid_request", f"{path}: {message}" if path else message,
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
    """The response objects of one request; chat and text completions differ only in names and where text goes.
    A request runs `choices` jobs: `n` per prompt, prompt-major (choice index = prompt index * n + j), so usage
    counts each prompt once."""

    chat: bool
    model: str
    choices: int = 1
    n: int = 1
    include_usage: bool = False
    continuous_usage: bool = False
    logprobs: bool = False  # render the tokens' logprobs (the jobs asked the engine for them)
    echo: list[str] | None = None  # completions: each prompt's text, sent before its completion
    piece: Callable[[int], bytes] | None = None  # a token's bytes (the echoed prompt's first token has no entry)
    plan: ChatPlan | None = None  # chat: how each answer's text splits into content, reasoning and tool calls
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    parsers: list[ChatParser] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.id = self.id or f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"
        if self.plan is not None:
            self.parsers = [self.plan.parser() for _ in range(self.choices)]

    def finish_reason(self, index: int, end: Finished) -> FinishReason:
        if self.parsers and self.parsers[index].called and end.stop_reason is StopReason.EOS:
            return "tool_calls"
        return FINISH_REASONS[end.stop_reason]

    def job_id(self, index: int) -> str:
        """The job of one choice; DELETE /v1/inference/{response id} cancels them all."""
        return choice_job_id(self.id, index, self.choices)

    def prompt_text(self, index: int) -> str:
        return self.echo[index // self.n] if self.echo is not None else ""

    def usage(self, prompt_tokens: list[int], generated: list[int], cached: list[int] | None = None) -> Usage:
        """Per-choice counts summed: prompts once per prompt, generated tokens of every choice."""
        prompt = sum(prompt_tokens[::self.n])
        completion = sum(generated)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=sum((cached or [])[::self.n])))

    def end_usage(self, ends: list[Finished]) -> Usage:
        return self.usage([e.prompt_tokens for e in ends], [e.tokens_out for e in ends],
                          [e.cached_tokens for e in ends])

    def writer(self) -> CompletionLogprobsWriter:
        assert self.piece is not None
        return CompletionLogprobsWriter(self.piece)

    def whole(self, results: list[JobResult], jobs: list[Job]) -> ChatCompletion | Completion:
        usage = self.end_usage([r.end for r in results])
        if self.chat:
            return ChatCompletion(id=self.id, created=self.created, model=self.model, usage=usage, choices=[
                ChatChoice(index=i, message=self.message(i, r.text),
                           logprobs=chat_logprobs(_generated(r.outputs)) if self.logprobs else None,
                           finish_reason=self.finish_reason(i, r.end))
                for i, r in enumerate(results)])
        choices = []
        for i, (r, job) in enumerate(zip(results, jobs, strict=True)):
            logprobs = None
            if self.logprobs:
                prompt = [e for out in r.outputs if isinstance(out, PromptLogprobs) for e in out.tokens]
                logprobs = self.writer().write([*prompt, *_generated(r.outputs)], job.prompt_tokens[0])
            choices.append(CompletionChoice(index=i, text=self.prompt_text(i) + r.text, logprobs=logprobs,
                                            finish_reason=FINISH_REASONS[r.end.stop_reason]))
        return Completion(id=self.id, created=self.created, model=self.model, usage=usage, choices=choices)

    def message(self, index: int, text: str) -> AssistantMessage:
        """A whole answer: its content, reasoning and calls as the parser splits them."""
        if not self.parsers:
            return AssistantMessage(content=text, reasoning_content=MISSING, tool_calls=MISSING)
        parser = self.parsers[index]
        deltas = [parser.feed(text), parser.finish()]
        content = "".join(d.content for d in deltas)
        reasoning = "".join(d.reasoning for d in deltas)
        calls = [ToolCallOut(id=c["id"], function=FunctionCallOut(name=c["name"], arguments=c["arguments"]))
                 for c in chat.call_arguments(deltas)]
        return AssistantMessage(content=content if content or not calls else None,
                                reasoning_content=reasoning if reasoning else MISSING,
                                tool_calls=calls if calls else MISSING)

    def chunk(self, index: int, text: str | None = None, *, finish: Any = None, role: bool = False,
              usage: Usage | None = None, logprobs: Any = None,
              delta_of: ChatDelta | None = None) -> ChatCompletionChunk | CompletionChunk:
        """A chunk of choice `index` with text (a chat's as parsed, `delta_of`) or a finish reason (the role on a
        chat stream's first). With include_usage every chunk has `"usage": null` (as OpenAI's) unless `usage` is
        given (continuous usage)."""
        extra: dict[str, Any] = {"usage": usage} if usage is not None or self.include_usage else {}
        if self.chat:
            delta = Delta(role="assistant" if role else MISSING, content=text if text is not None else MISSING)
            if delta_of is not None:
                delta = _delta(delta_of)
            return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, **extra, choices=[
                ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish)])
        return CompletionChunk(id=self.id, created=self.created, model=self.model, **extra, choices=[
            CompletionChunkChoice(index=index, text=text or "", logprobs=logprobs, finish_reason=finish)])

    def usage_chunk(self, usage: Usage) -> ChatCompletionChunk | CompletionChunk:
        """The last chunk with include_usage: no choices, the request's usage."""
        kind = ChatCompletionChunk if self.chat else CompletionChunk
        return kind(id=self.id, created=self.created, model=self.model, choices=[], usage=usage)


def _delta(d: ChatDelta) -> Delta:
    calls = [ToolCallDeltaOut(index=c.index, id=c.id if c.id is not None else MISSING,
                              type="function" if c.id is not None else MISSING,
                              function=FunctionDelta(name=c.name if c.name is not None else MISSING,
                                                     arguments=c.arguments))
             for c in d.tool_calls]
    return Delta(content=d.content if d.content else MISSING, reasoning_content=d.reasoning or MISSING,
                 tool_calls=calls if calls else MISSING)


def _generated(outputs: list[Output]) -> list[TokenLogprob]:
    return [e for out in outputs if isinstance(out, TokenText) for e in out.logprobs]


async def _respond(request: web.Request, jobs: JobStream, reply: Reply, stream: bool) -> web.StreamResponse:
    if not stream:
        return _json(reply.whole(await jobs.collect(), jobs.jobs))

    events = EventStream(request, jobs.stream_headers(request))
    prompt_tokens = [len(job.prompt_tokens) for job in jobs.jobs]
    generated = [0] * len(jobs.jobs)
    ends: dict[int, Finished] = {}
    writers = [reply.writer() for _ in jobs.jobs] if reply.logprobs and not reply.chat else []

    def running() -> Usage | None:
        return reply.usage(prompt_tokens, generated) if reply.continuous_usage else None

    def token_logprobs(index: int, entries: Sequence[TokenLogprob | None], first: int | None = None) -> Any:
        if not reply.logprobs:
            return None
        if reply.chat:
            return chat_logprobs([e for e in entries if e is not None])
        return writers[index].write(entries, first)

    async with jobs:
        await events.open()
        # At once, before the prompt is decoded: a chat's role; an echoed prompt (unless its logprobs must come)
        for index in range(len(jobs.jobs)):
            if reply.chat:
                events.add(reply.chunk(index, "", role=True, usage=running()))
            elif reply.echo is not None and not reply.logprobs:
                events.add(reply.chunk(index, reply.prompt_text(index), usage=running()))
        await events.flush()
        async for batch in jobs.batches():
            for index, out in batch:
                if isinstance(out, TokenText):
                    generated[index] = out.index + 1
                    if reply.parsers:
                        delta = reply.parsers[index].feed(out.text)
                        if delta or out.logprobs:  # markup held back until it is known to be a call or text
                            events.add(reply.chunk(index, usage=running(), delta_of=delta,
                                                   logprobs=token_logprobs(index, out.logprobs)))
                    else:
                        events.add(reply.chunk(index, out.text, usage=running(),
                                               logprobs=token_logprobs(index, out.logprobs)))
                elif isinstance(out, PromptLogprobs) and reply.echo is not None:
                    first = jobs.jobs[index].prompt_tokens[0]
                    events.add(reply.chunk(index, reply.prompt_text(index), usage=running(),
                                           logprobs=token_logprobs(index, out.tokens, first)))
                elif isinstance(out, Finished):
                    ends[index] = out
                    generated[index] = out.tokens_out
                    if reply.parsers and (tail := reply.parsers[index].finish()):
                        events.add(reply.chunk(index, usage=running(), delta_of=tail))
                    events.add(reply.chunk(index, finish=reply.finish_reason(index, out), usage=running()))
                elif isinstance(out, Failed):
                    events.add(error_body(ErrorStyle.OPENAI, failed_status(out.code), out.code, out.message))
            await events.flush()
        if reply.include_usage and len(ends) == len(jobs.jobs):
            events.add(reply.usage_chunk(reply.end_usage([ends[i] for i in range(len(ends))])))
        await events.close(done=True)
    return events.response


def _json(body: BaseModel, status: int = 200) -> web.Response:
    return web.Response(body=body.model_dump_json(), status=status, content_type="application/json")


_CHAT_STREAM = StreamDoc("OpenAI chat completion chunks, then [DONE]", "openai", (ChatCompletionChunk,))
_COMPLETION_STREAM = StreamDoc("OpenAI text completion chunks, then [DONE]", "openai", (CompletionChunk,))


def _chat_prompt(info: ModelInfo, model_id: str, messages: list[Message], add_generation_prompt: bool = True) -> str:
    """A conversation in the model's own chat template, without tools (the tokenizer routes)."""
    if not info.chat_template:
        raise ApiError(400, "no_chat_template",
                       f"the model {model_id} has no chat template (tokenizer.chat_template in its GGUF)",
                       field="messages")
    try:
        return chat.template.render(info.chat_template,
                                    chat.template.template_messages([m.for_template() for m in messages]),
                                    bos_token=info.bos, eos_token=info.eos,
                                    add_generation_prompt=add_generation_prompt)
    except chat.TemplateCompileError as exc:
        raise ApiError(500, "chat_template_error", str(exc)) from None
    except chat.TemplateRenderError as exc:
        raise ApiError(400, "invalid_request", f"the model's chat template refused these messages: {exc}",
                       field="messages") from None


@routes.post("/v1/chat/completions")
@documented(RouteDoc("OpenAI chat completion, with the model's own chat template", "openai", body=ChatRequest,
                     ok=ChatCompletion, stream=_CHAT_STREAM, errors=(*BODY_ERRORS, 409, 500),
                     ok_description="the whole answer (stream false) or its event stream (stream true)"))
async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    state.require_ready()
    req = parse_body(ChatRequest, await read_json(request))
    response_id = f"chatcmpl-{uuid.uuid4().hex}"
    job_ids = [choice_job_id(response_id, j, req.choices) for j in range(req.choices)]
    plan, jobs = await submit_chat(request, req.chat_inputs(), job_ids)
    reply = Reply(chat=True, model=state.model_id, choices=req.choices, n=req.choices, id=response_id,
                  include_usage=req.include_usage, continuous_usage=req.continuous_usage,
                  logprobs=req.logprobs_k is not None, plan=plan)
    return await _respond(request, jobs, reply, bool(req.stream))


@routes.post("/v1/completions")
@documented(RouteDoc("OpenAI text completion", "openai", body=CompletionRequest, ok=Completion,
                     stream=_COMPLETION_STREAM, errors=(*BODY_ERRORS, 409, 500),
                     ok_description="the whole answer (stream false) or its event stream (stream true)"))
async def completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    model = state.require_ready().model
    req = parse_body(CompletionRequest, await read_json(request))
    n = req.choices
    check_room(request, len(req.prompt) * n, "prompt" if n == 1 else "n")
    constraint = await checked_constraint(request, req.constraint())
    prompts: list[list[int]] = []
    for i, prompt in enumerate(req.prompt):
        if isinstance(prompt, str):
            limit = state.require_ready().engine.ctx_size
            prompts.append(await tokenizing.prompt_tokens(request, prompt, limit=limit))
        else:
            _check_token_ids(prompt, model.n_vocab, "prompt" if len(req.prompt) == 1 else f"prompt.{i}")
            prompts.append(prompt)
    echo = None
    if req.echo:
        echo = [p if isinstance(p, str) else await tokenizing.detokenize(request, p) for p in req.prompt]
    reply = Reply(chat=False, model=state.model_id, choices=len(prompts) * n, n=n, include_usage=req.include_usage,
                  continuous_usage=req.continuous_usage, logprobs=req.logprobs is not None, echo=echo,
                  piece=model.piece)
    max_tokens = req.max_tokens if req.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS
    specs = [JobSpec(tokens, req.sampling(j), reply.job_id(i * n + j))
             for i, tokens in enumerate(prompts) for j in range(n)]
    jobs = await submit_jobs(request, specs, max_tokens=max_tokens, stop=req.stop, ignore_eos=bool(req.ignore_eos),
                             constraint=constraint, logprobs=req.logprobs,
                             prompt_logprobs=req.logprobs if req.echo else None, speculate=req.speculative is not False)
    return await _respond(request, jobs, reply, bool(req.stream))


def _model_object(state: WorkerState) -> ModelObject:
    info = state.require_ready().model.info
    try:
        created = int(os.path.getmtime(info.path))
    except OSError:
        created = 0
    return ModelObject(id=state.model_id, created=created, owned_by="llm-worker-rbee",
                       meta=ModelCard(**(state.model_card() or {})))


@routes.get("/v1/models")
@documented(RouteDoc("The served model, as OpenAI's model list", "openai", ok=ModelList, ok_description="one model",
                     errors=(401, 503)))
async def list_models(request: web.Request) -> web.Response:
    return _json(ModelList(data=[_model_object(request.app[STATE])]))


@routes.get("/v1/models/{model_id:.+}")
@documented(RouteDoc("The served model by its id", "openai", ok=ModelObject, ok_description="the model",
                     errors=(401, 404, 503), path_parameters=("model_id",)))
async def get_model(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.require_ready()
    model_id = request.match_info["model_id"]
    if model_id != state.model_id:
        raise ApiError(404, "model_not_found",
                       f"the model {model_id!r} does not exist; this worker serves {state.model_id!r}", field="model")
    return _json(_model_object(state))


@routes.post("/v1/tokenize")
@documented(RouteDoc("Text to token ids", "openai", body=TokenizeRequest, ok=Tokens, ok_description="the tokens",
                     errors=BODY_ERRORS))
async def tokenize(request: web.Request) -> web.StreamResponse:
    request.app[STATE].require_ready()
    req = parse_body(TokenizeRequest, await read_json(request))
    if req.add_special and req.parse_special:  # exactly what a completion prompt of this text gets
        tokens = await tokenizing.prompt_tokens(request, req.text)
    else:
        tokens = await tokenizing.tokenize(request, req.text, add_special=req.add_special,
                                           parse_special=req.parse_special)
    # {"tokens": [...]} (Tokens), written a piece at a time when long
    return await tokenizing.tokens_response(request, tokens)


@routes.post("/v1/detokenize")
@documented(RouteDoc("Token ids to text", "openai", body=DetokenizeRequest, ok=Text, ok_description="the text",
                     errors=BODY_ERRORS))
async def detokenize(request: web.Request) -> web.Response:
    model = request.app[STATE].require_ready().model
    req = parse_body(DetokenizeRequest, await read_json(request))
    _check_token_ids(req.tokens, model.n_vocab, "tokens")
    return _json(Text(text=await tokenizing.detokenize(request, req.tokens)))


# ---- vLLM's tokenizer routes, at the root: a client (lm-eval's remote tokenizer) tokenizes with the served model's
# own vocabulary and applies its chat template without downloading anything --------------------------------------


@routes.post("/tokenize")
@documented(RouteDoc("vLLM's tokenize: a prompt, or messages through the chat template, to token ids", "vllm",
                     body=VllmTokenizeRequest, ok=VllmTokenizeResponse, ok_description="the tokens",
                     errors=BODY_ERRORS))
async def vllm_tokenize(request: web.Request) -> web.Response:
    state = request.app[STATE]
    runtime = state.require_ready()
    model = runtime.model
    req = parse_body(VllmTokenizeRequest, await read_json(request))
    if req.messages is not None:
        text = _chat_prompt(model.info, state.model_id, req.messages, req.add_generation_prompt)
        add_special = bool(req.add_special_tokens)
    else:
        text, add_special = req.prompt or "", req.add_special_tokens is not False

    def run() -> tuple[list[int], list[str] | None]:
        # Special tokens written in the text are those tokens, as a Hugging Face tokenizer reads them.
        tokens = (model.prompt_tokens(text) if add_special
                  else model.tokenize(text, add_special=False, parse_special=True))
        strs = ([model.piece(t, special=True).decode("utf-8", errors="replace") for t in tokens]
                if req.return_token_strs else None)
        return tokens, strs

    tokens, strs = await request.app[tokenizing.TOKENIZERS].run(len(text), lambda _gone: run())
    return _json(VllmTokenizeResponse(count=len(tokens), max_model_len=runtime.engine.ctx_size, tokens=tokens,
                                      token_strs=strs))


@routes.post("/detokenize")
@documented(RouteDoc("vLLM's detokenize: token ids to text", "vllm", body=VllmDetokenizeRequest,
                     ok=VllmDetokenizeResponse, ok_description="the text", errors=BODY_ERRORS))
async def vllm_detokenize(request: web.Request) -> web.Response:
    model = request.app[STATE].require_ready().model
    req = parse_body(VllmDetokenizeRequest, await read_json(request))
    _check_token_ids(req.tokens, model.n_vocab, "tokens")

    def run(_gone: object) -> str:  # special tokens as their text, as a Hugging Face tokenizer decodes them
        return b"".join(model.piece(t, special=True) for t in req.tokens).decode("utf-8", errors="replace")

    return _json(VllmDetokenizeResponse(prompt=await request.app[tokenizing.TOKENIZERS].run(len(req.tokens), run)))


@routes.get("/tokenizer_info")
@documented(RouteDoc("vLLM's tokenizer_info: the special tokens, the chat template and the context length",
                     "vllm", ok=TokenizerInfo, ok_description="the tokenizer's configuration", errors=(401, 503)))
async def tokenizer_info(request: web.Request) -> web.Response:
    runtime = request.app[STATE].require_ready()
    model, info = runtime.model, runtime.model.info
    return _json(TokenizerInfo(tokenizer_class="LlamaCppTokenizer", bos_token=info.bos, eos_token=info.eos,
                               unk_token=info.unk, pad_token=None, add_bos_token=model.add_bos,
                               chat_template=info.chat_template, model_max_length=runtime.engine.ctx_size,
                               vocab_size=model.n_vocab))


def setup(app: web.Application) -> None:
    add_routes(app, routes, ErrorStyle.OPENAI)
