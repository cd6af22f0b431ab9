"""Structured output, logprobs and n > 1 through the OpenAI routes, with the real openai SDK against the real worker.

Constrained output is checked by parsing it (pydantic, jsonschema) at temperatures at which the 135M model knows
nothing of JSON; logprobs against each other (a greedy token is its position's most likely one; the echoed prompt's
logprobs are those the model gives the same tokens when it predicts them).
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Literal

import aiohttp
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.integration.worker_process import WorkerProcess

HOT = 1.5  # far past what keeps this model's text coherent: only the constraint keeps the output valid
SAMPLES = 10


def sdk(worker: WorkerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{worker.url}/v1", api_key="unused", max_retries=0, timeout=180)


@pytest.fixture(scope="module")
def client(worker) -> openai.OpenAI:
    return sdk(worker)


class Pet(BaseModel):
    name: Annotated[str, Field(max_length=12)]
    kind: Literal["cat", "dog", "fish"]
    age: Annotated[int, Field(ge=0, le=30)]
    friendly: bool


class Household(BaseModel):
    city: Annotated[str, Field(max_length=16)]
    pets: Annotated[list[Pet], Field(max_length=2)]


def test_parse_with_nested_models_validates(client):
    """Nested models, a list, $defs: the schema the SDK sends for a model of models."""
    answer = client.chat.completions.parse(model="m", messages=[{"role": "user", "content": "A household."}],
                                           response_format=Household, temperature=HOT, seed=1, max_tokens=300)
    assert answer.choices[0].finish_reason == "stop" and isinstance(answer.choices[0].message.parsed, Household)


# ---- structured output ------------------------------------------------------------------------------------------


def test_parse_with_a_pydantic_model_validates_every_time_at_high_temperature(client):
    messages = [{"role": "system", "content": "Describe a pet."}, {"role": "user", "content": "Go."}]

    def one(seed: int) -> openai.types.chat.ParsedChatCompletion:
        return client.chat.completions.parse(model="m", messages=messages, response_format=Pet,
                                             temperature=HOT, seed=seed, max_tokens=120)

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(one, range(SAMPLES)))
    for answer in answers:
        choice = answer.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(choice.message.parsed, Pet)
        assert Pet.model_validate_json(choice.message.content) == choice.message.parsed
    assert len({a.choices[0].message.content for a in answers}) > SAMPLES // 2  # hot sampling, not one fixed text


def test_json_object_is_always_a_json_object(client):
    for seed in range(3):
        answer = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Anything."}], temperature=HOT, seed=seed,
            max_tokens=100, response_format={"type": "json_object"},
            extra_body={"json_schema": None})  # llama-server's extra left unset: still one constraint
        if answer.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(answer.choices[0].message.content), dict)
        else:  # a string that ran to max_tokens: still the start of an object
            assert answer.choices[0].message.content.startswith("{")


def test_llama_server_grammar_and_json_schema_extras_hold_on_both_routes(client):
    grammar = 'root ::= ("yes" | "no") "." '
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    for seed in range(3):
        text = client.completions.create(model="m", prompt="Is the sky green?", temperature=HOT, seed=seed,
                                         max_tokens=8, extra_body={"grammar": grammar})
        assert text.choices[0].text in ("yes.", "no.") and text.choices[0].finish_reason == "stop"
        chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Pick."}],
                                              temperature=HOT, seed=seed, max_tokens=30,
                                              extra_body={"json_schema": schema})
        jsonschema.validate(json.loads(chat.choices[0].message.content), schema)


async def test_the_native_route_takes_grammar_and_json_schema(worker):
    async with aiohttp.ClientSession(base_url=worker.url) as http:
        body = {"prompt": "Colour:", "max_tokens": 8, "temperature": HOT, "stream": False,
                "grammar": 'root ::= "red" | "green" | "blue"'}
        async with http.post("/v1/inference", json=body) as resp:
            answer = await resp.json()
        assert answer["text"] in ("red", "green", "blue") and answer["stop_reason"] == "eos", answer
        body = {"prompt": "Pick:", "max_tokens": 12, "temperature": HOT, "stream": False,
                "json_schema": {"enum": ["alpha", "beta"]}}
        async with http.post("/v1/inference", json=body) as resp:
            answer = await resp.json()
        assert json.loads(answer["text"]) in ("alpha", "beta"), answer
        async with http.post("/v1/inference", json={"prompt": "x", "grammar": "root ::= ("}) as resp:
            err = (await resp.json())["error"]
        assert resp.status == 400 and err["code"] == "invalid_constraint" and err["field"] == "grammar"


BAD_CONSTRAINTS = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "format": "no-such-format"}}}}, "response_format", "no-such-format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "dependentSchemas": {"a": {}}}}}}, "response_format", "dependentSchemas"),
    ({"extra_body": {"grammar": "root ::= ("}}, "grammar", "gbnf"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#"}}}},
     "response_format", "allows no first token"),
    ({"extra_body": {"json_schema": {"type": "string", "format": "no-such-format"}}}, "json_schema", "no-such"),
]


@pytest.mark.parametrize("kw,param,named", BAD_CONSTRAINTS)
def test_a_constraint_that_cannot_be_enforced_is_refused_by_name(client, kw, param, named):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4, **kw)
    assert err.value.code == "invalid_constraint" and err.value.param == param and named in err.value.message


def test_a_constraint_that_breaks_as_the_tokens_come_is_a_client_error_never_a_stop(client):
    """A schema with no finite document (every object must hold another) passes the first mask; llguidance gives up
    after `{"`. That is the request's doing: 400 (the SDK does not retry it), not a 500 nor `finish_reason: stop`
    on text that is no JSON."""
    schema = {"$defs": {"n": {"type": "object", "properties": {"c": {"$ref": "#/$defs/n"}}, "required": ["c"]}},
              "$ref": "#/$defs/n"}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "go"}], max_tokens=8,
                                       temperature=0, response_format={"type": "json_schema", "json_schema": {
                                           "name": "x", "schema": schema}})
    assert err.value.code == "constraint_failed" and "<state>" not in err.value.message


def test_two_constraints_at_once_are_refused(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                       response_format={"type": "json_object"}, extra_body={"grammar": 'root ::= "a"'})
    assert err.value.param == "response_format"


# ---- logprobs ---------------------------------------------------------------------------------------------------


def _check_chat_logprobs(content: list, text: str, k: int, greedy: bool) -> None:
    assert b"".join(bytes(e.bytes) for e in content).decode() == text
    for e in content:
        assert e.logprob <= 0 and len(e.top_logprobs) == k
        tops = [t.logprob for t in e.top_logprobs]
        assert tops == sorted(tops, reverse=True) and sum(math.exp(t) for t in tops) <= 1 + 1e-6
        if greedy:  # the chosen token is its position's most likely one, with the same logprob
            assert (e.token, e.logprob) == (e.top_logprobs[0].token, e.top_logprobs[0].logprob)
        else:
            assert e.logprob <= tops[0] + 1e-9


def test_chat_logprobs_are_openais_shape_and_consistent(client):
    messages = [{"role": "user", "content": "Name three colours."}]
    greedy = client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=16,
                                            logprobs=True, top_logprobs=5)
    choice = greedy.choices[0]
    assert len(choice.logprobs.content) == greedy.usage.completion_tokens
    _check_chat_logprobs(choice.logprobs.content, choice.message.content, 5, greedy=True)

    hot = client.chat.completions.create(model="m", messages=messages, temperature=HOT, seed=5, max_tokens=16,
                                         logprobs=True, top_logprobs=20)
    _check_chat_logprobs(hot.choices[0].logprobs.content, hot.choices[0].message.content, 20, greedy=False)

    plain = client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=16,
                                           logprobs=True)  # top_logprobs unset: the chosen tokens only
    assert [e.logprob for e in plain.choices[0].logprobs.content] == pytest.approx(
        [e.logprob for e in choice.logprobs.content])
    assert all(e.top_logprobs == [] for e in plain.choices[0].logprobs.content)
    assert client.chat.completions.create(model="m", messages=messages, max_tokens=2).choices[0].logprobs is None

    streamed = list(client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=16,
                                                   logprobs=True, top_logprobs=5, stream=True))
    content = [e for c in streamed for e in (c.choices[0].logprobs.content if c.choices[0].logprobs else [])]
    assert [(e.token, e.logprob) for e in content] == [(e.token, e.logprob) for e in choice.logprobs.content]


@pytest.mark.parametrize("kw,param", [({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
                                      ({"top_logprobs": 2}, "top_logprobs")])
def test_bad_logprobs_requests_are_refused(client, kw, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], **kw)
    assert err.value.param == param


def test_completion_logprobs_and_echo_as_lm_eval_reads_them(client):
    prompt = "The capital of France is Paris, and the capital of Spain is"
    ids = client.post("/tokenize", body={"text": prompt}, cast_to=object)["tokens"]
    # lm-eval's loglikelihood request: token ids, one generated token, logprobs 1, echo
    scored = client.completions.create(model="m", prompt=[ids], max_tokens=1, logprobs=1, echo=True, temperature=0)
    lp = scored.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:]) and lp.text_offset == sorted(lp.text_offset)
    assert scored.choices[0].text.startswith(prompt) and "".join(lp.tokens) == scored.choices[0].text
    assert all(len(top) <= 2 and top[tok] == x for tok, x, top in
               zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:], strict=True))
    # the prompt's last token, scored by echo, has the logprob the model gives it when it predicts that position
    predicted = client.completions.create(model="m", prompt=ids[:-1], max_tokens=1, logprobs=20, temperature=0)
    top = predicted.choices[0].logprobs.top_logprobs[0]
    assert lp.tokens[-2] in top and top[lp.tokens[-2]] == pytest.approx(lp.token_logprobs[-2], abs=1e-3)
    # the generated token's logprob is the same with and without echo
    plain = client.completions.create(model="m", prompt=ids, max_tokens=1, logprobs=1, temperature=0)
    assert plain.choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs[-1:], abs=1e-3)
    assert plain.choices[0].text == scored.choices[0].text[len(prompt):]

    echoed = client.completions.create(model="m", prompt=prompt, max_tokens=3, echo=True, temperature=0)
    assert echoed.choices[0].text == prompt + client.completions.create(
        model="m", prompt=prompt, max_tokens=3, temperature=0).choices[0].text and echoed.choices[0].logprobs is None
    chunks = list(client.completions.create(model="m", prompt=prompt, max_tokens=3, echo=True, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == echoed.choices[0].text


def test_streamed_completion_logprobs_equal_the_whole_answers(client):
    kw = {"model": "m", "prompt": "Once upon a time", "max_tokens": 10, "temperature": 0, "logprobs": 3, "echo": True}
    whole = client.completions.create(**kw).choices[0].logprobs
    tokens, values, offsets = [], [], []
    for chunk in client.completions.create(**kw, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            tokens += chunk.choices[0].logprobs.tokens
            values += chunk.choices[0].logprobs.token_logprobs
            offsets += chunk.choices[0].logprobs.text_offset
    assert tokens == whole.tokens and values == whole.token_logprobs and offsets == whole.text_offset


# ---- n > 1 ------------------------------------------------------------------------------------------------------


def test_n_choices_are_separate_sequences_and_repeatable_with_a_seed(client):
    messages = [{"role": "user", "content": "Tell me a story about a fox."}]
    kw = {"model": "m", "messages": messages, "max_tokens": 12, "temperature": 1.0, "seed": 42}
    three = client.chat.completions.create(n=3, **kw)
    again = client.chat.completions.create(n=3, **kw)
    assert [c.index for c in three.choices] == [0, 1, 2]
    texts = [c.message.content for c in three.choices]
    assert texts == [c.message.content for c in again.choices] and len(set(texts)) > 1
    one = client.chat.completions.create(n=1, **kw)
    assert three.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once
    assert three.usage.completion_tokens == sum(  # each choice's tokens
        client.chat.completions.create(**{**kw, "seed": 42 + i}).usage.completion_tokens for i in range(3))
    assert one.choices[0].message.content == texts[0]

    streamed = ["", "", ""]
    for chunk in client.chat.completions.create(n=3, stream=True, **kw):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == texts


def test_n_with_a_list_of_prompts_is_prompt_major(client):
    prompts = ["Red, green,", "One, two,"]
    both = client.completions.create(model="m", prompt=prompts, n=2, max_tokens=4, temperature=1.0, seed=9)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    for i, prompt in enumerate(prompts):
        alone = client.completions.create(model="m", prompt=prompt, n=2, max_tokens=4, temperature=1.0, seed=9)
        assert [c.text for c in alone.choices] == [c.text for c in both.choices[2 * i: 2 * i + 2]]
    with pytest.raises(openai.BadRequestError) as err:  # 4 slots + a queue of 8
        client.completions.create(model="m", prompt=prompts, n=7, max_tokens=1)
    assert err.value.param == "n"
