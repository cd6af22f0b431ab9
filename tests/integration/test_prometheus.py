"""A real Prometheus server scrapes the worker; its query API must see the worker's series and values."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
from pathlib import Path

import aiohttp
import pytest

from tests.integration.worker_process import WorkerProcess, read_sse

PROMETHEUS = shutil.which("prometheus")
if PROMETHEUS is None and os.environ.get("CI"):
    raise RuntimeError("CI needs the prometheus binary (.ci/run installs Debian's package)")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed (apt-get install prometheus)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def scraped_worker(tmp_path: Path):
    w = WorkerProcess(["--parallel", "2", "--ctx-size", "256", "--worker-id", "prom-1"]).start()
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: llm-worker\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{w.port}']\n"
    )
    prom = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    yield w, f"http://127.0.0.1:{port}"
    prom.terminate()
    prom.wait(20)
    w.stop()


async def query(http: aiohttp.ClientSession, prom: str, expr: str) -> list[dict]:
    async with http.get(f"{prom}/api/v1/query", params={"query": expr}) as resp:
        body = await resp.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


async def test_prometheus_scrapes_the_workers_series(scraped_worker):
    worker, prom = scraped_worker
    async with aiohttp.ClientSession() as http:
        for i in range(2):
            body = {"prompt": f"Line {i}:", "max_tokens": 7, "temperature": 0, "ignore_eos": True}
            async with http.post(f"{worker.url}/v1/inference", json=body) as resp:
                assert (await read_sse(resp))[-1]["type"] == "end"
        # wait for a scrape that saw both requests
        for _ in range(300):
            try:
                generated = await query(http, prom, "llm_worker_generated_tokens_total")
            except aiohttp.ClientError:
                generated = []
            if generated and float(generated[0]["value"][1]) == 14:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"Prometheus never saw 14 generated tokens: {generated}")
        up = await query(http, prom, 'up{job="llm-worker"}')
        assert float(up[0]["value"][1]) == 1
        finished = await query(http, prom, 'llm_worker_requests_finished_total{stop_reason="max_tokens"}')
        assert float(finished[0]["value"][1]) == 2
        requests = await query(http, prom, 'llm_worker_requests_total{route="/v1/inference",code="200"}')
        assert float(requests[0]["value"][1]) == 2
        ttft = await query(http, prom, "llm_worker_time_to_first_token_seconds_count")
        assert float(ttft[0]["value"][1]) == 2
        info = await query(http, prom, "llm_worker_model_info")
        assert info[0]["metric"]["architecture"] == "llama" and info[0]["metric"]["backend"] == "cpu"
        slots = await query(http, prom, "llm_worker_slots_total")
        assert float(slots[0]["value"][1]) == 2
