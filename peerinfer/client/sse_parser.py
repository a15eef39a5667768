"""Incremental Server-Sent Events parser (client side). Pure.

Bytes arrive in arbitrary pieces: an event may span several reads, and so may the bytes of one
UTF-8 character. Lines are split on bytes and decoded only once complete.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SSEEvent:
    data: str
    event: str = "message"


class SSEParser:
    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []
        self._event = "message"

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        self._buffer += chunk
        events: list[SSEEvent] = []
        while True:
            line, found = self._next_line()
            if not found:
                return events
            event = self._line(line)
            if event is not None:
                events.append(event)

    def _next_line(self) -> tuple[bytes, bool]:
        buffer = self._buffer
        for index, byte in enumerate(buffer):
            if byte == 0x0A:  # \n
                self._buffer = buffer[index + 1 :]
                return buffer[:index].rstrip(b"\r"), True
            if byte == 0x0D and index + 1 < len(buffer):  # \r, maybe \r\n
                skip = 2 if buffer[index + 1] == 0x0A else 1
                self._buffer = buffer[index + skip :]
                return buffer[:index], True
        return b"", False

    def _line(self, raw: bytes) -> SSEEvent | None:
        line = raw.decode("utf-8", "replace")
        if not line:
            if not self._data:
                self._event = "message"
                return None
            event = SSEEvent("\n".join(self._data), self._event)
            self._data, self._event = [], "message"
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        return None
