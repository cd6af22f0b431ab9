r"""Where a long text may be cut so that tokenizing the pieces gives exactly the tokens of the whole.

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

Plain text is cut too where the vocabulary's pre-tokenizer is known to split there: chat and agent clients resend a
growing conversation as raw text (/v1/completions), often with no special token in it, and tokenizing its 5.3k
tokens whole took ~4 ms of every turn's time to first token (H200 host). The cut goes after a newline that follows a
visible ASCII character and comes before an ASCII letter. In the regexes of LINE_CUT_PRE_TOKENIZERS:
- no piece takes that newline together with the letter: letters join at most one character before them, never a
  newline (`[^\r\n\p{L}\p{N}]?\p{L}+`, or GPT-2's ` ?\p{L}+`); punctuation takes newlines after it, not letters;
- the newline is a whitespace run of its own, so it is one piece (or the end of the punctuation's) whether a letter
  or the end of the text follows: `\s+(?!\S)` looks ahead, and at the end of a piece a longer run of whitespace
  would have been taken whole, where in the whole text it stops before its last character;
- no regex looks behind, so the regex, run on the rest alone, splits it as in the whole.
Such a cut is refused where a special token covers or starts at it.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable
from typing import Any

Trie = dict[str, Any]  # a character -> the subtree; "" marks a word's end

# llama.cpp's names (tokenizer.ggml.pre) of the BPE pre-tokenizers whose regexes are checked for line cuts (the
# module's docstring): Llama 3's, Qwen 2's and GPT-2's regexes, and those that share them (llama-vocab.cpp).
LINE_CUT_PRE_TOKENIZERS = frozenset({
    "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",  # Llama 3's
    "dbrx", "smaug-bpe", "chatglm-bpe",  # Llama 3's regex too
    "qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "stablelm2",  # Qwen 2's (digits one by one)
    "gpt-2", "phi-2", "mpt", "olmo", "starcoder", "refact", "command-r", "smollm", "codeshell", "exaone",  # GPT-2's
})
_ASCII_LETTERS = frozenset(string.ascii_letters)


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

    def __init__(self, texts: Iterable[str], strips_right: Iterable[str], *, line_cuts: bool = False) -> None:
        """`line_cuts`: plain text may be cut after a newline between a visible ASCII character and an ASCII letter
        (the module's docstring)."""
        words = sorted({t for t in texts if t})
        self.pattern = trie_pattern(words) if words else None
        self.longest = max((len(w) for w in words), default=0)
        self.strips_right = frozenset(strips_right)
        self.line_cuts = line_cuts

    def cut_points(self, text: str, min_piece: int) -> list[int]:
        """Positions (in characters) to cut `text` at, pieces at least `min_piece` long (the last one may be
        shorter or longer); empty when there is nowhere safe. Each cut depends on the text before it only, so a text
        that grows is cut where it was before (the piece cache's hits)."""
        points: list[int] = []
        pos = min_piece
        special = self._special_cut(text, pos)  # the next cut after a special token: kept while it lies ahead
        while pos < len(text):
            if special is not None and special < pos:
                special = self._special_cut(text, pos)
            line = self._line_cut(text, pos, len(text) if special is None else special)
            cut = special if line is None else line
            if cut is None:
                break
            points.append(cut)
            pos = cut + min_piece
        return points

    def _special_cut(self, text: str, pos: int) -> int | None:
        """The first safe cut after a special token that ends at or after pos, before the text's end."""
        if self.pattern is None:
            return None
        end = len(text)
        while pos < end:
            found = self.pattern.search(text, pos)
            if found is None:
                return None
            s, p = found.span()
            if p == s:  # cannot happen with non-empty words; guards the loop
                pos = s + 1
                continue
            if p < end and self._safe(text, s, p, found.group()):
                return p
            pos = s + 1
        return None

    def _line_cut(self, text: str, pos: int, before: int) -> int | None:
        """The first line cut at or after pos and before `before` that no special token covers or starts at."""
        if not self.line_cuts:
            return None
        # str.find runs at memory speed; a regex with a look-behind tried every position (0.3 ms a 27k-character
        # system prompt without a newline)
        i = text.find("\n", max(pos - 1, 1), before - 1)
        while i != -1:
            cut = i + 1
            if "!" <= text[i - 1] <= "~" and text[cut] in _ASCII_LETTERS and not self._special_near(text, cut):
                return cut
            i = text.find("\n", cut, before - 1)
        return None

    def _special_near(self, text: str, cut: int) -> bool:
        """Whether a special token starts at `cut`, or runs across or up to it."""
        if self.pattern is None:
            return False
        match = self.pattern.match
        return any((m := match(text, u)) is not None and m.end() >= cut
                   for u in range(max(0, cut - self.longest), cut + 1))

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
