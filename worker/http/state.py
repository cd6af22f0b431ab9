"""The app's resources, each under its web.AppKey: settings, metrics, and the worker's state (touched only on the
event loop)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from worker.config import Settings
from worker.engine.core import EngineCore
from worker.http.errors import ApiError
from worker.llamacpp import Model
from worker.metrics import Metrics
from worker.models.resolve import public_id
from worker.runtime import Runtime


@dataclass
class WorkerState:
    """Where the worker is in its life: loading, ready, draining or failed; the runtime once loaded."""

    status: str = "loading"  # loading | ready | draining | failed
    runtime: Runtime | None = None  # the model and its engine, once loaded
    backend: str = "cpu"
    device: str = "cpu"
    url: str | None = None  # where this worker listens, once it does
    error: str | None = None
    # The last loading progress event, and the /v1/loading/progress streams that want the next ones.
    progress: dict[str, Any] = field(default_factory=lambda: {"stage": "starting", "progress": 0.0})
    _watchers: list[asyncio.Queue[dict[str, Any]]] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    # Resolved with the process exit code when the worker should stop (a signal, or a failed load).
    stopped: asyncio.Future[int] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    served_name: str | None = None  # --served-model-name: the model's id for clients, instead of its own

    @property
    def model_id(self) -> str:
        """The model's id wherever clients see it (/v1/models, answers, the model object's ref): never a path."""
        if self.served_name:
            return self.served_name
        return public_id(self.model.info.ref) if self.model else ""

    def model_card(self) -> dict[str, Any] | None:
        """The contract's model object as clients see it (ref: the model's id)."""
        return {**self.model.info.public(), "ref": self.model_id} if self.model else None

    def stop(self, code: int) -> None:
        if not self.stopped.done():
            self.stopped.set_result(code)

    @property
    def engine(self) -> EngineCore | None:
        return self.runtime.engine if self.runtime else None

    @property
    def model(self) -> Model | None:
        return self.runtime.model if self.runtime else None

    def require_ready(self) -> Runtime:
        if self.status == "ready" and self.runtime is not None:
            return self.runtime
        if self.status == "loading":
            raise ApiError(503, "loading", "the model is still loading", headers={"Retry-After": "1"},
                           progress=round(self.progress["progress"], 3))
        if self.status == "draining":
            raise ApiError(503, "draining", "the worker is shutting down")
        raise ApiError(503, "failed", f"the model failed to load: {self.error}")

    # ---- loading progress ------------------------------------------------------------------------------------

    def publish(self, event: dict[str, Any]) -> None:
        """A progress, ready or error event for every /v1/loading/progress stream (on the loop)."""
        if event["type"] == "progress":
            self.progress = {k: v for k, v in event.items() if k != "type"}
        for queue in self._watchers:
            queue.put_nowait(event)

    def watch(self) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        queue.put_nowait({"type": "progress", **self.progress})
        if self.status != "loading":  # already over: the stream tells how it ended, then closes
            queue.put_nowait(self.final_event())
        else:
            self._watchers.append(queue)
        return queue

    def unwatch(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        if queue in self._watchers:
            self._watchers.remove(queue)

    def final_event(self) -> dict[str, Any]:
        if self.status == "failed":
            return {"type": "error", "code": "model_load_failed", "message": self.error or "unknown"}
        return {"type": "ready", "model": self.model_card()}


# One key per resource on the app.
SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
STATE = web.AppKey("state", WorkerState)
