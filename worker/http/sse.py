"""Server-sent events: the one writer every streaming route uses.

Two dialects: named events (`event: <type>` and `data: <json>` whose object also carries "type": the native API,
OpenAI's Responses, Anthropic's Messages) and OpenAI chat's (`data: <json>` lines, then `data: [DONE]`). Events are
gathered and written once per engine step: one write per step, however many events it holds.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from pydantic import BaseModel

SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}


def _json(data: BaseModel | dict[str, Any]) -> str:
    if isinstance(data, BaseModel):
        return data.model_dump_json()
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def encode(data: BaseModel | dict[str, Any] | str, event: str | None = None) -> bytes:
    """One event: `event: <name>` when named, and its data (an object as JSON, a string as it is)."""
    text = data if isinstance(data, str) else _json(data)
    head = f"event: {event}\n" if event is not None else ""
    return f"{head}data: {text}\n\n".encode()


class EventStream:
    """A text/event-stream answer: `add` events, `flush` them in one write, `close` at the end."""

    def __init__(self, request: web.Request, headers: dict[str, str] | None = None) -> None:
        self.request = request
        self.response = web.StreamResponse(headers={**SSE_HEADERS, **(headers or {})})
        self._pending: list[bytes] = []

    async def open(self) -> None:
        await self.response.prepare(self.request)

    def add(self, data: BaseModel | dict[str, Any] | str, event: str | None = None) -> None:
        self._pending.append(encode(data, event))

    def add_typed(self, data: BaseModel | dict[str, Any]) -> None:
        """A named event, named after its own `type`."""
        kind = data.type if isinstance(data, BaseModel) else data["type"]  # type: ignore[attr-defined]
        self.add(data, kind)

    async def flush(self) -> None:
        if self._pending:
            chunk, self._pending = b"".join(self._pending), []
            await self.response.write(chunk)

    async def close(self, done: bool = False) -> web.StreamResponse:
        """Write what is pending (and OpenAI's `data: [DONE]` when `done`), then end the stream."""
        if done:
            self.add("[DONE]")
        await self.flush()
        await self.response.write_eof()
        return self.response
