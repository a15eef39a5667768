"""Workers in their own processes, killed with -9: failover, mid-stream resume, records that expire."""

from __future__ import annotations

import io
import itertools
import random
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from peerinfer.client import cli
from peerinfer.client.routed import RoutedClient
from peerinfer.client.routing import Probe
from peerinfer.engine.fake import FakeEngine
from peerinfer.network.dht import DhtNode
from tests.network_support import STORY, ProcessWorker, bootstrap_node, network_id

FAKE_SHA = FakeEngine().info.sha256
HELLO = [{"role": "user", "content": "tell me a story"}]


class Cluster:
    def __init__(self, boot: DhtNode, net: int, tmp: Path) -> None:
        self.boot, self.net, self.tmp = boot, net, tmp
        self.workers: list[ProcessWorker] = []

    def spawn(self, responder: str = "story", token_delay_s: float = 0.0, lifetime_s: float = 30.0) -> ProcessWorker:
        env = {
            "PEERINFER_HOME": str(self.tmp / f"home{len(self.workers)}"),
            "PEERINFER_BOOTSTRAP": f"127.0.0.1:{self.boot.port}",
            "PEERINFER_NETWORK_ID": str(self.net),
            "PEERINFER_RECORD_LIFETIME_S": str(lifetime_s),
            "PEERINFER_RECORD_REFRESH_S": "0.5",
        }
        worker = ProcessWorker(responder, env, token_delay_s)
        self.workers.append(worker)
        return worker

    def client(self, **options: Any) -> RoutedClient:
        return RoutedClient(f"127.0.0.1:{self.boot.port}", network_id=self.net, model_sha256=FAKE_SHA, **options)

    def wait_for(self, client: RoutedClient, count: int) -> None:
        deadline = time.monotonic() + 15
        while len(client.peers(fresh=True)) < count:
            assert time.monotonic() < deadline, f"fewer than {count} peers discovered"
            time.sleep(0.1)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    net = network_id()
    with bootstrap_node(net) as boot:
        group = Cluster(boot, net, tmp_path)
        try:
            yield group
        finally:
            for worker in group.workers:
                worker.kill()


def prefer(url: str) -> Any:
    def chooser(probes: Sequence[Probe], rng: random.Random) -> Probe:
        return next((probe for probe in probes if probe.url == url), probes[0])

    return chooser


def test_worker_killed_before_first_token_fails_over(cluster: Cluster) -> None:
    dying = cluster.spawn("dying")
    healthy = cluster.spawn("story")
    with cluster.client(chooser=prefer(dying.url)) as client:
        cluster.wait_for(client, 2)
        stream = client.chat_stream(HELLO, max_tokens=400)
        assert "".join(stream) == STORY
    assert dying.proc.wait(timeout=5) == -9 or dying.proc.returncode == 9
    assert stream.peer_url == healthy.url
    assert [(s.from_url, s.to_url, s.resumed_chars) for s in stream.switches] == [(dying.url, healthy.url, 0)]
    assert stream.attempts == 2


def test_worker_killed_mid_stream_resumes_without_gap_or_repeat(cluster: Cluster) -> None:
    first = cluster.spawn("story", token_delay_s=0.01)
    second = cluster.spawn("story", token_delay_s=0.01)
    workers = {first.url: first, second.url: second}
    with cluster.client() as client:
        cluster.wait_for(client, 2)
        stream = client.chat_stream(HELLO, max_tokens=400)
        parts: list[str] = []
        for delta in stream:
            parts.append(delta)
            if len(parts) == 40:
                victim = workers[str(stream.peer_url)]
                victim.kill()
    text = "".join(parts)
    assert text == STORY
    assert len(stream.switches) == 1
    switch = stream.switches[0]
    assert switch.from_url == victim.url and switch.to_url != victim.url
    assert 40 <= switch.resumed_chars < len(STORY)
    assert stream.stats is not None and stream.stats.finish_reason == "stop"


def test_the_next_turn_of_a_chat_goes_back_to_the_peer_that_answered_the_last_one(cluster: Cluster) -> None:
    workers = [cluster.spawn("story"), cluster.spawn("story")]
    # Two idle peers differ only in probe round trips, so power of two choices can send every first
    # turn to the same one (seen once). A chooser that alternates spreads them for sure, and would
    # send half the next turns elsewhere if affinity did not hold.
    picks = itertools.count()

    def alternate(probes: Sequence[Probe], rng: random.Random) -> Probe:
        return sorted(probes, key=lambda probe: probe.url)[next(picks) % len(probes)]

    with cluster.client(chooser=alternate) as client:
        cluster.wait_for(client, 2)
        first_peers, next_peers, follow_ups = [], [], []
        for number in range(8):  # without affinity, each next turn would go to either peer
            history = [{"role": "user", "content": f"conversation {number}"}]
            stream = client.chat_stream(history, max_tokens=50)
            answer = "".join(stream)
            first_peers.append(stream.peer_url)
            follow_ups.append([*history, {"role": "assistant", "content": answer}, {"role": "user", "content": "more"}])
            follow_up = client.chat_stream(follow_ups[-1], max_tokens=50)
            assert "".join(follow_up)
            next_peers.append(follow_up.peer_url)
        assert next_peers == first_peers
        assert set(first_peers) == {worker.url for worker in workers}  # the first turns went to both
        # A conversation whose peer is gone moves on to the other one.
        gone, survivor = workers
        gone.kill()
        stream = client.chat_stream(follow_ups[first_peers.index(gone.url)], max_tokens=50)
        assert "".join(stream)
        assert stream.peer_url == survivor.url


def test_killed_worker_leaves_the_peer_list_within_the_record_lifetime(cluster: Cluster) -> None:
    lifetime = 3.0
    stays = cluster.spawn("story", lifetime_s=lifetime)
    killed = cluster.spawn("story", lifetime_s=lifetime)
    with cluster.client() as client:
        cluster.wait_for(client, 2)
        killed.kill()  # SIGKILL: no withdrawal is sent
        # Every record it announced was issued before now, so all have expired once the clock passes
        # now + lifetime: from then on no lookup may list it, however slow this machine is.
        expired_at = time.time() + lifetime
        while time.time() <= expired_at:
            time.sleep(0.1)
        assert [r.endpoints[0] for r in client.peers(fresh=True)] == [stays.url], "the dead worker is still listed"
        # The survivor keeps refreshing, so it stays listed past its records' lifetime.
        time.sleep(lifetime)
        assert [r.endpoints[0] for r in client.peers(fresh=True)] == [stays.url]


def test_client_cli_notes_the_switch_on_stderr(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    dying = cluster.spawn("dying")
    cluster.spawn("story")

    class PreferDying(RoutedClient):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, chooser=prefer(dying.url), **kwargs)
            cluster.wait_for(self, 2)

    monkeypatch.setattr(cli, "RoutedClient", PreferDying)
    out, err = io.StringIO(), io.StringIO()
    argv = [
        "hi",
        "--bootstrap",
        f"127.0.0.1:{cluster.boot.port}",
        "--network-id",
        str(cluster.net),
        "--sha256",
        FAKE_SHA,
    ]
    assert cli.main([*argv, "--max-tokens", "400"], out, err) == 0, err.getvalue()
    assert out.getvalue() == STORY + "\n"
    assert f"[peer {dying.url} failed before the first token" in err.getvalue()
