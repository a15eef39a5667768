"""The bootstrap's side of the dial-back: ``POST /peer/dialback``, bounded, served beside the DHT node.

``python3 -m peerinfer bootstrap`` starts a ``DialbackServer`` on the TCP port with the number of
its UDP node: uvicorn in a thread of its own, so the DHT node runs whatever happens to HTTP. The
request, the answer and the checks are ``network.dialback``'s; this module adds the limits: a body
of at most ``MAX_ASK_BYTES``, head and body within 5 s, at most ``MAX_DIALS`` dials at once, one per
source every ``MIN_INTERVAL_S`` (``SourceTable``), and uvicorn's proxy headers off, so the address
dialed is the connection's.
"""

from __future__ import annotations

import json
import logging
import secrets
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from peerinfer.api.openai import error_body
from peerinfer.client.peer_http import PeerRejected
from peerinfer.client.transport import WorkerHttp
from peerinfer.errors import BodyTooLargeError, OverloadedError, RequestError
from peerinfer.network.dialback import (
    DIAL_TIMEOUT_S,
    DIALBACK_PATH,
    MAX_ASK_BYTES,
    MAX_DIALS,
    MAX_REPLY_BYTES,
    MAX_SOURCES,
    MIN_INTERVAL_S,
    NONCE_BYTES,
    DialbackAsk,
    DialbackReport,
    challenge_failure,
    host_port,
    one_line,
    origin,
    plain_address,
    read_ask,
    source_key,
)
from peerinfer.network.identity import b64
from peerinfer.server.errors import add_error_handlers
from peerinfer.server.guards import check_json_content_type
from peerinfer.server.protocol import HttpLimits
from peerinfer.server.protocol import install as install_protocol

log = logging.getLogger(__name__)


Admission = Literal["admitted", "too_soon", "full"]


class SourceTable:
    """When each source last had a dial-back, for at most ``max_sources`` sources at a time.

    Entries are kept in the order of their last dial-back, so those older than ``interval_s`` are
    dropped from the front. When ``max_sources`` sources are all recent, a new one is refused rather
    than an old one forgotten: forgetting would let a crowd of addresses reset the limit for one.
    """

    def __init__(self, interval_s: float = MIN_INTERVAL_S, max_sources: int = MAX_SOURCES) -> None:
        self.interval_s = interval_s
        self.max_sources = max_sources
        self._last: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._last)

    def admit(self, source: str, now: float) -> Admission:
        last = self._last.get(source)
        if last is not None and now - last < self.interval_s:
            return "too_soon"
        while self._last and now - next(iter(self._last.values())) >= self.interval_s:
            self._last.popitem(last=False)
        if source not in self._last and len(self._last) >= self.max_sources:
            return "full"
        self._last.pop(source, None)
        self._last[source] = now
        return "admitted"


