"""Tool calls through /v1/chat/completions with the real openai SDK against the real worker.

Models: the embedded SmolLM2, whose template knows nothing of tools (the generic form: tools in a system message, the
answer constrained to JSON that is a call or a reply), and tiny random-weight Qwen 3 and Llama 3.1 checkpoints with
their families' real templates, converted by the worker's own converter: with random weights, only constrained
decoding can make their calls parse and their arguments match the schema.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import openai
import pytest

from tests.chat_models import llama31_tools_gguf, qwen3_tools_gguf  # noqa: F401 (session fixtures)
from tests.integration.test_openai_outputs import sdk
from tests.integration.worker_process import WorkerProcess

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20},
                           "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "description": "The time in a timezone.",
                 "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 12}},
                                "required": ["tz"]}},
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
HOT = 1.5


@pytest.fixture(scope="module")
def client(worker) -> openai.OpenAI:
    return sdk(worker)


def check_call(call, tools=(WEATHER, TIME)) -> dict:
    by_name = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert call.type == "function" and call.id and call.function.name in by_name, call
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, by_name[call.function.name])
    return args


def test_required_gives_calls_that_parse_and_match_their_schema(client):
    for seed in range(6):
        r = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                           temperature=HOT, seed=seed, max_tokens=200)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.tool_calls and choice.message.content is None
        for call in choice.message.tool_calls:
            check_call(call)


def test_a_named_function_is_the_one_called(client):
    r = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER, TIME], temperature=HOT, seed=3,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}},
                                       max_tokens=200)
    calls = r.choices[0].message.tool_calls
    assert calls and all(c.function.name == "get_time" for c in calls)
    check_call(calls[0])


def test_none_never_calls(client):
    r = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=40,
                                       temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")


def test_a_streamed_call_comes_as_deltas_that_assemble_to_the_whole(client):
    kw = dict(model="m", messages=ASK, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=200)
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls
    calls: dict[int, dict] = {}
    finish = None
    raw = []
    for chunk in client.chat.completions.create(stream=True, **kw):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for part in choice.delta.tool_calls or []:
                call = calls.setdefault(part.index, {"id": None, "name": None, "arguments": ""})
                if part.id:
                    assert call["id"] is None and part.function.name  # id and name come first, once
                    call["id"], call["name"] = part.id, part.function.name
                call["arguments"] += part.function.arguments or ""
            raw.append(choice.delta.content or "")
    assert finish == "tool_calls" and "".join(raw) == ""  # never the raw markup
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        (w.function.name, json.loads(w.function.arguments)) for w in whole]


def test_a_conversation_with_calls_and_results_goes_on(client):
    first = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER], tool_choice="required",
                                           temperature=0, max_tokens=200).choices[0].message
    call = first.tool_calls[0]
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp": 21, "sky": "clear"})}]
    r = client.chat.completions.create(model="m", messages=history, tools=[WEATHER], max_tokens=60, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    message = r.choices[0].message
    assert message.content or message.tool_calls


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format"),
    ({"messages": [{"role": "tool", "content": "x", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": None}]}, "messages"),
])
def test_bad_tool_requests_are_refused_naming_the_field(client, body, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**{"model": "m", "messages": ASK, **body})
    assert param in str(err.value.body), err.value.body


@pytest.fixture(scope="module", params=["qwen3", "llama3_1"])
def family_worker(request):
    path: Path = request.getfixturevalue("qwen3_tools_gguf" if request.param == "qwen3" else "llama31_tools_gguf")
    w = WorkerProcess(["--model", str(path), "--parallel", "2", "--ctx-size", "2048"]).start()
    yield request.param, w
    w.stop()


def test_a_random_weight_model_of_each_family_calls_validly_only_by_the_constraint(family_worker):
    family, w = family_worker
    client = sdk(w)
    # Qwen 3 would think first, and a random model never ends its thinking: the template's own switch turns it off
    extra = {"chat_template_kwargs": {"enable_thinking": False}} if family == "qwen3" else {}
    for seed in range(4):
        r = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                           temperature=HOT, seed=seed, max_tokens=300, extra_body=extra)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", (family, choice)
        for call in choice.message.tool_calls:
            check_call(call)
        # the family's markup never reaches the client
        assert not (choice.message.content or "").strip().startswith(("<tool_call>", "<|python_tag|>"))
