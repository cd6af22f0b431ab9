"""The native API against the real worker, the real model and a real HTTP client."""

from __future__ import annotations

import asyncio

import pytest

from tests.integration.worker_process import iter_sse, read_sse

PROMPT = "Once upon a time, in a small village by the sea,"
GREEDY = {"temperature": 0, "max_tokens": 48}


async def stream(http, worker, body):
    async with http.post(f"{worker.url}/v1/inference", json=body) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        return await read_sse(resp)


def text_of(events):
    return "".join(e["t"] for e in events if e["type"] == "token")


async def test_health_and_ready(http, worker):
    async with http.get(f"{worker.url}/health") as resp:
        health = await resp.json()
    assert resp.status == 200
    assert health["status"] == "ready"
    assert health["slots"] == {"total": 4, "busy": 0}
    assert health["queue"] == {"waiting": 0, "max": 8}
    model = health["model"]
    assert model["architecture"] == "llama" and model["format"] == "gguf"
    assert model["quantization"].startswith("Q4_1")
    assert model["n_vocab"] == 49152 and 100e6 < model["n_params"] < 200e6
    assert model["size_bytes"] > 50e6 and model["n_ctx_train"] == 8192
    async with http.get(f"{worker.url}/v1/ready") as resp:
        ready = await resp.json()
    assert resp.status == 200 and ready["ready"] is True and ready["model"] == model


async def test_stream_events_in_order(http, worker):
    events = await stream(http, worker, {"prompt": PROMPT, **GREEDY, "job_id": "order-1"})
    types = [e["type"] for e in events]
    assert types[0] == "started" and types[-1] == "end"
    assert set(types[1:-1]) == {"token"}
    started, end = events[0], events[-1]
    assert started["job_id"] == "order-1" and started["prompt_tokens"] > 5 and started["started_at"]
    indexes = [e["i"] for e in events if e["type"] == "token"]
    assert indexes == sorted(indexes) and len(set(indexes)) == len(indexes)
    assert end["job_id"] == "order-1" and end["stop_reason"] in ("max_tokens", "eos")
    assert end["prompt_tokens"] == started["prompt_tokens"]
    assert 0 < end["tokens_out"] <= 48
    assert end["ttft_ms"] > 0 and end["decode_time_ms"] >= 0 and end["tokens_per_sec"] >= 0


async def test_greedy_is_deterministic_and_seed_reproduces(http, worker):
    a = text_of(await stream(http, worker, {"prompt": PROMPT, **GREEDY}))
    b = text_of(await stream(http, worker, {"prompt": PROMPT, **GREEDY}))
    assert a and a == b
    sampled = {"prompt": PROMPT, "temperature": 1.0, "max_tokens": 40}
    s1 = text_of(await stream(http, worker, {**sampled, "seed": 1234}))
    s2 = text_of(await stream(http, worker, {**sampled, "seed": 1234}))
    s3 = text_of(await stream(http, worker, {**sampled, "seed": 98765}))
    assert s1 == s2
    assert s3 != s1


async def test_sampling_options_change_the_output(http, worker):
    """Options are applied, not just accepted: a strong repetition penalty changes greedy output."""
    base = text_of(await stream(http, worker, {"prompt": "1, 2, 3, 1, 2, 3, 1, 2, 3,", **GREEDY}))
    penalised = text_of(await stream(http, worker, {"prompt": "1, 2, 3, 1, 2, 3, 1, 2, 3,", **GREEDY,
                                                    "repetition_penalty": 2.0}))
    assert base != penalised
    # top_k=1 is greedy whatever the temperature and seed
    k1 = [text_of(await stream(http, worker, {"prompt": PROMPT, "max_tokens": 24, "temperature": 1.5,
                                               "top_k": 1, "seed": s})) for s in (1, 2)]
    greedy = text_of(await stream(http, worker, {"prompt": PROMPT, "max_tokens": 24, "temperature": 0}))
    assert k1[0] == k1[1] == greedy


async def test_non_streaming_returns_the_streamed_text(http, worker):
    streamed = await stream(http, worker, {"prompt": PROMPT, **GREEDY})
    async with http.post(f"{worker.url}/v1/inference", json={"prompt": PROMPT, **GREEDY, "stream": False}) as resp:
        body = await resp.json()
    assert resp.status == 200
    assert body["text"] == text_of(streamed)
    assert body["tokens_out"] == streamed[-1]["tokens_out"]
    assert body["stop_reason"] == streamed[-1]["stop_reason"]
    assert body["job_id"].startswith("job-")


