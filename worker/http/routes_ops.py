"""Operators' routes: GET /metrics (Prometheus) and GET /v1/loading/progress (SSE)."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import TypeAdapter

from worker.http import sse
from worker.http.errors import ErrorStyle, add_routes
from worker.http.protocol_native import ErrorEvent, ProgressEvent, ProgressStreamEvent, ReadyEvent
from worker.http.routedoc import RouteDoc, StreamDoc, documented
from worker.http.sse import EventStream
from worker.http.state import METRICS, STATE

routes = web.RouteTableDef()

_PROGRESS_EVENT: TypeAdapter[Any] = TypeAdapter(ProgressStreamEvent)


@routes.get("/metrics")
@documented(RouteDoc("Prometheus metrics", "probes", ok_description="Prometheus text format",
                     ok_content={"text/plain": {"schema": {"type": "string"}}}))
async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


@routes.get("/v1/loading/progress")
@documented(RouteDoc("Loading progress as server-sent events: progress, then ready or error", "probes",
                     ok_description="progress events, then ready or error; then the stream ends",
                     stream=StreamDoc("`progress` events, then `ready` or `error`; then the stream ends", "named",
                                      (ProgressEvent, ReadyEvent, ErrorEvent))))
async def loading_progress(request: web.Request) -> web.StreamResponse:
    """progress events while the model loads, then `ready` or `error`, then the stream ends."""
    if request.method == "HEAD":  # headers only: aiohttp would send a stream's body even to a HEAD request
        return web.Response(headers=sse.SSE_HEADERS)
    state = request.app[STATE]
    queue = state.watch()
    events = EventStream(request)
    await events.open()
    try:
        while True:
            event = await queue.get()
            events.add_typed(_PROGRESS_EVENT.validate_python(event))
            await events.flush()
            if event["type"] in ("ready", "error"):
                break
    finally:
        state.unwatch(queue)
    return await events.close()


def setup(app: web.Application) -> None:
    add_routes(app, routes, ErrorStyle.NATIVE)
