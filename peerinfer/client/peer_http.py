"""One small HTTP/1.1 exchange with a peer, under a hard deadline and a size limit.

Probes and challenges go to endpoints that any record may name, so they cannot trust the peer to
answer, to answer quickly or to answer briefly. ``requests`` bounds each socket operation, not the
whole exchange: a peer that drips one header byte a second keeps it waiting for ever, and it reads
a body in full. Here every ``recv`` waits at most until the deadline, and at most ``max_bytes`` are
read. The reply parser is pure. Any failure is a ``PeerRejected`` with a short, countable reason.
"""

from __future__ import annotations

import re
import socket
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_HEAD_BYTES = 8 * 1024
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-5][0-9][0-9])(?: [^\r\n]*)?")
_CHUNK_SIZE = re.compile(rb"([0-9a-fA-F]{1,8})(?:;[^\r\n]*)?")


class PeerRejected(ValueError):
    """A peer's answer that the client must not use; ``reason`` is a short, countable word."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class HttpReply:
    status: int
    headers: dict[str, str]
    body: bytes


def _dechunk(body: bytes) -> bytes | None:
    """The decoded chunked ``body``; None while it is incomplete."""
    out = bytearray()
    at = 0
    while True:
        line_end = body.find(b"\r\n", at)
        if line_end < 0:
            if len(body) - at > 64:
                raise PeerRejected("malformed", "a chunk size line is too long")
            return None
        size_match = _CHUNK_SIZE.fullmatch(body[at:line_end])
        if size_match is None:
            raise PeerRejected("malformed", "bad chunk size")
        size = int(size_match.group(1), 16)
        start = line_end + 2
        if size == 0:
            return bytes(out)  # trailers, if any, are ignored
        if len(body) < start + size + 2:
            return None
        if body[start + size : start + size + 2] != b"\r\n":
            raise PeerRejected("malformed", "a chunk does not end with CRLF")
        out += body[start : start + size]
        at = start + size + 2


def parse_reply(data: bytes, complete: bool) -> HttpReply | None:
    """The reply in ``data``, None if more bytes are needed; ``complete``: the peer closed. Pure.

    Raises ``PeerRejected`` ("malformed") for anything that is not an HTTP/1.x reply, never anything else.
    """
    head_end = data.find(b"\r\n\r\n")
    if head_end < 0 or head_end > MAX_HEAD_BYTES:
        if len(data) > MAX_HEAD_BYTES or head_end > MAX_HEAD_BYTES:
            raise PeerRejected("malformed", f"no end of the headers in the first {MAX_HEAD_BYTES} bytes")
        if complete:
            raise PeerRejected("malformed", "the peer closed the connection before the end of the headers")
        return None
    lines = data[:head_end].split(b"\r\n")
    status = _STATUS_LINE.fullmatch(lines[0])
    if status is None:
        raise PeerRejected("malformed", f"not an HTTP/1.x status line: {lines[0][:40]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name.strip():
            raise PeerRejected("malformed", f"bad header line {line[:40]!r}")
        headers[name.strip().decode("latin-1").lower()] = value.strip().decode("latin-1")
    body = data[head_end + 4 :]
    if "chunked" in headers.get("transfer-encoding", "").lower():
        decoded = _dechunk(body)
        if decoded is None:
            if complete:
                raise PeerRejected("malformed", "the chunked body ends early")
            return None
        body = decoded
    elif "content-length" in headers:
        length = headers["content-length"]
        if not length.isascii() or not length.isdigit() or len(length) > 9:
            raise PeerRejected("malformed", f"bad Content-Length {length[:20]!r}")
        if len(body) < int(length):
            if complete:
                raise PeerRejected("malformed", "the body is shorter than its Content-Length")
            return None
        body = body[: int(length)]
    elif not complete:
        return None
    return HttpReply(int(status.group(1)), headers, body)


def exchange(
    url: str, method: str, path: str, *, deadline: float, max_bytes: int, body: bytes | None = None
) -> HttpReply:
    """Send one request to the peer at ``url`` and read its reply by ``deadline`` (``time.monotonic``).

    Raises ``PeerRejected``: "unreachable", "timeout", "too_large" or "malformed".
    """
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise PeerRejected("malformed", f"bad endpoint URL {url[:60]!r}") from exc
    if host is None or parts.scheme not in ("http", "https"):
        raise PeerRejected("malformed", f"bad endpoint URL {url[:60]!r}")
    payload = body or b""
    request = (
        f"{method} {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\nAccept: application/json\r\n"
        + (f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n" if body is not None else "")
        + "\r\n"
    ).encode("latin-1") + payload
    received = bytearray()
    try:
        with socket.create_connection((host, port), timeout=_left(deadline)) as raw:
            sock: socket.socket = raw
            if parts.scheme == "https":
                sock = ssl.create_default_context().wrap_socket(raw, server_hostname=host)
            sock.settimeout(_left(deadline))
            sock.sendall(request)
            while True:
                reply = parse_reply(bytes(received), complete=False)
                if reply is not None:
                    return reply
                sock.settimeout(_left(deadline))
                chunk = sock.recv(min(65536, max_bytes + 1 - len(received)))
                if not chunk:
                    final = parse_reply(bytes(received), complete=True)
                    assert final is not None  # complete=True never asks for more
                    return final
                received += chunk
                if len(received) > max_bytes:
                    raise PeerRejected("too_large", f"the reply to {method} {path} is over {max_bytes} bytes")
    except TimeoutError as exc:
        raise PeerRejected("timeout", f"no complete reply to {method} {path} in time") from exc
    except OSError as exc:  # refused, reset, unreachable, TLS errors, DNS
        raise PeerRejected("unreachable", f"{type(exc).__name__} on {method} {path}") from exc


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left
