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


def test_line_cuts_fall_after_a_newline_before_a_letter():
    text = "".join(f"line {i} ends.\n" + ("\n" if i % 3 == 0 else "") + (" " if i % 5 == 0 else "") for i in range(200))
    cuts = SpecialSplitter([], [], line_cuts=True).cut_points(text, 50)
    assert cuts and all(text[c - 2] == "." and text[c - 1] == "\n" and text[c].isascii() and text[c].isalpha()
                        for c in cuts)
    edges = [0, *cuts]
    assert all(b - a >= 50 for a, b in zip(edges, edges[1:], strict=False))
    assert SpecialSplitter([], [], line_cuts=False).cut_points(text, 50) == []
    # no cut before a digit, a space, another newline or a non-ASCII letter, nor after whitespace or a non-ASCII
    # character (a whitespace run at a piece's end is split otherwise than before a letter)
    text = "x" * 60 + "\n1\n \n\n\né é\nA \nB\u00a0\nC\t\nD" + "y" * 60
    assert SpecialSplitter([], [], line_cuts=True).cut_points(text, 50) == []


def test_a_growing_text_keeps_its_cuts():
    splitter = SpecialSplitter(["<|im_end|>"], [], line_cuts=True)
    text = ""
    before: list[int] = []
    for turn in range(30):
        text += f"User: {'word ' * (turn * 7 % 40)}<|im_end|>\nAssistant: reply {turn}\n"
        cuts = splitter.cut_points(text, 64)
        assert cuts[:len(before)] == before, turn
        before = cuts[:-1]  # the last one may move as the text grows past it: a cut only needs the text before it
    assert len(before) > 5


def test_no_line_cut_where_a_special_token_covers_or_starts_at_it():
    splitter = SpecialSplitter(["<x\nA>", "Bye", "<e>\n"], [], line_cuts=True)
    assert splitter.cut_points("a" * 20 + "<x\nA>" + "b" * 20, 10) == [25]  # after the token, not inside it
    # a special token starts at the newline's cut: only the one after the token
    assert splitter.cut_points("a" * 20 + "\nBye" + "b" * 20, 10) == [24]
    text = "a" * 20 + "<e>\nC" + "b" * 20
    assert splitter.cut_points(text, 10) == [text.index("C")]  # the special token's own cut, a safe one
