"""Anthropic's Messages API (POST /v1/messages, POST /v1/messages/count_tokens) as pydantic models, and its
translation onto the chat path.

Content blocks in: `text`, `tool_use` (an assistant's call), `tool_result` (a user turn's answer to one), `thinking`
and `redacted_thinking` (accepted and dropped: chat templates do not show earlier reasoning to the model). Images,
documents and server tools are refused by name. Blocks keep fields this worker does not read (`cache_control`,
`citations`): clients send back what they were given.
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, field_validator

from worker.engine.outputs import Constraint
from worker.engine.sampling import MinP, OpenAISeed, OpenAITopP, Penalty, RepetitionPenalty, SamplingParams, TopK
from worker.http.chat_path import ChatInputs
from worker.http.errors import ApiError
from worker.http.protocol_native import WireModel
from worker.http.protocol_openai import SAMPLING_FIELDS, StopField, Strict, neutral_only

# ---- requests ----------------------------------------------------------------------------------------------------


class _Block(Strict):
    model_config = ConfigDict(extra="ignore", strict=True)


class TextIn(_Block):
    type: Literal["text"]
    text: str


class ToolUseIn(_Block):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultIn(_Block):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextIn] = ""
    is_error: bool | None = None

    def text(self) -> str:
        text = self.content if isinstance(self.content, str) else "".join(b.text for b in self.content)
        return f"Error: {text}" if self.is_error else text


class ThinkingIn(_Block):
    type: Literal["thinking", "redacted_thinking"]


BlockIn = Annotated[TextIn | ToolUseIn | ToolResultIn | ThinkingIn, Field(discriminator="type")]
_BLOCKS = ("text", "tool_use", "tool_result", "thinking", "redacted_thinking")


class MessageIn(Strict):
    role: Literal["user", "assistant"]
    content: str | list[BlockIn]

    @field_validator("content", mode="before")
    @classmethod
    def _known_blocks(cls, v: Any) -> Any:
        for i, block in enumerate(v if isinstance(v, list) else []):
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            if kind not in _BLOCKS:
                raise ValueError(f"block {i} is {kind!r}; this worker takes {', '.join(_BLOCKS)} blocks")
        return v


class ToolIn(Strict):
    model_config = ConfigDict(extra="ignore", strict=True)  # cache_control
    type: Literal["custom"] | None = None
    name: str
    description: str | None = None
    input_schema: dict[str, Any] = Field(description="a JSON schema; the call's input is constrained to it")


class ToolChoiceAuto(Strict):
    type: Literal["auto"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceAny(Strict):
    type: Literal["any"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceTool(Strict):
    type: Literal["tool"]
    name: str
    disable_parallel_tool_use: bool | None = None


class ToolChoiceNone(Strict):
    type: Literal["none"]


ToolChoice = Annotated[ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone, Field(discriminator="type")]


class ThinkingEnabled(Strict):
    type: Literal["enabled"]
    budget_tokens: int = Field(ge=1, description="accepted; the thinking is as long as the model makes it")


class ThinkingDisabled(Strict):
    type: Literal["disabled"]


Thinking = Annotated[ThinkingEnabled | ThinkingDisabled, Field(discriminator="type")]


class SystemText(_Block):
    type: Literal["text"]
    text: str


class JsonOutputFormat(Strict):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(Strict):
    format: JsonOutputFormat | None = Field(None, description="structured output: the answer is constrained to the "
                                            "schema")
    effort: str | None = None  # accepted and ignored: a local model has no effort setting


class CountTokensRequest(Strict):
    """What decides the prompt: POST /v1/messages/count_tokens takes this much."""

    model: str
    messages: list[MessageIn] = Field(min_length=1)
    system: str | list[SystemText] | None = None
    tools: list[ToolIn] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = Field(None, description="enabled / disabled: the chat template's enable_thinking "
                                      "(Qwen 3); left out: the template's default")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="the worker's extra: more variables for the chat template")

    @field_validator("tools", mode="before")
    @classmethod
    def _custom_tools(cls, v: Any) -> Any:
        for i, tool in enumerate(v if isinstance(v, list) else []):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind not in (None, "custom"):
                raise ValueError(f"tool {i} is of type {kind!r}; this worker runs no server tools, only custom "
                                 "tools (name, description, input_schema)")
        return v

    def _prefilled(self) -> MessageIn | None:
        """A last assistant turn without tool_use is Anthropic's prefill: the answer continues its text (and does
        not repeat it)."""
        last = self.messages[-1]
        if last.role != "assistant" or (not isinstance(last.content, str)
                                        and any(isinstance(b, ToolUseIn) for b in last.content)):
            return None
        return last

    def prefill(self) -> str:
        last = self._prefilled()
        if last is None:
            return ""
        return last.content if isinstance(last.content, str) else "".join(
            b.text for b in last.content if isinstance(b, TextIn))

    def messages_for_template(self) -> list[dict[str, Any]]:
        """The conversation as OpenAI chat messages: each tool_result a tool message, each tool_use an assistant
        message's tool call, thinking blocks dropped; a prefilled last assistant turn is left out (`prefill`)."""
        out: list[dict[str, Any]] = []
        if self.system is not None:
            text = self.system if isinstance(self.system, str) else "\n".join(b.text for b in self.system)
            out.append({"role": "system", "content": text})
        names: dict[str, str] = {}
        turns = self.messages[:-1] if self._prefilled() is not None else self.messages
        for message in turns:
            blocks = [TextIn(type="text", text=message.content)] if isinstance(message.content, str) \
                else message.content
            if message.role == "assistant":
                texts = [b.text for b in blocks if isinstance(b, TextIn)]
                calls = [{"id": b.id, "type": "function", "function": {"name": b.name, "arguments": json.dumps(
                    b.input, ensure_ascii=False)}} for b in blocks if isinstance(b, ToolUseIn)]
                names.update((b.id, b.name) for b in blocks if isinstance(b, ToolUseIn))
                turn: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
                if calls:
                    turn["tool_calls"] = calls
                out.append(turn)
                continue
            pending: list[str] = []
            for block in blocks:
                if isinstance(block, ToolUseIn):
                    raise ApiError(400, "invalid_request", "tool_use blocks belong to assistant messages",
                                   field="messages")
                if isinstance(block, ToolResultIn):
                    if pending:
                        out.append({"role": "user", "content": "".join(pending)})
                        pending = []
                    result: dict[str, Any] = {"role": "tool", "tool_call_id": block.tool_use_id,
                                              "content": block.text()}
                    if block.tool_use_id in names:
                        result["name"] = names[block.tool_use_id]
                    out.append(result)
                elif isinstance(block, TextIn):
                    pending.append(block.text)
            if pending or not blocks:
                out.append({"role": "user", "content": "".join(pending)})
        return out

    def tool_inputs(self) -> tuple[list[dict[str, Any]] | None, str | dict[str, Any] | None, bool]:
        """tools, tool_choice and parallel_tool_calls in OpenAI chat's terms (any = required)."""
        tools = [{"type": "function", "function": {
            "name": t.name, "parameters": t.input_schema, **({"description": t.description} if t.description else {})}}
            for t in self.tools] if self.tools else None
        choice = self.tool_choice
        parallel = not (choice is not None and not isinstance(choice, ToolChoiceNone)
                        and choice.disable_parallel_tool_use)
        if choice is None:
            return tools, None, parallel
        if isinstance(choice, ToolChoiceTool):
            return tools, {"type": "function", "function": {"name": choice.name}}, parallel
        return tools, {"auto": "auto", "any": "required", "none": "none"}[choice.type], parallel

    def template_kwargs(self) -> dict[str, Any] | None:
        kwargs = dict(self.chat_template_kwargs or {})
        if self.thinking is not None:
            kwargs.setdefault("enable_thinking", self.thinking.type == "enabled")
        return kwargs or None

    def chat_inputs(self, sampling: SamplingParams | None = None, **more: Any) -> ChatInputs:
        tools, tool_choice, parallel = self.tool_inputs()
        return ChatInputs(messages=self.messages_for_template(), sampling=[sampling or SamplingParams()],
                          tools=tools, tool_choice=tool_choice, parallel_tool_calls=parallel,
                          template_kwargs=self.template_kwargs(), continue_with=self.prefill(), **more)


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: StopField = Field(None, validate_default=True)
    stream: bool | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="Anthropic's range is 0 to 1; up to 2 "
                                      "is taken")
    top_p: OpenAITopP | None = None
    top_k: TopK | None = None
    output_config: OutputConfig | None = None
    # Accepted and ignored: they change nothing about the text.
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    cache_control: dict[str, Any] | None = None  # the prefix cache is automatic
    inference_geo: str | None = None
    speed: str | None = None
    diagnostics: dict[str, Any] | None = None
    user_profile_id: str | None = None
    workspace_id: str | None = None
    container: Any = neutral_only()
    mcp_servers: Any = neutral_only([])
    context_management: Any = neutral_only()
    # The worker's extras (extra_body in the SDK)
    min_p: MinP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: OpenAISeed | None = None
    speculative: bool | None = None

    @field_validator("stop_sequences")
    @classmethod
    def _stops(cls, v: Any) -> list[str]:
        stops = [] if v is None else v
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError("must be a list of strings")
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s or len(s.encode("utf-8")) > 100 for s in stops):
            raise ValueError("each stop sequence is 1 to 100 bytes")
        return stops

    def sampling(self) -> SamplingParams:
        return SamplingParams.given(**self.model_dump(include=SAMPLING_FIELDS))

    def constraint(self) -> tuple[Constraint, str] | None:
        fmt = self.output_config.format if self.output_config is not None else None
        return (Constraint("json_schema", json.dumps(fmt.schema_)), "output_config.format") if fmt else None

    def messages_chat_inputs(self) -> ChatInputs:
        return self.chat_inputs(self.sampling(), max_tokens=self.max_tokens, stop=self.stop_sequences,
                                response_format=self.constraint(), speculate=self.speculative is not False)


