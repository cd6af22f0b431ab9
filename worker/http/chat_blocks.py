"""One answer as a sequence of blocks: reasoning, text, tool calls. OpenAI's Responses (output items) and Anthropic's
Messages (content blocks) both shape an answer this way, where chat completions has one message with three fields.

`AnswerBlocks` reads an answer's text as the engine gives it, through the chat parser (worker.chat), and says when a
block starts, grows and stops; each route writes those events in its own wire format, streamed or whole. No HTTP
here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from worker.chat import ChatDelta, ChatParser

BlockKind = Literal["reasoning", "text", "tool_call"]


@dataclass
class Block:
    kind: BlockKind
    index: int  # the block's place in the answer, from 0
    text: str = ""  # the reasoning or text so far; a call's arguments (JSON text) so far
    call_id: str | None = None
    name: str | None = None

    def arguments(self) -> dict[str, Any]:
        """A call's arguments as an object (Anthropic's `input`). Calls are constrained to their schema, so they
        parse; a call that did not (cut short by max_tokens) gives what it has as {"_raw": text}, never nothing."""
        if not self.text.strip():
            return {}
        try:
            value = json.loads(self.text)
        except ValueError:
            return {"_raw": self.text}
        return value if isinstance(value, dict) else {"_raw": self.text}


@dataclass(frozen=True)
class BlockStart:
    block: Block


@dataclass(frozen=True)
class BlockDelta:
    block: Block
    text: str


@dataclass(frozen=True)
class BlockStop:
    block: Block


BlockEvent = BlockStart | BlockDelta | BlockStop


class AnswerBlocks:
    """The blocks of one answer, fed the engine's text piece by piece. Whitespace between blocks (the newlines after
    `</think>` or between calls) never opens a text block of its own; an answer with no block at all still gets
    one (empty) text block, so every answer has something to show."""

    def __init__(self, parser: ChatParser) -> None:
        self.parser = parser
        self.blocks: list[Block] = []
        self.reasoning_tokens = 0  # pieces of the engine's text (one per token) that carried reasoning
        self._open: Block | None = None
        self._held = ""  # whitespace that may begin a text block
        self._calls: dict[int, Block] = {}  # the parser's call index -> its block

    @property
    def called(self) -> bool:
        return self.parser.called

    def feed(self, text: str) -> list[BlockEvent]:
        delta = self.parser.feed(text)
        if delta.reasoning:
            self.reasoning_tokens += 1
        return self._apply(delta)

    def finish(self) -> list[BlockEvent]:
        """The answer ended: what the parser held back, then the last block stops."""
        events = self._apply(self.parser.finish())
        if not self.blocks:
            self._start("text", events).text = self._held
            if self._held:
                events.append(BlockDelta(self.blocks[-1], self._held))
        self._held = ""
        self._stop(events)
        return events

    def _apply(self, delta: ChatDelta) -> list[BlockEvent]:
        events: list[BlockEvent] = []
        if delta.reasoning:
            self._text("reasoning", delta.reasoning, events)
        if delta.content:
            self._text("text", delta.content, events)
        for part in delta.tool_calls:
            block = self._calls.get(part.index)
            if block is None:
                block = self._start("tool_call", events, call_id=part.id, name=part.name)
                self._calls[part.index] = block
            if part.arguments:
                block.text += part.arguments
                events.append(BlockDelta(block, part.arguments))
        return events

    def _text(self, kind: BlockKind, text: str, events: list[BlockEvent]) -> None:
        if self._open is not None and self._open.kind == kind:
            self._open.text += text
            events.append(BlockDelta(self._open, text))
            return
        if kind == "text":
            if text.isspace():
                self._held += text
                return
            # Whitespace before the first block is the answer's own; between blocks it is only a separator.
            text = (self._held + text) if not self.blocks else text.lstrip()
            self._held = ""
        block = self._start(kind, events)
        block.text = text
        events.append(BlockDelta(block, text))

    def _start(self, kind: BlockKind, events: list[BlockEvent], call_id: str | None = None,
               name: str | None = None) -> Block:
        self._stop(events)
        block = Block(kind, len(self.blocks), call_id=call_id, name=name)
        self.blocks.append(block)
        self._open = block
        events.append(BlockStart(block))
        return block

    def _stop(self, events: list[BlockEvent]) -> None:
        if self._open is not None:
            events.append(BlockStop(self._open))
            self._open = None
