"""Continuous batching decisions, observed through a recording backend (no llama.cpp)."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Mapping, Sequence

import pytest

from peerinfer.engine.base import Finished, Generation, SamplingParams, TextDelta, deliver
from peerinfer.engine.batching import PromptShare
from peerinfer.engine.scheduler import BatchScheduler, Sampled, SlotWork
from peerinfer.errors import EngineError


class RecordingBackend:
    """Replies 'ab' then ends; records every decode call."""

    n_ctx_per_slot = 1000

    def __init__(self) -> None:
        self.calls: list[list[tuple[int, int, int]]] = []
        self.replies: dict[int, list[int]] = {}

    def begin(self, slot: int, params: SamplingParams, keep: int) -> int:
        self.replies[slot] = [ord("a"), ord("b"), 0]
        return keep

    def decode(self, work: Sequence[SlotWork], spare: Mapping[int, int]) -> dict[int, Sampled]:
        self.calls.append([(item.slot, item.start, len(item.tokens)) for item in work])
        return {item.slot: Sampled(self.replies[item.slot].pop(0)) for item in work if item.want_output}

    def piece(self, token: int) -> bytes:
        return bytes([token])

    def is_end(self, token: int) -> bool:
        return token == 0

    def release(self, slot: int, keep: int) -> int:
        self.replies.pop(slot, None)
        return keep


async def run_all(scheduler: BatchScheduler, prompts: list[list[int]], start: bool = True) -> list[str]:
    """Submit every prompt, then (``start``) start the scheduler: they take the slots in order, whatever the timing."""
    loop = asyncio.get_running_loop()
    generations = [Generation(prompt, SamplingParams(max_tokens=10), loop) for prompt in prompts]
    for generation in generations:
        scheduler.submit(generation)
    if start:
        scheduler.start()
    texts = []
    for generation in generations:
        events = [event async for event in generation.stream()]
        assert isinstance(events[-1], Finished) and events[-1].reason == "stop"
        texts.append("".join(event.text for event in events if isinstance(event, TextDelta)))
    return texts


def test_long_prompt_is_read_in_fixed_chunks_between_generation_steps() -> None:
    backend = RecordingBackend()
    scheduler = BatchScheduler(backend, slots=2, max_queue=4, prefill_chunk=4)
    try:
        texts = asyncio.run(run_all(scheduler, [[1, 2], list(range(1, 11))]))
    finally:
        scheduler.close()
    assert texts == ["ab", "ab"]
    # The 10-token prompt is read as 4 + 4 + 2 tokens, at positions 0, 4, 8, each in a call of its own.
    assert [call for call in backend.calls if any(slot == 1 and size > 1 for slot, _, size in call)] == [
        [(1, 0, 4)],
        [(1, 4, 4)],
        [(1, 8, 2)],
    ]
    # The short request kept generating while the long prompt was read: no call mixes the two.
    assert all(len({slot for slot, _, size in call if size > 1}) <= 1 for call in backend.calls)


def test_waiting_requests_are_admitted_first_in_first_out_and_cancelled_ones_skipped() -> None:
    backend = RecordingBackend()
    scheduler = BatchScheduler(backend, slots=1, max_queue=4, prefill_chunk=8)

    async def scenario() -> list[str]:
        loop = asyncio.get_running_loop()
        generations = [Generation([n], SamplingParams(max_tokens=10), loop) for n in (1, 2, 3)]
        for generation in generations:
            scheduler.submit(generation)
        generations[1].cancel()
        scheduler.start()
        reasons = []
        for generation in generations:
            events = [event async for event in generation.stream()]
            final = events[-1]
            assert isinstance(final, Finished)
            reasons.append(final.reason)
        return reasons

    try:
        reasons = asyncio.run(scenario())
    finally:
        scheduler.close()
    assert reasons == ["stop", "cancelled", "stop"]
    prompts_read = [call[0][2] for call in backend.calls if call[0][1] == 0]
    assert len(prompts_read) == 2  # the cancelled request never took the slot


class LengthBackend(RecordingBackend):
    """Replies with as many 'x' as the prompt's first token says, then ends.

    The first call after slot 0 is released waits for ``resume``: a request can arrive while the others
    generate, however slow the test's thread is.
    """

    def __init__(self) -> None:
        super().__init__()
        self.released_0 = False
        self.resume = threading.Event()

    def begin(self, slot: int, params: SamplingParams, keep: int) -> int:
        self.replies[slot] = []
        return keep

    def decode(self, work: Sequence[SlotWork], spare: Mapping[int, int]) -> dict[int, Sampled]:
        if self.released_0:
            self.released_0 = False
            self.resume.wait(timeout=60)
        for item in work:
            if item.start == 0:
                self.replies[item.slot] = [ord("x")] * item.tokens[0] + [0]
        return super().decode(work, spare)

    def release(self, slot: int, keep: int) -> int:
        if slot == 0 and not self.resume.is_set():
            self.released_0 = True
        return super().release(slot, keep)


def test_generating_slots_are_decoded_in_slot_order_after_a_slot_is_reused() -> None:
    backend = LengthBackend()
    scheduler = BatchScheduler(backend, slots=3, max_queue=4, prefill_chunk=8)
    scheduler.start()

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        first, second, third = (Generation([n], SamplingParams(max_tokens=50), loop) for n in (1, 30, 30))
        for generation in (first, second, third):
            scheduler.submit(generation)
        [event async for event in first.stream()]
        # Slot 0 is free again: the next request takes it while slots 1 and 2 are still generating.
        fourth = Generation([5], SamplingParams(max_tokens=50), loop)
        scheduler.submit(fourth)
        backend.resume.set()
        for generation in (second, third, fourth):
            [event async for event in generation.stream()]

    try:
        asyncio.run(scenario())
    finally:
        backend.resume.set()
        scheduler.close()
    steps = [[slot for slot, _, size in call] for call in backend.calls if all(size == 1 for _, _, size in call)]
    assert [0, 1, 2] in steps  # the reused slot 0 ran together with 1 and 2 ...
    assert all(slots == sorted(slots) for slots in steps)  # ... and always first
    # Its prompt was read before the running streams' token of that step, not after: its first token
    # does not wait for a whole step. And it joined that step's batch at once, in slot order.
    read = backend.calls.index([(0, 0, 1)], 1)
    joined = backend.calls[read + 1]
    assert [slot for slot, _, _ in joined] == [0, 1, 2]
    assert joined[0][1] == 1  # slot 0's first generated token, right after its 1-token prompt


class ExplodingBackend(RecordingBackend):
    """Raises a non-peerinfer error on the first decode, as a bug would."""

    def __init__(self) -> None:
        super().__init__()
        self.exploded = False

    def decode(self, work: Sequence[SlotWork], spare: Mapping[int, int]) -> dict[int, Sampled]:
        if not self.exploded:
            self.exploded = True
            raise KeyError("a bug")
        return super().decode(work, spare)


def test_an_unexpected_error_fails_the_request_but_the_scheduler_keeps_serving() -> None:
    backend = ExplodingBackend()
    scheduler = BatchScheduler(backend, slots=1, max_queue=4, prefill_chunk=8)
    scheduler.start()

    async def scenario() -> tuple[str, str]:
        loop = asyncio.get_running_loop()
        first = Generation([1], SamplingParams(max_tokens=10), loop)
        scheduler.submit(first)
        failed = [event async for event in first.stream()][-1]
        second = Generation([2], SamplingParams(max_tokens=10), loop)
        scheduler.submit(second)
        served = [event async for event in second.stream()][-1]
        assert isinstance(failed, Finished) and isinstance(served, Finished)
        return failed.reason, served.reason

    try:
        assert asyncio.run(scenario()) == ("error", "stop")
    finally:
        scheduler.close()


def test_events_delivered_together_arrive_in_order_and_a_closed_loop_cancels() -> None:
    async def deliver_two() -> list[list[object]]:
        loop = asyncio.get_running_loop()
        first = Generation([1], SamplingParams(max_tokens=2), loop)
        second = Generation([1], SamplingParams(max_tokens=2), loop)
        deliver([(first, TextDelta("a")), (second, TextDelta("x")), (first, TextDelta("b"))])
        deliver([(first, Finished("stop", 1, 2)), (second, Finished("length", 1, 1))])
        return [[event async for event in generation.stream()] for generation in (first, second)]

    first_events, second_events = asyncio.run(deliver_two())
    assert first_events == [TextDelta("a"), TextDelta("b"), Finished("stop", 1, 2)]
    assert second_events == [TextDelta("x"), Finished("length", 1, 1)]

    closed = asyncio.new_event_loop()
    closed.close()
    orphan = Generation([1], SamplingParams(max_tokens=2), closed)
    deliver([(orphan, TextDelta("a"))])
    assert orphan.cancelled.is_set()  # the scheduler frees its slot at the next step


class ThreadRecordingBackend(RecordingBackend):
    def __init__(self) -> None:
        super().__init__()
        self.threads: set[int] = set()

    def decode(self, work: Sequence[SlotWork], spare: Mapping[int, int]) -> dict[int, Sampled]:
        self.threads.add(threading.get_ident())
        return super().decode(work, spare)


def test_prepare_runs_on_the_decoding_thread_and_its_failure_stops_the_start() -> None:
    backend = ThreadRecordingBackend()
    scheduler = BatchScheduler(backend, slots=1, max_queue=4, prefill_chunk=8)
    try:
        assert (
            scheduler.start(prepare=lambda: (backend.threads.add(threading.get_ident()), "measured")[1]) == "measured"
        )
        assert asyncio.run(run_all(scheduler, [[1]], start=False)) == ["ab"]
    finally:
        scheduler.close()
    assert len(backend.threads) == 1  # the warm-up and every step: one thread

    def broken() -> None:
        raise RuntimeError("llama_decode failed")

    with pytest.raises(RuntimeError, match="llama_decode failed"):
        BatchScheduler(RecordingBackend(), slots=1, max_queue=4, prefill_chunk=8).start(prepare=broken)


class AbcdBackend(RecordingBackend):
    """Replies 'abcd' then ends."""

    def begin(self, slot: int, params: SamplingParams, keep: int) -> int:
        self.replies[slot] = [ord(c) for c in "abcd"] + [0]
        return keep


def test_the_decoder_pauses_once_after_each_streams_first_text_and_not_after_later_tokens() -> None:
    backend = AbcdBackend()
    pauses: list[tuple[int, float]] = []  # (decode calls made so far, seconds)
    scheduler = BatchScheduler(
        backend,
        slots=2,
        max_queue=4,
        prefill_chunk=8,
        first_token_pause_s=0.3,
        sleep=lambda seconds: pauses.append((len(backend.calls), seconds)),
    )
    try:
        texts = asyncio.run(run_all(scheduler, [[1, 2], [3]]))
    finally:
        scheduler.close()
    assert texts == ["abcd", "abcd"]
    # The calls that read a prompt (from position 0) give that stream its 'a': each of those, and no
    # other call (about 10 in all), is followed by the pause.
    reads = [index for index, call in enumerate(backend.calls) if any(start == 0 for _, start, _ in call)]
    assert len(reads) == 2
    assert pauses == [(index + 1, 0.3) for index in reads], backend.calls


class KeepingBackend(RecordingBackend):
    """Also records what each slot is asked to keep, and the spare slots offered to each call."""

    def __init__(self) -> None:
        super().__init__()
        self.kept: list[tuple[str, int, int]] = []
        self.spares: list[dict[int, int]] = []

    def begin(self, slot: int, params: SamplingParams, keep: int) -> int:
        self.kept.append(("begin", slot, keep))
        return super().begin(slot, params, keep)

    def decode(self, work: Sequence[SlotWork], spare: Mapping[int, int]) -> dict[int, Sampled]:
        self.spares.append(dict(spare))
        return super().decode(work, spare)

    def release(self, slot: int, keep: int) -> int:
        self.kept.append(("release", slot, keep))
        return super().release(slot, keep)

    def copy(self, source: int, target: int) -> None:
        self.kept.append(("copy", source, target))


async def finish(scheduler: BatchScheduler, prompt: list[int]) -> Finished:
    generation = Generation(prompt, SamplingParams(max_tokens=10), asyncio.get_running_loop())
    scheduler.submit(generation)
    events = [event async for event in generation.stream()]
    assert isinstance(events[-1], Finished)
    return events[-1]


def test_a_prompt_that_starts_like_an_earlier_one_goes_to_its_slot_and_reads_only_the_rest() -> None:
    backend = KeepingBackend()
    scheduler = BatchScheduler(backend, slots=2, max_queue=4, prefill_chunk=8)
    system = list(range(100, 120))  # 20 tokens: two whole chunks of 8, and 4 more
    scheduler.start()

    async def scenario() -> list[Finished]:
        first = await finish(scheduler, [*system, 1, 2])
        other = await finish(scheduler, [7, 7, 7])  # nothing to reuse: the empty slot, keeping slot 0's
        second = await finish(scheduler, [*system, 3, 4, 5])
        return [first, other, second]

    try:
        first, other, second = asyncio.run(scenario())
    finally:
        scheduler.close()
    assert backend.kept == [
        ("begin", 0, 0),
        ("release", 0, 16),  # the prompt's whole chunks stay in slot 0 ...
        ("begin", 1, 0),
        ("release", 1, 0),  # ... a 3-token prompt has none
        ("begin", 0, 16),  # ... and the prompt that starts the same way finds them there
        ("release", 0, 16),
    ]
    assert (first.cached_tokens, other.cached_tokens, second.cached_tokens) == (0, 0, 16)
    assert second.prompt_tokens == 23
    reads = [call for call in backend.calls if any(size > 1 for _, _, size in call)]
    assert reads[-1] == [(0, 16, 7)]  # only the last 7 prompt tokens were read, from position 16
    # While slot 1 decoded, slot 0 (free, holding 16 positions) was offered for throw-away rows after them.
    other_calls = [spare for call, spare in zip(backend.calls, backend.spares, strict=True) if call[0][0] == 1]
    assert other_calls and all(spare == {0: 16} for spare in other_calls)


def test_nothing_is_kept_when_prompt_reuse_is_off() -> None:
    backend = KeepingBackend()
    scheduler = BatchScheduler(backend, slots=1, max_queue=4, prefill_chunk=8, reuse_prompts=False)
    scheduler.start()

    async def scenario() -> list[Finished]:
        return [await finish(scheduler, list(range(100, 120))) for _ in range(2)]

    try:
        finished = asyncio.run(scenario())
    finally:
        scheduler.close()
    assert [item.cached_tokens for item in finished] == [0, 0]
    assert backend.kept == [("begin", 0, 0), ("release", 0, 0)] * 2


class FailingStepBackend(KeepingBackend):
    """Fails every call that decodes generated tokens (after the prompt was read)."""

    def decode(self, work: Sequence[SlotWork], spare: Mapping[int, int]) -> dict[int, Sampled]:
        if all(len(item.tokens) == 1 for item in work):
            raise EngineError("llama_decode failed")
        return super().decode(work, spare)


def test_a_request_that_fails_keeps_nothing_in_its_slot() -> None:
    backend = FailingStepBackend()
    scheduler = BatchScheduler(backend, slots=1, max_queue=4, prefill_chunk=8)
    scheduler.start()
    try:
        failed = asyncio.run(finish(scheduler, list(range(100, 120))))
    finally:
        scheduler.close()
    assert failed.reason == "error"
    assert backend.kept == [("begin", 0, 0), ("release", 0, 0)]


class HeldBackend(KeepingBackend):
    """Its second ``begin`` waits for ``resume``: requests submitted meanwhile arrive while that one is admitted."""

    def __init__(self) -> None:
        super().__init__()
        self.resume = threading.Event()

    def begin(self, slot: int, params: SamplingParams, keep: int) -> int:
        if sum(1 for kind, _, _ in self.kept if kind == "begin") == 1:
            self.resume.wait(timeout=60)
        return super().begin(slot, params, keep)


def test_a_request_copies_a_shared_prompt_from_a_busy_slot_rather_than_read_it_again() -> None:
    backend = HeldBackend()
    scheduler = BatchScheduler(backend, slots=2, max_queue=4, prefill_chunk=8)
    system = list(range(100, 120))
    scheduler.start()

    async def scenario() -> list[Finished]:
        await finish(scheduler, [*system, 1])
        # Both arrive while slot 0 is taken: one finds the system prompt in slot 0, the other copies it from there.
        both = asyncio.gather(finish(scheduler, [*system, 2]), finish(scheduler, [*system, 3, 3]))
        await asyncio.sleep(0)  # both are submitted (the first may be held in its begin)
        backend.resume.set()
        return list(await both)

    try:
        finished = asyncio.run(scenario())
    finally:
        backend.resume.set()
        scheduler.close()
    assert [item.cached_tokens for item in finished] == [16, 16]
    assert backend.kept[2:5] == [("begin", 0, 16), ("copy", 0, 1), ("begin", 1, 16)]
    reads = [call for call in backend.calls if any(size > 1 for _, _, size in call)]
    assert reads[-2:] == [[(0, 16, 5)], [(1, 16, 6)]]  # each read only its own last tokens


class GatedBackend(KeepingBackend):
    """Its ``begin`` number ``held`` waits for ``resume``: requests submitted meanwhile are admitted after it."""

    def __init__(self, held: int) -> None:
        super().__init__()
        self.held = held
        self.resume = threading.Event()

    def begin(self, slot: int, params: SamplingParams, keep: int) -> int:
        if sum(1 for kind, _, _ in self.kept if kind == "begin") == self.held - 1:
            self.resume.wait(timeout=60)
        keep = super().begin(slot, params, keep)
        self.replies[slot] = [*b"abcdefgh", 0]  # long enough for the streams to run side by side
        return keep


def test_streams_go_to_neighbouring_slots_and_copy_their_prefix_from_wherever_it_is_kept() -> None:
    # 8 slots, each keeping a different 20-token prompt; then 4 requests for the prompts kept in the
    # odd slots. In those slots, every step would decode 7 rows (the gaps filled) for 4 streams.
    backend = GatedBackend(held=9)
    scheduler = BatchScheduler(backend, slots=8, max_queue=8, prefill_chunk=8)
    prompts = [list(range(100 * n, 100 * n + 20)) for n in range(1, 9)]
    scheduler.start()

    async def scenario() -> list[Finished]:
        for prompt in prompts:
            await finish(scheduler, [*prompt, 1])
        later = asyncio.gather(*(finish(scheduler, [*prompts[n], 2]) for n in (1, 3, 5, 7)))
        await asyncio.sleep(0.05)  # all four are submitted while the first is held in its begin
        first_call.append(len(backend.calls))
        backend.resume.set()
        return list(await later)

    first_call: list[int] = []
    try:
        finished = asyncio.run(scenario())
    finally:
        backend.resume.set()
        scheduler.close()
    assert [kind for kind, _, _ in backend.kept[:16]] == ["begin", "release"] * 8
    assert [slot for kind, slot, _ in backend.kept[:16] if kind == "begin"] == list(range(8))
    later = backend.kept[16:]
    begins = [(slot, keep) for kind, slot, keep in later if kind == "begin"]
    assert sorted(slot for slot, _ in begins) == [0, 1, 2, 3]  # side by side: a step is 4 rows
    assert all(keep == 16 for _, keep in begins)  # ... and no prefix was read again
    assert [item.cached_tokens for item in finished] == [16, 16, 16, 16]
    copies = {target: source for kind, source, target in later if kind == "copy"}
    assert copies == {0: 3, 2: 5, 3: 7}  # slot 1 held its own prompt; the others came by copy
    calls = backend.calls[first_call[0] :]
    steps = [[slot for slot, _, _ in call] for call in calls if all(n == 1 for _, _, n in call)]
    assert [0, 1, 2, 3] in steps


def test_with_a_cut_invariant_backend_reuse_ends_on_any_token_and_takes_in_the_answer() -> None:
    backend = KeepingBackend()
    scheduler = BatchScheduler(backend, slots=1, max_queue=4, prefill_chunk=8, cut_invariant=True)
    system = list(range(100, 120))
    scheduler.start()

    async def scenario() -> list[Finished]:
        first = await finish(scheduler, [*system, 1, 2])  # answers 'a', 'b', then ends
        # The next turn of the conversation: the first prompt, the answer, and a new question.
        second = await finish(scheduler, [*system, 1, 2, ord("a"), ord("b"), 5, 6])
        # A prompt that leaves the conversation after 19 tokens, in the middle of a chunk.
        third = await finish(scheduler, [*system[:19], 9, 9])
        return [first, second, third]

    try:
        first, second, third = asyncio.run(scenario())
    finally:
        scheduler.close()
    # Slot 0 keeps the prompt and the two answer tokens decoded after it (the end token never was).
    assert backend.kept[:3] == [("begin", 0, 0), ("release", 0, 24), ("begin", 0, 24)]
    assert (first.cached_tokens, second.cached_tokens, third.cached_tokens) == (0, 24, 19)
    reads = [call for call in backend.calls if any(size > 1 for _, _, size in call)]
    assert reads[-2:] == [[(0, 24, 2)], [(0, 19, 2)]]


class CostedBackend(RecordingBackend):
    """A prompt chunk costs 8 clock units, a generation call 1; the long request replies at length."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def begin(self, slot: int, params: SamplingParams, keep: int) -> int:
        self.replies[slot] = [ord("a")] * 200 + [0]
        return keep

    def decode(self, work: Sequence[SlotWork], spare: Mapping[int, int]) -> dict[int, Sampled]:
        self.now += 8.0 if any(len(item.tokens) > 1 for item in work) else 1.0
        return super().decode(work, spare)


