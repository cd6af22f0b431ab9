"""One generation seen from the event loop: tokenize, check the context, submit, then read events per step.

Every route that generates (native and OpenAI) goes through here: generation has one code path.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence

from aiohttp import web

from worker.engine.sampling import SamplingParams
from worker.engine.scheduler import Engine, Event, Job, SubmitError
from worker.http import sse
from worker.http.errors import ApiError
from worker.http.state import STATE


class Generation:
    """Use as `async with gen:` around everything that serves it. However the block ends (a write to a closed
    connection, a cancelled handler, a bug) the job is cancelled at once unless it already ended, so its slot is
    free at the next step; a client that went away (ConnectionResetError) ends the block quietly."""

    def __init__(self, engine: Engine, job: Job, events: asyncio.Queue[list[Event]]) -> None:
        self.engine, self.job, self.events = engine, job, events

    async def __aenter__(self) -> Generation:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> bool:
        if not self.job.done:
            self.engine.cancel(self.job.job_id)
        return exc_type is not None and issubclass(exc_type, ConnectionResetError)

    def sse_response(self, request: web.Request) -> web.StreamResponse:
        return web.StreamResponse(headers={**sse.SSE_HEADERS, "X-Correlation-Id": request["correlation_id"],
                                           "X-Job-Id": self.job.job_id})

    async def batches(self) -> AsyncIterator[list[Event]]:
        """Yield this job's events a step's worth at a time, until its end or error event."""
        while True:
            batch = await self.events.get()
            while not self.events.empty():
                batch.extend(self.events.get_nowait())
            yield batch
            if batch[-1]["type"] in ("end", "error"):
                return

    async def collect(self) -> tuple[str, Event]:
        """Run to the end; return the text and the end event (an error event raises ApiError)."""
        text: list[str] = []
        last: Event | None = None
        async with self:
            async for batch in self.batches():
                for ev in batch:
                    if ev["type"] == "token":
                        text.append(ev["t"])
                    elif ev["type"] in ("end", "error"):
                        last = ev
        if last is None:  # the client went away before the end
            raise ConnectionResetError("the client went away")
        if last["type"] == "error":
            raise ApiError(500, last["code"], last["message"], job_id=self.job.job_id)
        return "".join(text), last


async def start_generation(
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
) -> Generation:
    """Tokenize (off the loop), refuse what cannot fit before it takes a slot, and submit."""
    state = request.app[STATE]
    engine = state.require_ready()
    if isinstance(prompt, str):
        tokens = await asyncio.to_thread(engine.model.tokenize, prompt, parse_special=parse_special)
    else:
        tokens = list(prompt)
    if not tokens:
        raise ApiError(400, "invalid_request", "the prompt has no tokens", field="prompt")
    limit = engine.ctx_size
    if len(tokens) + max_tokens > limit:
        raise ApiError(400, "context_length_exceeded",
                       f"prompt ({len(tokens)} tokens) + max_tokens ({max_tokens}) exceeds the context "
                       f"of {limit} tokens", prompt_tokens=len(tokens), n_ctx=limit)
    events: asyncio.Queue[list[Event]] = asyncio.Queue()
    job = Job(
        job_id=job_id or f"job-{uuid.uuid4().hex}",
        prompt_tokens=tokens,
        params=params,
        max_tokens=max_tokens,
        stop=tuple(stop),
        narration=narration,
        ignore_eos=ignore_eos,
        correlation_id=request.get("correlation_id"),
        timeout=state.settings.request_timeout,
        deliver=events.put_nowait,
    )
    try:
        engine.submit(job)
    except SubmitError as exc:
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        raise ApiError(exc.status, exc.code, str(exc), headers=headers) from None
    return Generation(engine, job, events)
