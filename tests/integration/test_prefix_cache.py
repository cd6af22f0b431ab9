"""The prefix cache on the real model: a cache hit changes nothing but the time, on both test architectures."""

from __future__ import annotations

from collections.abc import Iterator

import aiohttp
import pytest

from tests.integration.worker_process import WorkerProcess, read_sse

GREEDY = {"temperature": 0, "max_tokens": 32}
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a land far away, there lived a dragon who",
    "def fibonacci(n):\n    ",
    "List three colours: red,",
]


def cached_and_plain(args: list[str], timeout: float) -> Iterator[list[WorkerProcess]]:
    """One model in two workers: with the prefix cache (the default), and with it off."""
    pair = [WorkerProcess(args).start(wait_ready=False), WorkerProcess([*args, "--prefix-cache", "off"]).start(False)]
    try:
        for w in pair:
            w.wait_for("model_load_complete", timeout)
        yield pair
    finally:
        for w in pair:
            w.stop()


@pytest.fixture(scope="module")
def workers():
    yield from cached_and_plain(["--parallel", "2", "--ctx-size", "2048"], 60)


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
        again, end2 = await generate(http, cached.url, prompt)  # all of the prompt but its last two tokens cached
        longer, end3 = await generate(http, cached.url, prompt + first)  # the conversation goes on
        assert first == again == fresh, prompt
        assert end2["cached_tokens"] == end2["prompt_tokens"] - 2 > 0
        assert end3["cached_tokens"] >= end1["prompt_tokens"]
        assert longer == (await generate(http, plain.url, prompt + first))[0], prompt


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
    reply, end1 = await generate(http, cached.url, turn1, max_tokens=8)
    turn2 = turn1 + reply + "\nUser: And who kept it?\nAssistant:"
    _, end2 = await generate(http, cached.url, turn2, max_tokens=8)
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
    assert values["llm_worker_kv_pool_cells"] == 2 * 2048  # parallel x ctx-size
    assert 0 < values["llm_worker_kv_pool_cells_cached"] <= values["llm_worker_kv_pool_cells_used"]


# ---- Gemma 3: a sliding-window model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    from tests.integration.test_openai import gemma_gguf

    path = gemma_gguf(tmp_path_factory.mktemp("gemma-cache"))
    yield from cached_and_plain(["--model", str(path), "--parallel", "1", "--ctx-size", "2048"], 90)


async def test_gemma_answers_the_same_with_and_without_a_cache_hit(gemma, http):
    """Gemma 3 attends through a sliding window on most layers. A prefix copied into another sequence gave wrong
    logits there (see Context.reusable), so such a model reuses nothing: every request is computed whole, and the
    text is the text of a worker without a cache, short prompts and prompts longer than the window alike."""
    cached, plain = gemma
    long_prompt = ", ".join(str(i) for i in range(1, 300)) + ","  # longer than the 512 window; goes on clearly
    for prompt in [*PROMPTS[:2], long_prompt]:
        fresh, _ = await generate(http, plain.url, prompt)
        first, _ = await generate(http, cached.url, prompt)
        again, end = await generate(http, cached.url, prompt)
        assert first == again == fresh, prompt[:40]
        assert end["cached_tokens"] == 0


def test_copied_prefix_cells_give_the_logits_of_cells_computed_in_place():
    """The cache's mechanism, exactly: a sequence that takes another's prefix (llama_memory_seq_cp across streams,
    then the tail cut) and decodes the last token gets the very logits of the sequence that computed those cells;
    a prefix one position short does not (so the check can fail)."""
    import llama_cpp as lc
    import numpy as np

    from worker.llamacpp import Context, Model
    from worker.models.resolve import embedded_model_path

    model = Model.load(embedded_model_path(), ref="embedded", fmt="gguf", gpu_layers=0)
    ctx = Context(model, n_ctx=3 * 1024, n_seq=3, n_batch=512, threads=1)
    try:
        tokens = model.tokenize("The capital of France is Paris, and the capital of Spain is " * 20)
        n = len(tokens)
        assert n > 256

        def last_logits(seq: int, pos: int) -> np.ndarray:
            assert ctx.decode([(seq, tokens[-1:], pos, True, False, 0)]) == 0
            return np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx.ptr, 0), shape=(model.n_vocab,)).copy()

        assert ctx.decode([(0, tokens[:-1], 0, False, False, 0)]) == 0
        computed = last_logits(0, n - 1)
        assert ctx.reusable(0, n - 1)
        ctx.copy_prefix(0, 1, n - 1)
        assert np.array_equal(last_logits(1, n - 1), computed)
        ctx.copy_prefix(0, 2, n - 2)  # one cell short: the last token sits at the wrong position
        assert not np.allclose(last_logits(2, n - 2), computed, atol=1e-3)
    finally:
        ctx.close()
        model.close()


# ---- the host-memory tier (--cache-ram) ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_slot():
    """One slot, so that each long prompt takes the other's cells: with the RAM tier (the default) and without."""
    args = ["--parallel", "1", "--ctx-size", "2048", "--log-level", "debug"]
    pair = [WorkerProcess(args).start(wait_ready=False), WorkerProcess([*args, "--cache-ram", "0"]).start(False)]
    try:
        for w in pair:
            w.wait_for("model_load_complete", 60)
        yield pair
    finally:
        for w in pair:
            w.stop()


