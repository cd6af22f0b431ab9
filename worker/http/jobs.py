"""One job seen from the event loop: tokenized, checked against the context, submitted; then its outputs per step.

Every route that generates (native and OpenAI) goes through here: generation has one code path.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence

from aiohttp import web

from worker.engine.core import EngineCore
from worker.engine.outputs import Failed, Finished, Job, Output, Overloaded, SubmitError, TokenText, is_last
from worker.engine.sampling import SamplingParams
from worker.http import sse, tokenizing
from worker.http.errors import ApiError, submit_error
from worker.http.state import SETTINGS, STATE


class JobStream:
    """A handle on one job's outputs (llama.cpp server's response reader). Use as `async with stream:` around
    everything that serves it: however the block ends (a write to a closed connection, a cancelled handler, a bug)
    the job is cancelled at once unless it already ended, so its slot is free at the next step; a client that went
    away (ConnectionResetError) ends the block quietly."""

    def __init__(self, engine: EngineCore, job: Job, outputs: asyncio.Queue[Sequence[Output]]) -> None:
        self.engine, self.job, self._outputs = engine, job, outputs

    async def __aenter__(self) -> JobStream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> bool:
        if not self.job.done:
            self.engine.cancel(self.job.job_id)
        return exc_type is not None and issubclass(exc_type, ConnectionResetError)

    def sse_response(self, request: web.Request) -> web.StreamResponse:
        return web.StreamResponse(headers={**sse.SSE_HEADERS, "X-Correlation-Id": request["correlation_id"],
                                           "X-Job-Id": self.job.job_id})

    async def batches(self) -> AsyncIterator[list[Output]]:
        """This job's outputs a step's worth at a time, until its Finished or Failed."""
        while True:
            batch = list(await self._outputs.get())
            while not self._outputs.empty():
                batch.extend(self._outputs.get_nowait())
            yield batch
            if is_last(batch[-1]):
                return

    async def collect(self) -> tuple[str, Finished]:
        """Run to the end; the text and how it ended (a failure raises ApiError)."""
        text: list[str] = []
        last: Output | None = None
        async with self:
            async for batch in self.batches():
                for out in batch:
                    if isinstance(out, TokenText):
                        text.append(out.text)
                    elif is_last(out):
                        last = out
        if last is None:  # the client went away before the end
            raise ConnectionResetError("the client went away")
        if isinstance(last, Failed):
            raise ApiError(500, last.code, last.message, job_id=self.job.job_id)
        assert isinstance(last, Finished)
        return "".join(text), last


async def submit_job(
    request: web.Request,
    prompt: str | list[int],
    params: SamplingParams,
    *,
    max_tokens: int,
    stop: Sequence[str] = (),
    job_id: str | None = None,
    narration: bool = False,
    ignore_eos: bool = False,
    parse_special: bool = False,
) -> JobStream:
    """Refuse at once when the queue is full, tokenize (off the loop), refuse what cannot fit before it takes a
    slot, and submit."""
    state = request.app[STATE]
    runtime = state.require_ready()
    engine = runtime.engine
    # A flood must be refused cheaply: tokenizing costs far more than the check. The engine checks again, exactly,
    # at submit (others may have taken the room meanwhile).
    waiting = engine.queued()
    if waiting >= engine.max_queue:
        raise submit_error(Overloaded(f"{waiting} requests are waiting; the queue holds {engine.max_queue}"))
    limit = engine.ctx_size
    if isinstance(prompt, str):
        # Tokenized only until it is known to be longer than the context: it is refused for what is known of it.
        tokens = await tokenizing.tokenize(request, prompt, parse_special=parse_special, limit=limit)
    else:
        tokens = list(prompt)
    if not tokens:
        raise ApiError(400, "invalid_request", "the prompt has no tokens", field="prompt")
    if len(tokens) + max_tokens > limit:
        known = f"at least {len(tokens)}" if isinstance(prompt, str) and len(tokens) > limit else len(tokens)
        raise ApiError(400, "context_length_exceeded",
                       f"prompt ({known} tokens) + max_tokens ({max_tokens}) exceeds the context "
                       f"of {limit} tokens", prompt_tokens=len(tokens), n_ctx=limit)
    outputs: asyncio.Queue[Sequence[Output]] = asyncio.Queue()
    job = Job(
        job_id=job_id or f"job-{uuid.uuid4().hex}",
        prompt_tokens=tokens,
        params=params,
        max_tokens=max_tokens,
        stop=tuple(stop),
        narration=narration,
        ignore_eos=ignore_eos,
        correlation_id=request.get("correlation_id"),
        timeout=request.app[SETTINGS].request_timeout,
        deliver=outputs.put_nowait,
    )
    try:
        engine.submit(job)
    except SubmitError as exc:
        raise submit_error(exc) from None
    request["job_id"] = job.job_id  # for what the connection narrates about this request
    return JobStream(engine, job, outputs)
