"""The images for real: podman builds Dockerfile.cpu on a local Debian base (docker/base-image.sh), runs the
container, and the tests talk to it over HTTP. They take minutes, so they run only with LLM_WORKER_IMAGE_TESTS=1
(`make image-test`, .ci/run) and are skipped by a plain `make test`.

    LLM_WORKER_IMAGE_TESTS=1 .venv/bin/python -m pytest tests/image -q

Environment:
    LLAMA_CPP_WHEEL   wheels/llama_cpp_python-*.whl made by `docker/build-wheel.sh cpu wheels`: the image takes it
                      instead of compiling llama.cpp again (the build argument of the same name)
    LLM_WORKER_BASE_IMAGE   the Debian base (default localhost/debian-python:bookworm, made if missing)
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BASE_IMAGE = os.environ.get("LLM_WORKER_BASE_IMAGE", "localhost/debian-python:bookworm")
CPU_IMAGE = "localhost/llm-worker-rbee:cpu-test"
ENABLED = os.environ.get("LLM_WORKER_IMAGE_TESTS") == "1"
REPORT: dict[str, str] = {}  # what was measured, printed at the end of the run
_T0 = time.monotonic()


def pytest_collection_modifyitems(config, items):
    if ENABLED:
        return
    skip = pytest.mark.skip(reason="image tests: set LLM_WORKER_IMAGE_TESTS=1 (make image-test; .ci/run does)")
    for item in items:
        if Path(item.fspath).is_relative_to(Path(__file__).parent):
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    if ENABLED and REPORT:
        REPORT["image tests, total"] = f"{time.monotonic() - _T0:.0f} s"
        terminalreporter.section("image tests: measured")
        for key, value in REPORT.items():
            terminalreporter.write_line(f"{key}: {value}")


class Podman:
    """The podman CLI with a containers.conf that works on these machines: runc (crun refuses hybrid cgroups),
    cgroupfs (no systemd), and rlimits no higher than the ones podman's own monitor has (without
    CAP_SYS_RESOURCE a container cannot be given more; podman 4.3's `--ulimit host` still asks for 1048576)."""

    def __init__(self, workdir: Path):
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        nproc = min(resource.getrlimit(resource.RLIMIT_NPROC)[0], 32768)  # conmon runs with at most 32768
        conf = workdir / "containers.conf"
        conf.write_text(f'[containers]\ndefault_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
                        '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\n')
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}

    def __call__(self, *args: str, check: bool = True, timeout: float = 120,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout,
                                env={**self.env, **(env or {})}, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} exited {result.returncode}:\n{result.stderr[-4000:]}")
        return result

    def inspect(self, name: str) -> dict:
        return json.loads(self("inspect", name).stdout)[0]


@pytest.fixture(scope="session")
def podman(tmp_path_factory) -> Podman:
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed (apt-get install podman runc debootstrap)")
    return Podman(tmp_path_factory.mktemp("podman"))


@pytest.fixture(scope="session")
def base_image(podman) -> str:
    start = time.monotonic()
    made = podman("image", "exists", BASE_IMAGE, check=False).returncode != 0
    if made:
        result = subprocess.run(["bash", str(ROOT / "docker" / "base-image.sh"), BASE_IMAGE], capture_output=True,
                                text=True, timeout=900, env={**podman.env, "ENGINE": "podman"}, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
    REPORT[f"base image {BASE_IMAGE}"] = (f"made in {time.monotonic() - start:.0f} s (debootstrap + import)"
                                          if made else "present (docker/base-image.sh makes it)")
    return BASE_IMAGE


@pytest.fixture(scope="session")
def build_secrets(tmp_path_factory) -> list[str]:
    """This machine's pip settings and CA bundle as build secrets (docker/pip-secrets.py)."""
    out = subprocess.run([sys.executable, str(ROOT / "docker" / "pip-secrets.py"),
                          str(tmp_path_factory.mktemp("pip-secrets"))], capture_output=True, text=True, check=True)
    return out.stdout.split()


@pytest.fixture(scope="session")
def cpu_image(podman, base_image, build_secrets) -> str:
    args = ["build", "--format", "docker",  # the docker format keeps HEALTHCHECK (OCI has no such field)
            "-f", str(ROOT / "Dockerfile.cpu"), "--build-arg", f"PYTHON_IMAGE={base_image}", *build_secrets]
    wheel = os.environ.get("LLAMA_CPP_WHEEL")
    if wheel:
        assert (ROOT / wheel).is_file() and wheel.startswith("wheels/"), f"LLAMA_CPP_WHEEL={wheel}: not in wheels/"
        args += ["--build-arg", f"LLAMA_CPP_WHEEL={wheel}"]
    start = time.monotonic()
    podman(*args, "-t", CPU_IMAGE, str(ROOT), timeout=3600)
    size = int(podman("image", "inspect", "--format", "{{.Size}}", CPU_IMAGE).stdout)
    REPORT["Dockerfile.cpu build"] = (f"{time.monotonic() - start:.0f} s (llama.cpp: "
                                      f"{'prebuilt ' + wheel if wheel else 'compiled in the builder'}; "
                                      "unchanged layers come from podman's cache)")
    REPORT["Dockerfile.cpu image size"] = f"{size / 1e6:.0f} MB"
    return CPU_IMAGE


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: dict | None = None, token: str | None = None,
         timeout: float = 60) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@dataclass
class Container:
    podman: Podman
    name: str
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        result = self.podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def state(self) -> dict:
        return self.podman.inspect(self.name)["State"]

    def wait_ready(self, timeout: float = 180) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.state()["Running"]:
                raise AssertionError(f"{self.name} exited {self.state()['ExitCode']}:\n{self.logs()[-4000:]}")
            try:
                status, body = http("GET", self.url + "/v1/ready", timeout=5)
                if status == 200:
                    return body
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise AssertionError(f"{self.name} not ready after {timeout} s:\n{self.logs()[-4000:]}")


@pytest.fixture(scope="module")
def run_container(podman) -> Iterator:
    """Starts containers (`podman run -d`, port 8080 published on a free loopback port); removes them after."""
    names: list[str] = []

    def start(image: str, *args: str, env: dict[str, str] | None = None, cmd: tuple[str, ...] = ()) -> Container:
        name = f"llm-worker-rbee-test-{os.getpid()}-{len(names)}-{time.monotonic_ns() % 10**6}"
        port = free_port()
        flags = [f"--env={k}={v}" for k, v in (env or {}).items()]
        podman("run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8080", *flags, *args, image, *cmd)
        names.append(name)
        return Container(podman, name, port)

    yield start
    for name in names:
        podman("rm", "-f", "-t", "0", name, check=False)
