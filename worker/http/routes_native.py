"""The native API: /health, /v1/ready, POST /v1/inference (SSE or JSON), DELETE /v1/inference/{job_id}."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from worker.engine.outputs import Failed, Finished, Narrated, Output, Started, TokenText
from worker.http import sse
from worker.http.errors import ApiError
from worker.http.jobs import submit_job
from worker.http.schemas import InferenceRequest, parse, read_json
from worker.http.state import SETTINGS, STATE, WorkerState

routes = web.RouteTableDef()


def _state(request: web.Request) -> WorkerState:
    return request.app[STATE]


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    state = _state(request)
    engine, s = state.engine, request.app[SETTINGS]
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
        body.update(progress=state.progress["progress"], progress_url="/v1/loading/progress")
    if state.error:
        body["error"] = state.error
    return web.json_response(body, status=503)


def end_fields(end: Finished) -> dict[str, Any]:
    """The native `end` event's fields (and the non-streamed answer's)."""
    fields: dict[str, Any] = {
        "job_id": end.job_id,
        "tokens_out": end.tokens_out,
        "prompt_tokens": end.prompt_tokens,
        "ttft_ms": round(end.ttft_s * 1000, 3) if end.ttft_s is not None else None,
        "decode_time_ms": round(end.decode_s * 1000, 3),
        "tokens_per_sec": round(end.tokens_per_sec, 2),
        "stop_reason": end.stop_reason.value,
        "cached_tokens": end.cached_tokens,
    }
    if end.stop_sequence is not None:
        fields["stop_sequence_matched"] = end.stop_sequence
    return fields


def native_event(out: Output, model_ref: str) -> dict[str, Any]:
    """An engine output as the native stream's event object."""
    if isinstance(out, TokenText):
        return {"type": "token", "t": out.text, "i": out.index}
    if isinstance(out, Started):
        return {"type": "started", "job_id": out.job_id, "model": model_ref, "prompt_tokens": out.prompt_tokens,
                "started_at": out.started_at.isoformat(timespec="milliseconds")}
    if isinstance(out, Finished):
        return {"type": "end", **end_fields(out)}
    if isinstance(out, Failed):
        return {"type": "error", "code": out.code, "message": out.message}
    assert isinstance(out, Narrated)
    return {**out.event, "type": "narration"}


@routes.post("/v1/inference")
async def inference(request: web.Request) -> web.StreamResponse:
    runtime = _state(request).require_ready()
    req = parse(InferenceRequest, await read_json(request))
    job = await submit_job(request, req.prompt, req.sampling(), max_tokens=req.max_tokens, stop=req.stop,
                           job_id=req.job_id, narration=req.narration, ignore_eos=req.ignore_eos)

    if not req.stream:
        text, end = await job.collect()
        fields = end_fields(end)
        return web.json_response({"job_id": fields.pop("job_id"), "text": text, **fields})

    model_ref = runtime.model.info.ref
    resp = job.sse_response(request)
    async with job:
        await resp.prepare(request)
        async for batch in job.batches():
            await resp.write(b"".join(sse.encode(native_event(out, model_ref)) for out in batch))
        await resp.write_eof()
    return resp


@routes.delete("/v1/inference/{job_id}")
async def cancel(request: web.Request) -> web.Response:
    engine = _state(request).require_ready().engine
    job_id = request.match_info["job_id"]
    if not engine.cancel(job_id):
        raise ApiError(404, "not_found", f"no running or waiting job {job_id!r}", job_id=job_id)
    return web.json_response({"job_id": job_id, "status": "cancelling"}, status=202)


def setup(app: web.Application) -> None:
    app.add_routes(routes)
