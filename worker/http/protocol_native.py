"""The native API's wire format: the request and every response and event, as pydantic models.

Requests are validated by these models, responses are built from them, and the OpenAPI document is generated from
them (worker/http/openapi.py), so the three cannot drift apart.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import MISSING, BaseModel, ConfigDict, Field, StringConstraints, field_validator

from worker.engine.outputs import Constraint, Failed, Finished, Narrated, Output, Started, StopReason, TokenText
from worker.engine.sampling import MinP, Penalty, RepetitionPenalty, SamplingParams, Seed, Temperature, TopK, TopP
from worker.http.errors import ApiError

DEFAULTS = SamplingParams()
JobId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,128}$")]


def grammar_constraint(grammar: str | None, json_schema: dict[str, Any] | None) -> tuple[Constraint, str] | None:
    """llama-server's `grammar` (GBNF) / `json_schema` fields as the engine's constraint, and the field it comes
    from; both at once is a 400."""
    if grammar is not None and json_schema is not None:
        raise ApiError(400, "invalid_request", "give 'grammar' or 'json_schema', not both", field="grammar")
    if grammar is not None:
        return Constraint("gbnf", grammar), "grammar"
    if json_schema is not None:
        return Constraint("json_schema", json.dumps(json_schema)), "json_schema"
    return None


class WireModel(BaseModel):
    """A response object: closed, every field present unless its default is MISSING (then only when set)."""

    model_config = ConfigDict(extra="forbid", json_schema_serialization_defaults_required=True)

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: Any) -> Any:
        schema = handler(core_schema)
        target = handler.resolve_ref_schema(schema)
        omitted = {name for name, f in cls.model_fields.items() if f.default is MISSING}
        if "required" in target:
            target["required"] = [name for name in target["required"] if name not in omitted]
        return schema


# ---- the request -------------------------------------------------------------------------------------------------


class InferenceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1)
    job_id: JobId | None = None
    max_tokens: int = Field(256, ge=1)
    temperature: Temperature = DEFAULTS.temperature
    top_p: TopP = DEFAULTS.top_p
    top_k: TopK = DEFAULTS.top_k
    min_p: MinP = DEFAULTS.min_p
    repetition_penalty: RepetitionPenalty = DEFAULTS.repetition_penalty
    presence_penalty: Penalty = DEFAULTS.presence_penalty
    frequency_penalty: Penalty = DEFAULTS.frequency_penalty
    stop: list[str] = Field(default_factory=list, max_length=4)
    seed: Seed | None = None
    stream: bool = True
    narration: bool = False
    ignore_eos: bool = False
    grammar: str | None = Field(None, min_length=1, description="a GBNF grammar the output must match (llama.cpp's "
                                "grammar syntax, as llama-server takes it)")
    json_schema: dict[str, Any] | None = Field(None, description="a JSON schema the output must match")
    speculative: bool = Field(True, description="false: never speculative decoding for this request (where the "
                              "worker runs it, --spec-type)")

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: list[str]) -> list[str]:
        for s in v:
            if not s:
                raise ValueError("stop strings must not be empty")
            if len(s.encode("utf-8")) > 100:
                raise ValueError("each stop string is at most 100 bytes")
        return v

    def sampling(self) -> SamplingParams:
        return SamplingParams.given(**self.model_dump())

    def constraint(self) -> tuple[Constraint, str] | None:
        return grammar_constraint(self.grammar, self.json_schema)


# ---- responses ---------------------------------------------------------------------------------------------------

WorkerStatus = Literal["loading", "ready", "draining", "failed"]


class ModelCard(WireModel):
    """The contract's model object."""

    ref: str
    architecture: str
    quantization: str
    n_params: int
    n_ctx_train: int
    n_vocab: int
    size_bytes: int
    format: Literal["gguf", "safetensors"]


class Slots(WireModel):
    total: int
    busy: int


class Queue(WireModel):
    waiting: int
    max: int