async def metric_values(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with http.get(url + "/metrics") as resp:
        text = await resp.text()
    return {name: float(value) for name, value in (line.rsplit(" ", 1) for line in text.splitlines()
                                                    if line.startswith("llm_worker_") and " " in line)}


async def test_a_conversation_evicted_from_its_slot_comes_back_from_ram(one_slot, http):
    """A's cells go to RAM when B takes the only slot; A again is restored from there: its prompt counts as cached,
    its first token comes far sooner, and its greedy text is the text A got first and the text of a worker without
    the tier."""
    ram, plain = one_slot
    a = "You are a helpful assistant for a lighthouse museum. " * 90 + "\nUser: When was it built?\nAssistant:"
    b = "List of the ships that called at the harbour, by year: " * 90 + "\nUser: Which came first?\nAssistant:"
    before = await metric_values(http, ram.url)
    first, end1 = await generate(http, ram.url, a)
    _, end_b = await generate(http, ram.url, b)
    again, end2 = await generate(http, ram.url, a)
    fresh, _ = await generate(http, plain.url, a)
    assert end1["prompt_tokens"] > 900 and end_b["cached_tokens"] == 0
    assert end2["cached_tokens"] == end2["prompt_tokens"] - 2  # all but the last two tokens, as a slot hit
    assert again == first == fresh
    ratio = end2["ttft_ms"] / end1["ttft_ms"]
    print(f"TTFT first {end1['ttft_ms']:.0f} ms, restored from RAM {end2['ttft_ms']:.0f} ms: {ratio:.3f}")
    assert ratio < 0.5
    after = await metric_values(http, ram.url)
    moved = {name: after[f"llm_worker_prefix_cache_ram_{name}"] - before.get(f"llm_worker_prefix_cache_ram_{name}", 0)
             for name in ("saved_total", "restored_total", "restored_tokens_total")}
    assert moved["saved_total"] >= 2  # A for B, then B for A again
    assert moved["restored_total"] == 1 and moved["restored_tokens_total"] == end2["cached_tokens"]
    assert after["llm_worker_prefix_cache_ram_bytes"] > 0 and after["llm_worker_prefix_cache_ram_entries"] >= 1
    assert "prefix_restored_from_ram" in ram.actions() and "prefix_saved_to_ram" in ram.actions()
    plain_metrics = await metric_values(http, plain.url)
    assert plain_metrics["llm_worker_prefix_cache_ram_saved_total"] == 0


async def test_gemma_keeps_nothing_in_ram_and_answers_the_same(gemma, http):
    """A sliding-window model's cells are not reusable (Context.reusable), so the tier saves nothing for it: the
    evicted prompt is computed again, with the same greedy text."""
    cached, _ = gemma
    a = ", ".join(str(i) for i in range(1, 300)) + ","
    b = ", ".join(str(i) for i in range(1000, 1300, 2)) + ","
    first, _ = await generate(http, cached.url, a)
    await generate(http, cached.url, b)
    again, end = await generate(http, cached.url, a)
    assert again == first and end["cached_tokens"] == 0
    values = await metric_values(http, cached.url)
    assert values["llm_worker_prefix_cache_ram_saved_total"] == 0
    assert values["llm_worker_prefix_cache_ram_entries"] == 0


def test_a_sequence_restored_from_ram_gives_the_logits_of_cells_computed_in_place():
    """The RAM tier's mechanism, exactly: a sequence saved (llama_state_seq_get_data_ext) and restored into another,
    emptied sequence decodes the last token to the very logits of the sequence that computed the cells; a damaged
    state is refused (False), never a crash, and leaves the sequence empty."""
    import numpy as np

    from worker.llamacpp import Context, Model
    from worker.models.resolve import embedded_model_path

    model = Model.load(embedded_model_path(), ref="embedded", fmt="gguf", gpu_layers=0)
    ctx = Context(model, n_ctx=2 * 1024, n_seq=2, n_batch=512, threads=1)
    try:
        tokens = model.tokenize("The capital of France is Paris, and the capital of Spain is " * 20)
        n = len(tokens)

        def last_logits(seq: int) -> np.ndarray:
            assert ctx.decode([(seq, tokens[-1:], n - 1, True, False, 0)]) == 0
            out = ctx.logits(0).copy()
            ctx.keep_prefix(seq, n - 1)
            return out

        assert ctx.decode([(0, tokens[:-1], 0, False, False, 0)]) == 0
        computed = last_logits(0)
        state = ctx.save_sequence(0)
        assert state is not None and state.nbytes > 20_000 * (n - 1)  # SmolLM2: 23,052 bytes a cell
        assert ctx.restore_sequence(1, state)
        assert np.array_equal(last_logits(1), computed)
        ctx.forget(1)
        assert not ctx.restore_sequence(1, state[: state.nbytes // 2])
        assert ctx.decode([(0, tokens[:1], 0, True, False, 0)]) != 0  # a sequence holding cells takes no position 0
        assert ctx.decode([(1, tokens[:1], 0, True, False, 0)]) == 0  # the refused one is empty
    finally:
        ctx.close()
        model.close()
