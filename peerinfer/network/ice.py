"""The one module that imports aiortc: ICE paths between clients and workers, with HTTP carried over them.

A worker that cannot be reached directly lists ``ice://<peer id>`` in its record. A client opens
such an endpoint with an ``IceDialer``: an offer on the DHT (``network.signalling``), the worker's
signed answer, ICE connectivity checks (host, server-reflexive and, only as a last resort, relay
candidates), then DTLS to the certificate the signed answer names, and SCTP data channels on top:
the same stack as a browser's WebRTC data channel. The path is then an ``IceTunnel``: a TCP
listener on the client's loopback whose every connection is one data channel, which the worker's
``IceService`` joins to a TCP connection to its own HTTP server. HTTP, SSE, keep-alives and errors
cross unchanged; only bytes are carried.

Choices, each for a reason:

- **Direct first, relay last.** aioice keeps the first pair that succeeds, which can be a relay
  pair when a direct one also works. So a path is opened in two phases: without any relay
  candidate (the worker is told not to gather them either), with ``direct_timeout_s`` for the checks
  once the answer is in, and only then with the relay. ``IceTunnel.path`` says what the checks
  found: ``direct`` (host to host), ``hole-punched`` (a server-reflexive or peer-reflexive
  candidate), ``relayed`` (TURN).
- **Only the listed servers.** aiortc asks a public STUN server when given none; here the
  configuration is always explicit (``PEERINFER_ICE_SERVERS``), and a TURN server is also used as a
  STUN server in the first phase (every TURN server answers binding requests).
- **A heartbeat, not ICE consent, says a path is dead.** aioice gives up after 6 missed consent
  checks 5 s apart; a worker killed with -9 would hold a client for 30 s. The client pings on a
  control channel every ``HEARTBEAT_S`` and closes the tunnel, and with it every connection on it,
  after ``DEAD_AFTER_S`` of silence, so the routed client fails over or resumes as after any cut.
- **Bounded.** A worker holds at most ``max_sessions`` paths and sets up at most
  ``MAX_STARTING`` at once; a channel buffers at most ``MAX_PENDING_BYTES`` its TCP side has not
  taken; a session that stops pinging is closed after ``IDLE_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
    rtcsctptransport,
)

from peerinfer.network.ice_config import IceServer
from peerinfer.network.identity import PeerIdentity
from peerinfer.network.signalling import (
    Answer,
    Offer,
    SignalRejected,
    check_sdp,
    ice_key,
    make_answer,
    read_answer,
    read_offer,
)

log = logging.getLogger(__name__)
# SCTP resends a lost packet after its retransmission timeout, 3 s until a round trip is measured:
# one packet lost on a new path (1% on a mobile link, or during ICE's last checks) stalled the first
# request for 3 s. 1 s, SCTP's own floor, is what browsers' data channels start with too.
rtcsctptransport.SCTP_RTO_INITIAL = 1.0
# Once a round trip is measured SCTP's timeout is SRTT + 4 RTTVAR with a 1 s floor: a lost last
# token (nothing follows it to trigger a fast retransmit) stalled the answer's end for 1 s on a
# 1%-loss link. A plain 200 ms floor was worse on a steady 200 ms mobile round trip: RTTVAR shrinks
# to nothing, the timer fires just before the SACK arrives, and each spurious expiry drops the window
# to one packet. So the variance term gets the floor instead, as Linux does for TCP:
# RTO = SRTT + max(4 RTTVAR, 200 ms), and an expiry doubles it until a new sample (RFC 9260 6.3.3),
# which aiortc leaves out.
RTO_VAR_FLOOR_S = 0.2
# SCTP counts its congestion window in bytes and starts it at 3 full packets, but an answer is one
# small message per token: at 60 tokens/s over a 200 ms mobile round trip 12 are in flight, more
# than that window lets out, so tokens queued and each took 20 ms instead of 16. Start at 10
# packets, as Linux TCP (RFC 6928) and browsers' SCTP do.
INITIAL_CWND_PACKETS = 10
# aiortc acknowledges every packet at once: one SACK per token, each a datagram the relay forwards
# and both ends encrypt, decrypt and parse. A receiver acknowledges every second packet instead, or
# SACK_DELAY_S after a lone one, and at once whenever something is missing, duplicated or just
# filled in, so that loss is still reported without delay (RFC 9260 6.2, as TCP's delayed ACK).
SACK_DELAY_S = 0.05
# A window that has not been used for a retransmission timeout keeps what it was. After one lost
# heartbeat (nothing follows it, so its timer fires) that was a single packet, which then never grew,
# since a window grows only while it is full: the next answer's first tokens waited a round trip
# for each few. RFC 9260 7.2.1: after an idle RTO the window is max(cwnd / 2, 4 packets).
IDLE_CWND_PACKETS = 4
_Sctp = rtcsctptransport.RTCSctpTransport
_sctp_init = _Sctp.__init__
_sctp_t3_expired = _Sctp._t3_expired
_sctp_send_sack = _Sctp._send_sack
_sctp_transmit = _Sctp._transmit
_sctp_receive_sack = _Sctp._receive_sack_chunk


@dataclass
class _SctpExtra:
    """What the overrides below keep per association, beside aiortc's own fields."""

    unsacked: int = 0  # packets with DATA received since the last SACK
    gap_reported: bool = False  # the last SACK listed a gap
    sack_timer: asyncio.TimerHandle | None = None
    idle_since: float | None = None  # when the last outstanding chunk was acknowledged


