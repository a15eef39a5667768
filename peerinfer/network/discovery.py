"""Finding verified peers for a model on the DHT.

A lookup is one DHT get under the model's key (by sha256), or, when the caller names no sha256,
one get under the directory key to choose the model first. A fresh node may need a moment to join,
so an empty answer is retried until ``timeout_s``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from peerinfer.network.records import DIRECTORY_KEY, PeerRecord, VerifiedRecords, model_key, select_live

log = logging.getLogger(__name__)
MAX_REMEMBERED = 4096


class ValueStore(Protocol):
    """What discovery needs from a DHT node."""

    def get(self, key: str, timeout_s: float) -> list[bytes]: ...


@dataclass
class Lookup:
    """Verified peers for one model, and what was dropped on the way."""

    sha256: str | None
    records: list[PeerRecord]
    rejected: Counter[str] = field(default_factory=Counter)
    dht_gets: int = 0


def pick_model(records: Sequence[PeerRecord], name: str | None) -> str | None:
    """The sha256 most peers serve, among those whose model is ``name`` (any, if None).

    Ties go to the smallest sha256 so every client breaks them the same way.
    """
    counts = Counter(record.sha256 for record in records if name is None or record.model == name)
    if not counts:
        return None
    return min(counts, key=lambda sha: (-counts[sha], sha))


class Discovery:
    """Looks up peers through a ``ValueStore``; counts every rejected value in ``rejected``."""

    def __init__(
        self,
        store: ValueStore,
        *,
        timeout_s: float = 5.0,
        get_timeout_s: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._timeout_s = timeout_s
        self._get_timeout_s = get_timeout_s
        self._clock = clock
        self.rejected: Counter[str] = Counter()
        self.trusted: set[str] = set()  # peers that proved their key: their records are checked first
        self._seen: dict[str, dict[tuple[str, str], PeerRecord]] = {}  # per key: newest record per instance

    def verified(self, key: str) -> VerifiedRecords:
        """The live records under ``key``: this get's, merged with those seen before that are still live.

        One get may read only part of a flooded key; a peer verified by an earlier get stays listed
        until its record expires or a withdrawal of it is read, so a flood cannot hide it later.
        """
        values = self._store.get(key, self._get_timeout_s)
        now = self._clock()
        result = select_live(values, now, trusted=self.trusted)
        skipped = getattr(values, "skipped", 0)  # values the DHT node stopped reading (DhtNode.get's cap)
        if skipped:
            result.rejected["over_limit"] += skipped
        if result.rejected:
            log.info("dropped %d DHT values under %s: %s", sum(result.rejected.values()), key, dict(result.rejected))
        self.rejected.update(result.rejected)
        return self._merge(key, result, now)

    def _merge(self, key: str, result: VerifiedRecords, now: float) -> VerifiedRecords:
        seen = self._seen.setdefault(key, {})
        for record in [*result.instances, *result.withdrawn]:
            current = seen.get((record.peer_id, record.instance))
            if current is None or (record.issued_at, record.withdrawn) > (current.issued_at, current.withdrawn):
                seen[(record.peer_id, record.instance)] = record
        for instance, record in list(seen.items()):
            if record.expires_at <= now:
                del seen[instance]
        if len(seen) > MAX_REMEMBERED:  # keep the newest; a flood of valid records cannot grow this for ever
            for instance, _ in sorted(seen.items(), key=lambda item: item[1].issued_at)[: len(seen) - MAX_REMEMBERED]:
                del seen[instance]
        instances = sorted((r for r in seen.values() if not r.withdrawn), key=lambda r: (r.peer_id, -r.issued_at))
        by_peer: dict[str, PeerRecord] = {}
        for record in instances:
            by_peer.setdefault(record.peer_id, record)
        withdrawn = [r for r in seen.values() if r.withdrawn]
        return VerifiedRecords(list(by_peer.values()), instances, result.rejected, withdrawn)

    def lookup(self, sha256: str | None = None, name: str | None = None, min_peers: int = 1) -> Lookup:
        """Peers serving the model ``sha256``, or named ``name``, or the most served model."""
        deadline = time.monotonic() + self._timeout_s
        gets = 0
        rejected: Counter[str] = Counter()
        while True:
            chosen = sha256
            records: list[PeerRecord] = []
            if chosen is None:
                directory = self.verified(DIRECTORY_KEY)
                gets += 1
                rejected.update(directory.rejected)
                chosen = pick_model(directory.records, name)
            if chosen is not None:
                found = self.verified(model_key(chosen))
                gets += 1
                rejected.update(found.rejected)
                records = [record for record in found.records if record.sha256 == chosen]
            if len(records) >= min_peers or time.monotonic() >= deadline:
                return Lookup(chosen, records, rejected, gets)
            time.sleep(0.2)
