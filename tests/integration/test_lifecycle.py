"""Worker processes with their own settings: exit codes, limits, auth, drain."""

from __future__ import annotations

import asyncio
import math
import signal
import struct
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.integration.worker_process import WorkerProcess, iter_sse, read_sse
from worker.models.resolve import embedded_model_path


def run_worker(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker", "--port", "0", *args],
                          capture_output=True, text=True, check=False, timeout=timeout)


def test_missing_model_exits_3():
    result = run_worker("--model", "/nowhere/model.gguf")
    assert result.returncode == 3, result.stderr
    assert "/nowhere/model.gguf" in result.stderr


def test_truncated_model_exits_3_with_llama_cpp_reason(tmp_path: Path):
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(embedded_model_path().read_bytes()[: 3_000_000])
    result = run_worker("--model", str(bad), "--log-format", "json")
    assert result.returncode == 3, result.stderr
    failed = [line for line in result.stderr.splitlines() if '"model_load_failed"' in line]
    assert failed and str(bad) in failed[0]
    assert "llama.cpp could not load" in failed[0]


def test_foreign_file_exits_3(tmp_path: Path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("these are not the weights you are looking for\n" * 100)
    result = run_worker("--model", str(bad))
    assert result.returncode == 3
    assert str(bad) in result.stderr


@pytest.fixture(scope="module")
def embedded_fields():
    """Where each metadata value of the embedded model lies in its file (found with the gguf package's reader)."""
    from gguf import GGUFReader

    path = embedded_model_path()
    return path, {key: field.offset for key, field in GGUFReader(path).fields.items()}


# A hyper-parameter rewritten in place in a copy of the embedded model: (key, GGUF value type, packed value).
# The type is 4 uint32, 5 int32, 6 float32: every value keeps its 4 bytes, so nothing else in the file moves.
BAD_HPARAMS = {
    "block_count_0": ("llama.block_count", 4, struct.pack("<I", 0)),
    "block_count_100000": ("llama.block_count", 4, struct.pack("<I", 100_000)),
    "rms_eps_nan": ("llama.attention.layer_norm_rms_epsilon", 6, struct.pack("<f", math.nan)),
    "rms_eps_negative": ("llama.attention.layer_norm_rms_epsilon", 6, struct.pack("<f", -1e-5)),
    "head_count_negative": ("llama.attention.head_count", 5, struct.pack("<i", -9)),
    "embedding_length_float": ("llama.embedding_length", 6, struct.pack("<f", 576.0)),
    "rope_freq_base_inf": ("llama.rope.freq_base", 6, struct.pack("<f", math.inf)),
}


@pytest.mark.parametrize("case", sorted(BAD_HPARAMS))
def test_bad_hyper_parameter_exits_3_naming_file_and_key(tmp_path: Path, embedded_fields, case):
    """Values that made llama.cpp abort the process (SIGABRT, exit 134) exit 3 with the file and the key."""
    key, vtype, value = BAD_HPARAMS[case]
    source, offsets = embedded_fields
    data = bytearray(source.read_bytes())
    at = offsets[key] + 8 + len(key)  # past the key's length and its bytes: the value's type, then the value
    assert struct.unpack_from("<I", data, at)[0] in (4, 6)  # uint32 or float32 in the original, 4 bytes
    data[at: at + 4] = struct.pack("<I", vtype)
    data[at + 4: at + 8] = value
    bad = tmp_path / f"{case}.gguf"
    bad.write_bytes(bytes(data))
    result = run_worker("--model", str(bad), "--log-format", "json")
    assert result.returncode == 3, (result.returncode, result.stderr[-2000:])
    failed = [line for line in result.stderr.splitlines() if '"model_load_failed"' in line]
    assert failed and str(bad) in failed[0] and key in failed[0], result.stderr[-2000:]


@pytest.mark.parametrize("args,needle", [
    (["--parallel", "0"], "--parallel"),
    (["--port", "http"], "--port"),
    (["--gpu-layers", "many"], "--gpu-layers"),
    (["--no-such-flag", "1"], "no-such-flag"),
    (["--host", "0.0.0.0"], "API token"),
    (["--config", "/nowhere.toml"], "/nowhere.toml"),
    (["--cache-type-v", "q4_0", "--flash-attn", "off"], "--cache-type-v"),
    (["--cache-type-k", "q3_k"], "--cache-type-k"),
])
def test_invalid_settings_exit_2_with_one_line(args, needle):
    result = run_worker(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr


def test_settings_from_env_and_toml(tmp_path: Path):
    cfg = tmp_path / "w.toml"
    cfg.write_text('parallel = 2\nctx_size = 256\nworker_id = "from-toml"\n')
    w = WorkerProcess(["--config", str(cfg)], env={"LLM_WORKER_MAX_QUEUE": "3"}).start()
    try:
        async def check():
            async with aiohttp.ClientSession() as http, http.get(f"{w.url}/health") as resp:
                return await resp.json()
        health = asyncio.run(check())
        assert health["worker_id"] == "from-toml"
        assert health["slots"]["total"] == 2 and health["queue"]["max"] == 3
    finally:
        w.stop()


@pytest.fixture(scope="module")
def tight_worker():
    """One slot, no waiting room, a token and a small body limit."""
    w = WorkerProcess(["--parallel", "1", "--max-queue", "0", "--ctx-size", "512", "--api-token", "s3cret",
                       "--max-body-bytes", "2048"]).start()
    yield w
    w.stop()


AUTH = {"Authorization": "Bearer s3cret"}


async def test_auth_guards_inference_but_not_probes(tight_worker):
    url = tight_worker.url
    async with aiohttp.ClientSession() as http:
        for path in ("/health", "/v1/ready"):
            async with http.get(url + path) as resp:
                assert resp.status == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            async with http.post(f"{url}/v1/inference", json={"prompt": "hi"}, headers=headers) as resp:
                assert resp.status == 401
                assert (await resp.json())["error"]["code"] == "unauthorized"
        async with http.delete(f"{url}/v1/inference/x") as resp:
            assert resp.status == 401
        async with http.post(f"{url}/v1/inference", json={"prompt": "hi", "max_tokens": 2, "stream": False},
                             headers=AUTH) as resp:
            assert resp.status == 200


async def test_queue_full_is_503_with_retry_after(tight_worker):
    url = tight_worker.url
    async with aiohttp.ClientSession() as http:
        body = {"prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 400, "temperature": 0, "job_id": "hog"}
        async with http.post(f"{url}/v1/inference", json=body, headers=AUTH) as first:
            async for ev in iter_sse(first):
                if ev["type"] == "token":
                    break
            async with http.post(f"{url}/v1/inference", json={"prompt": "hi"}, headers=AUTH) as second:
                assert second.status == 503
                assert second.headers["Retry-After"]
                assert (await second.json())["error"]["code"] == "overloaded"
            async with http.delete(f"{url}/v1/inference/hog", headers=AUTH) as d:
                assert d.status == 202
        for _ in range(100):  # the next test needs the only slot
            async with http.get(f"{url}/health") as h:
                if (await h.json())["slots"]["busy"] == 0:
                    break
            await asyncio.sleep(0.05)


async def test_body_too_large_is_413(tight_worker):
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{tight_worker.url}/v1/inference", json={"prompt": "x" * 5000},
                             headers=AUTH) as resp:
            assert resp.status == 413
            assert (await resp.json())["error"]["code"] == "body_too_large"


async def test_request_timeout_ends_running_and_waiting_requests():
    w = WorkerProcess(["--parallel", "1", "--ctx-size", "600", "--request-timeout", "0.5"]).start()
    try:
        async with aiohttp.ClientSession() as http:
            body = {"prompt": "Count: 1, 2, 3,", "max_tokens": 500, "temperature": 0, "ignore_eos": True}

            async def one() -> list[dict]:
                async with http.post(f"{w.url}/v1/inference", json=body) as resp:
                    assert resp.status == 200, await resp.text()
                    return await read_sse(resp)

            running, waiting = await asyncio.gather(one(), one())  # one slot: the second waits
    finally:
        w.stop()
    for events in (running, waiting):
        assert events[-1]["type"] == "end" and events[-1]["stop_reason"] == "timeout"
        assert events[-1]["tokens_out"] < 500


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
async def test_sigterm_drains_running_requests_then_exits_0(signum):
    w = WorkerProcess(["--parallel", "2", "--ctx-size", "512", "--drain-timeout", "20"]).start()
    try:
        async with aiohttp.ClientSession() as http:
            body = {"prompt": "Write a poem.", "max_tokens": 60, "temperature": 0}
            async with http.post(f"{w.url}/v1/inference", json=body) as resp:
                events = []
                async for ev in iter_sse(resp):
                    events.append(ev)
                    if ev["type"] == "token" and len(events) == 2:
                        w.proc.send_signal(signum)
                        await asyncio.sleep(0.2)
                        async with http.get(f"{w.url}/health") as h:
                            assert (await h.json())["status"] == "draining"
                        async with http.post(f"{w.url}/v1/inference", json={"prompt": "late"}) as late:
                            assert late.status == 503
            assert events[-1]["type"] == "end" and events[-1]["stop_reason"] in ("max_tokens", "eos")
        assert w.wait_exit(30) == 0
        assert "shutdown" in w.actions()
    finally:
        w.stop()


async def test_sigusr1_is_ignored_and_streams_go_on():
    w = WorkerProcess(["--parallel", "1", "--ctx-size", "512"]).start()
    try:
        async with aiohttp.ClientSession() as http:
            body = {"prompt": "Write a poem.", "max_tokens": 20, "temperature": 0, "ignore_eos": True}
            async with http.post(f"{w.url}/v1/inference", json=body) as resp:
                events = []
                async for ev in iter_sse(resp):
                    events.append(ev)
                    if ev["type"] == "token" and len(events) == 2:
                        w.proc.send_signal(signal.SIGUSR1)
            assert events[-1]["type"] == "end" and events[-1]["stop_reason"] == "max_tokens"
            w.wait_for("signal_ignored", 10)
            assert w.proc.poll() is None
            async with http.get(f"{w.url}/health") as h:
                assert (await h.json())["status"] == "ready"
    finally:
        w.stop()
    assert w.proc.returncode == 0
