"""docker/compose.yaml with docker/compose.cpu.yaml under podman-compose: two worker services on the CPU image and
Debian's Prometheus scraping them with docker/prometheus.yml, queried through Prometheus's HTTP API."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.image.conftest import REPORT, ROOT, free_port, http

PROMETHEUS_IMAGE = "localhost/llm-worker-rbee-prometheus:test"
TOKEN = "compose-token"
WORKERS = ("worker-gpu0", "worker-gpu1")


def _podman_compose() -> str:
    beside = Path(sys.executable).parent / "podman-compose"
    found = str(beside) if beside.exists() else shutil.which("podman-compose")
    if found is None:
        pytest.fail("podman-compose is not installed (pip install podman-compose)")
    return found


@pytest.fixture(scope="module")
def prometheus_image(podman, base_image) -> str:
    start = time.monotonic()
    podman("build", "-f", str(ROOT / "docker" / "prometheus" / "Dockerfile"), "--build-arg",
           f"BASE_IMAGE={base_image}", "-t", PROMETHEUS_IMAGE, str(ROOT / "docker" / "prometheus"), timeout=900)
    REPORT["docker/prometheus/Dockerfile build"] = f"{time.monotonic() - start:.0f} s"
    return PROMETHEUS_IMAGE


@pytest.fixture(scope="module")
def stack(podman, cpu_image, prometheus_image, base_image, tmp_path_factory):
    """`podman-compose up` of the workers and Prometheus, on free loopback ports (an override file: the compose
    file's own 8080/8081/9090 may be taken on a shared machine)."""
    ports = {name: free_port() for name in (*WORKERS, "prometheus")}
    inside = {"worker-gpu0": 8080, "worker-gpu1": 8080, "prometheus": 9090}
    override = tmp_path_factory.mktemp("compose") / "ports.yaml"
    override.write_text("services:\n" + "".join(
        f"  {name}:\n    ports: !override [\"127.0.0.1:{port}:{inside[name]}\"]\n" for name, port in ports.items()))
    project = f"llm-worker-rbee-test-{int(time.time())}"
    models = tmp_path_factory.mktemp("models")  # podman, unlike docker, does not make a missing bind source
    env = {"MODELS_DIR": str(models), "LLORCH_API_TOKEN": TOKEN, "LLM_WORKER_IMAGE": cpu_image,
           "PROMETHEUS_IMAGE": prometheus_image, "PYTHON_IMAGE": base_image, "DEBIAN_IMAGE": base_image}
    compose = [_podman_compose(), "-p", project, "-f", str(ROOT / "docker" / "compose.yaml"),
               "-f", str(ROOT / "docker" / "compose.cpu.yaml"), "-f", str(override)]

    def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([*compose, *args], capture_output=True, text=True, timeout=timeout,
                              env={**podman.env, **env}, check=False)

    start = time.monotonic()
    up = run("up", "-d", "--no-build", *WORKERS, "prometheus")
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        yield ports, run, start
    finally:
        down = run("down", "-v", "-t", "45")
        assert down.returncode == 0, down.stdout[-2000:] + down.stderr[-2000:]


def _query(port: int, promql: str) -> list[dict]:
    status, body = http("GET", f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    assert status == 200 and body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_scrapes_both_workers_of_the_compose_file(stack):
    ports, run, start = stack
    for name in WORKERS:
        deadline = time.monotonic() + 180
        while True:
            try:
                if http("GET", f"http://127.0.0.1:{ports[name]}/v1/ready", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, run("logs", name).stdout[-3000:]
            time.sleep(1)
    status, body = http("POST", f"http://127.0.0.1:{ports['worker-gpu0']}/v1/inference",
                        {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0, "stream": False},
                        token=TOKEN)
    assert status == 200 and body["tokens_out"] == 16, body
    # Prometheus scrapes every 15 s (docker/prometheus.yml): wait for a scrape after the request.
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{ports['prometheus']}/-/ready", timeout=5).close()
        except OSError:  # starting: the published port is open before Prometheus listens
            assert time.monotonic() < deadline, run("logs", "prometheus").stdout[-3000:]
            time.sleep(1)
            continue
        up = {r["metric"]["instance"]: r["value"][1] for r in _query(ports["prometheus"], 'up{job="llm-worker"}')}
        tokens = {r["metric"]["instance"]: float(r["value"][1]) for r in _query(
            ports["prometheus"], 'sum by (instance) (llm_worker_generated_tokens_total{job="llm-worker"})')}
        # the split target's first (failed) scrape may come after the workers': wait for it too
        if up.get("worker-gpu0:8080") == "1" and up.get("worker-gpu1:8080") == "1" \
                and "worker-split:8080" in up and tokens.get("worker-gpu0:8080", 0) >= 16:
            break
        assert time.monotonic() < deadline, json.dumps({"up": up, "tokens": tokens})
        time.sleep(2)
    assert tokens.get("worker-gpu1:8080") == 0, tokens
    # worker-split (profile split) is not running: its target is down, as docker/prometheus.yml says.
    assert up.get("worker-split:8080") == "0", up
    info = _query(ports["prometheus"], 'llm_worker_model_info{job="llm-worker"}')
    assert {r["metric"]["instance"] for r in info} == {"worker-gpu0:8080", "worker-gpu1:8080"}, info
    assert all(r["metric"]["backend"] == "cpu" and r["metric"]["gpu"] in ("0", "1") for r in info), info
    REPORT["compose: up to both workers' series in Prometheus"] = f"{time.monotonic() - start:.0f} s"
