"""Clients that hold connections without using them (issue 16): slow heads, slow bodies, too many connections,
readers that stop reading. Real worker, real port, raw sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time

import aiohttp
import pytest

from tests.integration.worker_process import WorkerProcess


@pytest.fixture(scope="module")
def guarded_worker():
    """Short guard times and a small connection cap, so an attack shows within seconds."""
    w = WorkerProcess(["--parallel", "2", "--ctx-size", "512", "--header-timeout", "2", "--body-timeout", "2",
                       "--max-connections", "24"]).start()
    yield w
    w.stop()


def host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float) -> bool:
    """Whether the worker closes this connection within `timeout` seconds (EOF or reset)."""
    try:
        while True:
            data = await asyncio.wait_for(reader.read(65536), timeout)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except asyncio.TimeoutError:
        return False


async def health_latencies(url: str, until: float) -> list[float]:
    """GET /health on a fresh connection every 100 ms until `until`; each answer's seconds (inf: none in 3 s)."""
    out = []
    while time.monotonic() < until:
        t0 = time.monotonic()
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as s:
                async with s.get(url + "/health") as r:
                    assert r.status == 200
                    await r.json()
            out.append(time.monotonic() - t0)
        except (aiohttp.ClientError, asyncio.TimeoutError):
            out.append(float("inf"))
        await asyncio.sleep(0.1)
    return out


async def test_slow_heads_are_closed_and_health_answers_throughout(guarded_worker):
    """60 connections sending a head a byte every 300 ms (more than --max-connections 24): each is closed within
    the header timeout (or evicted for newer ones), and /health answers on fresh connections throughout."""
    w = guarded_worker
    host, port = host_port(w.url)
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200 + b"\r\n\r\n"
    closed_after: list[float] = []

    async def slow_client() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        t0 = time.monotonic()
        try:
            for byte in head:
                if reader.at_eof():
                    break
                writer.write(bytes([byte]))
                try:
                    await writer.drain()
                except (ConnectionResetError, BrokenPipeError):
                    break
                if await closed_by_peer(reader, 0.3):
                    break
            closed_after.append(time.monotonic() - t0)
        finally:
            writer.close()

    attack = asyncio.gather(*(slow_client() for _ in range(60)))
    latencies = await health_latencies(w.url, time.monotonic() + 5)
    await asyncio.wait_for(attack, 30)
    assert len(closed_after) == 60
    assert max(closed_after) < 2 + 1.5, closed_after  # the 200-byte head would take 60 s at this pace
    assert max(latencies) < 1.0, latencies
    async with aiohttp.ClientSession() as s, s.get(w.url + "/metrics") as m:
        text = await m.text()
    assert 'llm_worker_http_connections_closed_total{reason="header_timeout"}' in text


async def test_idle_connection_is_closed_after_the_header_timeout(guarded_worker):
    reader, writer = await asyncio.open_connection(*host_port(guarded_worker.url))
    try:
        t0 = time.monotonic()
        assert await closed_by_peer(reader, 6)
        assert 1.5 < time.monotonic() - t0 < 4
    finally:
        writer.close()


async def test_slow_body_gets_408_and_the_connection_closes(guarded_worker):
    """A body of 100 bytes sent a byte a second: 408 `body_timeout` after --body-timeout 2, then the close."""
    reader, writer = await asyncio.open_connection(*host_port(guarded_worker.url))
    try:
        writer.write(b"POST /v1/inference HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{")
        await writer.drain()
        t0 = time.monotonic()

        async def trickle() -> None:
            for _ in range(20):
                await asyncio.sleep(1)
                writer.write(b" ")
                await writer.drain()

        trickler = asyncio.create_task(trickle())
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            elapsed = time.monotonic() - t0
            lines = head.decode("latin-1").split("\r\n")
            assert lines[0].split(" ")[1] == "408", lines
            headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
            body = json.loads(await reader.readexactly(int(headers["content-length"])))
            assert body["error"]["code"] == "body_timeout"
            assert 1.5 < elapsed < 4
            assert await closed_by_peer(reader, 4)
        finally:
            trickler.cancel()
    finally:
        writer.close()


async def test_connection_cap_refuses_when_every_connection_is_busy():
    """--max-connections 3 with three streams running: a fourth connection gets 503 and is closed; once the
    streams end, requests are served again."""
    w = WorkerProcess(["--parallel", "3", "--ctx-size", "256", "--max-connections", "3"]).start()
    try:
        async with aiohttp.ClientSession() as s:
            body = {"prompt": "Count:", "max_tokens": 40, "ignore_eos": True, "temperature": 0}
            streams = [await s.post(w.url + "/v1/inference", json=body) for _ in range(3)]
            for r in streams:
                assert r.status == 200
                await r.content.readline()
            sock = socket.create_connection(host_port(w.url), timeout=5)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(4096):
                    answer += chunk
            sock.close()
            assert answer.startswith(b"HTTP/1.1 503"), answer
            assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "overloaded"
            for r in streams:
                await r.read()
                r.release()
        async with aiohttp.ClientSession() as s, s.get(w.url + "/health") as h:
            assert h.status == 200
    finally:
        w.stop()