class DialbackService:
    """Dials workers back for a bootstrap node; one per process, used on one event loop."""

    def __init__(
        self,
        *,
        max_dials: int = MAX_DIALS,
        min_interval_s: float = MIN_INTERVAL_S,
        max_sources: int = MAX_SOURCES,
        dial_timeout_s: float = DIAL_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_dials = max_dials
        self.dial_timeout_s = dial_timeout_s
        self.sources = SourceTable(min_interval_s, max_sources)
        self.clock = clock
        self.dialing = 0
        self.http: WorkerHttp | None = None

    async def dial(self, source_ip: str, ask: DialbackAsk) -> DialbackReport:
        """Dial ``source_ip`` at ``ask.port`` and check its answer. Never raises."""
        observed = plain_address(source_ip)
        url = origin(observed, ask.port)
        where = host_port(observed, ask.port)
        if self.http is None:
            self.http = WorkerHttp(connect_timeout_s=self.dial_timeout_s, max_connections=4 * self.max_dials)
        nonce = secrets.token_bytes(NONCE_BYTES)
        body = json.dumps({"nonce": b64(nonce)}).encode()
        deadline = time.monotonic() + self.dial_timeout_s
        try:
            reply = await self.http.exchange(
                url, "POST", "/peer/challenge", deadline=deadline, max_bytes=MAX_REPLY_BYTES, body=body
            )
        except PeerRejected as exc:
            reason = {
                "unreachable": f"could not connect to {where}",
                "timeout": f"no complete answer from {where} within {self.dial_timeout_s:g} s",
                "too_large": f"{where} answered more than {MAX_REPLY_BYTES} bytes",
            }.get(exc.reason, f"{where} did not answer HTTP ({exc.reason})")
            return DialbackReport(False, url, observed, reason)
        except Exception as exc:  # a check we missed is still an answer, never a crash of the service
            log.error("dial-back to %s failed unexpectedly: %s", where, one_line(repr(exc), 200))
            return DialbackReport(False, url, observed, f"dialing {where} failed ({type(exc).__name__})")
        failure = challenge_failure(reply, ask, nonce)
        if failure is not None:
            return DialbackReport(False, url, observed, f"{where} answered, but {failure}")
        return DialbackReport(True, url, observed, f"{where} answered the challenge with the given key")

    async def answer(self, source_ip: str | None, ask: DialbackAsk) -> JSONResponse:
        if not source_ip:
            raise RequestError("the request has no TCP source address to dial back")
        if self.dialing >= self.max_dials:
            raise OverloadedError(
                "this bootstrap is dialing back as many workers as it can; retry shortly", retry_after=2
            )
        admission = self.sources.admit(source_key(plain_address(source_ip)), self.clock())
        if admission == "too_soon":
            wait = max(1, round(self.sources.interval_s))
            return JSONResponse(
                error_body(
                    f"{source_ip} had a dial-back less than {self.sources.interval_s:g} s ago; ask again later",
                    "rate_limit_error",
                    code="rate_limit_exceeded",
                ),
                status_code=429,
                headers={"Retry-After": str(wait)},
            )
        if admission == "full":
            raise OverloadedError(
                "this bootstrap is dialing back as many workers as it can; retry shortly", retry_after=2
            )
        self.dialing += 1
        try:
            report = await self.dial(source_ip, ask)
        finally:
            self.dialing -= 1
        log.info("dial-back for peer %s: %s", ask.peer_id, report.reason)
        return JSONResponse(report.wire())

    async def aclose(self) -> None:
        if self.http is not None:
            await self.http.aclose()
            self.http = None


async def _read_body(request: Request) -> bytes:
    check_json_content_type(request.headers.get("content-type"))
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_ASK_BYTES:
        raise BodyTooLargeError(f"the body has {declared} bytes; a dial-back request has at most {MAX_ASK_BYTES}")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_ASK_BYTES:
                raise BodyTooLargeError(f"the body is over {MAX_ASK_BYTES} bytes, the most a dial-back request has")
    except ClientDisconnect as exc:
        raise RequestError("the client left before its body was complete") from exc
    return bytes(body)


BOOTSTRAP_HTTP_LIMITS = HttpLimits(max_header_bytes=8192, head_timeout_s=5.0, body_timeout_s=5.0, max_connections=256)


def create_dialback_app(service: DialbackService | None = None) -> FastAPI:
    """The bootstrap's HTTP app: ``POST /peer/dialback`` and nothing else. Cheap: opens nothing."""
    service = service or DialbackService()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await service.aclose()

    app = FastAPI(title="peerinfer bootstrap", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.http_limits = BOOTSTRAP_HTTP_LIMITS
    app.state.dialback = service
    install_protocol()
    add_error_handlers(app)

    @app.post(DIALBACK_PATH)
    async def dialback(request: Request) -> JSONResponse:
        ask = read_ask(await _read_body(request))
        return await service.answer(request.client.host if request.client else None, ask)

    return app


class DialbackServer:
    """``create_dialback_app`` served by uvicorn in a thread of its own, so the DHT node never depends on it."""

    def __init__(self, sock: socket.socket, app: FastAPI | None = None) -> None:
        self.sock = sock
        config = uvicorn.Config(
            app or create_dialback_app(),
            log_level="warning",
            access_log=False,
            proxy_headers=False,  # the source address is the one dialed: no header may name another
            server_header=False,
            timeout_keep_alive=5,
            timeout_graceful_shutdown=2,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name="dialback-http", daemon=True)
        self.thread.start()

    @classmethod
    def listen(cls, host: str, port: int) -> DialbackServer:
        """Serve on TCP ``host:port``; raises ``OSError`` when that cannot be bound."""
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        return cls(sock)

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except BaseException as exc:  # the bootstrap goes on as a DHT node alone
            log.error("the dial-back service stopped: %s; the DHT node keeps running", one_line(repr(exc), 200))

    def stop(self, timeout_s: float = 5.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)
        self.sock.close()