class Health(WireModel):
    status: WorkerStatus
    worker_id: str
    model: ModelCard | None
    backend: str
    device: str
    slots: Slots
    queue: Queue


class Ready(WireModel):
    ready: bool
    state: WorkerStatus
    model: ModelCard | MISSING = MISSING
    progress: float | MISSING = MISSING
    progress_url: str | MISSING = MISSING
    error: str | MISSING = MISSING


class EndFields(WireModel):
    job_id: str
    tokens_out: int
    prompt_tokens: int
    ttft_ms: float | None
    decode_time_ms: float
    tokens_per_sec: float
    stop_reason: StopReason
    cached_tokens: int
    stop_sequence_matched: str | MISSING = MISSING
    draft_tokens: int | MISSING = Field(MISSING, description="speculative decoding: tokens proposed")
    accepted_tokens: int | MISSING = Field(MISSING, description="of them, accepted by the model")
    acceptance_rate: float | MISSING = MISSING

    @classmethod
    def of(cls, end: Finished) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "job_id": end.job_id,
            "tokens_out": end.tokens_out,
            "prompt_tokens": end.prompt_tokens,
            "ttft_ms": round(end.ttft_s * 1000, 3) if end.ttft_s is not None else None,
            "decode_time_ms": round(end.decode_s * 1000, 3),
            "tokens_per_sec": round(end.tokens_per_sec, 2),
            "stop_reason": end.stop_reason,
            "cached_tokens": end.cached_tokens,
        }
        if end.stop_sequence is not None:
            fields["stop_sequence_matched"] = end.stop_sequence
        if end.acceptance_rate is not None:
            fields |= {"draft_tokens": end.draft_tokens, "accepted_tokens": end.accepted_tokens,
                       "acceptance_rate": round(end.acceptance_rate, 4)}
        return fields


class InferenceResult(EndFields):
    """The answer of `stream: false`."""

    text: str


class Cancelling(WireModel):
    job_id: str
    status: Literal["cancelling"] = "cancelling"


# ---- the events of a native stream (`event: <type>`, `data: <json>` whose object carries the type) ----------------


class StartedEvent(WireModel):
    type: Literal["started"] = "started"
    job_id: str
    model: str
    prompt_tokens: int
    started_at: str


class TokenEvent(WireModel):
    type: Literal["token"] = "token"
    t: str
    i: int


class NarrationEvent(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["narration"] = "narration"
    actor: str
    action: str
    human: str


class EndEvent(EndFields):
    type: Literal["end"] = "end"


class ErrorEvent(WireModel):
    type: Literal["error"] = "error"
    code: str
    message: str


NativeEvent = StartedEvent | TokenEvent | NarrationEvent | EndEvent | ErrorEvent


def native_event(out: Output, model_id: str) -> NativeEvent:
    """An engine output as the native stream's event."""
    if isinstance(out, TokenText):
        return TokenEvent(t=out.text, i=out.index)
    if isinstance(out, Started):
        return StartedEvent(job_id=out.job_id, model=model_id, prompt_tokens=out.prompt_tokens,
                            started_at=out.started_at.isoformat(timespec="milliseconds"))
    if isinstance(out, Finished):
        return EndEvent(**EndFields.of(out))
    if isinstance(out, Failed):
        return ErrorEvent(code=out.code, message=out.message)
    assert isinstance(out, Narrated)
    return NarrationEvent(**{**out.event, "type": "narration"})


# ---- /v1/loading/progress ----------------------------------------------------------------------------------------


class ProgressEvent(WireModel):
    type: Literal["progress"] = "progress"
    stage: str
    progress: float
    layers_loaded: int | MISSING = MISSING
    layers_total: int | MISSING = MISSING


class ReadyEvent(WireModel):
    type: Literal["ready"] = "ready"
    model: ModelCard | None


ProgressStreamEvent = ProgressEvent | ReadyEvent | ErrorEvent
