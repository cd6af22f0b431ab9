"""The chat parsers on canned model output, fed whole, split at every character, split at every byte (through an
incremental UTF-8 decoder, as the engine delivers text), one character at a time and in random pieces: every way
gives the same content, reasoning and calls, and the same shape of OpenAI deltas (id and name first, then argument
fragments)."""

from __future__ import annotations

import codecs
import itertools
import json
import random
from collections.abc import Callable, Iterator

import pytest

from worker.chat.parsers import (
    ChatDelta,
    ChatParser,
    GenericJson,
    LeadingJsonCalls,
    MarkedCalls,
    NamedArgsCalls,
    ReasoningSplitter,
    ToolParser,
    call_arguments,
    mistral_call_id,
)


def counter_ids() -> Callable[[], str]:
    n = itertools.count()
    return lambda: f"call_{next(n)}"


def hermes(reasoning: ReasoningSplitter | None = None) -> ChatParser:
    return ChatParser(MarkedCalls("<tool_call>", "</tool_call>", counter_ids()), reasoning or ReasoningSplitter())


def llama3() -> ChatParser:
    return ChatParser(LeadingJsonCalls(counter_ids()), None)


def mistral() -> ChatParser:
    return ChatParser(MarkedCalls("[TOOL_CALLS]", None, counter_ids()), None)


def generic() -> ChatParser:
    return ChatParser(GenericJson(counter_ids()), None)


def splits(text: str) -> Iterator[list[str]]:
    yield [text]
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    data = text.encode()
    for i in range(len(data) + 1):
        decoder = codecs.getincrementaldecoder("utf-8")()
        yield [decoder.decode(data[:i]), decoder.decode(data[i:], final=True)]
    decoder = codecs.getincrementaldecoder("utf-8")()
    yield [decoder.decode(bytes([b])) for b in data]
    yield list(text)
    rng = random.Random(0)
    for _ in range(50):
        cuts = sorted(rng.sample(range(len(text) + 1), min(6, len(text) + 1)))
        yield [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def run(make: Callable[[], ChatParser], pieces: list[str]) -> tuple[str, str, list[dict[str, str]], bool]:
    parser = make()
    deltas = [parser.feed(piece) for piece in pieces] + [parser.finish()]
    check_delta_shape(deltas)
    return ("".join(d.content for d in deltas), "".join(d.reasoning for d in deltas), call_arguments(deltas),
            parser.called)


def check_delta_shape(deltas: list[ChatDelta]) -> None:
    """OpenAI's streaming shape: each call starts with one delta carrying id and name, then only arguments."""
    seen: set[int] = set()
    for part in (p for d in deltas for p in d.tool_calls):
        if part.index not in seen:
            assert part.id and part.name and part.index == len(seen), part
            seen.add(part.index)
        else:
            assert part.id is None and part.name is None and part.arguments, part


def parse_every_way(make: Callable[[], ChatParser], text: str) -> tuple[str, str, list[dict[str, str]], bool]:
    results = {json.dumps(run(make, pieces)) for pieces in splits(text)}
    assert len(results) == 1, results
    return run(make, [text])


def calls(*pairs: tuple[str, object]) -> list[dict[str, str]]:
    def text(args: object) -> str:
        return args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)

    return [{"id": f"call_{i}", "name": name, "arguments": text(args)} for i, (name, args) in enumerate(pairs)]


# ---------------------------------------------------------------------------------------------- Hermes / Qwen


