"""Anthropic's Messages API: POST /v1/messages and POST /v1/messages/count_tokens, a translation onto the chat path
(chat_path.submit_chat).

The request becomes chat inputs (protocol_anthropic); each answer's text, split by the chat parser into reasoning,
text and calls (chat_blocks.AnswerBlocks), becomes content blocks: `thinking`, `text`, `tool_use`. Streamed,
Anthropic's event sequence: message_start, then per block content_block_start, content_block_delta …,
content_block_stop, then message_delta (stop_reason, usage) and message_stop; a failed generation ends with an
`error` event. Errors take Anthropic's shape ({"type": "error", "error": {"type", "message"}}).
"""

from __future__ import annotations

from aiohttp import web

from worker.engine.outputs import Failed, Finished, StopReason, TokenText
from worker.http.chat_blocks import AnswerBlocks, Block, BlockDelta, BlockEvent, BlockStart, BlockStop
from worker.http.chat_path import chat_prompt_tokens, submit_chat
from worker.http.errors import ErrorStyle, add_routes, anthropic_error_type, failed_status
from worker.http.jobs import JobStream
from worker.http.protocol_anthropic import (
    STREAM_EVENTS,
    AnthropicMessage,
    AnthropicUsage,
    ContentBlock,
    ContentBlockDelta,
    ContentBlockStart,
    ContentBlockStop,
    CountTokensRequest,
    InputJsonDelta,
    MessageDelta,
    MessageDeltaBody,
    MessagesRequest,
    MessageStart,
    MessageStop,
    StopReasonOut,
    StreamError,
    StreamErrorBody,
    TextBlock,
    TextDelta,
    ThinkingBlock,
    ThinkingDelta,
    TokenCount,
    ToolUseBlock,
)
from worker.http.protocol_native import WireModel
from worker.http.routedoc import RouteDoc, StreamDoc, documented
from worker.http.routes_openai import BODY_ERRORS, parse_body
from worker.http.schemas import read_json
from worker.http.sse import EventStream
from worker.http.state import STATE

routes = web.RouteTableDef()

_STOP_REASONS: dict[StopReason, StopReasonOut] = {
    StopReason.EOS: "end_turn", StopReason.STOP_SEQUENCE: "stop_sequence", StopReason.MAX_TOKENS: "max_tokens",
    StopReason.TIMEOUT: "max_tokens", StopReason.CANCELLED: "max_tokens"}


def content_block(block: Block, started: bool = False) -> ContentBlock:
    """The block in Anthropic's terms; `started`: as content_block_start shows it, before any text."""
    text = "" if started else block.text
    if block.kind == "reasoning":
        return ThinkingBlock(thinking=text)
    if block.kind == "text":
        return TextBlock(text=text)
    return ToolUseBlock(id=block.call_id or "", name=block.name or "", input={} if started else block.arguments())


def stream_events(block_events: list[BlockEvent]) -> list[WireModel]:
    out: list[WireModel] = []
    for ev in block_events:
        b = ev.block
        if isinstance(ev, BlockStart):
            out.append(ContentBlockStart(index=b.index, content_block=content_block(b, started=True)))
        elif isinstance(ev, BlockDelta):
            delta = (TextDelta(text=ev.text) if b.kind == "text" else ThinkingDelta(thinking=ev.text)
                     if b.kind == "reasoning" else InputJsonDelta(partial_json=ev.text))
            out.append(ContentBlockDelta(index=b.index, delta=delta))
        elif isinstance(ev, BlockStop):
            out.append(ContentBlockStop(index=b.index))
    return out


def stop_reason(blocks: AnswerBlocks, end: Finished) -> StopReasonOut:
    return "tool_use" if blocks.called and end.stop_reason is StopReason.EOS else _STOP_REASONS[end.stop_reason]


def usage(end: Finished) -> AnthropicUsage:
    """Anthropic counts cache reads apart: input_tokens are the prompt tokens computed afresh."""
    return AnthropicUsage(input_tokens=end.prompt_tokens - end.cached_tokens, output_tokens=end.tokens_out,
                 cache_read_input_tokens=end.cached_tokens)


async def _stream(request: web.Request, jobs: JobStream, shell: AnthropicMessage,
                  blocks: AnswerBlocks) -> web.StreamResponse:
    events = EventStream(request, jobs.stream_headers(request))
    prompt_tokens = len(jobs.job.prompt_tokens)
    async with jobs:
        await events.open()
        start = shell.model_copy(update={"usage": AnthropicUsage(input_tokens=prompt_tokens, output_tokens=0,
                                                        cache_read_input_tokens=0)})
        events.add_typed(MessageStart(message=start))
        await events.flush()
        async for batch in jobs.batches():
            for _, out in batch:
                if isinstance(out, TokenText):
                    for ev in stream_events(blocks.feed(out.text)):
                        events.add_typed(ev)
                elif isinstance(out, Finished):
                    for ev in stream_events(blocks.finish()):
                        events.add_typed(ev)
                    reason = stop_reason(blocks, out)
                    events.add_typed(MessageDelta(delta=MessageDeltaBody(
                        stop_reason=reason, stop_sequence=out.stop_sequence if reason == "stop_sequence" else None),
                        usage=usage(out)))
                    events.add_typed(MessageStop())
                elif isinstance(out, Failed):
                    events.add_typed(StreamError(error=StreamErrorBody(type=anthropic_error_type(failed_status(out.code)),
                                                                       message=f"{out.code}: {out.message}")))
            await events.flush()
        await events.close()
    return events.response


@routes.post("/v1/messages")
@documented(RouteDoc("Anthropic's Messages API, onto the chat path", "anthropic", body=MessagesRequest,
                     ok=AnthropicMessage, errors=(*BODY_ERRORS, 409, 500),
                     stream=StreamDoc("Anthropic's message events (event: <type>, data with that type)", "named",
                                      STREAM_EVENTS),
                     ok_description="the whole message (stream false) or its event stream (stream true)"))
async def create_message(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    state.require_ready()
    req = parse_body(MessagesRequest, await read_json(request))
    shell = AnthropicMessage(model=state.model_id,
                             usage=AnthropicUsage(input_tokens=0, output_tokens=0, cache_read_input_tokens=0))
    plan, jobs = await submit_chat(request, req.messages_chat_inputs(), [shell.id])
    blocks = AnswerBlocks(plan.parser())
    if req.stream:
        return await _stream(request, jobs, shell, blocks)
    result = (await jobs.collect())[0]
    for out in result.outputs:
        if isinstance(out, TokenText):
            blocks.feed(out.text)
    blocks.finish()
    reason = stop_reason(blocks, result.end)
    message = shell.model_copy(update={
        "content": [content_block(b) for b in blocks.blocks], "stop_reason": reason, "usage": usage(result.end),
        "stop_sequence": result.end.stop_sequence if reason == "stop_sequence" else None})
    return web.Response(body=message.model_dump_json(), content_type="application/json")


@routes.post("/v1/messages/count_tokens")
@documented(RouteDoc("Anthropic's token count: the prompt's tokens in the model's own chat template", "anthropic",
                     body=CountTokensRequest, ok=TokenCount, ok_description="the count", errors=BODY_ERRORS))
async def count_tokens(request: web.Request) -> web.Response:
    request.app[STATE].require_ready()
    req = parse_body(CountTokensRequest, await read_json(request))
    _, tokens = await chat_prompt_tokens(request, req.chat_inputs())
    return web.Response(body=TokenCount(input_tokens=len(tokens)).model_dump_json(), content_type="application/json")


def setup(app: web.Application) -> None:
    add_routes(app, routes, ErrorStyle.ANTHROPIC)
