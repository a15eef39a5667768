"""Text assembly: whole characters only, stop strings never leak."""

from __future__ import annotations

import pytest

from peerinfer.engine.text import TextAssembler, held_back_suffix_length


def feed_bytewise(text: str, stops: tuple[str, ...] = ()) -> tuple[list[str], bool, str]:
    assembler = TextAssembler(stops)
    deltas: list[str] = []
    stopped = False
    for byte in text.encode():
        delta, stopped = assembler.feed(bytes([byte]))
        if delta:
            deltas.append(delta)
        if stopped:
            break
    return deltas, stopped, assembler.finish()


@pytest.mark.parametrize("text", ["नमस्ते दुनिया", "வணக்கம் உலகம்", "হ্যালো বিশ্ব", "hi 👋🏽 🇮🇳 done"])
def test_multibyte_characters_split_across_tokens_arrive_whole(text: str) -> None:
    deltas, stopped, tail = feed_bytewise(text)
    assert not stopped
    assert "".join(deltas) + tail == text
    assert all("\ufffd" not in delta for delta in deltas)


def test_stop_string_spanning_tokens_is_cut_and_never_emitted() -> None:
    assembler = TextAssembler(["\nQuestion:"])
    out = []
    for piece in ["Paris", " is", "\nQue", "stion", ":", " more"]:
        delta, stopped = assembler.feed(piece.encode())
        out.append(delta)
        if stopped:
            break
    assert "".join(out) == "Paris is"
    assert stopped


def test_text_that_only_looked_like_a_stop_is_released() -> None:
    assembler = TextAssembler(["STOP"])
    first, _ = assembler.feed(b"ST")
    second, stopped = assembler.feed(b"ART")
    assert first == ""
    assert second == "START" and not stopped


def test_finish_flushes_held_back_text() -> None:
    assembler = TextAssembler(["###"])
    delta, _ = assembler.feed(b"end ##")
    assert delta == "end "
    assert assembler.finish() == "##"


def test_truncated_character_at_the_end_becomes_replacement() -> None:
    assembler = TextAssembler()
    delta, _ = assembler.feed("न".encode()[:2])
    assert delta == ""
    assert assembler.finish() == "\ufffd"


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [("abc", ["cd"], 1), ("abc", ["xbc!"], 0), ("abc", ["bc!", "c!"], 2), ("", ["x"], 0), ("abc", ["abcd"], 3)],
)
def test_held_back_suffix_length(text: str, stops: list[str], expected: int) -> None:
    assert held_back_suffix_length(text, stops) == expected
