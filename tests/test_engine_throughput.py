"""Retry-After: the measured rate of finished requests, and the wait it gives a turned-away client."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence

import pytest

from peerinfer.engine.base import Generation, SamplingParams
from peerinfer.engine.scheduler import BatchScheduler, Sampled, SlotWork
from peerinfer.engine.throughput import FALLBACK_REQUEST_S, MAX_RETRY_AFTER_S, Throughput, retry_after_s
from peerinfer.errors import OverloadedError


@pytest.mark.parametrize(
    ("ahead", "per_s", "slots", "wait"),
    [
        (17, 16 / 19.5, 4, 21),  # the report: 16 drained in 19.5 s, so 17 take 20.7 s (it said 42 to 49)
        (1, 2.0, 4, 1),  # never below 1 s
        (4, 2.0, 4, 2),
        (5, 2.0, 4, 3),  # whole seconds, rounded up
        (10, 0.01, 4, MAX_RETRY_AFTER_S),  # never above the cap
        (0, 1.0, 4, 1),
        (4, None, 4, 5),  # nothing measured yet: one request per slot every FALLBACK_REQUEST_S
        (8, None, 2, 20),
    ],
)
def test_retry_after_is_the_time_for_the_requests_ahead_to_finish(
    ahead: int, per_s: float | None, slots: int, wait: int
) -> None:
    assert FALLBACK_REQUEST_S == 5.0
    assert retry_after_s(ahead, per_s, slots) == wait


def run(measured: Throughput, finishes: Sequence[tuple[float, int]]) -> Throughput:
    for busy_s, finished in finishes:
        measured = measured.after(busy_s, finished)
    return measured


@pytest.mark.parametrize(
    ("finishes", "per_s"),
    [
        ([], None),  # nothing finished yet
        ([(3.0, 0)], None),
        ([(1.0, 1)], 1.0),
        ([(0.5, 1)] * 40, 2.0),  # steady: 2 per second
        ([(1.0, 4)] * 10, 4.0),  # four slots finishing in the same step: bursts count as what they are
        ([(2.0, 0), (0.0, 4)] * 10, 2.0),  # long steps, then several at once
    ],
)
def test_the_measured_rate_is_requests_finished_per_busy_second(
    finishes: list[tuple[float, int]], per_s: float | None
) -> None:
    measured = run(Throughput(), finishes)
    if per_s is None:
        assert measured.per_s is None
    else:
        assert measured.per_s == pytest.approx(per_s)


def test_the_rate_follows_a_change_within_a_few_time_constants_of_busy_time() -> None:
    slow = run(Throughput(), [(1.0, 1)] * 120)  # 1 per second for 2 minutes
    fast = run(slow, [(0.25, 1)] * 4 * 90)  # then 4 per second for 90 s (three time constants)
    assert slow.per_s == pytest.approx(1.0)
    assert fast.per_s is not None and 3.5 < fast.per_s <= 4.0
    # Idle time is not busy time: it neither counts as slow nor makes the measurement forget.
    assert fast.after(0.0, 0) == fast


class ClockedBackend:
    """Each decode call takes 0.1 s of a fake clock; replies 'x' three times, then ends.

    Once ``hold`` is set, the next call waits for ``resume`` (the slots stay busy, the queue fills).
    """

    n_ctx_per_slot = 1000

    def __init__(self) -> None:
        self.now = 0.0
        self.calls = 0
        self.replies: dict[int, list[int]] = {}
        self.hold = threading.Event()
        self.holding = threading.Event()
        self.resume = threading.Event()

    def begin(self, slot: int, params: SamplingParams, keep: int) -> int:
        self.replies[slot] = [ord("x")] * 3 + [0]
        return keep

    def decode(self, work: Sequence[SlotWork], spare: Mapping[int, int]) -> dict[int, Sampled]:
        if self.hold.is_set():
            self.holding.set()
            self.resume.wait(timeout=60)
        self.calls += 1
        self.now += 0.1
        return {item.slot: Sampled(self.replies[item.slot].pop(0)) for item in work if item.want_output}

    def piece(self, token: int) -> bytes:
        return bytes([token])

    def is_end(self, token: int) -> bool:
        return token == 0

    def release(self, slot: int, keep: int) -> int:
        return keep

    def copy(self, source: int, target: int) -> None:
        pass


def test_a_full_queue_answers_with_the_wait_that_the_measured_rate_gives() -> None:
    backend = ClockedBackend()
    scheduler = BatchScheduler(backend, slots=2, max_queue=2, prefill_chunk=8, clock=lambda: backend.now)

    async def scenario() -> tuple[OverloadedError, float, int]:
        loop = asyncio.get_running_loop()
        measured = [Generation([n], SamplingParams(max_tokens=10), loop) for n in (1, 2, 3, 4)]
        for generation in measured:
            scheduler.submit(generation)
        scheduler.start()
        for generation in measured:
            [event async for event in generation.stream()]
        calls = backend.calls
        backend.hold.set()
        full = [Generation([n], SamplingParams(max_tokens=10), loop) for n in (5, 6, 7, 8)]
        for generation in full:  # two take the slots, two wait
            scheduler.submit(generation)
        assert await asyncio.to_thread(backend.holding.wait, 60)
        rate = scheduler._throughput.per_s  # the decoding thread is held: nothing changes it now
        assert rate is not None
        try:
            scheduler.submit(Generation([9], SamplingParams(max_tokens=10), loop))
        except OverloadedError as exc:
            refused = exc
        else:
            raise AssertionError("a full queue took the request")
        backend.resume.set()
        for generation in full:
            [event async for event in generation.stream()]
        return refused, rate, calls

    try:
        refused, rate, calls = asyncio.run(scenario())
    finally:
        backend.resume.set()
        scheduler.close()
    # Busy time is the decode calls' (0.1 s each on the fake clock): 4 requests in that time.
    assert rate == pytest.approx(4 / (0.1 * calls), rel=0.05)
    # Ahead of the refused client: the 2 waiting, and its own turn.
    assert refused.retry_after == retry_after_s(3, rate, 2)
