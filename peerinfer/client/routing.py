"""Routing decisions, as plain functions over plain data: which peers to probe, which to use,
what a failure means, how long a failing peer is banned, and how an answer is resumed. Pure.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from peerinfer.network.identity import PeerId
from peerinfer.network.records import PeerRecord, is_ice_endpoint

ICE_PROBE_S = 4.0
"""Least time for a probe over an ICE path: SCTP resends a lost packet after 1 s at the earliest."""
ASSUMED_ANSWER_TOKENS = 128
"""Length of a typical answer, used to turn a queue into seconds of waiting."""

Action = Literal["failover", "resume", "fatal"]


@dataclass(frozen=True)
class Probe:
    """What one ``/health`` round trip said about a peer."""

    peer_id: PeerId
    url: str
    rtt_s: float
    slots_total: int
    slots_free: int
    queue: int
    tokens_per_s: float


def estimate_ttft_s(probe: Probe) -> float:
    """Seconds to the first token: one round trip, plus waiting for a slot when none is free.

    A request waiting behind ``queue`` others on ``slots_total`` slots waits for about
    ``(queue + 1) / slots_total`` answers of ``ASSUMED_ANSWER_TOKENS`` at the peer's measured speed.
    """
    wait = 0.0
    if probe.slots_free <= 0:
        speed = probe.tokens_per_s if probe.tokens_per_s > 0 else 10.0
        wait = (probe.queue + 1) / max(probe.slots_total, 1) * ASSUMED_ANSWER_TOKENS / speed
    return probe.rtt_s + wait


def candidates_to_probe(
    records: Sequence[PeerRecord], banned: set[str], count: int, rng: random.Random, proven: Collection[str] = ()
) -> list[PeerRecord]:
    """Up to ``count`` unbanned peers in the order to probe them.

    Peers that proved their key to this client before come first. The rest are in random order,
    those whose record claims a free slot ahead of those that claim none. A claim is only that
    bit: a record that claims 4096 free slots ranks like one that claims 1, so a crowd of liars
    is shuffled in with the honest peers instead of always coming first.
    """
    usable = [record for record in records if record.peer_id not in banned]
    rng.shuffle(usable)
    usable.sort(key=lambda record: (record.peer_id not in proven, record.slots_free == 0))
    return usable[:count]


def wave_interval_s(probe_timeout_s: float, choose_timeout_s: float) -> float:
    """Time between waves of probes: an eighth of a probe's time-out, and at most a tenth of the choice's.

    With the defaults (2 s, 5 s) waves start at 0, 0.25, 0.5, 0.75 and 1 s: 3 + 6 + 12 + 24 + 48 =
    93 candidates are in flight by 1 s, so a crowd of silent endpoints delays the choice by about a
    second, not by its number of members times the probe time-out. A peer's answer usually takes
    milliseconds, so a wave is rarely started while the last one could still pass.
    """
    return max(0.05, min(probe_timeout_s / 8, choose_timeout_s / 10))


def probes_to_launch(in_flight: int, queued: int, wave: int, max_parallel: int, due: bool) -> int:
    """How many more peers to start probing now, while no peer has passed yet.

    A first wave of ``wave`` peers; whenever every probe in flight has ended, or a wave interval
    has passed (``due``) without a usable peer, the next wave, twice as large. So a crowd of
    silent endpoints costs wave intervals, not probe time-outs, and the choice stays within its
    deadline. At most ``max_parallel`` probes are in flight.
    """
    if queued <= 0 or (in_flight and not due):
        return 0
    return max(0, min(wave, queued, max_parallel - in_flight))


@dataclass
class ChoiceState:
    """What a choice of peer has seen so far; ``plan_choice`` decides its next step from it."""

    deadline: float
    wave: int
    interval_s: float
    grace_s: float
    prefer: str | None = None
    launched_at: float = -math.inf
    first_pass_at: float = math.inf
    looked_again: bool = False
    passed: list[Probe] = field(default_factory=list)

    def launched(self, now: float) -> None:
        self.wave, self.launched_at = self.wave * 2, now

    def passed_probe(self, probe: Probe, now: float) -> None:
        self.passed.append(probe)
        self.first_pass_at = min(self.first_pass_at, now)


@dataclass(frozen=True)
class ChoiceStep:
    """``launch`` ``count`` more probes, ``look_again`` (one fresh lookup), ``wait`` ``until``, or ``done``."""

    kind: Literal["launch", "look_again", "wait", "done"]
    count: int = 0
    until: float = math.inf


def plan_choice(state: ChoiceState, now: float, in_flight: int, queued: int, max_parallel: int) -> ChoiceStep:
    """The next step of a choice among probed peers. Pure.

    - While nothing has passed: probes start in waves (``probes_to_launch``); when every candidate
      is in flight or failed and a wave interval went by, one fresh lookup, once.
    - Once one passed, the others get as long again as its round trip (at least ``grace_s``), or
      none at all if the preferred peer passed with a free slot. While every peer that passed is
      full, the others in flight get until the deadline: a full peer's queue costs seconds.
    - It is done at the deadline, or when nothing is left to probe or wait for.
    """
    due = now - state.launched_at >= state.interval_s
    stuck = in_flight == 0 or due  # all failed, or none passed for a wave interval
    if not state.passed and queued == 0 and stuck and not state.looked_again and now < state.deadline:
        return ChoiceStep("look_again")
    if not state.passed and now < state.deadline:
        count = probes_to_launch(in_flight, queued, state.wave, max_parallel, due)
        if count:
            return ChoiceStep("launch", count=count)
    grace_until = math.inf
    if state.passed:
        grace_until = state.first_pass_at + max(state.grace_s, state.passed[0].rtt_s)
        free = [probe for probe in state.passed if probe.slots_free > 0]
        if in_flight == 0 or any(probe.peer_id == state.prefer for probe in free) or (free and now >= grace_until):
            return ChoiceStep("done")
        if not free:
            grace_until = math.inf
    if (in_flight == 0 and queued == 0) or now >= state.deadline:
        return ChoiceStep("done")
    next_wave = state.launched_at + state.interval_s if queued and not state.passed else math.inf
    if next_wave <= now:  # due, but the cap on probes in flight is reached: the next one to end makes room
        next_wave = math.inf
    return ChoiceStep("wait", until=min(state.deadline, grace_until, next_wave))


def choose_peer(probes: Sequence[Probe], rng: random.Random) -> Probe:
    """Power of two choices: two probed peers at random, the one with the lower estimated TTFT.

    Always taking the single best peer would send a crowd of clients, who all see the same loads,
    to the same peer at once; two random choices spread them while still avoiding busy peers.
    """
    if not probes:
        raise ValueError("choose_peer needs at least one probe")
    if len(probes) == 1:
        return probes[0]
    first, second = rng.sample(list(probes), 2)
    return first if estimate_ttft_s(first) <= estimate_ttft_s(second) else second


def conversation_key(messages: Sequence[Mapping[str, Any]]) -> str:
    """A digest of a conversation, to recognise it when it comes back with one more turn."""
    turns = [[message.get("role"), message.get("content")] for message in messages]
    return hashlib.sha256(json.dumps(turns, ensure_ascii=False, default=str).encode()).hexdigest()


def choose_with_affinity(
    probes: Sequence[Probe],
    preferred: str | None,
    rng: random.Random,
    chooser: Callable[[Sequence[Probe], random.Random], Probe],
) -> Probe:
    """The peer that answered the conversation's last turn, if it was probed and has a free slot.

    That peer still holds the conversation's prompt in a slot (prefix reuse), so it reads only the
    new turn: on a CPU peer, seconds less for a long chat. Otherwise, ``chooser``'s pick.
    """
    for probe in probes:
        if probe.peer_id == preferred and probe.slots_free > 0:
            return probe
    return chooser(probes, rng)


def failure_action(status: int | None, streamed_text: bool) -> Action:
    """What to do when a peer fails: ``status`` is the HTTP status, None for connection errors and time-outs.

    After text has streamed the answer is resumed elsewhere. Before, connection errors, time-outs,
    401, 429 and 5xx move to the next peer; other 4xx mean the request itself is wrong, and another
    peer would say the same.
    """
    if status is None or status in (401, 408, 429) or status >= 500:
        return "resume" if streamed_text else "failover"
    return "fatal"


@dataclass
class BanList:
    """Failing peers are skipped for ``base_s * 2**(failures-1)`` seconds, at most ``max_s``.

    A success clears the peer's count. Times are passed in, so the rules can be tested without waiting.
    """

    base_s: float = 2.0
    max_s: float = 300.0
    failures: dict[str, int] = field(default_factory=dict)
    until: dict[str, float] = field(default_factory=dict)

    def fail(self, peer_id: str, now: float) -> float:
        """Count a failure; returns how long the peer is now banned for."""
        count = self.failures.get(peer_id, 0) + 1
        self.failures[peer_id] = count
        duration = min(self.max_s, self.base_s * 2.0 ** (count - 1))
        self.until[peer_id] = now + duration
        return duration

    def succeed(self, peer_id: str) -> None:
        self.failures.pop(peer_id, None)
        self.until.pop(peer_id, None)

    def is_banned(self, peer_id: str, now: float) -> bool:
        return self.until.get(peer_id, 0.0) > now

    def banned(self, now: float) -> set[str]:
        return {peer for peer, until in self.until.items() if until > now}


def remaining_tokens(params: dict[str, Any], streamed_deltas: int) -> dict[str, Any]:
    """``params`` with the token limit lowered by what has been streamed already (at least 1 left)."""
    updated = dict(params)
    for name in ("max_tokens", "max_completion_tokens"):
        if isinstance(updated.get(name), int):
            updated[name] = max(1, updated[name] - streamed_deltas)
    return updated


def resume_messages(messages: Sequence[dict[str, Any]], partial: str, continuing: bool) -> list[dict[str, Any]]:
    """The conversation plus the partial answer as the assistant message to continue.

    If the caller was already continuing an assistant message (``continuing``), the partial text extends it.
    """
    history = [dict(message) for message in messages]
    if continuing and history and history[-1].get("role") == "assistant":
        history[-1]["content"] = history[-1].get("content", "") + partial
        return history
    return [*history, {"role": "assistant", "content": partial}]


def endpoint_for(endpoints: Sequence[str], *, can_tunnel: bool, unreachable: Collection[str] = ()) -> str:
    """Which of a record's endpoints to use: a direct http(s) URL first, ``ice://`` when none works.

    ``unreachable`` holds the URLs this client could not connect to; an ``ice://`` endpoint is
    used only by a client that can open one (``can_tunnel``). With nothing usable, the first.
    """
    direct = [url for url in endpoints if not is_ice_endpoint(url)]
    ice = [url for url in endpoints if is_ice_endpoint(url)] if can_tunnel else []
    for url in direct:
        if url not in unreachable:
            return url
    return (ice or direct or list(endpoints))[0]
