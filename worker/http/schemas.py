"""Request bodies, validated once; any problem is a 400 that names the field."""

from __future__ import annotations

import json
from typing import Annotated, Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from worker.engine.sampling import SamplingParams
from worker.http.errors import ApiError

M = TypeVar("M", bound=BaseModel)

JobId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,128}$")]


class InferenceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1)
    job_id: JobId | None = None
    max_tokens: int = Field(256, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stop: list[str] = Field(default_factory=list, max_length=4)
    seed: int | None = Field(None, ge=0)
    stream: bool = True
    narration: bool = False
    ignore_eos: bool = False

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
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
        )


async def read_json(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ApiError(400, "invalid_request", f"body is not valid JSON: {exc}") from None


def parse(model: type[M], body: Any) -> M:
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", "body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = err.get("loc", ())
        field = str(loc[0]) if loc else None
        if err.get("type") == "extra_forbidden":
            message = f"unknown field {field!r}"
        else:
            message = f"{'.'.join(str(p) for p in loc)}: {err['msg'].removeprefix('Value error, ')}"
        raise ApiError(400, "invalid_request", message, field=field) from None