# ---- responses ---------------------------------------------------------------------------------------------------

StopReasonOut = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class TextBlock(WireModel):
    type: Literal["text"] = "text"
    text: str


class ThinkingBlock(WireModel):
    type: Literal["thinking"] = "thinking"
    thinking: str
    signature: str = ""  # always empty: a local model's thinking is not signed


class ToolUseBlock(WireModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


ContentBlock = Annotated[TextBlock | ThinkingBlock | ToolUseBlock, Field(discriminator="type")]


class AnthropicUsage(WireModel):
    input_tokens: int = Field(description="prompt tokens computed for this request (not read from the cache)")
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = Field(description="prompt tokens whose KV came from the prefix cache")


class AnthropicMessage(WireModel):
    id: str = Field(default_factory=lambda: f"msg_{uuid.uuid4().hex}")
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[ContentBlock] = Field(default_factory=list)
    stop_reason: StopReasonOut | None = None
    stop_sequence: str | None = None
    usage: AnthropicUsage


class TokenCount(WireModel):
    input_tokens: int


# ---- stream events: `event: <type>` + `data: {"type": <type>, ...}` ----------------------------------------------


class TextDelta(WireModel):
    type: Literal["text_delta"] = "text_delta"
    text: str


class ThinkingDelta(WireModel):
    type: Literal["thinking_delta"] = "thinking_delta"
    thinking: str


class InputJsonDelta(WireModel):
    type: Literal["input_json_delta"] = "input_json_delta"
    partial_json: str


BlockDeltaOut = Annotated[TextDelta | ThinkingDelta | InputJsonDelta, Field(discriminator="type")]


class MessageStart(WireModel):
    type: Literal["message_start"] = "message_start"
    message: AnthropicMessage


class ContentBlockStart(WireModel):
    type: Literal["content_block_start"] = "content_block_start"
    index: int
    content_block: ContentBlock


class ContentBlockDelta(WireModel):
    type: Literal["content_block_delta"] = "content_block_delta"
    index: int
    delta: BlockDeltaOut


class ContentBlockStop(WireModel):
    type: Literal["content_block_stop"] = "content_block_stop"
    index: int


class MessageDeltaBody(WireModel):
    stop_reason: StopReasonOut | None
    stop_sequence: str | None


class MessageDelta(WireModel):
    type: Literal["message_delta"] = "message_delta"
    delta: MessageDeltaBody
    usage: AnthropicUsage


class MessageStop(WireModel):
    type: Literal["message_stop"] = "message_stop"


class StreamErrorBody(WireModel):
    type: str
    message: str


class StreamError(WireModel):
    type: Literal["error"] = "error"
    error: StreamErrorBody


STREAM_EVENTS: tuple[type[WireModel], ...] = (MessageStart, ContentBlockStart, ContentBlockDelta, ContentBlockStop,
                                              MessageDelta, MessageStop, StreamError)
