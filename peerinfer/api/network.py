"""``GET /network``: the web page's live table of peers, one typed model for the worker and the gateway. Pure.

A gateway builds it from its router's views of the peers (``network_view``), a worker from its own
engine stats (``worker_row``). Every text in it came from a stranger at some point (a peer's record
names its model, a failure quotes a peer's reply), so the builders cut strings to a bound and turn
a number that is not finite into "unknown": the page renders all of it as text, never as markup.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

MAX_TEXT = 256
MAX_FAILURE = 300
MAX_ROWS = 512

PeerPath = Literal["direct", "hole-punched", "relayed"]
PATHS: dict[str, PeerPath] = {"direct": "direct", "hole-punched": "hole-punched", "relayed": "relayed"}


class PeerRow(BaseModel):
    """One peer as the page shows it; ``rtt_ms`` and ``tokens_per_s`` are None when not measured."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(max_length=MAX_TEXT, description="the peer id (or 'this worker')")
    url: str = Field(max_length=MAX_TEXT, description="the endpoint requests go to")
    model: str = Field(max_length=MAX_TEXT, description="the model name the peer gives: text, never markup")
    sha256: str = Field(max_length=64, description="the model file's sha256")
    verified: bool = Field(description="the peer signed a fresh nonce with its record's key")
    slots_total: int = Field(ge=0)
    slots_busy: int = Field(ge=0)
    slots_free: int = Field(ge=0)
    queue: int = Field(ge=0, description="requests waiting for a slot")
    rtt_ms: float | None = Field(ge=0, description="round-trip time of the last probe")
    tokens_per_s: float | None = Field(ge=0, description="decode speed measured by whoever serves this table")
    claimed_tokens_per_s: float = Field(ge=0, description="decode speed the peer's record claims")
    age_s: float = Field(ge=0, description="age of the peer's record")
    path: PeerPath = Field(description="how requests reach the peer")
    banned: bool = Field(description="the router avoids this peer for now")
    last_failure: str | None = Field(max_length=MAX_FAILURE, description="why the last request to it failed")


class NetworkView(BaseModel):
    """What ``GET /network`` answers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["gateway", "worker"]
    source: str = Field(max_length=MAX_TEXT, description="what the peers were discovered through")
    peers: list[PeerRow] = Field(max_length=MAX_ROWS)


class PeerFacts(Protocol):
    """What a router knows of one peer: ``peerinfer.client.core.PeerView`` has these attributes."""

    @property
    def peer_id(self) -> str: ...
    @property
    def url(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def sha256(self) -> str: ...
    @property
    def verified(self) -> bool: ...
    @property
    def slots_total(self) -> int: ...
    @property
    def slots_free(self) -> int: ...
    @property
    def queue(self) -> int: ...
    @property
    def rtt_ms(self) -> float | None: ...
    @property
    def tokens_per_s(self) -> float | None: ...
    @property
    def claimed_tokens_per_s(self) -> float: ...
    @property
    def age_s(self) -> float: ...
    @property
    def path(self) -> str: ...
    @property
    def banned(self) -> bool: ...
    @property
    def last_failure(self) -> str | None: ...


def clip(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` cut to ``limit`` characters, an ellipsis marking the cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def measured(value: float | None) -> float | None:
    """A measurement the page can show: None for unknown, NaN, infinite or negative values."""
    if value is None or not math.isfinite(value) or value < 0:
        return None
    return round(value, 1)


def _count(value: int) -> int:
    return max(0, int(value))


def peer_row(view: PeerFacts) -> PeerRow:
    """The row of one peer the router knows; never raises for odd values (they come from a stranger)."""
    total = _count(view.slots_total)
    free = min(_count(view.slots_free), total)
    failure = view.last_failure
    return PeerRow(
        id=clip(view.peer_id),
        url=clip(view.url),
        model=clip(view.model),
        sha256=view.sha256[:64],
        verified=bool(view.verified),
        slots_total=total,
        slots_busy=total - free,
        slots_free=free,
        queue=_count(view.queue),
        rtt_ms=measured(view.rtt_ms),
        tokens_per_s=measured(view.tokens_per_s),
        claimed_tokens_per_s=measured(view.claimed_tokens_per_s) or 0.0,
        age_s=measured(view.age_s) or 0.0,
        path=PATHS.get(view.path, "direct"),
        banned=bool(view.banned),
        last_failure=clip(failure, MAX_FAILURE) if failure else None,
    )


def network_view(source: str, views: Iterable[PeerFacts]) -> NetworkView:
    """The gateway's table: verified, unbanned peers first, then by URL (a stable order for the page)."""
    rows = sorted((peer_row(view) for view in views), key=lambda row: (row.banned, not row.verified, row.url))
    return NetworkView(mode="gateway", source=clip(source), peers=rows[:MAX_ROWS])


def worker_row(
    *,
    peer_id: str,
    url: str,
    model: str,
    sha256: str,
    slots_total: int,
    slots_busy: int,
    queue: int,
    tokens_per_s: float | None,
    claimed_tokens_per_s: float,
    age_s: float,
    last_failure: str | None,
) -> PeerRow:
    """A worker's one row about itself: verified (it is the server the page talks to), no RTT, direct."""
    total = _count(slots_total)
    busy = min(_count(slots_busy), total)
    return PeerRow(
        id=clip(peer_id),
        url=clip(url),
        model=clip(model),
        sha256=sha256[:64],
        verified=True,
        slots_total=total,
        slots_busy=busy,
        slots_free=total - busy,
        queue=_count(queue),
        rtt_ms=None,
        tokens_per_s=measured(tokens_per_s),
        claimed_tokens_per_s=measured(claimed_tokens_per_s) or 0.0,
        age_s=measured(age_s) or 0.0,
        path="direct",
        banned=False,
        last_failure=clip(last_failure, MAX_FAILURE) if last_failure else None,
    )
