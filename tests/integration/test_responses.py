"""POST /v1/responses with the real openai SDK and openai-agents' default model against the real worker.

The embedded SmolLM2 answers text and (its template knows nothing of tools) calls in the generic constrained form;
the tiny random-weight Qwen 3 (tests/chat_models.py) has a `<think>`-capable template, for reasoning items.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jsonschema
import openai
import pytest
from agents import Agent, ModelSettings, OpenAIResponsesModel, RunConfig, Runner, function_tool, set_tracing_disabled

from tests.chat_models import qwen3_tools_gguf  # noqa: F401 (session fixture)
from tests.integration.test_openai_outputs import sdk
from tests.integration.worker_process import WorkerProcess

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"]},
}
ASK = "What is the weather in Paris?"
GREEDY = {"temperature": 0, "max_output_tokens": 24}


@pytest.fixture(scope="module")
def client(worker) -> openai.OpenAI:
    return sdk(worker)


def test_a_plain_response_has_one_message_and_usage(client):
    r = client.responses.create(model="m", instructions="Answer briefly.", input="Say hello.", **GREEDY)
    assert r.object == "response" and r.id.startswith("resp_")
    assert r.status in ("completed", "incomplete")
    assert [item.type for item in r.output] == ["message"]
    assert r.output_text and r.output[0].content[0].type == "output_text"
    u = r.usage
    assert u.input_tokens > 0 and 0 < u.output_tokens <= 24 and u.total_tokens == u.input_tokens + u.output_tokens
    assert u.input_tokens_details.cached_tokens >= 0 and u.output_tokens_details.reasoning_tokens == 0
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens" and u.output_tokens == 24
    assert r.output[-1].status == r.status  # a cut answer's last item is incomplete too, as OpenAI's


def test_an_answer_cut_by_max_output_tokens_is_incomplete_down_to_its_last_item(client):
    kw = dict(model="m", input="Write a long story about the sea.", temperature=0, max_output_tokens=5)
    r = client.responses.create(**kw)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output[-1].status == "incomplete"
    events = list(client.responses.create(stream=True, **kw))
    done = [e for e in events if e.type == "response.output_item.done"]
    assert done[-1].item.status == "incomplete" and events[-1].type == "response.incomplete"


def test_the_prefix_cache_shows_as_cached_tokens(client):
    kw = dict(model="m", instructions="You are a careful assistant. " * 8, input="Name a colour.", **GREEDY)
    client.responses.create(**kw)
    again = client.responses.create(**kw)
    assert again.usage.input_tokens_details.cached_tokens > 0


def test_a_stream_follows_the_responses_event_sequence_and_its_deltas_make_the_text(client):
    whole = client.responses.create(model="m", input="Say hello.", **GREEDY)
    events = list(client.responses.create(model="m", input="Say hello.", stream=True, **GREEDY))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed" if whole.status == "completed" else "response.incomplete"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert text == final.output_text == events[-4].text == whole.output_text
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_a_forced_function_call_and_its_output_round_trip(client):
    r = client.responses.create(model="m", input=ASK, tools=[WEATHER], tool_choice="required", temperature=0,
                                max_output_tokens=200)
    assert r.status == "completed"
    calls = [item for item in r.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and calls[0].call_id and calls[0].id.startswith("fc_")
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["parameters"])
    # The items go back as input, with the tool's result: the model answers on
    history = [{"role": "user", "content": ASK}, *[c.model_dump(exclude_none=True) for c in calls],
               {"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"temp": 21}'}]
    after = client.responses.create(model="m", input=history, tools=[WEATHER], tool_choice="none", **GREEDY)
    assert after.status in ("completed", "incomplete") and after.output_text
    assert [item.type for item in after.output] == ["message"]


def test_a_streamed_call_comes_as_argument_deltas(client):
    kw = dict(model="m", input=ASK, tools=[WEATHER], temperature=0, max_output_tokens=200,
              tool_choice={"type": "function", "name": "get_weather"})
    whole = client.responses.create(**kw)
    events = list(client.responses.create(stream=True, **kw))
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds and "response.output_text.delta" not in kinds
    added = next(e for e in events if e.type == "response.output_item.added")
    assert added.item.type == "function_call" and added.item.name == "get_weather" and added.item.arguments == ""
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert args == done.arguments and json.loads(args) == json.loads(whole.output[0].arguments)
    assert kinds[-1] == "response.completed" and events[-1].response.output[0].arguments == args


def test_text_format_json_schema_constrains_the_output(client):
    schema = {"type": "object", "properties": {"colour": {"type": "string", "maxLength": 12}},
              "required": ["colour"], "additionalProperties": False}
    r = client.responses.create(model="m", input="Name a colour as JSON.", temperature=0, max_output_tokens=60,
                                text={"format": {"type": "json_schema", "name": "colour", "schema": schema,
                                                 "strict": True}})
    jsonschema.validate(json.loads(r.output_text), schema)
    assert r.text.format.type == "json_schema"


@pytest.mark.parametrize("field, value", [("store", True), ("previous_response_id", "resp_123"),
                                          ("background", True), ("conversation", "conv_1")])
def test_stateful_features_are_refused_naming_the_field(client, field, value):
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="m", input="hi", **{field: value})
    assert err.value.code == "unsupported_parameter" and err.value.param == field
    assert "stateless" in err.value.message


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"text": {"format": {"type": "json_object"}}, "tools": [WEATHER], "tool_choice": "required"}, "text.format"),
])
def test_bad_requests_are_refused_naming_the_field(client, body, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(**{"model": "m", "input": "hi", **body})
    assert err.value.param is not None and err.value.param.startswith(param), err.value.body


def test_harmless_fields_are_accepted(client):
    r = client.responses.create(model="m", input="hi", store=False, metadata={"k": "v"}, user="u",
                                truncation="disabled", include=[], reasoning={"effort": "low"}, **GREEDY)
    assert r.metadata == {"k": "v"} and r.store is False


# ---- openai-agents: its default model is the Responses one --------------------------------------------------------


def weather_agent(worker) -> tuple[Agent, list[str]]:
    set_tracing_disabled(True)  # no network: traces would go to OpenAI
    calls: list[str] = []

    @function_tool(is_enabled=lambda ctx, agent: not calls)  # once it has run, the next turn can only answer
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"Sunny and 21 degrees in {city}."

    model = OpenAIResponsesModel(model="m", openai_client=openai.AsyncOpenAI(
        base_url=f"{worker.url}/v1", api_key="unused", max_retries=0))
    # A model this small calls only when made to: required on the first turn (openai-agents resets tool_choice
    # after a call)
    agent = Agent(name="weather", instructions="Use get_weather, then answer.", model=model, tools=[get_weather],
                  model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=60))
    return agent, calls


def check_run(result, calls: list[str]) -> None:
    assert len(calls) == 1
    kinds = [item.type for item in result.new_items]
    assert kinds[:2] == ["tool_call_item", "tool_call_output_item"] and kinds[-1] == "message_output_item"
    assert isinstance(result.final_output, str) and result.final_output
    assert result.context_wrapper.usage.requests == 2


async def test_an_openai_agents_agent_calls_its_tool_and_finishes(worker):
    agent, calls = weather_agent(worker)
    result = await Runner.run(agent, ASK, max_turns=4, run_config=RunConfig(tracing_disabled=True))
    check_run(result, calls)


async def test_an_openai_agents_agent_streams_its_run(worker):
    agent, calls = weather_agent(worker)
    result = Runner.run_streamed(agent, ASK, max_turns=4, run_config=RunConfig(tracing_disabled=True))
    raw = [ev.data.type async for ev in result.stream_events() if ev.type == "raw_response_event"]
    check_run(result, calls)
    assert raw.count("response.completed") == 2 and "response.function_call_arguments.delta" in raw
    assert "response.output_text.delta" in raw


# ---- reasoning: Qwen 3's <think> as reasoning items ---------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen3(qwen3_tools_gguf: Path):  # noqa: F811
    w = WorkerProcess(["--model", str(qwen3_tools_gguf), "--parallel", "1", "--ctx-size", "2048"]).start()
    yield w
    w.stop()


def _sans_ids(item) -> dict:
    return item.model_dump(exclude={"id", "call_id"})


def test_a_thinking_models_reasoning_comes_as_a_reasoning_item(qwen3):
    """Random weights: a required call lets the answer think first (<think> is one token among the few the
    constraint allows), and only the seed decides whether it does; some seeds must."""
    client = sdk(qwen3)
    thought = 0
    for seed in range(6):
        kw = dict(model="m", input=ASK, tools=[WEATHER], tool_choice="required", temperature=1.0,
                  max_output_tokens=64, extra_body={"seed": seed})
        whole = client.responses.create(**kw)
        events = list(client.responses.create(stream=True, **kw))
        final = events[-1].response
        assert [_sans_ids(i) for i in final.output] == [_sans_ids(i) for i in whole.output]
        kinds = [item.type for item in whole.output]
        assert set(kinds) <= {"reasoning", "function_call"} and kinds.count("reasoning") <= 1
        if "reasoning" in kinds:
            thought += 1
            item = whole.output[0]
            assert kinds[0] == "reasoning" and item.content[0].type == "reasoning_text"
            streamed = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
            assert streamed == item.content[0].text and "<think>" not in streamed
            assert whole.usage.output_tokens_details.reasoning_tokens > 0
    assert thought, "no seed thought first"


def test_the_route_is_counted_and_its_job_narrated(worker, client):
    r = client.responses.create(model="m", input="Say hi.", **GREEDY)
    deadline = time.monotonic() + 10  # the log lines are read from the process's stderr by a thread
    while "inference_complete" not in worker.actions(r.id) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "inference_start" in worker.actions(r.id) and "inference_complete" in worker.actions(r.id)
    metrics = client.get(f"{worker.url}/metrics", cast_to=str)
    assert 'llm_worker_requests_total{code="200",route="/v1/responses"}' in metrics
