"""The Responses and Messages translations without a model: requests to the chat path's inputs, and an answer's
text (through the real chat parser) to blocks, output items and each API's stream events."""

from __future__ import annotations

import itertools
import json

import pytest
from pydantic import ValidationError

from worker.chat.parsers import ChatParser, MarkedCalls, ReasoningSplitter
from worker.engine.outputs import Failed, Finished, StopReason
from worker.http.chat_blocks import AnswerBlocks, BlockDelta, BlockStart, BlockStop
from worker.http.errors import ApiError
from worker.http.protocol_anthropic import MessagesRequest
from worker.http.protocol_responses import Response, ResponsesRequest
from worker.http.routes_anthropic import stop_reason, stream_events, usage
from worker.http.routes_responses import ResponseWriter

ANSWER = ('<think>\nThe user wants weather.\n</think>\n\nLet me look.\n<tool_call>\n'
          '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>\n'
          '{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>')


def parser() -> ChatParser:
    ids = itertools.count()
    return ChatParser(MarkedCalls("<tool_call>", "</tool_call>", lambda: f"call_{next(ids)}"), ReasoningSplitter())


def blocks_of(pieces: list[str]) -> tuple[AnswerBlocks, list]:
    blocks = AnswerBlocks(parser())
    events = [ev for piece in pieces for ev in blocks.feed(piece)]
    return blocks, events + blocks.finish()


def end(reason: StopReason, stop: str | None = None) -> Finished:
    return Finished(job_id="j", stop_reason=reason, tokens_out=7, prompt_tokens=20, ttft_s=0.01, decode_s=0.1,
                    stop_sequence=stop, cached_tokens=12)


# ---- blocks -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pieces", [[ANSWER], list(ANSWER), [ANSWER[i:i + 5] for i in range(0, len(ANSWER), 5)]],
                         ids=["whole", "by character", "by five"])
def test_an_answer_is_reasoning_text_and_calls_however_it_is_cut(pieces):
    blocks, events = blocks_of(pieces)
    assert [(b.kind, b.text if b.kind != "tool_call" else json.loads(b.text), b.name) for b in blocks.blocks] == [
        ("reasoning", "The user wants weather.", None), ("text", "Let me look.", None),
        ("tool_call", {"city": "Paris"}, "get_weather"), ("tool_call", {"tz": "CET"}, "get_time")]
    assert [b.call_id for b in blocks.blocks[2:]] == ["call_0", "call_1"] and blocks.called
    # Every block starts, grows and stops in order, one open at a time; its deltas are its text
    open_index = None
    texts: dict[int, str] = {}
    for ev in events:
        if isinstance(ev, BlockStart):
            assert open_index is None
            open_index = ev.block.index
        elif isinstance(ev, BlockDelta):
            assert ev.block.index == open_index
            texts[open_index] = texts.get(open_index, "") + ev.text
        else:
            assert isinstance(ev, BlockStop) and ev.block.index == open_index
            open_index = None
    assert open_index is None and texts == {b.index: b.text for b in blocks.blocks}


def test_whitespace_alone_never_makes_a_block_but_an_empty_answer_has_one():
    blocks, _ = blocks_of(["<tool_call>", '{"name": "f", "arguments": {}}', "</tool_call>", "\n\n"])
    assert [b.kind for b in blocks.blocks] == ["tool_call"] and blocks.blocks[0].arguments() == {}
    blocks, events = blocks_of([])
    assert [(b.kind, b.text) for b in blocks.blocks] == [("text", "")]
    assert [type(e) for e in events] == [BlockStart, BlockStop]
    blocks, _ = blocks_of(["  ", "Hi"])  # leading whitespace of the answer's first block is the answer's own
    assert [(b.kind, b.text) for b in blocks.blocks] == [("text", "  Hi")]


def test_a_call_cut_short_keeps_its_text():
    blocks, _ = blocks_of(['<tool_call>\n{"name": "f", "arguments": {"city": "Par'])
    assert blocks.blocks[-1].arguments() == {"_raw": blocks.blocks[-1].text} and blocks.blocks[-1].text


# ---- Responses --------------------------------------------------------------------------------------------------


def responses(**body) -> ResponsesRequest:
    req = ResponsesRequest.model_validate({"input": "hi", **body})
    req.check_supported()
    return req


def test_responses_input_items_become_chat_messages():
    req = responses(instructions="Be brief.", input=[
        {"role": "user", "content": "Weather?"},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "Looking.", "annotations": []}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city":"Paris"}',
         "id": "fc_1", "status": "completed"},
        {"type": "function_call", "call_id": "c2", "name": "get_time", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "noon"}]},
        {"role": "developer", "content": [{"type": "input_text", "text": "Answer now."}]}],
        tools=[{"type": "function", "name": "get_weather", "parameters": {"type": "object"}, "strict": True}],
        tool_choice={"type": "function", "name": "get_weather"}, parallel_tool_calls=False, max_output_tokens=9,
        temperature=0.5, seed=3)
    inputs = req.chat_inputs()
    assert inputs.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Looking.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny", "name": "get_weather"},
        {"role": "tool", "tool_call_id": "c2", "content": "noon", "name": "get_time"},
        {"role": "system", "content": "Answer now."}]
    assert inputs.tools == [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"},
                                                              "strict": True}}]
    assert inputs.tool_choice == {"type": "function", "function": {"name": "get_weather"}}
    assert not inputs.parallel_tool_calls and inputs.max_tokens == 9 and inputs.response_format is None
    assert inputs.sampling[0].temperature == 0.5 and inputs.sampling[0].seed == 3


