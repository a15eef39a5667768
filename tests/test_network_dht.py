"""Real OpenDHT nodes and real uvicorn workers on 127.0.0.1: discovery, choice, trust, withdrawal."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from peerinfer.__main__ import main as peerinfer_main
from peerinfer.client.cli import main as client_main
from peerinfer.client.routed import RoutedClient
from peerinfer.client.routing import Probe
from peerinfer.engine.fake import FakeEngine
from peerinfer.network.dht import DhtNode
from peerinfer.network.identity import PeerIdentity, b64
from peerinfer.network.records import DIRECTORY_KEY, model_key, sign_record
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
HELLO = [{"role": "user", "content": "hello"}]


@dataclasses.dataclass
class Net:
    boot: DhtNode
    net: int
    workers: list[ThreadWorker]

    def client(self, **options: object) -> RoutedClient:
        return RoutedClient(f"127.0.0.1:{self.boot.port}", network_id=self.net, **options)  # type: ignore[arg-type]

    def add_worker(self, home: Path, **overrides: object) -> ThreadWorker:
        engine = FakeEngine(story_responder, token_delay_s=0.002, slots=2, max_queue=8)
        worker = ThreadWorker(engine, lambda url: net_settings(home, self.boot, self.net, url, **overrides))
        self.workers.append(worker)
        return worker


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    ident = network_id()
    with bootstrap_node(ident) as boot:
        network = Net(boot, ident, [])
        try:
            yield network
        finally:
            for worker in network.workers:
                worker.stop()


@pytest.fixture
def three(net: Net, tmp_path: Path) -> Net:
    for index in range(3):
        net.add_worker(tmp_path / f"home{index}")
    return net


def test_client_discovers_all_three_workers(three: Net) -> None:
    with three.client() as client:
        lookup = client.discovery.lookup(FAKE_SHA, min_peers=3)
        assert {record.endpoints[0] for record in lookup.records} == {worker.url for worker in three.workers}
        assert {record.peer_id for record in lookup.records} == {worker.peer_id for worker in three.workers}
        # Naming neither sha256 nor model finds the model most peers serve; naming the model works too.
        assert client.discovery.lookup(min_peers=3).sha256 == FAKE_SHA
        assert len(client.discovery.lookup(name="fake-model", min_peers=3).records) == 3


def test_concurrent_requests_spread_over_workers(three: Net) -> None:
    with three.client(model_sha256=FAKE_SHA, rng=random.Random(5)) as client:
        client.discovery.lookup(FAKE_SHA, min_peers=3)

        def ask(_: int) -> tuple[str, str | None]:
            stream = client.chat_stream(HELLO, max_tokens=400)
            return "".join(stream), stream.peer_url

        with ThreadPoolExecutor(max_workers=6) as pool:
            results = list(pool.map(ask, range(6)))
    assert all(text == STORY for text, _ in results)
    assert len({url for _, url in results}) >= 2


def test_forged_records_are_ignored_and_counted(net: Net, tmp_path: Path) -> None:
    real = net.add_worker(tmp_path / "real")
    forger, victim = PeerIdentity.generate(), PeerIdentity.generate()
    now = time.time()
    fresh = make_record(forger, sha256=FAKE_SHA, endpoints=("http://127.0.0.1:9",), issued_at=now, expires_at=now + 30)
    signed = json.loads(sign_record(fresh, forger))
    tampered = dict(signed, record={**signed["record"], "slots_free": 0})
    swapped = sign_record(dataclasses.replace(fresh, public_key=b64(victim.public_key)), forger)
    expired = sign_record(dataclasses.replace(fresh, issued_at=time.time() - 100, expires_at=time.time() - 50), forger)
    oversized = sign_record(dataclasses.replace(fresh, model="m" * 2000), forger)
    for data in (json.dumps(tampered).encode(), swapped, expired, oversized):
        net.boot.put(model_key(FAKE_SHA), data)
    with net.client(model_sha256=FAKE_SHA) as client:
        lookup = None
        for _ in range(50):
            lookup = client.discovery.lookup(FAKE_SHA)
            if sum(lookup.rejected.values()) >= 4:
                break
            time.sleep(0.1)
        assert lookup is not None
        assert [record.peer_id for record in lookup.records] == [real.peer_id]
        assert lookup.rejected == Counter({"bad_signature": 1, "id_mismatch": 1, "expired": 1, "too_large": 1})


def test_endpoint_that_cannot_sign_the_nonce_is_not_used(net: Net, tmp_path: Path) -> None:
    honest = net.add_worker(tmp_path / "honest")
    decoy = net.add_worker(tmp_path / "decoy")
    # A validly signed record whose endpoint is someone else's server: that server cannot sign with this key.
    impostor = PeerIdentity.generate()
    forged = make_record(
        impostor, sha256=FAKE_SHA, endpoints=(decoy.url,), issued_at=time.time(), expires_at=time.time() + 30
    )
    net.boot.put(model_key(FAKE_SHA), sign_record(forged, impostor))

    def prefer_impostor(probes: Sequence[Probe], rng: random.Random) -> Probe:
        return next((p for p in probes if p.peer_id == impostor.peer_id), probes[0])

    with net.client(model_sha256=FAKE_SHA, chooser=prefer_impostor, probe_count=5) as client:
        for _ in range(50):
            if impostor.peer_id in {r.peer_id for r in client.peers(fresh=True)}:
                break
            time.sleep(0.1)
        stream = client.chat_stream(HELLO, max_tokens=400)
        assert "".join(stream) == STORY
        assert stream.peer_url in (honest.url, decoy.url)
        assert client.bans.is_banned(impostor.peer_id, time.monotonic())
        assert not client.proven(forged)


def test_graceful_stop_withdraws_the_record_at_once(net: Net, tmp_path: Path) -> None:
    stays = net.add_worker(tmp_path / "a")
    leaves = net.add_worker(tmp_path / "b")  # records live 30 s; only the withdrawal can remove it sooner
    with net.client() as client:
        assert len(client.discovery.lookup(FAKE_SHA, min_peers=2).records) == 2
        leaves.stop()
        net.workers.remove(leaves)
        # Its last record was issued before the stop, so it is live until at least stop + 30 s - 1 s
        # (one refresh): a listing without it before then is the withdrawal's doing, not expiry's.
        live_until = time.time() + 30.0 - 1.0
        while {r.peer_id for r in client.discovery.lookup(FAKE_SHA).records} != {stays.peer_id}:
            assert time.time() < live_until, "the withdrawn record stayed listed until its records expired"
            time.sleep(0.1)


def test_duplicate_peer_id_is_logged(net: Net, tmp_path: Path) -> None:
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("peerinfer.network.worker")
    logger.addHandler(handler)
    try:
        first = net.add_worker(tmp_path / "shared")
        second = net.add_worker(tmp_path / "shared")  # a copied home folder: the same key
        assert first.peer_id == second.peer_id
        deadline = time.monotonic() + 15
        while not any("also announced by another live worker" in m for m in messages):
            assert time.monotonic() < deadline, "the clash was not logged"
            time.sleep(0.1)
    finally:
        logger.removeHandler(handler)


def test_peers_command_and_client_cli_with_bootstrap(three: Net) -> None:
    bootstrap = f"127.0.0.1:{three.boot.port}"
    env_net = str(three.net)
    out, err = io.StringIO(), io.StringIO()
    base = ["peers", "--bootstrap", bootstrap, "--network-id", env_net, "--min-peers", "3"]
    code = peerinfer_main([*base, "--json"], out, err)
    assert code == 0, err.getvalue()
    listed = json.loads(out.getvalue())
    assert {peer["endpoint"] for peer in listed} == {worker.url for worker in three.workers}
    assert all(peer["model"] == "fake-model" and peer["rtt_ms"] is not None for peer in listed)
    assert {"id", "endpoint", "model", "sha256", "slots_free", "slots_total", "tokens_per_s", "age_s"} <= set(listed[0])

    table = io.StringIO()
    assert peerinfer_main(base, table, err) == 0
    assert table.getvalue().splitlines()[0].split()[:4] == ["ID", "ENDPOINT", "PATH", "MODEL"]
    assert len(table.getvalue().splitlines()) == 4
    assert all(peer["path"] == "direct" for peer in listed)  # reached by their http:// URLs on loopback

    out, err = io.StringIO(), io.StringIO()
    argv = ["hello", "--bootstrap", bootstrap, "--network-id", env_net, "--max-tokens", "400", "--temperature", "0"]
    assert client_main(argv, out, err) == 0, err.getvalue()
    assert out.getvalue() == STORY + "\n"


def test_no_peers_is_one_line_error(net: Net) -> None:
    err = io.StringIO()
    argv = ["hi", "--bootstrap", f"127.0.0.1:{net.boot.port}", "--network-id", str(net.net), "--discovery-timeout", "1"]
    with contextlib.redirect_stderr(err):
        assert client_main(argv, io.StringIO(), err) == 1
    assert err.getvalue().startswith("error: no usable peer")


def test_worker_keeps_announcing_through_garbage_values_and_failing_puts(net: Net, tmp_path: Path) -> None:
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("peerinfer.network.worker")
    logger.addHandler(handler)
    try:
        worker = net.add_worker(tmp_path / "w", record_lifetime_s=2.0, record_refresh_s=0.4)
        network = worker.app.state.network
        with net.client() as client:
            assert [r.peer_id for r in client.discovery.lookup(FAKE_SHA).records] == [worker.peer_id]
            # Values that made every reader raise: the worker's own clash check read them and its
            # announcer died, so its record expired while its HTTP side stayed healthy.
            huge = json.loads(
                sign_record(make_record(PeerIdentity.generate(), sha256=FAKE_SHA), PeerIdentity.generate())
            )
            huge["record"]["tokens_per_s"] = 10**400
            for garbage in (b"[" * 2000, json.dumps(huge).encode()):
                net.boot.put(model_key(FAKE_SHA), garbage)
            wait_until(lambda: b"[" * 2000 in net.boot.get(model_key(FAKE_SHA), 2.0), 10, "the garbage was not stored")
            seen = time.time() + 2.0  # several clash checks (every 0.4 s) later
            wait_until(lambda: _announced_after(client, worker.peer_id, seen), 20, "the worker stopped announcing")

            # A put that raises (the DHT node in trouble) is logged and retried, not fatal.
            real_put, calls = network.node.put, []

            def failing_put(key: str, data: bytes) -> None:
                calls.append(key)
                raise RuntimeError("the DHT node is in trouble")

            network.node.put = failing_put
            wait_until(lambda: len(calls) >= 3, 20, "the announcer stopped after a failed put")
            network.node.put = real_put
            recovered = time.time()
            wait_until(
                lambda: _announced_after(client, worker.peer_id, recovered), 20, "no announcement after recovery"
            )
        assert any("announcing the record failed (RuntimeError: the DHT node is in trouble" in m for m in messages)
    finally:
        logger.removeHandler(handler)


def _announced_after(client: RoutedClient, peer_id: str, when: float) -> bool:
    return any(r.peer_id == peer_id and r.issued_at > when for r in client.discovery.lookup(FAKE_SHA).records)


def test_peers_shows_which_peers_proved_their_key(net: Net, tmp_path: Path) -> None:
    real = net.add_worker(tmp_path / "real")
    # A validly signed record that claims the real worker's endpoint under another key.
    impostor = PeerIdentity.generate()
    now = time.time()
    forged = make_record(impostor, sha256=FAKE_SHA, endpoints=(real.url,), issued_at=now, expires_at=now + 30)
    net.boot.put(model_key(FAKE_SHA), sign_record(forged, impostor))
    base = ["peers", "--bootstrap", f"127.0.0.1:{net.boot.port}", "--network-id", str(net.net), "--sha256", FAKE_SHA]
    out, err = io.StringIO(), io.StringIO()
    assert peerinfer_main([*base, "--min-peers", "2", "--json"], out, err) == 0, err.getvalue()
    listed = {peer["id"]: peer for peer in json.loads(out.getvalue())}
    assert listed[real.peer_id]["verified"] is True and listed[real.peer_id]["failure"] is None
    assert listed[impostor.peer_id]["verified"] is False and listed[impostor.peer_id]["failure"] == "bad_challenge"
    assert listed[impostor.peer_id]["endpoint"] == real.url and listed[impostor.peer_id]["rtt_ms"] is not None
    assert "1 listed peers did not prove" in err.getvalue()

    table = io.StringIO()
    assert peerinfer_main([*base, "--min-peers", "2"], table, io.StringIO()) == 0
    header, *rows = table.getvalue().splitlines()
    assert header.split()[6] == "VERIFIED"
    assert sorted(row.split()[6] for row in rows) == ["no", "yes"]


def test_a_get_reads_a_bounded_number_of_bounded_values(net: Net) -> None:
    key = model_key(FAKE_SHA)
    node = DhtNode(host="127.0.0.1", port=0, network_id=net.net, bootstrap=[("127.0.0.1", net.boot.port)])
    try:
        for number in range(30):
            net.boot.put(key, b"%d" % number + b"x" * (10_000 if number == 0 else 10))
        wait_until(lambda: len(node.get(key, 2.0)) == 30, 15, "the 30 values were not found")
        assert max(len(value) for value in node.get(key, 2.0)) == 4097  # a 10 KB value is cut, not kept
        capped = node.get(key, 2.0, max_values=10)
        assert len(capped) == 10 and capped.skipped >= 1
    finally:
        node.close()


def test_peers_and_the_client_cli_read_past_values_that_crashed_them(net: Net, tmp_path: Path) -> None:
    net.add_worker(tmp_path / "w")
    huge = json.loads(sign_record(make_record(PeerIdentity.generate(), sha256=FAKE_SHA), PeerIdentity.generate()))
    huge["record"]["tokens_per_s"] = 10**400
    for garbage in (b"[" * 2000, json.dumps(huge).encode()):
        net.boot.put(model_key(FAKE_SHA), garbage)
        net.boot.put(DIRECTORY_KEY, garbage)
    wait_until(lambda: b"[" * 2000 in net.boot.get(DIRECTORY_KEY, 2.0), 10, "the garbage was not stored")
    bootstrap = ["--bootstrap", f"127.0.0.1:{net.boot.port}", "--network-id", str(net.net)]
    out, err = io.StringIO(), io.StringIO()
    assert peerinfer_main(["peers", *bootstrap, "--json"], out, err) == 0, err.getvalue()
    assert len(json.loads(out.getvalue())) == 1 and "malformed" in err.getvalue()
    out, err = io.StringIO(), io.StringIO()
    assert client_main(["hello", *bootstrap, "--max-tokens", "400"], out, err) == 0, err.getvalue()
    assert out.getvalue() == STORY + "\n"
