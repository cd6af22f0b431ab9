"""POST /v1/messages and /v1/messages/count_tokens with Anthropic's real SDK against the real worker.

The embedded SmolLM2 for text and (in the generic constrained form) tool calls; the tiny random-weight Qwen 3
(tests/chat_models.py) for thinking blocks. This SDK version sends no temperature of its own: greedy decoding goes in
extra_body, as any field the SDK does not know.
"""

from __future__ import annotations

import json
from pathlib import Path

import anthropic
import httpx
import jsonschema
import pytest

from tests.chat_models import qwen3_tools_gguf  # noqa: F401 (session fixture)
from tests.integration.worker_process import WorkerProcess

WEATHER = {"name": "get_weather", "description": "The weather in a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                            "required": ["city"]}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
HELLO = [{"role": "user", "content": "Say hello."}]
GREEDY = {"extra_body": {"temperature": 0}}
TOKEN = "a-secret-token"


def sdk(worker: WorkerProcess, **auth: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=worker.url, max_retries=0, timeout=120, **({"api_key": "unused"} | auth))


@pytest.fixture(scope="module")
def client(worker) -> anthropic.Anthropic:
    return sdk(worker)


def test_a_plain_message(client):
    m = client.messages.create(model="m", max_tokens=16, system="Answer briefly.", messages=HELLO, **GREEDY)
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_")
    assert [b.type for b in m.content] == ["text"] and m.content[0].text
    assert m.stop_reason in ("end_turn", "max_tokens") and m.stop_sequence is None
    assert 0 < m.usage.output_tokens <= 16 and m.usage.input_tokens + m.usage.cache_read_input_tokens > 0


def test_a_stream_gives_anthropics_events_and_the_same_message(client):
    whole = client.messages.create(model="m", max_tokens=16, messages=HELLO, **GREEDY)
    with client.messages.stream(model="m", max_tokens=16, messages=HELLO, **GREEDY) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    raw = [k for k in kinds if k not in ("text", "input_json", "thinking", "signature", "citation")]  # SDK's own
    assert raw[:2] == ["message_start", "content_block_start"]
    assert raw[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(raw[2:-3]) == {"content_block_delta"}
    assert final.content[0].text == whole.content[0].text
    assert final.stop_reason == whole.stop_reason and final.usage.output_tokens == whole.usage.output_tokens
    with client.messages.stream(model="m", max_tokens=16, messages=HELLO, **GREEDY) as stream:
        assert "".join(stream.text_stream) == whole.content[0].text


def test_a_stop_sequence_is_named(client):
    whole = client.messages.create(model="m", max_tokens=24, messages=HELLO, **GREEDY).content[0].text
    word = whole.split()[1]  # a word the greedy answer writes
    m = client.messages.create(model="m", max_tokens=24, messages=HELLO, stop_sequences=[word], **GREEDY)
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == word
    assert word not in m.content[0].text and whole.startswith(m.content[0].text)


def test_a_forced_tool_gives_a_tool_use_block_matching_its_schema(client):
    m = client.messages.create(model="m", max_tokens=200, messages=ASK, tools=[WEATHER], tool_choice={"type": "any"},
                               **GREEDY)
    assert m.stop_reason == "tool_use"
    uses = [b for b in m.content if b.type == "tool_use"]
    assert uses and uses[0].name == "get_weather" and uses[0].id
    jsonschema.validate(uses[0].input, WEATHER["input_schema"])


def test_a_streamed_tool_use_and_a_tool_result_round_trip(client):
    kw = dict(model="m", max_tokens=200, messages=ASK, tools=[WEATHER],
              tool_choice={"type": "tool", "name": "get_weather"}, **GREEDY)
    whole = client.messages.create(**kw)
    with client.messages.stream(**kw) as stream:
        partial = "".join(e.delta.partial_json for e in stream if e.type == "content_block_delta"
                          and e.delta.type == "input_json_delta")
        final = stream.get_final_message()
    use = final.content[-1]
    assert final.stop_reason == "tool_use" and use.type == "tool_use" and use.input == whole.content[-1].input
    assert partial and use.input == json.loads(partial)
    history = [*ASK, {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in final.content]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                             "content": [{"type": "text", "text": "Sunny, 21 degrees."}]}]}]
    after = client.messages.create(model="m", max_tokens=24, messages=history, tools=[WEATHER],
                                   tool_choice={"type": "none"}, **GREEDY)
    assert [b.type for b in after.content] == ["text"] and after.stop_reason in ("end_turn", "max_tokens")


def test_count_tokens_is_the_prompt_the_message_runs_on(client):
    counted = client.messages.count_tokens(model="m", messages=HELLO, system="Answer briefly.")
    m = client.messages.create(model="m", max_tokens=4, messages=HELLO, system="Answer briefly.", **GREEDY)
    assert counted.input_tokens == m.usage.input_tokens + m.usage.cache_read_input_tokens > 0
    with_tools = client.messages.count_tokens(model="m", messages=HELLO, tools=[WEATHER])
    assert with_tools.input_tokens > client.messages.count_tokens(model="m", messages=HELLO).input_tokens


def test_the_prefix_cache_shows_as_cache_reads(client):
    kw = dict(model="m", max_tokens=4, system="You are a careful assistant. " * 8, messages=HELLO, **GREEDY)
    first = client.messages.create(**kw)
    again = client.messages.create(**kw)
    total = first.usage.input_tokens + first.usage.cache_read_input_tokens
    assert again.usage.cache_read_input_tokens > 0
    assert again.usage.input_tokens + again.usage.cache_read_input_tokens == total


