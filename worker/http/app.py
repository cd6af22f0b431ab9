"""The aiohttp application: state under web.AppKey, the engine's lifecycle in cleanup_ctx."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from worker.config import Settings
from worker.engine.llama import Model, ModelLoadError, gpu_backend_name, gpu_memory_used
from worker.engine.scheduler import Engine
from worker.http import openapi, routes_native, routes_openai, routes_ops
from worker.http.auth import bearer_auth
from worker.http.errors import json_errors
from worker.http.state import STATE, WorkerState
from worker.models.resolve import ModelResolveError, resolve
from worker.narration import narrate

EXIT_OK, EXIT_CONFIG, EXIT_MODEL = 0, 2, 3


class BackendUnavailable(Exception):
    """The configured backend is not in this llama.cpp build (a configuration error, exit 2)."""


def _placement(settings: Settings) -> tuple[str, str, int]:
    """(backend, device, n_gpu_layers) from --backend, --device and --gpu-layers."""
    gpu = gpu_backend_name()
    if settings.backend == "cpu" or (settings.backend == "auto" and gpu is None):
        return "cpu", "cpu", 0
    if gpu is None or (settings.backend != "auto" and settings.backend != gpu):
        raise BackendUnavailable(
            f"--backend {settings.backend} was asked for, but this llama.cpp build has "
            f"{'no GPU backend' if gpu is None else 'the ' + gpu + ' backend'}; use --backend auto or cpu, "
            "or reinstall llama-cpp-python with CMAKE_ARGS for that backend"
        )
    layers = -1 if settings.gpu_layers == "all" else int(settings.gpu_layers)
    split = settings.tensor_split_values
    if split and sum(1 for share in split if share > 0) > 1:  # one model across several GPUs: name them all
        return gpu, f"{gpu}:" + ",".join(str(i) for i, share in enumerate(split) if share > 0), layers
    return gpu, f"{gpu}:{settings.device}", layers


def load_engine(state: WorkerState, loop: asyncio.AbstractEventLoop) -> None:
    """Resolve, load and warm up the model (runs off the event loop; progress goes to the loop)."""
    s = state.settings
    t0 = time.perf_counter()

    def progress(stage: str, value: float, **extra: Any) -> None:
        loop.call_soon_threadsafe(state.publish, {"type": "progress", "stage": stage,
                                                  "progress": round(value, 3), **extra})

    progress("resolve", 0.0)
    resolved = resolve(s.model, cache_dir=s.cache_dir, quantize=s.quantize)
    narrate("model_resolve", f"Model {resolved.ref} resolves to {resolved.path}.", target=resolved.ref,
            path=str(resolved.path), format=resolved.format)
    state.backend, state.device, layers = _placement(s)
    vram_before = gpu_memory_used()

    last = [-1.0]

    def on_weights(value: float) -> None:  # llama.cpp calls this per tensor: pass on whole percents only
        if value - last[0] >= 0.01 or value >= 1.0:
            last[0] = value
            progress("load_weights", 0.05 + 0.85 * value)

    progress("load_weights", 0.05)
    model = Model.load(resolved.path, ref=resolved.ref, fmt=resolved.format, gpu_layers=layers,
                       main_gpu=s.device, tensor_split=s.tensor_split_values, progress=on_weights)
    info = model.info
    narrate("gguf_metadata_loaded", f"{info.architecture} model, {info.quantization}, "
            f"{info.n_params / 1e6:.0f}M parameters, trained on {info.n_ctx_train} tokens of context.",
            target=resolved.ref, architecture=info.architecture, quantization=info.quantization,
            n_params=info.n_params, n_ctx_train=info.n_ctx_train, n_layers=info.n_layers,
            has_chat_template=info.chat_template is not None)
    narrate("gguf_tokenizer_extracted", f"Tokenizer with {info.n_vocab} tokens.", target=resolved.ref,
            vocab_size=info.n_vocab, bos=info.bos, eos=info.eos, unk=info.unk)
    try:
        progress("warmup", 0.9)
        ctx_size = s.ctx_size or min(info.n_ctx_train or 4096, 4096)
        backend_sampling = s.backend_sampling == "on" or (s.backend_sampling == "auto" and layers != 0
                                                          and state.backend != "cpu")
        engine = Engine(model, ctx_size=ctx_size, parallel=s.parallel, max_queue=s.max_queue,
                        batch_size=s.batch_size, threads=s.threads, threads_batch=s.threads_batch,
                        flash_attn=_flash_attn(s.flash_attn, offloaded=layers != 0 and state.backend != "cpu"),
                        backend_sampling=backend_sampling, metrics=state.metrics,
                        profile_path=str(s.profile_dir / "scheduler.prof") if s.profile_dir else None)
        engine.start(loop)
    except BaseException:
        model.close()
        raise
    # What this worker put on its GPU: weights, KV cache and compute buffers (0 on the CPU).
    vram_after = gpu_memory_used()
    state.vram_bytes = sum(max(0, vram_after.get(d, 0) - vram_before.get(d, 0)) for d in vram_after)
    load_s = time.perf_counter() - t0
    _bind_metrics(state, engine, load_s)
    state.model, state.engine = model, engine
    narrate("model_load_complete", f"Model ready on {state.device} in {load_s:.2f} s: "
            f"{s.parallel} slots of {ctx_size} tokens.", target=resolved.ref,
            duration_ms=round(load_s * 1000, 1), backend=state.backend, device=state.device,
            slots=s.parallel, ctx_size=ctx_size, backend_sampling=backend_sampling, vram_bytes=state.vram_bytes,
            cute="Ready to tell stories!")


def _flash_attn(setting: str, *, offloaded: bool) -> str:
    # auto = on with the GPU; off on the CPU, where llama.cpp's flash attention changed SmolLM2's greedy output
    # ("Hello! I'sure I'm not…" instead of "Hello! I'm here to help…", the output without it and llama-cpp-python's).
    if setting != "auto":
        return setting
    return "on" if offloaded else "off"


def _bind_metrics(state: WorkerState, engine: Engine, load_s: float) -> None:
    m, info = state.metrics, engine.model.info
    m.bind_engine(slots=engine.n_slots, running=lambda: engine.busy, waiting=lambda: engine.waiting,
                  kv_usage=engine.kv_usage)
    m.bind_device_memory()
    m.load_seconds.set(load_s)
    m.model_size.set(info.size_bytes)
    m.model_info.info({"model": info.ref, "architecture": info.architecture, "quantization": info.quantization,
                       "backend": state.backend, "device": state.device})


async def _engine_lifecycle(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    loop = asyncio.get_running_loop()

    async def load() -> None:
        try:
            await asyncio.to_thread(load_engine, state, loop)
        except (ModelResolveError, ModelLoadError, BackendUnavailable) as exc:
            state.status, state.error = "failed", str(exc)
            narrate("model_load_failed", f"The model could not be loaded: {exc}", level="error", reason=str(exc))
            state.stop(EXIT_CONFIG if isinstance(exc, BackendUnavailable) else EXIT_MODEL)
        except Exception as exc:  # an unexpected failure is still a load failure, reported, never a hang
            state.status, state.error = "failed", f"{type(exc).__name__}: {exc}"
            narrate("model_load_failed", f"The model could not be loaded: {state.error}", level="error",
                    reason=state.error)
            state.stop(EXIT_MODEL)
        else:
            if state.status == "loading":
                state.status = "ready"
                state.publish({"type": "progress", "stage": "ready", "progress": 1.0})
                state.ready.set()
        state.publish(state.final_event())

    task = asyncio.create_task(load())
    yield
    await asyncio.shield(task)  # a load in progress cannot be interrupted: let it end, then free it
    if state.engine is not None:
        await asyncio.to_thread(state.engine.close)
        st = state.engine.stats
        if st["steps"]:
            per_step = lambda key: st[key] / st["steps"] * 1000
            narrate("engine_stats", f"{st['steps']} decode steps, {per_step('step_s'):.2f} ms each: "
                    f"{per_step('queue_s'):.2f} ms queueing them (llama_decode), {per_step('wait_s'):.2f} ms waiting "
                    f"for their tokens.", actor="engine", steps=st["steps"], step_ms=round(per_step("step_s"), 3),
                    queue_ms=round(per_step("queue_s"), 3), wait_ms=round(per_step("wait_s"), 3),
                    llama_share=round((st["queue_s"] + st["wait_s"]) / st["step_s"], 3))
    if state.model is not None:
        state.model.close()


@web.middleware
async def count_requests(request: web.Request, handler):
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
        m = request.app[STATE].metrics
        m.requests.labels(route=route, code=str(status)).inc()
        m.request_duration.labels(route=route).observe(time.perf_counter() - started)
        if "error_code" in request:
            m.errors.labels(code=request["error_code"]).inc()


@web.middleware
async def correlation_id(request: web.Request, handler):
    cid = request.headers.get("X-Correlation-Id") or uuid.uuid4().hex
    request["correlation_id"] = cid
    response = await handler(request)
    if not response.prepared:  # a stream sets it before its headers go out
        response.headers.setdefault("X-Correlation-Id", cid)
    return response


def create_app(settings: Settings) -> web.Application:
    middlewares: list[Any] = [count_requests, correlation_id, json_errors]
    if settings.api_token:
        middlewares.append(bearer_auth(settings.api_token))
    app = web.Application(middlewares=middlewares, client_max_size=settings.max_body_bytes)
    app[STATE] = WorkerState(settings=settings)
    app.cleanup_ctx.append(_engine_lifecycle)
    routes_native.setup(app)
    routes_ops.setup(app)
    routes_openai.setup(app)
    openapi.setup(app)
    return app
