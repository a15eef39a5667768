"""A hostile peer for the tests: a small real HTTP server on 127.0.0.1 that lies in one way.

It has its own identity and signs its own record, so it gets past the record checks; what it
then sends is the lie its ``mode`` names:

- ``health_types``: ``/health`` has the right sha256 but ``"slots_total": "four"``.
- ``health_huge``: ``/health`` claims 100 MB and sends bytes until the client hangs up.
- ``silent``: accepts connections and never answers.
- ``drip``: answers one header byte every 50 ms, for ever.
- ``bad_signature``: the challenge answer is not a valid signature.
- ``other_key``: the challenge is signed, but by another key than the record's.
- ``sse_garbage``, ``sse_cut``, ``sse_error``, ``sse_keepalive``, ``sse_endless_line``: vetting passes
  (health and challenge are honest), then the chat stream is JSON nested too deep; three tokens and
  a closed connection; three tokens and an error event; keep-alives for ever; one line for ever;
  text for ever, past any ``max_tokens``.

The three tokens of the SSE lies are the start of ``STORY``, so a client that resumes on an honest
worker must produce exactly ``STORY``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from typing import Any

from peerinfer.network.identity import PeerIdentity, b64, unb64
from peerinfer.network.records import PeerRecord, challenge_message, sign_record
from tests.network_support import STORY

MODES = (
    "health_types",
    "health_huge",
    "silent",
    "drip",
    "bad_signature",
    "other_key",
    "sse_garbage",
    "sse_cut",
    "sse_error",
    "sse_keepalive",
    "sse_endless_line",
    "sse_endless_text",
)
FIRST_WORDS = ["Once", " upon", " a"]
assert STORY.startswith("".join(FIRST_WORDS))


def _chunk(text: str) -> bytes:
    payload = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]}
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


class HostilePeer:
    """Serves ``mode``'s lie on ``url`` until ``close()``; ``requests`` lists what it was asked."""

    def __init__(self, mode: str, sha256: str, identity: PeerIdentity | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        self.mode = mode
        self.sha256 = sha256
        self.identity = identity or PeerIdentity.generate()
        self.requests: list[str] = []
        self.sent = 0  # body bytes pushed by health_huge
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def _start(self) -> asyncio.Server:
        return await asyncio.start_server(self._accept, "127.0.0.1", 0)

    def record(self, identity: PeerIdentity | None = None, **changes: Any) -> bytes:
        """A validly signed record for this endpoint (by ``identity``, default this peer's own)."""
        signer = identity or self.identity
        now = time.time()
        fields: dict[str, Any] = {
            "peer_id": signer.peer_id,
            "public_key": b64(signer.public_key),
            "endpoints": (self.url,),
            "model": "fake-model",
            "sha256": self.sha256,
            "n_ctx": 2048,
            "slots_total": 4,
            "slots_free": 4,
            "queue": 0,
            "tokens_per_s": 50.0,
            "issued_at": round(now, 3),
            "expires_at": round(now + 60, 3),
            "instance": "0123456789abcdef",
        }
        fields.update(changes)
        return sign_record(PeerRecord(**fields), signer)

    def close(self) -> None:
        async def stop() -> None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2)

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> HostilePeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- serving ----------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.CancelledError):
            pass  # a cancelled handler (close()) ends quietly: asyncio logs an error for a cancelled one
        finally:
            self._tasks.discard(task)  # type: ignore[arg-type]
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, path, _ = request_line.split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines if line)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        self.requests.append(f"{method} {path}")
        if self.mode == "silent":
            await asyncio.sleep(3600)
        elif self.mode == "drip":
            for byte in b"HTTP/1.1 200 OK\r\n" + b"X-Drip: 1\r\n" * 100_000:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.05)
        elif path == "/health":
            await self._health(writer)
        elif path == "/peer/challenge":
            await self._challenge(writer, body)
        elif path == "/v1/chat/completions":
            await self._stream(writer)
        else:
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    def _json(self, writer: asyncio.StreamWriter, payload: Any) -> None:
        body = json.dumps(payload).encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )

    async def _health(self, writer: asyncio.StreamWriter) -> None:
        health: dict[str, Any] = {"status": "ok", "model": "fake-model", "sha256": self.sha256, "n_ctx": 2048}
        health.update(slots_total=4, slots_busy=0, slots_free=4, requests_running=0, requests_waiting=0)
        if self.mode == "health_types":
            health["slots_total"] = "four"
        if self.mode != "health_huge":
            self._json(writer, health)
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\n\r\n")
        writer.write(json.dumps(health).encode()[:-1] + b', "padding": "')
        block = b"x" * 65536
        while self.sent < 100_000_000:
            writer.write(block)
            await writer.drain()
            self.sent += len(block)

    async def _challenge(self, writer: asyncio.StreamWriter, body: bytes) -> None:
        nonce = unb64(json.loads(body)["nonce"])
        signer = PeerIdentity.generate() if self.mode == "other_key" else self.identity
        signature = signer.sign(challenge_message(nonce))
        if self.mode == "bad_signature":
            signature = bytes(64)
        answer = {"peer_id": self.identity.peer_id, "public_key": b64(signer.public_key), "signature": b64(signature)}
        self._json(writer, answer)

    async def _stream(self, writer: asyncio.StreamWriter) -> None:
        # No Content-Length and no chunked framing: the body ends when the connection closes.
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
        writer.write(_chunk(""))
        if self.mode == "sse_garbage":
            writer.write(b"data: " + b"[" * 5000 + b"\n\n")
        elif self.mode in ("sse_cut", "sse_error"):
            for word in FIRST_WORDS:
                writer.write(_chunk(word))
                await writer.drain()
            if self.mode == "sse_error":
                writer.write(b'data: {"error": {"message": "the hostile peer gives up"}}\n\n')
                writer.write(b"data: [DONE]\n\n")
        elif self.mode == "sse_keepalive":
            while True:
                writer.write(b": keep-alive\n\n")
                await writer.drain()
                await asyncio.sleep(0.02)
        elif self.mode == "sse_endless_text":
            for word in FIRST_WORDS:
                writer.write(_chunk(word))
            while True:
                writer.write(_chunk(" more"))
                await writer.drain()
                await asyncio.sleep(0)
        elif self.mode == "sse_endless_line":
            writer.write(b"data: ")
            while True:
                writer.write(b"x" * 65536)
                await writer.drain()
                await asyncio.sleep(0)
        await writer.drain()
