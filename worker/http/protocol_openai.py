"""The OpenAI-compatible API's wire format: requests and responses as pydantic models (vLLM's
entrypoints/openai/protocol.py is the model). Requests are validated by them, responses built from them, and the
OpenAPI document generated from both.

Unknown request fields are refused as OpenAI refuses them; OpenAI fields this worker does not implement are accepted
only at their neutral value (null, false, 1, "none", ...: `neutral_only`), so a client that sends them explicitly unset
still works.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal

from pydantic import MISSING, BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator

from worker.engine.outputs import MAX_TOP_LOGPROBS, Constraint, Finished, StopReason, TokenLogprob
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
from worker.http.chat_path import ChatInputs
from worker.http.errors import ApiError
from worker.http.protocol_native import ModelCard, WireModel, grammar_constraint

SAMPLING_FIELDS = {"temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                   "frequency_penalty", "seed"}
FinishReason = Literal["stop", "length", "tool_calls"]
# The engine's stop reasons in OpenAI's terms: anything that cut the text short before the model ended it is "length".
FINISH_REASONS: dict[StopReason, FinishReason] = {
    StopReason.EOS: "stop", StopReason.STOP_SEQUENCE: "stop", StopReason.MAX_TOKENS: "length",
    StopReason.TIMEOUT: "length", StopReason.CANCELLED: "length"}


def neutral_only(*neutral: Any) -> Any:
    """A field OpenAI defines that this worker does not implement: accepted only at a value that asks for nothing
    (null or one of `neutral`), else 400 unsupported_parameter naming it."""
    return Field(None, json_schema_extra={
        "enum": [None, *neutral], "x-neutral": True,
        "description": "not supported by this worker: leave it out, or send a neutral value"})


def _is_neutral(value: Any, neutral: list[Any]) -> bool:
    return any(type(value) is type(n) and value == n for n in neutral)  # type-exact: 0 is not False


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    def check_supported(self) -> None:
        for name, info in type(self).model_fields.items():
            extra = info.json_schema_extra
            if isinstance(extra, dict) and extra.get("x-neutral"):
                neutral = list(extra["enum"])  # type: ignore[arg-type]
                if not _is_neutral(getattr(self, name), neutral):
                    accepted = " or ".join(["null", *(json.dumps(n) for n in neutral if n is not None)])
                    raise ApiError(400, "unsupported_parameter",
                                   f"'{name}' is not supported by this worker; leave it out, or send {accepted}",
                                   field=name)


# ---- requests ----------------------------------------------------------------------------------------------------

_STOP_STRING = {"type": "string", "minLength": 1, "maxLength": 100}
_TOKEN_IDS = {"type": "array", "minItems": 1, "items": {"type": "integer"}}
StopField = Annotated[Any, WithJsonSchema({
    "description": "one stop string or up to 4; each 1 to 100 bytes of UTF-8",
    "anyOf": [{"type": "null"}, _STOP_STRING, {"type": "array", "maxItems": 4, "items": _STOP_STRING}]})]
PromptField = Annotated[Any, WithJsonSchema({
    "description": "text, or token ids, or a list of either (OpenAI's batch form: one choice per prompt, in order)",
    "anyOf": [{"type": "string"}, _TOKEN_IDS, {"type": "array", "minItems": 1,
                                               "items": {"anyOf": [{"type": "string"}, _TOKEN_IDS]}}]})]
ContentField = Annotated[Any, WithJsonSchema({
    "description": "text, or a list of text parts (joined with newlines)",
    "anyOf": [{"type": "string"}, {"type": "array", "items": {
        "type": "object", "required": ["type", "text"],
        "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}}]})]


class StreamOptions(Strict):
    """Keys this worker does not know are ignored, not refused: clients send their server's own (guidellm always
    sends vLLM's continuous_usage_stats)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = Field(
        None, description="vLLM's: every chunk carries the usage so far (the request's prompt and generated tokens)")
    include_obfuscation: bool | None = None  # padding against length side channels: accepted, nothing to pad


