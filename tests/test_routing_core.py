"""The async routing core and its HTTP seam, with the network replaced by an in-memory transport.

``ScriptedPeers`` is an ``httpx.MockTransport`` that plays several workers at once, each with its
own key, ``/health`` and a scripted stream, so the real ``Router``, ``RoutedAnswer``, vetting and
stream reading run with no socket. The choice's steps (``plan_choice``) and the resume plans are
pure and tested with tables.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from peerinfer.api.health import HealthRejected, HealthReport, read_health
from peerinfer.client.core import PeerChunk, PeerOpened, Router, RouterOptions
from peerinfer.client.resume import chat_plan, completion_plan, resumed_body
from peerinfer.client.routed import RoutedClient
from peerinfer.client.routing import ChoiceState, Probe, plan_choice
from peerinfer.client.sdk import PeerInferClient
from peerinfer.client.transport import WorkerHttp
from peerinfer.engine.fake import FakeEngine
from peerinfer.errors import ClientError, NoPeersError
from peerinfer.network.discovery import Discovery
from peerinfer.network.identity import PeerIdentity, b64, unb64
from peerinfer.network.records import challenge_message, sign_record
from peerinfer.server.app import create_app
from tests.test_network_records import make_record

SHA = "ab" * 32
WORDS = ["Once ", "upon ", "a ", "time ", "a ", "small ", "model ", "lived."]
STORY = "".join(WORDS)


def probe(peer: str, rtt_s: float = 0.01, free: int = 1) -> Probe:
    return Probe(
        peer_id=peer, url=f"http://{peer}", rtt_s=rtt_s, slots_total=4, slots_free=free, queue=0, tokens_per_s=10
    )  # type: ignore[arg-type]


# --- the choice's steps ---------------------------------------------------------------------------


def state(**changes: Any) -> ChoiceState:
    base = ChoiceState(deadline=10.0, wave=3, interval_s=0.25, grace_s=0.05)
    for name, value in changes.items():
        setattr(base, name, value)
    return base


@pytest.mark.parametrize(
    ("choice", "now", "in_flight", "queued", "kind", "count"),
    [
        (state(), 0.0, 0, 10, "launch", 3),  # the first wave
        (state(launched_at=0.0, wave=6), 0.1, 3, 7, "wait", 0),  # a wave is out: wait for it
        (state(launched_at=0.0, wave=6), 0.3, 3, 7, "launch", 6),  # none passed within a wave interval
        (state(launched_at=0.0, wave=96), 0.3, 60, 100, "launch", 4),  # at most 64 in flight
        (state(launched_at=0.0, wave=96), 0.3, 64, 100, "wait", 0),
        (state(launched_at=0.0), 0.3, 2, 0, "look_again", 0),  # every candidate is out: look for more
        (state(launched_at=0.0, looked_again=True), 0.3, 2, 0, "wait", 0),  # once only
        (state(launched_at=0.0, looked_again=True), 0.3, 0, 0, "done", 0),  # nothing left
        (state(launched_at=0.0), 10.0, 2, 5, "done", 0),  # the deadline, whatever is in flight
        (state(passed=[probe("a")], first_pass_at=1.0), 1.01, 2, 5, "wait", 0),  # grace for the others
        (state(passed=[probe("a")], first_pass_at=1.0), 1.06, 2, 5, "done", 0),
        (state(passed=[probe("a", rtt_s=0.5)], first_pass_at=1.0), 1.2, 2, 5, "wait", 0),  # as long as its RTT
        (state(passed=[probe("a")], first_pass_at=1.0), 1.01, 0, 5, "done", 0),  # no one else to wait for
        (state(passed=[probe("a")], first_pass_at=1.0, prefer="a"), 1.01, 2, 5, "done", 0),  # the preferred peer
        (state(passed=[probe("a", free=0)], first_pass_at=1.0, prefer="a"), 1.01, 2, 5, "wait", 0),  # ...if free
        (state(passed=[probe("a", free=0)], first_pass_at=1.0), 1.06, 2, 5, "wait", 0),  # all full: no grace limit
        (state(passed=[probe("a", free=0), probe("b")], first_pass_at=1.0), 1.06, 2, 5, "done", 0),
        (state(passed=[probe("a", free=0)], first_pass_at=1.0), 1.06, 0, 5, "done", 0),  # nobody left in flight
        (state(passed=[probe("a", free=0)], first_pass_at=1.0), 10.0, 2, 5, "done", 0),  # the deadline
    ],
)
def test_the_choice_takes_the_right_step(
    choice: ChoiceState, now: float, in_flight: int, queued: int, kind: str, count: int
) -> None:
    step = plan_choice(choice, now, in_flight, queued, 64)
    assert (step.kind, step.count) == (kind, count)
    if kind == "wait":
        assert now < step.until <= choice.deadline


def test_a_wait_wakes_for_the_next_wave_the_grace_or_the_deadline() -> None:
    assert plan_choice(state(launched_at=1.0), 1.1, 3, 5, 64).until == pytest.approx(1.25)
    assert plan_choice(state(passed=[probe("a")], first_pass_at=1.0), 1.01, 3, 5, 64).until == pytest.approx(1.05)
    assert plan_choice(state(launched_at=1.0, looked_again=True), 1.1, 3, 0, 64).until == 10.0
    assert plan_choice(state(passed=[probe("a", free=0)], first_pass_at=1.0), 1.01, 3, 5, 64).until == 10.0


# --- what each peer is asked ----------------------------------------------------------------------

HISTORY = [{"role": "user", "content": "Tell me a story"}]


@pytest.mark.parametrize(
    ("body", "resumable"),
    [
        ({"messages": HISTORY}, True),
        ({"messages": HISTORY, "logprobs": True, "top_logprobs": 2}, True),
        ({"messages": HISTORY, "n": 2}, False),
        ({"messages": HISTORY, "tools": [{"type": "function", "function": {"name": "f"}}]}, False),
        ({"messages": HISTORY, "response_format": {"type": "json_object"}}, False),
        ({"messages": HISTORY, "response_format": {"type": "text"}}, True),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, False),
    ],
)
def test_which_chats_can_be_resumed(body: dict[str, Any], resumable: bool) -> None:
    assert chat_plan(body).resumable is resumable


@pytest.mark.parametrize(
    ("body", "resumable"),
    [
        ({"prompt": "Once"}, True),
        ({"prompt": "Once", "echo": True}, True),
        ({"prompt": "Once", "logprobs": 2}, False),
        ({"prompt": ["Once"]}, False),
        ({"prompt": "Once", "n": 3}, False),
    ],
)
def test_which_completions_can_be_resumed(body: dict[str, Any], resumable: bool) -> None:
    assert completion_plan(body).resumable is resumable


def test_every_peer_is_asked_for_usage_but_the_client_gets_it_only_if_asked() -> None:
    quiet = chat_plan({"messages": HISTORY, "stream": True})
    assert quiet.body["stream"] is True and quiet.body["stream_options"] == {"include_usage": True}
    assert not quiet.client_wants_usage
    assert chat_plan(
        {"messages": HISTORY, "stream": True, "stream_options": {"include_usage": True}}
    ).client_wants_usage
    # A client that did not stream asked for no usage chunk, whatever its options say.
    assert not chat_plan({"messages": HISTORY, "stream_options": {"include_usage": True}}).client_wants_usage


def test_a_resumed_chat_continues_the_partial_answer_with_fewer_tokens() -> None:
    plan = chat_plan({"messages": HISTORY, "max_tokens": 100, "n": 1})
    body = resumed_body(plan, "Once upon", 2)
    assert body["messages"] == [*HISTORY, {"role": "assistant", "content": "Once upon"}]
    assert body["continue_final_message"] is True and body["max_tokens"] == 98
    assert plan.max_deltas == 100
    # Continuing an assistant message already: the partial text extends it.
    going = chat_plan(
        {"messages": [*HISTORY, {"role": "assistant", "content": "Once"}], "continue_final_message": True}
    )
    assert resumed_body(going, " upon", 1)["messages"][-1] == {"role": "assistant", "content": "Once upon"}


def test_a_resumed_completion_keeps_its_token_limit_and_does_not_echo_again() -> None:
    plan = completion_plan({"prompt": "Once", "echo": True})
    assert plan.body["max_tokens"] == 16  # explicit, so a resumed request cannot get 16 more
    body = resumed_body(plan, " upon a", 2)
    assert body["prompt"] == "Once upon a" and body["max_tokens"] == 14 and body["echo"] is False


# --- /health: one model on both sides ---------------------------------------------------------------


def test_the_workers_health_is_what_clients_read() -> None:
    engine = FakeEngine(lambda prompt: "hi", slots=3)
    with TestClient(create_app(engine=engine)) as client:
        reply = client.get("/health")
        for _ in range(200):  # the model loads in the lifespan, off the loop: "loading" until then
            if reply.status_code == 200:
                break
            assert read_health(reply.content).status == "loading"
            time.sleep(0.02)
            reply = client.get("/health")
    report = read_health(reply.content)
    assert reply.status_code == 200 and report.serving
    assert (report.slots_total, report.slots_free, report.requests_waiting) == (3, 3, 0)
    assert report.sha256 == engine.info.sha256


def test_a_loading_worker_reports_only_its_status() -> None:
    assert HealthReport(status="loading").wire() == {"status": "loading"}
    assert not read_health(b'{"status": "loading"}').serving


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "malformed"),
        (b"[1, 2]", "malformed"),
        (b"[" * 5000, "malformed"),
        (b'{"status": "ok", "slots_total": "four"}', "bad_field"),
        (b'{"status": "ok", "slots_total": 4, "slots_free": 9}', "bad_field"),
        (b'{"status": "ok", "slots_total": 1e9}', "bad_field"),
        (b'{"status": "great"}', "bad_field"),
        (b'{"status": "ok", "slots_total": true}', "bad_field"),
        (b'{"status": "ok", "model": "' + b"m" * 5000 + b'"}', "bad_field"),
    ],
)
def test_a_health_report_that_lies_is_rejected_with_a_reason(body: bytes, reason: str) -> None:
    with pytest.raises(HealthRejected) as caught:
        read_health(body)
    assert caught.value.reason == reason


def test_fields_a_newer_worker_adds_are_ignored() -> None:
    report = read_health(b'{"status": "ok", "slots_total": 2, "slots_free": 1, "requests_waiting": 0, "gpu": "none"}')
    assert report.serving


# --- the core over an in-memory transport ---------------------------------------------------------


@dataclass
class ScriptedPeer:
    identity: PeerIdentity = field(default_factory=PeerIdentity.generate)
    words: list[str] = field(default_factory=lambda: list(WORDS))
    cut_after: int | None = None  # deltas sent before the connection breaks
    status: int = 200
    gzip_health: bool = False
    claimed_tokens: int | None = None  # what its usage says, if not the truth
    slots_free: int = 4  # what its /health says, of 4
    bodies: list[dict[str, Any]] = field(default_factory=list)

    def record(self, host: str) -> bytes:
        now = time.time()
        record = make_record(
            self.identity, sha256=SHA, endpoints=(f"http://{host}",), issued_at=now, expires_at=now + 60
        )
        return sign_record(record, self.identity)


class Cut(httpx.ReadError):
    pass


class ScriptedPeers:
    """Plays every peer of ``peers`` (by host name) on one ``httpx.MockTransport``."""

    def __init__(self, peers: dict[str, ScriptedPeer]) -> None:
        self.peers = peers
        self.transport = httpx.MockTransport(self.handle)

    def values(self) -> list[bytes]:
        return [peer.record(host) for host, peer in self.peers.items()]

    def handle(self, request: httpx.Request) -> httpx.Response:
        peer = self.peers[request.url.host]
        if request.url.path == "/health":
            body = json.dumps(
                {"status": "ok", "sha256": SHA, "slots_total": 4, "slots_free": peer.slots_free, "requests_waiting": 0}
            ).encode()
            if peer.gzip_health:
                return httpx.Response(200, content=gzip.compress(body), headers={"Content-Encoding": "gzip"})
            return httpx.Response(200, content=body)
        if request.url.path == "/peer/challenge":
            nonce = unb64(json.loads(request.content)["nonce"])
            signature = b64(peer.identity.sign(challenge_message(nonce)))
            return httpx.Response(200, json={"peer_id": peer.identity.peer_id, "signature": signature})
        body = json.loads(request.content)
        peer.bodies.append(body)
        if peer.status != 200:
            error = {
                "message": "this model cannot do that",
                "type": "invalid_request_error",
                "param": "x",
                "code": None,
            }
            return httpx.Response(peer.status, json={"error": error})
        return httpx.Response(200, content=self.stream(peer, body), headers={"Content-Type": "text/event-stream"})

    @staticmethod
    async def stream(peer: ScriptedPeer, body: dict[str, Any]) -> AsyncIterator[bytes]:
        messages = body.get("messages", [])
        done = messages[-1]["content"] if body.get("continue_final_message") else ""
        words = list(peer.words)
        while done and words and done.startswith(words[0]):
            done = done[len(words[0]) :]
            words.pop(0)
        frame = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": "m"}
        yield (
            b"data: "
            + json.dumps({**frame, "choices": [{"index": 0, "delta": {"role": "assistant"}}]}).encode()
            + b"\n\n"
        )
        for number, word in enumerate(words):
            if peer.cut_after is not None and number == peer.cut_after:
                raise Cut("the peer died")
            delta = {"index": 0, "delta": {"content": word}, "finish_reason": None}
            yield b"data: " + json.dumps({**frame, "choices": [delta]}).encode() + b"\n\n"
        yield (
            b"data: "
            + json.dumps({**frame, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}).encode()
            + b"\n\n"
        )
        tokens = len(words) if peer.claimed_tokens is None else peer.claimed_tokens
        usage = {"prompt_tokens": 7, "completion_tokens": tokens, "total_tokens": 7 + tokens}
        yield b"data: " + json.dumps({**frame, "choices": [], "usage": usage}).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"


class Store:
    def __init__(self, values: list[bytes]) -> None:
        self.values = values

    def get(self, key: str, timeout_s: float) -> list[bytes]:
        return list(self.values)


def prefer_host(host: str):  # type: ignore[no-untyped-def]
    def chooser(probes: list[Probe], rng: object) -> Probe:
        return next((p for p in probes if p.url == f"http://{host}"), probes[0])

    return chooser


def routed(peers: ScriptedPeers, first: str, **options: Any) -> RoutedClient:
    return RoutedClient(
        discovery=Discovery(Store(peers.values()), timeout_s=0.5),
        transport=peers.transport,
        chooser=prefer_host(first),
        **options,
    )


def test_a_cut_stream_is_resumed_on_another_peer_from_the_text_so_far() -> None:
    peers = ScriptedPeers({"dies.test": ScriptedPeer(cut_after=3), "stays.test": ScriptedPeer()})
    with routed(peers, "dies.test") as client:
        stream = client.chat_stream(HISTORY, max_tokens=50)
        assert "".join(stream) == STORY
        assert [(s.from_url, s.to_url, s.resumed_chars) for s in stream.switches] == [
            ("http://dies.test", "http://stays.test", len("".join(WORDS[:3])))
        ]
        resumed = peers.peers["stays.test"].bodies[-1]
        assert resumed["continue_final_message"] is True and resumed["max_tokens"] == 47
        assert resumed["messages"][-1] == {"role": "assistant", "content": "".join(WORDS[:3])}
        assert stream.stats is not None and stream.stats.completion_tokens == len(WORDS)
        assert client.bans.is_banned(peers.peers["dies.test"].identity.peer_id, time.monotonic())


def test_an_answer_that_cannot_be_resumed_fails_loudly_instead_of_short() -> None:
    peers = ScriptedPeers({"dies.test": ScriptedPeer(cut_after=3), "stays.test": ScriptedPeer()})
    with routed(peers, "dies.test") as client:
        received: list[str] = []
        with pytest.raises(ClientError, match="cannot be resumed"):
            for delta in client.chat_stream(HISTORY, max_tokens=50, n=2):
                received.append(delta)
        assert "".join(received) == "".join(WORDS[:3])
        assert peers.peers["stays.test"].bodies == []


def test_a_workers_refusal_reaches_the_caller_with_its_status_and_error_and_no_one_else_is_asked() -> None:
    peers = ScriptedPeers({"refuses.test": ScriptedPeer(status=400), "other.test": ScriptedPeer()})
    with routed(peers, "refuses.test") as client:
        with pytest.raises(ClientError) as caught:
            client.chat(HISTORY)
        assert caught.value.status == 400
        assert caught.value.error is not None and caught.value.error["param"] == "x"
        assert peers.peers["other.test"].bodies == []


def test_a_peer_that_compresses_its_health_is_refused_not_inflated() -> None:
    peers = ScriptedPeers({"bomb.test": ScriptedPeer(gzip_health=True), "honest.test": ScriptedPeer()})
    with routed(peers, "bomb.test") as client:
        stream = client.chat_stream(HISTORY)
        assert "".join(stream) == STORY and stream.peer_url == "http://honest.test"
        assert client.failures["malformed"] == 1


def test_no_peer_left_names_where_it_looked() -> None:
    peers = ScriptedPeers({"dies.test": ScriptedPeer(cut_after=0)})
    with (
        routed(peers, "dies.test", max_attempts=3, choose_timeout_s=0.5) as client,
        pytest.raises(NoPeersError, match="through the given discovery"),
    ):
        client.chat(HISTORY)


def test_the_async_router_yields_who_served_and_every_chunk() -> None:
    peers = ScriptedPeers({"one.test": ScriptedPeer()})

    async def run() -> tuple[list[object], int]:
        router = Router(
            Discovery(Store(peers.values()), timeout_s=0.5),
            WorkerHttp(transport=peers.transport),
            options=RouterOptions(choose_timeout_s=1.0),
        )
        try:
            answer = router.answer(chat_plan({"messages": HISTORY, "stream": True}))
            events = [event async for event in answer]
            views = await router.views()
            return events, answer.completion_tokens if views[0].verified else -1
        finally:
            await router.aclose()

    events, tokens = asyncio.run(run())
    assert isinstance(events[0], PeerOpened) and events[0].url == "http://one.test" and events[0].switch is None
    texts = [event.chunk.text for event in events if isinstance(event, PeerChunk)]
    assert "".join(texts) == STORY and tokens == len(WORDS)


def test_the_sdk_talks_to_one_worker_through_the_same_seam() -> None:
    peers = ScriptedPeers({"solo.test": ScriptedPeer()})
    with PeerInferClient("http://solo.test", transport=peers.transport) as client:
        stream = client.chat_stream(HISTORY, max_tokens=3)
        assert "".join(stream) == "".join(WORDS[:3])  # more deltas than max_tokens: cut at the limit
        assert stream.overran and stream.finish_reason == "length"
        assert client.health().serving


def test_a_survey_probes_every_known_peer_but_not_more_often_than_its_interval() -> None:
    peers = ScriptedPeers({f"p{number}.test": ScriptedPeer() for number in range(5)})
    health_calls: list[str] = []
    inner = peers.transport

    async def counting(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            health_calls.append(request.url.host)
        return await inner.handle_async_request(request)

    async def run() -> list[bool]:
        router = Router(
            Discovery(Store(peers.values()), timeout_s=0.5), WorkerHttp(transport=httpx.MockTransport(counting))
        )
        try:
            first = await router.views(survey=True)
            await router.views(survey=True)  # within the interval: no new probes
            return [view.verified and view.rtt_ms is not None for view in first]
        finally:
            await router.aclose()

    assert asyncio.run(run()) == [True] * 5
    assert sorted(health_calls) == sorted(peers.peers)


@pytest.mark.parametrize(("claimed", "counted"), [(100_000_000, 20), (0, len(WORDS))])
def test_a_peers_token_count_is_bounded_by_what_it_was_allowed_and_what_it_sent(claimed: int, counted: int) -> None:
    peers = ScriptedPeers({"liar.test": ScriptedPeer(claimed_tokens=claimed)})
    with routed(peers, "liar.test") as client:
        stream = client.chat_stream(HISTORY, max_tokens=20)
        assert "".join(stream) == STORY
        assert stream.stats is not None and stream.stats.completion_tokens == counted


def counting_transport(peers: ScriptedPeers, calls: list[str]) -> httpx.MockTransport:
    inner = peers.transport

    async def counting(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            calls.append(request.url.host)
        return await inner.handle_async_request(request)

    return httpx.MockTransport(counting)


def test_a_peer_probed_a_moment_ago_is_used_again_and_requests_at_once_share_one_probe() -> None:
    peers = ScriptedPeers({"one.test": ScriptedPeer()})
    calls: list[str] = []

    async def run() -> list[str]:
        router = Router(
            Discovery(Store(peers.values()), timeout_s=0.5), WorkerHttp(transport=counting_transport(peers, calls))
        )
        try:

            async def answer() -> str:
                routed = router.answer(chat_plan({"messages": HISTORY, "stream": True}))
                return "".join([event.chunk.text async for event in routed if isinstance(event, PeerChunk)])

            texts = list(await asyncio.gather(*(answer() for _ in range(4))))  # at once: one probe
            texts.append(await answer())  # a moment later: the same probe, no new one
            return texts
        finally:
            await router.aclose()

    assert asyncio.run(run()) == [STORY] * 5
    assert calls == ["one.test"]


def test_a_fresh_probe_counts_the_streams_sent_since_and_a_full_peer_is_probed_again() -> None:
    peers = ScriptedPeers({"one.test": ScriptedPeer()})
    calls: list[str] = []

    async def run() -> tuple[int, int]:
        router = Router(
            Discovery(Store(peers.values()), timeout_s=0.5), WorkerHttp(transport=counting_transport(peers, calls))
        )
        try:
            record, _ = await router.pick(set())
            for _ in range(4):  # this router opens four streams: the peer reported 4 free slots
                router.serving(record.peer_id, +1)
            fresh = router.fresh_probe(record.peer_id, time.monotonic())
            assert fresh is not None
            await router.pick(set())  # no free slot left by its count: probe again
            return fresh.slots_free, len(calls)
        finally:
            await router.aclose()

    assert asyncio.run(run()) == (0, 2)


@pytest.mark.parametrize("far_delay_s", [0.0, 0.3])
def test_requests_that_choose_at_once_see_each_others_picks_and_do_not_crowd_one_peer(far_delay_s: float) -> None:
    # Each peer has one free slot. Two answers choose at the same moment and share the same probes;
    # far.test's probe may come back after the grace that near.test's starts. The second answer must
    # still see that the first took near.test's slot, and wait for far.test rather than queue.
    peers = ScriptedPeers({"near.test": ScriptedPeer(slots_free=1), "far.test": ScriptedPeer(slots_free=1)})
    inner = peers.transport

    async def slow_far(request: httpx.Request) -> httpx.Response:
        if request.url.host == "far.test" and request.url.path == "/health":
            await asyncio.sleep(far_delay_s)
        return await inner.handle_async_request(request)

    async def run() -> list[str]:
        router = Router(
            Discovery(Store(peers.values()), timeout_s=0.5), WorkerHttp(transport=httpx.MockTransport(slow_far))
        )
        try:
            opened: list[str] = []
            both = asyncio.Event()

            async def answer() -> str:
                text = ""
                async for event in router.answer(chat_plan({"messages": HISTORY, "stream": True})):
                    if isinstance(event, PeerOpened):
                        opened.append(event.url)
                        if len(opened) == 2:
                            both.set()
                        await both.wait()  # the first answer holds its slot until the second has chosen
                    else:
                        text += event.chunk.text or ""
                return text

            assert await asyncio.gather(answer(), answer()) == [STORY, STORY]
            return sorted(opened)
        finally:
            await router.aclose()

    assert asyncio.run(run()) == ["http://far.test", "http://near.test"]


def test_a_stale_lookup_is_answered_at_once_while_a_new_one_runs_in_the_background() -> None:
    peers = ScriptedPeers({"one.test": ScriptedPeer()})
    release, slow, started = threading.Event(), threading.Event(), threading.Event()

    class SlowAfterFirst(Store):
        def get(self, key: str, timeout_s: float) -> list[bytes]:
            if slow.is_set():
                started.set()
                release.wait()  # the DHT is slow now: nobody may wait for it
            return super().get(key, timeout_s)

    async def run() -> tuple[int, int, bool]:
        router = Router(
            Discovery(SlowAfterFirst(peers.values()), timeout_s=0.5),
            WorkerHttp(transport=peers.transport),
            options=RouterOptions(lookup_ttl_s=0.0),
        )
        try:
            first = await router.peers()
            slow.set()
            # Stale at once (ttl 0): answered from the last lookup; a hang here would be a failure.
            second = await asyncio.wait_for(router.peers(), timeout=30)
            refreshing = await asyncio.to_thread(started.wait, 30)  # the new lookup did start
            return len(first), len(second), refreshing
        finally:
            release.set()
            await router.aclose()

    assert asyncio.run(run()) == (1, 1, True)
