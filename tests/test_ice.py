"""ICE paths on loopback, with real DHT nodes, real aiortc and real workers: what users and attackers see.

A worker whose record lists an http:// URL that nobody can connect to, and its ``ice://`` endpoint,
is reached by ``RoutedClient`` through ICE (offer and signed answer on the DHT, DTLS, data
channels). The attackers' tests put forged answers and junk offers on the DHT, crowd a worker's
ICE sessions, and kill a worker with -9 under an open path. The NAT cases are in
``tests/test_nat_traversal.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from peerinfer.client.peer_http import PeerRejected
from peerinfer.client.routed import RoutedClient
from peerinfer.client.tunnels import IceEndpoints, IceOptions
from peerinfer.engine.fake import FakeEngine
from peerinfer.network.dht import DhtNode
from peerinfer.network.ice import IceDialer, IceFailed, IceService
from peerinfer.network.identity import PeerIdentity, load_or_create_identity
from peerinfer.network.records import ice_endpoint
from peerinfer.network.signalling import Offer, ice_key, make_answer
from tests.network_support import REPO, STORY, ThreadWorker, bootstrap_node, net_settings, network_id, story_responder


def _closed_port() -> int:
    """A loopback port nothing listens on: the direct URL of a worker behind NAT, as far as a client can tell."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def net() -> int:
    return network_id()


@pytest.fixture
def boot(net: int) -> Iterator[DhtNode]:
    with bootstrap_node(net) as node:
        yield node


def _ice_worker(tmp_path: Path, boot: DhtNode, net: int, **overrides: object) -> ThreadWorker:
    dead = f"http://127.0.0.1:{_closed_port()}"

    def settings(url: str) -> object:
        target = url.removeprefix("http://")
        return net_settings(tmp_path / secrets.token_hex(4), boot, net, dead, ice_target=target, **overrides)

    return ThreadWorker(FakeEngine(story_responder, slots=4), settings)  # type: ignore[arg-type]


def test_a_worker_nobody_can_connect_to_answers_through_its_ice_endpoint(
    tmp_path: Path, boot: DhtNode, net: int
) -> None:
    worker = _ice_worker(tmp_path, boot, net)
    client = RoutedClient(f"127.0.0.1:{boot.port}", network_id=net, ice=IceOptions())
    try:
        stream = client.chat_stream([{"role": "user", "content": "Tell me the story."}], max_tokens=200)
        text = "".join(stream)
        assert text == STORY
        views = {view.peer_id: view for view in client._loop.run(client.router.views())}
        view = views[worker.peer_id]
        assert view.url == ice_endpoint(worker.peer_id)
        assert view.path == "direct"  # loopback: host candidates on both sides
        assert view.verified
        second = "".join(client.chat_stream([{"role": "user", "content": "Again."}], max_tokens=200))
        assert second == STORY
    finally:
        client.close()
        worker.stop()


def test_ice_off_in_the_client_means_the_worker_is_reported_unreachable(
    tmp_path: Path, boot: DhtNode, net: int
) -> None:
    worker = _ice_worker(tmp_path, boot, net)
    client = RoutedClient(f"127.0.0.1:{boot.port}", network_id=net, ice=IceOptions(enabled=False), choose_timeout_s=2.0)
    try:
        with pytest.raises(Exception, match="no usable peer"):
            "".join(client.chat_stream([{"role": "user", "content": "Hi"}], max_tokens=20))
        assert client.router.failures["unreachable"] >= 1
    finally:
        client.close()
        worker.stop()


# --- the attackers ------------------------------------------------------------------------------


async def _echo_server() -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1])


async def _through(tunnel_url: str, payload: bytes) -> bytes:
    host, port = tunnel_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(payload)
    await writer.drain()
    received = b""
    async with asyncio.timeout(20):
        while len(received) < len(payload):
            received += await reader.read(65536)
    writer.close()
    return received


def _node(boot: DhtNode, net: int) -> DhtNode:
    return DhtNode(host="127.0.0.1", port=0, network_id=net, bootstrap=[("127.0.0.1", boot.port)])


