"""How the gateway serves one request from the network: a routed stream, relayed as one, or a whole answer.

Streams: the routed answer runs in a task of its own (``RelayedStream``) that turns its events into
SSE frames (``api.relay.StreamStitcher``) and hands them over through a small queue. The route waits
for the first peer to accept (so a failure before that is still a clean JSON error), then answers
200 and sends the frames as they come, with a keep-alive comment whenever none came for
``keepalive_s`` (while a new peer is chosen mid-stream). A client that leaves cancels the task, which
closes the peer's stream. An answer that cannot go on ends with an error event and ``[DONE]``.

Whole answers (``stream: false``) go to one peer at a time, non-streamed; a connection failure, a
401, 408, 429 or 5xx, or an answer that is not a JSON completion moves to the next peer, other 4xx
are the request's fault and reach the client as the worker said them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, Protocol, cast

from fastapi.responses import JSONResponse, StreamingResponse

from peerinfer.api import sse
from peerinfer.api.relay import Kind, StreamStitcher, SwitchFacts, checked_error, error_event, whole_answer
from peerinfer.client.answer import PeerChunk, PeerOpened, RoutedAnswer
from peerinfer.client.core import Router
from peerinfer.client.routing import failure_action
from peerinfer.client.stream_events import StreamChunk
from peerinfer.errors import ClientError, NoPeersError, PeerInferError
from peerinfer.gateway.metrics import GatewayMetrics

log = logging.getLogger("peerinfer.gateway")
QUEUE_FRAMES = 256  # frames buffered for a slow client before the stream waits for it
PEER_HEADER = "X-PeerInfer-Peer"
PEERS_HEADER = "X-PeerInfer-Peers"


class Relay(Protocol):
    """Writes a routed answer's events in the client's format, as SSE frames."""

    def opened(self, peer_id: str, url: str, switch: SwitchFacts | None) -> list[bytes]: ...

    def chunk(self, chunk: StreamChunk) -> list[bytes]: ...

    def finish(self, answer: RoutedAnswer) -> list[bytes]: ...

    def failed(self, message: str, code: str) -> list[bytes]: ...


class ChatRelay:
    """Chat completions and completions: the stitcher's chunks, framed."""

    def __init__(self, stitcher: StreamStitcher, max_completion_tokens: int | None = None) -> None:
        self.stitcher = stitcher
        self.max_completion_tokens = max_completion_tokens

    def opened(self, peer_id: str, url: str, switch: SwitchFacts | None) -> list[bytes]:
        return [sse.event(payload) for payload in self.stitcher.opened(peer_id, url, switch)]

    def chunk(self, chunk: StreamChunk) -> list[bytes]:
        return [sse.event(payload) for payload in self.stitcher.chunk(chunk.payload)]

    def finish(self, answer: RoutedAnswer) -> list[bytes]:
        completion = answer.completion_tokens
        if self.max_completion_tokens is not None:
            # The count is the peers' word: a peer may claim more than it could have written, never more than asked.
            completion = min(completion, self.max_completion_tokens)
        frames = self.stitcher.finish(answer.prompt_tokens, completion)
        return [sse.event(payload) for payload in frames] + [sse.DONE]

    def failed(self, message: str, code: str) -> list[bytes]:
        return [sse.event(error_event(message, code)), sse.DONE]


class _Stalled(Exception):
    """The client read nothing for ``stall_s``: it is gone (or hostile), and the answer stops."""


def count_switches(answer: RoutedAnswer, metrics: GatewayMetrics) -> None:
    for switch in answer.switches:
        (metrics.resumes if switch.resumed_chars > 0 else metrics.failovers).inc()


