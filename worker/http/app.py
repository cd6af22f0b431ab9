"""The aiohttp application: state under web.AppKey; the runtime and the pool duties live in cleanup_ctx."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

from aiohttp import HttpVersion11, web

from worker import runtime
from worker.config import Settings
from worker.engine.outputs import StopReason
from worker.exit_codes import ExitCode
from worker.http import openapi, routes_anthropic, routes_native, routes_openai, routes_ops, routes_responses
from worker.http.auth import bearer_auth, check_auth
from worker.http.cors import Cors
from worker.http.errors import ApiError, error_response, json_errors, request_style
from worker.http.server import read_body_in_time
from worker.http.state import METRICS, SETTINGS, STATE, WorkerState
from worker.http.tokenizing import TOKENIZERS, TokenizerPool
from worker.llamacpp import ModelLoadError
from worker.llamacpp.draft import DraftMismatch
from worker.metrics import Metrics
from worker.models.errors import ModelResolveError
from worker.narration import narrate
from worker.pool import announce_ready, heartbeat
from worker.runtime import BackendUnavailable, placement

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

async def _runtime_lifecycle(app: web.Application) -> AsyncIterator[None]:
    """Load the model off the loop (the app serves /health and progress meanwhile); close it at cleanup."""
    state, settings, metrics = app[STATE], app[SETTINGS], app[METRICS]
    loop = asyncio.get_running_loop()

    def progress(stage: str, value: float, **extra: Any) -> None:
        loop.call_soon_threadsafe(state.publish, {"type": "progress", "stage": stage,
                                                  "progress": round(value, 3), **extra})

    async def load() -> None:
        try:
            where = placement(settings)
            state.backend, state.device = where.backend, where.device
            state.runtime = await asyncio.to_thread(runtime.load, settings, where, metrics, loop, progress)
        except (ModelResolveError, ModelLoadError, BackendUnavailable, DraftMismatch) as exc:
            state.status, state.error = "failed", str(exc)
            narrate("model_load_failed", f"The model could not be loaded: {exc}", level="error", reason=str(exc))
            state.stop(ExitCode.CONFIG if isinstance(exc, (BackendUnavailable, DraftMismatch)) else ExitCode.MODEL)
        except Exception as exc:  # an unexpected failure is still a load failure, reported, never a hang
            state.status, state.error = "failed", f"{type(exc).__name__}: {exc}"
            narrate("model_load_failed", f"The model could not be loaded: {state.error}", level="error",
                    reason=state.error)
            state.stop(ExitCode.MODEL)
        else:
            if state.status == "loading":
                state.status = "ready"
                state.publish({"type": "progress", "stage": "ready", "progress": 1.0})
                state.ready.set()
        state.publish(state.final_event())

    task = asyncio.create_task(load())
    yield
    await asyncio.shield(task)  # a load in progress cannot be interrupted: let it end, then free it
    if state.runtime is not None:
        await asyncio.to_thread(state.runtime.close)


async def _pool_duties(state: WorkerState, settings: Settings) -> None:
    """Once ready: the callback (a failure stops the worker with exit 4), then heartbeats until stopped."""
    await state.ready.wait()
    assert state.url is not None and state.runtime is not None
    if settings.callback_url:
        rt = state.runtime
        payload = {
            "worker_id": settings.worker_id,
            "url": state.url,
            "model_ref": rt.model.info.ref,
            "model": rt.model.info.public(),
            "backend": rt.placement.backend,
            "device": rt.placement.device,
            "vram_bytes": rt.vram_bytes,
            "slots": settings.parallel,
        }
        if not await announce_ready(settings.callback_url, payload, timeout=settings.callback_timeout):
            state.stop(ExitCode.CALLBACK)
            return
    if settings.heartbeat_url:
        def snapshot() -> dict[str, Any]:
            engine = state.engine
            return {"worker_id": settings.worker_id, "state": state.status,
                    "running": engine.busy if engine else 0, "waiting": engine.waiting if engine else 0}

        await heartbeat(settings.heartbeat_url, settings.heartbeat_interval, snapshot)


async def _pool_lifecycle(app: web.Application) -> AsyncIterator[None]:
    """The pool manager's callback and heartbeats run for as long as the app does."""
    task = asyncio.create_task(_pool_duties(app[STATE], app[SETTINGS]))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def drain(app: web.Application, timeout: float) -> None:
    """New requests get 503; running ones may finish up to `timeout`, then they are cancelled and their streams
    given the time to write their end. Called before AppRunner.cleanup(), not from on_shutdown: aiohttp closes the
    listening sockets before on_shutdown runs, and the contract promises 503s and a `draining` /health meanwhile."""
    state = app[STATE]
    engine = state.engine
    if engine is None:
        return
    state.status = "draining"
    engine.drain()
    try:
        await asyncio.wait_for(engine.wait_idle(), timeout)
    except asyncio.TimeoutError:
        engine.cancel_all(StopReason.CANCELLED)
        with contextlib.suppress(asyncio.TimeoutError):  # cancelled streams end within a step
            await asyncio.wait_for(engine.wait_idle(), 2.0)
    await asyncio.sleep(0.05)  # let the handlers flush their last events


