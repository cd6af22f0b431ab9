"""The tokens of long texts' pieces, kept most recently used first within a budget of characters."""

from __future__ import annotations

from worker.llamacpp.model import PieceCache


def test_pieces_are_tokenized_once_and_the_least_recently_used_go_first():
    calls: list[str] = []

    def tokenize(piece: str) -> list[int]:
        calls.append(piece)
        return [ord(c) for c in piece]

    cache = PieceCache(max_chars=10)
    assert list(cache.get_or_tokenize("abcd", True, tokenize)) == [97, 98, 99, 100]
    cache.get_or_tokenize("efgh", True, tokenize)
    cache.get_or_tokenize("abcd", True, tokenize)  # kept: used again, so the most recent
    assert calls == ["abcd", "efgh"]
    cache.get_or_tokenize("abcd", False, tokenize)  # another setting of parse_special: another entry
    assert calls == ["abcd", "efgh", "abcd"]  # 12 characters: "efgh", the least recently used, went
    cache.get_or_tokenize("efgh", True, tokenize)
    assert calls[-1] == "efgh"
    cache.get_or_tokenize("x" * 11, True, tokenize)  # longer than the budget: tokenized, never kept
    cache.get_or_tokenize("x" * 11, True, tokenize)
    assert calls[-2:] == ["x" * 11] * 2
