"""OpenAI's Responses API, POST /v1/responses: a translation onto the chat path (chat_path.submit_chat), stateless.

The request becomes chat inputs (protocol_responses); each answer's text, split by the chat parser into reasoning,
text and calls (chat_blocks.AnswerBlocks), becomes output items: `reasoning`, `message` (output_text),
`function_call`. Streamed, the Responses event sequence: response.created, response.in_progress, then per item
output_item.added, content_part.added, *.delta …, *.done, content_part.done, output_item.done, and
response.completed (response.incomplete when max_output_tokens cut it, response.failed when generation failed).
Errors take OpenAI's shape.
"""

from __future__ import annotations

from aiohttp import web

from worker.engine.outputs import Failed, Finished, StopReason, TokenText
from worker.http.chat_blocks import AnswerBlocks, Block, BlockDelta, BlockEvent, BlockStart, BlockStop
from worker.http.chat_path import submit_chat
from worker.http.errors import ApiError, ErrorStyle, add_routes
from worker.http.jobs import JobStream
from worker.http.protocol_responses import (
    STREAM_EVENTS,
    ContentPartAdded,
    ContentPartDone,
    FunctionCallArgumentsDelta,
    FunctionCallArgumentsDone,
    FunctionCallItemOut,
    IncompleteDetails,
    InputTokensDetails,
    ItemStatus,
    MessageOut,
    OutputItem,
    OutputItemAdded,
    OutputItemDone,
    OutputText,
    OutputTextDelta,
    OutputTextDone,
    OutputTokensDetails,
    ReasoningOut,
    ReasoningText,
    ReasoningTextDelta,
    ReasoningTextDone,
    Response,
    ResponseCompleted,
    ResponseCreated,
    ResponseError,
    ResponseEvent,
    ResponseFailed,
    ResponseIncomplete,
    ResponseInProgress,
    ResponsesRequest,
    ResponseUsage,
)
from worker.http.routedoc import RouteDoc, StreamDoc, documented
from worker.http.routes_openai import BODY_ERRORS, parse_body
from worker.http.schemas import read_json
from worker.http.sse import EventStream
from worker.http.state import STATE

routes = web.RouteTableDef()

# The chat layer names OpenAI chat's fields; these are the Responses API's.
_FIELDS = {"messages": "input", "response_format": "text.format"}
_INCOMPLETE = (StopReason.MAX_TOKENS, StopReason.TIMEOUT, StopReason.CANCELLED)
_ID_PREFIX = {"reasoning": "rs", "text": "msg", "tool_call": "fc"}


class ResponseWriter:
    """One response's output items and stream events, from its answer's blocks."""

    def __init__(self, shell: Response, blocks: AnswerBlocks) -> None:
        self.shell, self.blocks = shell, blocks
        self.sequence = 0
        self.cut = False  # the answer ended before its end (max_output_tokens, a timeout): its last item is incomplete

    def status_of(self, block: Block) -> ItemStatus:
        last = bool(self.blocks.blocks) and block is self.blocks.blocks[-1]
        return "incomplete" if self.cut and last else "completed"

    def item_id(self, block: Block) -> str:
        return f"{_ID_PREFIX[block.kind]}_{self.shell.id.removeprefix('resp_')}_{block.index}"

    def item(self, block: Block, status: ItemStatus, started: bool = False) -> OutputItem:
        """The block as an output item; `started`: as output_item.added shows it, before any text."""
        text = "" if started else block.text
        if block.kind == "reasoning":
            return ReasoningOut(id=self.item_id(block), status=status,
                                content=[] if started else [ReasoningText(text=text)])
        if block.kind == "text":
            return MessageOut(id=self.item_id(block), status=status,
                              content=[] if started else [OutputText(text=text)])
        return FunctionCallItemOut(id=self.item_id(block), call_id=block.call_id or "", name=block.name or "",
                               arguments=text, status=status)

    def _part(self, block: Block, text: str) -> OutputText | ReasoningText:
        return ReasoningText(text=text) if block.kind == "reasoning" else OutputText(text=text)

    def events(self, block_events: list[BlockEvent]) -> list[ResponseEvent]:
        out: list[ResponseEvent] = []
        for ev in block_events:
            b = ev.block
            iid, at = self.item_id(b), b.index
            if isinstance(ev, BlockStart):
                out.append(OutputItemAdded(output_index=b.index, item=self.item(b, "in_progress", started=True)))
                if b.kind != "tool_call":
                    out.append(ContentPartAdded(item_id=iid, output_index=at, part=self._part(b, "")))
            elif isinstance(ev, BlockDelta):
                if b.kind == "text":
                    out.append(OutputTextDelta(item_id=iid, output_index=at, delta=ev.text))
                elif b.kind == "reasoning":
                    out.append(ReasoningTextDelta(item_id=iid, output_index=at, delta=ev.text))
                else:
                    out.append(FunctionCallArgumentsDelta(item_id=iid, output_index=at, delta=ev.text))
            elif isinstance(ev, BlockStop):
                if b.kind == "text":
                    out.append(OutputTextDone(item_id=iid, output_index=at, text=b.text))
                elif b.kind == "reasoning":
                    out.append(ReasoningTextDone(item_id=iid, output_index=at, text=b.text))
                else:
                    out.append(FunctionCallArgumentsDone(item_id=iid, output_index=at, name=b.name or "",
                                                         arguments=b.text))
                if b.kind != "tool_call":
                    out.append(ContentPartDone(item_id=iid, output_index=at, part=self._part(b, b.text)))
                out.append(OutputItemDone(output_index=b.index, item=self.item(b, self.status_of(b))))
        return out

    def finished(self, end: Finished) -> Response:
        incomplete = self.cut = end.stop_reason in _INCOMPLETE
        usage = ResponseUsage(input_tokens=end.prompt_tokens,
                              input_tokens_details=InputTokensDetails(cached_tokens=end.cached_tokens),
                              output_tokens=end.tokens_out,
                              output_tokens_details=OutputTokensDetails(
                                  reasoning_tokens=min(self.blocks.reasoning_tokens, end.tokens_out)),
                              total_tokens=end.prompt_tokens + end.tokens_out)
        return self.shell.model_copy(update={
            "status": "incomplete" if incomplete else "completed",
            "incomplete_details": IncompleteDetails(reason="max_output_tokens") if incomplete else None,
            "output": [self.item(b, self.status_of(b)) for b in self.blocks.blocks], "usage": usage})

    def failed(self, out: Failed) -> Response:
        return self.shell.model_copy(update={"status": "failed",
                                             "error": ResponseError(code=out.code, message=out.message)})

    def numbered(self, event: ResponseEvent) -> ResponseEvent:
        event.sequence_number = self.sequence
        self.sequence += 1
        return event


