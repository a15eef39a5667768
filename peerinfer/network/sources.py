"""Where a client finds its peers: the DHT through a bootstrap node, the LAN through mDNS, or both.

Every client-side command (``client.py``, ``peers``, the gateway) opens its discovery here:

    opened = open_discovery(bootstrap="127.0.0.1:4222", lan=False, network_id=net, dht_host=None, timeout_s=5.0)
    try:
        found = opened.discovery.lookup()
    finally:
        opened.close()

With both, one store merges the DHT node's values and the LAN's; discovery verifies them alike.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from peerinfer.errors import ConfigError
from peerinfer.network.addresses import dht_bind_host, parse_bootstrap
from peerinfer.network.discovery import Discovery, ValueStore

NO_SOURCE = (
    "no bootstrap node given; pass --bootstrap host:port (or PEERINFER_BOOTSTRAP), or --lan to find workers on this LAN"
)


class ClosableStore(ValueStore, Protocol):
    def close(self) -> None: ...


class Listening(Protocol):
    def cancel(self) -> None: ...


@runtime_checkable
class Signalling(Protocol):
    """A store that can also put and listen: a DHT node (``network.ice.Signalling``)."""

    def put(self, key: str, data: bytes) -> None: ...

    def listen(self, key: str, on_value: Callable[[bytes], None]) -> Listening: ...


class FoundValues(list[bytes]):
    """The values of one merged get; ``skipped`` adds up the stores' own (discovery counts them)."""

    skipped: int = 0


class MergedStore:
    """Asks every store at once; a get waits for the slowest, each within its own ``timeout_s``."""

    def __init__(self, stores: Sequence[ValueStore]) -> None:
        self.stores = list(stores)
        self._pool = ThreadPoolExecutor(max_workers=len(self.stores), thread_name_prefix="peerinfer-discovery")

    def get(self, key: str, timeout_s: float) -> list[bytes]:
        futures = [self._pool.submit(store.get, key, timeout_s) for store in self.stores]
        found = FoundValues()
        for future in futures:
            values = future.result()
            found.extend(values)
            found.skipped += int(getattr(values, "skipped", 0))
        return found

    def close(self) -> None:
        self._pool.shutdown(wait=True)


@dataclass
class OpenedDiscovery:
    """A ``Discovery`` and what it holds open; ``close()`` leaves the DHT and stops browsing the LAN."""

    discovery: Discovery
    description: str
    stores: list[ClosableStore] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def signalling(self) -> Signalling | None:
        """The DHT node, which also carries ICE offers and answers; None with the LAN alone."""
        return next((store for store in self.stores if isinstance(store, Signalling)), None)

    @property
    def rejected(self) -> Counter[str]:
        """Values dropped so far, by reason: discovery's checks and the LAN's TXT checks together."""
        total = Counter(self.discovery.rejected)
        for store in self.stores:
            total.update(getattr(store, "rejected", None) or Counter())
        return total

    def close(self) -> None:
        """Idempotent; closes every store even when one fails to close."""
        with self._lock:
            stores, self.stores = self.stores, []
        errors: list[BaseException] = []
        for store in reversed(stores):
            try:
                store.close()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> OpenedDiscovery:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_discovery(
    *,
    bootstrap: str,
    lan: bool,
    network_id: int,
    dht_host: str | None,
    timeout_s: float,
    lan_interfaces: Sequence[str] = (),
) -> OpenedDiscovery:
    """Discovery through the DHT (``bootstrap``, host:port[,...]), the LAN (``lan``), or both.

    Raises ``ConfigError`` when neither is given or a bootstrap address is invalid (and
    ``ConfigError``/``NetworkError`` when a node or the mDNS sockets cannot start). ``timeout_s`` is
    how long a lookup keeps trying while it finds nobody; on the LAN the first get also waits for
    the first answers (a worker already running is found by a client started after it).
    """
    nodes = parse_bootstrap(bootstrap)
    if not nodes and not lan:
        raise ConfigError(NO_SOURCE)
    stores: list[ClosableStore] = []
    described: list[str] = []
    try:
        if nodes:
            from peerinfer.network.dht import DhtNode

            stores.append(
                DhtNode(host=dht_host or dht_bind_host(None, nodes), port=0, network_id=network_id, bootstrap=nodes)
            )
            described.append("the DHT through " + ",".join(f"{host}:{port}" for host, port in nodes))
        if lan:
            from peerinfer.network.lan import LanStore

            stores.append(LanStore(network_id=network_id, interfaces=lan_interfaces))
            described.append("the LAN (mDNS)")
    except BaseException:
        for opened in stores:
            opened.close()
        raise
    if len(stores) == 1:
        return OpenedDiscovery(Discovery(stores[0], timeout_s=timeout_s), described[0], stores)
    merged = MergedStore(stores)
    # Closed first (reversed order): its threads end before the stores they call close.
    return OpenedDiscovery(Discovery(merged, timeout_s=timeout_s), " and ".join(described), [*stores, merged])
