"""The native API: /health, /v1/ready, POST /v1/inference (SSE or JSON), DELETE /v1/inference/{job_id}."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel

from worker.http.errors import ApiError, ErrorStyle, add_routes
from worker.http.jobs import checked_constraint, submit_job
from worker.http.protocol_native import (
    Cancelling,
    EndEvent,
    EndFields,
    ErrorEvent,
    Health,
    InferenceRequest,
    InferenceResult,
    ModelCard,
    NarrationEvent,
    Queue,
    Ready,
    Slots,
    StartedEvent,
    TokenEvent,
    native_event,
)
from worker.http.routedoc import RouteDoc, StreamDoc, documented
from worker.http.schemas import parse, read_json
from worker.http.sse import EventStream
from worker.http.state import SETTINGS, STATE, WorkerState

routes = web.RouteTableDef()

__all__ = ["native_event", "setup"]


def _state(request: web.Request) -> WorkerState:
    return request.app[STATE]


def _json(body: BaseModel, status: int = 200) -> web.Response:
    return web.Response(body=body.model_dump_json(), status=status, content_type="application/json")


def _card(state: WorkerState) -> ModelCard | None:
    card = state.model_card()
    return ModelCard(**card) if card else None


@routes.get("/health")
@documented(RouteDoc("Liveness: the worker's state, model, slots and queue", "probes", ok=Health,
                     ok_description="while the process serves"))
async def health(request: web.Request) -> web.Response:
    state = _state(request)
    engine, s = state.engine, request.app[SETTINGS]
    return _json(Health(
        status=state.status,  # type: ignore[arg-type]
        worker_id=s.worker_id,
        model=_card(state),
        backend=state.backend,
        device=state.device,
        slots=Slots(total=s.parallel, busy=engine.busy if engine else 0),
        queue=Queue(waiting=engine.waiting if engine else 0, max=s.max_queue),
    ))


@routes.get("/v1/ready")
@documented(RouteDoc("Readiness: 200 once the model is loaded", "probes", ok=Ready, ok_description="ready",
                     not_ready=Ready))
async def ready(request: web.Request) -> web.Response:
    state = _state(request)
    card = _card(state)
    if state.status == "ready" and card is not None:
        return _json(Ready(ready=True, state="ready", model=card))
    fields: dict[str, Any] = {}
    if state.status == "loading":
        fields.update(progress=state.progress["progress"], progress_url="/v1/loading/progress")
    if state.error:
        fields["error"] = state.error
    return _json(Ready(ready=False, state=state.status, **fields), status=503)  # type: ignore[arg-type]


_NATIVE_STREAM = StreamDoc("`started`, `token`s (and `narration`s when asked), then `end` or `error`; each event's "
                           "data is a JSON object whose `type` is the event's name", "named",
                           (StartedEvent, TokenEvent, NarrationEvent, EndEvent, ErrorEvent))


@routes.post("/v1/inference")
@documented(RouteDoc("Generate: a token stream (SSE) or, with stream false, one JSON object", "native",
                     body=InferenceRequest, ok=InferenceResult, stream=_NATIVE_STREAM,
                     ok_description="the whole answer (stream false) or its event stream (stream true)",
                     errors=(400, 401, 413, 503, 409, 500)))
async def inference(request: web.Request) -> web.StreamResponse:
    _state(request).require_ready()
    req = parse(InferenceRequest, await read_json(request))
    constraint = await checked_constraint(request, req.constraint())
    job = await submit_job(request, req.prompt, req.sampling(), max_tokens=req.max_tokens, stop=req.stop,
                           job_id=req.job_id, narration=req.narration, ignore_eos=req.ignore_eos,
                           constraint=constraint, speculate=req.speculative)

    if not req.stream:
        [result] = await job.collect()
        return _json(InferenceResult(text=result.text, **EndFields.of(result.end)))

    model_id = _state(request).model_id
    events = EventStream(request, job.stream_headers(request))
    async with job:
        await events.open()
        async for batch in job.batches():
            for _, out in batch:
                events.add_typed(native_event(out, model_id))
            await events.flush()
        await events.close()
    return events.response


@routes.delete("/v1/inference/{job_id}")
@documented(RouteDoc("Cancel a running or waiting request; its stream ends with stop_reason cancelled", "native",
                     ok=Cancelling, ok_status=202, ok_description="cancelling", errors=(401, 404, 503),
                     path_parameters=("job_id",)))
async def cancel(request: web.Request) -> web.Response:
    engine = _state(request).require_ready().engine
    job_id = request.match_info["job_id"]
    if not engine.cancel(job_id):
        raise ApiError(404, "not_found", f"no running or waiting job {job_id!r}", job_id=job_id)
    return _json(Cancelling(job_id=job_id), status=202)


def setup(app: web.Application) -> None:
    add_routes(app, routes, ErrorStyle.NATIVE)
