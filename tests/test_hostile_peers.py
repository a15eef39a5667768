"""The real ``RoutedClient`` against hostile peers (``tests/hostile_peer.py``) and one honest worker.

Each lie is that peer's failure: the client bans it and the honest worker serves the answer. The
records come from a fake store, so the test chooses exactly which records the client sees; the
honest worker is a real uvicorn with the fake engine and a real DHT node of its own.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import pytest

from peerinfer.client.routed import RoutedClient
from peerinfer.client.routing import Probe
from peerinfer.engine.fake import FakeEngine
from peerinfer.errors import NoPeersError
from peerinfer.network.discovery import Discovery
from peerinfer.network.identity import PeerIdentity
from peerinfer.network.records import model_key, select_live, sign_record
from tests.hostile_peer import FIRST_WORDS, HostilePeer
from tests.network_support import (
    STORY,
    ThreadWorker,
    bootstrap_node,
    net_settings,
    network_id,
    story_responder,
    wait_until,
)
from tests.test_network_records import make_record

FAKE_SHA = FakeEngine().info.sha256
HELLO = [{"role": "user", "content": "tell me a story"}]


class Store:
    """A ``ValueStore`` that answers every get with the values the test put there."""

    def __init__(self, values: list[bytes]) -> None:
        self.values = values

    def get(self, key: str, timeout_s: float) -> list[bytes]:
        return list(self.values)


class Honest:
    def __init__(self, worker: ThreadWorker, boot_get: object) -> None:
        self.worker = worker
        self._get = boot_get

    def values(self) -> list[bytes]:
        """The worker's current records, as its DHT node announced them."""
        found: list[bytes] = []

        def fresh() -> bool:
            found[:] = self._get(model_key(FAKE_SHA), 2.0)  # type: ignore[operator]
            return bool(select_live(found, time.time()).records)

        wait_until(fresh, 15, "the honest worker's record is not on the DHT")
        return found


@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Honest]:
    net = network_id()
    home: Path = tmp_path_factory.mktemp("honest")
    with bootstrap_node(net) as boot:
        engine = FakeEngine(story_responder, token_delay_s=0.001, slots=4, max_queue=8)
        worker = ThreadWorker(engine, lambda url: net_settings(home, boot, net, url))
        try:
            yield Honest(worker, boot.get)
        finally:
            worker.stop()


def prefer(url: str):  # type: ignore[no-untyped-def]
    def chooser(probes: Sequence[Probe], rng: random.Random) -> Probe:
        return next((probe for probe in probes if probe.url == url), probes[0])

    return chooser


def make_client(values: list[bytes], **options: object) -> RoutedClient:
    settings: dict[str, object] = {
        "model_sha256": FAKE_SHA,
        "probe_count": 5,
        "probe_timeout_s": 1.0,
        "read_timeout_s": 1.0,
        "choose_timeout_s": 3.0,
        "probe_grace_s": 0.5,
    }
    settings.update(options)
    return RoutedClient(discovery=Discovery(Store(values)), **settings)  # type: ignore[arg-type]


def banned(client: RoutedClient, peer_id: str) -> bool:
    return client.bans.is_banned(peer_id, time.monotonic())


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("health_types", "bad_field"),  # "slots_total": "four" killed client.py with a ValueError
        ("health_huge", "too_large"),  # 100 MB of /health was read in full
        ("silent", "timeout"),
        ("drip", "timeout"),  # one byte per 50 ms: within every socket time-out, but not the deadline
        ("bad_signature", "bad_challenge"),
        ("other_key", "bad_challenge"),
    ],
)
def test_a_peer_that_lies_when_vetted_is_banned_and_the_honest_worker_answers(
    honest: Honest, mode: str, reason: str
) -> None:
    with HostilePeer(mode, FAKE_SHA) as hostile:
        values = [hostile.record(), *honest.values()]
        with make_client(values, chooser=prefer(hostile.url)) as client:
            stream = client.chat_stream(HELLO, max_tokens=400)
            assert "".join(stream) == STORY
            assert stream.peer_url == honest.worker.url and stream.switches == []
            wait_until(lambda: banned(client, hostile.identity.peer_id), 10, f"the {mode} peer was not banned")
            assert client.failures[reason] == 1, client.failures
            assert "GET /health" in hostile.requests
        if mode == "health_huge":
            assert hostile.sent < 20_000_000  # the client hung up long before the 100 MB