def _read_while_streaming(share: float) -> tuple[list[list[tuple[int, int, int]]], float]:
    """A stream in slot 0 generates while a 40-token prompt (10 chunks of 4) is read in slot 1.

    Returns the calls and the stream's mean time per token (clock units) while that prompt was read.
    """
    backend = CostedBackend()
    scheduler = BatchScheduler(backend, slots=2, max_queue=4, prefill_chunk=4, prompt_share=share, clock=backend.clock)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        stream = Generation([1], SamplingParams(max_tokens=150), loop)
        long = Generation(list(range(1, 41)), SamplingParams(max_tokens=1), loop)
        scheduler.submit(stream)  # slot 0; its one-token prompt is read first, then it generates
        scheduler.submit(long)  # slot 1
        scheduler.start()
        for generation in (long, stream):
            async for _ in generation.stream():
                pass

    try:
        asyncio.run(scenario())
    finally:
        scheduler.close()
    calls = backend.calls
    reads = [index for index, call in enumerate(calls) if any(slot == 1 and size > 1 for slot, _, size in call)]
    window = calls[reads[0] : reads[-1] + 1]
    tokens = sum(1 for call in window if any(slot == 0 for slot, _, _ in call))
    cost = sum(8.0 if any(size > 1 for _, _, size in call) else 1.0 for call in window)
    return calls, cost / tokens


