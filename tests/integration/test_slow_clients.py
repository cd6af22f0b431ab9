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
                       "--write-timeout", "2", "--max-connections", "24"]).start()
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


def non_reading_socket(url: str, path: str, body: dict) -> socket.socket:
    """A client that sends its request and then reads nothing (a small receive buffer, so it fills at once)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(host_port(url))
    raw = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
    return sock


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


async def test_stream_whose_reader_stops_is_dropped_and_its_job_cancelled(guarded_worker):
    """A stream whose client reads nothing: once its buffers are full and nothing is acknowledged for
    --write-timeout 2 s, the connection is dropped (narrated `client_stalled`, counted) and the job cancelled, so
    its slot is free long before its 480 tokens."""
    w = guarded_worker
    before = len([e for e in w.events if e.get("action") == "client_stalled"])
    sock = non_reading_socket(w.url, "/v1/inference", {"prompt": "Count:", "max_tokens": 480, "ignore_eos": True,
                                                       "temperature": 0, "job_id": "never-read"})
    try:
        cancelled = await asyncio.to_thread(
            lambda: next(iter(_wait_all(w, "inference_cancelled", "never-read", 120))))
        stalled = [e for e in w.events if e.get("action") == "client_stalled"]
        assert len(stalled) == before + 1 and stalled[-1]["job_id"] == "never-read"
        assert cancelled["tokens_out"] < 480
        async with aiohttp.ClientSession() as s:
            async with s.get(w.url + "/health") as h:
                assert (await h.json())["slots"]["busy"] == 0
            async with s.get(w.url + "/metrics") as m:
                text = await m.text()
        assert 'llm_worker_http_connections_closed_total{reason="write_timeout"}' in text
    finally:
        sock.close()


def _wait_all(w: WorkerProcess, action: str, job_id: str, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in w.events if e.get("action") == action and e.get("job_id") == job_id]
        if found:
            return found
        time.sleep(0.05)
    raise TimeoutError(f"no {action} for {job_id} within {timeout} s")


@pytest.fixture(scope="module")
def stall_worker():
    w = WorkerProcess(["--parallel", "2", "--ctx-size", "512", "--write-timeout", "2"]).start()
    yield w
    w.stop()


async def test_big_answers_neither_block_the_loop_nor_stay_in_memory(stall_worker):
    """Six /v1/tokenize answers of ~2 MB of JSON each, to clients that read none of them: /health answers within
    a fraction of a second throughout, each connection is dropped after --write-timeout (the kernel had taken the
    answer, the client acknowledged none of it), and the worker's memory does not keep their answers."""
    w = stall_worker
    text = "hello world, " * 150_000  # 1.95 MB of text, ~300k tokens
    rss0 = rss_bytes(w.proc.pid)
    before = len([e for e in w.events if e.get("action") == "client_stalled"])
    socks = [non_reading_socket(w.url, "/v1/tokenize", {"text": text}) for _ in range(6)]
    try:
        latencies = await health_latencies(w.url, time.monotonic() + 6)
        for _ in range(200):
            if len([e for e in w.events if e.get("action") == "client_stalled"]) >= before + 6:
                break
            await asyncio.sleep(0.1)
        stalled = [e for e in w.events if e.get("action") == "client_stalled"][before:]
        assert len(stalled) == 6
        assert max(latencies) < 0.5, latencies
        print(f"/health while six big answers were written: max {max(latencies) * 1000:.0f} ms; "
              f"RSS {rss0 / 2**20:.0f} -> {rss_bytes(w.proc.pid) / 2**20:.0f} MiB after they were dropped")
        assert rss_bytes(w.proc.pid) - rss0 < 200 * 2**20
    finally:
        for sock in socks:
            sock.close()