@pytest.mark.parametrize("body, words", [
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "'image'"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "server tools"),
    ({"tool_choice": {"type": "tool", "name": "nope"}, "tools": [WEATHER]}, "nope"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stop_sequences": ["a", "b", "c", "d", "e"]}, "stop_sequences"),
])
def test_bad_requests_get_anthropics_error_shape(worker, body, words):
    r = httpx.post(f"{worker.url}/v1/messages", json={"model": "m", "max_tokens": 8, "messages": HELLO, **body})
    assert r.status_code == 400
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"
    assert words in r.json()["error"]["message"], r.json()
    with pytest.raises(anthropic.BadRequestError):  # the SDK raises its own type for it
        sdk(worker).post("/v1/messages", body={"model": "m", "max_tokens": 8, "messages": HELLO, **body},
                         cast_to=object)


# ---- auth: x-api-key as well as the bearer header ----------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded():
    w = WorkerProcess(["--parallel", "1", "--ctx-size", "512", "--api-token", TOKEN]).start()
    yield w
    w.stop()


def test_the_token_is_taken_as_x_api_key_or_bearer(guarded):
    key_only = anthropic.Anthropic(base_url=guarded.url, api_key=None, max_retries=0,
                                   default_headers={"x-api-key": TOKEN})
    assert key_only.messages.create(model="m", max_tokens=2, messages=HELLO).content
    assert sdk(guarded, api_key=TOKEN).messages.create(model="m", max_tokens=2, messages=HELLO).content  # bearer
    r = httpx.get(f"{guarded.url}/v1/models", headers={"x-api-key": TOKEN})  # every route, not only Anthropic's
    assert r.status_code == 200


def test_a_wrong_key_is_401_in_anthropics_shape(guarded):
    wrong = anthropic.Anthropic(base_url=guarded.url, api_key=None, max_retries=0, default_headers={"x-api-key": "x"})
    with pytest.raises(anthropic.AuthenticationError) as err:
        wrong.messages.create(model="m", max_tokens=2, messages=HELLO)
    assert err.value.body == {"type": "error", "error": {"type": "authentication_error",
                                                         "message": "wrong x-api-key"}}
    with pytest.raises(anthropic.AuthenticationError):
        sdk(guarded, api_key="wrong").messages.create(model="m", max_tokens=2, messages=HELLO)
    both = httpx.post(f"{guarded.url}/v1/messages", json={"model": "m", "max_tokens": 2, "messages": HELLO},
                      headers={"x-api-key": "x", "Authorization": f"Bearer {TOKEN}"})
    assert both.status_code == 401  # both sent: both must be right


# ---- thinking blocks: Qwen 3's <think> ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen3(qwen3_tools_gguf: Path):  # noqa: F811
    w = WorkerProcess(["--model", str(qwen3_tools_gguf), "--parallel", "1", "--ctx-size", "2048"]).start()
    yield w
    w.stop()


def test_a_thinking_models_reasoning_comes_as_a_thinking_block(qwen3):
    """Random weights: a forced tool lets the answer think first, and only the seed decides whether it does."""
    client = sdk(qwen3)
    thought = 0
    for seed in range(6):
        kw = dict(model="m", max_tokens=64, messages=ASK, tools=[WEATHER], tool_choice={"type": "any"},
                  extra_body={"temperature": 1.0, "seed": seed})
        whole = client.messages.create(**kw)
        with client.messages.stream(**kw) as stream:
            thinking = "".join(e.delta.thinking for e in stream if e.type == "content_block_delta"
                               and e.delta.type == "thinking_delta")
            final = stream.get_final_message()
        kinds = [b.type for b in whole.content]
        assert [b.type for b in final.content] == kinds and set(kinds) <= {"thinking", "tool_use"}
        if "thinking" in kinds:
            thought += 1
            assert kinds[0] == "thinking" and whole.content[0].thinking == final.content[0].thinking == thinking
            assert "<think>" not in thinking
    assert thought, "no seed thought first"
    # thinking disabled: Qwen 3's template closes the block in the prompt, so no answer thinks
    m = client.messages.create(model="m", max_tokens=300, messages=ASK, tools=[WEATHER], tool_choice={"type": "any"},
                               thinking={"type": "disabled"}, extra_body={"temperature": 1.0, "seed": 0})
    assert m.content and {b.type for b in m.content} == {"tool_use"} and m.stop_reason == "tool_use"


def test_a_prefilled_assistant_turn_is_continued(worker, client):
    """The answer goes on from the prefill, as a completion of the rendered conversation plus that text would."""
    prefill = "The colour is"
    ask = [{"role": "user", "content": "Name a colour."}]
    m = client.messages.create(model="m", max_tokens=8, messages=[*ask, {"role": "assistant", "content": prefill}],
                               **GREEDY)
    rendered = httpx.post(f"{worker.url}/tokenize", json={"messages": ask}).json()["tokens"]
    text = httpx.post(f"{worker.url}/detokenize", json={"tokens": rendered}).json()["prompt"]
    completion = httpx.post(f"{worker.url}/v1/completions", json={
        "prompt": text + prefill, "max_tokens": 8, "temperature": 0}, timeout=60).json()
    assert m.content[0].text == completion["choices"][0]["text"]
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == completion["usage"]["prompt_tokens"]
