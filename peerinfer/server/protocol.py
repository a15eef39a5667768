"""Limits on HTTP connections that ASGI cannot set: the request head's size and time, the body's time.

ASGI middleware only sees a request once its head is complete, so a client that sends a 64 MB header
(httptools joins its pieces in quadratic time, on the event loop) or never finishes its head must be
stopped below ASGI, in uvicorn's protocol objects. The guarded protocols here subclass uvicorn's and
add, per connection:

- the head (request line and headers) may hold ``max_header_bytes``: more gets 431 and a close (a head
  pipelined behind a body in the same read, at most 256 KiB, is counted from the next read on);
- the head must arrive within ``head_timeout_s`` of its first byte (or of connecting): 408 and a close,
  or just a close when nothing came;
- the body must arrive within ``body_timeout_s`` after the head: 408 (if no answer started) and a close;
- at most ``max_connections`` connections: one more gets 503 and a close.

Each refusal is one log line (the same kind at most every few seconds, with a count) and one count in
``peerinfer_http_refused_total``.

How it is installed: uvicorn resolves ``--http`` (default ``auto``) through ``uvicorn.config.HTTP_PROTOCOLS``
when its server starts, and the proof of concept's command ``python3 -m uvicorn worker:app`` imports the
app before that. ``install()`` (called by ``create_app``) points the ``auto``, ``httptools`` and ``h11``
entries here. A connection finds its limits on the app it serves (``app.state.http_limits``); for an app
without them the protocols behave exactly as uvicorn's. With ``--workers N`` or ``--reload`` uvicorn loads
the protocol before the app; pass ``--http peerinfer.server.protocol:GuardedAutoProtocol`` there.
"""

from __future__ import annotations

import asyncio
import http
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import h11
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from peerinfer.api.openai import dumps, error_body

log = logging.getLogger("peerinfer.worker")
REFUSAL_LOG_INTERVAL_S = 10.0
LINGER_S = 2.0  # after a refusal, read and drop what the client still sends, so that it can read the answer
LINGER_MAX_BYTES = 1_048_576  # but not more than this: then close at once
MAX_APP_WRAPPERS = 8


@dataclass(frozen=True)
class HttpLimits:
    max_header_bytes: int
    head_timeout_s: float
    body_timeout_s: float
    max_connections: int
    on_refusal: Callable[[str], None] = lambda reason: None


class _Cycle(Protocol):
    """What both of uvicorn's request-response cycles have."""

    response_started: bool
    response_complete: bool
    disconnected: bool
    message_event: asyncio.Event


class _RefusalLog:
    """One warning per kind of refusal every ``interval`` seconds; the ones in between are counted."""

    def __init__(self, interval: float, level: int = logging.WARNING) -> None:
        self.interval = interval
        self.level = level
        self.last: dict[str, float] = {}
        self.suppressed: dict[str, int] = {}

    def __call__(self, reason: str, line: str) -> None:
        now = time.monotonic()
        if now - self.last.get(reason, float("-inf")) < self.interval:
            self.suppressed[reason] = self.suppressed.get(reason, 0) + 1
            return
        self.last[reason] = now
        more = self.suppressed.pop(reason, 0)
        log.log(self.level, "%s%s", line, f" (and {more} more since the last such line)" if more else "")


refusal_log = _RefusalLog(REFUSAL_LOG_INTERVAL_S)
# Clients that leave during their upload: not a refusal, but as cheap for a client to repeat.
departure_log = _RefusalLog(REFUSAL_LOG_INTERVAL_S, logging.INFO)


def limits_of(app: object) -> HttpLimits | None:
    """The limits of the peerinfer app inside uvicorn's wrappers (proxy headers, message logger)."""
    for _ in range(MAX_APP_WRAPPERS):
        limits = getattr(getattr(app, "state", None), "http_limits", None)
        if isinstance(limits, HttpLimits):
            return limits
        app = getattr(app, "app", None)
        if app is None:
            break
    return None


def refusal_bytes(status: int, message: str, code: str) -> bytes:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = dumps(error_body(message, kind, None, code)).encode()
    retry = b"retry-after: 1\r\n" if status == 503 else b""
    return b"".join(
        [
            f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n".encode(),
            b"content-type: application/json\r\n",
            f"content-length: {len(body)}\r\n".encode(),
            retry,
            b"connection: close\r\n\r\n",
            body,
        ]
    )


INVALID_REQUEST = "Invalid HTTP request received."  # uvicorn's warning before its own plain-text 400


