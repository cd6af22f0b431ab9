"""Hostile clients: malformed input is a 400 (or 401/413/417) in the contract's JSON error shape, never a 500, a
text page or a hang."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.integration.worker_process import WorkerProcess, iter_sse

INT_5000 = "1" * 5000  # over CPython's 4,300-digit limit on int(str)


async def raw_request(url: str, data: bytes, read_timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are on a fresh connection; the first answer's status, headers and body."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        return await read_response(reader, read_timeout)
    finally:
        writer.close()


async def read_response(reader: asyncio.StreamReader, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    length = int(headers.get("content-length", "0"))
    body = await asyncio.wait_for(reader.readexactly(length), timeout) if length else b""
    return status, headers, body


@pytest.mark.parametrize("path", ["/v1/inference", "/v1/completions"])
async def test_huge_integer_literal_is_400(worker, http, path):
    raw = f'{{"prompt": "hi", "max_tokens": {INT_5000}}}'.encode()
    async with http.post(worker.url + path, data=raw, headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 400, await resp.text()
        err = (await resp.json())["error"]
        assert err["code"] == "invalid_request" and "not valid JSON" in err["message"]
        if path == "/v1/completions":
            assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("path", ["/v1/inference", "/v1/chat/completions"])
async def test_gzip_header_on_a_plain_body_is_400(worker, http, path):
    body = json.dumps({"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}).encode()
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    async with http.post(worker.url + path, data=body, headers=headers) as resp:
        assert resp.status == 400, await resp.text()
        err = (await resp.json())["error"]
        assert err["code"] == "invalid_request"
        assert err["message"] == "the request body could not be read: Can not decode content-encoding: gzip"
        if path == "/v1/chat/completions":
            assert err["type"] == "invalid_request_error"
    async with http.get(worker.url + "/health") as h:  # nothing broke
        assert h.status == 200


async def test_http_parser_refusal_is_json(worker):
    status, headers, body = await raw_request(
        worker.url, b"GET /health HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n")
    assert status == 400
    assert headers["content-type"].startswith("application/json")
    err = json.loads(body)["error"]
    assert err["code"] == "invalid_request" and "malformed HTTP request" in err["message"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/messages", "/v1/inference"])
async def test_an_encoding_the_worker_cannot_read_is_415_in_a_shape_every_client_reads(worker, http, path):
    """aiohttp refuses a brotli body in its parser, before the route is known: the answer is OpenAI's, Anthropic's
    and the native error shape at once, with no advice to install a Python package."""
    headers = {"Content-Type": "application/json", "Content-Encoding": "br"}
    async with http.post(worker.url + path, data=b'{"prompt": "hi"}', headers=headers) as resp:
        assert resp.status == 415, await resp.text()
        body = await resp.json()
    err = body["error"]
    assert body["type"] == "error" and err["type"] == "invalid_request_error" and "param" in err
    assert err["code"] == "unsupported_media_type" and "Content-Encoding br" in err["message"]
    assert "install" not in err["message"]


async def test_unknown_expect_is_417_json(worker):
    status, headers, body = await raw_request(
        worker.url, b"POST /v1/inference HTTP/1.1\r\nHost: x\r\nExpect: something-else\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
    assert status == 417
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"]["code"] == "expectation_failed"


async def test_full_queue_is_refused_before_tokenizing(http):
    """With the only slot taken and no waiting room, a prompt too long for the context gets 503 `overloaded`, not
    400 `context_length_exceeded`: the queue is checked before the prompt is tokenized."""
    w = WorkerProcess(["--parallel", "1", "--max-queue", "0", "--ctx-size", "512"]).start()
    try:
        hog = {"prompt": "Count: 1, 2, 3,", "max_tokens": 400, "temperature": 0, "ignore_eos": True, "job_id": "hog"}
        async with http.post(f"{w.url}/v1/inference", json=hog) as first:
            async for ev in iter_sse(first):
                if ev["type"] == "token":
                    break
            long_prompt = {"prompt": "word " * 3000, "max_tokens": 4}
            for path, body in (("/v1/inference", long_prompt), ("/v1/completions", long_prompt),
                               ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 3000}]})):
                async with http.post(w.url + path, json=body) as resp:
                    assert resp.status == 503, (path, await resp.text())
                    assert resp.headers["Retry-After"]
                    assert (await resp.json())["error"]["code"] == "overloaded"
            async with http.delete(f"{w.url}/v1/inference/hog") as d:
                assert d.status == 202
        # Once the slot is free, the same prompt is tokenized and refused for what it is.
        for _ in range(100):
            async with http.get(f"{w.url}/health") as h:
                if (await h.json())["slots"]["busy"] == 0:
                    break
            await asyncio.sleep(0.05)
        async with http.post(f"{w.url}/v1/inference", json=long_prompt) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["code"] == "context_length_exceeded"
    finally:
        w.stop()


@pytest.fixture(scope="module")
def token_worker():
    """A token and a small body limit."""
    w = WorkerProcess(["--parallel", "1", "--ctx-size", "512", "--api-token", "s3cret",
                       "--max-body-bytes", "2048"]).start()
    yield w
    w.stop()


def post_head(path: str, headers: list[str], length: int) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: x", "Content-Type: application/json", f"Content-Length: {length}",
             *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.mark.parametrize("path", ["/v1/inference", "/v1/completions", "/health"])
async def test_two_authorization_headers_are_refused(token_worker, path):
    body = b'{"prompt": "hi", "max_tokens": 1, "stream": false}'
    head = post_head(path, ["Authorization: Bearer s3cret", "Authorization: Bearer wrong"], len(body))
    if path == "/health":
        head = head.replace(b"POST", b"GET").replace(b"Content-Length: %d" % len(body), b"Content-Length: 0")
        body = b""
    status, headers, raw = await raw_request(token_worker.url, head + body)
    assert status == 400, raw
    err = json.loads(raw)["error"]
    assert err["code"] == "invalid_request" and "2 Authorization headers" in err["message"]
    if path == "/v1/completions":
        assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("auth,length,status,code", [
    ([], 20, 401, "unauthorized"),
    (["Authorization: Bearer wrong"], 20, 401, "unauthorized"),
    (["Authorization: Bearer s3cret"], 100_000, 413, "body_too_large"),
    (["Authorization: Bearer s3cret", "Authorization: Bearer s3cret"], 20, 400, "invalid_request"),
])
async def test_expect_continue_is_refused_before_the_body(token_worker, auth, length, status, code):
    """The answer comes without the body being sent (no `100 Continue` first), and says the connection closes."""
    host, port = token_worker.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(post_head("/v1/inference", [*auth, "Expect: 100-continue"], length))
        await writer.drain()
        got, headers, raw = await read_response(reader)
        assert got == status, raw
        assert headers["content-type"].startswith("application/json")
        assert json.loads(raw)["error"]["code"] == code
        assert headers["connection"].lower() == "close"
    finally:
        writer.close()


async def test_expect_continue_invites_a_good_request(token_worker):
    body = b'{"prompt": "hi", "max_tokens": 1, "stream": false}'
    host, port = token_worker.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(post_head("/v1/inference", ["Authorization: Bearer s3cret", "Expect: 100-continue"],
                               len(body)))
        await writer.drain()
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10) == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        await writer.drain()
        status, _, raw = await read_response(reader, 60)
        assert status == 200, raw
        assert json.loads(raw)["tokens_out"] == 1
    finally:
        writer.close()
