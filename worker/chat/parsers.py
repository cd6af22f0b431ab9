"""Incremental parsers of a chat answer: text deltas in, content / reasoning / OpenAI tool-call deltas out.

Every parser gives the same result however the text is split (tests feed canned answers split at every position):
a marker cut between two deltas is held back until it is known to be one, so no markup reaches the client. A call is
announced once, with its id and name, when its arguments begin; the arguments follow as fragments of their JSON
text, which concatenate to the arguments the model wrote.
"""

from __future__ import annotations

import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass, field

from worker.chat.jsonscan import WHITESPACE, Member, ObjectScan, decode_partial_string


@dataclass(frozen=True)
class ToolCallDelta:
    """OpenAI's `delta.tool_calls[i]`: the first delta of a call has its id and name, the rest argument text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True)
class ChatDelta:
    content: str = ""
    reasoning: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)


IdFactory = Callable[[], str]


def openai_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def mistral_call_id() -> str:
    """Mistral's templates refuse any id but 9 letters and digits."""
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))


def partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that could be the start of `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _content_holding_space(text: str, out: _Out, final: bool) -> str:
    """Content out, but its trailing space held back (dropped if a call follows); returns what was held."""
    trailing = 0 if final else _trailing_space(text)
    if text[:len(text) - trailing]:
        out.content.append(text[:len(text) - trailing])
    return text[len(text) - trailing:]


def _trailing_space(text: str) -> int:
    return len(text) - len(text.rstrip(WHITESPACE))


class _Out:
    """Collects the pieces of one ChatDelta."""

    def __init__(self) -> None:
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.calls: list[ToolCallDelta] = []

    def delta(self) -> ChatDelta:
        return ChatDelta("".join(self.content), "".join(self.reasoning), tuple(self.calls))


# ---------------------------------------------------------------------------------------------- one call object


@dataclass
class CallStream:
    """One call object, {"name": ..., "arguments" | "parameters": {...}}, read as it streams in."""

    index: int
    new_id: IdFactory
    scan: ObjectScan = field(default_factory=ObjectScan)
    announced: bool = False
    sent: int = 0  # how far into the arguments' text the fragments have gone
    needs_arguments: bool = False  # an object without arguments is no call (Llama: the answer is any JSON)

    def feed(self, piece: str, out: _Out) -> None:
        self.scan.feed(piece)
        self._emit(out)

    @property
    def done(self) -> bool:
        return self.scan.end is not None or self.scan.failed

    @property
    def name(self) -> str | None:
        member = self.scan.member("name")
        if member is None or member.end is None:
            return None
        value = self.scan.value(member)
        return value if isinstance(value, str) else None

    def is_call(self) -> bool:
        """Known to be a call: a name, and arguments that have begun (or a closed object with a name)."""
        args = self._arguments()
        if args is not None and args.start >= 0:
            return self.name is not None
        return self.name is not None and self.scan.end is not None and not self.needs_arguments

    def _arguments(self) -> Member | None:
        return self.scan.member("arguments", "parameters")

    def cut_short(self, out: _Out) -> None:
        """The answer ended inside this call (max_tokens): a call whose name is whole is announced, with what of
        its arguments came, as OpenAI sends a call cut by `length`; the name is what a client acts on."""
        if not self.announced and self.name is not None:
            out.calls.append(ToolCallDelta(self.index, self.new_id(), self.name))
            self.announced = True

    def _emit(self, out: _Out) -> None:
        if not self.announced:
            if not self.is_call():
                return
            out.calls.append(ToolCallDelta(self.index, self.new_id(), self.name))
            self.announced = True
        args = self._arguments()
        if args is None or args.start < 0:
            if self.scan.end is not None and self.sent == 0:  # a call without arguments: OpenAI's are "{}"
                out.calls.append(ToolCallDelta(self.index, arguments="{}"))
                self.sent = 2
            return
        end = args.end if args.end is not None else self.scan.pos
        if end > args.start + self.sent:
            out.calls.append(ToolCallDelta(self.index, arguments=self.scan.text[args.start + self.sent:end]))
            self.sent = end - args.start


class CallList:
    """A JSON array of call objects ([{...}, {...}]) as it streams in: Mistral's, and the generic form's."""

    def __init__(self, first_index: int, new_id: IdFactory) -> None:
        self.index = first_index
        self.new_id = new_id
        self.state = "open"  # open, item, after_item, done, failed
        self.call: CallStream | None = None
        self.count = 0
        self.rest = ""

    def feed(self, piece: str, out: _Out) -> None:
        while piece and self.state not in ("done", "failed"):
            if self.state == "item":
                assert self.call is not None
                self.call.feed(piece, out)
                piece = ""
                if self.call.scan.failed:
                    self.state = "failed"
                elif self.call.done:
                    piece, self.state = self.call.scan.rest, "after_item"
                    self.index, self.count = self.index + 1, self.count + 1
                continue
            c, piece = piece[0], piece[1:]
            if c in WHITESPACE:
                continue
            if self.state == "open" and c == "[":
                self.state = "first"
            elif self.state in ("first", "next") and c == "{":
                self.call = CallStream(self.index, self.new_id)
                self.state = "item"
                piece = c + piece
            elif self.state == "first" and c == "]" or self.state == "after_item" and c == "]":
                self.state = "done"
            elif self.state == "after_item" and c == ",":
                self.state = "next"
            else:
                self.state = "failed"
        if self.state in ("done", "failed"):
            self.rest += piece

    def cut_short(self, out: _Out) -> None:
        if self.state == "item" and self.call is not None:
            self.call.cut_short(out)


# ---------------------------------------------------------------------------------------------- reasoning


class ReasoningSplitter:
    """`<think>…</think>` at the start of an answer as reasoning; what follows goes on to the tool-call parser
    (its leading space dropped).

    forced_open: the prompt already opened the block (DeepSeek-R1 distills end it with `<think>\\n`), so the answer
    starts inside it. inline: the block stays in the content as the model wrote it (with the `<think>` the prompt
    opened), for clients that want the raw text; calls after it are still parsed.
    """

    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self, *, forced_open: bool = False, inline: bool = False) -> None:
        self.inline = inline
        self.state = "think" if forced_open else "start"
        self.buffer = ""
        self.started = False  # reasoning text has begun (leading space dropped until then)
        self.pending_space = ""
        self.strip_content = False
        self.prefix = self.OPEN if forced_open and inline else ""

    def feed(self, text: str, out: _Out) -> str:
        """Reasoning goes to `out`; returns the content to pass on."""
        if self.prefix:
            out.content.append(self.prefix)
            self.prefix = ""
        self.buffer += text
        content = ""
        while self.buffer:
            if self.state == "start":
                stripped = self.buffer.lstrip(WHITESPACE)
                if stripped.startswith(self.OPEN):
                    if self.inline:
                        out.content.append(self.buffer[:len(self.buffer) - len(stripped) + len(self.OPEN)])
                    self.buffer, self.state = stripped[len(self.OPEN):], "think"
                elif self.OPEN.startswith(stripped):
                    break  # maybe the tag, still arriving
                else:
                    self.state = "content"
            elif self.state == "think":
                if not self._think(out):
                    break
            else:
                if self.strip_content:
                    self.buffer = self.buffer.lstrip(WHITESPACE)
                    if not self.buffer:
                        break
                    self.strip_content = False
                content, self.buffer = content + self.buffer, ""
        return content

    def _think(self, out: _Out) -> bool:
        """Reasoning up to the closing tag; True when the tag was found."""
        at = self.buffer.find(self.CLOSE)
        if at >= 0:
            end = at + len(self.CLOSE)
            if self.inline:
                out.content.append(self.buffer[:end])
            else:
                self._reason(self.buffer[:at], out, final=True)
            self.buffer, self.state, self.strip_content = self.buffer[end:], "content", not self.inline
            return True
        keep = partial_suffix(self.buffer, self.CLOSE)
        if self.inline:
            out.content.append(self.buffer[:len(self.buffer) - keep])
        else:
            self._reason(self.buffer[:len(self.buffer) - keep], out, final=False)
        self.buffer = self.buffer[len(self.buffer) - keep:]
        return False

    def _reason(self, text: str, out: _Out, final: bool) -> None:
        if not self.started:
            text = text.lstrip(WHITESPACE)
            self.started = bool(text)
        text = self.pending_space + text
        trailing = _trailing_space(text) if text else 0
        if final:
            text, self.pending_space = text[:len(text) - trailing], ""
        else:
            self.pending_space = text[len(text) - trailing:]
            text = text[:len(text) - trailing]
        if text:
            out.reasoning.append(text)

    def finish(self, out: _Out) -> str:
        """The end of the answer: an unclosed block is reasoning; returns the content still held."""
        if self.prefix:
            out.content.append(self.prefix)
            self.prefix = ""
        if self.state == "think":
            if self.inline:
                out.content.append(self.buffer)
            else:
                self._reason(self.buffer, out, final=True)
            return ""
        if self.state == "start" or not self.strip_content:
            return self.buffer
        return ""


# ---------------------------------------------------------------------------------------------- tool calls


class ToolParser:
    """Content in, content and tool-call deltas out. The base class: content only (no tools in play)."""

    def __init__(self, new_id: IdFactory = openai_call_id) -> None:
        self.new_id = new_id
        self.calls = 0

    def feed(self, text: str, out: _Out) -> None:
        if text:
            out.content.append(text)

    def finish(self, out: _Out) -> None:
        pass


class MarkedCalls(ToolParser):
    """Calls that follow an opening marker in free text. Hermes / Qwen: `<tool_call>{json}</tool_call>`, one block
    per call; Mistral: `[TOOL_CALLS][{json}, ...]`, one list of calls. Text before and between calls is content
    (the space next to a marker is dropped)."""

    def __init__(self, open_marker: str, close_marker: str | None, new_id: IdFactory = openai_call_id) -> None:
        super().__init__(new_id)
        self.open_marker, self.close_marker = open_marker, close_marker
        self.buffer = ""
        self.state = "text"  # text, call, close
        self.call: CallStream | CallList | None = None
        self.pending_space = ""
        self.after_call = False

    def feed(self, text: str, out: _Out) -> None:
        self.buffer += text
        while self.buffer:
            if self.state == "text":
                if not self._text(out, final=False):
                    return
            elif self.state == "call":
                self._call(out)
            else:  # close: space, then the closing marker
                stripped = self.buffer.lstrip(WHITESPACE)
                assert self.close_marker is not None
                if stripped.startswith(self.close_marker):
                    self.buffer, self.state = stripped[len(self.close_marker):], "text"
                elif self.close_marker.startswith(stripped):
                    return
                else:  # no closing marker: the model went on (the constraint never allows this)
                    self.buffer, self.state = stripped, "text"

    def _text(self, out: _Out, final: bool) -> bool:
        at = self.buffer.find(self.open_marker)
        if at >= 0:
            self._content(self.buffer[:at], out, before_marker=True)
            self.buffer = self.buffer[at + len(self.open_marker):]
            self.state = "call"
            if self.close_marker is not None:
                self.call = CallStream(self.calls, self.new_id)
            else:
                self.call = CallList(self.calls, self.new_id)
            return True
        keep = 0 if final else partial_suffix(self.buffer, self.open_marker)
        self._content(self.buffer[:len(self.buffer) - keep], out, before_marker=False, final=final)
        self.buffer = self.buffer[len(self.buffer) - keep:]
        return False

    def _content(self, text: str, out: _Out, before_marker: bool, final: bool = False) -> None:
        if self.after_call:
            text = text.lstrip(WHITESPACE)
            if not text:
                return
            self.after_call = False
        text = self.pending_space + text
        trailing = _trailing_space(text) if not final else 0
        self.pending_space = "" if before_marker else text[len(text) - trailing:]
        text = text[:len(text) - trailing]
        if text:
            out.content.append(text)

    def _call(self, out: _Out) -> None:
        call = self.call
        assert call is not None
        piece, self.buffer = self.buffer, ""
        call.feed(piece, out)
        if isinstance(call, CallStream):
            if call.scan.failed and not call.announced:  # no JSON after the marker (only unconstrained): text
                self.buffer, self.state = call.scan.text, "text"
            elif call.done:
                self.calls += int(call.announced)
                self.buffer = call.scan.rest if call.scan.end is not None else ""
                self.state, self.after_call = "close", True
        elif call.state in ("done", "failed"):
            self.calls = call.index
            self.buffer, self.state, self.after_call = call.rest, "text", True

    def finish(self, out: _Out) -> None:
        if self.state == "text":
            self._text(out, final=True)
        elif self.state == "call" and self.call is not None:
            self.call.cut_short(out)


class NamedArgsCalls(ToolParser):
    """Mistral's newer form (Small 3.1+, Magistral, Devstral, Ministral 3): `[TOOL_CALLS]name[ARGS]{json}` per call,
    the arguments the JSON itself; an `[CALL_ID]id` the model may write after the name is read and dropped (the
    call gets its own id). Text before the first marker is content."""

    OPEN, ARGS, CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"

    def __init__(self, new_id: IdFactory = mistral_call_id) -> None:
        super().__init__(new_id)
        self.buffer = ""
        self.state = "text"  # text, name, args
        self.scan = ObjectScan()
        self.sent = 0
        self.pending_space = ""
        self.after_call = False

    def feed(self, text: str, out: _Out) -> None:
        self.buffer += text
        while self.buffer:
            if self.state == "text":
                at = self.buffer.find(self.OPEN)
                if at < 0:
                    keep = partial_suffix(self.buffer, self.OPEN)
                    self._content(self.buffer[:len(self.buffer) - keep], out)
                    self.buffer = self.buffer[len(self.buffer) - keep:]
                    return
                self._content(self.buffer[:at], out)
                self.pending_space, self.buffer, self.state = "", self.buffer[at + len(self.OPEN):], "name"
            elif self.state == "name":
                at = self.buffer.find(self.ARGS)
                if at < 0:
                    return  # the name is short: wait for all of it
                name = self.buffer[:at].split(self.CALL_ID)[0].strip(WHITESPACE)
                out.calls.append(ToolCallDelta(self.calls, self.new_id(), name))
                self.buffer, self.state = self.buffer[at + len(self.ARGS):], "args"
                self.scan, self.sent = ObjectScan(), 0
            else:
                self.scan.feed(self.buffer)
                self.buffer = ""
                start = next((i for i, c in enumerate(self.scan.text) if c not in WHITESPACE), None)
                end = self.scan.end if self.scan.end is not None else self.scan.pos
                if start is not None and end > start + self.sent:
                    out.calls.append(ToolCallDelta(self.calls, arguments=self.scan.text[start + self.sent:end]))
                    self.sent = end - start
                if self.scan.end is None and not self.scan.failed:
                    return
                self.calls += 1
                self.buffer, self.state, self.after_call = self.scan.rest, "text", True

    def _content(self, text: str, out: _Out, final: bool = False) -> None:
        if self.after_call:
            text = text.lstrip(WHITESPACE)
            if not text:
                return
            self.after_call = False
        self.pending_space = _content_holding_space(self.pending_space + text, out, final)

    def finish(self, out: _Out) -> None:
        if self.state == "text":
            self._content(self.buffer, out, final=True)
        elif self.state == "args" and self.sent == 0:
            out.calls.append(ToolCallDelta(self.calls, arguments="{}"))


class LeadingJsonCalls(ToolParser):
    """Llama 3.1+: a call is a JSON object {"name": ..., "parameters": {...}}, the whole answer (optionally after
    `<|python_tag|>`, several separated by `;` where the model makes parallel calls), or after some text from the
    point where `{"name"` appears (where auto's lazy grammar takes over). Any other text is content, JSON included:
    an object is held until it is known to be a call or not."""

    PYTHON_TAG = "<|python_tag|>"
    TRIGGER = '{"name"'

    def __init__(self, new_id: IdFactory = openai_call_id) -> None:
        super().__init__(new_id)
        self.buffer = ""
        self.state = "start"  # start, text, call, between
        self.call: CallStream | None = None
        self.held = ""  # the raw text of an object not yet known to be a call
        self.pending_space = ""

    def feed(self, text: str, out: _Out) -> None:
        self.buffer += text
        while self.buffer:
            if self.state == "call":
                self._call(out)
            elif self.state in ("start", "between"):
                stripped = self.buffer.lstrip(WHITESPACE)
                if self.state == "between" and stripped.startswith(";"):
                    stripped = stripped[1:].lstrip(WHITESPACE)
                if stripped.startswith(self.PYTHON_TAG):
                    stripped = stripped[len(self.PYTHON_TAG):]
                if not stripped or self.PYTHON_TAG.startswith(stripped) or stripped == ";":
                    return  # space, or a marker still arriving
                if stripped.startswith("{"):
                    self._candidate(stripped)
                else:
                    self.buffer, self.state = stripped if self.state == "between" else self.buffer, "text"
            elif not self._text(out, final=False):
                return

    def _text(self, out: _Out, final: bool) -> bool:
        at = self.buffer.find(self.TRIGGER)
        if at >= 0:  # the space before it is held: dropped if this is a call, content if not
            self._content(self.buffer[:at], out)
            self._candidate(self.buffer[at:])
            return True
        keep = 0 if final else partial_suffix(self.buffer, self.TRIGGER)
        self._content(self.buffer[:len(self.buffer) - keep], out, final=final)
        self.buffer = self.buffer[len(self.buffer) - keep:]
        return False

    def _content(self, text: str, out: _Out, final: bool = False) -> None:
        """Content, its trailing space held back (dropped if a call follows)."""
        self.pending_space = _content_holding_space(self.pending_space + text, out, final)

    def _candidate(self, text: str) -> None:
        self.call = CallStream(self.calls, self.new_id, needs_arguments=True)
        self.buffer, self.held, self.state = text, "", "call"

    def _call(self, out: _Out) -> None:
        call = self.call
        assert call is not None
        piece, self.buffer = self.buffer, ""
        if not call.announced:
            self.held += piece
        call.feed(piece, out)
        if call.announced:
            self.held = self.pending_space = ""
        if not call.done:
            return
        rest = call.scan.rest if call.scan.end is not None else ""
        if call.announced:
            self.calls += 1
            self.buffer, self.state = rest, "between"
        else:  # an object that is not a call: content, as written
            self._content(self.held[:len(self.held) - len(rest)], out)
            self.buffer, self.held, self.state = rest, "", "text"

    def finish(self, out: _Out) -> None:
        if self.state == "call" and self.call is not None and not self.call.announced:
            self._content(self.held, out, final=True)  # cut off before it was known to be a call
        elif self.state == "text":
            self._text(out, final=True)
        elif self.state == "start":
            self._content(self.buffer if self.buffer.strip(WHITESPACE) != self.PYTHON_TAG else "", out, final=True)
        if self.pending_space and self.state != "between":
            out.content.append(self.pending_space)
            self.pending_space = ""


class GenericJson(ToolParser):
    """The generic form (templates that know nothing of tools): the whole answer is {"tool_calls": [...]} or
    {"response": "..."}; the response's text streams out as content as it is decoded."""

    def __init__(self, new_id: IdFactory = openai_call_id) -> None:
        super().__init__(new_id)
        self.scan = ObjectScan()
        self.list: CallList | None = None
        self.fed = 0  # how much of the tool_calls value went to the list
        self.said = 0  # how much of the response's JSON text has been decoded and sent

    def feed(self, text: str, out: _Out) -> None:
        self.scan.feed(text)
        calls = self.scan.member("tool_calls")
        if calls is not None and calls.start >= 0:
            if self.list is None:
                self.list = CallList(0, self.new_id)
            end = calls.end if calls.end is not None else self.scan.pos
            self.list.feed(self.scan.text[calls.start + self.fed:end], out)
            self.fed = end - calls.start
        response = self.scan.member("response")
        if response is not None and response.start >= 0 and self.scan.text[response.start] == '"':
            end = response.end - 1 if response.end is not None else self.scan.pos
            text, used = decode_partial_string(self.scan.text[response.start + 1 + self.said:end])
            if text:
                out.content.append(text)
            self.said += used

    def finish(self, out: _Out) -> None:
        if self.list is not None:
            self.list.cut_short(out)
        if self.scan.failed or (self.scan.member("tool_calls") is None and self.scan.member("response") is None):
            text = self.scan.text  # not the form (cannot happen under the constraint): the text as it came
            if text.strip(WHITESPACE):
                out.content.append(text)


# ---------------------------------------------------------------------------------------------- one answer


class ChatParser:
    """One answer's parser: reasoning split first, then the family's tool-call parser over the content."""

    def __init__(self, tools: ToolParser, reasoning: ReasoningSplitter | None) -> None:
        self.tools = tools
        self.reasoning = reasoning
        self.called = False  # the answer made calls: finish_reason "tool_calls"

    def feed(self, text: str) -> ChatDelta:
        out = _Out()
        if self.reasoning is not None:
            text = self.reasoning.feed(text, out)
        self.tools.feed(text, out)
        return self._delta(out)

    def finish(self) -> ChatDelta:
        """The answer ended: what was held back."""
        out = _Out()
        if self.reasoning is not None:
            self.tools.feed(self.reasoning.finish(out), out)
        self.tools.finish(out)
        return self._delta(out)

    def _delta(self, out: _Out) -> ChatDelta:
        self.called = self.called or bool(out.calls)
        return out.delta()


def call_arguments(delta_list: list[ChatDelta]) -> list[dict[str, str]]:
    """The calls a stream of deltas made, assembled as OpenAI's message.tool_calls (function name, arguments)."""
    calls: dict[int, dict[str, str]] = {}
    for delta in delta_list:
        for part in delta.tool_calls:
            call = calls.setdefault(part.index, {"id": "", "name": "", "arguments": ""})
            if part.id is not None:
                call["id"] = part.id
            if part.name is not None:
                call["name"] = part.name
            call["arguments"] += part.arguments
    return [calls[i] for i in sorted(calls)]
