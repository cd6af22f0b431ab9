"""Narration: each step a person would want to follow is an event (actor, action, human sentence, ids, numbers).

One `narrate()` call makes an event; sinks decide where it goes: loguru (json or pretty lines), the SSE stream
of a request that asked for it, and an in-process recorder for tests. No sink may block: the SSE sink only
schedules a put onto the request's own loop.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

from loguru import logger

Event = dict[str, Any]

_worker_id: str | None = None
_job_sinks: dict[str, Callable[[Event], None]] = {}
_recorders: list[list[Event]] = []
_lock = threading.Lock()


def narrate(
    action: str,
    human: str,
    *,
    actor: str = "worker",
    target: str | None = None,
    level: str = "info",
    cute: str | None = None,
    job_id: str | None = None,
    **fields: Any,
) -> Event:
    event: Event = {
        "ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "level": level,
        "actor": actor,
        "action": action,
        "target": target,
        "human": human,
    }
    if cute:
        event["cute"] = cute
    if _worker_id:
        event["worker_id"] = _worker_id
    if job_id:
        event["job_id"] = job_id
    event.update({k: v for k, v in fields.items() if v is not None})

    logger.bind(event=event).log(level.upper(), human)
    with _lock:
        for rec in _recorders:
            rec.append(event)
        sink = _job_sinks.get(job_id) if job_id else None
    if sink is not None:
        sink(event)
    return event


def subscribe(job_id: str, sink: Callable[[Event], None]) -> None:
    """Send this job's events to `sink` too (called from any thread; it must not block)."""
    with _lock:
        _job_sinks[job_id] = sink


def unsubscribe(job_id: str) -> None:
    with _lock:
        _job_sinks.pop(job_id, None)


@contextlib.contextmanager
def recording() -> Iterator[list[Event]]:
    """Collect every event narrated inside the block (for tests)."""
    events: list[Event] = []
    with _lock:
        _recorders.append(events)
    try:
        yield events
    finally:
        with _lock:
            _recorders.remove(events)


def configure(*, worker_id: str | None, log_format: str = "pretty", level: str = "info") -> None:
    """Route all logs (narration, llama.cpp, the rest) to stderr in the chosen format."""
    global _worker_id
    _worker_id = worker_id
    logger.remove()
    if log_format == "json":
        logger.add(_json_sink, level=level.upper(), format="{message}")
    else:
        logger.add(_stderr.sink, level=level.upper(), format=_pretty_format, colorize=False)
    _route_hub_logs()


class _StdlibLogs(logging.Handler):
    """A library's standard-library records, sent where every other log goes (one JSON object a line with
    --log-format json), under an actor of its own."""

    def __init__(self, actor: str) -> None:
        super().__init__()
        self.actor = actor

    def emit(self, record: logging.LogRecord) -> None:
        level = record.levelname if record.levelname in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL") else "ERROR"
        logger.bind(actor=self.actor).log(level, " ".join(record.getMessage().split()))


def _route_hub_logs() -> None:
    """huggingface_hub writes its own lines to stderr (its retries of an unreachable hub, seconds of them), which
    broke the one-object-a-line JSON log: its handler replaced by ours."""
    import huggingface_hub.utils.logging  # noqa: F401  (its import adds the handler replaced here)

    hub = logging.getLogger("huggingface_hub")
    hub.handlers = [h for h in hub.handlers if not isinstance(h, logging.StreamHandler)]
    if not any(isinstance(h, _StdlibLogs) for h in hub.handlers):
        hub.addHandler(_StdlibLogs("hub"))
    hub.propagate = False


class _LineWriter:
    """Log lines written to stderr by a thread of their own. A write lets go of the GIL, and the thread that made
    it must then wait to take it back: the engine thread, narrating a burst of admissions while the event loop
    parses the requests behind them, waited up to the interpreter's switch interval (5 ms) a line.

    Warnings and errors are written at once, after the lines before them (they may be the last words before a
    crash), as is every line once the queue is long (stderr not keeping up) or the interpreter is exiting."""

    MAX_QUEUED = 10_000

    def __init__(self) -> None:
        self._lines: queue.SimpleQueue[str | threading.Event] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()  # one line at a time on stderr, from the writer or a direct write
        self._exiting = False
        atexit.register(self.close)  # registered at import: runs after the exit handlers registered later

    def put(self, line: str, *, urgent: bool = False) -> None:
        if urgent or self._exiting or self._lines.qsize() >= self.MAX_QUEUED:
            self.flush()
            self._emit(str(line))
            return
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._serve, name="log-writer", daemon=True)
                    self._thread.start()
        self._lines.put(str(line))

    def sink(self, message: Any) -> None:
        """A loguru sink: the formatted line, written at once from WARNING up."""
        self.put(message, urgent=message.record["level"].no >= _WARNING)

    def flush(self) -> None:
        """Until every line put so far is written."""
        if self._thread is None or not self._thread.is_alive() or threading.current_thread() is self._thread:
            return
        written = threading.Event()
        self._lines.put(written)
        written.wait(5.0)

    def close(self) -> None:
        """At exit: what is queued written, every later line written at once."""
        self._exiting = True
        self.flush()

    def _emit(self, line: str) -> None:
        with self._write_lock:
            try:
                sys.stderr.write(line)
                sys.stderr.flush()
            except (OSError, ValueError):  # stderr closed: nowhere left to write
                pass

    def _serve(self) -> None:
        while True:
            item = self._lines.get()
            if isinstance(item, threading.Event):
                item.set()
                continue
            with self._write_lock:
                try:
                    sys.stderr.write(item)
                    if self._lines.empty():
                        sys.stderr.flush()
                except (OSError, ValueError):
                    pass


_WARNING = 30  # loguru's WARNING level number
_stderr = _LineWriter()


def flush_logs() -> None:
    _stderr.flush()


def _json_sink(message: Any) -> None:
    record = message.record
    event = record["extra"].get("event")
    if event is None:
        event = {
            "ts": record["time"].astimezone(timezone.utc).isoformat(timespec="milliseconds"),
            "level": record["level"].name.lower(),
            "actor": record["extra"].get("actor", "worker"),
            "message": record["message"],
        }
        if _worker_id:
            event["worker_id"] = _worker_id
    _stderr.put(json.dumps(event, ensure_ascii=False, default=str) + "\n", urgent=record["level"].no >= _WARNING)


_PRETTY_SKIP = {"ts", "level", "actor", "action", "target", "human", "cute", "worker_id"}


_PRETTY_LINE = "{time:HH:mm:ss.SSS} {level: <7} {extra[_pretty]}\n{exception}"


def _pretty_format(record: Any) -> str:
    """The same format every time, the line's own text in an extra field: loguru parses a format once (memoized)
    and inserts field values as they are (no escaping), where a format made for each line was parsed for each
    (0.038 ms a narrated line against 0.020, this project's 2-core machine; the engine thread narrates admissions)."""
    event = record["extra"].get("event")
    if event is None:
        record["extra"]["_pretty"] = "[" + record["extra"].get("actor", "worker") + "] " + record["message"]
        return _PRETTY_LINE
    extras = " ".join(f"{k}={v}" for k, v in event.items() if k not in _PRETTY_SKIP)
    line = f"[{event['actor']}] {event['action']}: " + record["message"]
    record["extra"]["_pretty"] = line + (f"  ({extras})" if extras else "")
    return _PRETTY_LINE