@pytest.mark.parametrize(
    ("mode", "resumed"),
    [
        ("sse_garbage", 0),  # JSON nested 5000 deep: RecursionError escaped TextStream
        ("sse_endless_line", 0),  # an event that never ends: memory grew without bound
        ("sse_keepalive", 0),  # keep-alives and never a token: no deadline
        ("sse_cut", len("".join(FIRST_WORDS))),  # three tokens, then the connection closes without [DONE]
        ("sse_error", len("".join(FIRST_WORDS))),  # three tokens, then an error event
    ],
)
def test_a_peer_whose_stream_lies_is_left_for_the_honest_worker(honest: Honest, mode: str, resumed: int) -> None:
    with HostilePeer(mode, FAKE_SHA) as hostile:
        values = [hostile.record(), *honest.values()]
        with make_client(values, chooser=prefer(hostile.url)) as client:
            stream = client.chat_stream(HELLO, max_tokens=400)
            assert "".join(stream) == STORY  # resumed answers continue exactly where the lie stopped
            assert [(s.from_url, s.to_url, s.resumed_chars) for s in stream.switches] == [
                (hostile.url, honest.worker.url, resumed)
            ]
            assert banned(client, hostile.identity.peer_id)
            assert "POST /v1/chat/completions" in hostile.requests


def test_a_peer_that_streams_past_max_tokens_is_cut_at_the_limit_and_banned(honest: Honest) -> None:
    with HostilePeer("sse_endless_text", FAKE_SHA) as hostile:
        values = [hostile.record(), *honest.values()]
        with make_client(values, chooser=prefer(hostile.url)) as client:
            stream = client.chat_stream(HELLO, max_tokens=50)
            deltas = list(stream)
            assert len(deltas) == 50  # an honest worker sends at most one delta per token
            assert "".join(deltas) == "".join(FIRST_WORDS) + " more" * 47
            assert stream.stats is not None and stream.stats.finish_reason == "length"
            assert banned(client, hostile.identity.peer_id)
            assert stream.switches == []


def test_a_crowd_of_black_holes_claiming_free_slots_cannot_stretch_the_choice(honest: Honest) -> None:
    # 60 self-signed records at an endpoint that accepts connections and never answers, each
    # claiming 4096 free slots: before, they always came first, three per 2 s probe round (26 s).
    with HostilePeer("silent", FAKE_SHA) as hole:
        liars = [hole.record(PeerIdentity.generate(), slots_total=4096, slots_free=4096) for _ in range(60)]
        with make_client([*liars, *honest.values()], probe_timeout_s=2.0, choose_timeout_s=2.0) as client:
            _, probe = client.pick(set())
            assert probe.url == honest.worker.url  # within its deadline: pick raises NoPeersError past it
            # The honest peer has proven its key: the next choice probes it in its first wave (of 5),
            # so at most 4 liars more are asked, however many there are.
            asked = len(hole.requests)
            _, probe = client.pick(set())
            assert probe.url == honest.worker.url
            time.sleep(0.2)  # let the hole log what reached it
            assert len(hole.requests) - asked <= 4


def test_the_deadline_ends_a_choice_among_probes_that_block_for_ever() -> None:
    """A fake transport: each probe blocks for ever. Only the choice's deadline can stop it."""
    calls: list[str] = []

    async def black_hole(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.host)
        await asyncio.Event().wait()  # never set: cancelled when the client closes
        raise AssertionError("unreachable")

    now = time.time()
    values = []
    for number in range(100):
        identity = PeerIdentity.generate()
        endpoint = (f"http://liar-{number}.invalid",)
        values.append(
            sign_record(
                make_record(identity, sha256=FAKE_SHA, endpoints=endpoint, issued_at=now, expires_at=now + 60), identity
            )
        )
    client = make_client(
        values,
        choose_timeout_s=0.5,
        probe_timeout_s=60.0,
        max_parallel_probes=40,
        transport=httpx.MockTransport(black_hole),
    )
    try:
        with pytest.raises(NoPeersError, match=r"within 0\.5 s"):
            client.pick(set())  # every probe blocks for ever: only the deadline can end the choice
        # Waves of 5, 10, 20, then what the cap of 40 in flight leaves: never more than 40 at once.
        assert len(calls) == 40
    finally:
        client.close()
        client.close()