def test_qwen3_thinks_talks_and_makes_two_calls():
    text = ('<think>\nThe user wants weather for two cities.\n</think>\n\nLet me check both.\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich 🌧", "days": 3}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
    content, reasoning, made, called = parse_every_way(hermes, text)
    assert reasoning == "The user wants weather for two cities."
    assert content == "Let me check both."
    assert made == calls(("get_weather", '{"city": "Zürich 🌧", "days": 3}'), ("get_time", "{}"))
    assert called


def test_markup_inside_a_string_argument_does_not_end_the_call():
    text = '<tool_call>\n{"name": "echo", "arguments": {"text": "a </tool_call> \\" <tool_call> }"}}\n</tool_call>'
    content, _, made, called = parse_every_way(hermes, text)
    assert content == "" and called
    assert json.loads(made[0]["arguments"]) == {"text": 'a </tool_call> " <tool_call> }'}


def test_text_that_only_looks_like_markup_is_content():
    text = "Use <b>bold</b> or <tool> tags; 3 < 4 and <tool_ca"
    assert parse_every_way(hermes, text) == (text, "", [], False)


def test_content_keeps_its_space_when_no_call_follows():
    assert parse_every_way(hermes, "  Hello,\n\nworld.  \n") == ("  Hello,\n\nworld.  \n", "", [], False)


def test_an_empty_thinking_block_and_no_tools():
    text = "<think>\n\n</think>\n\nParis is the capital."
    assert parse_every_way(hermes, text) == ("Paris is the capital.", "", [], False)


def test_a_marker_without_json_after_it_leaves_the_text_as_content():
    assert parse_every_way(hermes, "I'd use <tool_call> here.") == ("I'd use here.", "", [], False)


def test_a_call_without_arguments_gets_an_empty_object():
    made = parse_every_way(hermes, '<tool_call>\n{"name": "ping"}\n</tool_call>')[2]
    assert made == calls(("ping", "{}"))


def test_text_after_the_calls_is_content():
    text = '<tool_call>\n{"name": "a", "arguments": {"x": [1, {"y": null}]}}\n</tool_call>\n\nDone.'
    content, _, made, _ = parse_every_way(hermes, text)
    assert content == "Done." and made == calls(("a", '{"x": [1, {"y": null}]}'))


# ---------------------------------------------------------------------------------------------- reasoning


def test_forced_open_thinking_is_reasoning_until_the_close():
    make = lambda: ChatParser(ToolParser(), ReasoningSplitter(forced_open=True))
    text = "Okay, 2+2.\nIt is 4.\n</think>\n\nThe answer is **4**."
    assert parse_every_way(make, text) == ("The answer is **4**.", "Okay, 2+2.\nIt is 4.", [], False)


def test_unclosed_thinking_is_all_reasoning():
    make = lambda: ChatParser(ToolParser(), ReasoningSplitter())
    assert parse_every_way(make, "<think>\nstill going </thi") == ("", "still going </thi", [], False)


def test_inline_reasoning_keeps_the_raw_text():
    make = lambda: ChatParser(ToolParser(), ReasoningSplitter(forced_open=True, inline=True))
    text = "hmm\n</think>\n\nHi"
    assert parse_every_way(make, text) == ("<think>" + text, "", [], False)


def test_inline_reasoning_still_parses_the_calls_after_it():
    make = lambda: hermes(ReasoningSplitter(inline=True))
    text = '<think>\nuse the tool\n</think>\n\n<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>'
    content, reasoning, made, _ = parse_every_way(make, text)
    assert (content, reasoning) == ("<think>\nuse the tool\n</think>", "") and made == calls(("a", "{}"))
    generic_inline = lambda: ChatParser(GenericJson(counter_ids()), ReasoningSplitter(forced_open=True,
                                                                                      inline=True))
    assert parse_every_way(generic_inline, 'x</think>\n{"response": "hi"}')[:2] == ("<think>x</think>hi", "")


def test_think_later_in_the_answer_is_content():
    make = lambda: ChatParser(ToolParser(), ReasoningSplitter())
    text = "Answer first. <think>not reasoning</think>"
    assert parse_every_way(make, text) == (text, "", [], False)


# ---------------------------------------------------------------------------------------------- Llama 3


def test_llama3_json_call():
    text = '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}'
    assert parse_every_way(llama3, text) == ("", "", calls(("get_weather", {"city": "Paris", "unit": "celsius"})),
                                             True)


def test_llama3_python_tag_and_parallel_calls():
    text = ('<|python_tag|>{"name": "a", "parameters": {"q": "x;y"}}; '
            '{"name": "b", "parameters": {"n": -1.5e3, "ok": true}}')
    made = parse_every_way(llama3, text)[2]
    assert made == calls(("a", '{"q": "x;y"}'), ("b", '{"n": -1.5e3, "ok": true}'))


def test_llama3_json_that_is_not_a_call_is_content():
    text = '{"answer": 42, "name": "not a tool"}'
    assert parse_every_way(llama3, text) == (text, "", [], False)


def test_llama3_text_answer():
    text = "The weather is {probably} fine."
    assert parse_every_way(llama3, text) == (text, "", [], False)


def test_llama3_call_after_some_text_where_the_trigger_is():
    text = 'Let me check that for you. {"name": "get_weather", "parameters": {"city": "Oslo"}}'
    assert parse_every_way(llama3, text) == ("Let me check that for you.", "",
                                             calls(("get_weather", {"city": "Oslo"})), True)


def test_llama3_json_in_text_that_is_no_call_stays_content():
    text = 'Use {"name": "Ada"} as the body, or {"x": 1}.'
    assert parse_every_way(llama3, text) == (text, "", [], False)


def test_llama3_name_after_the_parameters():
    text = '{"parameters": {"city": "Oslo"}, "name": "get_weather"}'
    assert parse_every_way(llama3, text)[2] == calls(("get_weather", {"city": "Oslo"}))


# ---------------------------------------------------------------------------------------------- Mistral


def test_mistral_call_list():
    text = ('Checking. [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Lyon"}}, '
            '{"name": "get_time", "arguments": {"tz": "CET"}}]')
    assert parse_every_way(mistral, text) == ("Checking.", "", calls(("get_weather", {"city": "Lyon"}),
                                                                      ("get_time", {"tz": "CET"})), True)


def mistral_args() -> ChatParser:
    return ChatParser(NamedArgsCalls(counter_ids()), None)


def test_mistral_named_args_calls():
    text = ('Sure.\n[TOOL_CALLS]get_weather[ARGS]{"city": "Nîmes", "days": 2}'
            '[TOOL_CALLS]get_time[CALL_ID]a1b2c3d4e[ARGS]{"tz": "CET"}')
    assert parse_every_way(mistral_args, text) == ("Sure.", "", calls(("get_weather", {"city": "Nîmes", "days": 2}),
                                                                      ("get_time", {"tz": "CET"})), True)


def test_mistral_named_args_plain_answer():
    assert parse_every_way(mistral_args, "No tools [needed] here.") == ("No tools [needed] here.", "", [], False)


def test_mistral_ids_are_nine_letters_and_digits():
    call_id = mistral_call_id()
    assert len(call_id) == 9 and call_id.isalnum()


# ---------------------------------------------------------------------------------------------- generic


def test_generic_response_streams_its_decoded_text():
    text = '{"response": "Caf\\u00e9 \\ud83d\\ude00 said \\"hi\\"\\n\\\\done"}'
    assert parse_every_way(generic, text) == ('Café 😀 said "hi"\n\\done', "", [], False)


def test_generic_tool_calls():
    text = '{"tool_calls": [{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {"s": "]}"}}]}'
    assert parse_every_way(generic, text) == ("", "", calls(("a", {"x": 1}), ("b", {"s": "]}"})), True)


@pytest.mark.parametrize("make, text", [
    (generic, '{"tool_calls": [{"name": "get_weather", "argu'),
    (generic, '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Pa'),
    (hermes, '<tool_call>{"name": "get_weather", "argu'),
    (mistral, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Pa'),
])
def test_a_call_cut_short_by_max_tokens_is_announced_once_its_name_is_whole(make, text):
    """As OpenAI sends a call cut by `length`: its name, and what of its arguments came (the finish_reason stays
    `length`). Without it a client got nothing for the tokens it paid for."""
    content, _, got, called = parse_every_way(make, text)
    assert content == "" and called and [c["name"] for c in got] == ["get_weather"]
    assert got[0]["arguments"] == ('{"city": "Pa' if "arguments" in text else "")
    assert parse_every_way(make, text.split('"get_')[0])[2] == []  # no name yet: no call


def test_generic_text_that_is_not_the_form_is_content():
    assert parse_every_way(generic, "plain words") == ("plain words", "", [], False)


@pytest.mark.parametrize("make", [hermes, llama3, mistral, generic])
def test_an_empty_answer(make):
    assert run(make, []) == ("", "", [], False)
