"""Turning token bytes into text a client can safely display. Pure, no I/O.

Two things make naive detokenisation wrong:

- a UTF-8 character (Devanagari, Tamil, emoji) may be split over several tokens; emitting each
  token's bytes on its own yields U+FFFD or dropped bytes;
- a stop string may span several tokens, and the text before it must be sent while the part that
  could still become the stop string must not.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


def held_back_suffix_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


def find_stop(text: str, stops: Sequence[str]) -> int:
    """Index of the earliest stop string in ``text``, or -1."""
    positions = [index for index in (text.find(stop) for stop in stops) if index >= 0]
    return min(positions) if positions else -1


class TextAssembler:
    """Feeds token bytes in, gets display-safe text deltas out.

    ``feed`` returns ``(delta, stopped)``. Once ``stopped`` is true the generation must end; the
    stop string itself is never emitted. ``finish`` flushes whatever was held back.

    ``read`` counts the characters decoded so far and ``sent`` those handed out: a token whose first
    character sits at ``read`` (before it is fed) at or past ``sent`` (after the end) was never shown
    (it fell in a stop string), which is how log-probabilities follow the text.
    """

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self._stops = tuple(stop for stop in stops if stop)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self.stopped = False
        self.read = 0
        self.sent = 0

    def feed(self, piece: bytes) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        new = self._decoder.decode(piece)
        self.read += len(new)
        text = self._pending + new
        stop_at = find_stop(text, self._stops)
        if stop_at >= 0:
            self._pending = ""
            self.stopped = True
            return self._send(text[:stop_at]), True
        hold = held_back_suffix_length(text, self._stops)
        cut = len(text) - hold
        self._pending = text[cut:]
        return self._send(text[:cut]), False

    def finish(self, *, drop_partial_stop: bool = False) -> str:
        """Flush held-back text at the end of a generation (an incomplete character becomes U+FFFD).

        ``drop_partial_stop``: drop held-back text that is the start of a stop string instead. A
        generation cut short by its token limit in the middle of a stop string (a base model's
        transcript, ``"...light.\nQuestion"``) must not end with the start of the next turn's marker.
        """
        if self.stopped:
            return ""
        tail = self._decoder.decode(b"", final=True)
        self.read += len(tail)
        text = self._pending + tail
        self._pending = ""
        if drop_partial_stop:
            text = text[: len(text) - held_back_suffix_length(text, self._stops)]
        return self._send(text)

    def _send(self, text: str) -> str:
        self.sent += len(text)
        return text
