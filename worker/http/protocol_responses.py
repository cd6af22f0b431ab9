"""OpenAI's Responses API (POST /v1/responses) as pydantic models, and its translation onto the chat path.

Stateless: nothing is stored, so `store: true`, `previous_response_id`, `conversation` and `background: true` are
refused (400 naming the field); the client sends the whole conversation in `input` each time, as openai-agents does
with `store` unset. Input items are OpenAI's: messages (text parts), `function_call` and `function_call_output`
(a tool's result) and `reasoning` (accepted and dropped: chat templates do not show earlier reasoning to the model).
Items keep fields this worker does not read (ids, status): clients send back the items they were given.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, field_validator

from worker.engine.outputs import Constraint
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
from worker.http.protocol_native import WireModel
from worker.http.protocol_openai import SAMPLING_FIELDS, FunctionDefinition, JsonSchemaFormat, Strict, neutral_only

# ---- requests ----------------------------------------------------------------------------------------------------


class _Item(Strict):
    """An input item: fields this worker does not read (id, status, ...) are ignored, not refused."""

    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Item):
    type: Literal["input_text", "output_text"]
    text: str


class RefusalPart(_Item):
    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[TextPart | RefusalPart, Field(discriminator="type")]
_PARTS = ("input_text", "output_text", "refusal")


def _text_parts(v: Any) -> Any:
    """A string, or text parts; another part (an image, a file, audio) is refused by name."""
    if isinstance(v, list):
        for i, part in enumerate(v):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind not in _PARTS:
                raise ValueError(f"part {i} is {kind!r}; only text parts (input_text, output_text) are supported")
    return v


class MessageItem(_Item):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, v: Any) -> Any:
        return _text_parts(v)

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text if isinstance(p, TextPart) else p.refusal for p in self.content)


class FunctionCallItem(_Item):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str = Field(description="JSON text, as the model wrote it")


class FunctionCallOutputItem(_Item):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[TextPart] = Field(description="the tool's result: text, or text parts")

    @field_validator("output", mode="before")
    @classmethod
    def _parts(cls, v: Any) -> Any:
        return _text_parts(v)

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


class ReasoningItem(_Item):
    type: Literal["reasoning"]


InputItem = Annotated[MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem,
                      Field(discriminator="type")]
_ITEMS = ("message", "function_call", "function_call_output", "reasoning")


class FunctionTool(FunctionDefinition):
    """Chat's function definition, with its type beside it rather than around it."""

    type: Literal["function"]


class NamedFunctionChoice(Strict):
    type: Literal["function"]
    name: str


class FormatText(Strict):
    type: Literal["text"]


class FormatJsonObject(Strict):
    type: Literal["json_object"]


class FormatJsonSchema(JsonSchemaFormat):
    type: Literal["json_schema"]


TextFormat = Annotated[FormatText | FormatJsonObject | FormatJsonSchema, Field(discriminator="type")]


class TextConfig(Strict):
    format: TextFormat | None = None
    verbosity: Any = neutral_only("medium")


class ReasoningConfig(Strict):
    """Given to the chat template: `effort` as `reasoning_effort` (as vLLM does: gpt-oss templates read it), and
    `none` also as `enable_thinking: false` (Qwen 3). A template that reads neither reasons as it always does.
    Summaries are not written: a `reasoning` item's summary is empty."""

    model_config = ConfigDict(extra="ignore", strict=True)
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: str | None = None

    def template_kwargs(self) -> dict[str, Any]:
        if self.effort is None:
            return {}
        return {"reasoning_effort": self.effort, **({"enable_thinking": False} if self.effort == "none" else {})}


