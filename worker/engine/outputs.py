"""What the engine takes and gives: jobs in, typed outputs out. No wire format and no HTTP status lives here."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any, Literal

import numpy as np

from worker.engine.sampling import SamplingParams

MAX_TOP_LOGPROBS = 20  # OpenAI's bound; each one costs a partial sort of the vocabulary per token


class StopReason(str, Enum):
    MAX_TOKENS = "max_tokens"
    EOS = "eos"
    STOP_SEQUENCE = "stop_sequence"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"


@dataclass(frozen=True)
class Started:
    """The job has a slot; its prompt is being decoded."""

    job_id: str
    prompt_tokens: int
    started_at: datetime
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


@dataclass(frozen=True)
class TopLogprob:
    token: int
    piece: bytes
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model (log-softmax of the raw logits: before penalties, temperature and
    any constraint), and the `top` most likely tokens at its position."""

    token: int
    piece: bytes
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class TokenText:
    """New text of a job (valid UTF-8; several tokens' worth when bytes of a character were held back)."""

    text: str
    index: int  # the index of the last generated token it comes from
    logprobs: tuple[TokenLogprob, ...] = ()  # the job asked for them: one per token this text completes


@dataclass(frozen=True)
class PromptLogprobs:
    """The prompt's own tokens' log-probabilities (echo), one per prompt token; the first has none. Comes after
    Started and before any TokenText."""

    tokens: tuple[TokenLogprob | None, ...]


@dataclass(frozen=True)
class Finished:
    """The job ended; `ttft_s` is None when no token was generated. Ended before a slot: `started` is False."""

    job_id: str
    stop_reason: StopReason
    tokens_out: int
    prompt_tokens: int
    ttft_s: float | None
    decode_s: float
    stop_sequence: str | None = None
    cached_tokens: int = 0
    draft_tokens: int = 0  # speculation: tokens proposed, and how many of them the model accepted
    accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else None

    @property
    def tokens_per_sec(self) -> float:
        return (self.tokens_out - 1) / self.decode_s if self.tokens_out > 1 and self.decode_s > 0 else 0.0


@dataclass(frozen=True)
class Failed:
    """The job ended with an error (a refused decode, a bug); other jobs go on."""

    code: str
    message: str


@dataclass(frozen=True)
class Narrated:
    """A narration event of this job, for a client that asked for them in its stream."""

    event: dict[str, Any]


Output = Started | PromptLogprobs | TokenText | Finished | Failed | Narrated
Deliver = Callable[[Sequence[Output]], None]


def is_last(output: Output) -> bool:
    return isinstance(output, (Finished, Failed))


@dataclass(frozen=True)
class Constraint:
    """The output is constrained token by token to a grammar (llguidance; the mask is applied on the CPU to this
    sequence alone). `source` is the JSON schema (JSON text), the Lark grammar (llguidance's syntax), the GBNF
    grammar or the regex. With a `trigger`, the text is free until the trigger appears in it; what follows the
    trigger must then match the grammar (the trigger itself is not part of it)."""

    kind: Literal["json_schema", "json_object", "lark", "gbnf", "regex"]
    source: str = ""
    trigger: str | None = None


def choice_job_id(request_id: str, index: int, choices: int) -> str:
    """The job of one choice of a request: the request's own id where it has one choice, else `<id>-<index>`, so
    that the request's id names all of them (EngineCore.cancel)."""
    return request_id if choices == 1 else f"{request_id}-{index}"


def is_choice_of(job_id: str, request_id: str) -> bool:
    head, sep, index = job_id.rpartition("-")
    return bool(sep) and head == request_id and index.isdigit()


@dataclass(eq=False)
class Job:
    """One generation request as the engine sees it."""

    job_id: str
    prompt_tokens: list[int]
    params: SamplingParams
    max_tokens: int
    deliver: Deliver  # runs on the event loop with this step's outputs of the job, in order
    stop: tuple[str, ...] = ()
    narration: bool = False
    ignore_eos: bool = False  # benchmarks: generate exactly max_tokens
    correlation_id: str | None = None
    timeout: float | None = None
    constraint: Constraint | None = None
    logprobs: int | None = None  # None: none; k >= 0: each sampled token's logprob and the top k at its position
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (echo); the prompt is computed afresh
    special_text: bool = False  # control tokens' text is part of the text (tool-call markup the caller parses)
    speculate: bool = True  # where the worker speculates, this job may (a request can opt out)
    submitted_at: float = field(default_factory=time.perf_counter)
    cancel_reason: StopReason | None = None  # set from the loop; read by the scheduler between steps
    done: bool = False

    @functools.cached_property
    def prompt_array(self) -> np.ndarray:
        """The prompt as int32, for the prefix cache's comparisons (made once, on the engine thread)."""
        return np.asarray(self.prompt_tokens, dtype=np.int32)

    @property
    def deadline(self) -> float | None:
        return None if self.timeout is None else self.submitted_at + self.timeout

    @property
    def reads_logits(self) -> bool:
        """Sampled from logits read on the CPU (a mask applied, logprobs taken), never by a chain in the graph."""
        return self.constraint is not None or self.logprobs is not None or self.prompt_logprobs is not None


class SubmitError(Exception):
    """The engine cannot take the job; `code` says why (the HTTP layer maps it to a status)."""

    code = "unavailable"


class Overloaded(SubmitError):
    code = "overloaded"


class Draining(SubmitError):
    code = "draining"


class DuplicateJob(SubmitError):
    code = "duplicate_job_id"


class ConstraintError(SubmitError):
    """The constraint cannot be enforced as given (a grammar error, a schema keyword llguidance does not
    implement); the message says which."""

    code = "invalid_constraint"
