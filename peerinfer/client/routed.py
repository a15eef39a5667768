"""A client for the network: finds peers on the DHT, picks one, fails over and resumes.

    client = RoutedClient("127.0.0.1:4222")
    stream = client.chat_stream([{"role": "user", "content": "Hi"}])
    for delta in stream:
        print(delta, end="", flush=True)
    print(stream.stats, stream.switches)

A chat turn goes back to the peer that answered the conversation's last turn when that peer has
a free slot, since it can reuse the conversation's prompt from its cache.

Per request: at most one DHT lookup (none while the last one is younger than ``lookup_ttl_s``),
``probe_count`` health probes in parallel (more, in growing waves, while none passes), a
signed-nonce check the first time a peer is used, then the request. The choice has one deadline,
``choose_timeout_s``; whatever a peer sends that is not what a worker sends bans it. Before the
first token a failing peer is replaced at once; after it, the answer is resumed on another peer
from the text streamed so far. Attempts are capped at ``max_attempts``.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from peerinfer.client.peer_http import PeerRejected
from peerinfer.client.routing import (
    BanList,
    Probe,
    candidates_to_probe,
    choose_peer,
    choose_with_affinity,
    conversation_key,
    failure_action,
    probes_to_launch,
    remaining_tokens,
    resume_messages,
    wave_interval_s,
)
from peerinfer.client.sdk import Message, PeerInferClient, StreamStats, TextStream
from peerinfer.client.vetting import vet_peer
from peerinfer.errors import ClientError, NoPeersError
from peerinfer.network.addresses import dht_bind_host, parse_bootstrap
from peerinfer.network.discovery import Discovery, Lookup
from peerinfer.network.identity import PeerId
from peerinfer.network.records import PeerRecord

log = logging.getLogger(__name__)
Chooser = Callable[[Sequence[Probe], random.Random], Probe]
AFFINITY_ENTRIES = 1024  # conversations remembered, least recently used forgotten first


@dataclass(frozen=True)
class Switch:
    """The request left ``from_url`` for ``to_url``; ``resumed_chars`` of answer had streamed."""

    from_url: str
    to_url: str
    reason: str
    resumed_chars: int


class RoutedClient:
    """Talks to the network rather than to one worker. Closing it leaves the DHT."""

    def __init__(
        self,
        bootstrap: str = "",
        *,
        model_sha256: str | None = None,
        model_name: str | None = None,
        api_key: str | None = None,
        network_id: int = 0x50494E46,
        dht_host: str | None = None,
        discovery: Discovery | None = None,
        max_attempts: int = 3,
        probe_count: int = 3,
        probe_timeout_s: float = 2.0,
        choose_timeout_s: float = 5.0,
        max_parallel_probes: int = 64,
        probe_grace_s: float = 0.05,
        lookup_ttl_s: float = 5.0,
        discovery_timeout_s: float = 5.0,
        connect_timeout_s: float = 3.0,
        read_timeout_s: float = 60.0,
        rng: random.Random | None = None,
        chooser: Chooser = choose_peer,
        on_switch: Callable[[Switch], None] | None = None,
    ) -> None:
        self._node = None
        if discovery is None:
            from peerinfer.network.dht import DhtNode

            nodes = parse_bootstrap(bootstrap)
            if not nodes:
                raise ClientError("no bootstrap node given; pass --bootstrap host:port (or PEERINFER_BOOTSTRAP)")
            self._node = DhtNode(
                host=dht_host or dht_bind_host(None, nodes), port=0, network_id=network_id, bootstrap=nodes
            )
            discovery = Discovery(self._node, timeout_s=discovery_timeout_s)
        self.discovery = discovery
        self.model_sha256 = model_sha256
        self.model_name = model_name
        self.api_key = api_key
        self.max_attempts = max_attempts
        self.probe_count = probe_count
        self.probe_timeout_s = probe_timeout_s
        self.choose_timeout_s = choose_timeout_s
        self.max_parallel_probes = max_parallel_probes
        self.probe_grace_s = probe_grace_s  # least time to wait for other probes once one has passed
        self.failures: Counter[str] = Counter()  # probe failures by reason, since the client started
        self._lock = threading.Lock()  # bans and proofs are updated from probe threads
        # Probes that outlive a choice finish in the background, so the pool has room for two choices.
        self._pool = ThreadPoolExecutor(max_workers=2 * max_parallel_probes, thread_name_prefix="peerinfer-probe")
        self.lookup_ttl_s = lookup_ttl_s
        self.bans = BanList()
        self.rng = rng or random.Random()
        self.chooser = chooser
        self.on_switch = on_switch
        self._timeouts = (connect_timeout_s, read_timeout_s)
        self._lookup: Lookup | None = None
        self._looked_up_at = 0.0
        self._verified: set[tuple[str, str]] = set()
        self._clients: dict[str, PeerInferClient] = {}
        self._affinity: OrderedDict[str, str] = OrderedDict()  # conversation key -> peer that answered it
        self.lookups = 0

    # --- discovery and choice -------------------------------------------------------------

    def peers(self, fresh: bool = False) -> list[PeerRecord]:
        """Verified live peers for the model, from the last lookup if it is recent enough."""
        if fresh or self._lookup is None or time.monotonic() - self._looked_up_at > self.lookup_ttl_s:
            self._lookup = self.discovery.lookup(self.model_sha256, self.model_name)
            self._looked_up_at = time.monotonic()
            self.lookups += 1
        return list(self._lookup.records)

    def proven(self, record: PeerRecord) -> bool:
        """Whether this endpoint has signed a fresh nonce with the record's key before."""
        return (record.peer_id, record.endpoints[0]) in self._verified

    def vet(self, record: PeerRecord, deadline: float) -> Probe:
        """Probe the peer (and challenge it, the first time) by ``deadline``; a failure bans it.

        Runs in a probe thread, and may finish after ``pick`` has returned: a peer that failed is
        banned all the same, and one that passed is remembered as proven.
        """
        try:
            probe = vet_peer(record, deadline=deadline, challenge=not self.proven(record))
        except Exception as exc:  # PeerRejected, or a bug: either way this peer is not used now
            # Info, not warning: under a flood of fake records this is one line per fake.
            reason = exc.reason if isinstance(exc, PeerRejected) else "error"
            with self._lock:
                ban_s = self.bans.fail(record.peer_id, time.monotonic())
                self.failures[reason] += 1
            log.log(
                logging.INFO if reason != "error" else logging.WARNING,
                "peer %s at %s failed its probe (%s); banned for %.0f s",
                record.peer_id,
                record.endpoints[0],
                exc,
                ban_s,
                exc_info=reason == "error",  # not a peer's lie but a bug of ours: show where
            )
            raise
        with self._lock:
            self._verified.add((record.peer_id, record.endpoints[0]))
            self.discovery.trusted.add(record.peer_id)
        return probe

    def probe(self, record: PeerRecord) -> Probe | None:
        """One vetting of ``record`` within ``probe_timeout_s``; None if it failed."""
        try:
            return self.vet(record, time.monotonic() + self.probe_timeout_s)
        except PeerRejected:
            return None

    def pick(self, exclude: set[str], prefer: str | None = None) -> tuple[PeerRecord, Probe]:
        """A peer that answers its probe and proves its key, within ``choose_timeout_s``.

        The choice has one deadline, whatever the records say: probes start in waves (see
        ``probes_to_launch``) and the first usable answers are compared (power of two choices, or
        ``prefer`` when it has a free slot). If nothing passes, one fresh lookup is tried in the
        time left, at once, while the probes in flight go on. Raises ``NoPeersError``.
        """
        deadline = time.monotonic() + self.choose_timeout_s
        records = {record.peer_id: record for record in self.peers()}

        def more() -> list[PeerRecord]:
            """Peers of a fresh lookup that the last one did not list."""
            new = [record for record in self.peers(fresh=True) if record.peer_id not in records]
            records.update((record.peer_id, record) for record in new)
            return new

        chosen = self._choose(records, exclude, prefer, deadline, more)
        if chosen is not None:
            return records[chosen.peer_id], chosen
        model = self.model_sha256 or self.model_name or "the most served model"
        raise NoPeersError(
            f"no usable peer for {model} within {self.choose_timeout_s:g} s: none found on the DHT, "
            f"or all are down, banned or failed their checks ({dict(self.failures) or 'no probe failed'})"
        )

    def _choose(
        self,
        records: dict[PeerId, PeerRecord],
        exclude: set[str],
        prefer: str | None,
        deadline: float,
        more: Callable[[], list[PeerRecord]],
    ) -> Probe | None:
        with self._lock:
            skip = exclude | self.bans.banned(time.monotonic())
            proven = {peer for peer, _ in self._verified}
        queue = candidates_to_probe(list(records.values()), skip, len(records), self.rng, proven)
        wanted = records.get(PeerId(prefer)) if prefer is not None and prefer not in skip else None
        if wanted is not None:
            queue.remove(wanted)
            queue.insert(0, wanted)
        pending: dict[Future[Probe], PeerRecord] = {}
        passed: list[Probe] = []
        wave, launched_at, first_pass_at = self.probe_count + (wanted is not None), -math.inf, math.inf
        interval = wave_interval_s(self.probe_timeout_s, self.choose_timeout_s)
        looked_again = False
        while True:
            now = time.monotonic()
            stuck = not pending or now - launched_at >= interval  # all failed, or none passed for a wave interval
            if not passed and not queue and stuck and not looked_again and now < deadline:
                looked_again = True  # every candidate is in flight or failed: look for others meanwhile
                queue = candidates_to_probe(more(), skip, len(records), self.rng, proven)
                now = time.monotonic()
            if not passed:
                count = probes_to_launch(
                    len(pending), len(queue), wave, self.max_parallel_probes, now - launched_at >= interval
                )
                if count:
                    for record in queue[:count]:
                        pending[self._pool.submit(self.vet, record, min(deadline, now + self.probe_timeout_s))] = record
                    del queue[:count]
                    wave, launched_at = wave * 2, now
            # Once one passed, the others get as long again as its round trip (at least probe_grace_s).
            grace_until = first_pass_at + max(self.probe_grace_s, passed[0].rtt_s if passed else 0.0)
            if passed and (
                not pending
                or now >= grace_until
                or any(probe.peer_id == prefer and probe.slots_free > 0 for probe in passed)
            ):
                break
            if (not pending and not queue) or now >= deadline:
                break
            next_wave = launched_at + interval if queue and not passed else math.inf
            wake = min(deadline, grace_until, next_wave)
            done, _ = wait(list(pending), timeout=max(0.0, wake - now), return_when=FIRST_COMPLETED)
            for future in done:
                pending.pop(future)
                if future.exception() is None:
                    passed.append(future.result())
                    first_pass_at = min(first_pass_at, time.monotonic())
        # Probes still in flight go on in the background: their verdicts (bans, proofs) are kept.
        if not passed:
            return None
        return choose_with_affinity(passed, prefer, self.rng, self.chooser)

    def client_for(self, url: str) -> PeerInferClient:
        if url not in self._clients:
            self._clients[url] = PeerInferClient(
                url, api_key=self.api_key, connect_timeout_s=self._timeouts[0], read_timeout_s=self._timeouts[1]
            )
        return self._clients[url]

    # --- requests ---------------------------------------------------------------------------

    def chat_stream(self, messages: list[Message], **params: Any) -> RoutedStream:
        continuing = bool(params.get("continue_final_message"))

        def start(client: PeerInferClient, partial: str, deltas: int) -> TextStream:
            if not partial:
                return client.chat_stream(messages, **params)
            resumed = remaining_tokens(params, deltas)
            resumed["continue_final_message"] = True
            return client.chat_stream(resume_messages(messages, partial, continuing), **resumed)

        def answered(peer_id: str, answer: str) -> None:
            # The next turn's history is this conversation with the answer appended (or extended).
            self._remember(conversation_key(resume_messages(messages, answer, continuing)), peer_id)

        return RoutedStream(self, start, prefer=self._peer_of(messages), answered=answered)

    def _peer_of(self, messages: list[Message]) -> str | None:
        """The peer that answered the longest earlier part of this conversation (its history and that answer)."""
        for end in range(len(messages) - 1, 0, -1):
            peer = self._affinity.get(conversation_key(messages[:end]))
            if peer is not None:
                return peer
        return None

    def _remember(self, key: str, peer_id: str) -> None:
        self._affinity[key] = peer_id
        self._affinity.move_to_end(key)
        while len(self._affinity) > AFFINITY_ENTRIES:
            self._affinity.popitem(last=False)

    def completion_stream(self, prompt: str, **params: Any) -> RoutedStream:
        def start(client: PeerInferClient, partial: str, deltas: int) -> TextStream:
            if not partial:
                return client.completion_stream(prompt, **params)
            return client.completion_stream(prompt + partial, **remaining_tokens(params, deltas))

        return RoutedStream(self, start)

    def chat(self, messages: list[Message], **params: Any) -> str:
        return "".join(self.chat_stream(messages, **params))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for client in self._clients.values():
            client.close()
        if self._node is not None:
            self._node.close()
            self._node = None

    def __enter__(self) -> RoutedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RoutedStream:
    """Iterate for text deltas of one continuous answer, whichever peers produce it.

    ``peer_url`` is the peer in use; ``switches`` lists every move to another peer; ``stats``
    covers the whole answer once it is complete.
    """

    def __init__(
        self,
        client: RoutedClient,
        start: Callable[[PeerInferClient, str, int], TextStream],
        prefer: str | None = None,
        answered: Callable[[str, str], None] | None = None,
    ) -> None:
        self._client = client
        self._start = start
        self._prefer = prefer  # the peer to try first, if it has a free slot
        self._answered = answered  # told which peer finished the answer, and the whole answer
        self.peer_url: str | None = None
        self.switches: list[Switch] = []
        self.attempts = 0
        self.stats: StreamStats | None = None

    def _switch(self, reason: str, partial: str, exclude: set[str]) -> tuple[PeerRecord, Probe]:
        record, probe = self._client.pick(exclude, self._prefer if self.peer_url is None else None)
        if self.peer_url is not None:
            switch = Switch(self.peer_url, probe.url, reason, len(partial))
            self.switches.append(switch)
            log.info("peer %s failed (%s); continuing on %s", switch.from_url, reason, switch.to_url)
            if self._client.on_switch is not None:
                self._client.on_switch(switch)
        self.peer_url = probe.url
        return record, probe

    def __iter__(self) -> Iterator[str]:
        client = self._client
        started = time.perf_counter()
        first: float | None = None
        partial = ""
        deltas = 0
        tried: set[str] = set()
        reason = ""
        while True:
            if self.attempts >= client.max_attempts:
                where = f" after {len(partial)} characters of the answer" if partial else ""
                raise NoPeersError(f"gave up after {self.attempts} attempts{where}; last failure: {reason}")
            record, probe = self._switch(reason, partial, tried)
            tried.add(record.peer_id)
            self.attempts += 1
            earlier = deltas
            try:
                stream = self._start(client.client_for(probe.url), partial, deltas)
                for delta in stream:
                    if first is None:
                        first = time.perf_counter()
                    partial += delta
                    deltas += 1
                    yield delta
            except ClientError as exc:
                action = failure_action(exc.status, bool(partial))
                if action == "fatal":
                    raise
                with client._lock:
                    client.bans.fail(record.peer_id, time.monotonic())
                reason = exc.message
                continue
            with client._lock:
                if stream.overran:
                    # More text than was asked for: the answer ends at the limit, the peer is not trusted again soon.
                    client.bans.fail(record.peer_id, time.monotonic())
                    log.warning("peer %s sent more text than max_tokens; the answer ends at the limit", probe.url)
                else:
                    client.bans.succeed(record.peer_id)
            self.stats = _combined_stats(stream.stats, started, first, deltas, earlier)
            if self._answered is not None:
                self._answered(record.peer_id, partial)
            return


def _combined_stats(
    last: StreamStats | None, started: float, first: float | None, deltas: int, earlier: int
) -> StreamStats:
    """Stats of the whole answer; tokens of abandoned peers are counted as the deltas they sent."""
    total = time.perf_counter() - started
    tokens = deltas if last is None else earlier + last.completion_tokens
    generating = total - (first - started) if first is not None else 0.0
    return StreamStats(
        ttft_s=None if first is None else first - started,
        total_s=total,
        prompt_tokens=None if last is None else last.prompt_tokens,
        completion_tokens=tokens,
        tokens_per_s=(tokens - 1) / generating if tokens > 1 and generating > 0 else 0.0,
        finish_reason=None if last is None else last.finish_reason,
    )
