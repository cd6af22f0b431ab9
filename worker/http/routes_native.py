"""The native API: /health, /v1/ready, POST /v1/inference (SSE or JSON), DELETE /v1/inference/{job_id}."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from worker.http import sse
from worker.http.errors import ApiError
from worker.http.generation import start_generation
from worker.http.schemas import InferenceRequest, parse, read_json
from worker.http.state import STATE, WorkerState

routes = web.RouteTableDef()


def _state(request: web.Request) -> WorkerState:
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
        body.update(progress=state.progress["progress"], progress_url="/v1/loading/progress")
    if state.error:
        body["error"] = state.error
    return web.json_response(body, status=503)


@routes.post("/v1/inference")
async def inference(request: web.Request) -> web.StreamResponse:
    _state(request).require_ready()
    req = parse(InferenceRequest, await read_json(request))
    gen = await start_generation(request, req.prompt, req.sampling(), max_tokens=req.max_tokens, stop=req.stop,
                                 job_id=req.job_id, narration=req.narration, ignore_eos=req.ignore_eos)

    if not req.stream:
        text, end = await gen.collect()
        return web.json_response({
            "job_id": gen.job.job_id,
            "text": text,
            **{k: end[k] for k in ("tokens_out", "prompt_tokens", "stop_reason", "ttft_ms", "decode_time_ms",
                                   "tokens_per_sec")},
            **({"stop_sequence_matched": end["stop_sequence_matched"]} if "stop_sequence_matched" in end else {}),
        })

    resp = gen.sse_response(request)
    async with gen:
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
