"""Token bytes in, valid UTF-8 text out, with stop strings cut out across token boundaries."""

from __future__ import annotations

import codecs


class TextStream:
    """Turns token pieces (bytes) into text the client may see.

    Bytes of a character split across tokens are held back by an incremental UTF-8 decoder. Text that could be
    the start of a stop string is held back until it is known not to be one, so no stop text ever reaches the
    client. Work per token is bounded by the longest stop string, not by the length of the output.
    """

    def __init__(self, stop: list[str] | tuple[str, ...] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = [s for s in stop if s]
        self._max_stop = max((len(s) for s in self._stop), default=0)
        self._pending = ""  # decoded text not yet released
        self.matched: str | None = None  # the stop string that ended the stream, if any

    def feed(self, piece: bytes) -> str:
        """Add one token's bytes; return the text now safe to release (maybe empty)."""
        if self.matched is not None:
            return ""
        self._pending += self._decoder.decode(piece)
        return self._release(final=False)

    def finish(self) -> str:
        """End of generation: release what is held back (an unfinished character becomes U+FFFD)."""
        if self.matched is not None:
            return ""
        self._pending += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        text = self._pending
        if not self._stop:
            self._pending = ""
            return text
        # A stop string can only start in the last (len(text) - 0) chars; search only the window that new text
        # can complete: the held-back tail plus the new text.
        hit, hit_stop = -1, None
        for s in self._stop:
            i = text.find(s)
            if i != -1 and (hit == -1 or i < hit):
                hit, hit_stop = i, s
        if hit_stop is not None:
            self.matched = hit_stop
            self._pending = ""
            return text[:hit]
        keep = 0 if final else self._partial_stop_len(text)
        self._pending = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        for n in range(min(len(text), self._max_stop - 1), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0