def test_responses_text_format_is_the_chat_constraint():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    constraint, field = responses(text={"format": {"type": "json_schema", "name": "x", "schema": schema}}).constraint()
    assert (constraint.kind, json.loads(constraint.source), field) == ("json_schema", schema, "text.format")
    assert responses(text={"format": {"type": "json_object"}}).constraint()[0].kind == "json_object"
    assert responses(text={"format": {"type": "text"}}).constraint() is None


@pytest.mark.parametrize("body, field", [({"store": True}, "store"), ({"previous_response_id": "r"},
                                                                        "previous_response_id"),
                                         ({"background": True}, "background"), ({"top_logprobs": 5}, "top_logprobs"),
                                         ({"truncation": "auto"}, "truncation")])
def test_responses_stateful_or_unsupported_fields_are_refused_by_name(body, field):
    with pytest.raises(ApiError) as err:
        responses(**body)
    assert err.value.status == 400 and err.value.extra["field"] == field


def test_responses_reasoning_effort_goes_to_the_chat_template():
    assert responses().chat_inputs().template_kwargs is None
    assert responses(reasoning={"effort": "high"}).chat_inputs().template_kwargs == {"reasoning_effort": "high"}
    assert responses(reasoning={"effort": "none"}).chat_inputs().template_kwargs == {
        "reasoning_effort": "none", "enable_thinking": False}
    explicit = responses(reasoning={"effort": "none"}, chat_template_kwargs={"enable_thinking": True})
    assert explicit.chat_inputs().template_kwargs == {"reasoning_effort": "none", "enable_thinking": True}
    assert responses(truncation="disabled").chat_inputs() is not None
    with pytest.raises(ValidationError):
        ResponsesRequest.model_validate({"input": "hi", "reasoning": {"effort": "extreme"}})


@pytest.mark.parametrize("body", [
    {"input": [{"type": "item_reference", "id": "x"}]},
    {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]},
    {"tools": [{"type": "web_search"}]},
    {"unknown": 1},
])
def test_responses_inputs_it_cannot_serve_are_refused(body):
    with pytest.raises(ValidationError):
        ResponsesRequest.model_validate({"input": "hi", **body})


def test_responses_events_follow_the_blocks():
    shell = Response(status="in_progress", instructions=None, max_output_tokens=None, model="m",
                     parallel_tool_calls=True, temperature=None, top_p=None, text={"format": {"type": "text"}},
                     tool_choice="auto", tools=[])
    blocks = AnswerBlocks(parser())
    writer = ResponseWriter(shell, blocks)
    kinds = [e.type for e in writer.events(blocks.feed(ANSWER) + blocks.finish())]
    item = ["response.output_item.added", "response.content_part.added"]
    done = ["response.content_part.done", "response.output_item.done"]
    call = ["response.output_item.added", "response.function_call_arguments.delta",
            "response.function_call_arguments.done", "response.output_item.done"]
    assert kinds == [*item, "response.reasoning_text.delta", "response.reasoning_text.done", *done,
                     *item, "response.output_text.delta", "response.output_text.done", *done, *call, *call]
    final = writer.finished(end(StopReason.EOS))
    assert final.status == "completed" and [i.type for i in final.output] == ["reasoning", "message",
                                                                            "function_call", "function_call"]
    assert final.usage.input_tokens_details.cached_tokens == 12 and final.usage.total_tokens == 27
    cut = writer.finished(end(StopReason.MAX_TOKENS))
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    failed = writer.failed(Failed(code="decode_failed", message="llama_decode returned -1"))
    assert failed.status == "failed" and failed.error.code == "decode_failed" and failed.usage is None
    numbered = [writer.numbered(e).sequence_number for e in writer.events(AnswerBlocks(parser()).finish())]
    assert numbered == [0, 1, 2, 3, 4]  # an empty answer: one empty message (added, part, done x3), in order


# ---- Anthropic Messages -----------------------------------------------------------------------------------------


def messages(**body) -> MessagesRequest:
    req = MessagesRequest.model_validate({"model": "m", "max_tokens": 8, **body})
    req.check_supported()
    return req