def _drop_invalid_request(record: logging.LogRecord) -> bool:
    return record.msg != INVALID_REQUEST


# uvicorn's logger without its warning for a request that is not HTTP: the guard's refusal line,
# rate-limited, says it instead (one warning per bad request let any client flood the log).
_uvicorn_log = logging.getLogger("uvicorn.error.guarded")
_uvicorn_log.addFilter(_drop_invalid_request)


class ConnectionGuard:
    """The head/body state and the one timer of a connection. Its protocol reports what the parser saw."""

    def __init__(
        self,
        limits: HttpLimits,
        loop: asyncio.AbstractEventLoop,
        transport: asyncio.Transport,
        client: tuple[str, int] | None,
        cycle: Callable[[], _Cycle | None],
    ) -> None:
        self.limits = limits
        self.loop = loop
        self.transport = transport
        self.client = f"{client[0]}:{client[1]}" if client else "a client"
        self.cycle = cycle
        self.in_head = True
        self.head_bytes = 0
        self.closing = False
        self.dropped = 0
        self.timer: asyncio.TimerHandle | None = None
        self.arm(limits.head_timeout_s, self.head_overdue)

    def arm(self, delay: float, callback: Callable[[], None]) -> None:
        self.disarm()
        self.timer = self.loop.call_later(delay, callback)

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def drop(self, count: int) -> None:
        """Bytes that arrived after a refusal: dropped, up to ``LINGER_MAX_BYTES``."""
        self.dropped += count
        if self.dropped > LINGER_MAX_BYTES:
            self.transport.close()

    def head_room(self) -> int:
        return self.limits.max_header_bytes - self.head_bytes

    def received(self, count: int) -> None:
        """Bytes of a head arrived; its clock starts with the first of them."""
        if self.in_head:
            if self.timer is None:
                self.arm(self.limits.head_timeout_s, self.head_overdue)
            self.head_bytes += count

    def head_done(self) -> None:
        self.in_head = False
        self.arm(self.limits.body_timeout_s, self.body_overdue)

    def message_done(self) -> None:
        self.in_head = True
        self.head_bytes = 0
        self.disarm()

    def head_overdue(self) -> None:
        self.timer = None
        if self.closing or self.transport.is_closing():
            return
        cycle = self.cycle()
        if cycle is not None and not cycle.response_complete:
            # A pipelined head while the answer to the previous request is still being sent: it may wait.
            self.arm(self.limits.head_timeout_s, self.head_overdue)
            return
        if self.head_bytes == 0:
            self.refuse(None, "head_timeout", f"closed a connection from {self.client} that sent no request")
            return
        seconds = f"{self.limits.head_timeout_s:g}"
        self.refuse(
            408,
            "head_timeout",
            f"closed a connection from {self.client}: its request head was not complete after {seconds} s",
            f"the request head was not complete after {seconds} s (PEERINFER_HEAD_TIMEOUT_S)",
        )

    def body_overdue(self) -> None:
        self.timer = None
        if self.closing or self.transport.is_closing():
            return
        seconds = f"{self.limits.body_timeout_s:g}"
        self.refuse(
            408,
            "body_timeout",
            f"closed a connection from {self.client}: its request body was not complete after {seconds} s",
            f"the request body was not complete after {seconds} s (PEERINFER_BODY_TIMEOUT_S); check its Content-Length",
        )

    def head_too_large(self) -> None:
        limit = self.limits.max_header_bytes
        self.refuse(
            431,
            "header_too_large",
            f"closed a connection from {self.client}: its request head is larger than {limit} bytes",
            f"the request head (request line and headers) is larger than the {limit} bytes this worker accepts "
            "(PEERINFER_MAX_HEADER_BYTES)",
        )

    def bad_request(self) -> None:
        self.refuse(
            400,
            "bad_request",
            f"closed a connection from {self.client}: its request is not valid HTTP/1.1",
            "the request is not valid HTTP/1.1; check its request line, header syntax, Content-Length and "
            "Transfer-Encoding",
        )

    def too_many_connections(self, open_now: int) -> None:
        self.refuse(
            503,
            "too_many_connections",
            f"refused a connection from {self.client}: {open_now} are open, the limit is "
            f"{self.limits.max_connections} (PEERINFER_MAX_CONNECTIONS)",
            "this worker has too many open connections; retry shortly",
        )

    def refuse(self, status: int | None, reason: str, line: str, message: str = "") -> None:
        """Answer ``status`` unless an answer has started, then close; the request's app sees a disconnect.

        The close is a lingering one: the answer goes out with a FIN, and what the client still sends is
        read and dropped for ``LINGER_S`` (closing with unread data would send a reset, and the client
        would lose the answer).
        """
        self.disarm()
        self.closing = True
        cycle = self.cycle()
        answering = cycle is not None and not cycle.response_complete
        started = answering and cycle is not None and cycle.response_started
        if cycle is not None and answering:
            cycle.disconnected = True
            cycle.message_event.set()
        if status is not None and not started:
            self.transport.write(refusal_bytes(status, message, reason))
        if started or not self.transport.can_write_eof():
            self.transport.close()
        else:
            self.transport.write_eof()
            self.timer = self.loop.call_later(LINGER_S, self.transport.close)
        refusal_log(reason, line)
        self.limits.on_refusal(reason)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with peerinfer's connection limits (h11 bounds the head size itself)."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits_of(self.app)
        self.guard: ConnectionGuard | None = None
        if self.limits is not None:
            self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes)
            self.logger = _uvicorn_log

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.limits is not None:
            self.guard = ConnectionGuard(self.limits, self.loop, transport, self.client, lambda: self.cycle)
            if len(self.connections) > self.limits.max_connections:
                self.guard.too_many_connections(len(self.connections) - 1)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.guard is not None:
            self.guard.disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        guard = self.guard
        if guard is None:
            super().data_received(data)
            return
        if guard.closing:
            guard.drop(len(data))
            return
        guard.received(len(data))
        before = self.cycle
        super().data_received(data)
        if self.transport.is_closing() or guard.closing:
            return
        if guard.in_head and self.cycle is not before:
            guard.head_done()
        if not guard.in_head and (self.conn.their_state in (h11.DONE, h11.IDLE) or not self.cycle.more_body):
            guard.message_done()

    def send_400_response(self, msg: str) -> None:
        if self.guard is None:
            super().send_400_response(msg)
        elif not self.guard.closing:
            self.guard.bad_request()


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - httptools is pinned in requirements.txt
    GuardedAutoProtocol: type[asyncio.Protocol] = GuardedH11Protocol