_extra: weakref.WeakKeyDictionary[_Sctp, _SctpExtra] = weakref.WeakKeyDictionary()


def _sctp_init_wide(self: _Sctp, *args: object, **kwargs: object) -> None:
    _sctp_init(self, *args, **kwargs)  # type: ignore[arg-type]
    self._cwnd = INITIAL_CWND_PACKETS * rtcsctptransport.USERDATA_MAX_LENGTH
    _extra[self] = _SctpExtra()


def _sctp_update_rto(self: _Sctp, sample_s: float) -> None:
    if self._srtt is None or self._rttvar is None:
        self._srtt, self._rttvar = sample_s, sample_s / 2
    else:
        beta, alpha = rtcsctptransport.SCTP_RTO_BETA, rtcsctptransport.SCTP_RTO_ALPHA
        self._rttvar = (1 - beta) * self._rttvar + beta * abs(self._srtt - sample_s)
        self._srtt = (1 - alpha) * self._srtt + alpha * sample_s
    rto = self._srtt + max(4 * self._rttvar, RTO_VAR_FLOOR_S)
    self._rto = min(rto, rtcsctptransport.SCTP_RTO_MAX)


def _sctp_t3_backoff(self: _Sctp) -> None:
    self._rto = min(2 * self._rto, rtcsctptransport.SCTP_RTO_MAX)
    _sctp_t3_expired(self)


async def _sctp_sack_now(self: _Sctp) -> None:
    extra = _extra[self]
    if extra.sack_timer is not None:
        extra.sack_timer.cancel()
    extra.sack_timer, extra.unsacked, extra.gap_reported = None, 0, bool(self._sack_misordered)
    await _sctp_send_sack(self)


def _sctp_sack_due(self: _Sctp) -> None:
    _extra[self].sack_timer = None
    if self._sack_needed and self._association_state == _Sctp.State.ESTABLISHED:
        asyncio.ensure_future(_sctp_sack_now(self)).add_done_callback(_sctp_sack_sent)