class GenerateRequest(Strict):
    """What both completion routes accept."""

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
    stop: StopField = Field(None, validate_default=True)
    seed: OpenAISeed | None = None
    n: int | None = Field(None, ge=1, description="choices per prompt: each its own sequence (seed + i when seeded)")
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logit_bias: Any = neutral_only({})
    # llama-server's extras: the output constrained to a GBNF grammar, or to a JSON schema
    grammar: str | None = Field(None, min_length=1, description="llama-server's: a GBNF grammar the output must "
                                "match (llama.cpp's grammar syntax)")
    json_schema: dict[str, Any] | None = Field(None, description="llama-server's: a JSON schema the output must "
                                               "match")
    speculative: bool | None = Field(None, description="false: never speculative decoding for this request")
    # Accepted and ignored: they change nothing about the text.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None

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

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.continuous_usage_stats)

    def sampling(self, choice: int = 0) -> SamplingParams:
        """Choice `choice` of a prompt: with a seed, seed + choice, so n choices differ yet each is repeatable."""
        params = SamplingParams.given(**self.model_dump(include=SAMPLING_FIELDS))
        if params.seed is not None and choice:
            params = replace(params, seed=params.seed + choice)
        return params

    @property
    def choices(self) -> int:
        return self.n or 1

    def constraint(self) -> tuple[Constraint, str] | None:
        """The output's constraint and the field it comes from (for errors), if the request sets one."""
        return grammar_constraint(self.grammar, self.json_schema)


class FunctionCall(Strict):
    name: str
    arguments: str = Field(description="the arguments as JSON text, as the model wrote them")


class ToolCall(Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: ContentField = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="an assistant's earlier calls")
    tool_call_id: str | None = Field(None, description="a tool message: the call it answers")
    # What a client echoes back from an earlier response: fine while empty, or ignored (reasoning is not resent
    # to the model, as templates drop it).
    refusal: str | None = None
    annotations: list[Any] | None = None
    reasoning_content: str | None = None
    function_call: Any = neutral_only()
    audio: Any = neutral_only()

    def check_supported(self) -> None:
        super().check_supported()
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ApiError(400, "invalid_request", "content is required (it may be null only in an assistant "
                           "message with tool_calls)", field="content")
        if self.tool_calls and self.role != "assistant":
            raise ApiError(400, "invalid_request", "only an assistant message has tool_calls", field="tool_calls")

    @field_validator("content")
    @classmethod
    def _text_only(cls, v: Any) -> Any:
        if v is None or isinstance(v, str):
            return v
        if not isinstance(v, list):
            raise ValueError("must be a string or a list of text parts")
        for i, part in enumerate(v):
            if isinstance(part, dict) and part.get("type") == "text":
                if not isinstance(part.get("text"), str):
                    raise ValueError(f"part {i} is a text part without a string 'text'")
                continue
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind is None:
                raise ValueError(f"part {i} has no 'type'; only text parts {{'type': 'text', 'text': ...}} are "
                                 "supported")
            raise ValueError(f"part {i} is {kind!r}; only text parts {{'type': 'text', 'text': ...}} are supported")
        return v

    def for_template(self) -> dict[str, Any]:
        """OpenAI's shape, as the chat layer takes it (it turns arguments into objects for the template)."""
        text = self.content if self.content is None or isinstance(self.content, str) else "\n".join(
            p["text"] for p in self.content)
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


def check_messages(messages: list[Message]) -> None:
    """Each message's fields that ask for what this worker does not do; the 400 names the message."""
    for i, message in enumerate(messages):
        try:
            message.check_supported()
        except ApiError as exc:
            exc.extra["field"] = f"messages.{i}.{exc.extra['field']}"
            raise


class FunctionDefinition(Strict):
    name: str = Field(description="1 to 64 letters, digits, '_', '-' or '.'")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON schema; the call's arguments are "
                                              "constrained to it")
    strict: bool | None = None  # enforced either way


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class ResponseFormatText(Strict):
    type: Literal["text"]


class ResponseFormatJsonObject(Strict):
    type: Literal["json_object"]


class JsonSchemaFormat(Strict):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None  # the schema is enforced either way: strict or not, the output matches it


class ResponseFormatJsonSchema(Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema,
                           Field(discriminator="type")]


