"""The async routing core: finds peers, picks one, fails over and resumes. One event loop, no threads.

The gateway, the SDK's ``RoutedClient`` and ``client.py`` all route through a ``Router``:

    router = Router(discovery, WorkerHttp())
    async for event in router.answer(chat_plan(body)):
        ...  # PeerOpened when a peer accepted the request, PeerChunk for each event of its stream

Per request: at most one lookup (none while the last one is younger than ``lookup_ttl_s``),
``probe_count`` health probes at once (more, in growing waves, while none passes), a signed-nonce
check the first time a peer is used, then the request. The choice has one deadline,
``choose_timeout_s``; whatever a peer sends that is not what a worker sends bans it. Before the
first token a failing peer is replaced at once; after it, the answer is resumed on another peer
from the text streamed so far (``client.resume``). Attempts are capped at ``max_attempts``.

Every decision is a pure function in ``client.routing`` (what to probe, when to start the next
wave, which peer to use, what a failure means, how long a ban lasts); this module carries them out.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import math
import random
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from peerinfer.client.answer import PeerChunk, PeerOpened, RoutedAnswer, StreamStats, Switch, stream_stats
from peerinfer.client.peer_http import PeerRejected
from peerinfer.client.resume import AnswerPlan
from peerinfer.client.routing import (
    ICE_PROBE_S,
    BanList,
    ChoiceState,
    Probe,
    candidates_to_probe,
    choose_peer,
    choose_with_affinity,
    conversation_key,
    endpoint_for,
    plan_choice,
    wave_interval_s,
)
from peerinfer.client.transport import WorkerHttp
from peerinfer.client.vetting import vet_peer
from peerinfer.errors import NoPeersError
from peerinfer.network.discovery import Discovery, Lookup
from peerinfer.network.identity import PeerId
from peerinfer.network.records import PeerRecord, is_ice_endpoint

__all__ = [
    "PeerChunk",
    "PeerOpened",
    "PeerView",
    "RoutedAnswer",
    "Router",
    "RouterOptions",
    "StreamStats",
    "Switch",
    "stream_stats",
]
log = logging.getLogger(__name__)
Chooser = Callable[[Sequence[Probe], random.Random], Probe]
AFFINITY_ENTRIES = 1024  # conversations remembered, least recently used forgotten first
SPEED_WEIGHT = 0.3  # weight of the newest answer in a peer's measured tokens/s
SURVEY_PEERS = 64  # peers a survey probes at most
SURVEY_EVERY_S = 5.0  # at most one survey this often


@dataclass(frozen=True)
class RouterOptions:
    max_attempts: int = 3
    probe_count: int = 3
    probe_timeout_s: float = 2.0
    choose_timeout_s: float = 5.0
    max_parallel_probes: int = 64
    probe_grace_s: float = 0.05  # least time to wait for other probes once one has passed
    lookup_ttl_s: float = 5.0
    probe_fresh_s: float = 1.0  # a probe this young is used again instead of a new one


@dataclass(frozen=True)
class PeerView:
    """What the router knows of one peer: its record, and what this router saw of it."""

    peer_id: str
    url: str
    model: str
    sha256: str
    verified: bool
    slots_total: int
    slots_free: int
    queue: int
    rtt_ms: float | None
    tokens_per_s: float | None
    claimed_tokens_per_s: float
    age_s: float
    path: str
    banned: bool
    last_failure: str | None


class Router:
    """Routes requests to the peers ``discovery`` finds; state (bans, proofs, affinity) lives here."""

    def __init__(
        self,
        discovery: Discovery,
        http: WorkerHttp,
        *,
        model_sha256: str | None = None,
        model_name: str | None = None,
        options: RouterOptions | None = None,
        rng: random.Random | None = None,
        chooser: Chooser = choose_peer,
        description: str = "the network",
    ) -> None:
        self.discovery = discovery
        self.http = http
        self.model_sha256 = model_sha256
        self.model_name = model_name
        self.options = options or RouterOptions()
        self.rng = rng or random.Random()
        self.chooser = chooser
        self.description = description
        self.bans = BanList()
        self.failures: Counter[str] = Counter()  # probe failures by reason, since the router started
        self.lookups = 0
        self._lookup: Lookup | None = None
        self._looked_up_at = -math.inf
        self._lookup_lock = asyncio.Lock()
        self._refresh: asyncio.Task[Lookup] | None = None
        self._verified: set[tuple[str, str]] = set()
        self._affinity: OrderedDict[str, str] = OrderedDict()  # conversation key -> peer that answered it
        self._probes: dict[str, Probe] = {}  # the last passed probe of each peer
        self._last_failure: dict[str, str] = {}
        self._speed: dict[str, float] = {}  # measured tokens/s of each peer's answers
        self._background: set[asyncio.Task[Probe]] = set()  # probes that outlived a choice
        self._surveyed_at = -math.inf
        self._vetting: dict[str, asyncio.Task[Probe]] = {}  # the probe in flight of each peer
        self._probed_at: dict[str, tuple[float, int]] = {}  # when each last probe passed, and streams open then
        self._serving: Counter[str] = Counter()  # streams this router has open to each peer
        self._unreachable: dict[str, set[str]] = {}  # direct endpoints of each peer this router could not reach

    # --- discovery and choice -------------------------------------------------------------

    async def peers(self, fresh: bool = False) -> list[PeerRecord]:
        """Verified live peers for the model, from the last lookup unless ``fresh``.

        A lookup older than ``lookup_ttl_s`` is still answered at once, while a new one runs in the
        background (stale while it revalidates): no request waits for the DHT once one lookup is in.
        """
        if fresh or self._lookup is None:
            return list((await self._look_up()).records)
        stale = time.monotonic() - self._looked_up_at > self.options.lookup_ttl_s
        if stale and (self._refresh is None or self._refresh.done()):
            self._refresh = asyncio.create_task(self._look_up())
            self._refresh.add_done_callback(self._refreshed)
        return list(self._lookup.records)

    async def _look_up(self) -> Lookup:
        async with self._lookup_lock:
            # Discovery blocks (a DHT get, an mDNS browse): off the loop.
            lookup = await asyncio.to_thread(self.discovery.lookup, self.model_sha256, self.model_name)
            self._lookup, self._looked_up_at = lookup, time.monotonic()
            self.lookups += 1
            return lookup

    def _refreshed(self, task: asyncio.Task[Lookup]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.warning("a background lookup of peers failed (%s); the last one is used meanwhile", task.exception())

    def endpoint(self, record: PeerRecord) -> str:
        """The endpoint of ``record`` to use: direct first, ``ice://`` once the direct ones failed to connect."""
        return endpoint_for(
            record.endpoints, can_tunnel=self.http.can_tunnel, unreachable=self._unreachable.get(record.peer_id, ())
        )

    def proven(self, record: PeerRecord) -> bool:
        """Whether this endpoint has signed a fresh nonce with the record's key before."""
        return (record.peer_id, self.endpoint(record)) in self._verified

    def fail(self, peer_id: str, reason: str) -> float:
        """Count a failure of the peer; returns how long it is banned for."""
        self._last_failure[peer_id] = reason[:200]
        return self.bans.fail(peer_id, time.monotonic())

    def succeed(self, peer_id: str) -> None:
        self.bans.succeed(peer_id)

    def observe_speed(self, peer_id: str, tokens_per_s: float) -> None:
        """Fold one answer's measured speed into the peer's."""
        if tokens_per_s <= 0 or not math.isfinite(tokens_per_s):
            return
        old = self._speed.get(peer_id)
        self._speed[peer_id] = tokens_per_s if old is None else old + SPEED_WEIGHT * (tokens_per_s - old)

    async def vet(self, record: PeerRecord, deadline: float) -> Probe:
        """Probe the peer (and challenge it, the first time) by ``deadline``; a failure bans it.

        One probe of a peer at a time: requests that want the same peer probed at once share it.
        May finish after ``pick`` has returned: a peer that failed is banned all the same, and one
        that passed is remembered as proven.
        """
        task = self._vetting.get(record.peer_id)
        if task is None:
            task = asyncio.create_task(self._vet(record, deadline))
            self._vetting[record.peer_id] = task
            task.add_done_callback(functools.partial(self._vetted, record.peer_id))
        return await asyncio.shield(task)

    def _vetted(self, peer_id: str, task: asyncio.Task[Probe]) -> None:
        if self._vetting.get(peer_id) is task:
            del self._vetting[peer_id]
        if not task.cancelled():
            task.exception()  # retrieved even when every waiter has gone: the verdict is kept

    async def _vet(self, record: PeerRecord, deadline: float) -> Probe:
        endpoint = self.endpoint(record)
        try:
            if not self.http.is_open(endpoint):
                # An ICE path takes its own set-up time (signalling, checks, perhaps the relay); the probe's
                # time starts once it is open.
                await self.http.prepare(endpoint)
            if is_ice_endpoint(endpoint):  # a packet lost on the path is resent after SCTP's 1 s floor
                deadline = max(deadline, time.monotonic() + max(self.options.probe_timeout_s, ICE_PROBE_S))
            try:
                probe = await vet_peer(
                    self.http, record, deadline=deadline, challenge=not self.proven(record), endpoint=endpoint
                )
            except PeerRejected as exc:
                if exc.reason != "timeout" or not is_ice_endpoint(endpoint):
                    raise
                # A new path's first exchange can lose a packet to a link that drops 1% (the SCTP resend
                # then waits out its timer): one more try, on a new connection, before the peer is banned.
                log.info("peer %s: a probe over its ICE path timed out; trying once more", record.peer_id)
                deadline = time.monotonic() + max(self.options.probe_timeout_s, ICE_PROBE_S)
                probe = await vet_peer(
                    self.http, record, deadline=deadline, challenge=not self.proven(record), endpoint=endpoint
                )
        except PeerRejected as exc:
            fallback = self._direct_failed(record, endpoint, exc)
            if fallback is None:
                return self._rejected(record, endpoint, exc)
            return await self._vet(record, deadline)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug of ours: this peer is not used now, and the log shows where
            return self._rejected(record, endpoint, exc)
        self._verified.add((record.peer_id, endpoint))
        self.discovery.trusted.add(record.peer_id)
        self._probes[record.peer_id] = probe
        self._probed_at[record.peer_id] = (time.monotonic(), self._serving[record.peer_id])
        return probe

    def _direct_failed(self, record: PeerRecord, endpoint: str, exc: PeerRejected) -> str | None:
        """After a direct endpoint could not be reached, the record's next endpoint to try, if any."""
        if exc.reason not in ("unreachable", "timeout") or is_ice_endpoint(endpoint):
            return None
        self._unreachable.setdefault(record.peer_id, set()).add(endpoint)
        following = self.endpoint(record)
        return following if following != endpoint else None

    def _rejected(self, record: PeerRecord, endpoint: str, exc: Exception) -> Probe:
        """Ban the peer for ``exc`` and raise it as a ``PeerRejected``."""
        # Info, not warning: under a flood of fake records this is one line per fake.
        reason = exc.reason if isinstance(exc, PeerRejected) else "error"
        ban_s = self.fail(record.peer_id, str(exc))
        self.failures[reason] += 1
        log.log(
            logging.INFO if reason != "error" else logging.WARNING,
            "peer %s at %s failed its probe (%s); banned for %.0f s",
            record.peer_id,
            endpoint,
            exc,
            ban_s,
            exc_info=reason == "error",  # not a peer's lie but a bug of ours: show where
        )
        if isinstance(exc, PeerRejected):
            raise exc
        raise PeerRejected("error", str(exc)) from exc

    def counted(self, peer_id: str) -> Probe | None:
        """The peer's last probe, its free slots lowered by the streams this router has sent it since."""
        probe = self._probes.get(peer_id)
        probed = self._probed_at.get(peer_id)
        if probe is None or probed is None:
            return None
        sent_since = max(0, self._serving[peer_id] - probed[1])
        return dataclasses.replace(probe, slots_free=max(0, probe.slots_free - sent_since))

    def fresh_probe(self, peer_id: str, now: float) -> Probe | None:
        """The peer's last probe if it is younger than ``probe_fresh_s``, as ``counted``; None otherwise."""
        probed = self._probed_at.get(peer_id)
        if probed is None or now - probed[0] > self.options.probe_fresh_s:
            return None
        return self.counted(peer_id)

    def serving(self, peer_id: str, change: int) -> None:
        """A stream was sent to the peer (+1, when it is chosen) or ended (-1): what its last probe did not see.

        Counted from the choice, not from the peer's first byte, so requests that choose at the same
        moment see each other's picks and fill the free slots of several peers, not those of one.
        """
        self._serving[peer_id] += change
        if self._serving[peer_id] <= 0:
            del self._serving[peer_id]

    async def probe(self, record: PeerRecord) -> Probe | None:
        """One vetting of ``record`` within ``probe_timeout_s``; None if it failed."""
        try:
            return await self.vet(record, time.monotonic() + self.options.probe_timeout_s)
        except PeerRejected:
            return None

    async def pick(self, exclude: set[str], prefer: str | None = None) -> tuple[PeerRecord, Probe]:
        """A peer that answers its probe and proves its key, within ``choose_timeout_s``.

        The choice has one deadline, whatever the records say: probes start in waves and the first
        usable answers are compared (power of two choices, or ``prefer`` when it has a free slot).
        If nothing passes, one fresh lookup is tried in the time left while the probes in flight
        go on. Raises ``NoPeersError``.
        """
        options = self.options
        deadline = time.monotonic() + options.choose_timeout_s
        records = {record.peer_id: record for record in await self.peers()}
        skip = exclude | self.bans.banned(time.monotonic())
        proven = {peer for peer, _ in self._verified}
        queue = candidates_to_probe(list(records.values()), skip, len(records), self.rng, proven)
        wanted = records.get(PeerId(prefer)) if prefer is not None and prefer not in skip else None
        if wanted is not None:
            queue.remove(wanted)
            queue.insert(0, wanted)
        # A peer probed a moment ago, with a free slot even counting what this router sent it since,
        # is used without a new round trip (a busy gateway would otherwise probe before every request).
        now = time.monotonic()
        fresh = [probe for record in queue if (probe := self.fresh_probe(record.peer_id, now)) and probe.slots_free > 0]
        if fresh:
            chosen = choose_with_affinity(fresh, prefer, self.rng, self.chooser)
            return records[chosen.peer_id], chosen
        if any(not self.http.is_open(self.endpoint(record)) for record in queue[: options.probe_count]):
            deadline += self.http.tunnels.timeout_s if self.http.tunnels is not None else 0.0
        state = ChoiceState(
            deadline=deadline,
            wave=options.probe_count + (wanted is not None),
            interval_s=wave_interval_s(options.probe_timeout_s, options.choose_timeout_s),
            grace_s=options.probe_grace_s,
            prefer=prefer,
        )
        pending: dict[asyncio.Task[Probe], PeerRecord] = {}
        try:
            while True:
                # The peers that passed, as this router's own picks since their probes left them.
                state.passed = [self.counted(probe.peer_id) or probe for probe in state.passed]
                step = plan_choice(state, time.monotonic(), len(pending), len(queue), options.max_parallel_probes)
                if step.kind == "look_again":
                    state.looked_again = True  # every candidate is in flight or failed: look for others meanwhile
                    new = [record for record in await self.peers(fresh=True) if record.peer_id not in records]
                    records.update((record.peer_id, record) for record in new)
                    queue = candidates_to_probe(new, skip, len(records), self.rng, proven)
                elif step.kind == "launch":
                    now = time.monotonic()
                    for record in queue[: step.count]:
                        probe_deadline = min(deadline, now + options.probe_timeout_s)
                        pending[asyncio.create_task(self.vet(record, probe_deadline))] = record
                    del queue[: step.count]
                    state.launched(now)
                elif step.kind == "wait":
                    done, _ = await asyncio.wait(
                        list(pending), timeout=max(0.0, step.until - time.monotonic()), return_when="FIRST_COMPLETED"
                    )
                    for task in done:
                        pending.pop(task)
                        if task.exception() is None:
                            state.passed_probe(task.result(), time.monotonic())
                else:
                    break
        finally:
            # Probes still in flight go on in the background: their verdicts (bans, proofs) are kept.
            for task in pending:
                self._background.add(task)
                task.add_done_callback(self._forget)
        if state.passed:
            chosen = choose_with_affinity(state.passed, prefer, self.rng, self.chooser)
            return records[chosen.peer_id], chosen
        model = self.model_sha256 or self.model_name or "the most served model"
        raise NoPeersError(
            f"no usable peer for {model} within {options.choose_timeout_s:g} s through {self.description}: none "
            f"found, or all are down, banned or failed their checks ({dict(self.failures) or 'no probe failed'})"
        )

    def _forget(self, task: asyncio.Task[Probe]) -> None:
        self._background.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not log it: the verdict is already kept

    async def survey(self, limit: int = SURVEY_PEERS) -> None:
        """Probe up to ``limit`` known peers at once (proven ones first), if the last survey is stale.

        For a live view of the network: a choice probes only a few peers. At most one survey runs
        every ``SURVEY_EVERY_S``, however often it is asked for, so a page that refreshes fast
        cannot make the router flood the peers.
        """
        if time.monotonic() - self._surveyed_at < SURVEY_EVERY_S:
            return
        self._surveyed_at = time.monotonic()
        records = await self.peers()
        proven = {peer for peer, _ in self._verified}
        chosen = candidates_to_probe(records, self.bans.banned(time.monotonic()), limit, self.rng, proven)
        await asyncio.gather(*(self.probe(record) for record in chosen))

    async def views(self, survey: bool = False) -> list[PeerView]:
        """Every live peer of the last lookup, with what this router saw of it (after a ``survey``, if asked)."""
        if survey:
            await self.survey()
        records = await self.peers()
        now_wall, now = time.time(), time.monotonic()
        views = []
        for record in records:
            probe = self._probes.get(record.peer_id)
            views.append(
                PeerView(
                    peer_id=record.peer_id,
                    url=self.endpoint(record),
                    model=record.model,
                    sha256=record.sha256,
                    verified=self.proven(record),
                    slots_total=probe.slots_total if probe else record.slots_total,
                    slots_free=probe.slots_free if probe else record.slots_free,
                    queue=probe.queue if probe else record.queue,
                    rtt_ms=round(probe.rtt_s * 1000, 1) if probe else None,
                    tokens_per_s=self._speed.get(record.peer_id),
                    claimed_tokens_per_s=record.tokens_per_s,
                    age_s=round(record.age_s(now_wall), 1),
                    path=self.http.path(self.endpoint(record)) or "ice (not open)",
                    banned=self.bans.is_banned(record.peer_id, now),
                    last_failure=self._last_failure.get(record.peer_id),
                )
            )
        return views

    # --- conversations ----------------------------------------------------------------------

    def peer_of(self, messages: Sequence[dict[str, Any]]) -> str | None:
        """The peer that answered the longest earlier part of this conversation (its history and that answer)."""
        for end in range(len(messages) - 1, 0, -1):
            peer = self._affinity.get(conversation_key(messages[:end]))
            if peer is not None:
                return peer
        return None

    def remember(self, messages: Sequence[dict[str, Any]], peer_id: str) -> None:
        """``peer_id`` answered: ``messages`` is the conversation with that answer as its last message."""
        key = conversation_key(messages)
        self._affinity[key] = peer_id
        self._affinity.move_to_end(key)
        while len(self._affinity) > AFFINITY_ENTRIES:
            self._affinity.popitem(last=False)

    # --- requests ---------------------------------------------------------------------------

    def answer(self, plan: AnswerPlan, *, prefer: str | None = None) -> RoutedAnswer:
        """One answer to ``plan``; iterate it for its events. A chat goes back to the peer of its last turn."""
        if prefer is None and plan.chat and isinstance(plan.body.get("messages"), list):
            prefer = self.peer_of(plan.body["messages"])
        return RoutedAnswer(self, plan, prefer=prefer)

    async def aclose(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
        for task in list(self._background):
            task.cancel()
        self._background.clear()
        await self.http.aclose()
