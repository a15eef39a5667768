"""Routing decisions as tables: estimates, choice, failure handling, bans and resume requests."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from peerinfer.client.routing import (
    BanList,
    Probe,
    candidates_to_probe,
    choose_peer,
    choose_with_affinity,
    conversation_key,
    estimate_ttft_s,
    failure_action,
    probes_to_launch,
    remaining_tokens,
    resume_messages,
    wave_interval_s,
)
from peerinfer.network.identity import PeerId, PeerIdentity
from tests.test_network_records import make_record


def probe(name: str, rtt: float = 0.01, free: int = 1, queue: int = 0, total: int = 4, tps: float = 32.0) -> Probe:
    return Probe(PeerId(name), f"http://{name}", rtt, total, free, queue, tps)


@pytest.mark.parametrize(
    ("p", "expected"),
    [
        (probe("a", rtt=0.05, free=2), 0.05),  # a free slot: just the round trip
        (probe("a", rtt=0.05, free=0, queue=0, total=4, tps=32.0), 0.05 + 1 / 4 * 128 / 32),
        (probe("a", rtt=0.0, free=0, queue=7, total=4, tps=32.0), 8 / 4 * 128 / 32),
        (probe("a", rtt=0.0, free=0, queue=0, total=1, tps=0.0), 128 / 10),  # unknown speed: 10 tokens/s
    ],
)
def test_estimate_ttft(p: Probe, expected: float) -> None:
    assert estimate_ttft_s(p) == pytest.approx(expected)


def test_choose_between_two_takes_the_faster() -> None:
    fast, slow = probe("fast", free=1), probe("slow", free=0, queue=5)
    for seed in range(20):
        assert choose_peer([slow, fast], random.Random(seed)) == fast


def test_choice_spreads_a_crowd_over_equal_peers() -> None:
    peers = [probe(name) for name in "abcd"]
    rng = random.Random(7)
    picks = Counter(choose_peer(peers, rng).peer_id for _ in range(400))
    assert set(picks) == set("abcd")
    assert max(picks.values()) < 200


def test_choice_avoids_the_busiest_peer() -> None:
    peers = [probe("a"), probe("b"), probe("busy", free=0, queue=10)]
    rng = random.Random(3)
    picks = Counter(choose_peer(peers, rng).peer_id for _ in range(300))
    assert picks["busy"] == 0  # in any pair it is the worse one


def test_choose_needs_a_probe() -> None:
    with pytest.raises(ValueError, match="at least one"):
        choose_peer([], random.Random())


def test_candidates_skip_banned_and_prefer_free_slots() -> None:
    records = [
        make_record(PeerIdentity.generate(), slots_free=free, queue=queue) for free, queue in [(0, 3), (4, 0), (2, 0)]
    ]
    banned = {records[2].peer_id}
    chosen = candidates_to_probe(records, banned, 5, random.Random(1))
    assert [record.slots_free for record in chosen] == [4, 0]
    assert len(candidates_to_probe(records, set(), 1, random.Random(1))) == 1


@pytest.mark.parametrize(
    ("status", "streamed", "action"),
    [
        (None, False, "failover"),  # connection refused, reset or timed out before the first token
        (503, False, "failover"),
        (401, False, "failover"),
        (429, False, "failover"),
        (500, False, "failover"),
        (400, False, "fatal"),  # the request itself is wrong; another peer would say the same
        (413, False, "fatal"),
        (404, False, "fatal"),
        (None, True, "resume"),  # the stream broke after text
        (500, True, "resume"),
        (400, True, "fatal"),
    ],
)
def test_failure_action(status: int | None, streamed: bool, action: str) -> None:
    assert failure_action(status, streamed) == action


@pytest.mark.parametrize(
    ("events", "checks"),
    [
        # (kind, time) events, then (time, banned?) checks for peer "p"
        ([("fail", 0.0)], [(0.0, True), (1.9, True), (2.0, False)]),
        ([("fail", 0.0), ("fail", 2.0)], [(5.9, True), (6.0, False)]),  # 2 s, then 4 s
        ([("fail", 0.0), ("fail", 2.0), ("fail", 6.0)], [(13.9, True), (14.0, False)]),  # then 8 s
        ([("fail", 0.0), ("succeed", 1.0)], [(1.0, False)]),  # a success lifts the ban
        ([("fail", 0.0), ("succeed", 1.0), ("fail", 3.0)], [(4.9, True), (5.0, False)]),  # and resets the count
    ],
)
def test_ban_backoff(events: list[tuple[str, float]], checks: list[tuple[float, bool]]) -> None:
    bans = BanList(base_s=2.0, max_s=300.0)
    for kind, when in events:
        if kind == "fail":
            bans.fail("p", when)
        else:
            bans.succeed("p")
    for when, banned in checks:
        assert bans.is_banned("p", when) is banned, when
        assert ("p" in bans.banned(when)) is banned


@pytest.mark.parametrize(("failures", "duration"), [(1, 2.0), (2, 4.0), (5, 32.0), (8, 256.0), (9, 300.0), (30, 300.0)])
def test_ban_duration_doubles_up_to_the_cap(failures: int, duration: float) -> None:
    bans = BanList(base_s=2.0, max_s=300.0)
    durations = [bans.fail("p", 0.0) for _ in range(failures)]
    assert durations[-1] == duration


@pytest.mark.parametrize(
    ("params", "streamed", "expected"),
    [
        ({"max_tokens": 100}, 30, {"max_tokens": 70}),
        ({"max_tokens": 10}, 30, {"max_tokens": 1}),
        ({"max_completion_tokens": 50, "temperature": 0}, 5, {"max_completion_tokens": 45, "temperature": 0}),
        ({"temperature": 0.5}, 5, {"temperature": 0.5}),
    ],
)
def test_remaining_tokens(params: dict[str, object], streamed: int, expected: dict[str, object]) -> None:
    assert remaining_tokens(params, streamed) == expected


def test_resume_messages() -> None:
    asked = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert resume_messages(asked, "Hel", continuing=False) == [*asked, {"role": "assistant", "content": "Hel"}]
    prefilled = [*asked, {"role": "assistant", "content": "Sure: "}]
    assert resume_messages(prefilled, "Hel", continuing=True)[-1] == {"role": "assistant", "content": "Sure: Hel"}
    assert asked[-1] == {"role": "user", "content": "hi"}  # the caller's list is left alone


def test_a_conversation_goes_back_to_its_peer_while_that_peer_has_a_free_slot() -> None:
    peers = [probe("a"), probe("b"), probe("c")]
    rng = random.Random(5)
    assert {choose_with_affinity(peers, "b", rng, choose_peer).peer_id for _ in range(50)} == {"b"}
    full = [probe("a"), probe("b", free=0, queue=0), probe("c")]
    assert "b" not in {choose_with_affinity(full, "b", rng, choose_peer).peer_id for _ in range(50)}
    # No preference, or a preferred peer that was not probed: the usual choice.
    assert {choose_with_affinity(peers, None, rng, choose_peer).peer_id for _ in range(50)} == {"a", "b", "c"}
    assert choose_with_affinity(peers[:1], "z", rng, choose_peer).peer_id == "a"


def test_conversation_key_is_the_same_for_the_same_turns_only() -> None:
    history = [{"role": "user", "content": "namaste"}, {"role": "assistant", "content": "Namaste! How can I help?"}]
    assert conversation_key(history) == conversation_key([dict(turn) for turn in history])
    assert conversation_key(history) != conversation_key(history[:1])
    assert conversation_key(history) != conversation_key([*history[:1], {"role": "assistant", "content": "Hi"}])
    # The answer a client remembers a peer by is the history the next turn sends.
    answered = resume_messages(history[:1], "Namaste! How can I help?", False)
    assert conversation_key(answered) == conversation_key(history)


def test_claims_do_not_put_a_crowd_of_liars_first_and_proven_peers_lead() -> None:
    honest = make_record(PeerIdentity.generate(), slots_total=4, slots_free=1)
    liars = [make_record(PeerIdentity.generate(), slots_total=4096, slots_free=4096) for _ in range(60)]
    firsts = Counter(
        candidates_to_probe([*liars, honest], set(), 3, random.Random(seed))[0].peer_id == honest.peer_id
        for seed in range(610)
    )
    assert 0 < firsts[True] < 30  # about 1 in 61: shuffled in with the liars, not behind all of them
    for seed in range(20):
        assert candidates_to_probe([*liars, honest], set(), 3, random.Random(seed), {honest.peer_id})[0] == honest


@pytest.mark.parametrize(
    ("in_flight", "queued", "wave", "due", "expected"),
    [
        (0, 61, 3, False, 3),  # the first wave
        (3, 58, 6, False, 0),  # probes in flight and the interval has not passed: wait
        (3, 58, 6, True, 6),  # it passed without a usable peer: the next, twice as large
        (0, 58, 6, False, 6),  # every probe in flight ended (failed): at once
        (60, 30, 48, True, 4),  # at most 64 in flight
        (2, 0, 12, True, 0),  # nobody left to probe
    ],
)
def test_probe_waves(in_flight: int, queued: int, wave: int, due: bool, expected: int) -> None:
    assert probes_to_launch(in_flight, queued, wave, 64, due) == expected


def test_sixty_silent_peers_are_all_in_flight_within_five_waves() -> None:
    in_flight, queued, wave, waves = 0, 61, 3, 0
    while queued:
        started = probes_to_launch(in_flight, queued, wave, 64, due=True)
        in_flight, queued, wave, waves = in_flight + started, queued - started, wave * 2, waves + 1
    assert waves == 5 and waves * wave_interval_s(2.0, 5.0) < 5.0 / 2  # within half the default choice deadline