def _shell(req: ResponsesRequest, model_id: str) -> Response:
    """The response before its output: what the request asked for, echoed as OpenAI echoes it."""
    fmt = req.text.format if req.text is not None and req.text.format is not None else None
    tool_choice = req.tool_choice.model_dump() if req.tool_choice is not None and not isinstance(
        req.tool_choice, str) else (req.tool_choice or "auto")
    return Response(status="in_progress", instructions=req.instructions, max_output_tokens=req.max_output_tokens,
                    model=model_id, parallel_tool_calls=req.parallel_tool_calls is not False,
                    temperature=req.temperature, top_p=req.top_p,
                    text={"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
                    tool_choice=tool_choice, tools=[t.model_dump(exclude_none=True) for t in req.tools or []],
                    user=req.user, metadata=req.metadata or {})


async def _stream(request: web.Request, jobs: JobStream, writer: ResponseWriter) -> web.StreamResponse:
    events = EventStream(request, jobs.stream_headers(request))

    def add(*evs: ResponseEvent) -> None:
        for ev in evs:
            events.add_typed(writer.numbered(ev))

    async with jobs:
        await events.open()
        add(ResponseCreated(response=writer.shell), ResponseInProgress(response=writer.shell))
        await events.flush()
        async for batch in jobs.batches():
            for _, out in batch:
                if isinstance(out, TokenText):
                    add(*writer.events(writer.blocks.feed(out.text)))
                elif isinstance(out, Finished):
                    writer.cut = out.stop_reason in _INCOMPLETE
                    add(*writer.events(writer.blocks.finish()))
                    response = writer.finished(out)
                    add(ResponseIncomplete(response=response) if response.status == "incomplete"
                        else ResponseCompleted(response=response))
                elif isinstance(out, Failed):
                    add(ResponseFailed(response=writer.failed(out)))
            await events.flush()
        await events.close()
    return events.response


@routes.post("/v1/responses")
@documented(RouteDoc("OpenAI's Responses API (stateless), onto the chat path", "openai", body=ResponsesRequest,
                     ok=Response, errors=(*BODY_ERRORS, 409, 500),
                     stream=StreamDoc("Responses events (event: <type>, data with that type and sequence_number)",
                                      "named", STREAM_EVENTS),
                     ok_description="the whole response (stream false) or its event stream (stream true)"))
async def create_response(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    state.require_ready()
    req = parse_body(ResponsesRequest, await read_json(request))
    shell = _shell(req, state.model_id)
    try:
        plan, jobs = await submit_chat(request, req.chat_inputs(), [shell.id])
    except ApiError as exc:
        if exc.extra.get("field") in _FIELDS:
            exc.extra["field"] = _FIELDS[exc.extra["field"]]
        raise
    writer = ResponseWriter(shell, AnswerBlocks(plan.parser()))
    if req.stream:
        return await _stream(request, jobs, writer)
    result = (await jobs.collect())[0]
    for out in result.outputs:
        if isinstance(out, TokenText):
            writer.blocks.feed(out.text)
    writer.blocks.finish()
    return web.Response(body=writer.finished(result.end).model_dump_json(), content_type="application/json")


def setup(app: web.Application) -> None:
    add_routes(app, routes, ErrorStyle.OPENAI)
