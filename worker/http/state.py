"""The worker's shared state, kept on the app under one web.AppKey."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiohttp import web

from worker.config import Settings
from worker.engine.llama import Model
from worker.engine.scheduler import Engine
from worker.http.errors import ApiError


@dataclass
class WorkerState:
    settings: Settings
    status: str = "loading"  # loading | ready | draining | failed
    engine: Engine | None = None
    model: Model | None = None
    backend: str = "cpu"
    device: str = "cpu"
    load_progress: float = 0.0
    error: str | None = None
    # Resolved with the process exit code when the worker should stop (a signal, or a failed load).
    stopped: asyncio.Future[int] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def stop(self, code: int) -> None:
        if not self.stopped.done():
            self.stopped.set_result(code)

    def require_ready(self) -> Engine:
        if self.status == "ready" and self.engine is not None:
            return self.engine
        if self.status == "loading":
            raise ApiError(503, "loading", "the model is still loading", headers={"Retry-After": "1"},
                           progress=round(self.load_progress, 3))
        if self.status == "draining":
            raise ApiError(503, "draining", "the worker is shutting down")
        raise ApiError(503, "failed", f"the model failed to load: {self.error}")


STATE = web.AppKey("state", WorkerState)
