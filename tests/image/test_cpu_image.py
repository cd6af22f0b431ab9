"""Dockerfile.cpu built with podman on a local Debian base and run as users run it: no arguments, a token, a
mounted model, a cache volume, `podman stop`. Every check goes through the container's published port or podman."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.image.conftest import BASE_IMAGE, ROOT, Container, http

TOKEN_LINE = re.compile(r"generated API token: (\S+)")
USER_ID = "10001"


@pytest.fixture(scope="module")
def default_container(cpu_image, run_container) -> tuple[Container, str]:
    """`podman run -p ...:8080 IMAGE`: no arguments, no token."""
    container = run_container(cpu_image)
    container.wait_ready()
    found = TOKEN_LINE.findall(container.logs())
    assert len(found) == 1, f"the generated token must be printed once:\n{container.logs()[-3000:]}"
    return container, found[0]


def test_no_arguments_serves_the_embedded_model_behind_a_generated_token(default_container):
    container, token = default_container
    assert len(token) >= 32
    prompt = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "stream": False}
    status, body = http("POST", container.url + "/v1/inference", prompt)
    assert status == 401, body
    status, body = http("POST", container.url + "/v1/inference", prompt, token="not-" + token)
    assert status == 401, body
    status, body = http("POST", container.url + "/v1/inference", prompt, token=token)
    assert status == 200 and body["tokens_out"] == 8 and body["text"], body
    status, health = http("GET", container.url + "/health")
    assert status == 200 and health["status"] == "ready" and health["backend"] == "cpu", health
    assert "SmolLM2" in json.dumps(health["model"]), health["model"]


def test_ready_and_the_healthcheck_report_healthy(default_container, podman):
    container, _ = default_container
    status, ready = http("GET", container.url + "/v1/ready")
    assert status == 200 and ready["ready"] is True, ready
    # The image's HEALTHCHECK, run by podman inside the container (no systemd timer here to run it on schedule).
    config = podman.inspect(container.name)["Config"]
    assert "/app/docker/healthcheck.py" in json.dumps(config.get("Healthcheck") or config.get("HealthCheck")), config
    result = podman("healthcheck", "run", container.name, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    state = container.state()
    health = state.get("Health") or state.get("Healthcheck")
    assert health["Status"] == "healthy", health


def test_the_worker_is_pid_1_and_not_root(default_container, podman):
    container, _ = default_container
    assert podman("exec", container.name, "id", "-u").stdout.strip() == USER_ID
    # PID 1 is the worker itself (the entrypoint execs it), so `podman stop`'s SIGTERM reaches it.
    status = podman("exec", container.name, "cat", "/proc/1/status").stdout
    assert re.search(rf"^Uid:\s+{USER_ID}\s", status, re.MULTILINE), status
    cmdline = podman("exec", container.name, "cat", "/proc/1/cmdline").stdout.replace("\0", " ")
    assert "llm-worker-rbee" in cmdline, cmdline


def test_without_a_token_and_forbidden_to_generate_one_it_exits_2(cpu_image, podman):
    result = podman("run", "--rm", "-e", "LLORCH_API_TOKEN_GENERATE=0", cpu_image, check=False, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "LLORCH_API_TOKEN" in result.stderr and "generated API token" not in result.stderr


def test_image_has_no_compiler_and_reports_its_size(cpu_image, podman):
    found = podman("run", "--rm", "--entrypoint", "sh", cpu_image, "-c",
                   "command -v gcc cc g++ cmake nvcc || true").stdout.split()
    assert found == [], f"a build tool in the runtime image: {found}"
    size = int(podman("image", "inspect", "--format", "{{.Size}}", cpu_image).stdout)
    base = int(podman("image", "inspect", "--format", "{{.Size}}", BASE_IMAGE).stdout)
    # measured: base 161 MB + venv (numpy, aiohttp, pydantic, hub, llama.cpp with its CPU variants) + 98 MB model
    assert size - base < 700e6, f"the image adds {(size - base) / 1e6:.0f} MB to its base"


def test_stop_drains_a_running_stream_and_exits_0(cpu_image, run_container, podman):
    container = run_container(cpu_image, env={"LLORCH_API_TOKEN": "drain-token"})
    container.wait_ready()
    max_tokens = 400
    request = urllib.request.Request(
        container.url + "/v1/inference", method="POST",
        headers={"Authorization": "Bearer drain-token", "Content-Type": "application/json"},
        data=json.dumps({"prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0,
                         "ignore_eos": True}).encode())
    response = urllib.request.urlopen(request, timeout=120)
    events: list[dict] = []
    first_token = threading.Event()

    def read() -> None:
        for line in response:
            if line.startswith(b"data: "):
                events.append(json.loads(line[6:]))
                if events[-1]["type"] == "token":
                    first_token.set()

    reader = threading.Thread(target=read)
    reader.start()
    assert first_token.wait(60), events
    stopped: list = []
    stopper = threading.Thread(target=lambda: stopped.append(podman("stop", "-t", "45", container.name,
                                                                     check=False, timeout=90)))
    started = time.monotonic()
    stopper.start()
    # While the stream runs, the worker says it drains and turns new work away.
    health, refused = None, None
    while reader.is_alive() and health is None:
        try:
            _, body = http("GET", container.url + "/health", timeout=5)
            if body.get("status") == "draining":
                health = body
                refused, _ = http("POST", container.url + "/v1/inference", {"prompt": "x", "max_tokens": 1},
                                  token="drain-token", timeout=10)
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    reader.join(60)
    stopper.join(90)
    assert health is not None, f"never saw /health draining while the stream ran; events: {events[-2:]}"
    assert refused == 503
    end = events[-1]
    assert end["type"] == "end" and end["tokens_out"] == max_tokens and end["stop_reason"] == "max_tokens", end
    assert sum(e["type"] == "token" for e in events) == max_tokens
    assert stopped and stopped[0].returncode == 0, stopped
    state = container.state()
    assert not state["Running"] and state["ExitCode"] == 0, (state, container.logs()[-3000:])
    assert time.monotonic() - started < 45, "podman stop had to kill the worker"


def test_a_model_mounted_read_only_and_a_cache_volume(cpu_image, run_container, podman, tmp_path):
    from tests.convert_reference import make_tiny_checkpoint

    models = tmp_path / "models"
    make_tiny_checkpoint(models / "tiny-llama", "llama", dtype="BF16")
    for path in [models, *models.rglob("*")]:  # the container's user is not the files' owner
        path.chmod(0o755 if path.is_dir() else 0o644)
    volume = f"llm-worker-rbee-test-cache-{time.monotonic_ns() % 10**9}"
    podman("volume", "create", volume)
    env = {"LLORCH_API_TOKEN": "models-token", "LLM_WORKER_MODEL": "/models/tiny-llama", "LLORCH_LOG_FORMAT": "json"}
    mounts = ("-v", f"{models}:/models:ro", "-v", f"{volume}:/cache")
    try:
        # A SafeTensors folder from /models, converted to GGUF into the cache volume by the non-root user.
        first = run_container(cpu_image, *mounts, env=env, cmd=("--ctx-size", "128"))
        first.wait_ready()
        status, body = http("POST", first.url + "/v1/inference", {"prompt": "Hello", "max_tokens": 4,
                                                                  "temperature": 0, "stream": False},
                            token="models-token")
        assert status == 200 and body["tokens_out"] == 4, body
        _, health = http("GET", first.url + "/health")
        assert health["model"]["format"] == "safetensors" and health["model"]["architecture"] == "llama", health
        assert "safetensors_convert_complete" in first.logs()
        denied = podman("exec", first.name, "touch", "/models/tiny-llama/probe", check=False)
        assert denied.returncode != 0 and "Read-only file system" in denied.stderr, denied
        podman("stop", "-t", "45", first.name)
        # The next container on the same volume finds the conversion there.
        again = run_container(cpu_image, *mounts, env=env, cmd=("--ctx-size", "128"))
        again.wait_ready()
        assert "safetensors_convert_cached" in again.logs() and "safetensors_convert_start" not in again.logs()
        podman("stop", "-t", "45", again.name)
    finally:
        podman("volume", "rm", "-f", volume, check=False)


def test_dockerignore_keeps_the_build_context_to_what_the_images_copy(podman, base_image, tmp_path):
    """The engine's own .dockerignore matching: a throwaway build that copies the whole context."""
    probe = tmp_path / "Containerfile"
    probe.write_text(f"FROM {base_image}\nCOPY . /context\n")
    image = "localhost/llm-worker-rbee-context-probe:test"
    try:
        podman("build", "-q", "-f", str(probe), "-t", image, str(ROOT), timeout=300)
        listed = set(podman("run", "--rm", "--entrypoint", "sh", image, "-c",
                            "cd /context && find . -type f | sed 's#^./##'").stdout.split())
    finally:
        podman("rmi", "-f", image, check=False)
    for needed in ("pyproject.toml", "README.md", "worker/cli.py", "configs/cpu.toml", "docker/entrypoint.sh",
                   "docker/healthcheck.py", "docker/build-wheel.sh"):
        assert needed in listed, f".dockerignore keeps {needed} out"
    assert not [p for p in listed if p.startswith((".git/", ".venv/", "tests/", "bench/", "docs/"))], \
        sorted(listed)[:20]
    assert not [p for p in listed if "__pycache__" in p or p.endswith(".pyc")]
    assert {p for p in listed if p.startswith("wheels/")} <= {
        str(p.relative_to(ROOT)) for p in Path(ROOT, "wheels").glob("llama_cpp_python-*.whl")}
