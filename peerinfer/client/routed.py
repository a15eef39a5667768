"""A client for the network: finds peers on the DHT, picks one, fails over and resumes.

    client = RoutedClient("127.0.0.1:4222")
    stream = client.chat_stream([{"role": "user", "content": "Hi"}])
    for delta in stream:
        print(delta, end="", flush=True)
    print(stream.stats, stream.switches)

A chat turn goes back to the peer that answered the conversation's last turn when that peer has
a free slot, since it can reuse the conversation's prompt from its cache.

Per request: at most one DHT lookup (none while the last one is younger than ``lookup_ttl_s``),
``probe_count`` health probes in parallel, a signed-nonce check the first time a peer is used,
then the request. Before the first token a failing peer is replaced at once; after it, the answer
is resumed on another peer from the text streamed so far. Attempts are capped at ``max_attempts``.
"""

from __future__ import annotations

import logging
import random
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import requests

from peerinfer.client.routing import (
    BanList,
    Probe,
    candidates_to_probe,
    choose_peer,
    choose_with_affinity,
    conversation_key,
    failure_action,
    remaining_tokens,
    resume_messages,
)
from peerinfer.client.sdk import Message, PeerInferClient, StreamStats, TextStream
from peerinfer.errors import ClientError, NoPeersError
from peerinfer.network.addresses import dht_bind_host, parse_bootstrap
from peerinfer.network.discovery import Discovery, Lookup
from peerinfer.network.identity import PeerId, b64
from peerinfer.network.records import PeerRecord, verify_challenge

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

    def probe(self, record: PeerRecord) -> Probe | None:
        """One ``/health`` round trip; None if the peer is down or serves another model."""
        url = record.endpoints[0]
        started = time.perf_counter()
        try:
            health = requests.get(url + "/health", timeout=self.probe_timeout_s)
            body = health.json()
        except (requests.RequestException, ValueError):
            return None
        rtt = time.perf_counter() - started
        if health.status_code != 200 or not isinstance(body, dict) or body.get("sha256") != record.sha256:
            return None
        return Probe(
            peer_id=record.peer_id,
            url=url,
            rtt_s=rtt,
            slots_total=int(body.get("slots_total", record.slots_total)),
            slots_free=int(body.get("slots_free", 0)),
            queue=int(body.get("requests_waiting", 0)),
            tokens_per_s=record.tokens_per_s,
        )

    def holds_key(self, record: PeerRecord) -> bool:
        """Whether the endpoint signs a fresh nonce with the record's key; remembered once true."""
        url = record.endpoints[0]
        if (record.peer_id, url) in self._verified:
            return True
        nonce = secrets.token_bytes(32)
        try:
            answer = requests.post(url + "/peer/challenge", json={"nonce": b64(nonce)}, timeout=self.probe_timeout_s)
            ok = answer.status_code == 200 and verify_challenge(record, nonce, answer.json())
        except (requests.RequestException, ValueError):
            ok = False
        if ok:
            self._verified.add((record.peer_id, url))
        else:
            log.warning("peer %s at %s cannot prove it holds its record's key; not using it", record.peer_id, url)
        return ok

    def pick(self, exclude: set[str], prefer: str | None = None) -> tuple[PeerRecord, Probe]:
        """Probe a few candidates (and ``prefer``, if it is listed) and choose one that proves its identity."""
        for fresh in (False, True):
            records = {record.peer_id: record for record in self.peers(fresh=fresh)}
            skip = exclude | self.bans.banned(time.monotonic())
            while True:
                candidates = candidates_to_probe(list(records.values()), skip, self.probe_count, self.rng)
                if not candidates:
                    break
                wanted = records.get(PeerId(prefer)) if prefer is not None and prefer not in skip else None
                if wanted is not None and wanted not in candidates:
                    candidates.append(wanted)
                with ThreadPoolExecutor(max_workers=len(candidates)) as pool:
                    probes = [probe for probe in pool.map(self.probe, candidates) if probe is not None]
                failed = {record.peer_id for record in candidates} - {probe.peer_id for probe in probes}
                for peer in failed:
                    self.bans.fail(peer, time.monotonic())
                skip |= failed
                while probes:
                    chosen = choose_with_affinity(probes, prefer, self.rng, self.chooser)
                    if self.holds_key(records[chosen.peer_id]):
                        return records[chosen.peer_id], chosen
                    self.bans.fail(chosen.peer_id, time.monotonic())
                    skip.add(chosen.peer_id)
                    probes = [probe for probe in probes if probe.peer_id != chosen.peer_id]
        model = self.model_sha256 or self.model_name or "the most served model"
        raise NoPeersError(f"no usable peer for {model}: none found on the DHT, or all are down or banned")

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
                client.bans.fail(record.peer_id, time.monotonic())
                reason = exc.message
                continue
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
