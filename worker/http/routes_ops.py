"""Operators' routes: GET /metrics (Prometheus) and GET /v1/loading/progress (SSE)."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from worker.http import sse
from worker.http.state import METRICS, STATE

routes = web.RouteTableDef()


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


@routes.get("/v1/loading/progress")
async def loading_progress(request: web.Request) -> web.StreamResponse:
    """progress events while the model loads, then `ready` or `error`, then the stream ends."""
    if request.method == "HEAD":  # headers only: aiohttp would send a stream's body even to a HEAD request
        return web.Response(headers=sse.SSE_HEADERS)
    state = request.app[STATE]
    queue = state.watch()
    resp = web.StreamResponse(headers=sse.SSE_HEADERS)
    await resp.prepare(request)
    try:
        while True:
            event = await queue.get()
            await resp.write(sse.encode(event))
            if event["type"] in ("ready", "error"):
                break
    finally:
        state.unwatch(queue)
    await resp.write_eof()
    return resp


def setup(app: web.Application) -> None:
    app.add_routes(routes)
