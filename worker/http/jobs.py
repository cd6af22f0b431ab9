"""Jobs seen from the event loop: tokenized, checked against the context, submitted; then their outputs per step.

Every route that generates (native and OpenAI) goes through here: generation has one code path. One request may
run several jobs (a list of prompts, n > 1): they are submitted together and their outputs merged, each tagged with
its job's index (the choice index of an OpenAI answer).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from worker.engine.core import EngineCore
from worker.engine.outputs import (
    Constraint,
    ConstraintError,
    Failed,
    Finished,
    Job,
    Output,
    Overloaded,
    SubmitError,
    TokenText,
    is_choice_of,
    is_last,
)
from worker.engine.sampling import SamplingParams
from worker.http import tokenizing
from worker.http.errors import ApiError, failed_status, submit_error
from worker.http.state import SETTINGS, STATE


@dataclass
class JobResult:
    """What one job produced, gathered for a non-streamed answer."""

    text: str
    end: Finished
    outputs: list[Output] = field(default_factory=list)  # every output, in order (logprobs ride on them)


class JobStream:
    """A handle on the outputs of one request's jobs (llama.cpp server's response reader). Use as `async with
    stream:` around everything that serves it: however the block ends (a write to a closed connection, a cancelled
    handler, a bug) every job not yet ended is cancelled at once, so its slot is free at the next step; a client that
    went away (ConnectionResetError) ends the block quietly."""

    def __init__(self, engine: EngineCore, jobs: list[Job], outputs: asyncio.Queue[tuple[int, Sequence[Output]]]):
        self.engine, self.jobs, self._outputs = engine, jobs, outputs

    @property
    def job(self) -> Job:
        return self.jobs[0]

    async def __aenter__(self) -> JobStream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> bool:
        self.cancel()
        return exc_type is not None and issubclass(exc_type, ConnectionResetError)

    def cancel(self) -> None:
        for job in self.jobs:
            if not job.done:
                self.engine.cancel(job.job_id)

    def stream_headers(self, request: web.Request) -> dict[str, str]:
        """A stream's own headers (set before they go out: the middleware cannot add them to a prepared answer)."""
        return {"X-Correlation-Id": request["correlation_id"], "X-Job-Id": self.request_id}

    @property
    def request_id(self) -> str:
        """What DELETE /v1/inference/{id} cancels the whole request by: its one job's id, or the id its choices'
        jobs share (choice_job_id)."""
        first = self.job.job_id
        head = first.rpartition("-")[0]
        return head if len(self.jobs) > 1 and all(is_choice_of(j.job_id, head) for j in self.jobs) else first

    async def batches(self) -> AsyncIterator[list[tuple[int, Output]]]:
        """The jobs' outputs a step's worth at a time, each with its job's index, until every job has ended."""
        running = len(self.jobs)
        while running:
            batch: list[tuple[int, Output]] = []
            index, outs = await self._outputs.get()
            batch.extend((index, out) for out in outs)
            while not self._outputs.empty():
                index, outs = self._outputs.get_nowait()
                batch.extend((index, out) for out in outs)
            running -= sum(1 for _, out in batch if is_last(out))
            yield batch

    async def collect(self) -> list[JobResult]:
        """Run every job to its end; what each produced, in job order (a failure raises ApiError)."""
        texts: list[list[str]] = [[] for _ in self.jobs]
        outputs: list[list[Output]] = [[] for _ in self.jobs]
        last: dict[int, Output] = {}
        async with self:
            async for batch in self.batches():
                for index, out in batch:
                    outputs[index].append(out)
                    if isinstance(out, TokenText):
                        texts[index].append(out.text)
                    elif is_last(out):
                        last[index] = out
        if len(last) < len(self.jobs):  # the client went away before the end
            raise ConnectionResetError("the client went away")
        results = []
        for index, job in enumerate(self.jobs):
            end = last[index]
            if isinstance(end, Failed):
                raise ApiError(failed_status(end.code), end.code, end.message, job_id=job.job_id)
            assert isinstance(end, Finished)
            results.append(JobResult("".join(texts[index]), end, outputs[index]))
        return results


@dataclass(frozen=True)
class JobSpec:
    """One job of a request: its prompt (text, or token ids already checked against the vocabulary) and sampling."""

    prompt: str | list[int]
    params: SamplingParams
    job_id: str | None = None


