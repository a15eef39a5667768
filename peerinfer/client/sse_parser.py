"""Incremental Server-Sent Events parser (client side). Pure.

Bytes arrive in arbitrary pieces: an event may span several reads, and so may the bytes of one
UTF-8 character. Lines are split on bytes and decoded only once complete.

The bytes come from a peer, so they are bounded: a line longer than ``max_line_bytes`` or an
event whose data is longer than ``max_event_bytes`` raises ``SSEError`` instead of growing the
buffer for ever. Each byte is scanned once, however the pieces are cut.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_LINE_BYTES = 1 << 20
MAX_EVENT_BYTES = 1 << 20


class SSEError(ValueError):
    """The stream is not Server-Sent Events within the limits."""


@dataclass(frozen=True)
class SSEEvent:
    data: str
    event: str = "message"


class SSEParser:
    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._buffer = bytearray()
        self._scanned = 0  # bytes of the buffer known to hold no line end
        self._data: list[str] = []
        self._data_bytes = 0
        self._event = "message"
        self._max_line = max_line_bytes
        self._max_event = max_event_bytes

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        self._buffer += chunk
        events: list[SSEEvent] = []
        while True:
            line = self._next_line()
            if line is None:
                if len(self._buffer) > self._max_line:
                    raise SSEError(f"an SSE line is longer than {self._max_line} bytes")
                return events
            event = self._line(line)
            if event is not None:
                events.append(event)

    def _next_line(self) -> bytes | None:
        buffer = self._buffer
        ends = [at for at in (buffer.find(b"\n", self._scanned), buffer.find(b"\r", self._scanned)) if at >= 0]
        if not ends:
            self._scanned = len(buffer)
            return None
        end = min(ends)
        skip = 1
        if buffer[end] == 0x0D:  # \r, maybe \r\n: wait for the next byte to know
            if end + 1 >= len(buffer):
                self._scanned = end
                return None
            skip = 2 if buffer[end + 1] == 0x0A else 1
        line = bytes(buffer[:end])
        del buffer[: end + skip]
        self._scanned = 0
        return line

    def _line(self, raw: bytes) -> SSEEvent | None:
        line = raw.decode("utf-8", "replace")
        if not line:
            if not self._data:
                self._event = "message"
                return None
            event = SSEEvent("\n".join(self._data), self._event)
            self._data, self._data_bytes, self._event = [], 0, "message"
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data_bytes += len(raw)
            if self._data_bytes > self._max_event:
                raise SSEError(f"an SSE event is longer than {self._max_event} bytes")
            self._data.append(value)
        elif name == "event":
            self._event = value[:64]
        return None