def test_forged_answers_are_skipped_and_the_signed_one_is_used(boot: DhtNode, net: int) -> None:
    worker_node, client_node, forger_node = _node(boot, net), _node(boot, net), _node(boot, net)
    identity, impostor = PeerIdentity.generate(), PeerIdentity.generate()

    class Forging:
        """The client's signalling, with an attacker who answers every offer first, signed by another key."""

        def put(self, key: str, data: bytes) -> None:
            offer = json.loads(data)
            if offer.get("kind") == "ice-offer":
                forged = Offer(offer["session"], offer["sdp"], offer["relay"], offer["issued_at"])
                forger_node.put(
                    key,
                    make_answer(forged, impostor, time.time(), sdp=offer["sdp"], refused=None),
                )
            client_node.put(key, data)

        def listen(self, key: str, on_value: object) -> object:
            return client_node.listen(key, on_value)  # type: ignore[arg-type]

    junk = b"{" * 3000

    def junk_stored() -> None:
        """Junk waits under the worker's key before any offer, so the client reads it before the answer.

        Put next to the offer it raced the worker's answer, and a loaded machine sometimes finished
        the path before the junk arrived (seen in CI), which proved nothing about the junk."""
        forger_node.put(ice_key(identity.peer_id), junk)
        deadline = time.monotonic() + 30.0
        while junk not in client_node.get(ice_key(identity.peer_id), timeout_s=2.0):
            assert time.monotonic() < deadline, "the junk value never became readable on the DHT"

    async def scenario() -> tuple[bytes, dict[str, int]]:
        await asyncio.to_thread(junk_stored)
        server, port = await _echo_server()
        service = IceService(identity=identity, signalling=worker_node, target=("127.0.0.1", port))
        service.start()
        dialer = IceDialer(Forging())
        try:
            tunnel = await dialer.tunnel(identity.peer_id)
            return await _through(tunnel.base_url, b"x" * 200_000), dict(dialer.rejected)
        finally:
            await dialer.aclose()
            await service.close()
            server.close()

    try:
        echoed, rejected = asyncio.run(scenario())
    finally:
        for node in (worker_node, client_node, forger_node):
            node.close()
    assert echoed == b"x" * 200_000
    assert rejected.get("wrong_peer", 0) + rejected.get("bad_signature", 0) >= 1
    assert rejected.get("malformed", 0) + rejected.get("too_large", 0) >= 1


def test_with_only_forged_answers_the_path_fails_within_its_time_limit(boot: DhtNode, net: int) -> None:
    client_node = _node(boot, net)
    impostor, victim = PeerIdentity.generate(), PeerIdentity.generate()

    class OnlyForgeries:
        def put(self, key: str, data: bytes) -> None:
            offer = json.loads(data)
            forged = Offer(offer["session"], offer["sdp"], offer["relay"], offer["issued_at"])
            client_node.put(key, make_answer(forged, impostor, time.time(), sdp=forged.sdp, refused=None))

        def listen(self, key: str, on_value: object) -> object:
            return client_node.listen(key, on_value)  # type: ignore[arg-type]

    async def scenario() -> None:
        tunnels = IceEndpoints(OnlyForgeries(), direct_timeout_s=1.5, timeout_s=3.0)  # type: ignore[arg-type]
        try:
            await tunnels.origin(ice_endpoint(victim.peer_id))
        finally:
            await tunnels.aclose()

    try:
        with pytest.raises(PeerRejected) as caught:
            asyncio.run(asyncio.wait_for(scenario(), 30))
    finally:
        client_node.close()
    assert caught.value.reason == "unreachable"
    assert "no ICE path" in caught.value.detail


