"""The HTTP server's own guards against clients that hold connections without using them.

aiohttp's defaults suit a trusted network: a connection may take an hour to send its request head, a body may
trickle forever, there is no bound on connections, and a reader that stops reading keeps its response buffered
and its handler (and so its slot) for as long as it likes. Here:

- a request head must be complete within `--header-timeout` of the connection opening or its last answer
  (aiohttp's keep-alive timer, which already runs from the connection's start);
- a body must be whole within `--body-timeout` of its head (read_body_in_time, a middleware);
- at most `--max-connections` are open: a new one closes the oldest connection that is only waiting (for a head
  or between requests), and is refused with 503 when every connection is busy.
"""

from __future__ import annotations

import asyncio
import json
import resource
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from worker.http.errors import ApiError, JsonErrorProtocol
from worker.http.state import METRICS, SETTINGS
from worker.metrics import Metrics
from worker.narration import narrate

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# aiohttp reads (and drops) the rest of a body its handler did not read, for up to this long, so a client still
# sending gets its answer instead of a reset. Its default of 10 s would let a trickling body hold the connection.
LINGERING_S = 1.0


@dataclass(frozen=True)
class ConnectionPolicy:
    max_connections: int
    metrics: Metrics

    def closed(self, reason: str) -> None:
        self.metrics.connections_closed.labels(reason=reason).inc()


def _refusal(status: int, code: str, message: str) -> bytes:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = (f"HTTP/1.1 {status} Service Unavailable\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n")
    return head.encode() + body


class GuardedProtocol(JsonErrorProtocol):
    """One connection, with the cap and the header timeout's count."""

    def __init__(self, manager: Any, *, policy: ConnectionPolicy, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._policy = policy
        self.refused = False  # over the cap: answered 503, closing

    @property
    def waiting_for_request(self) -> bool:
        """Between requests or inside a head: nothing of this connection's is being handled or answered."""
        return not self._request_in_progress and not self._messages

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        manager = self._manager
        if manager is None:
            return
        others = [c for c in manager.connections if c is not self and not getattr(c, "refused", False)]
        if len(others) < self._policy.max_connections:
            return
        idle = next((c for c in others if isinstance(c, GuardedProtocol) and c.waiting_for_request), None)
        if idle is not None:  # the oldest connection that only waits makes room: slow heads cannot crowd others out
            self._policy.closed("evicted")
            idle.force_close()
            return
        self._policy.closed("over_capacity")
        self.refused = True
        refused = self.transport
        if refused is None:
            return
        # Nothing of this connection is read or handled; the 503 goes out, then the close a moment later (closing
        # with its request unread at once would reset the connection before the client reads the answer).
        refused.pause_reading()
        refused.write(_refusal(503, "overloaded", f"the worker has {self._policy.max_connections} connections "
                               "open, all busy"))
        if refused.can_write_eof():
            refused.write_eof()
        self._loop.call_later(LINGERING_S, self.force_close)

    def _process_keepalive(self) -> None:
        """aiohttp's keep-alive timer, armed at the connection's start and after each answer: here it is also the
        header timeout. Counted when it closes the connection."""
        was_open = self.transport is not None
        super()._process_keepalive()
        if was_open and self.transport is None:
            self._policy.closed("header_timeout")

class GuardedServer(web.Server):
    def __init__(self, *args: Any, policy: ConnectionPolicy, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.policy = policy

    def __call__(self) -> RequestHandler:
        return GuardedProtocol(self, loop=self._loop, policy=self.policy, **self._kwargs)


class WorkerRunner(web.AppRunner):
    """web.AppRunner with the guards above; the parser's own refusals answer in JSON (JsonErrorProtocol)."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        app = self._app
        assert app is not None
        settings = app[SETTINGS]
        policy = ConnectionPolicy(settings.max_connections, app[METRICS])
        guarded = GuardedServer(server.request_handler, request_factory=server.request_factory,
                                handler_cancellation=server.handler_cancellation,
                                loop=asyncio.get_running_loop(), policy=policy, **server._kwargs)
        app[METRICS].bind_connections(lambda: len(guarded.connections))
        return guarded


def runner_for(app: web.Application, **parser_limits: Any) -> WorkerRunner:
    settings = app[SETTINGS]
    # keepalive_timeout: aiohttp's timer from a connection's start (and from each answer's end) until a whole
    # request head has arrived: the header timeout, idle keep-alive connections included.
    # shutdown_timeout: after the drain, a handler still running (a body still trickling in, an answer its client
    # does not read) gets this long and is then cancelled; aiohttp's 60 s would hold the exit past --drain-timeout.
    return WorkerRunner(app, handler_cancellation=True, access_log=None, keepalive_timeout=settings.header_timeout,
                        lingering_time=LINGERING_S, shutdown_timeout=1.0, **parser_limits)


@web.middleware
async def read_body_in_time(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The whole body within --body-timeout of the head (request.read() keeps it for the route), else 408."""
    if request.body_exists:
        timeout = request.app[SETTINGS].body_timeout
        try:
            await asyncio.wait_for(request.read(), timeout)
        except asyncio.TimeoutError:
            request.app[METRICS].connections_closed.labels(reason="body_timeout").inc()
            raise ApiError(408, "body_timeout", f"the request body did not arrive within {timeout:g} s",
                           headers={"Connection": "close"}) from None
    return await handler(request)


def raise_open_files_limit(connections: int) -> None:
    """Each connection is a file descriptor: make room for the cap (and the model's files, llama.cpp's, logs)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        except (ValueError, OSError):
            new = soft
        if new < want:
            narrate("startup", f"The open-files limit is {new}: fewer than --max-connections {connections} plus "
                    "256 for the worker itself; connections past it will fail.", level="warning",
                    open_files_limit=new, max_connections=connections)
