"""The command line: `llm-worker-rbee [flags]` serves a model until SIGTERM/SIGINT/SIGHUP."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from loguru import logger

from worker.config import ConfigError, Settings, load_settings
from worker.exit_codes import ExitCode
from worker.http.app import create_app, drain
from worker.http.server import raise_open_files_limit, runner_for
from worker.http.state import STATE
from worker.narration import configure, flush_logs, narrate

# What the HTTP parser accepts before a request reaches any route (aiohttp's defaults, kept explicit): a longer
# request line or header line, or more headers, is refused with 400 and the connection closed.
MAX_LINE_SIZE = 8190  # bytes of the request line (method, path and query) and of one header line
MAX_FIELD_SIZE = 8190  # bytes of one header value
MAX_HEADERS = 128  # header lines per request


# After the drain: cancelled streams write their end, handlers still running are cancelled (the runner's
# shutdown_timeout, 1 s), the engine thread ends its step. Past drain-timeout + this, something is stuck (a native
# call that does not return): the process exits anyway, from a thread the event loop cannot hold up.
SHUTDOWN_GRACE_S = 10.0


class _AiohttpLogs(logging.Handler):
    """aiohttp logs through the standard library: send its records where every other log goes, one line each."""

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            # A malformed request (a bad header, a line or header past the limits below): aiohttp has answered it
            # with 400 and closed the connection. The client's fault, worth a line, not a traceback.
            reason = " ".join(str(exc.message).split())[:200]
            logger.bind(actor="http").warning(f"refused a malformed HTTP request ({exc.code}): {reason}")
            return
        level = record.levelname if record.levelname in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL") else "ERROR"
        logger.bind(actor="http").opt(exception=record.exc_info).log(level, record.getMessage())


def _route_aiohttp_logs() -> None:
    aiohttp_logger = logging.getLogger("aiohttp")
    if not any(isinstance(h, _AiohttpLogs) for h in aiohttp_logger.handlers):
        aiohttp_logger.addHandler(_AiohttpLogs())
    aiohttp_logger.setLevel(logging.WARNING)
    aiohttp_logger.propagate = False


async def serve(settings: Settings) -> int:
    _route_aiohttp_logs()
    app = create_app(settings)
    # handler_cancellation: a client that disconnects cancels its handler, which cancels its job. The runner's
    # connections answer what aiohttp's HTTP parser refuses in the contract's JSON error shape, and guard against
    # slow heads, slow bodies, readers that stop reading and too many connections (worker/http/server.py).
    raise_open_files_limit(settings.max_connections)
    runner = runner_for(app, max_line_size=MAX_LINE_SIZE, max_field_size=MAX_FIELD_SIZE, max_headers=MAX_HEADERS)
    state = app[STATE]
    # The handlers go in before the runner's setup, which starts the model's load: a signal in the first second
    # abandons the load like any other, with no traceback
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        name = signal.Signals(signum).name
        if signals == 1 and state.status == "loading":
            _abandon_load(settings, name)
        elif signals == 1:
            narrate("shutdown", f"Received {name}: draining (up to {settings.drain_timeout:g} s), then exiting; "
                    "a second signal exits at once.", signal=name)
            state.stop(0)
        else:
            _exit_now(signum)

    # SIGHUP (a closed terminal, a supervisor's reload) drains like SIGTERM, as servers usually do: its default
    # action would kill the worker at once and cut every stream without its end.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, on_signal, sig)
    # SIGUSR1 means nothing here; its default action would kill the worker. Logged and otherwise ignored.
    loop.add_signal_handler(signal.SIGUSR1, lambda: narrate(
        "signal_ignored", "Received SIGUSR1: ignored (it has no meaning for this worker).", level="warning",
        signal="SIGUSR1"))

    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
    except OSError as exc:
        narrate("startup", f"Cannot listen on {settings.host}:{settings.port}: {exc}", level="error")
        await runner.cleanup()
        return ExitCode.CONFIG
    host, port = runner.addresses[0][:2]
    state.url = settings.advertise_url or f"http://{_reachable_host(settings.host, host)}:{port}"
    narrate("server_listening", f"Listening on http://{host}:{port}", target=f"{host}:{port}", host=host,
            port=port, url=state.url, cute="Ears open!")

    code = int(await state.stopped)
    _exit_if_stuck(settings.drain_timeout + SHUTDOWN_GRACE_S, code)
    await drain(app, settings.drain_timeout)
    await runner.cleanup()
    narrate("shutdown", f"Stopped with exit code {code}.", exit_code=code)
    return code


def _exit_if_stuck(after_s: float, code: int) -> None:
    def overran() -> None:
        narrate("shutdown", f"Shutdown still not done {after_s:g} s after the stop signal: exiting with code "
                f"{code} anyway.", level="error", exit_code=code)
        _flush_and_exit(code)

    timer = threading.Timer(after_s, overran)
    timer.daemon = True
    timer.start()


def _abandon_load(settings: Settings, signal_name: str) -> None:
    """A stop signal while the model loads (or converts): nothing is served yet, so nothing is drained. The load
    runs in llama.cpp or the converter and cannot be interrupted where it is; exit now, with 0 like any asked-for
    stop, after removing this process's conversion temp files (a finished conversion was renamed into place with
    its record; an unfinished one leaves nothing)."""
    from worker.models.convert.cache import remove_own_temps

    cache_dir = settings.cache_dir.expanduser()
    removed = remove_own_temps(cache_dir) if cache_dir.is_dir() else []
    narrate("shutdown", f"Received {signal_name} while the model was loading: load abandoned"
            f"{f', {len(removed)} temp file(s) removed' if removed else ''}; exiting with code 0.",
            signal=signal_name, exit_code=0, removed=[str(p) for p in removed] or None)
    # and once more at the very end: the converter runs on while the log lines are written out, and may have
    # opened its next temp file since (a test found one left behind)
    _flush_and_exit(0, last=lambda: remove_own_temps(cache_dir) if cache_dir.is_dir() else None)


def _flush_and_exit(code: int, last: Callable[[], object] | None = None) -> None:
    flush_logs()
    for stream in (sys.stderr, sys.stdout):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if last is not None:
        last()
    os._exit(code)


def _exit_now(signum: int) -> None:
    """A second SIGTERM/SIGINT/SIGHUP: exit now, with what a shell reports for a process killed by that signal
    (128 + N: 143 for SIGTERM, 130 for SIGINT, 129 for SIGHUP). Running streams are cut off without an end event;
    the OS frees the rest."""
    name = signal.Signals(signum).name
    code = ExitCode.SIGNAL_BASE + signum
    narrate("shutdown", f"Received {name} again: exiting at once with code {code}, not waiting for running "
            "requests.", level="warning", signal=name, exit_code=code)
    _flush_and_exit(code)


def _reachable_host(configured: str, bound: str) -> str:
    """A host name others can use: the bound address, unless it is a wildcard."""
    if configured in ("0.0.0.0", "::", ""):
        return socket.getfqdn()
    return f"[{bound}]" if ":" in bound else bound


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "convert":
        from worker.convert_cli import convert_main

        return convert_main(argv[1:])
    try:
        settings = load_settings(argv)
    except ConfigError as exc:
        print(f"llm-worker-rbee: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    configure(worker_id=settings.worker_id, log_format=settings.log_format, level=settings.log_level)
    narrate("startup", f"Worker {settings.worker_id} starting.", target=settings.worker_id,
            parallel=settings.parallel, ctx_size=settings.ctx_size, backend=settings.backend)
    try:
        if settings.profile_dir is None:
            return asyncio.run(serve(settings))
        import cProfile  # performance work only: the event loop's side

        settings.profile_dir.mkdir(parents=True, exist_ok=True)
        with cProfile.Profile() as prof:
            code = asyncio.run(serve(settings))
        prof.dump_stats(settings.profile_dir / "loop.prof")
        return code
    except Exception:
        logger.exception("the worker failed")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
