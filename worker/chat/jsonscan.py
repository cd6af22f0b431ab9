"""Reading one JSON value as its text streams in: where it ends, and the members of an object as they appear.

The tool-call parsers stream a call's name as soon as it is known and its arguments as raw fragments of the JSON
text, so they need to know where a member's value starts and ends before the whole object has arrived. This is a
lexical scan (strings, escapes, nesting), not a validator: the constraint makes the text valid; what the scan cannot
read it reports as `failed`, and the caller decides what the text was.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

WHITESPACE = " \t\r\n"
_SCALAR_END = WHITESPACE + ",}]"


@dataclass
class Member:
    """One member of the scanned object: its key, and its value's span in the scanned text (start -1: the value has
    not begun; end None: it is still open)."""

    key: str
    start: int = -1
    end: int | None = None


@dataclass
class ObjectScan:
    """Scans one JSON object from text fed piece by piece; `text` holds everything fed, `end` is where the object
    closed (the index after its `}`), `failed` says the text is not a JSON object."""

    text: str = ""
    pos: int = 0
    end: int | None = None
    failed: bool = False
    members: list[Member] = field(default_factory=list)
    _depth: int = 0
    _in_string: bool = False
    _escape: bool = False
    _state: str = "open"  # open, key, colon, value, after_value
    _key_start: int = 0
    _scalar: bool = False

    def feed(self, piece: str) -> None:
        self.text += piece
        while self.pos < len(self.text) and self.end is None and not self.failed:
            self._step(self.text[self.pos])
            self.pos += 1

    @property
    def rest(self) -> str:
        """What was fed after the object closed."""
        return self.text[self.end:] if self.end is not None else ""

    def member(self, *keys: str) -> Member | None:
        return next((m for m in self.members if m.key in keys), None)

    def value(self, member: Member) -> object:
        assert member.end is not None
        return json.loads(self.text[member.start:member.end])

    def _step(self, c: str) -> None:
        i = self.pos
        if self._in_string:
            if self._escape:
                self._escape = False
            elif c == "\\":
                self._escape = True
            elif c == '"':
                self._in_string = False
                self._closed_string(i)
            return
        if self._scalar:  # a number or literal value at depth 1 ends at the first delimiter
            if c not in _SCALAR_END:
                return
            self._scalar = False
            self.members[-1].end = i
            self._state = "after_value"
        if self._depth == 0:
            if c in WHITESPACE:
                return
            if c != "{":
                self.failed = True
                return
            self._depth = 1
            self._state = "key"
            return
        if self._depth == 1:
            self._member_step(c, i)
            return
        if c == '"':
            self._in_string = True
        elif c in "{[":
            self._depth += 1
        elif c in "}]":
            self._depth -= 1
            if self._depth == 1:
                self.members[-1].end = i + 1
                self._state = "after_value"

    def _member_step(self, c: str, i: int) -> None:
        if c in WHITESPACE:
            return
        state = self._state
        if state == "key" and c == '"':
            self._in_string, self._key_start = True, i
        elif state == "key" and c == "}" and not self.members:
            self._close(i)
        elif state == "colon" and c == ":":
            self._state = "value"
        elif state == "value":
            self.members[-1].start = i
            if c == '"':
                self._in_string = True
            elif c in "{[":
                self._depth += 1
            else:
                self._scalar = True
        elif state == "after_value" and c == ",":
            self._state = "key"
        elif state == "after_value" and c == "}":
            self._close(i)
        else:
            self.failed = True

    def _closed_string(self, i: int) -> None:
        if self._depth != 1:
            return
        if self._state == "key":
            try:
                key = json.loads(self.text[self._key_start:i + 1])
            except ValueError:
                self.failed = True
                return
            self.members.append(Member(key))
            self._state = "colon"
        else:  # a string value at depth 1
            self.members[-1].end = i + 1
            self._state = "after_value"

    def _close(self, i: int) -> None:
        self._depth = 0
        self.end = i + 1


_PARTIAL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*(\\|\\u[0-9a-fA-F]{0,3})$")
_HIGH_SURROGATE = re.compile(r"(?<!\\)(?:\\\\)*\\u[dD][89abAB][0-9a-fA-F]{2}$")


def decode_partial_string(raw: str) -> tuple[str, int]:
    """A piece of a JSON string literal's body (`raw`, starting where an earlier piece ended), decoded up to the last
    character that can be decoded for certain (a cut escape or a lone high surrogate waits): (text, how much of
    `raw` it used)."""
    end = len(raw)
    cut = _PARTIAL_ESCAPE.search(raw)
    if cut:
        end = cut.start(1)
    surrogate = _HIGH_SURROGATE.search(raw, 0, end)
    if surrogate and surrogate.end() == end:
        end -= 6
    try:
        return str(json.loads('"' + raw[:end] + '"')), end
    except ValueError:
        return "", 0