class ResponsesRequest(Strict):
    model: str | None = None
    input: str | list[InputItem] = Field(description="a user message's text, or input items")
    instructions: str | None = Field(None, description="a system message before the input")
    tools: list[FunctionTool] | None = Field(None, description="function tools only (built-in tools are refused)")
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool | None = Field(None, description="false: at most one call")
    text: TextConfig | None = Field(None, description="text.format: json_object or json_schema constrain the output")
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: Temperature | None = None
    top_p: OpenAITopP | None = None
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None  # include_obfuscation: nothing to pad
    # Stateful features: this worker stores nothing (refused unless neutral, with a message that says so).
    store: Any = neutral_only(False)
    previous_response_id: Any = neutral_only()
    conversation: Any = neutral_only()
    background: Any = neutral_only(False)
    prompt: Any = neutral_only()
    top_logprobs: Any = neutral_only(0)
    max_tool_calls: Any = neutral_only()
    context_management: Any = neutral_only()
    reasoning: ReasoningConfig | None = Field(None, description="effort: to the chat template (reasoning_effort)")
    # Accepted and ignored: they change nothing about the text.
    include: list[str] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    service_tier: str | None = None
    truncation: Any = neutral_only("disabled")  # auto would drop input items: refused, never done silently
    # The worker's extras, as on chat completions (extra_body in the SDK)
    top_k: TopK | None = None
    min_p: MinP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: OpenAISeed | None = None
    speculative: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="extra variables for the chat template (Qwen 3's enable_thinking: false)")

    @field_validator("input", mode="before")
    @classmethod
    def _items(cls, v: Any) -> Any:
        """A message may leave out its type (EasyInputMessage); an item type this worker cannot serve is named."""
        if not isinstance(v, list):
            return v
        out = []
        for i, item in enumerate(v):
            if isinstance(item, dict) and "type" not in item and "role" in item:
                item = {**item, "type": "message"}
            kind = item.get("type") if isinstance(item, dict) else None
            if kind not in _ITEMS:
                raise ValueError(f"item {i} is of type {kind!r}; this worker takes {', '.join(_ITEMS)} items "
                                 "(it stores nothing, so item_reference cannot be resolved)")
            out.append(item)
        return out

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools(cls, v: Any) -> Any:
        for i, tool in enumerate(v if isinstance(v, list) else []):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind != "function":
                raise ValueError(f"tool {i} is of type {kind!r}; this worker runs no built-in tools, only "
                                 "'function' tools")
        return v

    def check_supported(self) -> None:
        stateful = {"store": self.store is True, "previous_response_id": self.previous_response_id is not None,
                    "conversation": self.conversation is not None, "background": self.background is True}
        for name, asked in stateful.items():
            if asked:
                raise ApiError(400, "unsupported_parameter", f"'{name}' is not supported: this worker is stateless "
                               "and stores no responses; send the whole conversation in 'input'", field=name)
        super().check_supported()
        if self.text is not None:
            self.text.check_supported()

    def sampling(self) -> SamplingParams:
        return SamplingParams.given(**self.model_dump(include=SAMPLING_FIELDS))

    def constraint(self) -> tuple[Constraint, str] | None:
        fmt = self.text.format if self.text is not None else None
        if isinstance(fmt, FormatJsonObject):
            return Constraint("json_object"), "text.format"
        if isinstance(fmt, FormatJsonSchema):
            return Constraint("json_schema", json.dumps(fmt.schema_)), "text.format"
        return None

    def messages(self) -> list[dict[str, Any]]:
        """The input as OpenAI chat messages: instructions first as the system message, a run of function_call
        items as one assistant message's tool_calls, each function_call_output as a tool message."""
        out: list[dict[str, Any]] = []
        if self.instructions is not None:
            out.append({"role": "system", "content": self.instructions})
        if isinstance(self.input, str):
            return [*out, {"role": "user", "content": self.input}]
        names: dict[str, str] = {}
        for item in self.input:
            if isinstance(item, MessageItem):
                out.append({"role": "system" if item.role == "developer" else item.role, "content": item.text()})
            elif isinstance(item, FunctionCallItem):
                names[item.call_id] = item.name
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}
                last = out[-1] if out else None
                if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                    last["tool_calls"].append(call)
                elif last is not None and last["role"] == "assistant":  # its text, then its calls: one turn
                    last["tool_calls"] = [call]
                else:
                    out.append({"role": "assistant", "content": None, "tool_calls": [call]})
            elif isinstance(item, FunctionCallOutputItem):
                message = {"role": "tool", "tool_call_id": item.call_id, "content": item.text()}
                if item.call_id in names:
                    message["name"] = names[item.call_id]
                out.append(message)
        if not out or all(m["role"] == "system" for m in out):
            raise ApiError(400, "invalid_request", "input has no message to answer", field="input")
        return out

    def template_kwargs(self) -> dict[str, Any] | None:
        """The request's chat_template_kwargs win over what `reasoning` implies."""
        kwargs = {**(self.reasoning.template_kwargs() if self.reasoning else {}), **(self.chat_template_kwargs or {})}
        return kwargs or None

    def chat_inputs(self) -> ChatInputs:
        tool_choice: str | dict[str, Any] | None = (
            {"type": "function", "function": {"name": self.tool_choice.name}}
            if isinstance(self.tool_choice, NamedFunctionChoice) else self.tool_choice)
        tools = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                 for t in self.tools] if self.tools else None
        return ChatInputs(messages=self.messages(), sampling=[self.sampling()], tools=tools, tool_choice=tool_choice,
                          parallel_tool_calls=self.parallel_tool_calls is not False,
                          template_kwargs=self.template_kwargs(), response_format=self.constraint(),
                          max_tokens=self.max_output_tokens, speculate=self.speculative is not False)


# ---- responses ---------------------------------------------------------------------------------------------------

