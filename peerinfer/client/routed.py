"""The synchronous client for the network: a thin layer over the async routing core (``client.core``).

    client = RoutedClient("127.0.0.1:4222")
    stream = client.chat_stream([{"role": "user", "content": "Hi"}])
    for delta in stream:
        print(delta, end="", flush=True)
    print(stream.stats, stream.switches)

The core runs on an event loop of the client's own (``client.loop``); every choice, failover and
resume is the core's, the same as the gateway's. A chat turn goes back to the peer that answered
the conversation's last turn when that peer has a free slot, since it can reuse the conversation's
prompt from its cache.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from peerinfer.client.core import (
    Chooser,
    PeerChunk,
    PeerOpened,
    RoutedAnswer,
    Router,
    RouterOptions,
    StreamStats,
    Switch,
)
from peerinfer.client.loop import BackgroundLoop
from peerinfer.client.resume import chat_plan, completion_plan
from peerinfer.client.routing import BanList, Probe, choose_peer
from peerinfer.client.sdk import Message
from peerinfer.client.transport import Transport, WorkerHttp
from peerinfer.client.tunnels import IceOptions, ice_tunnels
from peerinfer.network.discovery import Discovery
from peerinfer.network.records import PeerRecord
from peerinfer.network.sources import open_discovery

__all__ = ["RoutedClient", "RoutedStream", "Switch"]


class RoutedClient:
    """Talks to the network rather than to one worker. Closing it leaves the DHT.

    Peers are found through the DHT (``bootstrap``), the LAN (``lan``), both, or a ``discovery``
    given by the caller; ``transport`` replaces the network under every HTTP exchange in tests.
    Workers that list ``ice://`` endpoints are reached through ICE (``ice``: which STUN/TURN servers,
    how long to try; on by default with none listed) over the DHT node the client joins.
    """

    def __init__(
        self,
        bootstrap: str = "",
        *,
        lan: bool = False,
        lan_interfaces: Sequence[str] = (),
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
        transport: Transport | None = None,
        ice: IceOptions | None = None,
    ) -> None:
        self._opened = None
        description = "the given discovery"
        if discovery is None:
            self._opened = open_discovery(
                bootstrap=bootstrap,
                lan=lan,
                network_id=network_id,
                dht_host=dht_host,
                timeout_s=discovery_timeout_s,
                lan_interfaces=lan_interfaces,
            )
            discovery, description = self._opened.discovery, self._opened.description
        options = RouterOptions(
            max_attempts=max_attempts,
            probe_count=probe_count,
            probe_timeout_s=probe_timeout_s,
            choose_timeout_s=choose_timeout_s,
            max_parallel_probes=max_parallel_probes,
            probe_grace_s=probe_grace_s,
            lookup_ttl_s=lookup_ttl_s,
        )
        signalling = self._opened.signalling if self._opened is not None else None
        http = WorkerHttp(
            transport=transport,
            api_key=api_key,
            connect_timeout_s=connect_timeout_s,
            read_timeout_s=read_timeout_s,
            tunnels=ice_tunnels(signalling, ice or IceOptions()),
        )
        self.router = Router(
            discovery,
            http,
            model_sha256=model_sha256,
            model_name=model_name,
            options=options,
            rng=rng,
            chooser=chooser,
            description=description,
        )
        self.on_switch = on_switch
        self._loop = BackgroundLoop("peerinfer-routed")

    # The router's state, for callers and tests that look at it.
    @property
    def discovery(self) -> Discovery:
        return self.router.discovery

    @property
    def bans(self) -> BanList:
        return self.router.bans

    @property
    def failures(self) -> Counter[str]:
        return self.router.failures

    @property
    def lookups(self) -> int:
        return self.router.lookups

    def peers(self, fresh: bool = False) -> list[PeerRecord]:
        """Verified live peers for the model, from the last lookup if it is recent enough."""
        return self._loop.run(self.router.peers(fresh))

    def proven(self, record: PeerRecord) -> bool:
        return self.router.proven(record)

    def probe(self, record: PeerRecord) -> Probe | None:
        """One vetting of ``record`` within the probe time-out; None if it failed."""
        return self._loop.run(self.router.probe(record))

    def pick(self, exclude: set[str], prefer: str | None = None) -> tuple[PeerRecord, Probe]:
        """A peer that answers its probe and proves its key, within the choice's deadline; ``NoPeersError``."""
        return self._loop.run(self.router.pick(exclude, prefer))

    # --- requests ---------------------------------------------------------------------------

    def chat_stream(self, messages: list[Message], **params: Any) -> RoutedStream:
        plan = chat_plan({"messages": messages, **params, "stream": True})
        return RoutedStream(self._loop, self.router.answer(plan), self.on_switch)

    def completion_stream(self, prompt: str, **params: Any) -> RoutedStream:
        plan = completion_plan({"prompt": prompt, **params, "stream": True})
        return RoutedStream(self._loop, self.router.answer(plan), self.on_switch)

    def chat(self, messages: list[Message], **params: Any) -> str:
        return "".join(self.chat_stream(messages, **params))

    def close(self) -> None:
        self._loop.close(self.router.aclose())
        if self._opened is not None:
            self._opened.close()
            self._opened = None

    def __enter__(self) -> RoutedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RoutedStream:
    """Iterate for text deltas of one continuous answer, whichever peers produce it.

    ``peer_url`` is the peer in use; ``switches`` lists every move to another peer (each is also
    passed to ``on_switch``, on the caller's thread); ``stats`` covers the whole answer once it is
    complete. It only carries the core's ``RoutedAnswer`` across to the caller's thread.
    """

    def __init__(
        self, loop: BackgroundLoop, answer: RoutedAnswer, on_switch: Callable[[Switch], None] | None = None
    ) -> None:
        self._loop = loop
        self._answer = answer
        self._on_switch = on_switch
        self.peer_url: str | None = None

    @property
    def switches(self) -> list[Switch]:
        return self._answer.switches

    @property
    def attempts(self) -> int:
        return self._answer.attempts

    @property
    def stats(self) -> StreamStats | None:
        return self._answer.stats

    def __iter__(self) -> Iterator[str]:
        for event in self._loop.iterate(aiter(self._answer)):
            if isinstance(event, PeerOpened):
                self.peer_url = event.url
                if event.switch is not None and self._on_switch is not None:
                    self._on_switch(event.switch)
            elif isinstance(event, PeerChunk) and event.chunk.text:
                yield event.chunk.text
