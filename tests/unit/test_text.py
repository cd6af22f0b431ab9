"""UTF-8 hold-back and stop strings across token boundaries."""

from __future__ import annotations

import pytest

from worker.engine.text import TextStream


def run(pieces: list[bytes], stop=()) -> tuple[list[str], str, str | None]:
    ts = TextStream(stop)
    out = [ts.feed(p) for p in pieces]
    tail = ts.finish()
    return out, "".join(out) + tail, ts.matched


def test_plain_text_passes_through_at_once():
    out, text, matched = run([b"Hello", b" world"])
    assert out == ["Hello", " world"] and text == "Hello world" and matched is None


@pytest.mark.parametrize("char", ["é", "€", "日", "🦀", "👩‍🚀"])
def test_a_character_split_across_tokens_is_held_back_until_whole(char):
    data = ("a" + char + "b").encode()
    pieces = [data[i : i + 1] for i in range(len(data))]  # one byte per token: worst case
    out, text, _ = run(pieces)
    assert text == "a" + char + "b"
    for piece in out:
        piece.encode("utf-8")  # every released piece is valid UTF-8 on its own
        assert "\ufffd" not in piece


def test_an_unfinished_character_at_the_end_becomes_a_replacement():
    _, text, _ = run([b"ok", "🦀".encode()[:2]])
    assert text == "ok\ufffd"


def test_invalid_bytes_are_replaced_not_raised():
    _, text, _ = run([b"a\xff", b"b"])
    assert text == "a\ufffdb"


def test_stop_string_spanning_two_tokens_never_leaks():
    out, text, matched = run([b"The end", b" is ne", b"ar. More"], stop=["is near"])
    assert text == "The end "
    assert matched == "is near"
    assert all("is" not in o for o in out[1:])


def test_partial_stop_is_held_then_released_when_it_does_not_match():
    ts = TextStream(["STOP!"])
    assert ts.feed(b"go ST") == "go "
    assert ts.feed(b"O") == ""
    assert ts.feed(b"P now") == "STOP now"
    assert ts.finish() == "" and ts.matched is None


def test_partial_stop_at_the_end_is_released_by_finish():
    ts = TextStream(["</end>"])
    assert ts.feed(b"value </e") == "value "
    assert ts.finish() == "</e"


def test_multibyte_stop_string_split_inside_a_character():
    stop = "日本"
    data = "今日は日本です".encode()
    cut = data.index("日本".encode()) + 1  # split inside 日
    _, text, matched = run([data[:cut], data[cut:]], stop=[stop])
    assert text == "今日は" and matched == stop


def test_earliest_of_several_stop_strings_wins():
    _, text, matched = run([b"abc de", b"f ghi"], stop=["ghi", "de"])
    assert text == "abc " and matched == "de"


def test_nothing_after_a_match():
    ts = TextStream(["x"])
    assert ts.feed(b"ax") == "a"
    assert ts.feed(b"more") == ""
    assert ts.finish() == ""


def test_hold_back_is_bounded_by_the_longest_stop_string():
    ts = TextStream(["abcdef"])
    released = "".join(ts.feed(b"abcde" * 1) for _ in range(1000))
    # only a suffix that could still start "abcdef" is held: at most len("abcdef") - 1 characters
    assert len("abcde" * 1000) - len(released) <= 5
