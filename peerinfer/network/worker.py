"""What a worker adds to its app when the network is on.

At start-up it loads (or creates) its identity and starts a DHT node (when the DHT is on). Once
the model is ready it measures its own speed once, then announces a signed record under its
model's key and the directory key every ``record_refresh_s``, and, with ``PEERINFER_LAN=1``, the
same record in its mDNS service on the LAN (``network.lan``); each record lives
``record_lifetime_s``, so a worker killed with -9 drops out by itself. A graceful stop announces a
signed withdrawal on both. It also answers ``POST /peer/challenge`` by signing the client's
nonce, and logs an error when another live process announces its peer id on the DHT.

With the DHT on, the record's endpoints come from ``network.dialback``: before the first
announcement (and every ``RECHECK_S`` after) the worker asks its bootstrap nodes to dial it back,
and lists the URL they reached it at, or only ``ice://<peer id>`` when none could. An operator's
``PEERINFER_ANNOUNCE_URL`` is listed as it is; the dial-back then only logs what it found.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from peerinfer.api.openai import parse_request
from peerinfer.client.transport import WorkerHttp
from peerinfer.engine.base import Engine, Finished, Generation, SamplingParams, TextDelta
from peerinfer.errors import OverloadedError, PeerInferError, RequestError
from peerinfer.network.addresses import dht_bind_host, guess_announce_url, is_loopback, parse_bootstrap
from peerinfer.network.dht import DhtNode
from peerinfer.network.dialback import (
    ASK_TIMEOUT_S,
    RECHECK_S,
    DialbackResult,
    ask_dialback,
    dialback_port,
    endpoints_for,
    reachability_line,
    verdict,
    wait_listening,
)
from peerinfer.network.identity import PeerIdentity, b64, load_or_create_identity, unb64
from peerinfer.network.records import (
    DIRECTORY_KEY,
    MAX_NONCE_BYTES,
    MAX_TOKENS_PER_S,
    MIN_NONCE_BYTES,
    PeerRecord,
    challenge_message,
    model_key,
    select_live,
    sign_record,
)
from peerinfer.server.guards import read_json_body
from peerinfer.server.openapi import errors
from peerinfer.settings import WorkerSettings

if TYPE_CHECKING:
    from peerinfer.network.ice import IceService
    from peerinfer.network.lan import LanAnnouncer

log = logging.getLogger(__name__)
CALIBRATION_TOKENS = 16
MAX_BOOTSTRAPS_ASKED = 8
"""Bootstrap nodes asked for a dial-back, the first of PEERINFER_BOOTSTRAP; one that answers is enough."""
LISTEN_WAIT_S = 5.0
"""How long the first dial-back waits for this worker's own server to accept connections."""


def _this_host(lan: bool = False) -> str:
    """This machine's address for a wildcard ``--host``; on the LAN, the interface mDNS goes out of."""
    if lan:
        from peerinfer.network.lan import guess_lan_address

        return guess_lan_address() or "127.0.0.1"
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


async def measure_tokens_per_s(engine: Engine) -> float:
    """Decode speed of one short greedy generation; 0.0 if it yields fewer than two tokens."""
    tokens = await asyncio.to_thread(engine.tokenize, "The sky is", add_bos=True)
    generation = Generation(
        tokens, SamplingParams(max_tokens=CALIBRATION_TOKENS, temperature=0.0), asyncio.get_running_loop()
    )
    engine.submit(generation)
    first: float | None = None
    produced = 0
    async for event in generation.stream():
        if isinstance(event, TextDelta) and first is None:
            first = time.perf_counter()
        if isinstance(event, Finished):
            produced = event.completion_tokens
    if first is None or produced < 2:
        return 0.0
    return (produced - 1) / max(time.perf_counter() - first, 1e-6)