async def _close_tokenizers(app: web.Application) -> None:
    app[TOKENIZERS].close()


@web.middleware
async def count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """requests_total{route,code}, request_duration_seconds{route}, errors_total{code} for answered errors."""
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except asyncio.CancelledError:
        status = 499  # the client went away
        raise
    finally:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        m = request.app[METRICS]
        m.requests.labels(route=route, code=str(status)).inc()
        m.request_duration.labels(route=route).observe(time.perf_counter() - started)
        if "error_code" in request:
            m.errors.labels(code=request["error_code"]).inc()


@web.middleware
async def correlation_id(request: web.Request, handler: Handler) -> web.StreamResponse:
    cid = request.headers.get("X-Correlation-Id") or uuid.uuid4().hex
    request["correlation_id"] = cid
    response = await handler(request)
    if not response.prepared:  # a stream sets it before its headers go out
        response.headers.setdefault("X-Correlation-Id", cid)
    return response


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """An `Expect:` header, before any middleware runs: `100-continue` invites the body only when the request
    passes auth and its declared length fits (else 401 / 413 / 400 at once, so the body is never sent); any other
    expectation is 417. All in the contract's JSON shape (aiohttp's own answers are text)."""
    if request.version != HttpVersion11:
        return None
    expect = request.headers.get("Expect", "")
    style = request_style(request)
    settings = request.app[SETTINGS]
    try:
        if expect.lower() != "100-continue":
            raise ApiError(417, "expectation_failed", f"unsupported Expect header: {expect[:100]!r}")
        check_auth(request, settings.api_token or None)
        if request.content_length is not None and request.content_length > settings.max_body_bytes:
            raise ApiError(413, "body_too_large", f"request body is larger than {settings.max_body_bytes} bytes")
    except ApiError as exc:
        response = error_response(style, exc.status, exc.code, exc.message, exc.headers, **exc.extra)
        response.force_close()  # the body may follow or not: the connection cannot be reused safely
        return response
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # the 100 is not the answer: the answer has not begun
    return None


def create_app(settings: Settings) -> web.Application:
    middlewares: list[Any] = [count_requests, correlation_id, json_errors]
    cors = Cors(settings.cors_origins) if settings.cors_origins else None
    if cors is not None:
        middlewares.append(cors.preflight)  # before auth: a preflight carries no credentials
    middlewares.append(bearer_auth(settings.api_token or None))
    middlewares.append(read_body_in_time)  # after auth: a body is read only for a request that may send one
    app = web.Application(middlewares=middlewares, client_max_size=settings.max_body_bytes)
    if cors is not None:
        app.on_response_prepare.append(cors.on_prepare)
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[STATE] = WorkerState(served_name=settings.served_model_name)
    app[TOKENIZERS] = TokenizerPool(settings.tokenizer_threads)
    app.on_cleanup.append(_close_tokenizers)
    app.cleanup_ctx.append(_runtime_lifecycle)
    app.cleanup_ctx.append(_pool_lifecycle)
    routes_native.setup(app)
    routes_ops.setup(app)
    routes_openai.setup(app)
    routes_responses.setup(app)
    routes_anthropic.setup(app)
    openapi.setup(app)
    for route in app.router.routes():
        # aiohttp takes an expect handler per route (add_route's expect_handler); every route gets the same.
        cast(Any, route)._expect_handler = expect_continue
    return app
