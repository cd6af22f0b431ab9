"""Narration, Prometheus metrics, loading progress, the ready callback and the heartbeat, on the real worker."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.worker_process import WorkerProcess, iter_sse, read_sse
from worker.models.resolve import embedded_model_path

STARTUP = ["startup", "server_listening", "model_resolve", "gguf_metadata_loaded", "gguf_tokenizer_extracted",
           "model_load_complete"]


@pytest.fixture(scope="module")
def fresh_worker():
    """A worker nobody else talks to, so its counters are exactly what these tests did."""
    w = WorkerProcess(["--parallel", "2", "--ctx-size", "512", "--worker-id", "obs-1"]).start()
    yield w
    w.stop()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(all_samples, name, **labels) -> float:
    return all_samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_move_by_exactly_what_happened(fresh_worker):
    url = fresh_worker.url
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/metrics") as resp:
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
            before = samples(await resp.text())
        prompt_tokens = 0
        for i in range(3):
            body = {"prompt": f"Story number {i}:", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
            async with http.post(f"{url}/v1/inference", json=body) as resp:
                events = await read_sse(resp)
            prompt_tokens += events[0]["prompt_tokens"]
        body = {"prompt": "One more", "max_tokens": 3, "temperature": 0, "ignore_eos": True, "stream": False}
        async with http.post(f"{url}/v1/inference", json=body) as resp:
            prompt_tokens += (await resp.json())["prompt_tokens"]
        async with http.post(f"{url}/v1/inference", json={"prompt": "x", "top_p": 7}) as resp:
            assert resp.status == 400
        async with http.get(f"{url}/metrics") as resp:
            after = samples(await resp.text())

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("llm_worker_requests_total", route="/v1/inference", code="200") == 4
    assert delta("llm_worker_requests_total", route="/v1/inference", code="400") == 1
    assert delta("llm_worker_request_duration_seconds_count", route="/v1/inference") == 5
    assert delta("llm_worker_generated_tokens_total") == 3 * 5 + 3
    assert delta("llm_worker_prompt_tokens_total") == prompt_tokens
    assert delta("llm_worker_time_to_first_token_seconds_count") == 4
    assert delta("llm_worker_inter_token_latency_seconds_count") == 3 * 4 + 2
    assert delta("llm_worker_queue_wait_seconds_count") == 4
    assert delta("llm_worker_requests_finished_total", stop_reason="max_tokens") == 4
    assert delta("llm_worker_errors_total", code="invalid_request") == 1
    assert value(after, "llm_worker_slots_total") == 2
    assert value(after, "llm_worker_requests_running") == 0
    assert value(after, "llm_worker_requests_waiting") == 0
    assert value(after, "llm_worker_kv_cache_usage_ratio") == 0
    assert value(after, "llm_worker_model_size_bytes") == embedded_model_path().stat().st_size
    assert value(after, "llm_worker_model_load_seconds") > 0
    info = [k for k in after if k[0] == "llm_worker_model_info"]
    assert len(info) == 1
    labels = dict(info[0][1])
    assert labels["architecture"] == "llama" and labels["backend"] == "cpu" and labels["device"] == "cpu"
    assert labels["quantization"].startswith("Q4_1") and "SmolLM2" in labels["model"]


async def test_running_and_kv_gauges_during_a_stream(fresh_worker):
    url = fresh_worker.url
    async with aiohttp.ClientSession() as http:
        body = {"prompt": "Count: 1, 2, 3,", "max_tokens": 300, "temperature": 0, "job_id": "gauge"}
        async with http.post(f"{url}/v1/inference", json=body) as resp:
            async for ev in iter_sse(resp):
                if ev["type"] == "token" and ev["i"] >= 3:
                    break
            async with http.get(f"{url}/metrics") as m:
                during = samples(await m.text())
            async with http.delete(f"{url}/v1/inference/gauge") as d:
                assert d.status == 202
    assert value(during, "llm_worker_requests_running") == 1
    assert 0 < value(during, "llm_worker_kv_cache_usage_ratio") < 1


async def test_narration_success_path_with_ids_and_correlation(fresh_worker):
    url = fresh_worker.url
    actions = fresh_worker.actions()
    # loading starts as the server starts: the model steps are in order, and it listens before it is ready
    assert [a for a in actions if a in STARTUP and a != "server_listening"] == [a for a in STARTUP
                                                                               if a != "server_listening"]
    assert actions.index("server_listening") < actions.index("model_load_complete")
    for event in fresh_worker.events:
        if "action" in event:
            assert event["worker_id"] == "obs-1" and event["human"] and event["actor"] and event["ts"]
    tok = next(e for e in fresh_worker.events if e.get("action") == "gguf_tokenizer_extracted")
    assert tok["vocab_size"] == 49152 and tok["bos"] == "<|im_start|>" and tok["eos"] == "<|im_end|>"
    assert tok["unk"] == "<|endoftext|>"
    async with aiohttp.ClientSession() as http:
        body = {"prompt": "Hello", "max_tokens": 4, "temperature": 0, "job_id": "narr-ok", "ignore_eos": True}
        async with http.post(f"{url}/v1/inference", json=body, headers={"X-Correlation-Id": "corr-42"}) as resp:
            assert resp.headers["X-Correlation-Id"] == "corr-42"
            await read_sse(resp)
        async with http.get(f"{url}/health") as resp:
            assert len(resp.headers["X-Correlation-Id"]) == 32  # generated when the client sends none
    await asyncio.sleep(0.2)
    mine = [e for e in fresh_worker.events if e.get("job_id") == "narr-ok"]
    assert [e["action"] for e in mine] == ["inference_start", "inference_complete"]
    assert all(e["correlation_id"] == "corr-42" for e in mine)
    assert mine[0]["prompt_tokens"] > 0 and mine[1]["tokens_out"] == 4 and mine[1]["duration_ms"] > 0


async def test_loading_progress_stream_ends_with_ready(fresh_worker):
    async with aiohttp.ClientSession() as http, http.get(f"{fresh_worker.url}/v1/loading/progress") as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = await read_sse(resp)
    assert events[-1]["type"] == "ready" and events[-1]["model"]["architecture"] == "llama"
    assert all(e["type"] == "progress" for e in events[:-1]) and events[-2]["progress"] == 1.0


async def test_loading_progress_from_the_first_moment():
    """Watch from the moment the worker listens: progress only goes up, stages in order, then ready."""
    w = WorkerProcess(["--ctx-size", "256"]).start(wait_ready=False)
    try:
        await asyncio.to_thread(w._listening.wait, 30)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{w.url}/v1/loading/progress") as resp:
                events = await read_sse(resp)
            async with http.get(f"{w.url}/v1/ready") as resp:
                assert resp.status == 200
    finally:
        w.stop()
    progress = [e for e in events if e["type"] == "progress"]
    values = [e["progress"] for e in progress]
    assert values == sorted(values) and all(0 <= v <= 1 for v in values) and values[-1] == 1.0
    order = ["starting", "resolve", "load_weights", "warmup", "ready"]
    stages = [order.index(e["stage"]) for e in progress]
    assert stages == sorted(stages)
    assert events[-1]["type"] == "ready"


async def test_failed_load_is_narrated_and_exits_3(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    w = WorkerProcess(["--model", str(bad)]).start(wait_ready=False)
    try:
        code = await asyncio.to_thread(w.wait_exit, 30)
    finally:
        w.stop()
    assert code == 3
    failed = [e for e in w.events if e.get("action") == "model_load_failed"]
    assert failed and failed[0]["level"] == "error" and str(bad) in failed[0]["human"]


class Receiver:
    """A real pool manager stand-in: answers the ready callback with the statuses it is given."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.callbacks: list[dict] = []
        self.heartbeats: list[dict] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/ready", self._ready)
        app.router.add_post("/beat", self._beat)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()

    async def _ready(self, request: web.Request) -> web.Response:
        self.callbacks.append(await request.json())
        status = self.statuses.pop(0) if self.statuses else 200
        return web.json_response({"ok": status == 200}, status=status)

    async def _beat(self, request: web.Request) -> web.Response:
        self.heartbeats.append(await request.json())
        return web.json_response({"ok": True})