class WorkerNetwork:
    """The worker's DHT node and LAN service (either or both), announcer and challenge endpoint.

    Construction touches nothing.
    """

    def __init__(self, settings: WorkerSettings, argv: list[str] | None = None) -> None:
        self.settings = settings
        self.bootstrap = parse_bootstrap(settings.bootstrap)
        argv = argv if argv is not None else sys.argv
        self.guessed_url = guess_announce_url(argv, _this_host(settings.lan))
        self.local_url = guess_announce_url(argv, "127.0.0.1")  # where this machine reaches the server
        self.announce_url = settings.announce_url or self.guessed_url
        self.endpoints: tuple[str, ...] = (self.announce_url,)
        self.dialback: list[DialbackResult] = []  # the last round's answers, one per bootstrap asked
        self._http: WorkerHttp | None = None
        self._checked_at = float("-inf")
        self._check_task: asyncio.Task[None] | None = None
        self._logged: tuple[str, tuple[str, ...]] | None = None
        self.instance = secrets.token_hex(8)
        self.identity: PeerIdentity | None = None
        self.node: DhtNode | None = None
        self.ice: IceService | None = None
        self.lan: LanAnnouncer | None = None
        self.tokens_per_s = 0.0
        self.started_at = 0.0
        self.clashes: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self.announce_rounds = 0  # announce and clash-check steps done, failed or not
        self.router = self._make_router()

    async def start(self) -> None:
        """Load the identity and join the DHT; the record is announced later, by ``announce_when_ready``."""
        self.started_at = time.time()
        self.identity = await asyncio.to_thread(load_or_create_identity, self.settings.home)
        if self.settings.lan:
            self._start_lan(self.identity.peer_id)
        if self.settings.dht_enabled:
            self._start_dht(self.identity.peer_id)
        if self.ice_on:
            self._start_ice(self.identity)
        self.endpoints = endpoints_for(
            self.guessed_url, self.settings.announce_url, [], self.ice_on, self.identity.peer_id
        )

    def _start_ice(self, identity: PeerIdentity) -> None:
        from peerinfer.network.ice import IceService  # aiortc loads only for a worker on the DHT

        assert self.node is not None
        target = parse_bootstrap(self.settings.ice_target)[0] if self.settings.ice_target else None
        local = urlsplit(self.local_url)
        self.ice = IceService(
            identity=identity,
            signalling=self.node,
            target=target or (local.hostname or "127.0.0.1", local.port or 8000),
            servers=self.settings.ice_servers,
            max_sessions=self.settings.ice_max_sessions,
            timeout_s=self.settings.ice_timeout_s,
        )
        self.ice.start()
        relays = sum(server.is_turn for server in self.settings.ice_servers)
        log.info(
            "peer %s: answering ICE offers on the DHT (%d STUN/TURN servers listed, %d of them relays)",
            identity.peer_id,
            len(self.settings.ice_servers),
            relays,
        )

    @property
    def ice_on(self) -> bool:
        """ICE offers and answers travel on the DHT, so an ``ice://`` endpoint needs a DHT node."""
        return self.settings.ice and self.node is not None

    @property
    def checks_reachability(self) -> bool:
        return (
            self.node is not None
            and self.settings.reachability_check
            and bool(self.bootstrap)
            and dialback_port(self.announce_url) is not None
        )

    def _start_lan(self, peer_id: str) -> None:
        from peerinfer.network.lan import LanAnnouncer

        self.lan = LanAnnouncer(
            peer_id=peer_id,
            url=self.announce_url,
            network_id=self.settings.network_id,
            ttl_s=self.settings.record_lifetime_s,
            interfaces=self.settings.lan_interfaces,
        )
        host = urlsplit(self.announce_url).hostname or ""
        if is_loopback(host):
            log.warning(
                "PEERINFER_LAN=1 but this worker announces %s, a loopback address that other machines cannot "
                "reach; start it with --host 0.0.0.0 (or its LAN address), or set PEERINFER_ANNOUNCE_URL",
                self.announce_url,
            )
        log.info(
            "peer %s: announcing %s on the LAN (mDNS, network %#x)",
            peer_id,
            self.announce_url,
            self.settings.network_id,
        )

    def _start_dht(self, peer_id: str) -> None:
        host = dht_bind_host(self.settings.dht_host, self.bootstrap)
        self.node = DhtNode(
            host=host,
            port=self.settings.dht_port or 0,
            network_id=self.settings.network_id,
            bootstrap=self.bootstrap,
            value_lifetime_s=self.settings.record_lifetime_s,
        )
        log.info(
            "peer %s: DHT node on udp %s:%d (network %#x), bootstrap %s, announcing %s",
            peer_id,
            host,
            self.node.port,
            self.settings.network_id,
            self.settings.bootstrap or "none (a network of one)",
            self.announce_url,
        )

    def announce_when_ready(self, loaded: asyncio.Task[None], ready: Callable[[], bool], engine: Engine) -> None:
        self._task = asyncio.create_task(self._announce_loop(loaded, ready, engine))

    def record(self, engine: Engine, withdrawn: bool = False) -> PeerRecord:
        assert self.identity is not None  # set by start(), before any record is built
        info = engine.info
        stats = engine.stats()
        now = time.time()
        return PeerRecord(
            peer_id=self.identity.peer_id,
            public_key=b64(self.identity.public_key),
            endpoints=self.endpoints,
            model=info.model_id[:128],
            sha256=info.sha256,
            n_ctx=info.n_ctx,
            slots_total=stats.slots_total,
            slots_free=max(0, stats.slots_total - stats.slots_busy),
            queue=stats.queued,
            tokens_per_s=round(min(self.tokens_per_s, MAX_TOKENS_PER_S), 2),  # the fake engine is faster
            issued_at=round(now, 3),
            expires_at=round(now + self.settings.record_lifetime_s, 3),
            instance=self.instance,
            withdrawn=withdrawn,
        )

    def _put(self, record: PeerRecord) -> None:
        assert self.identity is not None and self.node is not None
        data = sign_record(record, self.identity)
        self.node.put(model_key(record.sha256), data)
        self.node.put(DIRECTORY_KEY, data)

    def _steps(self) -> list[tuple[str, Callable[[Engine], Awaitable[None]]]]:
        steps: list[tuple[str, Callable[[Engine], Awaitable[None]]]] = []
        if self.node is not None:
            steps += [("DHT: announcing the record", self._announce), ("DHT: the clash check", self._check_clash)]
        if self.lan is not None:
            steps.append(("LAN: announcing the record", self._announce_lan))
        if self.checks_reachability:
            steps.append(("dial-back: the reachability check", self._recheck))
        return steps

    async def _announce_loop(self, loaded: asyncio.Task[None], ready: Callable[[], bool], engine: Engine) -> None:
        await asyncio.shield(loaded)
        if not ready():
            return
        try:
            self.tokens_per_s = await measure_tokens_per_s(engine)
        except Exception as exc:  # the worker still serves and announces, with an unknown speed
            log.warning("could not measure tokens/s (%s); announcing 0", _one_line(exc))
        if self.checks_reachability and not self.settings.announce_url:
            # The first record already says how to reach this worker; the operator's URL needs no wait.
            await self._check_reachability(wait_for_server=True)
        refresh = self.settings.record_refresh_s or self.settings.record_lifetime_s / 3
        steps = self._steps()
        failures = dict.fromkeys((what for what, _ in steps), 0)
        while steps:
            # One bad step (a DHT put that raises, a value that trips the clash check, mDNS sockets
            # gone) must not end the announcements: the record would expire and the worker leave
            # the network unseen.
            for what, step in steps:
                try:
                    await step(engine)
                    failures[what] = 0
                except Exception as exc:
                    failures[what] += 1
                    log.error(
                        "%s failed (%s; %d failures in a row); the worker keeps announcing every %.1f s",
                        what,
                        _one_line(exc),
                        failures[what],
                        refresh,
                    )
                self.announce_rounds += 1
                await asyncio.sleep(refresh / len(steps))

    async def _recheck(self, engine: Engine) -> None:
        """Starts a dial-back round when one is due; it runs beside the announcements, which never wait for it."""
        due = time.monotonic() - self._checked_at >= RECHECK_S
        if due and (self._check_task is None or self._check_task.done()):
            self._checked_at = time.monotonic()
            self._check_task = asyncio.create_task(self._check_reachability())

    async def _check_reachability(self, wait_for_server: bool = False) -> None:
        """Ask the bootstrap nodes to dial this worker back and list what they found. Never raises."""
        assert self.identity is not None
        self._checked_at = time.monotonic()
        port = dialback_port(self.announce_url)
        if port is None:
            return
        try:
            if wait_for_server and not await wait_listening(self.local_url, LISTEN_WAIT_S):
                log.warning("this worker's server at %s does not accept connections yet; asking anyway", self.local_url)
            if self._http is None:
                self._http = WorkerHttp(connect_timeout_s=ASK_TIMEOUT_S)
            asked = self.bootstrap[:MAX_BOOTSTRAPS_ASKED]
            results = list(
                await asyncio.gather(*(ask_dialback(self._http, node, port, self.identity) for node in asked))
            )
            explicit = self.settings.announce_url
            reports = [result.report for result in results]
            endpoints = endpoints_for(self.guessed_url, explicit, reports, self.ice_on, self.identity.peer_id)
            level, line = reachability_line(explicit, results, endpoints, self.ice_on)
        except Exception as exc:  # the worker keeps the endpoints it has
            log.error("dial-back: asking the bootstrap nodes failed (%s); listing %s", _one_line(exc), self.endpoints)
            return
        self.dialback = results
        self.endpoints = endpoints
        outcome = (verdict(explicit, reports), endpoints)
        # Every few minutes the same answer: logged when it changes.
        log.log(level if outcome != self._logged else logging.DEBUG, "peer %s: %s", self.identity.peer_id, line)
        self._logged = outcome

    async def _announce(self, engine: Engine) -> None:
        self._put(self.record(engine))

    async def _announce_lan(self, engine: Engine) -> None:
        assert self.identity is not None and self.lan is not None
        await asyncio.to_thread(self.lan.announce, sign_record(self.record(engine), self.identity))

    async def _check_clash(self, engine: Engine) -> None:
        assert self.identity is not None and self.node is not None
        values = await asyncio.to_thread(self.node.get, model_key(engine.info.sha256), 2.0)
        for record in select_live(values, time.time(), trusted={self.identity.peer_id}).instances:
            # A record issued after this process started cannot come from a dead earlier run of it.
            clash = record.instance != self.instance and record.issued_at > self.started_at
            if record.peer_id == self.identity.peer_id and clash and record.instance not in self.clashes:
                self.clashes.add(record.instance)
                log.error(
                    "peer id %s is also announced by another live worker at %s (instance %s); two workers share "
                    "one identity, probably a copied PEERINFER_HOME. Give each worker its own PEERINFER_HOME.",
                    record.peer_id,
                    ", ".join(record.endpoints),
                    record.instance,
                )

    async def stop(self, engine: Engine, ready: bool) -> None:
        """Withdraw the record at once, then leave the DHT and send the LAN's goodbye."""
        for task in (self._task, self._check_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        withdrawal = self.record(engine, withdrawn=True) if ready and self.identity is not None else None
        if self.node is not None and withdrawal is not None and self.identity is not None:
            self._put(withdrawal)
            log.info("peer %s withdrew its record", self.identity.peer_id)
        if self.lan is not None:
            signed = sign_record(withdrawal, self.identity) if withdrawal and self.identity else None
            try:  # the goodbye waits withdraw_grace_s after the withdrawal: the DHT's puts leave meanwhile
                await asyncio.to_thread(self.lan.close, signed, self.settings.withdraw_grace_s)
            except Exception as exc:
                log.error(
                    "LAN: the goodbye failed (%s); browsers drop this worker when its record expires", _one_line(exc)
                )
        elif withdrawal is not None:
            await asyncio.sleep(self.settings.withdraw_grace_s)
        if self.ice is not None:
            await self.ice.close()
        if self.node is None:
            return
        await asyncio.to_thread(self.node.close)

    def _make_router(self) -> APIRouter:
        router = APIRouter()

        @router.post(
            "/peer/challenge",
            openapi_extra={
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": ChallengeRequest.model_json_schema()}},
                }
            },
            responses={200: {"description": "The nonce signed with the peer's key."}, **errors(400, 413, 415, 503)},
        )
        async def challenge(request: Request) -> JSONResponse:
            if self.identity is None:
                raise OverloadedError("the peer identity is not loaded yet; retry shortly", retry_after=1)
            nonce = _read_nonce(await read_json_body(request, self.settings.max_body_bytes))
            identity = self.identity
            return JSONResponse(
                {
                    "peer_id": identity.peer_id,
                    "public_key": b64(identity.public_key),
                    "signature": b64(identity.sign(challenge_message(nonce))),
                }
            )

        return router


def _one_line(exc: BaseException) -> str:
    text = exc.message if isinstance(exc, PeerInferError) else str(exc)
    return f"{type(exc).__name__}: {' '.join(text.split())[:200]}"


class ChallengeRequest(BaseModel):
    """The body of ``POST /peer/challenge``: a fresh random nonce, base64."""

    model_config = ConfigDict(extra="ignore", strict=True)

    nonce: str = Field(max_length=4 * MAX_NONCE_BYTES)


def _read_nonce(body: bytes) -> bytes:
    """The nonce of a challenge body; parsed like the API's bodies (bounded depth: too deep is a 400)."""
    try:
        nonce = unb64(parse_request(ChallengeRequest, body).nonce)
    except ValueError as exc:
        raise RequestError('expected {"nonce": "<base64>"}', param="nonce") from exc
    if not MIN_NONCE_BYTES <= len(nonce) <= MAX_NONCE_BYTES:
        raise RequestError(
            f"the nonce has {len(nonce)} bytes; send {MIN_NONCE_BYTES} to {MAX_NONCE_BYTES} random bytes", param="nonce"
        )
    return nonce
