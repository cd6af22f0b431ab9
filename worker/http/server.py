"""The HTTP server's own guards against clients that hold connections without using them.

aiohttp's defaults suit a trusted network: a connection may take an hour to send its request head, a body may
trickle forever, there is no bound on connections, and a reader that stops reading keeps its response buffered
and its handler (and so its slot) for as long as it likes. Here:

- a request head must be complete within `--header-timeout` of the connection opening or its last answer
  (aiohttp's keep-alive timer, which already runs from the connection's start);
- a body must be whole within `--body-timeout` of its head (read_body_in_time, a middleware);
- at most `--max-connections` are open: a new one closes the oldest connection that is only waiting (for a head
  or between requests), and is refused with 503 when every connection is busy;
- a connection whose client has acknowledged none of its answer's waiting bytes for `--write-timeout` seconds (a
  reader that stopped reading) is aborted: its buffers are dropped and its handler cancelled, so its job ends.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import resource
import socket
import struct
import termios
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
    write_timeout: float
    metrics: Metrics

    def closed(self, reason: str) -> None:
        self.metrics.connections_closed.labels(reason=reason).inc()


def _overloaded_answer(message: str) -> bytes:
    """A whole 503 in the contract's JSON shape, for a connection no handler will see."""
    body = json.dumps({"error": {"code": "overloaded", "message": message}}).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n")
    return head.encode() + body


class GuardedProtocol(JsonErrorProtocol):
    """One connection, with the cap, the header timeout's count and the write timeout."""

    def __init__(self, manager: Any, *, policy: ConnectionPolicy, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._policy = policy
        self.refused = False  # over the cap: answered 503, closing
        self._stalled_s = 0.0
        self._last_pending = 0
        self._last_acked: int | None = None

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
        refused.write(_overloaded_answer(f"the worker has {self._policy.max_connections} connections open, "
                                         "all busy"))
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

    def check_stall(self, interval: float) -> None:
        """Called every `interval` seconds: a connection with bytes waiting for its client, of which the client has
        acknowledged none since the last call, has stalled for another interval (the kernel's own buffer may hold
        megabytes for a reader that stopped: its acknowledgements tell, not the buffers filling)."""
        transport = self.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        pending = transport.get_write_buffer_size() + _unsent_bytes(sock)
        acked = _acked_bytes(sock)
        if acked is None:  # no TCP_INFO (not Linux, not TCP): a buffer that does not shrink
            progress = pending < self._last_pending
        else:
            progress = acked != self._last_acked
        self._last_pending, self._last_acked = pending, acked
        self._stalled_s = 0.0 if pending == 0 or progress else self._stalled_s + interval
        if self._stalled_s >= self._policy.write_timeout:
            self._writes_stalled(pending)

    def _writes_stalled(self, buffered: int) -> None:
        self._stalled_s = 0.0
        transport = self.transport
        if transport is None:
            return
        request = self._current_request
        where = f"{request.method} {request.path}" if request is not None else "an answer"
        narrate("client_stalled", f"A client took none of its answer for {self._policy.write_timeout:g} s "
                f"({where}, {buffered} bytes waiting): connection dropped, its request cancelled.",
                level="warning", actor="http", target=where, buffered_bytes=buffered,
                job_id=request.get("job_id") if request is not None else None,
                correlation_id=request.get("correlation_id") if request is not None else None)
        self._policy.closed("write_timeout")
        transport.abort()  # drops the buffer now; connection_lost cancels the handler (handler_cancellation)


# How often connections are checked for stalled readers.
STALL_CHECK_S = 0.5


def _unsent_bytes(sock: Any) -> int:
    """Bytes in the kernel's send queue, not yet acknowledged by the client (0 where it cannot be asked)."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except (OSError, AttributeError, ValueError):
        return 0


def _acked_bytes(sock: Any) -> int | None:
    """tcpi_bytes_acked of Linux's struct tcp_info (a u64 at offset 120, since Linux 4.1); None where absent."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except (OSError, AttributeError, ValueError):
        return None
    return struct.unpack_from("Q", info, 120)[0] if len(info) >= 128 else None


class GuardedServer(web.Server):
    def __init__(self, *args: Any, policy: ConnectionPolicy, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.policy = policy
        self._watch: asyncio.TimerHandle | None = self._loop.call_later(STALL_CHECK_S, self._check_stalls)

    def _check_stalls(self) -> None:
        self._watch = self._loop.call_later(STALL_CHECK_S, self._check_stalls)
        for conn in self.connections:
            if isinstance(conn, GuardedProtocol):
                conn.check_stall(STALL_CHECK_S)

    async def shutdown(self, timeout: float | None = None) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        await super().shutdown(timeout)

    def __call__(self) -> RequestHandler:
        return GuardedProtocol(self, loop=self._loop, policy=self.policy, **self._kwargs)


class WorkerRunner(web.AppRunner):
    """web.AppRunner with the guards above; the parser's own refusals answer in JSON (JsonErrorProtocol)."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        app = self._app
        assert app is not None
        settings = app[SETTINGS]
        policy = ConnectionPolicy(settings.max_connections, settings.write_timeout, app[METRICS])
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