else:

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol (the default) with peerinfer's connection limits."""

        def __init__(
            self,
            config: Config,
            server_state: ServerState,
            app_state: dict[str, Any],
            _loop: asyncio.AbstractEventLoop | None = None,
        ) -> None:
            super().__init__(config, server_state, app_state, _loop)
            self.limits = limits_of(self.app)
            self.guard: ConnectionGuard | None = None
            if self.limits is not None:
                self.logger = _uvicorn_log

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if self.limits is not None:
                self.guard = ConnectionGuard(self.limits, self.loop, transport, self.client, lambda: self.cycle)
                if len(self.connections) > self.limits.max_connections:
                    self.guard.too_many_connections(len(self.connections) - 1)

        def connection_lost(self, exc: Exception | None) -> None:
            if self.guard is not None:
                self.guard.disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            guard = self.guard
            if guard is not None and guard.closing:
                guard.drop(len(data))
                return
            if guard is None or not guard.in_head:
                super().data_received(data)
                return
            room = guard.head_room()
            if len(data) <= room:
                guard.received(len(data))
                super().data_received(data)
                return
            # Feed only what still fits: if the head ends in it, the rest is body or the next request.
            guard.received(room)
            if room > 0:
                super().data_received(data[:room])
            if self.transport.is_closing() or guard.closing:
                return
            if guard.in_head:
                guard.head_too_large()
                return
            self.data_received(data[room:])

        def send_400_response(self, msg: str) -> None:
            if self.guard is None:
                super().send_400_response(msg)
            elif not self.guard.closing:
                self.guard.bad_request()

        def handle_websocket_upgrade(self) -> None:
            if self.guard is not None:
                self.guard.disarm()
                self.guard = None
            super().handle_websocket_upgrade()

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            if self.guard is not None:
                self.guard.head_done()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            if self.guard is not None:
                self.guard.message_done()

    GuardedAutoProtocol = GuardedHttpToolsProtocol


def install() -> None:
    """Make uvicorn's ``--http auto`` (the default), ``httptools`` and ``h11`` build the guarded protocols."""
    from uvicorn.config import HTTP_PROTOCOLS

    HTTP_PROTOCOLS["auto"] = f"{__name__}:GuardedAutoProtocol"
    HTTP_PROTOCOLS["h11"] = f"{__name__}:GuardedH11Protocol"
    if GuardedAutoProtocol is not GuardedH11Protocol:
        HTTP_PROTOCOLS["httptools"] = f"{__name__}:GuardedHttpToolsProtocol"
