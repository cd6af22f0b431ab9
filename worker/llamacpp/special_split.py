"""Where a long text may be cut so that tokenizing the pieces gives exactly the tokens of the whole.

llama.cpp first cuts special tokens out of a text (longest token first, each over every remaining fragment), then
tokenizes each fragment of plain text on its own. That first pass costs time quadratic in the number of special
tokens in the text (8,000 `<|im_end|>`: 0.4 s; 32,000: ~7 s on one core), and a thread in llama.cpp cannot be
interrupted. Since the fragments are tokenized independently, a cut right after a special token that llama.cpp cuts
out too changes nothing: the pieces can be tokenized one by one, each with few special tokens, in linear time.

A cut after an occurrence of special token T at [s, p) is safe when
- no other special-token occurrence overlaps s or p (llama.cpp might have taken that one instead of T, leaving a
  fragment of plain text across p), which holds when the longest special token starting at each u in (s - L, s)
  ends at or before s, and the one at each u in (s, p) ends at or before p (L: the longest special token);
- T does not strip the whitespace after it (llama.cpp's RSTRIP attribute acts across the cut).
With SentencePiece vocabularies a fragment after a special token gets the same leading space as one at the start of
a text, so the cut changes nothing there either.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

Trie = dict[str, Any]  # a character -> the subtree; "" marks a word's end


def trie_pattern(words: Iterable[str]) -> re.Pattern[str]:
    """A regex that matches, at a position, the longest of `words` starting there (linear: one path per character,
    where an alternation of thousands of words would try each)."""
    trie: Trie = {}
    for word in words:
        node = trie
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = {}  # a word ends here

    def emit(node: Trie) -> str:
        branches = [re.escape(ch) + emit(child) for ch, child in sorted(node.items()) if ch]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        # Greedy: the longer word first, the word ending here if that fails.
        return f"(?:{body})?" if "" in node else body

    return re.compile(emit(trie))


class SpecialSplitter:
    """The special tokens llama.cpp cuts out of a text (for one setting of parse_special), and safe cut points."""

    def __init__(self, texts: Iterable[str], strips_right: Iterable[str]) -> None:
        words = sorted({t for t in texts if t})
        self.pattern = trie_pattern(words) if words else None
        self.longest = max((len(w) for w in words), default=0)
        self.strips_right = frozenset(strips_right)

    def cut_points(self, text: str, min_piece: int) -> list[int]:
        """Positions (in characters) to cut `text` at, pieces at least `min_piece` long (the last one may be
        shorter or longer); empty when there is nowhere safe."""
        pattern = self.pattern
        if pattern is None:
            return []
        points: list[int] = []
        pos = min_piece
        end = len(text)
        while pos < end:
            found = pattern.search(text, pos)
            if found is None:
                break
            s, p = found.span()
            if p == s:  # cannot happen with non-empty words; guards the loop
                pos = s + 1
                continue
            if p < end and self._safe(text, s, p, found.group()):
                points.append(p)
                pos = p + min_piece
            else:
                pos = s + 1
        return points

    def _safe(self, text: str, s: int, p: int, token: str) -> bool:
        if token in self.strips_right:
            return False
        match = self.pattern.match  # type: ignore[union-attr]
        for u in range(max(0, s - self.longest + 1), s):
            m = match(text, u)
            if m is not None and m.end() > s:
                return False
        for u in range(s + 1, p):
            m = match(text, u)
            if m is not None and m.end() > p:
                return False
        return True