def test_a_long_prompt_read_at_most_doubles_a_running_streams_time_per_token() -> None:
    calls, per_token = _read_while_streaming(0.5)
    # Alone, a token costs 1 unit. The prompt's 10 chunks cost 8 each: at most half the time goes to them.
    assert per_token <= 2.0 + 8.0 / 10  # the bound, plus one chunk's rounding over the read
    # The whole prompt is still read, in order, in calls of its own.
    reads = [call for call in calls if any(slot == 1 and size > 1 for slot, _, size in call)]
    assert reads == [[(1, start, 4)] for start in range(0, 40, 4)]


def test_with_the_share_at_one_a_chunk_goes_every_step_whatever_it_costs_the_stream() -> None:
    calls, per_token = _read_while_streaming(1.0)
    reads = [index for index, call in enumerate(calls) if any(slot == 1 and size > 1 for slot, _, size in call)]
    assert [b - a for a, b in itertools.pairwise(reads)] == [2] * 9  # chunk, token, chunk, token, ...
    assert per_token > 8.0


def test_a_prompts_first_chunk_waits_for_no_debt_and_nothing_waits_when_nothing_generates() -> None:
    share = PromptShare(0.5).after_chunk(10.0, generating=True)
    assert not share.may_read(generating=True, first_chunk=False)
    assert share.may_read(generating=True, first_chunk=True)
    assert share.may_read(generating=False, first_chunk=False)
    # Generation time pays the debt back one for one at 0.5 (three for one at 0.75).
    assert share.after_generation(4.0).debt_s == 6.0
    assert PromptShare(0.75, 9.0).after_generation(1.0).debt_s == 6.0
    assert share.after_generation(40.0).debt_s == 0.0  # no credit is banked for later
    # Reading while nothing generates costs no one anything.
    assert PromptShare(0.5).after_chunk(10.0, generating=False).debt_s == 0.0