def _sctp_sack_sent(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and (error := task.exception()) is not None:
        log.debug("a delayed SACK was not sent: %s", error)  # the path is closing; its heartbeat will say


async def _sctp_send_sack_delayed(self: _Sctp) -> None:
    """Called by aiortc after each packet with DATA in it: SACK now, or within SACK_DELAY_S."""
    extra = _extra[self]
    extra.unsacked += 1
    gap = bool(self._sack_misordered)
    if (
        gap
        or extra.gap_reported  # the gap it reported is filled (or moved): say so at once
        or self._sack_duplicates
        or extra.unsacked >= 2
        or self._association_state != _Sctp.State.ESTABLISHED
    ):
        await _sctp_sack_now(self)
    elif extra.sack_timer is None:
        extra.sack_timer = asyncio.get_running_loop().call_later(SACK_DELAY_S, _sctp_sack_due, self)


async def _sctp_receive_sack_noting_idle(self: _Sctp, chunk: rtcsctptransport.SackChunk) -> None:
    await _sctp_receive_sack(self, chunk)
    extra = _extra[self]
    if not self._sent_queue and extra.idle_since is None:
        extra.idle_since = time.monotonic()


async def _sctp_transmit_after_idle(self: _Sctp) -> None:
    extra = _extra[self]
    if self._outbound_queue and not self._sent_queue and extra.idle_since is not None:
        halvings = min(int((time.monotonic() - extra.idle_since) / self._rto), 32)  # hours idle: 32, not 9000
        floor = IDLE_CWND_PACKETS * rtcsctptransport.USERDATA_MAX_LENGTH
        self._cwnd = max(self._cwnd >> halvings, floor) if halvings else self._cwnd
        extra.idle_since = None
    await _sctp_transmit(self)


_Sctp.__init__ = _sctp_init_wide  # type: ignore[method-assign]
_Sctp._update_rto = _sctp_update_rto  # type: ignore[method-assign,assignment]
_Sctp._t3_expired = _sctp_t3_backoff  # type: ignore[method-assign]
_Sctp._send_sack = _sctp_send_sack_delayed  # type: ignore[method-assign]
_Sctp._receive_sack_chunk = _sctp_receive_sack_noting_idle  # type: ignore[method-assign]
_Sctp._transmit = _sctp_transmit_after_idle  # type: ignore[method-assign]
PathKind = Literal["direct", "hole-punched", "relayed"]
CONTROL_LABEL = "peerinfer-ctl"
HTTP_LABEL = "http"
HEARTBEAT_S = 1.0
DEAD_AFTER_S = 5.0
IDLE_S = 20.0
MAX_STARTING = 8
MAX_PENDING_BYTES = 4 * 1024 * 1024
HIGH_WATER_BYTES = 512 * 1024
READ_BYTES = 16 * 1024
MAX_SEEN_SESSIONS = 4096


class Listening(Protocol):
    def cancel(self) -> None: ...


class Signalling(Protocol):
    """What ICE needs from the DHT: put a value, and listen under a key (callbacks on any thread)."""

    def put(self, key: str, data: bytes) -> None: ...

    def listen(self, key: str, on_value: Callable[[bytes], None]) -> Listening: ...


class IceFailed(Exception):
    """No path could be opened; the message says what was tried. ``refused`` when the worker said no."""

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


def rtc_configuration(servers: Sequence[IceServer], relay: bool) -> RTCConfiguration:
    """aiortc's configuration for one phase: STUN (and TURN servers as STUN) always, TURN only if ``relay``."""
    stun: list[str] = []
    turn: list[RTCIceServer] = []
    for server in servers:
        for url in server.urls:
            scheme, _, rest = url.partition(":")
            if scheme == "stun":
                stun.append(url)
            elif scheme == "turn":
                stun.append("stun:" + rest.split("?")[0])
                if relay:
                    turn.append(RTCIceServer(urls=url, username=server.username, credential=server.credential))
            elif scheme == "turns" and relay:
                turn.append(RTCIceServer(urls=url, username=server.username, credential=server.credential))
    entries = ([RTCIceServer(urls=stun[0])] if stun else []) + turn[:1]
    return RTCConfiguration(iceServers=entries)


def has_relay(servers: Sequence[IceServer]) -> bool:
    return any(server.is_turn for server in servers)


def path_of(pc: RTCPeerConnection) -> PathKind | None:
    """What the connectivity checks chose: host to host, through a reflexive candidate, or a relay."""
    pair = selected_pair(pc)
    return pair[0] if pair is not None else None


def selected_pair(pc: RTCPeerConnection) -> tuple[PathKind, str] | None:
    """The chosen pair's kind and the far end's address (the relay's, for a relayed path)."""
    try:
        connection = pc.sctp.transport.transport._connection  # type: ignore[union-attr]
        pair = connection._nominated.get(1)
        if pair is None:
            return None
        local, remote = pair.local_candidate, pair.remote_candidate
        kinds = {local.type, remote.type}
    except AttributeError:  # aiortc's internals moved: the path still works, its kind is unknown
        return None
    if "relay" in kinds:
        return "relayed", str(remote.host)
    return ("direct" if kinds == {"host"} else "hole-punched"), str(remote.host)


def _lean_sdp(sdp: str) -> str:
    """``sdp`` with only the sha-256 fingerprint (the others only make the DHT value longer)."""
    lines = [
        line for line in sdp.split("\r\n") if not line.startswith(("a=fingerprint:sha-384", "a=fingerprint:sha-512"))
    ]
    return "\r\n".join(lines)


async def _opened(channel: RTCDataChannel) -> None:
    if channel.readyState == "open":
        return
    opened = asyncio.Event()
    channel.on("open", opened.set)
    channel.on("close", opened.set)
    await opened.wait()
    if channel.readyState != "open":
        raise IceFailed(f"the data channel {channel.label} closed before it opened")


class Inbox:
    """What arrives on a data channel, kept from the moment the channel exists.

    A handler added later would miss what came first: pyee drops events nobody listens to, and a
    client writes its request as soon as the channel opens, while the worker is still connecting
    to its own HTTP server (a request lost that way stalled the first probe on a new path).
    """

    def __init__(self, channel: RTCDataChannel) -> None:
        self.channel = channel
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.pending = 0
        channel.on("message", self._message)
        channel.on("close", lambda: self.queue.put_nowait(None))

    def _message(self, message: bytes | str) -> None:
        data = message if isinstance(message, bytes) else message.encode()
        self.pending += len(data)
        if self.pending > MAX_PENDING_BYTES:  # the far side sends faster than TCP takes: it is not HTTP
            self.channel.close()
            self.queue.put_nowait(None)
            return
        self.queue.put_nowait(data)


async def pipe(inbox: Inbox, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Carry bytes both ways between an open data channel and a TCP connection until either side ends."""
    channel = inbox.channel
    drained = asyncio.Event()
    channel.bufferedAmountLowThreshold = HIGH_WATER_BYTES // 2
    channel.on("bufferedamountlow", drained.set)

    async def to_tcp() -> None:
        while (data := await inbox.queue.get()) is not None:
            inbox.pending -= len(data)
            writer.write(data)
            await writer.drain()

    async def to_channel() -> None:
        while data := await reader.read(READ_BYTES):
            if channel.readyState != "open":
                return
            channel.send(data)
            if channel.bufferedAmount > HIGH_WATER_BYTES:
                drained.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(DEAD_AFTER_S * 2):
                        await drained.wait()

    tasks = [asyncio.create_task(to_tcp()), asyncio.create_task(to_channel())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        channel.close()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


# --- the client side ---------------------------------------------------------------------------


@dataclass
class TunnelStats:
    path: PathKind | None
    setup_s: float
    relay_tried: bool
    remote: str | None = None  # the far end of the chosen pair: an IPv6 address when the path is IPv6


class IceTunnel:
    """An open ICE path to one worker: ``base_url`` is a loopback HTTP origin that reaches it."""

    def __init__(self, pc: RTCPeerConnection, control: RTCDataChannel, peer_id: str, stats: TunnelStats) -> None:
        self.pc = pc
        self.peer_id = peer_id
        self.stats = stats
        self.base_url = ""
        self._control = control
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self._heard_at = time.monotonic()
        self._closed = asyncio.Event()
        self._heartbeat: asyncio.Task[None] | None = None
        self._channels = 0

    @property
    def path(self) -> PathKind | None:
        return self.stats.path

    @property
    def alive(self) -> bool:
        return not self._closed.is_set()

    async def start(self) -> None:
        self._control.on("message", self._heard)
        self._control.on("close", lambda: self._close_soon("the worker closed the path"))
        self.pc.on("connectionstatechange", self._state_changed)
        self._server = await asyncio.start_server(self._accepted, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"
        self._heartbeat = asyncio.create_task(self._beat())

    def _heard(self, message: bytes | str) -> None:
        self._heard_at = time.monotonic()

    def _state_changed(self) -> None:
        if self.pc.connectionState in ("failed", "closed"):
            self._close_soon(f"the ICE path is {self.pc.connectionState}")

    def _close_soon(self, why: str) -> None:
        if self.alive:
            log.info("ICE path to peer %s closed: %s", self.peer_id, why)
            asyncio.get_running_loop().create_task(self.close())

    async def _beat(self) -> None:
        while self.alive:
            await asyncio.sleep(HEARTBEAT_S)
            if time.monotonic() - self._heard_at > DEAD_AFTER_S:
                self._close_soon(f"no heartbeat for {DEAD_AFTER_S:g} s")
                return
            if self._control.readyState == "open":
                self._control.send("ping")

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.alive:
            writer.close()
            return
        self._connections.add(writer)
        try:
            self._channels += 1
            channel = self.pc.createDataChannel(f"{HTTP_LABEL}-{self._channels}")
            inbox = Inbox(channel)
            async with asyncio.timeout(DEAD_AFTER_S * 2):
                await _opened(channel)
            await pipe(inbox, reader, writer)
        except Exception as exc:  # the path died under this connection: the HTTP client sees it reset
            log.debug("a connection over the ICE path to %s ended: %s", self.peer_id, exc)
            writer.close()
        finally:
            self._connections.discard(writer)

    async def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        if self._server is not None:
            self._server.close()
        for writer in list(self._connections):  # their pipes end on EOF; cancelling them would log noise
            writer.close()
        if self._heartbeat is not None and self._heartbeat is not asyncio.current_task():
            self._heartbeat.cancel()
        with contextlib.suppress(Exception):
            await self.pc.close()


class IceDialer:
    """Opens and keeps ICE paths to workers, one per peer, shared by every request to it."""

    def __init__(
        self,
        signalling: Signalling,
        servers: Sequence[IceServer] = (),
        *,
        direct_timeout_s: float = 3.0,
        timeout_s: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.signalling = signalling
        self.servers = tuple(servers)
        self.direct_timeout_s = direct_timeout_s
        self.timeout_s = timeout_s
        self.clock = clock
        self.rejected: Counter[str] = Counter()
        self._tunnels: dict[str, IceTunnel] = {}
        self._opening: dict[str, asyncio.Task[IceTunnel]] = {}
        self._relay_said = False

    def tunnel_of(self, peer_id: str) -> IceTunnel | None:
        tunnel = self._tunnels.get(peer_id)
        return tunnel if tunnel is not None and tunnel.alive else None

    async def tunnel(self, peer_id: str) -> IceTunnel:
        """The open path to ``peer_id``, opened now if there is none; raises ``IceFailed``."""
        tunnel = self.tunnel_of(peer_id)
        if tunnel is not None:
            return tunnel
        task = self._opening.get(peer_id)
        if task is None:
            task = asyncio.create_task(self._open(peer_id))
            self._opening[peer_id] = task
            task.add_done_callback(lambda done: self._opening.pop(peer_id, None))
        return await asyncio.shield(task)

    async def _open(self, peer_id: str) -> IceTunnel:
        started = time.monotonic()
        phases = [False, True] if has_relay(self.servers) else [False]
        failures: list[str] = []
        for relay in phases:
            left = self.timeout_s - (time.monotonic() - started)
            # The direct phase's limit counts from the answer: a slow DHT must not use up the checks' time.
            checks_s = None if relay else self.direct_timeout_s
            try:
                async with asyncio.timeout(left):
                    pc, control = await self._attempt(peer_id, relay, checks_s)
            except TimeoutError:
                limit = f"{checks_s:.1f} s of checks" if checks_s is not None else f"{left:.1f} s"
                failures.append(f"{'through the relay' if relay else 'without a relay'}: no path in {limit}")
                continue
            except IceFailed as exc:
                if exc.refused:
                    raise
                failures.append(f"{'through the relay' if relay else 'without a relay'}: {exc}")
                continue
            pair = selected_pair(pc)
            stats = TunnelStats(pair[0] if pair else None, time.monotonic() - started, relay, pair[1] if pair else None)
            tunnel = IceTunnel(pc, control, peer_id, stats)
            await tunnel.start()
            self._tunnels[peer_id] = tunnel
            self._said(tunnel)
            return tunnel
        if not has_relay(self.servers):
            failures.append("no TURN relay is listed in PEERINFER_ICE_SERVERS")
        raise IceFailed(f"no ICE path to peer {peer_id}: " + "; ".join(failures))

    def _said(self, tunnel: IceTunnel) -> None:
        log.info(
            "ICE path to peer %s: %s (to %s), open in %.2f s",
            tunnel.peer_id,
            tunnel.path,
            tunnel.stats.remote,
            tunnel.stats.setup_s,
        )
        if tunnel.path == "relayed" and not self._relay_said:
            self._relay_said = True
            log.warning(
                "peer %s is reached through a TURN relay: no direct or hole-punched path worked (the relay sees "
                "only ciphertext; this is said once)",
                tunnel.peer_id,
            )

    async def _attempt(
        self, peer_id: str, relay: bool, checks_s: float | None = None
    ) -> tuple[RTCPeerConnection, RTCDataChannel]:
        loop = asyncio.get_running_loop()
        pc = RTCPeerConnection(rtc_configuration(self.servers, relay))
        listening: Listening | None = None
        try:
            began = time.monotonic()
            control = pc.createDataChannel(CONTROL_LABEL)
            await pc.setLocalDescription(await pc.createOffer())
            gathered = time.monotonic()
            sdp = _lean_sdp(pc.localDescription.sdp)
            try:
                check_sdp(sdp)
            except SignalRejected as exc:
                raise IceFailed(f"this machine's own offer is unusable ({exc})") from exc
            offer = Offer(secrets.token_hex(16), sdp, relay, round(self.clock(), 3))
            answers: asyncio.Queue[bytes] = asyncio.Queue(maxsize=256)

            def arrived(data: bytes) -> None:
                with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
                    loop.call_soon_threadsafe(_offer_nowait, answers, data)

            listening = self.signalling.listen(ice_key(peer_id), arrived)
            self.signalling.put(ice_key(peer_id), offer.encode())
            answer = await self._answer(answers, offer, peer_id)
            answered = time.monotonic()
            if answer.refused is not None:
                raise IceFailed(f"peer {peer_id} refused the path: {answer.refused}", refused=True)
            assert answer.sdp is not None
            try:
                await pc.setRemoteDescription(RTCSessionDescription(sdp=answer.sdp, type="answer"))
            except Exception as exc:  # a signed answer aiortc cannot use is still only that peer's failure
                raise IceFailed(f"peer {peer_id}'s answer is unusable: {type(exc).__name__}") from exc
            async with asyncio.timeout(checks_s):
                await _opened(control)
            log.debug(
                "ICE to %s (relay %s): gathered in %.2f s, answered %.2f s later, open %.2f s after that",
                peer_id,
                relay,
                gathered - began,
                answered - gathered,
                time.monotonic() - answered,
            )
            return pc, control
        except BaseException:
            with contextlib.suppress(Exception):
                await pc.close()
            raise
        finally:
            if listening is not None:
                listening.cancel()

    async def _answer(self, answers: asyncio.Queue[bytes], offer: Offer, peer_id: str) -> Answer:
        while True:
            data = await answers.get()
            try:
                return read_answer(data, offer, peer_id, self.clock())
            except SignalRejected as exc:  # anyone can put under the key: skip, keep waiting
                if exc.reason not in ("not_answer", "not_ours"):  # other clients' offers and answers
                    self.rejected[exc.reason] += 1

    async def aclose(self) -> None:
        for task in list(self._opening.values()):
            task.cancel()
        await asyncio.gather(*(tunnel.close() for tunnel in self._tunnels.values()), return_exceptions=True)
        self._tunnels.clear()


def _offer_nowait(queue: asyncio.Queue[bytes], data: bytes) -> None:
    with contextlib.suppress(asyncio.QueueFull):  # a flood of junk under our key: the honest answer may be lost
        queue.put_nowait(data)


# --- the worker side ---------------------------------------------------------------------------


@dataclass
class _Session:
    pc: RTCPeerConnection
    offer: Offer
    pinged_at: float
    path: PathKind | None = None


class IceService:
    """A worker's side of ICE: answers offers under its peer id and joins each channel to its HTTP server."""

    def __init__(
        self,
        *,
        identity: PeerIdentity,
        signalling: Signalling,
        target: tuple[str, int],
        servers: Sequence[IceServer] = (),
        max_sessions: int = 32,
        timeout_s: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.identity = identity
        self.signalling = signalling
        self.target = target
        self.servers = tuple(servers)
        self.max_sessions = max_sessions
        self.timeout_s = timeout_s
        self.clock = clock
        self.rejected: Counter[str] = Counter()
        self.opened: Counter[str] = Counter()  # paths that connected, by kind
        self.sessions: dict[str, _Session] = {}
        self._starting: set[asyncio.Task[None]] = set()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._listening: Listening | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._listening = self.signalling.listen(ice_key(self.identity.peer_id), self._arrived)
        self._watchdog = asyncio.create_task(self._watch())

    def _arrived(self, data: bytes) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._offered, data)

    def _offered(self, data: bytes) -> None:
        try:
            offer = read_offer(data, self.clock())
        except SignalRejected as exc:
            if exc.reason != "not_offer":  # this worker's own answers come back on the key it listens to
                self.rejected[exc.reason] += 1
            return
        if offer.session in self._seen:  # listening also returns what is stored: old offers come again
            return
        self._seen[offer.session] = None
        while len(self._seen) > MAX_SEEN_SESSIONS:
            self._seen.popitem(last=False)
        if len(self.sessions) + len(self._starting) >= self.max_sessions or len(self._starting) >= MAX_STARTING:
            self.rejected["busy"] += 1
            self._reply(offer, sdp=None, refused="busy: every ICE session of this worker is taken; try another peer")
            return
        task = asyncio.create_task(self._accept(offer))
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)

    def _reply(self, offer: Offer, *, sdp: str | None, refused: str | None) -> None:
        data = make_answer(offer, self.identity, self.clock(), sdp=sdp, refused=refused)
        try:
            self.signalling.put(ice_key(self.identity.peer_id), data)
        except Exception as exc:
            log.warning("ICE: could not put an answer on the DHT (%s)", exc)

    async def _accept(self, offer: Offer) -> None:
        pc = RTCPeerConnection(rtc_configuration(self.servers, offer.relay))
        session = _Session(pc, offer, time.monotonic())
        pc.on("datachannel", lambda channel: self._channel(session, channel))
        try:
            async with asyncio.timeout(self.timeout_s):
                await pc.setRemoteDescription(RTCSessionDescription(sdp=offer.sdp, type="offer"))
                await pc.setLocalDescription(await pc.createAnswer())
                sdp = check_sdp(_lean_sdp(pc.localDescription.sdp))
                self.sessions[offer.session] = session
                self._reply(offer, sdp=sdp, refused=None)
                while pc.connectionState not in ("connected", "failed", "closed"):
                    changed = asyncio.Event()
                    pc.once("connectionstatechange", changed.set)
                    await changed.wait()
            if pc.connectionState != "connected":
                raise IceFailed(f"the path {pc.connectionState}")
            session.path = path_of(pc)
            self.opened[session.path or "unknown"] += 1
            log.info("ICE: a client opened a %s path (session %s)", session.path, offer.session[:8])
        except Exception as exc:  # a stranger's offer that leads nowhere ends here, whatever went wrong
            reason = "timeout" if isinstance(exc, TimeoutError) else "failed"
            self.rejected[reason] += 1
            log.info("ICE: session %s did not connect (%s)", offer.session[:8], type(exc).__name__)
            await self._end(offer.session, pc)

    def _channel(self, session: _Session, channel: RTCDataChannel) -> None:
        if channel.label == CONTROL_LABEL:

            def on_ping(message: bytes | str) -> None:
                session.pinged_at = time.monotonic()
                if channel.readyState == "open":
                    channel.send("pong")

            channel.on("message", on_ping)
            return
        if not channel.label.startswith(HTTP_LABEL):
            channel.close()
            return
        task = asyncio.create_task(self._join(Inbox(channel)))
        self._pipes.add(task)
        task.add_done_callback(self._pipes.discard)

    async def _join(self, inbox: Inbox) -> None:
        channel = inbox.channel
        try:
            async with asyncio.timeout(self.timeout_s):
                reader, writer = await asyncio.open_connection(*self.target)
        except (OSError, TimeoutError) as exc:
            log.warning("ICE: cannot reach this worker's own HTTP server at %s:%d (%s)", *self.target, exc)
            channel.close()
            return
        await pipe(inbox, reader, writer)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S * 2)
            try:
                now = time.monotonic()
                for key, session in list(self.sessions.items()):
                    gone = session.pc.connectionState in ("failed", "closed")
                    if gone or now - session.pinged_at > IDLE_S:
                        await self._end(key, session.pc)
            except Exception:  # the watchdog serves every session: it logs and goes on
                log.exception("ICE: the session watchdog failed once; it goes on")

    async def _end(self, key: str, pc: RTCPeerConnection) -> None:
        self.sessions.pop(key, None)
        with contextlib.suppress(Exception):
            await pc.close()

    def paths(self) -> Counter[str]:
        return Counter(session.path or "connecting" for session in self.sessions.values())

    async def close(self) -> None:
        if self._listening is not None:
            self._listening.cancel()
        if self._watchdog is not None:
            self._watchdog.cancel()
        for task in [*self._starting, *self._pipes]:
            task.cancel()
        await asyncio.gather(*(self._end(key, s.pc) for key, s in list(self.sessions.items())), return_exceptions=True)


__all__ = ["IceDialer", "IceFailed", "IceService", "IceTunnel", "PathKind", "Signalling", "rtc_configuration"]
