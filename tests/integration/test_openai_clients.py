"""What common clients trip over besides the core routes, against the real worker with real clients: guidellm's
stream_options, lm-eval's batched prompts and its remote tokenizer (vLLM's /tokenize, /detokenize, /tokenizer_info),
clean model ids, and CORS for browser apps."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import aiohttp
import jinja2
import openai
import pytest

from tests.integration.worker_process import WorkerProcess
from worker.models.resolve import embedded_model_path

PROMPTS = ["Once upon a time,", "The capital of France is", "1, 2, 3, 4,"]
GREEDY = {"temperature": 0, "max_tokens": 12}


def sdk(worker: WorkerProcess, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{worker.url}/v1", api_key=api_key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def client(worker) -> openai.OpenAI:
    return sdk(worker)


# ---- stream_options ---------------------------------------------------------------------------------------------


def test_continuous_usage_stats_puts_the_usage_so_far_in_every_chunk(client):
    """guidellm's default streaming request: include_usage and vLLM's continuous_usage_stats."""
    messages = [{"role": "user", "content": "Count to ten."}]
    whole = client.chat.completions.create(model="m", messages=messages, **GREEDY)
    chunks = list(client.chat.completions.create(
        model="m", messages=messages, stream=True, **GREEDY,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    *body, last = chunks
    assert all(c.usage is not None for c in chunks)
    assert all(c.usage.prompt_tokens == whole.usage.prompt_tokens for c in chunks)
    counts = [c.usage.completion_tokens for c in body]
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == whole.usage.completion_tokens
    assert all(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens for c in chunks)
    assert last.choices == [] and last.usage.completion_tokens == whole.usage.completion_tokens
    assert "".join(c.choices[0].delta.content or "" for c in body) == whole.choices[0].message.content


def test_unknown_stream_options_are_ignored(client):
    chunks = list(client.completions.create(model="m", prompt=PROMPTS[0], stream=True, **GREEDY,
                                            stream_options={"include_usage": True, "some_future_key": [1, 2]}))
    assert chunks[-1].usage.completion_tokens == 12 and all(c.usage is None for c in chunks[:-1])
    with pytest.raises(openai.BadRequestError) as err:  # a known key of the wrong type is still refused
        client.completions.create(model="m", prompt="hi", stream=True, stream_options={"include_usage": "yes"})
    assert err.value.param == "stream_options.include_usage"


# ---- a list of prompts ------------------------------------------------------------------------------------------


def test_a_list_of_prompts_is_one_choice_per_prompt_in_order(client):
    alone = [client.completions.create(model="m", prompt=p, **GREEDY) for p in PROMPTS]
    batch = client.completions.create(model="m", prompt=PROMPTS, **GREEDY)
    assert [c.index for c in batch.choices] == [0, 1, 2]
    assert [c.text for c in batch.choices] == [a.choices[0].text for a in alone]
    assert batch.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert batch.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    ids = [client.post("/tokenize", body={"text": p}, cast_to=object)["tokens"] for p in PROMPTS]
    by_ids = client.completions.create(model="m", prompt=ids, **GREEDY)
    assert [c.text for c in by_ids.choices] == [c.text for c in batch.choices]


def test_a_streamed_list_of_prompts_tags_every_chunk_with_its_choice(client):
    batch = client.completions.create(model="m", prompt=PROMPTS, **GREEDY)
    texts = ["", "", ""]
    finishes: dict[int, str] = {}
    stream = client.completions.create(model="m", prompt=PROMPTS, stream=True, stream_options={"include_usage": True},
                                       **GREEDY)
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
        if not chunk.choices:
            assert chunk.usage.completion_tokens == batch.usage.completion_tokens
    assert texts == [c.text for c in batch.choices]
    assert finishes == {c.index: c.finish_reason for c in batch.choices}


@pytest.mark.parametrize("prompt,param", [(["ok", ""], "prompt"), (["ok", [49152]], "prompt.1"),
                                           (["ok", []], "prompt"), (["ok", 5], "prompt")])
def test_a_bad_prompt_in_a_list_is_refused_and_nothing_runs(client, prompt, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="m", prompt=prompt, max_tokens=2)
    assert err.value.param == param


def test_too_many_prompts_for_the_worker_are_refused(client):
    with pytest.raises(openai.BadRequestError) as err:  # 4 slots + a queue of 8
        client.completions.create(model="m", prompt=["x"] * 13, max_tokens=1)
    assert err.value.param == "prompt" and "13 sequences" in err.value.message
    assert len(client.completions.create(model="m", prompt=["x"] * 12, max_tokens=1).choices) == 12


# ---- vLLM's tokenizer routes, as lm-eval's remote tokenizer calls them ---------------------------------------------


async def test_vllm_tokenizer_routes_serve_the_models_vocabulary_and_template(worker, client):
    async with aiohttp.ClientSession(base_url=worker.url) as http:
        async with http.get("/tokenizer_info") as resp:
            assert resp.status == 200
            info = await resp.json()
        assert info["eos_token"] == "<|im_end|>" and info["bos_token"] == "<|im_start|>"
        assert info["chat_template"] and "im_start" in info["chat_template"]
        assert info["model_max_length"] == 1024 and info["vocab_size"] == 49152

        text = "Hello, world! <|im_end|>"
        async with http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}) as resp:
            tokenized = await resp.json()
        own = client.post("/tokenize", body={"text": text, "add_special": False}, cast_to=object)["tokens"]
        assert tokenized["tokens"] == own and tokenized["count"] == len(own) and tokenized["max_model_len"] == 1024
        assert tokenized["tokens"][-1] == 2  # the special token in the text is that token, as a HF tokenizer reads it
        async with http.post("/tokenize", json={"prompt": "Hi", "return_token_strs": True}) as resp:
            assert (await resp.json())["token_strs"] == ["Hi"]
        async with http.post("/detokenize", json={"tokens": own}) as resp:  # special tokens as their text
            assert await resp.json() == {"prompt": text}
        async with http.post("/tokenize", json={"prompt": "Hi<|im_end|>", "add_special_tokens": False,
                                                "return_token_strs": True}) as resp:
            assert (await resp.json())["token_strs"] == ["Hi", "<|im_end|>"]

        # messages through the chat template: the very tokens the chat route prompts with
        messages = [{"role": "user", "content": "Name a colour."}]
        async with http.post("/tokenize", json={"messages": messages}) as resp:
            chat_tokens = (await resp.json())["tokens"]
        answer = client.chat.completions.create(model="m", messages=messages, **GREEDY)
        assert len(chat_tokens) == answer.usage.prompt_tokens
        # and the served template renders the same prompt client-side (what lm-eval does with it)
        rendered = jinja2.Environment().from_string(info["chat_template"]).render(
            messages=messages, add_generation_prompt=True)
        async with http.post("/tokenize", json={"prompt": rendered, "add_special_tokens": False}) as resp:
            assert (await resp.json())["tokens"] == chat_tokens

        for body, param in (({"prompt": "x", "messages": messages}, None), ({}, None),
                            ({"prompt": "x", "frobnicate": 1}, "frobnicate"),
                            ({"messages": [{**messages[0], "audio": {}}]}, "messages.0.audio")):
            async with http.post("/tokenize", json=body) as resp:
                err = (await resp.json())["error"]
            assert resp.status == 400 and set(err) == {"message", "type", "param", "code"} and err["param"] == param
        async with http.post("/detokenize", json={"tokens": [49152]}) as resp:
            assert resp.status == 400 and (await resp.json())["error"]["param"] == "tokens"


# ---- model ids: clean, never a host path --------------------------------------------------------------------------


async def test_model_ids_are_clean_and_no_open_route_shows_a_host_path(worker, client):
    [model] = client.models.list().data
    assert model.id == "SmolLM2-135M-Instruct.Q4_1" and model.meta["ref"] == model.id
    assert client.completions.create(model="m", prompt="Hi", max_tokens=1).model == model.id
    assert client.models.retrieve(model.id).id == model.id
    home = embedded_model_path().parent  # where the model file lies on this host
    async with aiohttp.ClientSession(base_url=worker.url) as http:
        for path in ("/health", "/v1/ready", "/metrics", "/v1/models", "/v1/loading/progress", "/tokenizer_info"):
            async with http.get(path) as resp:
                body = await resp.text()
            assert resp.status == 200, path
            assert str(home) not in body and "embedded:" not in body, path
        async with http.get("/health") as resp:
            assert (await resp.json())["model"]["ref"] == model.id


async def test_served_model_name_is_the_id_everywhere():
    w = WorkerProcess(["--parallel", "1", "--ctx-size", "128", "--served-model-name", "acme/tiny-chat"]).start()
    try:
        c = sdk(w)
        assert [m.id for m in c.models.list().data] == ["acme/tiny-chat"]
        assert c.models.retrieve("acme/tiny-chat").id == "acme/tiny-chat"
        assert c.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}],
                                         max_tokens=1).model == "acme/tiny-chat"
        async with aiohttp.ClientSession(base_url=w.url) as http:
            async with http.get("/health") as resp:
                assert (await resp.json())["model"]["ref"] == "acme/tiny-chat"
            async with http.get("/metrics") as resp:
                assert 'model="acme/tiny-chat"' in await resp.text()
            async with http.post("/v1/inference", json={"prompt": "Hi", "max_tokens": 1}) as resp:
                assert '"model":"acme/tiny-chat"' in await resp.text()
    finally:
        w.stop()


# ---- CORS -------------------------------------------------------------------------------------------------------

APP_ORIGIN = "http://app.example:3000"


@pytest.fixture(scope="module")
def cors_worker():
    w = WorkerProcess(["--parallel", "1", "--ctx-size", "128", "--api-token", "s3cret",
                       "--cors-allow-origins", f"{APP_ORIGIN}, https://other.example"]).start()
    yield w
    w.stop()


async def test_cors_preflight_is_answered_without_the_token(cors_worker):
    preflight = {"Origin": APP_ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    async with aiohttp.ClientSession(base_url=cors_worker.url) as http:
        async with http.options("/v1/chat/completions", headers=preflight) as resp:
            assert resp.status == 204
            assert resp.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
            assert "POST" in resp.headers["Access-Control-Allow-Methods"]
            assert resp.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
        # the real request then carries the header, a stream's too, and errors as well
        auth = {"Origin": APP_ORIGIN, "Authorization": "Bearer s3cret"}
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True}
        async with http.post("/v1/chat/completions", json=body, headers=auth) as resp:
            assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
            assert "X-Job-Id" in resp.headers["Access-Control-Expose-Headers"]
            assert "Origin" in resp.headers.getall("Vary")
            await resp.read()
        async with http.get("/v1/models", headers={"Origin": APP_ORIGIN}) as resp:
            assert resp.status == 401 and resp.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
        # another origin: no CORS answer, so the browser blocks it; and the preflight still needs the token
        async with http.options("/v1/chat/completions", headers={**preflight, "Origin": "http://evil.example"}) as r:
            assert r.status in (401, 405) and "Access-Control-Allow-Origin" not in r.headers
        async with http.get("/health", headers={"Origin": "http://evil.example"}) as resp:
            assert resp.status == 200 and "Access-Control-Allow-Origin" not in resp.headers


async def test_cors_is_off_by_default(worker):
    async with aiohttp.ClientSession(base_url=worker.url) as http:
        async with http.options("/v1/chat/completions", headers={
                "Origin": APP_ORIGIN, "Access-Control-Request-Method": "POST"}) as resp:
            assert resp.status == 405 and "Access-Control-Allow-Origin" not in resp.headers
        async with http.get("/health", headers={"Origin": APP_ORIGIN}) as resp:
            assert "Access-Control-Allow-Origin" not in resp.headers


def test_parallel_clients_with_lists_share_the_slots(client):
    """Two batched requests at once (lm-eval with --batch_size and concurrency): every choice comes back."""
    with ThreadPoolExecutor(2) as pool:
        # ignore_eos: 4 tokens a choice whatever is drawn (a draw at temperature 1 ended one early: 11 of 12)
        results = list(pool.map(lambda ps: client.completions.create(model="m", prompt=ps, max_tokens=4,
                                                                     extra_body={"ignore_eos": True}),
                                [PROMPTS, PROMPTS[::-1]]))
    assert [len(r.choices) for r in results] == [3, 3]
    assert all(r.usage.completion_tokens == 12 for r in results)


async def test_a_request_of_several_choices_is_cancelled_whole_by_the_id_its_stream_names(worker):
    """X-Job-Id of a stream of three prompts is the response's id, and DELETE /v1/inference/{it} ends all three
    (each choice's own job is `<id>-<index>`)."""
    body = {"model": "m", "prompt": PROMPTS, "max_tokens": 400, "temperature": 0.8, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}  # uncancelled: 1,200 tokens
    finishes: dict[int, str] = {}
    usage = None
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{worker.url}/v1/completions", json=body) as resp:
            request_id = resp.headers["X-Job-Id"]
            deleted = False
            async for line in resp.content:
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[6:])
                assert chunk["id"] == request_id
                if not deleted:
                    async with http.delete(f"{worker.url}/v1/inference/{request_id}") as d:
                        assert d.status == 202, await d.text()
                    deleted = True
                for choice in chunk["choices"]:
                    if choice["finish_reason"]:
                        finishes[choice["index"]] = choice["finish_reason"]
                usage = chunk.get("usage") or usage
        assert sorted(finishes) == [0, 1, 2] and usage["completion_tokens"] < 3 * 400, (finishes, usage)
        async with http.delete(f"{worker.url}/v1/inference/{request_id}") as d:
            assert d.status == 404


async def test_a_request_whose_sequences_do_not_all_fit_now_is_refused_whole_and_says_so(worker, client):
    """4 slots and a queue of 8, one slot busy: 12 prompts do not fit (11 would). 503, with a message about this
    request's sequences, not a count of waiting requests that were its own."""
    body = {"model": "m", "prompt": "Once", "max_tokens": 400, "temperature": 0.8, "stream": True,
            "ignore_eos": True}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{worker.url}/v1/completions", json=body) as resp:
            await resp.content.readline()  # running
            with pytest.raises(openai.InternalServerError) as err:
                await asyncio.to_thread(client.completions.create, model="m", prompt=["x"] * 12, max_tokens=1)
            assert err.value.status_code == 503 and err.value.code == "overloaded"
            assert "12 sequences do not fit" in err.value.message and "take 11 more" in err.value.message
