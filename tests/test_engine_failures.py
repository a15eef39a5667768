"""Failed decode calls, driven through the real scheduler by a backend that keeps a KV cache as llama.cpp does.

``ContextBackend`` holds each slot's cells and fails a call the way ``llama_decode`` does (status 1,
nothing written) when a row does not go right after its slot's last cell or has no cell left in the
slot's context. It adds throw-away rows exactly where ``LlamaBackend`` would (``batching.fillers``),
with padding forced on or off, so the scheduler's choice of spare slots is what is tested.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, Mapping, Sequence

import pytest
from fastapi.testclient import TestClient

from peerinfer.engine.base import EngineStats, Finished, Generation, ModelInfo, SamplingParams, TextDelta
from peerinfer.engine.batching import fillers
from peerinfer.engine.scheduler import BatchScheduler, Sampled, SlotWork
from peerinfer.errors import EngineError
from peerinfer.server.app import create_app
from tests.conftest import worker_settings

PAD_TOKEN = 1
POISON = 999  # a prompt that starts with it cannot be decoded past its prompt (a request that breaks llama.cpp)
PADDING = {"throw-away rows for every step size": frozenset({1, 2, 3}), "no padding rows": frozenset()}


class ContextBackend:
    """llama.cpp's per-slot KV cache in miniature; replies with letters that depend on all of a slot's cells."""

    def __init__(self, n_ctx: int = 64, pad_rows: frozenset[int] = frozenset()) -> None:
        self.n_ctx_per_slot = n_ctx
        self.pad_rows = pad_rows
        self.cells: dict[int, list[int]] = {}
        self.failed_calls = 0
        self.broken = False  # every call fails, as from a context that cannot decode at all
        self.rows: list[list[tuple[int, int, int]]] = []  # (slot, start, tokens) of every call, throw-away rows too

    def begin(self, slot: int, params: SamplingParams, keep: int) -> int:
        del self.cells.setdefault(slot, [])[keep:]
        return keep

    def decode(self, work: Sequence[SlotWork], spare: Mapping[int, int]) -> dict[int, Sampled]:
        pad = sum(1 for item in work if item.want_output) in self.pad_rows
        extra = fillers([item.slot for item in work], spare, pad)
        added = [SlotWork(slot, [PAD_TOKEN], spare[slot], False) for slot in extra.without_logits]
        if extra.with_logits is not None:
            added.append(SlotWork(extra.with_logits, [PAD_TOKEN], spare[extra.with_logits], True))
        rows = sorted([*work, *added], key=lambda item: item.slot)
        self.rows.append([(row.slot, row.start, len(row.tokens)) for row in rows])
        if self.broken or any(self._refuses(row) for row in rows):
            self.failed_calls += 1
            raise EngineError(
                f"llama_decode failed with status 1 on a batch of {sum(len(r.tokens) for r in rows)} tokens"
            )
        for row in rows:
            self.cells.setdefault(row.slot, []).extend(row.tokens)
        sampled = {item.slot: Sampled(self.reply(self.cells[item.slot])) for item in work if item.want_output}
        for row in added:
            del self.cells[row.slot][row.start :]
        return sampled

    def _refuses(self, row: SlotWork) -> bool:
        held = self.cells.get(row.slot, [])
        if row.start != len(held) or row.start + len(row.tokens) > self.n_ctx_per_slot:
            return True  # not right after the last cell (llama.cpp requires it), or past the context
        return bool(held) and held[0] == POISON and len(row.tokens) == 1 and row.start > 4

    @staticmethod
    def reply(cells: Sequence[int]) -> int:
        return ord("a") + (sum(cells) * 31 + len(cells)) % 26  # never the end token: runs to max_tokens

    def piece(self, token: int) -> bytes:
        return bytes([token])

    def is_end(self, token: int) -> bool:
        return token == 0

    def release(self, slot: int, keep: int) -> int:
        del self.cells.setdefault(slot, [])[keep:]
        return keep

    def copy(self, source: int, target: int) -> None:
        self.cells[target] = list(self.cells.get(source, []))


def scheduler_for(backend: ContextBackend, **options: object) -> BatchScheduler:
    values: dict[str, object] = {"slots": 4, "max_queue": 8, "prefill_chunk": 16, "cut_invariant": True}
    values.update(options)
    return BatchScheduler(backend, **values)  # type: ignore[arg-type]


async def complete(scheduler: BatchScheduler, prompt: list[int], max_tokens: int) -> tuple[Finished, str]:
    generation = Generation(prompt, SamplingParams(max_tokens=max_tokens, temperature=0), asyncio.get_running_loop())
    scheduler.submit(generation)
    events = [event async for event in generation.stream()]
    final = events[-1]
    assert isinstance(final, Finished)
    return final, "".join(event.text for event in events if isinstance(event, TextDelta))


def alone(prompt: list[int], max_tokens: int) -> str:
    """The text a fresh scheduler gives for ``prompt`` with nothing else running."""
    scheduler = scheduler_for(ContextBackend())
    scheduler.start()
    try:
        final, text = asyncio.run(complete(scheduler, prompt, max_tokens))
    finally:
        scheduler.close()
    assert final.reason == "length"
    return text


FIRST = list(range(100, 126))  # 26 tokens, as in the report
THIRD = list(range(200, 223))  # 23 tokens
WORDS = [7] * 60  # fills a 64-token slot to its end with max_tokens 32: finish "length" at 64 cells


@pytest.mark.parametrize("pad_rows", list(PADDING.values()), ids=list(PADDING))
def test_a_slot_filled_to_the_end_of_its_context_does_not_fail_requests_in_other_slots(
    pad_rows: frozenset[int],
) -> None:
    backend = ContextBackend(n_ctx=64, pad_rows=pad_rows)
    scheduler = scheduler_for(backend)
    scheduler.start()
    extended = ([*FIRST, 1, 2, 3], [*THIRD, 4, 5])

    async def scenario() -> list[tuple[Finished, str]]:
        results = [await complete(scheduler, FIRST, 4)]  # slot 0
        results.append(await complete(scheduler, WORDS, 32))  # slot 1, now holding 64 cells: all of its context
        results.append(await complete(scheduler, THIRD, 4))  # slot 2
        # Both at once: they find their starts in slots 0 and 2 and generate together, slot 1 between them.
        results += await asyncio.gather(*(complete(scheduler, prompt, 6) for prompt in extended))
        return results

    try:
        results = asyncio.run(scenario())
        stats = scheduler.stats()
    finally:
        scheduler.close()
    assert [final.reason for final, _ in results] == ["length"] * 5, [final.error for final, _ in results]
    assert results[1][0].prompt_tokens + results[1][0].completion_tokens - 1 == 64  # the slot really was full
    assert [final.cached_tokens for final, _ in results[3:]] == [len(FIRST), len(THIRD)]  # from slots 0 and 2
    assert [text for _, text in results[3:]] == [alone(prompt, 6) for prompt in extended]
    assert backend.failed_calls == 0
    assert all(start < 64 for call in backend.rows for _, start, _ in call)
    assert stats.decode_failures == 0 and not stats.failing


def test_a_request_that_cannot_be_decoded_fails_alone_and_the_others_keep_their_text() -> None:
    backend = ContextBackend(n_ctx=256, pad_rows=frozenset({1, 2, 3}))
    scheduler = scheduler_for(backend)
    scheduler.start()
    good, poisoned = [*FIRST, 5], [POISON, *THIRD]

    async def scenario() -> list[tuple[Finished, str]]:
        together = await asyncio.gather(complete(scheduler, good, 12), complete(scheduler, poisoned, 12))
        later = await complete(scheduler, THIRD, 5)  # the worker goes on serving
        return [*together, later]

    try:
        (good_final, good_text), (bad_final, _), (later_final, later_text) = asyncio.run(scenario())
        stats = scheduler.stats()
    finally:
        scheduler.close()
    assert backend.failed_calls > 0  # the poisoned request did break calls it was in ...
    assert bad_final.reason == "error" and bad_final.error is not None and "llama_decode failed" in bad_final.error
    # ... but only it failed: the request batched with it got the text it gets alone.
    assert (good_final.reason, good_text) == ("length", alone(good, 12))
    assert (later_final.reason, later_text) == ("length", alone(THIRD, 5))
    assert stats.decode_failures == 0  # later calls worked: the engine is not failing


def test_a_failed_call_forgets_the_free_slots_offered_for_throw_away_rows() -> None:
    """A free slot whose record says it holds less than its cache does (a bug, or llama.cpp keeping a failed
    call's cells) would fail every call that gives it a throw-away row; after one failure it holds nothing."""
    backend = ContextBackend(n_ctx=256, pad_rows=frozenset({1, 2, 3}))
    scheduler = scheduler_for(backend)
    scheduler.start()

    async def scenario() -> list[Finished]:
        first, _ = await complete(scheduler, FIRST, 4)  # slot 0 keeps 29 tokens
        backend.cells[0].append(5)  # its cache now holds one cell more than the scheduler knows
        return [first, *[(await complete(scheduler, THIRD, 4))[0] for _ in range(3)]]

    try:
        finished = asyncio.run(scenario())
    finally:
        scheduler.close()
    assert [final.reason for final in finished] == ["length"] * 4
    assert backend.failed_calls == 1  # one call with slot 0's throw-away row failed; it was retried without it
    assert backend.cells[0] == []


class ScriptedEngine:
    """An ``Engine`` over the real scheduler and a ``ContextBackend`` (byte tokens, as the fake engine's)."""

    def __init__(self, backend: ContextBackend) -> None:
        self.backend = backend
        self.scheduler = scheduler_for(backend, probe_interval_s=0.01)
        self.info = ModelInfo("scripted", "scripted.gguf", "0" * 64, 0, backend.n_ctx_per_slot, 4, 1, None, "", "")

    def load(self) -> None:
        self.scheduler.start()

    def tokenize(self, text: str, *, add_bos: bool) -> list[int]:
        return list(text.encode())

    def submit(self, generation: Generation) -> None:
        self.scheduler.submit(generation)

    def stats(self) -> EngineStats:
        return self.scheduler.stats()

    def close(self) -> None:
        self.scheduler.close()


@pytest.fixture
def scripted() -> Iterator[tuple[TestClient, ContextBackend]]:
    engine = ScriptedEngine(ContextBackend(n_ctx=256))
    app = create_app(worker_settings(n_ctx=256), engine)
    try:
        with TestClient(app) as client:
            while client.get("/health").status_code != 200:
                time.sleep(0.01)
            yield client, engine.backend
    finally:
        engine.close()


def wait_for_health(client: TestClient, status: str) -> dict[str, object]:
    deadline = time.monotonic() + 60  # a guard against hanging, not a measurement
    while (body := client.get("/health").json())["status"] != status:
        assert time.monotonic() < deadline, body
        time.sleep(0.01)
    return dict(body)


def test_health_says_degraded_while_the_engine_cannot_decode_and_ok_once_it_can(
    scripted: tuple[TestClient, ContextBackend],
) -> None:
    client, backend = scripted
    body = {"prompt": "hello there", "max_tokens": 3}
    assert client.post("/v1/completions", json=body).status_code == 200
    backend.broken = True
    failed = client.post("/v1/completions", json=body)
    assert failed.status_code == 500 and "llama_decode failed" in failed.json()["error"]["message"]
    health = client.get("/health")
    assert health.status_code == 503
    degraded = health.json()
    assert degraded["status"] == "degraded" and "llama_decode failed" in str(degraded["error"])
    assert int(degraded["decode_failures"]) >= 1 and degraded["slots_free"] == 4
    # Nothing is sent to it while it is degraded (routed clients skip it): it finds out by itself.
    backend.broken = False
    recovered = wait_for_health(client, "ok")
    assert "error" not in recovered and client.get("/health").status_code == 200
    assert client.post("/v1/completions", json=body).status_code == 200


class BlockingBackend(ContextBackend):
    """``copy`` or ``begin`` waits for ``go`` once ``armed`` is set, as a 38 MB KV copy keeps the thread busy.

    Also holds the first decode call after slot 0 holds more than ``hold_after`` cells until ``resume``.
    """

    def __init__(self, blocking: str, hold_after: int) -> None:
        super().__init__(n_ctx=256)
        self.blocking = blocking
        self.armed = threading.Event()
        self.inside = threading.Event()
        self.go = threading.Event()
        self.hold_after: int | None = hold_after
        self.held = threading.Event()
        self.resume = threading.Event()

    def decode(self, work: Sequence[SlotWork], spare: Mapping[int, int]) -> dict[int, Sampled]:
        if self.hold_after is not None and len(self.cells.get(0, [])) > self.hold_after:
            self.hold_after = None
            self.held.set()
            self.resume.wait(timeout=60)
        return super().decode(work, spare)

    def _block(self, method: str) -> None:
        if method == self.blocking and self.armed.is_set():
            self.inside.set()
            self.go.wait(timeout=60)

    def begin(self, slot: int, params: SamplingParams, keep: int) -> int:
        self._block("begin")
        return super().begin(slot, params, keep)

    def copy(self, source: int, target: int) -> None:
        self._block("copy")
        super().copy(source, target)


@pytest.mark.parametrize("blocking", ["copy", "begin"])
def test_stats_and_submit_return_while_the_backend_copies_or_cuts_a_cache(blocking: str) -> None:
    shared = list(range(100, 140))
    backend = BlockingBackend(blocking, hold_after=len(shared))
    scheduler = scheduler_for(backend, max_queue=1)
    scheduler.start()
    answers: list[object] = []

    async def scenario() -> list[Finished]:
        loop = asyncio.get_running_loop()
        first = Generation([*shared, 1], SamplingParams(max_tokens=40, temperature=0), loop)
        scheduler.submit(first)
        assert await asyncio.to_thread(backend.held.wait, 60)  # slot 0 has read the shared start, and is busy
        backend.armed.set()
        # Shares the start that busy slot 0 holds: it is copied from there, then cut.
        second = Generation([*shared, 2], SamplingParams(max_tokens=3, temperature=0), loop)
        scheduler.submit(second)
        backend.resume.set()
        assert await asyncio.to_thread(backend.inside.wait, 60)

        def from_the_event_loop() -> None:  # what the server's event loop does meanwhile
            answers.append(scheduler.stats())
            third = Generation([5, 6], SamplingParams(max_tokens=2, temperature=0), loop)
            scheduler.submit(third)
            answers.append(third)

        caller = threading.Thread(target=from_the_event_loop, daemon=True)
        caller.start()
        caller.join(timeout=20)  # generous: this is "does it return at all", not a timing
        returned = not caller.is_alive()
        backend.go.set()
        finished = [await final(generation) for generation in (first, second)]
        if returned:
            third = answers[1]
            assert isinstance(third, Generation)
            finished.append(await final(third))
        assert returned, f"stats() and submit() waited while the backend's {blocking} ran"
        return finished

    try:
        finished = asyncio.run(scenario())
    finally:
        backend.resume.set()
        backend.go.set()
        scheduler.close()
    stats = answers[0]
    assert isinstance(stats, EngineStats) and stats.slots_busy == 2  # the request being admitted holds its slot
    assert [final.reason for final in finished] == ["length"] * 3
    assert finished[1].cached_tokens == len(shared)


async def final(generation: Generation) -> Finished:
    events = [event async for event in generation.stream()]
    assert isinstance(events[-1], Finished)
    return events[-1]
