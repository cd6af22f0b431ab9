"""Where a long text may be cut (worker/llamacpp/special_split.py), without a model."""

from __future__ import annotations

from worker.llamacpp.special_split import SpecialSplitter, trie_pattern


def test_trie_pattern_takes_the_longest_word_at_a_position():
    pattern = trie_pattern(["<a>", "<a>b>", "<ab", "x"])
    assert pattern.match("<a>b>c").group() == "<a>b>"
    assert pattern.match("<a>c").group() == "<a>"
    assert pattern.match("<abc").group() == "<ab"
    assert pattern.match("<b") is None
    assert [m.group() for m in pattern.finditer("x<a>x<a>b>")] == ["x", "<a>", "x", "<a>b>"]


def test_cuts_fall_after_special_tokens_and_pieces_are_long_enough():
    splitter = SpecialSplitter(["<|im_end|>", "<|im_start|>"], [])
    text = "<|im_start|>user\nhi<|im_end|>\n" * 100
    cuts = splitter.cut_points(text, 100)
    assert cuts and all(text[:c].endswith(("<|im_end|>", "<|im_start|>")) for c in cuts)
    edges = [0, *cuts]
    assert all(b - a >= 100 for a, b in zip(edges, edges[1:], strict=False))


def test_no_cut_where_another_special_token_overlaps():
    # "ab" then "bcd": llama.cpp takes the longer "bcd" first, so "ab" is not cut out there: no cut after "ab".
    splitter = SpecialSplitter(["ab", "bcd"], [])
    assert splitter.cut_points("x" * 10 + "abcd" + "y" * 10, 5) == []
    # ... but further on, a clean "ab" is a cut.
    text = "x" * 10 + "abcd" + "y" * 10 + "ab" + "z" * 10
    assert splitter.cut_points(text, 5) == [26]


def test_no_cut_after_a_token_that_strips_the_space_after_it():
    splitter = SpecialSplitter(["<end>", "<eot>"], strips_right=["<end>"])
    text = "a" * 10 + "<end> " + "b" * 10 + "<eot> " + "c" * 10
    assert splitter.cut_points(text, 5) == [text.index("<eot>") + 5]


def test_nothing_to_cut_by():
    assert SpecialSplitter([], []).cut_points("<|im_end|>" * 100, 10) == []