class ChatRequest(GenerateRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, description="functions the model may call, rendered by its own chat "
                                     "template (or described in a system message where the template has no tools)")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="none: no calls; auto (the default with tools); required: at least one call; a named "
        "function: that one. required and named are enforced by the constraint engine")
    parallel_tool_calls: bool | None = Field(None, description="false: at most one call")
    reasoning_format: Literal["none", "auto", "deepseek"] | None = Field(
        None, description="llama-server's: none keeps <think>…</think> inline in content; otherwise it is split "
        "out as reasoning_content (the worker's --reasoning-format decides by default)")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="vLLM's and llama-server's: extra variables for the chat template (Qwen 3's "
        "enable_thinking: false; add_generation_prompt: false continues the last message)")
    functions: Any = neutral_only([])
    function_call: Any = neutral_only("none")
    modalities: Any = neutral_only(["text"])
    audio: Any = neutral_only()
    prediction: Any = neutral_only()
    web_search_options: Any = neutral_only()
    reasoning_effort: Any = neutral_only()
    verbosity: Any = neutral_only()
    # Accepted and ignored.
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        check_messages(self.messages)
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "invalid_request", "'top_logprobs' needs 'logprobs': true", field="top_logprobs")
        if self.response_format is not None and self.response_format.type != "text" and (
                self.grammar is not None or self.json_schema is not None):
            raise ApiError(400, "invalid_request", "give one constraint: 'response_format', 'grammar' or "
                           "'json_schema'", field="response_format")

    @property
    def logprobs_k(self) -> int | None:
        """The engine's logprobs: None (none), or the sampled token's and the top k."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def chat_inputs(self) -> ChatInputs:
        tool_choice = self.tool_choice.model_dump() if isinstance(self.tool_choice, BaseModel) else self.tool_choice
        reasoning: Literal["split", "inline"] | None = (
            "inline" if self.reasoning_format == "none" else "split" if self.reasoning_format else None)
        return ChatInputs(
            messages=[m.for_template() for m in self.messages],
            sampling=[self.sampling(j) for j in range(self.choices)],
            tools=[t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None,
            tool_choice=tool_choice, parallel_tool_calls=self.parallel_tool_calls is not False, reasoning=reasoning,
            template_kwargs=self.chat_template_kwargs, response_format=self.constraint(),
            max_tokens=self.max_completion_tokens or self.max_tokens, stop=self.stop,
            ignore_eos=bool(self.ignore_eos), logprobs=self.logprobs_k, speculate=self.speculative is not False)

    def constraint(self) -> tuple[Constraint, str] | None:
        fmt = self.response_format
        if isinstance(fmt, ResponseFormatJsonObject):
            return Constraint("json_object"), "response_format"
        if isinstance(fmt, ResponseFormatJsonSchema):
            return Constraint("json_schema", json.dumps(fmt.json_schema.schema_)), "response_format"
        return super().constraint()


class CompletionRequest(GenerateRequest):
    prompt: PromptField
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="the sampled token's logprob and "
                                 "the most likely `logprobs` tokens' at each position")
    echo: bool | None = Field(None, description="the prompt before the completion (with logprobs: the prompt's "
                              "own, the first token's null)")
    best_of: Any = neutral_only(1)
    suffix: Any = neutral_only("")

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v: Any) -> list[str | list[int]]:
        """Always a list of prompts: one string or token-id list is a batch of one."""
        if isinstance(v, str) or (isinstance(v, list) and v and all(type(t) is int for t in v)):
            return [v]
        if not isinstance(v, list) or not v:
            raise ValueError("must be a string, a non-empty list of token ids, or a non-empty list of either")
        for i, p in enumerate(v):
            if not (isinstance(p, str) or (isinstance(p, list) and p and all(type(t) is int for t in p))):
                raise ValueError(f"prompt {i} must be a string or a non-empty list of token ids")
        return v


class TokenizeRequest(Strict):
    model: str | None = None
    text: str
    add_special: bool = True  # BOS where the model wants one (never twice), as a completion prompt gets it
    parse_special: bool = True  # "<|im_start|>" in the text is that special token, as in prompts


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[int]


class VllmTokenizeRequest(Strict):
    """vLLM's POST /tokenize: a prompt, or messages rendered with the model's chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = Field(
        None, description="BOS where the model wants one; default true for a prompt, false for messages (the "
        "template writes its own)")
    add_generation_prompt: bool = True
    continue_final_message: Any = neutral_only(False)
    return_token_strs: bool = False

    def check_supported(self) -> None:
        super().check_supported()
        if self.messages is not None:
            check_messages(self.messages)

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> VllmTokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' and 'messages'")
        return self


class VllmDetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[int]


# ---- responses ---------------------------------------------------------------------------------------------------


class PromptTokensDetails(WireModel):
    cached_tokens: int


class Usage(WireModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, end: Finished) -> Usage:
        return cls(prompt_tokens=end.prompt_tokens, completion_tokens=end.tokens_out,
                   total_tokens=end.prompt_tokens + end.tokens_out,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=end.cached_tokens))


class TopLogprob(WireModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(WireModel):
    """OpenAI's chat logprobs: per generated token, its logprob and the top_logprobs most likely at its place."""

    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


class CompletionLogprobs(WireModel):
    """OpenAI's (legacy) completion logprobs: parallel lists, one entry per token; with echo the prompt's tokens come
    first, the very first with null logprobs (nothing predicts it)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(WireModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason


class Completion(WireModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunkChoice(WireModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class CompletionChunk(WireModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None | MISSING = Field(MISSING, description="with stream_options.include_usage: null in every "
                                          "chunk but the last, whose choices are empty")


class FunctionCallOut(WireModel):
    name: str
    arguments: str


class ToolCallOut(WireModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(WireModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | MISSING = Field(MISSING, description="a reasoning model's <think> block, split out")
    tool_calls: list[ToolCallOut] | MISSING = MISSING


class ChatChoice(WireModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(WireModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionDelta(WireModel):
    name: str | MISSING = MISSING
    arguments: str = ""


class ToolCallDeltaOut(WireModel):
    """OpenAI's streamed call: its first delta has the id, type and name, the next ones fragments of arguments."""

    index: int
    id: str | MISSING = MISSING
    type: Literal["function"] | MISSING = MISSING
    function: FunctionDelta


class Delta(WireModel):
    role: Literal["assistant"] | MISSING = MISSING
    content: str | MISSING = MISSING
    reasoning_content: str | MISSING = MISSING
    tool_calls: list[ToolCallDeltaOut] | MISSING = MISSING


class ChatChunkChoice(WireModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(WireModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None | MISSING = Field(MISSING, description="with stream_options.include_usage: null in every "
                                          "chunk but the last, whose choices are empty")


def token_text(piece: bytes) -> str:
    """A token as text (a piece that is part of a UTF-8 character shows as U+FFFD; `bytes` has the exact bytes)."""
    return piece.decode("utf-8", errors="replace")


def chat_logprobs(entries: Sequence[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(content=[
        ChatTokenLogprob(token=token_text(e.piece), logprob=e.logprob, bytes=list(e.piece), top_logprobs=[
            TopLogprob(token=token_text(t.piece), logprob=t.logprob, bytes=list(t.piece)) for t in e.top])
        for e in entries])


@dataclass
class CompletionLogprobsWriter:
    """Completion logprobs of one choice, chunk by chunk: text_offset runs on from chunk to chunk."""

    piece: Callable[[int], bytes]  # for the prompt's first token, which has no logprob entry
    offset: int = 0

    def write(self, entries: Sequence[TokenLogprob | None], first_token: int | None = None) -> CompletionLogprobs:
        out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for e in entries:
            text = token_text(e.piece if e is not None else self.piece(first_token or 0))
            out.tokens.append(text)
            out.text_offset.append(self.offset)
            self.offset += len(text)
            if e is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(e.logprob)
            top = {token_text(t.piece): t.logprob for t in e.top}
            top.setdefault(text, e.logprob)  # the sampled token is always there (OpenAI: up to logprobs + 1)
            out.top_logprobs.append(top)
        return out


class ModelObject(WireModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    meta: ModelCard


class ModelList(WireModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class Tokens(WireModel):
    tokens: list[int]


class Text(WireModel):
    text: str


class VllmTokenizeResponse(WireModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class VllmDetokenizeResponse(WireModel):
    prompt: str


class TokenizerInfo(WireModel):
    """vLLM's GET /tokenizer_info (what tokenizer_config.json says), so a client can tokenize and apply the chat
    template without downloading the tokenizer."""

    tokenizer_class: str
    bos_token: str | None
    eos_token: str | None
    unk_token: str | None
    pad_token: str | None
    add_bos_token: bool
    chat_template: str | None
    model_max_length: int
    vocab_size: int