def test_anthropic_blocks_become_chat_messages():
    req = messages(system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}], messages=[
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "hm", "signature": "s"},
            {"type": "text", "text": "Looking."},
            {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "sunny"}]},
            {"type": "text", "text": "And now?"}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t2", "name": "get_weather", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t2", "content": "boom",
                                      "is_error": True}]}],
        stop_sequences=["END"], tools=[{"name": "get_weather", "description": "w", "input_schema": {"type": "object"}}],
        tool_choice={"type": "any", "disable_parallel_tool_use": True}, thinking={"type": "disabled"})
    inputs = req.messages_chat_inputs()
    assert inputs.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Looking.", "tool_calls": [
            {"id": "t1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "t1", "content": "sunny", "name": "get_weather"},
        {"role": "user", "content": "And now?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "t2", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "t2", "content": "Error: boom", "name": "get_weather"}]
    assert inputs.tools == [{"type": "function", "function": {"name": "get_weather",
                                                              "parameters": {"type": "object"}, "description": "w"}}]
    assert inputs.tool_choice == "required" and not inputs.parallel_tool_calls
    assert inputs.template_kwargs == {"enable_thinking": False} and list(inputs.stop) == ["END"]
    assert inputs.max_tokens == 8


@pytest.mark.parametrize("choice, expected", [({"type": "auto"}, "auto"), ({"type": "none"}, "none"),
                                              ({"type": "tool", "name": "f"},
                                               {"type": "function", "function": {"name": "f"}})])
def test_anthropic_tool_choice(choice, expected):
    req = messages(messages=[{"role": "user", "content": "x"}], tool_choice=choice,
                   tools=[{"name": "f", "input_schema": {"type": "object"}}])
    assert req.messages_chat_inputs().tool_choice == expected


@pytest.mark.parametrize("body", [
    {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
    {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "bash_20250124", "name": "bash"}]},
    {"messages": [{"role": "user", "content": "x"}], "top_k": -1},
    {"messages": []},
])
def test_anthropic_requests_it_cannot_serve_are_refused(body):
    with pytest.raises(ValidationError):
        MessagesRequest.model_validate({"model": "m", "max_tokens": 8, **body})


def test_anthropic_events_stop_reasons_and_usage():
    blocks = AnswerBlocks(parser())
    evs = stream_events(blocks.feed(ANSWER) + blocks.finish())
    kinds = [(e.type, getattr(getattr(e, "delta", None), "type", None) or getattr(
        getattr(e, "content_block", None), "type", None)) for e in evs]
    assert kinds == [
        ("content_block_start", "thinking"), ("content_block_delta", "thinking_delta"), ("content_block_stop", None),
        ("content_block_start", "text"), ("content_block_delta", "text_delta"), ("content_block_stop", None),
        ("content_block_start", "tool_use"), ("content_block_delta", "input_json_delta"),
        ("content_block_stop", None),
        ("content_block_start", "tool_use"), ("content_block_delta", "input_json_delta"),
        ("content_block_stop", None)]
    assert evs[6].content_block.input == {} and evs[6].content_block.name == "get_weather"
    assert stop_reason(blocks, end(StopReason.EOS)) == "tool_use"
    plain = AnswerBlocks(parser())
    plain.feed("Hello")
    assert stop_reason(plain, end(StopReason.EOS)) == "end_turn"
    assert stop_reason(plain, end(StopReason.STOP_SEQUENCE, "END")) == "stop_sequence"
    assert stop_reason(plain, end(StopReason.MAX_TOKENS)) == "max_tokens"
    u = usage(end(StopReason.EOS))
    assert (u.input_tokens, u.cache_read_input_tokens, u.output_tokens) == (8, 12, 7)


def test_a_prefilled_assistant_turn_is_continued_not_repeated():
    req = messages(messages=[{"role": "user", "content": "JSON please."},
                             {"role": "assistant", "content": [{"type": "text", "text": '{"a":'}]}])
    inputs = req.messages_chat_inputs()
    assert inputs.messages == [{"role": "user", "content": "JSON please."}] and inputs.continue_with == '{"a":'
    calls = messages(messages=[{"role": "user", "content": "x"}, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]).messages_chat_inputs()
    assert calls.continue_with == "" and calls.messages[-1]["tool_calls"]  # a call is history, not a prefill


@pytest.mark.parametrize("body, field", [
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"tool_choice": {"type": "function"}}, "tool_choice"),
])
def test_a_refused_field_is_named_as_the_client_sent_it_not_by_pydantics_union_branches(body, field):
    from worker.http.protocol_openai import ChatRequest
    from worker.http.routes_openai import parse_body

    with pytest.raises(ApiError) as err:
        parse_body(ChatRequest, {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body})
    assert err.value.extra["field"] == field, err.value.message
    assert "[" not in err.value.message.split(":")[0]


@pytest.mark.parametrize("part, says", [({"type": "text"}, "part 0 is a text part without a string 'text'"),
                                        ({"text": "hi"}, "part 0 has no 'type'"),
                                        ({"type": "image_url"}, "part 0 is 'image_url'; only text parts")])
def test_a_content_part_that_is_not_text_says_what_it_lacks(part, says):
    from worker.http.protocol_openai import ChatRequest
    from worker.http.routes_openai import parse_body

    with pytest.raises(ApiError) as err:
        parse_body(ChatRequest, {"model": "m", "messages": [{"role": "user", "content": [part]}]})
    assert err.value.extra["field"] == "messages.0.content" and says in err.value.message
