"""The stop signal's bounds (issue 16, item 9): the drain ends within --drain-timeout plus a moment whatever the
clients do, and a stop during the model's load (or conversion) exits at once with 0, leaving nothing half-written."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import aiohttp
import gguf
import pytest

from tests.integration.test_convert_smollm import rebuild_checkpoint
from tests.integration.worker_process import WorkerProcess, iter_sse
from worker.models.resolve import embedded_model_path


async def test_drain_is_bounded_with_a_trickling_body_and_a_running_stream():
    """A body arriving a byte a second holds its handler in the read; a stream runs past the drain. SIGTERM with
    --drain-timeout 1: the stream ends `cancelled`, the worker exits 0 within a few seconds (aiohttp alone waits
    60 s for the trickling handler)."""
    w = WorkerProcess(["--parallel", "1", "--ctx-size", "512", "--drain-timeout", "1"]).start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", w.port)
        writer.write(b"POST /v1/inference HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 500\r\n\r\n{")
        await writer.drain()

        async def trickle() -> None:
            for _ in range(200):
                await asyncio.sleep(1)
                writer.write(b" ")
                await writer.drain()

        trickler = asyncio.create_task(trickle())

        async with aiohttp.ClientSession() as http:
            body = {"prompt": "Count:", "max_tokens": 480, "ignore_eos": True, "temperature": 0}
            async with http.post(f"{w.url}/v1/inference", json=body) as resp:
                events = []
                async for ev in iter_sse(resp):
                    events.append(ev)
                    if ev["type"] == "token" and ev["i"] == 1:
                        w.proc.send_signal(signal.SIGTERM)
                        t0 = time.monotonic()
        assert events[-1]["type"] == "end" and events[-1]["stop_reason"] == "cancelled"
        code = await asyncio.to_thread(w.wait_exit, 30)
        elapsed = time.monotonic() - t0
        trickler.cancel()
        writer.close()
        assert code == 0
        assert elapsed < 1 + 4, elapsed
    finally:
        w.stop()


@pytest.fixture(scope="module")
def smollm_checkpoint(tmp_path_factory):
    """SmolLM2 as a SafeTensors folder: its conversion takes seconds, long enough to be interrupted."""
    root = tmp_path_factory.mktemp("smollm2-src")
    rebuild_checkpoint(gguf.GGUFReader(embedded_model_path()), root / "SmolLM2-135M-Instruct")
    return root / "SmolLM2-135M-Instruct"


def test_sigterm_during_conversion_exits_0_at_once_and_leaves_nothing(smollm_checkpoint, tmp_path):
    cache = tmp_path / "cache"
    w = WorkerProcess(["--model", str(smollm_checkpoint), "--cache-dir", str(cache), "--quantize", "q8_0"])
    w.start(wait_ready=False)
    try:
        w.wait_for("safetensors_convert_start", 60)
        time.sleep(0.3)  # well inside the conversion
        t0 = time.monotonic()
        w.proc.send_signal(signal.SIGTERM)
        code = w.wait_exit(30)
        elapsed = time.monotonic() - t0
        assert code == 0, w.output
        assert elapsed < 2, elapsed
        assert "safetensors_convert_complete" not in w.actions()
        assert "load abandoned" in w.events[-1]["human"]
        # No GGUF, finished or not (the source digests' memo, written whole, may stay).
        left = [p.name for p in cache.iterdir() if ".gguf" in p.name and not p.name.endswith(".lock")]
        assert left == [], left
    finally:
        w.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_the_convert_command_ends_it_as_a_shell_expects_and_leaves_nothing(smollm_checkpoint,
                                                                                           tmp_path, sig):
    """`convert` is a command, not a server: interrupted, it exits 128 + the signal (130, 143) with one line, no
    traceback, and neither its cache's temp file nor the output's."""
    cache, out = tmp_path / "cache", tmp_path / "out.gguf"
    proc = subprocess.Popen([sys.executable, "-m", "worker", "convert", str(smollm_checkpoint), str(out),
                             "--cache-dir", str(cache), "--quantize", "q8_0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (cache.is_dir() and any(cache.glob(".*.tmp"))):  # until the conversion has begun writing
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, err[-2000:]
    assert "Traceback" not in err and f"stopped by {sig.name}" in err and "not written" in err, err[-2000:]
    assert not out.exists() and not [p.name for p in cache.iterdir() if ".gguf" in p.name and
                                     not p.name.endswith(".lock")]