class RelayedStream:
    """One routed answer, relayed: ``opened`` resolves to the first peer's id (or raises), ``frames()`` follows.

    ``on_end`` runs once, when the answer's task ends however it ends (the caller frees its place there).
    """

    def __init__(
        self,
        answer: RoutedAnswer,
        relay: Relay,
        metrics: GatewayMetrics,
        *,
        keepalive_s: float,
        stall_s: float,
        on_end: Callable[[], None],
    ) -> None:
        self.answer = answer
        self.relay = relay
        self.metrics = metrics
        self.keepalive_s = keepalive_s
        self.stall_s = stall_s
        self.started = time.perf_counter()
        self.opened: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUE_FRAMES)
        self._task = asyncio.create_task(self._relay())
        self._task.add_done_callback(lambda _: on_end())

    async def _put(self, frame: bytes | None) -> None:
        if not self._queue.full():  # the usual case: no timer, no task per frame
            self._queue.put_nowait(frame)
            return
        try:
            await asyncio.wait_for(self._queue.put(frame), self.stall_s)
        except TimeoutError:
            raise _Stalled from None

    async def _send(self, frames: list[bytes]) -> None:
        for frame in frames:
            await self._put(frame)

    async def _relay(self) -> None:
        first_text = False
        events = cast(AsyncGenerator[PeerOpened | PeerChunk, None], aiter(self.answer))
        try:
            async for event in events:
                if isinstance(event, PeerOpened):
                    released = self.relay.opened(event.peer_id, event.url, event.switch)
                    if not self.opened.done():
                        self.opened.set_result(event.peer_id)
                    await self._send(released)
                elif isinstance(event, PeerChunk):
                    if not first_text and event.chunk.text:
                        first_text = True
                        self.metrics.observe_ttft(event.peer_id, time.perf_counter() - self.started)
                    await self._send(self.relay.chunk(event.chunk))
            await self._send(self.relay.finish(self.answer))
        except asyncio.CancelledError:
            raise
        except _Stalled:
            log.info("a client of the gateway read nothing for %g s; its stream stops", self.stall_s)
            return
        except Exception as exc:
            if not self.opened.done():
                self.opened.set_exception(exc)
                return
            if not isinstance(exc, PeerInferError):
                log.exception("the relay of a stream failed", exc_info=exc)
            message = exc.message if isinstance(exc, PeerInferError) else "internal error in the gateway; see its log"
            log.warning("a stream through the gateway ended with an error: %s", message)
            self.metrics.stream_errors.inc()
            code = "no_peers" if isinstance(exc, NoPeersError) else "peer_failed"
            with contextlib.suppress(_Stalled):
                await self._send(self.relay.failed(message, code))
        finally:
            # Closes the peer's stream now if the answer stopped between two events (a client that left).
            await events.aclose()
            count_switches(self.answer, self.metrics)
        with contextlib.suppress(_Stalled):
            await self._put(None)

    async def frames(self) -> AsyncIterator[bytes]:
        """The stream's SSE frames to the end; leaving early (a client that left) stops the answer."""
        try:
            while True:
                if not self._queue.empty():
                    frame = self._queue.get_nowait()  # the usual case: no timer, no task per frame
                else:
                    try:
                        frame = await asyncio.wait_for(self._queue.get(), self.keepalive_s)
                    except TimeoutError:
                        if self._task.done() and self._queue.empty():
                            return
                        yield sse.KEEPALIVE
                        continue
                if frame is None:
                    return
                yield frame
        finally:
            self.cancel()

    def cancel(self) -> None:
        """Stops the answer (its peer's stream closes). Never waits: it runs in clean-ups that may not."""
        self._task.cancel()
        if not self.opened.done():
            self.opened.cancel()

    def response(self, peer_id: str) -> StreamingResponse:
        headers = {**sse.HEADERS, PEER_HEADER: peer_id}
        return StreamingResponse(self.frames(), media_type=sse.MEDIA_TYPE, headers=headers)


async def relay_stream(
    answer: RoutedAnswer,
    relay: Relay,
    metrics: GatewayMetrics,
    *,
    keepalive_s: float,
    stall_s: float,
    on_end: Callable[[], None],
) -> StreamingResponse:
    """Waits for the first peer to accept; raises what the answer raised before that (``ClientError``)."""
    relayed = RelayedStream(answer, relay, metrics, keepalive_s=keepalive_s, stall_s=stall_s, on_end=on_end)
    try:
        peer_id = await relayed.opened
    except BaseException:
        relayed.cancel()
        raise
    return relayed.response(peer_id)


def worker_refusal(status: int, body: bytes) -> JSONResponse:
    """A worker's own 4xx, as it said it (its error object checked), for the gateway's client."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        payload = None
    error = checked_error(payload.get("error")) if isinstance(payload, dict) else None
    if error is None:
        error = error_event(
            f"a worker refused the request with HTTP {status}", "worker_refused", "invalid_request_error"
        )["error"]
    return JSONResponse({"error": error}, status_code=status)


async def whole(
    router: Router,
    path: str,
    body: dict[str, Any],
    kind: Kind,
    metrics: GatewayMetrics,
    *,
    model: str | None,
    max_bytes: int,
    timeout_s: float,
) -> JSONResponse:
    """A non-streamed answer from the first peer that gives one; ``NoPeersError`` when none did."""
    messages = body.get("messages") if kind == "chat" else None
    prefer = router.peer_of(messages) if isinstance(messages, list) else None
    tried: set[str] = set()
    urls: list[str] = []
    reason = "no peer tried"
    for attempt in range(router.options.max_attempts):
        record, probe = await router.pick(tried, prefer if attempt == 0 else None)
        if attempt:
            metrics.failovers.inc()
        tried.add(record.peer_id)
        urls.append(probe.url)
        try:
            reply = await router.http.request(
                probe.url, path, body, max_bytes=max_bytes, deadline=time.monotonic() + timeout_s
            )
        except ClientError as exc:
            reason = exc.message
            router.fail(record.peer_id, reason)
            continue
        if reply.status != 200:
            if failure_action(reply.status, False) == "fatal":
                return worker_refusal(reply.status, reply.body)
            reason = f"the worker at {probe.url} answered {reply.status}"
            router.fail(record.peer_id, reason)
            continue
        try:
            payload = json.loads(reply.body)
        except (ValueError, RecursionError):
            payload = None
        answer = whole_answer(payload, kind, model=model)
        if answer is None:
            reason = f"the worker at {probe.url} sent something that is not a {kind} completion"
            router.fail(record.peer_id, reason)
            continue
        router.succeed(record.peer_id)
        if isinstance(messages, list) and answer["choices"] and "message" in answer["choices"][0]:
            text = answer["choices"][0]["message"].get("content")
            if isinstance(text, str):
                router.remember([*messages, {"role": "assistant", "content": text}], record.peer_id)
        answer["peerinfer"] = {"peer": record.peer_id, "url": probe.url, "peers": urls, "failovers": len(urls) - 1}
        return JSONResponse(answer, headers={PEERS_HEADER: record.peer_id})
    raise NoPeersError(f"gave up after {len(urls)} attempts; last failure: {reason}")
