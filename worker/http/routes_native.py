"""The native API: /health, /v1/ready, POST /v1/inference (SSE or JSON), DELETE /v1/inference/{job_id}."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from aiohttp import web

from worker.engine.scheduler import Event, Job, SubmitError
from worker.http import sse
from worker.http.errors import ApiError
from worker.http.schemas import InferenceRequest, parse, read_json

routes = web.RouteTableDef()


def _state(request: web.Request):
    from worker.http.app import STATE  # the app module imports this one

    return request.app[STATE]


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    state = _state(request)
    engine, s = state.engine, state.settings
    return web.json_response({
        "status": state.status,
        "worker_id": s.worker_id,
        "model": state.model.info.public() if state.model else None,
        "backend": state.backend,
        "device": state.device,
        "slots": {"total": s.parallel, "busy": engine.busy if engine else 0},
        "queue": {"waiting": engine.waiting if engine else 0, "max": s.max_queue},
    })


@routes.get("/v1/ready")
async def ready(request: web.Request) -> web.Response:
    state = _state(request)
    if state.status == "ready" and state.model is not None:
        return web.json_response({"ready": True, "state": "ready", "model": state.model.info.public()})
    body: dict[str, Any] = {"ready": False, "state": state.status}
    if state.status == "loading":
        body.update(progress=round(state.load_progress, 3), progress_url="/v1/loading/progress")
    if state.error:
        body["error"] = state.error
    return web.json_response(body, status=503)


class Generation:
    """One submitted job seen from the event loop: its events arrive a step at a time."""

    def __init__(self, request: web.Request, req: InferenceRequest, prompt_tokens: list[int]) -> None:
        state = _state(request)
        self.engine = state.require_ready()
        self.events: asyncio.Queue[list[Event]] = asyncio.Queue()
        self.job = Job(
            job_id=req.job_id or f"job-{uuid.uuid4().hex}",
            prompt_tokens=prompt_tokens,
            params=req.sampling(),
            max_tokens=req.max_tokens,
            stop=tuple(req.stop),
            narration=req.narration,
            timeout=state.settings.request_timeout,
            deliver=self.events.put_nowait,
        )

    def submit(self) -> None:
        try:
            self.engine.submit(self.job)
        except SubmitError as exc:
            headers = {"Retry-After": "1"} if exc.status == 503 else None
            raise ApiError(exc.status, exc.code, str(exc), headers=headers) from None

    async def batches(self):
        """Yield this job's events a step's worth at a time, until its end or error event."""
        try:
            while True:
                batch = await self.events.get()
                while not self.events.empty():
                    batch.extend(self.events.get_nowait())
                yield batch
                if batch[-1]["type"] in ("end", "error"):
                    return
        finally:
            # The client went away (or writing failed): free the slot.
            if not self.job.done:
                self.engine.cancel(self.job.job_id)


async def prepare_generation(request: web.Request, req: InferenceRequest, prompt_tokens: list[int]) -> Generation:
    gen = Generation(request, req, prompt_tokens)
    limit = gen.engine.ctx_size
    if not prompt_tokens:
        raise ApiError(400, "invalid_request", "the prompt has no tokens", field="prompt")
    if len(prompt_tokens) + req.max_tokens > limit:
        raise ApiError(400, "context_length_exceeded",
                       f"prompt ({len(prompt_tokens)} tokens) + max_tokens ({req.max_tokens}) exceeds the context "
                       f"of {limit} tokens", prompt_tokens=len(prompt_tokens), n_ctx=limit)
    gen.submit()
    return gen


@routes.post("/v1/inference")
async def inference(request: web.Request) -> web.StreamResponse:
    state = _state(request)
    state.require_ready()
    req = parse(InferenceRequest, await read_json(request))
    assert state.model is not None
    tokens = await asyncio.to_thread(state.model.tokenize, req.prompt)
    gen = await prepare_generation(request, req, tokens)

    if not req.stream:
        text: list[str] = []
        end: Event | None = None
        async for batch in gen.batches():
            for ev in batch:
                if ev["type"] == "token":
                    text.append(ev["t"])
                elif ev["type"] in ("end", "error"):
                    end = ev
        assert end is not None
        if end["type"] == "error":
            raise ApiError(500, end["code"], end["message"], job_id=gen.job.job_id)
        return web.json_response({
            "job_id": gen.job.job_id,
            "text": "".join(text),
            **{k: end[k] for k in ("tokens_out", "prompt_tokens", "stop_reason", "ttft_ms", "decode_time_ms",
                                   "tokens_per_sec")},
            **({"stop_sequence_matched": end["stop_sequence_matched"]} if "stop_sequence_matched" in end else {}),
        })

    resp = web.StreamResponse(headers={**sse.SSE_HEADERS, "X-Correlation-Id": request["correlation_id"],
                                       "X-Job-Id": gen.job.job_id})
    await resp.prepare(request)
    async for batch in gen.batches():
        await resp.write(b"".join(sse.encode(ev) for ev in batch))
    await resp.write_eof()
    return resp


@routes.delete("/v1/inference/{job_id}")
async def cancel(request: web.Request) -> web.Response:
    engine = _state(request).require_ready()
    job_id = request.match_info["job_id"]
    if not engine.cancel(job_id):
        raise ApiError(404, "not_found", f"no running or waiting job {job_id!r}", job_id=job_id)
    return web.json_response({"job_id": job_id, "status": "cancelling"}, status=202)


def setup(app: web.Application) -> None:
    app.add_routes(routes)