def test_junk_offers_and_a_crowd_of_sessions_do_not_stop_an_honest_client(boot: DhtNode, net: int) -> None:
    worker_node, client_node, crowd_node = _node(boot, net), _node(boot, net), _node(boot, net)
    identity = PeerIdentity.generate()
    key = ice_key(identity.peer_id)

    async def scenario() -> tuple[bytes, str, dict[str, int]]:
        server, port = await _echo_server()
        service = IceService(identity=identity, signalling=worker_node, target=("127.0.0.1", port), max_sessions=2)
        service.start()
        now = time.time()
        junk = [
            b"",
            b"not json",
            b"[" * 5000,
            json.dumps({"kind": "ice-offer"}).encode(),
            Offer("a" * 32, "v=0\r\n" + "a=candidate:x\r\n" * 40, False, now).encode(),  # too many candidates
            Offer("b" * 32, "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\n", False, now - 3600).encode(),  # stale: a replay
            Offer("c" * 32, "v=0\r\n\x00\x01", False, now).encode(),
        ]
        for value in junk:
            crowd_node.put(key, value)
        honest = IceDialer(client_node, timeout_s=10.0)
        try:
            first = await honest.tunnel(identity.peer_id)
            echoed = await _through(first.base_url, b"hello" * 1000)
            # Two more clients take the worker's two sessions; a third is refused, signed, at once.
            others = [IceDialer(_node(boot, net)) for _ in range(2)]
            try:
                await others[0].tunnel(identity.peer_id)
                with pytest.raises(IceFailed) as refused:
                    await others[1].tunnel(identity.peer_id)
            finally:
                for other in others:
                    await other.aclose()
                    other.signalling.close()  # type: ignore[attr-defined]
            return echoed, str(refused.value), dict(service.rejected)
        finally:
            await honest.aclose()
            await service.close()
            server.close()

    try:
        echoed, refusal, rejected = asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        for node in (worker_node, client_node, crowd_node):
            node.close()
    assert echoed == b"hello" * 1000
    assert "busy" in refusal
    assert rejected.get("malformed", 0) + rejected.get("too_large", 0) >= 3
    assert rejected.get("bad_sdp", 0) >= 2
    assert rejected.get("stale", 0) >= 1
    assert rejected.get("busy", 0) >= 1


def test_a_worker_killed_under_an_open_path_cuts_its_streams_within_the_heartbeat(
    tmp_path: Path, boot: DhtNode, net: int
) -> None:
    """Kill -9 leaves no goodbye: the client's heartbeat closes the path, and a stream on it ends in an error."""
    home = tmp_path / "worker"
    identity = load_or_create_identity(home)
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.test_ice", "serve", str(home), str(boot.port), str(net)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    client_node = _node(boot, net)

    async def scenario() -> tuple[bytes, str]:
        dialer = IceDialer(client_node)
        try:
            tunnel = await dialer.tunnel(identity.peer_id)
            host, port = tunnel.base_url.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"ping")
            first = await asyncio.wait_for(reader.read(100), 20)
            process.kill()
            async with asyncio.timeout(30):
                rest = await reader.read(100)  # EOF once the heartbeat gives up
            writer.close()
            return first + rest, "closed" if not tunnel.alive else "open"
        finally:
            await dialer.aclose()

    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
        received, state = asyncio.run(scenario())
    finally:
        process.kill()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()
        client_node.close()
    assert received == b"ping"
    assert state == "closed"


def _serve(home: str, boot_port: int, net: int) -> None:
    """A worker's ICE side alone (an echo server behind it), for the kill -9 test."""

    async def main() -> None:
        node = DhtNode(host="127.0.0.1", port=0, network_id=net, bootstrap=[("127.0.0.1", boot_port)])
        server, port = await _echo_server()
        service = IceService(
            identity=load_or_create_identity(Path(home)),
            signalling=node,
            target=("127.0.0.1", port),
        )
        service.start()
        print("ready", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


if __name__ == "__main__" and sys.argv[1] == "serve":
    _serve(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))