async def test_stop_string_spanning_two_tokens_never_leaks(http, worker):
    events = await stream(http, worker, {"prompt": PROMPT, **GREEDY})
    pieces = [e["t"] for e in events if e["type"] == "token"]
    # a stop string made of the end of one token and the start of the next
    k = next(i for i in range(2, len(pieces) - 1) if len(pieces[i].strip()) >= 2 and len(pieces[i + 1].strip()) >= 2)
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    full = "".join(pieces)
    expected = full[: full.index(stop)]
    got = await stream(http, worker, {"prompt": PROMPT, **GREEDY, "stop": ["never-there", stop]})
    text = text_of(got)
    assert text == expected
    assert stop not in text
    assert got[-1]["stop_reason"] == "stop_sequence" and got[-1]["stop_sequence_matched"] == stop


async def wait_idle(http, worker, timeout=10.0):
    for _ in range(int(timeout / 0.05)):
        async with http.get(f"{worker.url}/health") as resp:
            health = await resp.json()
        if health["slots"]["busy"] == 0 and health["queue"]["waiting"] == 0:
            return health
        await asyncio.sleep(0.05)
    raise AssertionError(f"slots still busy: {health}")


async def test_cancel_by_delete(http, worker):
    body = {"prompt": PROMPT, "max_tokens": 900, "temperature": 0.8, "job_id": "to-cancel", "stop": []}
    async with http.post(f"{worker.url}/v1/inference", json=body) as resp:
        events = []
        async for ev in iter_sse(resp):
            events.append(ev)
            if ev["type"] == "token" and len(events) == 3:
                async with http.delete(f"{worker.url}/v1/inference/to-cancel") as d:
                    assert d.status == 202, await d.text()
    assert events[-1]["type"] == "end" and events[-1]["stop_reason"] == "cancelled"
    assert events[-1]["tokens_out"] < 900
    await wait_idle(http, worker)
    async with http.delete(f"{worker.url}/v1/inference/to-cancel") as d:
        assert d.status == 404
        assert (await d.json())["error"]["code"] == "not_found"


async def test_disconnect_cancels_and_frees_the_slot(http, worker):
    body = {"prompt": PROMPT, "max_tokens": 900, "temperature": 0.8, "job_id": "walk-away"}
    resp = await http.post(f"{worker.url}/v1/inference", json=body)
    seen = 0
    async for ev in iter_sse(resp):
        seen += ev["type"] == "token"
        if seen == 2:
            break
    resp.close()  # drop the connection mid-stream
    await wait_idle(http, worker)
    await asyncio.sleep(0.2)
    assert "inference_cancelled" in worker.actions("walk-away")


async def test_concurrent_greedy_requests_match_their_solo_runs(http, worker):
    prompts = [PROMPT, "The capital of France is", "def fibonacci(n):", "List three colours:", "Hello! How are you"]
    solo = [text_of(await stream(http, worker, {"prompt": p, **GREEDY})) for p in prompts]
    together = await asyncio.gather(*(stream(http, worker, {"prompt": p, **GREEDY}) for p in prompts))
    assert [text_of(t) for t in together] == solo


async def test_duplicate_job_id_is_409(http, worker):
    body = {"prompt": PROMPT, "max_tokens": 400, "temperature": 0.8, "job_id": "twice"}
    async with http.post(f"{worker.url}/v1/inference", json=body) as first:
        async for ev in iter_sse(first):
            if ev["type"] == "token":
                break
        async with http.post(f"{worker.url}/v1/inference", json=body) as second:
            assert second.status == 409
            assert (await second.json())["error"]["code"] == "duplicate_job_id"
        async with http.delete(f"{worker.url}/v1/inference/twice") as d:
            assert d.status == 202


INVALID = [
    ({"max_tokens": 10}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "hi", "job_id": "bad id!"}, "job_id"),
    ({"prompt": "hi", "job_id": "x" * 129}, "job_id"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": "12"}, "max_tokens"),
    ({"prompt": "hi", "temperature": -0.1}, "temperature"),
    ({"prompt": "hi", "temperature": 2.5}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "top_p": 1.01}, "top_p"),
    ({"prompt": "hi", "top_k": -1}, "top_k"),
    ({"prompt": "hi", "top_k": 1.5}, "top_k"),
    ({"prompt": "hi", "min_p": 1.5}, "min_p"),
    ({"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "hi", "repetition_penalty": 2.1}, "repetition_penalty"),
    ({"prompt": "hi", "presence_penalty": 3}, "presence_penalty"),
    ({"prompt": "hi", "frequency_penalty": -2.5}, "frequency_penalty"),
    ({"prompt": "hi", "stop": "x"}, "stop"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "hi", "stop": [""]}, "stop"),
    ({"prompt": "hi", "stop": ["é" * 51]}, "stop"),
    ({"prompt": "hi", "seed": -1}, "seed"),
    ({"prompt": "hi", "stream": "yes"}, "stream"),
    ({"prompt": "hi", "narration": 1}, "narration"),
    ({"prompt": "hi", "unknown_option": 1}, "unknown_option"),
]