ItemStatus = Literal["in_progress", "completed", "incomplete"]


class ReasoningText(WireModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class ReasoningOut(WireModel):
    type: Literal["reasoning"] = "reasoning"
    id: str
    summary: list[Any] = Field(default_factory=list)
    content: list[ReasoningText]
    status: ItemStatus


class OutputText(WireModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class MessageOut(WireModel):
    type: Literal["message"] = "message"
    id: str
    role: Literal["assistant"] = "assistant"
    status: ItemStatus
    content: list[OutputText]


class FunctionCallItemOut(WireModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: ItemStatus


OutputItem = Annotated[ReasoningOut | MessageOut | FunctionCallItemOut, Field(discriminator="type")]
OutputPart = Annotated[OutputText | ReasoningText, Field(discriminator="type")]


class InputTokensDetails(WireModel):
    cached_tokens: int


class OutputTokensDetails(WireModel):
    reasoning_tokens: int


class ResponseUsage(WireModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(WireModel):
    reason: Literal["max_output_tokens"]


class ResponseError(WireModel):
    code: str
    message: str


class Response(WireModel):
    id: str = Field(default_factory=lambda: f"resp_{uuid.uuid4().hex}")
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None
    max_output_tokens: int | None
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    parallel_tool_calls: bool
    previous_response_id: None = None
    reasoning: dict[str, Any] = Field(default_factory=lambda: {"effort": None, "summary": None})
    store: Literal[False] = False
    temperature: float | None
    text: dict[str, Any]
    tool_choice: Any
    tools: list[Any]
    top_p: float | None
    truncation: Literal["auto", "disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)


# ---- stream events: `event: <type>` + `data: {..., "type": <type>, "sequence_number": n}` ------------------------


class ResponseEvent(WireModel):
    sequence_number: int = 0  # set by the writer, in order from 0


class ResponseCreated(ResponseEvent):
    type: Literal["response.created"] = "response.created"
    response: Response


class ResponseInProgress(ResponseEvent):
    type: Literal["response.in_progress"] = "response.in_progress"
    response: Response


class ResponseCompleted(ResponseEvent):
    type: Literal["response.completed"] = "response.completed"
    response: Response


class ResponseIncomplete(ResponseEvent):
    type: Literal["response.incomplete"] = "response.incomplete"
    response: Response


class ResponseFailed(ResponseEvent):
    type: Literal["response.failed"] = "response.failed"
    response: Response


class OutputItemAdded(ResponseEvent):
    type: Literal["response.output_item.added"] = "response.output_item.added"
    output_index: int
    item: OutputItem


class OutputItemDone(ResponseEvent):
    type: Literal["response.output_item.done"] = "response.output_item.done"
    output_index: int
    item: OutputItem


class ContentPartAdded(ResponseEvent):
    type: Literal["response.content_part.added"] = "response.content_part.added"
    item_id: str
    output_index: int
    content_index: int = 0
    part: OutputPart


class ContentPartDone(ResponseEvent):
    type: Literal["response.content_part.done"] = "response.content_part.done"
    item_id: str
    output_index: int
    content_index: int = 0
    part: OutputPart


class OutputTextDelta(ResponseEvent):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    item_id: str
    output_index: int
    content_index: int = 0
    delta: str
    logprobs: list[Any] = Field(default_factory=list)


class OutputTextDone(ResponseEvent):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    item_id: str
    output_index: int
    content_index: int = 0
    text: str
    logprobs: list[Any] = Field(default_factory=list)


class ReasoningTextDelta(ResponseEvent):
    type: Literal["response.reasoning_text.delta"] = "response.reasoning_text.delta"
    item_id: str
    output_index: int
    content_index: int = 0
    delta: str


class ReasoningTextDone(ResponseEvent):
    type: Literal["response.reasoning_text.done"] = "response.reasoning_text.done"
    item_id: str
    output_index: int
    content_index: int = 0
    text: str


class FunctionCallArgumentsDelta(ResponseEvent):
    type: Literal["response.function_call_arguments.delta"] = "response.function_call_arguments.delta"
    item_id: str
    output_index: int
    delta: str


class FunctionCallArgumentsDone(ResponseEvent):
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    item_id: str
    output_index: int
    name: str
    arguments: str


STREAM_EVENTS: tuple[type[WireModel], ...] = (
    ResponseCreated, ResponseInProgress, OutputItemAdded, ContentPartAdded, ReasoningTextDelta, ReasoningTextDone,
    OutputTextDelta, OutputTextDone, ContentPartDone, FunctionCallArgumentsDelta, FunctionCallArgumentsDone,
    OutputItemDone, ResponseCompleted, ResponseIncomplete, ResponseFailed)