async def submit_jobs(
    request: web.Request,
    specs: Sequence[JobSpec],
    *,
    max_tokens: int,
    stop: Sequence[str] = (),
    narration: bool = False,
    ignore_eos: bool = False,
    parse_special: bool = False,
    **job_options: Any,
) -> JobStream:
    """Refuse at once when the queue is full, tokenize (off the loop), refuse what cannot fit before it takes a
    slot, and submit every job, or none: a refusal of one cancels those already submitted."""
    state = request.app[STATE]
    runtime = state.require_ready()
    engine = runtime.engine
    # A flood must be refused cheaply: tokenizing costs far more than the check. The engine checks again, exactly,
    # at submit (others may have taken the room meanwhile).
    waiting = engine.queued()
    if waiting >= engine.max_queue:
        raise submit_error(Overloaded(f"{waiting} requests are waiting; the queue holds {engine.max_queue}"))
    prompts: list[list[int]] = []
    limit = engine.ctx_size
    for spec in specs:
        if isinstance(spec.prompt, str):
            # Tokenized only until it is known to be longer than the context: refused for what is known of it.
            tokens = await tokenizing.tokenize(request, spec.prompt, parse_special=parse_special, limit=limit)
        else:
            tokens = list(spec.prompt)
        if not tokens:
            raise ApiError(400, "invalid_request", "the prompt has no tokens", field="prompt")
        if len(tokens) + max_tokens > limit:
            known = f"at least {len(tokens)}" if isinstance(spec.prompt, str) and len(tokens) > limit \
                else len(tokens)
            raise ApiError(400, "context_length_exceeded",
                           f"prompt ({known} tokens) + max_tokens ({max_tokens}) exceeds the context "
                           f"of {limit} tokens", prompt_tokens=len(tokens), n_ctx=limit)
        prompts.append(tokens)
    outputs: asyncio.Queue[tuple[int, Sequence[Output]]] = asyncio.Queue()

    def deliver_to(index: int) -> Any:
        return lambda outs: outputs.put_nowait((index, outs))

    jobs = [
        Job(
            job_id=spec.job_id or f"job-{uuid.uuid4().hex}",
            prompt_tokens=tokens,
            params=spec.params,
            max_tokens=max_tokens,
            stop=tuple(stop),
            narration=narration,
            ignore_eos=ignore_eos,
            correlation_id=request.get("correlation_id"),
            timeout=request.app[SETTINGS].request_timeout,
            deliver=deliver_to(index),
            **job_options,
        )
        for index, (spec, tokens) in enumerate(zip(specs, prompts, strict=True))
    ]
    stream = JobStream(engine, [], outputs)
    try:
        for job in jobs:
            engine.submit(job)
            stream.jobs.append(job)
    except SubmitError as exc:
        stream.cancel()
        if isinstance(exc, Overloaded) and stream.jobs:  # the count included this request's own sequences
            exc = Overloaded(f"this request's {len(jobs)} sequences do not fit: the slots and the queue "
                             f"({engine.max_queue}) take {len(stream.jobs)} more now")
        raise submit_error(exc) from None
    # For what the connection narrates about this request (a dropped reader names its job).
    request["job_id"] = ",".join(job.job_id for job in stream.jobs)
    return stream


async def checked_constraint(request: web.Request, found: tuple[Constraint, str] | None) -> Constraint | None:
    """The request's constraint once the engine has compiled it (off the loop: a large schema takes a while), or a
    400 invalid_constraint naming the field and what cannot be enforced. Never accepted and then ignored."""
    if found is None:
        return None
    constraint, field_name = found
    engine = request.app[STATE].require_ready().engine
    try:
        await asyncio.to_thread(engine.check_constraint, constraint)
    except ConstraintError as exc:
        raise ApiError(400, exc.code, str(exc), field=field_name) from None
    return constraint


async def submit_job(request: web.Request, prompt: str | list[int], params: SamplingParams, *,
                     job_id: str | None = None, **options: Any) -> JobStream:
    """One job (the native route, and OpenAI requests of one choice)."""
    return await submit_jobs(request, [JobSpec(prompt, params, job_id)], **options)
