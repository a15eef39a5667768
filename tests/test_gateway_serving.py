"""The gateway's stream relay (``gateway.serving.RelayedStream``) over a scripted routed answer. No server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from peerinfer.api import sse
from peerinfer.api.relay import StreamStitcher
from peerinfer.client.answer import PeerChunk, PeerOpened, Switch
from peerinfer.client.stream_events import StreamChunk
from peerinfer.errors import ClientError, NoPeersError
from peerinfer.gateway.metrics import GatewayMetrics
from peerinfer.gateway.serving import ChatRelay, RelayedStream, relay_stream


def piece(text: str) -> PeerChunk:
    payload = {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    return PeerChunk("p", StreamChunk(text=text, payload=payload))


class ScriptedAnswer:
    """Plays events, sleeps (a float) or raises (an exception) in order, like a ``RoutedAnswer``."""

    def __init__(self, *script: Any) -> None:
        self.script = script
        self.prompt_tokens: int | None = 3
        self.completion_tokens = 0
        self.switches: list[Switch] = []
        self.closed = False

    def __aiter__(self) -> AsyncIterator[PeerOpened | PeerChunk]:
        return self._events()

    async def _events(self) -> AsyncIterator[PeerOpened | PeerChunk]:
        try:
            for step in self.script:
                if isinstance(step, float):
                    await asyncio.sleep(step)
                elif isinstance(step, BaseException):
                    raise step
                else:
                    if isinstance(step, PeerOpened) and step.switch is not None:
                        self.switches.append(step.switch)
                    if isinstance(step, PeerChunk) and step.chunk.text:
                        self.completion_tokens += 1
                    yield step
        finally:
            self.closed = True  # where a RoutedAnswer closes its peer's stream


def relayed(answer: ScriptedAnswer, ended: list[bool]) -> RelayedStream:
    stitcher = StreamStitcher("chat", model="m", wants_usage=True)
    return RelayedStream(
        answer,  # type: ignore[arg-type]
        ChatRelay(stitcher),
        GatewayMetrics(),
        keepalive_s=0.1,
        stall_s=5.0,
        on_end=lambda: ended.append(True),
    )


async def collect(stream: RelayedStream) -> list[bytes]:
    return [frame async for frame in stream.frames()]


def texts(frames: list[bytes]) -> str:
    out = []
    for frame in frames:
        if frame.startswith(b"data: {"):
            payload = json.loads(frame[6:])
            out += [choice["delta"].get("content", "") for choice in payload.get("choices", [])]
    return "".join(out)


SWITCH = Switch("http://a", "http://b", "the connection broke", 4)


def test_keepalives_flow_while_a_new_peer_is_chosen_and_the_stream_goes_on() -> None:
    answer = ScriptedAnswer(
        PeerOpened("A", "http://a", None), piece("Once"), 0.5, PeerOpened("B", "http://b", SWITCH), piece(" upon")
    )
    ended: list[bool] = []

    async def run() -> list[bytes]:
        stream = relayed(answer, ended)
        assert await stream.opened == "A"
        return await collect(stream)

    frames = asyncio.run(run())
    assert texts(frames) == "Once upon"
    gap = frames[frames.index(next(f for f in frames if b"Once" in f)) + 1 : -3]
    assert gap and set(gap) == {sse.KEEPALIVE}  # only comments while the answer moved
    assert frames[-1] == sse.DONE and b'"usage"' in frames[-2]
    assert ended == [True]


def test_an_answer_that_cannot_go_on_ends_with_an_error_event_then_done() -> None:
    answer = ScriptedAnswer(PeerOpened("A", "http://a", None), piece("Once"), ClientError("cannot be resumed"))
    ended: list[bool] = []

    async def run() -> list[bytes]:
        stream = relayed(answer, ended)
        await stream.opened
        return await collect(stream)

    frames = asyncio.run(run())
    assert frames[-1] == sse.DONE
    error = json.loads(frames[-2][6:])["error"]
    assert error["message"] == "cannot be resumed" and error["code"] == "peer_failed"
    assert ended == [True]


def test_a_failure_before_any_peer_accepted_is_raised_for_a_json_error() -> None:
    answer = ScriptedAnswer(NoPeersError("no usable peer through the DHT at 127.0.0.1:4222"))
    ended: list[bool] = []

    async def run() -> None:
        await relay_stream(
            answer,  # type: ignore[arg-type]
            ChatRelay(StreamStitcher("chat", model="m", wants_usage=False)),
            GatewayMetrics(),
            keepalive_s=0.1,
            stall_s=1.0,
            on_end=lambda: ended.append(True),
        )

    with pytest.raises(NoPeersError, match=r"127\.0\.0\.1:4222"):
        asyncio.run(run())
    assert ended == [True]


def test_a_client_that_leaves_closes_the_peers_stream_and_frees_its_place() -> None:
    answer = ScriptedAnswer(PeerOpened("A", "http://a", None), piece("Once"), 30.0, piece(" never"))
    ended: list[bool] = []

    async def run() -> None:
        stream = relayed(answer, ended)
        await stream.opened
        frames = stream.frames()
        async for frame in frames:
            if b"Once" in frame:
                break
        await frames.aclose()  # what the server does when the client hangs up
        for _ in range(100):
            if ended:
                break
            await asyncio.sleep(0.01)

    asyncio.run(run())
    assert answer.closed and ended == [True]


def test_the_per_peer_labels_of_metrics_are_bounded_however_many_peers_appear() -> None:
    metrics = GatewayMetrics()
    for number in range(500):
        metrics.observe_ttft(f"peer{number:04d}" + "x" * 40, 0.1)
    metrics.observe_ttft('evil"} 1\n# injected', 0.1)
    rendered = metrics.render().decode()
    peers = {line.split('peer="')[1].split('"')[0] for line in rendered.splitlines() if 'peer="' in line}
    assert len(peers) == 65 and "other" in peers  # 64 of their own, then everyone else together
    assert "injected" not in rendered
    assert metrics.peer_label("peer0000" + "x" * 40) == "peer0000xxxxxxxx"  # the first ones keep theirs
