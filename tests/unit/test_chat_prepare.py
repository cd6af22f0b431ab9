"""chat.prepare: the prompt each family's template makes with tools and tool history, the constraint each
tool_choice gets, the parser that goes with them, and bad tools / tool_choice refused with the field named."""

from __future__ import annotations

import pytest

from tests.chat_models import template
from tests.unit.test_chat import SMOLLM2_TEMPLATE
from worker import chat
from worker.chat import ChatRequestError
from worker.chat.families import detect

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
HISTORY = [
    *ASK,
    {"role": "assistant", "content": None,
     "tool_calls": [{"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
]
QWEN_SPECIALS = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<tool_call>": 3, "</tool_call>": 4,
                 "<think>": 5, "</think>": 6}


def qwen3(messages=ASK, **kw):
    return chat.prepare(template("qwen3"), messages, eos_token="<|im_end|>", **kw)


def llama31(messages=ASK, **kw):
    return chat.prepare(template("llama3_1"), messages, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", **kw)


def smollm2(messages=ASK, **kw):
    return chat.prepare(SMOLLM2_TEMPLATE, messages, bos_token="<|im_start|>", eos_token="<|im_end|>", **kw)


def test_families_are_told_from_the_templates():
    assert detect(template("qwen3"), {}).name == "hermes"
    assert detect(template("llama3_1"), {}).name == "llama3"
    assert detect("{{ '[TOOL_CALLS] ' }}", {}).name == "mistral"
    assert detect(SMOLLM2_TEMPLATE, {}).name == "generic"


def test_qwen3_renders_tools_and_the_tool_history_as_transformers_does():
    plan = qwen3(HISTORY, tools=[WEATHER])
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in plan.prompt
    assert plan.prompt.endswith(
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        "<|im_end|>\n<|im_start|>user\n<tool_response>\nsunny, 21 C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n")


def test_llama31_renders_the_call_with_its_arguments_as_an_object():
    plan = llama31(HISTORY, tools=[WEATHER])
    assert "Environment: ipython" in plan.prompt
    assert '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>' in plan.prompt
    assert plan.prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_auto_is_a_lazy_constraint_on_the_family_marker():
    plan = qwen3(tools=[WEATHER], special_tokens=QWEN_SPECIALS)
    assert plan.constraint is not None and plan.constraint.kind == "lark"
    assert plan.constraint.trigger == "<tool_call>"
    assert "<[4]>" in plan.constraint.source  # </tool_call> written as its token
    assert plan.special_text and plan.family == "hermes"
    assert llama31(tools=[WEATHER]).constraint.trigger == '{"name"'


def test_required_and_named_constrain_the_whole_answer():
    required = qwen3(tools=[WEATHER, TIME], tool_choice="required")
    assert required.constraint is not None and required.constraint.trigger is None
    assert "get_time" in required.constraint.source and "think?" in required.constraint.source
    named = qwen3(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert "get_time" in named.constraint.source and "get_weather" not in named.constraint.source
    assert "get_weather" not in named.prompt  # only the named tool is offered
    assert '("\\n" block)*' not in named.constraint.source  # one call


def test_parallel_tool_calls_false_allows_one_call():
    assert '("\\n" block)*' in qwen3(tools=[WEATHER], tool_choice="required").constraint.source
    single = qwen3(tools=[WEATHER], tool_choice="required", parallel_tool_calls=False).constraint.source
    assert "block)*" not in single


def test_none_renders_no_tools_and_parses_no_calls():
    plan = qwen3(HISTORY, tools=[WEATHER], tool_choice="none")
    assert "<tools>" not in plan.prompt and plan.constraint is None and not plan.special_text
    assert "<tool_call>" in plan.prompt  # the history still shows the earlier call
    parser = plan.parser()
    delta = parser.feed('<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>')
    assert "<tool_call>" in delta.content + parser.finish().content and not parser.called


def test_no_tools_no_constraint():
    plan = smollm2()
    assert plan.constraint is None and not plan.tools_active
    assert plan.prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_the_generic_form_tells_the_model_the_tools_and_constrains_every_answer():
    plan = smollm2(HISTORY, tools=[WEATHER])
    assert plan.family == "generic" and plan.constraint is not None and plan.constraint.trigger is None
    assert plan.prompt.startswith('<|im_start|>system\nYou can call these tools:\n[\n  {\n    "name": "get_weather"')
    assert '{"response": "<your reply>"}' in plan.prompt
    assert ('<|im_start|>assistant\n{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}'
            '<|im_end|>') in plan.prompt
    assert ('<|im_start|>user\n{"tool_response": {"tool": "get_weather", "content": "sunny, 21 C"}}<|im_end|>'
            in plan.prompt)
    assert '"response"' in plan.constraint.source
    required = smollm2(tools=[WEATHER], tool_choice="required")
    assert '"response"' not in required.constraint.source and "reply to the user" not in required.prompt


def test_generic_results_of_parallel_calls_are_one_user_turn():
    from tests.unit.test_chat import GEMMA3_TEMPLATE  # refuses two user turns in a row

    history = [*ASK, {"role": "assistant", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "a", "content": "sunny"},
        {"role": "tool", "tool_call_id": "b", "content": "9:00"}]
    plan = chat.prepare(GEMMA3_TEMPLATE, history, tools=[WEATHER, TIME], bos_token="<bos>")
    assert plan.family == "generic"
    assert ('<start_of_turn>user\n{"tool_response": {"tool": "get_weather", "content": "sunny"}}\n'
            '{"tool_response": {"tool": "get_time", "content": "9:00"}}<end_of_turn>\n<start_of_turn>model\n'
            in plan.prompt)


def test_a_system_message_keeps_its_text_before_the_tools():
    plan = smollm2([{"role": "system", "content": "Be brief."}, *ASK], tools=[WEATHER])
    assert plan.prompt.startswith("<|im_start|>system\nBe brief.\n\nYou can call these tools:")


def test_qwen3_thinking_switch_and_reasoning_split():
    plan = qwen3(template_kwargs={"enable_thinking": False}, tools=[WEATHER], tool_choice="required")
    assert plan.prompt.endswith("<think>\n\n</think>\n\n")
    assert "think" not in plan.constraint.source  # the prompt closed the block: the answer is the calls
    parser = qwen3().parser()
    delta = parser.feed("<think>\nhmm\n</think>\n\nHello")
    assert (delta.reasoning, delta.content) == ("hmm", "Hello")
    inline = qwen3(reasoning="inline").parser()
    assert inline.feed("<think>\nhmm\n</think>\n\nHello").content == "<think>\nhmm\n</think>\n\nHello"


def test_a_prompt_that_opens_thinking_starts_the_answer_inside_it():
    source = "{% for m in messages %}{{ m.content }}{% endfor %}<think>\n"
    parser = chat.prepare(source, ASK).parser()
    delta = parser.feed("pondering</think>answer")
    assert (delta.reasoning, delta.content) == ("pondering", "answer")


@pytest.mark.parametrize(("tools", "tool_choice", "param", "message"), [
    ({"type": "function"}, None, "tools", "must be a list"),
    ([{"type": "retrieval"}], None, "tools", "is not"),
    ([{"type": "function", "function": {"name": ""}}], None, "tools", "name"),
    ([{"type": "function", "function": {"name": "get weather[ARGS]"}}], None, "tools", "name"),
    ([{"type": "function", "function": {"name": "x" * 65}}], None, "tools", "name"),
    ([WEATHER, WEATHER], None, "tools", "two tools"),
    ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], None, "tools", "JSON schema"),
    (None, "required", "tool_choice", "needs tools"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice", "not among"),
    ([WEATHER], "sometimes", "tool_choice", "must be"),
])
def test_bad_tools_and_tool_choice_name_the_field(tools, tool_choice, param, message):
    with pytest.raises(ChatRequestError, match=message) as err:
        qwen3(tools=tools, tool_choice=tool_choice)
    assert err.value.param == param


def test_arguments_that_are_not_json_reach_the_template_as_text():
    bad = [*ASK, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "not json"}}]}]
    assert '"arguments": not json}' in qwen3(bad, tools=[WEATHER]).prompt


def test_chat_template_kwargs_may_turn_the_generation_prompt_off_and_set_nothing_the_request_owns():
    """vLLM's: `add_generation_prompt: false` in chat_template_kwargs continues the last message instead of opening
    an assistant turn. `messages`, `tools` and the like come from the request's own fields: refused there."""
    assert smollm2().prompt.endswith("<|im_start|>assistant\n")
    off = smollm2(template_kwargs={"add_generation_prompt": False}).prompt
    assert off.endswith("Weather in Paris?<|im_end|>\n")
    for bad in ({"add_generation_prompt": "no"}, {"messages": []}, {"tools": None}):
        with pytest.raises(ChatRequestError) as err:
            smollm2(template_kwargs=bad)
        assert err.value.param == "chat_template_kwargs"
