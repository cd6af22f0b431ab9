"""Sampling parameters: their defaults and ranges, in one place for every API."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Annotated, Any

from pydantic import Field

# The ranges both APIs validate with. Where the OpenAI routes differ, it is to take what OpenAI's API takes.
Temperature = Annotated[float, Field(ge=0.0, le=2.0)]  # 0 = greedy
TopP = Annotated[float, Field(gt=0.0, le=1.0)]  # the native contract: (0, 1]
OpenAITopP = Annotated[float, Field(ge=0.0, le=1.0)]  # OpenAI's range; 0 keeps only the most likely token
TopK = Annotated[int, Field(ge=0)]  # 0 = off
MinP = Annotated[float, Field(ge=0.0, le=1.0)]
RepetitionPenalty = Annotated[float, Field(gt=0.0, le=2.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]  # presence and frequency
Seed = Annotated[int, Field(ge=0)]  # the native contract
OpenAISeed = int  # OpenAI takes any integer; the sampler reduces it modulo 2^32


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None  # None: a random seed per request

    @classmethod
    def given(cls, **values: Any) -> SamplingParams:
        """The fields a request set; None (not sent) takes the default."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names and v is not None})

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