async def test_ready_callback_retries_then_heartbeats():
    async with Receiver([503, 500]) as pool:
        w = WorkerProcess(["--worker-id", "cb-1", "--callback-url", f"{pool.url}/ready", "--heartbeat-url",
                           f"{pool.url}/beat", "--heartbeat-interval", "0.3"]).start(wait_ready=False)
        try:
            ready = await asyncio.to_thread(w.wait_for, "callback_ready", 60)
            for _ in range(100):
                if len(pool.heartbeats) >= 2:
                    break
                await asyncio.sleep(0.1)
        finally:
            w.stop()
    assert ready["attempts"] == 3 and len(pool.callbacks) == 3
    payload = pool.callbacks[-1]
    assert set(payload) == {"worker_id", "url", "model_ref", "model", "backend", "device", "vram_bytes", "slots"}
    assert payload["worker_id"] == "cb-1" and payload["url"] == w.url
    assert payload["model"]["architecture"] == "llama" and payload["slots"] == 4 and payload["backend"] == "cpu"
    assert payload["vram_bytes"] == 0
    assert len(pool.heartbeats) >= 2
    beat = pool.heartbeats[0]
    assert set(beat) == {"worker_id", "state", "running", "waiting", "ts"}
    assert beat["worker_id"] == "cb-1" and beat["state"] == "ready" and beat["running"] == 0
    assert [a for a in w.actions() if a.startswith("callback")] == ["callback_retry", "callback_retry",
                                                                     "callback_ready"]


@pytest.mark.parametrize("dead", ["refusing", "unreachable"])
async def test_callback_that_never_succeeds_exits_4(dead):
    async with Receiver([500] * 1000) as pool:
        url = f"{pool.url}/ready" if dead == "refusing" else "http://127.0.0.1:9/ready"
        w = WorkerProcess(["--callback-url", url, "--callback-timeout", "1.5"]).start(wait_ready=False)
        try:
            code = await asyncio.to_thread(w.wait_exit, 60)
        finally:
            w.stop()
    assert code == 4
    failed = [e for e in w.events if e.get("action") == "callback_failed"]
    assert failed and failed[0]["attempts"] >= 2 and failed[0]["level"] == "error"


def test_pretty_log_is_one_readable_line_per_event():
    proc = subprocess.run([sys.executable, "-m", "worker", "--port", "0", "--model", "/nowhere.gguf"],
                          capture_output=True, text=True, check=False, timeout=60)
    lines = [line for line in proc.stderr.splitlines() if "model_load_failed" in line]
    assert len(lines) == 1 and "/nowhere.gguf" in lines[0]
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[0])
