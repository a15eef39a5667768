"""A slot filled to the end of its context, on the real model: the other slots go on serving.

The report (issue 10): a prompt that filled slot 1 to the last cell of its context made the next two
requests batched around it fail with ``llama_decode failed with status 1``, and every later request
on a worker that padded 1-row steps with a throw-away row. Small contexts keep these quick.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from peerinfer.engine.base import Finished, Generation, SamplingParams, TextDelta
from peerinfer.engine.llama import LlamaBackend, LlamaEngine
from peerinfer.engine.model_files import open_model_file
from peerinfer.engine.scheduler import SlotWork
from peerinfer.errors import EngineError
from tests.conftest import worker_settings

pytestmark = pytest.mark.real

N_CTX = 256
PADDING = {"throw-away rows for every step size": frozenset({1, 2, 3}), "no padding rows": frozenset()}
BOS = 2  # Gemma's; token ids are used directly so that this test does not depend on the tokenizer's API
FIRST = [BOS, *range(1000, 1025)]  # 26 tokens, as in the report
THIRD = [BOS, *range(2000, 2022)]  # 23 tokens
FILLING = [BOS] + [3000] * (N_CTX - 7)  # with max_tokens 32 it ends "length" with the slot full


@pytest.fixture(scope="module", params=list(PADDING.values()), ids=list(PADDING))
def engine(request: pytest.FixtureRequest) -> Iterator[LlamaEngine]:
    engine = LlamaEngine(worker_settings(slots=4, n_ctx=N_CTX), pad_rows=request.param)
    engine.load()
    yield engine
    engine.close()


async def complete(engine: LlamaEngine, prompt: list[int], max_tokens: int) -> tuple[Finished, str]:
    generation = Generation(prompt, SamplingParams(max_tokens=max_tokens, temperature=0), asyncio.get_running_loop())
    engine.submit(generation)
    events = [event async for event in generation.stream()]
    final = events[-1]
    assert isinstance(final, Finished)
    return final, "".join(event.text for event in events if isinstance(event, TextDelta))


def test_a_full_slot_does_not_fail_the_requests_batched_around_it(engine: LlamaEngine) -> None:
    extended = ([*FIRST, 4000, 4001, 4002], [*THIRD, 4003, 4004])

    async def scenario() -> list[tuple[Finished, str]]:
        results = [await complete(engine, FIRST, 4)]  # slot 0
        results.append(await complete(engine, FILLING, 32))  # slot 1, to the last cell of its context
        results.append(await complete(engine, THIRD, 4))  # slot 2
        # Both at once: they find their starts in slots 0 and 2 and generate together around slot 1.
        results += await asyncio.gather(*(complete(engine, prompt, 8) for prompt in extended))
        # Then each alone, after the others (slot 0 or 2 still holds its start): the same text.
        results += [await complete(engine, prompt, 8) for prompt in extended]
        return results

    results = asyncio.run(scenario())
    assert [final.error for final, _ in results] == [None] * 7
    filled = results[1][0]
    assert (filled.reason, filled.prompt_tokens + filled.completion_tokens - 1) == ("length", N_CTX)
    assert [final.cached_tokens for final, _ in results[3:5]] == [len(FIRST), len(THIRD)]
    assert [text for _, text in results[3:5]] == [text for _, text in results[5:]]
    stats = engine.stats()
    assert stats.decode_failures == 0 and stats.slots_busy == 0


@pytest.fixture(scope="module")
def backend() -> Iterator[LlamaBackend]:
    settings = worker_settings(slots=3, n_ctx=N_CTX)  # llama.cpp rounds a context up to a multiple of 256
    backend = LlamaBackend(open_model_file(settings.model, settings.cache_dir), settings)
    backend.calibrate(pad_rows=frozenset({1, 2}))
    assert backend.n_ctx_per_slot == N_CTX
    yield backend
    backend.close()


def test_the_backend_puts_no_throw_away_row_past_a_full_slot_and_refuses_a_row_past_the_context(
    backend: LlamaBackend,
) -> None:
    for slot in range(3):
        backend.release(slot, 0)
    backend.begin(1, SamplingParams(max_tokens=1, temperature=0), 0)
    filling = [BOS] + [3000] * (N_CTX - 1)
    for start in range(0, N_CTX, 64):  # slot 1: every cell of its context, in calls of at most 64 rows
        backend.decode([SlotWork(1, filling[start : start + 64], start, False)], {})
    for slot in (0, 2):
        backend.begin(slot, SamplingParams(max_tokens=1, temperature=0), 0)
    # Slot 1 sits between 0 and 2, with no cell left: offered for a throw-away row it must be passed over.
    sampled = backend.decode([SlotWork(0, FIRST, 0, True), SlotWork(2, THIRD, 0, True)], {1: N_CTX})
    assert set(sampled) == {0, 2}
    alone = backend.decode([SlotWork(0, [sampled[0].token], len(FIRST), True)], {1: N_CTX, 2: len(THIRD)})
    assert set(alone) == {0}
    with pytest.raises(EngineError, match=f"do not fit its {N_CTX}-token context"):
        backend.decode([SlotWork(1, [5], N_CTX, True)], {})
    # Slot 1 is as it was: cut back by one cell, its last position takes a row.
    assert backend.begin(1, SamplingParams(max_tokens=1, temperature=0), N_CTX - 1) == N_CTX - 1
    assert set(backend.decode([SlotWork(1, [5], N_CTX - 1, True)], {})) == {1}
    for slot in range(3):
        backend.release(slot, 0)