def test_only_listed_servers_are_used_and_the_relay_only_in_the_second_phase() -> None:
    from peerinfer.network.ice import rtc_configuration
    from peerinfer.network.ice_config import parse_ice_servers

    assert rtc_configuration((), relay=True).iceServers == []  # aiortc's default would ask a public STUN server
    servers = parse_ice_servers(
        '[{"urls": "turn:203.0.113.10:3478", "username": "u", "credential": "p"}, {"urls": "stun:198.51.100.7"}]'
    )
    first = rtc_configuration(servers, relay=False).iceServers
    assert [server.urls for server in first] == ["stun:203.0.113.10:3478"]  # the relay answers STUN too
    second = rtc_configuration(servers, relay=True).iceServers
    assert [(server.urls, server.username) for server in second] == [
        ("stun:203.0.113.10:3478", None),
        ("turn:203.0.113.10:3478", "u"),
    ]


def test_a_data_channel_neither_waits_for_a_slow_window_nor_fires_its_resend_timer_early() -> None:
    """The SCTP settings ice.py gives every path (a mobile link: 200 ms round trip, 1% loss)."""
    from types import SimpleNamespace

    from aiortc.rtcsctptransport import USERDATA_MAX_LENGTH, RTCSctpTransport

    import peerinfer.network.ice  # noqa: F401  # importing it tunes aiortc's SCTP

    async def check() -> None:
        sctp = RTCSctpTransport(SimpleNamespace(state="new"))  # type: ignore[arg-type]
        assert sctp._cwnd == 10 * USERDATA_MAX_LENGTH  # 12 tokens in flight go out at once, not 3 packets
        assert sctp._rto == 1.0  # a first request with a lost packet waits 1 s, not 3
        for _ in range(100):
            sctp._update_rto(0.2)  # a steady round trip: RTTVAR falls to nothing
        steady = sctp._rto
        assert steady == pytest.approx(0.4, abs=0.01)  # never just above the round trip itself
        sctp._update_rto(0.05)
        assert 0.2 < sctp._rto < 1.0  # a faster link gets a faster resend than SCTP's 1 s floor
        sctp._rto = steady
        sctp._t3_expired()
        assert sctp._rto == pytest.approx(2 * steady)  # an expiry backs off, so a stalled path is not hammered
        sctp._t3_expired()
        assert sctp._rto == pytest.approx(4 * steady)
        sctp._update_rto(0.2)
        assert sctp._rto == pytest.approx(steady, abs=0.05)  # and a new sample brings it back
        await asyncio.sleep(0)

    asyncio.run(check())


class _Wire:
    """What an SCTP association hands its DTLS transport, parsed back into chunks."""

    state = "new"

    def __init__(self) -> None:
        self.chunks: list[Any] = []

    async def _send_data(self, data: bytes) -> None:
        from aiortc.rtcsctptransport import parse_packet

        self.chunks.extend(parse_packet(data)[3])

    def sacks(self) -> list[tuple[int, list[tuple[int, int]], list[int]]]:
        from aiortc.rtcsctptransport import SackChunk

        return [(c.cumulative_tsn, list(c.gaps), list(c.duplicates)) for c in self.chunks if isinstance(c, SackChunk)]

    def data(self) -> int:
        from aiortc.rtcsctptransport import DataChunk

        return sum(isinstance(c, DataChunk) for c in self.chunks)


def _association(wire: _Wire) -> Any:
    from aiortc.rtcsctptransport import RTCSctpTransport

    import peerinfer.network.ice  # noqa: F401  # importing it tunes aiortc's SCTP

    sctp = RTCSctpTransport(wire)  # type: ignore[arg-type]
    sctp._association_state = RTCSctpTransport.State.ESTABLISHED
    sctp._remote_verification_tag, sctp._remote_port = 7, 5000
    sctp._last_received_tsn = 99
    return sctp


def _packet(sctp: Any, tsn: int) -> bytes:
    from aiortc.rtcsctptransport import SCTP_DATA_FIRST_FRAG, SCTP_DATA_LAST_FRAG, DataChunk, serialize_packet

    chunk = DataChunk(flags=SCTP_DATA_FIRST_FRAG | SCTP_DATA_LAST_FRAG)
    chunk.tsn, chunk.stream_id, chunk.stream_seq, chunk.protocol = tsn, 1, tsn - 100, 51
    chunk.user_data = b"token"
    return serialize_packet(5000, 5000, sctp._local_verification_tag, chunk)


