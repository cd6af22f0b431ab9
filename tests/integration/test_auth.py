"""The bearer token guards every route but the probes, /metrics and /openapi.json: checked route by route.

The routes come from the app itself (its router), not from a list kept here, so a route added later is checked too.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import aiohttp
import openai
import pytest

from tests.integration.route_table import anthropic_style, openai_style
from tests.integration.worker_process import WorkerProcess
from worker.config import Settings
from worker.http.app import create_app

TOKEN = "t0ken-with.special~chars"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
OPEN = {"/health", "/v1/ready", "/v1/loading/progress", "/metrics", "/openapi.json"}
# A value for each path parameter, and a body that passes auth but fails validation (400): no generation runs.
SAMPLE = {"{job_id}": "no-such-job", "{model_id}": "no-such-model"}




@pytest.fixture(scope="module")
def guarded():
    """The token comes from LLORCH_API_TOKEN, the name the pool manager sets."""
    w = WorkerProcess(["--parallel", "1", "--ctx-size", "256"], env={"LLORCH_API_TOKEN": TOKEN}).start()
    yield w
    w.stop()


async def app_routes() -> list[tuple[str, str]]:
    """(method, path) of every route the worker's app registers, path parameters filled in."""
    app = create_app(Settings(_cli_parse_args=[]))  # built, not started: no model is loaded
    out = []
    for route in app.router.routes():
        path = route.resource.canonical
        for name, value in SAMPLE.items():
            path = path.replace(name, value)
        assert "{" not in path, f"give the path parameter of {path} a sample value in SAMPLE"
        out.append((route.method, path))
    return out


def _unauthorized_shape(path: str, body: dict) -> None:
    err = body["error"]
    if anthropic_style(path):  # Anthropic's shape, so the anthropic SDK raises AuthenticationError
        assert body == {"type": "error", "error": {"type": "authentication_error", "message": err["message"]}}
        return
    if openai_style(path):  # OpenAI's shape, so the openai SDK raises AuthenticationError
        assert set(err) == {"message", "type", "param", "code"}, body
        assert err["type"] == "invalid_request_error"
    else:
        assert set(err) >= {"code", "message"}, body
    assert err["code"] == "unauthorized"


BAD_HEADERS = [
    {},
    {"Authorization": ""},
    {"Authorization": TOKEN},  # no scheme
    {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer "},
    {"Authorization": f"Bearer {TOKEN[:-1]}"},  # a prefix
    {"Authorization": f"Bearer {TOKEN}x"},  # longer
    {"Authorization": f"Bearer {TOKEN.upper()}"},  # tokens are case-sensitive
    {"Authorization": "Bearer é"},  # not ASCII
    {"X-Api-Key": ""},
    {"X-Api-Key": f"{TOKEN}x"},
    {"X-Api-Key": f"Bearer {TOKEN}"},  # the key is the token itself
    {"X-Api-Key": TOKEN, "Authorization": f"Bearer {TOKEN}x"},  # both sent: both must be right
    {"X-Api-Key": "x", **AUTH},
    {"Api-Key": TOKEN},  # no other header or place counts
]


async def test_every_protected_route_refuses_without_the_token(guarded):
    routes = await app_routes()
    assert {p for _, p in routes} >= OPEN | {"/v1/inference", "/v1/chat/completions", "/v1/completions"}
    checked = 0
    async with aiohttp.ClientSession() as http:
        for method, path in routes:
            for headers in BAD_HEADERS:
                async with http.request(method, guarded.url + path, headers=headers, json={}) as resp:
                    if path in OPEN:
                        assert resp.status != 401, (method, path, headers)
                        continue
                    assert resp.status == 401, (method, path, headers, resp.status)
                    assert resp.headers["WWW-Authenticate"] == "Bearer"
                    if method != "HEAD":
                        assert resp.content_type == "application/json"
                        _unauthorized_shape(path, await resp.json())
                    checked += 1
            for good in (AUTH, {"X-Api-Key": TOKEN}, {"X-Api-Key": TOKEN, **AUTH}):
                async with http.request(method, guarded.url + path, headers=good, json={}) as resp:
                    assert resp.status != 401, (method, path)  # the right token passes (then 200, 400 or 404)
    assert checked >= 10 * len(BAD_HEADERS)


async def test_unknown_paths_need_the_token_too(guarded):
    """Nothing but the open routes answers without the token: not even 404s tell what exists."""
    async with aiohttp.ClientSession() as http:
        for path in ("/nope", "/v1/inference/x/y", "/health/", "/v1/../v1/models", "/%2e%2e/v1/models"):
            async with http.get(guarded.url + path) as resp:
                assert resp.status == 401, path
            async with http.get(guarded.url + path, headers=AUTH) as resp:
                assert resp.status in (200, 404), path


async def test_scheme_is_case_insensitive_token_is_not(guarded):
    async with aiohttp.ClientSession() as http:
        for header in (f"bearer {TOKEN}", f"BEARER {TOKEN}", f"Bearer  {TOKEN}"):
            async with http.get(f"{guarded.url}/v1/models", headers={"Authorization": header}) as resp:
                assert resp.status == 200, header


async def test_refused_before_the_body_is_read(guarded):
    """An unauthenticated client cannot make the worker read (or buffer) a body: 401, not 413."""
    async with aiohttp.ClientSession() as http, \
            http.post(f"{guarded.url}/v1/inference", data=b"x" * (8 * 1024 * 1024)) as resp:
        assert resp.status == 401


def test_openai_sdk_gets_its_typed_error(guarded):
    client = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as err:
        client.models.list()
    assert err.value.status_code == 401 and err.value.code == "unauthorized"
    good = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key=TOKEN, max_retries=0, timeout=30)
    answer = good.completions.create(model="any", prompt="Hello", max_tokens=2, temperature=0)
    assert answer.usage.completion_tokens >= 1


def test_reachable_host_without_a_token_refuses_to_start():
    hosts = (["--host", "0.0.0.0"], ["--host", "::"], ["--host", "10.1.2.3"], ["--host", "0.0.0.0", "--api-token", ""])
    for args in hosts:  # an empty token is no token
        result = subprocess.run([sys.executable, "-m", "worker", "--port", "0", *args], capture_output=True,
                                text=True, timeout=60, env={"PATH": "/usr/bin:/bin"}, check=False)
        assert result.returncode == 2, (args, result.stderr)
        assert "API token" in result.stderr and "LLORCH_API_TOKEN" in result.stderr


async def test_reachable_host_with_a_token_serves_and_guards():
    w = WorkerProcess(["--host", "0.0.0.0", "--parallel", "1", "--ctx-size", "128"],
                      env={"LLORCH_API_TOKEN": TOKEN}).start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{w.url}/health") as resp:
                assert resp.status == 200
            async with http.get(f"{w.url}/v1/models") as resp:
                assert resp.status == 401
            async with http.get(f"{w.url}/v1/models", headers=AUTH) as resp:
                assert resp.status == 200
    finally:
        w.stop()
    await asyncio.sleep(0)
