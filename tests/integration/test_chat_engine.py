"""The chat layer on the real engine, in process: tiny random-weight Qwen 3 and Llama 3.1 models (their own chat
templates) and the embedded SmolLM2 (the generic form), sampled hot. A random-weight model knows nothing of tool
calls, so every valid call here was made by the constraint; the family's parser reads them from the engine's text
stream, one token's text at a time."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest

from tests.chat_models import template, tool_model_gguf
from tests.integration.test_engine import make_engine
from tests.unit.test_chat import SMOLLM2_TEMPLATE
from worker import chat
from worker.chat.parsers import call_arguments
from worker.engine.constraints import Grammars
from worker.engine.core import EngineCore
from worker.engine.outputs import Failed, Finished, Job, StopReason, TokenText
from worker.engine.sampling import SamplingParams
from worker.llamacpp import Model
from worker.llamacpp.specials import model_special_tokens
from worker.models.resolve import embedded_model_path

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"]}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
ASK = [{"role": "user", "content": "Weather in Paris, and the time?"}]
HOT = 1.5


def load(path) -> Model:
    return Model.load(path, ref=path.stem, fmt="gguf", gpu_layers=0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat-engine")
    loaded = {"qwen3": load(tool_model_gguf("qwen3", root)), "llama3_1": load(tool_model_gguf("llama3_1", root)),
              "smollm2": load(embedded_model_path())}
    yield loaded
    for model in loaded.values():
        model.close()


def plan_for(name: str, model: Model, **kw) -> chat.ChatPlan:
    source = SMOLLM2_TEMPLATE if name == "smollm2" else template(name)
    extra = {"enable_thinking": False} if name == "qwen3" else None
    return chat.prepare(source, ASK, tools=[WEATHER, TIME], bos_token=model.info.bos, eos_token=model.info.eos,
                        special_tokens=model_special_tokens(model), template_kwargs=extra, **kw)


async def answers(model: Model, plan: chat.ChatPlan, seeds: range, max_tokens: int = 400):
    """Hot samples through one engine, side by side in a batch, each parsed as the HTTP layer will: a list of
    (deltas, the parser, the stop reason)."""
    engine = make_engine(model, ctx_size=2048, parallel=len(seeds), max_queue=8, batch_size=512, threads=2)
    grammars = Grammars(model.guidance_tokenizer, lambda t: model.piece(t, special=True), model.n_vocab)
    grammars.check(plan.constraint)
    engine.grammars = grammars
    engine.scheduler.guides = grammars.guide
    engine.start(asyncio.get_running_loop())
    try:
        return await asyncio.gather(*(answer(engine, model, plan, seed, max_tokens) for seed in seeds))
    finally:
        engine.close()


async def answer(engine: EngineCore, model: Model, plan: chat.ChatPlan, seed: int, max_tokens: int):
    queue: asyncio.Queue = asyncio.Queue()
    engine.submit(Job(job_id=f"j{seed}", prompt_tokens=model.prompt_tokens(plan.prompt),
                      params=SamplingParams(temperature=HOT, seed=seed), max_tokens=max_tokens,
                      deliver=queue.put_nowait, constraint=plan.constraint, special_text=plan.special_text))
    parser, deltas, finished = plan.parser(), [], None
    while finished is None:
        for out in await asyncio.wait_for(queue.get(), 120):
            assert not isinstance(out, Failed), out
            if isinstance(out, TokenText):
                deltas.append(parser.feed(out.text))
            elif isinstance(out, Finished):
                finished = out
    deltas.append(parser.finish())
    return deltas, parser, finished.stop_reason


def assert_valid_calls(made: list[dict[str, str]], only: str | None = None, at_most: int | None = None) -> None:
    assert made and (at_most is None or len(made) <= at_most)
    for call in made:
        assert call["id"] and call["name"] in SCHEMAS and (only is None or call["name"] == only)
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


@pytest.mark.parametrize("name", ["qwen3", "llama3_1", "smollm2"])
async def test_required_calls_are_valid_at_high_temperature(models, name):
    model = models[name]
    plan = plan_for(name, model, tool_choice="required", parallel_tool_calls=False)
    seeds = range(2) if name == "smollm2" else range(4)  # SmolLM2 is 135M parameters: slower on a shared CPU
    for deltas, parser, stop in await answers(model, plan, seeds):
        assert stop == StopReason.EOS and parser.called  # the grammar completed: the answer is a call
        assert_valid_calls(call_arguments(deltas), at_most=1)
        assert "".join(d.content for d in deltas).strip() == ""  # no markup leaks into the content


async def test_a_named_function_is_the_one_called(models):
    model = models["qwen3"]
    plan = plan_for("qwen3", model, tool_choice={"type": "function", "function": {"name": "get_time"}})
    [(deltas, parser, _)] = await answers(model, plan, range(11, 12))
    assert parser.called
    assert_valid_calls(call_arguments(deltas), only="get_time", at_most=1)


async def test_generic_auto_answers_with_a_call_or_a_reply(models):
    model = models["smollm2"]
    plan = plan_for("smollm2", model)
    assert plan.constraint is not None and plan.constraint.trigger is None
    results = await answers(model, plan, range(2), max_tokens=300)
    assert any(stop == StopReason.EOS for _, _, stop in results)  # at least one answer completed its grammar
    for deltas, parser, stop in results:
        if stop != StopReason.EOS:  # cut by max_tokens at a hot temperature: a call's arguments end where it was cut
            continue
        if parser.called:
            assert_valid_calls(call_arguments(deltas))
        else:  # a reply: its text, never the JSON around it
            assert not "".join(d.content for d in deltas).startswith('{"response"')
