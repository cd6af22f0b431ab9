"""The pool manager's side of the contract: the ready callback (with retries) and the heartbeat."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import aiohttp

from worker.narration import narrate


async def announce_ready(url: str, payload: dict[str, Any], *, timeout: float) -> bool:
    """POST the ready payload until a 2xx, backing off exponentially, for at most `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay, attempt, last_error = 0.25, 0, ""
    async with aiohttp.ClientSession() as http:
        while True:
            attempt += 1
            per_try = max(0.1, min(10.0, deadline - loop.time()))
            try:
                async with http.post(url, json=payload, timeout=aiohttp.ClientTimeout(total=per_try)) as resp:
                    if 200 <= resp.status < 300:
                        narrate("callback_ready", f"Told the pool manager at {url} that this worker is ready.",
                                actor="pool", target=url, attempts=attempt, status=resp.status,
                                cute="Raised my hand!")
                        return True
                    last_error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            narrate("callback_retry", f"Ready callback attempt {attempt} failed ({last_error}); retrying in "
                    f"{min(delay, remaining):.2f} s.", actor="pool", target=url, level="warning", attempts=attempt)
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 10.0)
    narrate("callback_failed", f"The pool manager at {url} did not accept the ready callback within {timeout:g} s "
            f"({attempt} attempts; last: {last_error}).", actor="pool", target=url, level="error",
            attempts=attempt, error=last_error)
    return False


async def heartbeat(url: str, interval: float, snapshot: Callable[[], dict[str, Any]]) -> None:
    """POST `snapshot()` plus a timestamp every `interval` seconds until cancelled; failures only narrate."""
    async with aiohttp.ClientSession() as http:
        while True:
            body = {**snapshot(), "ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds")}
            started = time.monotonic()
            try:
                async with http.post(url, json=body, timeout=aiohttp.ClientTimeout(total=max(1.0, interval))) as r:
                    if r.status >= 300:
                        narrate("heartbeat_failed", f"Heartbeat to {url} got HTTP {r.status}.", actor="pool",
                                target=url, level="warning", status=r.status)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                narrate("heartbeat_failed", f"Heartbeat to {url} failed: {type(exc).__name__}: {exc}",
                        actor="pool", target=url, level="warning")
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))
