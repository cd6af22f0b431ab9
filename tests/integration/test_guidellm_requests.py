"""guidellm's default streaming benchmark, as the requests it sends, against the real worker.

guidellm itself is not installed: it depends on torch (and transformers) unconditionally, gigabytes of CUDA wheels
from PyPI for a load generator. What it sends was read from guidellm 0.8.1's OpenAI HTTP backend
(`guidellm/backends/openai/http.py`, `request_handlers.py`, `schemas/backends/openai_http.py`): its default
`openai_http` backend with `request_format="/v1/chat/completions"` and `stream=True` checks `GET /health`, takes the
first id of `GET /v1/models` as the model, then, for synthetic data (`--data prompt_tokens=…,output_tokens=…`), posts
the body built here, through httpx, and reads the SSE lines as `ChatCompletionsRequestHandler.add_streaming_line`
does: a chunk with content is one iteration, the last `usage` seen is the request's token counts.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from tests.integration.worker_process import WorkerProcess

OUTPUT_TOKENS = 16
PROMPTS = ["The quick brown fox jumps over the lazy dog near the river bank.",
           "In a hole in the ground there lived a hobbit.",
           "It was the best of times, it was the worst of times.",
           "Call me Ishmael. Some years ago, never mind how long precisely."]


def guidellm_body(model: str, text: str) -> dict[str, Any]:
    """ChatCompletionsRequestHandler.format for a synthetic request, after guidellm drops the None values
    (`"stop": None` goes)."""
    return {
        "model": model,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "max_completion_tokens": OUTPUT_TOKENS,
        "ignore_eos": True,
        "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}],
    }


async def run_one(client: httpx.AsyncClient, model: str, text: str) -> tuple[list[dict[str, Any]], bool]:
    """One request as guidellm resolves it: every `data:` line parsed, up to `[DONE]`."""
    chunks: list[dict[str, Any]] = []
    done = False
    async with client.stream("POST", "v1/chat/completions", json=guidellm_body(model, text)) as stream:
        stream.raise_for_status()
        assert stream.headers["content-type"].startswith("text/event-stream")
        async for line in stream.aiter_lines():
            if not line.strip():
                continue
            assert line.startswith("data:"), line
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            assert "error" not in chunk, chunk  # guidellm's _check_streaming_error
            chunks.append(chunk)
    return chunks, done


def check_stream(chunks: list[dict[str, Any]], done: bool) -> str:
    assert done, "the stream ends with [DONE]"
    usages = [c.get("usage") for c in chunks]
    assert all(u is not None for u in usages), "continuous_usage_stats: usage in every chunk"
    prompt_tokens = usages[0]["prompt_tokens"]
    assert prompt_tokens > 0 and all(u["prompt_tokens"] == prompt_tokens for u in usages)
    assert all(u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] for u in usages)
    counts = [u["completion_tokens"] for u in usages]
    assert counts == sorted(counts) and counts[-1] == OUTPUT_TOKENS  # ignore_eos: exactly the tokens asked for
    content_chunks = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    # guidellm counts an iteration per content chunk; the usage it keeps is the last chunk's
    assert 0 < len(content_chunks) <= OUTPUT_TOKENS
    for chunk in content_chunks:  # each content chunk counts the tokens that made it
        assert chunk["usage"]["completion_tokens"] >= 1
    *body, last = chunks
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == OUTPUT_TOKENS
    finishes = [c["choices"][0]["finish_reason"] for c in body if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finishes == ["length"]
    assert len({c["id"] for c in chunks}) == 1
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in body if c["choices"])


@pytest.fixture
async def guidellm_client(worker: WorkerProcess):
    # guidellm asks for http2; over cleartext http:// httpx speaks HTTP/1.1 either way (no ALPN, no h2c upgrade)
    async with httpx.AsyncClient(base_url=f"{worker.url}/", timeout=httpx.Timeout(5.0, read=120),
                                 follow_redirects=True, verify=False) as client:
        yield client


async def validate_and_pick_model(client: httpx.AsyncClient) -> str:
    health = await client.get("health")
    health.raise_for_status()
    models = await client.get("v1/models")
    models.raise_for_status()
    return models.json()["data"][0]["id"]


async def test_a_synchronous_streamed_request_has_usage_in_every_chunk(guidellm_client):
    model = await validate_and_pick_model(guidellm_client)
    text = check_stream(*await run_one(guidellm_client, model, PROMPTS[0]))
    assert text.strip()


async def test_concurrent_streams_as_a_throughput_run_sends_them(guidellm_client, worker):
    """guidellm's sweep ends in throughput mode: many streams at once, each one whole and counted."""
    model = await validate_and_pick_model(guidellm_client)
    results = await asyncio.gather(*(run_one(guidellm_client, model, p) for p in PROMPTS))
    texts = [check_stream(chunks, done) for chunks, done in results]
    assert all(t.strip() for t in texts)
    prompt_counts = [chunks[0]["usage"]["prompt_tokens"] for chunks, _ in results]
    assert len(set(prompt_counts)) > 1  # each stream's usage is its own, not a neighbour's