def test_a_receiver_acknowledges_every_second_packet_but_reports_loss_at_once() -> None:
    """One SACK per token was a datagram per token for the relay and both ends: half of them go."""
    from peerinfer.network.ice import SACK_DELAY_S

    async def check() -> None:
        wire = _Wire()
        sctp = _association(wire)
        await sctp._handle_data(_packet(sctp, 100))
        assert wire.sacks() == []  # a first packet waits for a second
        await sctp._handle_data(_packet(sctp, 101))
        assert wire.sacks() == [(101, [], [])]  # which is acknowledged with it
        await sctp._handle_data(_packet(sctp, 102))
        assert wire.sacks() == [(101, [], [])]
        await asyncio.sleep(SACK_DELAY_S * 3)
        assert wire.sacks()[-1] == (102, [], [])  # a lone last packet is acknowledged after the delay
        await sctp._handle_data(_packet(sctp, 104))  # 103 is lost
        assert wire.sacks()[-1] == (102, [(2, 2)], [])  # the gap is reported at once: fast retransmit
        await sctp._handle_data(_packet(sctp, 105))
        assert wire.sacks()[-1] == (102, [(2, 3)], [])  # and again with each packet while it lasts
        await sctp._handle_data(_packet(sctp, 103))
        assert wire.sacks()[-1] == (105, [], [])  # its filling too, so the sender stops resending
        await sctp._handle_data(_packet(sctp, 101))
        assert wire.sacks()[-1] == (105, [], [101])  # a duplicate (a resend that was not needed) too
        count = len(wire.sacks())
        await sctp._handle_data(_packet(sctp, 106))
        sctp._association_state = type(sctp).State.CLOSED
        await asyncio.sleep(SACK_DELAY_S * 3)
        assert len(wire.sacks()) == count  # a closed association's pending SACK is dropped, not sent

    asyncio.run(check())


def test_a_window_left_at_one_packet_by_a_lost_heartbeat_opens_again_after_an_idle_spell() -> None:
    """After a timer expiry the window is one packet, and it grows only while full: a path that then
    carried nothing but heartbeats started its next answer a round trip per 4 tokens."""
    from aiortc.rtcsctptransport import USERDATA_MAX_LENGTH, SackChunk

    async def check() -> None:
        wire = _Wire()
        sctp = _association(wire)
        sctp._rto = 0.05
        await sctp._send(stream_id=1, pp_id=51, user_data=b"heartbeat")
        sctp._t3_cancel()
        sctp._t3_expired()  # the heartbeat was lost
        await asyncio.sleep(0)
        assert sctp._cwnd == USERDATA_MAX_LENGTH
        sack = SackChunk()
        sack.cumulative_tsn, sack.advertised_rwnd = sctp._sent_queue[-1].tsn, 1 << 20
        await sctp._receive_sack_chunk(sack)  # its resend arrives; nothing is in flight now
        sent = wire.data()
        for _ in range(16):
            await sctp._send(stream_id=1, pp_id=51, user_data=b"x" * 300)
        assert wire.data() - sent == 4  # used again at once: still one packet's worth (busy, not idle)
        while sctp._sent_queue:  # all of them acknowledged, then nothing more to send
            sack.cumulative_tsn = sctp._sent_queue[-1].tsn
            await sctp._receive_sack_chunk(sack)
        sctp._cwnd, sctp._rto = USERDATA_MAX_LENGTH, 0.05  # as the lost heartbeat left it
        await asyncio.sleep(sctp._rto * 3)  # idle for more than a timeout
        sent = wire.data()
        for _ in range(16):
            await sctp._send(stream_id=1, pp_id=51, user_data=b"x" * 300)
        assert wire.data() - sent == 16  # 4 packets' worth go out at once
        assert sctp._cwnd == 4 * USERDATA_MAX_LENGTH

    asyncio.run(check())