@pytest.mark.parametrize("body,field", INVALID, ids=[f"{f}-{i}" for i, (_, f) in enumerate(INVALID)])
async def test_invalid_field_is_400_naming_it(http, worker, body, field):
    async with http.post(f"{worker.url}/v1/inference", json=body) as resp:
        err = await resp.json()
    assert resp.status == 400, err
    assert err["error"]["code"] == "invalid_request"
    assert err["error"]["field"] == field
    assert field in err["error"]["message"]


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe", b"", b'"just a string"'])
async def test_malformed_body_is_400(http, worker, raw):
    async with http.post(f"{worker.url}/v1/inference", data=raw,
                         headers={"Content-Type": "application/json"}) as resp:
        err = await resp.json()
    assert resp.status == 400 and err["error"]["code"] == "invalid_request"


async def test_prompt_past_the_context_is_refused(http, worker):
    long_prompt = "word " * 1100
    async with http.post(f"{worker.url}/v1/inference", json={"prompt": long_prompt, "max_tokens": 10}) as resp:
        err = (await resp.json())["error"]
    assert resp.status == 400 and err["code"] == "context_length_exceeded"
    assert err["n_ctx"] == 1024 and err["prompt_tokens"] > 1024
    # prompt fits, prompt + max_tokens does not
    async with http.post(f"{worker.url}/v1/inference", json={"prompt": "word " * 500, "max_tokens": 600}) as resp:
        assert resp.status == 400 and (await resp.json())["error"]["code"] == "context_length_exceeded"
    await wait_idle(http, worker)


async def test_long_prompt_is_prefilled_in_chunks(http, worker):
    """A prompt longer than the batch size (512) is decoded over several steps and still answers."""
    prompt = " ".join(f"item {i}," for i in range(120))
    events = await stream(http, worker, {"prompt": prompt, "max_tokens": 8, "temperature": 0})
    assert events[0]["prompt_tokens"] > 512
    assert events[-1]["type"] == "end" and events[-1]["tokens_out"] >= 1


async def test_unknown_route_and_method_are_json(http, worker):
    async with http.get(f"{worker.url}/nope") as resp:
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
    async with http.get(f"{worker.url}/v1/inference") as resp:
        assert resp.status == 405 and (await resp.json())["error"]["code"] == "method_not_allowed"


async def test_narration_in_the_stream(http, worker):
    events = await stream(http, worker, {"prompt": PROMPT, **GREEDY, "narration": True, "job_id": "narrated"})
    narration = [e for e in events if e["type"] == "narration"]
    assert [n["action"] for n in narration] == ["inference_start", "inference_complete"]
    for n in narration:
        assert n["job_id"] == "narrated" and n["human"] and n["actor"] == "engine"
    assert narration[-1]["tokens_out"] == events[-1]["tokens_out"]
    assert events[-1]["type"] == "end"


async def test_ignore_eos_generates_exactly_max_tokens(http, worker):
    """For benchmarks, as llama-server's ignore_eos: this prompt ends by itself well before 40 tokens."""
    body = {"prompt": "Q: What is the capital of France?\nA:", "max_tokens": 40, "temperature": 0}
    plain = await stream(http, worker, body)
    forced = await stream(http, worker, {**body, "ignore_eos": True})
    assert plain[-1]["stop_reason"] == "eos" and plain[-1]["tokens_out"] < 40
    assert forced[-1]["tokens_out"] == 40 and forced[-1]["stop_reason"] == "max_tokens"
    assert text_of(forced).startswith(text_of(plain))


async def test_prompt_that_ends_at_once_gives_zero_tokens(http, worker):
    """The first sampled token is end-of-generation: the stream still has started and end, no tokens."""
    events = await stream(http, worker, {"prompt": "What is 2+2?", "max_tokens": 10, "temperature": 0})
    assert [e["type"] for e in events] == ["started", "end"]
    assert events[-1]["tokens_out"] == 0 and events[-1]["stop_reason"] == "eos"
