"""Log-probabilities on deltas, n followers, length finishes and schema bounds: the real scheduler, a fake backend."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest

from peerinfer.engine.base import Finished, Generation, SamplingParams, TextDelta, TokenLogprob
from peerinfer.engine.fake import CHOSEN_LOGPROB, FakeBackend, FakeEngine
from peerinfer.engine.json_schema import MAX_REPEAT, check_schema
from peerinfer.engine.scheduler import BatchScheduler, Sampled, SlotWork
from peerinfer.engine.text import TextAssembler
from peerinfer.errors import OverloadedError, RequestError

PROMPT = "System: you are a helpful assistant that answers briefly.\nUser: hello there\n"


def tokens(text: str) -> list[int]:
    return [byte + 1 for byte in text.encode()]


def fake_scheduler(reply: str, *, slots: int = 4, max_queue: int = 4) -> tuple[BatchScheduler, FakeBackend]:
    backend = FakeBackend(lambda prompt: reply, n_ctx=4096, token_delay_s=0.0)
    scheduler = BatchScheduler(backend, slots=slots, max_queue=max_queue, prefill_chunk=8, cut_invariant=True)
    return scheduler, backend


async def collect(generation: Generation) -> tuple[list[TextDelta], Finished]:
    deltas: list[TextDelta] = []
    async for event in generation.stream():
        if isinstance(event, TextDelta):
            deltas.append(event)
        else:
            return deltas, event
    raise AssertionError("no Finished event")


def text_of(deltas: Sequence[TextDelta]) -> str:
    return "".join(delta.text for delta in deltas)


def logprobs_of(deltas: Sequence[TextDelta]) -> list[TokenLogprob]:
    return [entry for delta in deltas for entry in delta.logprobs]


# TextAssembler at a length finish


def test_a_length_finish_drops_the_start_of_a_stop_string() -> None:
    assembler = TextAssembler(["\nQuestion:"])
    shown = [assembler.feed(piece.encode())[0] for piece in ["source of light.", "\n", "Question"]]
    assert "".join(shown) == "source of light."
    assert assembler.finish(drop_partial_stop=True) == ""


def test_an_ordinary_finish_still_flushes_held_back_text() -> None:
    assembler = TextAssembler(["\nQuestion:"])
    assembler.feed(b"light.")
    assembler.feed(b"\nQues")
    assert assembler.finish() == "\nQues"


def test_a_length_finish_keeps_held_back_text_that_cannot_start_a_stop() -> None:
    assembler = TextAssembler(["\nQuestion:"])
    assert assembler.feed(b"caf\xc3")[0] == "caf"  # half a character
    assert assembler.finish(drop_partial_stop=True) == "\ufffd"


def test_the_scheduler_does_not_leak_a_partial_stop_at_the_token_limit() -> None:
    scheduler, _ = fake_scheduler("It is a source of light.\nQuestion: and then?")
    scheduler.start()

    async def scenario() -> tuple[list[TextDelta], Finished]:
        params = SamplingParams(
            max_tokens=len("It is a source of light.\nQuestion"), stops=("\nQuestion:",), logprobs=0
        )
        generation = Generation(tokens(PROMPT), params, asyncio.get_running_loop())
        scheduler.submit(generation)
        return await collect(generation)

    try:
        deltas, finished = asyncio.run(scenario())
    finally:
        scheduler.close()
    assert finished.reason == "length"
    assert text_of(deltas) == "It is a source of light."
    # the dropped tokens' log-probabilities are dropped with their text
    assert b"".join(entry.piece for entry in logprobs_of(deltas)) == b"It is a source of light."


# Log-probabilities follow the text


def run_one(reply: str, params: SamplingParams) -> tuple[list[TextDelta], Finished]:
    scheduler, _ = fake_scheduler(reply)
    scheduler.start()

    async def scenario() -> tuple[list[TextDelta], Finished]:
        generation = Generation(tokens(PROMPT), params, asyncio.get_running_loop())
        scheduler.submit(generation)
        return await collect(generation)

    try:
        return asyncio.run(scenario())
    finally:
        scheduler.close()


def test_a_character_split_over_tokens_carries_all_of_their_log_probabilities() -> None:
    deltas, finished = run_one("aé😀b", SamplingParams(max_tokens=50, logprobs=2))
    assert finished.reason == "stop"
    assert [delta.text for delta in deltas] == ["a", "é", "😀", "b"]
    assert [len(delta.logprobs) for delta in deltas] == [1, 2, 4, 1]  # one entry per token (byte)
    emoji = deltas[2].logprobs
    assert b"".join(entry.piece for entry in emoji) == "😀".encode()
    assert all(entry.logprob == CHOSEN_LOGPROB and len(entry.top) == 2 for entry in logprobs_of(deltas))
    assert all(entry.top[0].piece == entry.piece for entry in logprobs_of(deltas))


def test_without_logprobs_deltas_carry_none() -> None:
    deltas, _ = run_one("hello", SamplingParams(max_tokens=50))
    assert text_of(deltas) == "hello"
    assert logprobs_of(deltas) == []


def test_tokens_swallowed_by_a_stop_string_have_no_log_probabilities() -> None:
    deltas, finished = run_one("yes END and more", SamplingParams(max_tokens=50, stops=(" END",), logprobs=1))
    assert finished.reason == "stop"
    assert text_of(deltas) == "yes"
    assert b"".join(entry.piece for entry in logprobs_of(deltas)) == b"yes"


def test_held_back_text_that_is_no_stop_after_all_brings_its_log_probabilities() -> None:
    deltas, _ = run_one("a ENx b", SamplingParams(max_tokens=50, stops=(" END",), logprobs=0))
    assert text_of(deltas) == "a ENx b"
    assert b"".join(entry.piece for entry in logprobs_of(deltas)) == b"a ENx b"
    shown = [(delta.text, len(delta.logprobs)) for delta in deltas]
    assert ("ENx", 3) in shown or (" ENx", 4) in shown  # " EN" was held back, then went out with "x"


class RefusingBackend(FakeBackend):
    """Slot 1 cannot sample (as a grammar that allows no token): that slot alone reports an error."""

    def decode(self, work: Sequence[SlotWork], spare: Mapping[int, int]) -> dict[int, Sampled]:
        sampled = super().decode(work, spare)
        if 1 in sampled:
            sampled[1] = Sampled(-1, error="the grammar allows no token here")
        return sampled


def test_a_slot_that_cannot_sample_fails_alone() -> None:
    backend = RefusingBackend(lambda prompt: "fine", n_ctx=4096, token_delay_s=0.0)
    scheduler = BatchScheduler(backend, slots=2, max_queue=4, prefill_chunk=64)
    scheduler.start()

    async def scenario() -> list[tuple[list[TextDelta], Finished]]:
        loop = asyncio.get_running_loop()
        generations = [Generation(tokens(f"{PROMPT}{i}"), SamplingParams(max_tokens=20), loop) for i in range(2)]
        for generation in generations:
            scheduler.submit(generation)
        return list(await asyncio.gather(*(collect(generation) for generation in generations)))

    try:
        (deltas0, finished0), (deltas1, finished1) = asyncio.run(scenario())
    finally:
        scheduler.close()
    assert (text_of(deltas0), finished0.reason) == ("fine", "stop")
    assert (deltas1, finished1.reason, finished1.error) == ([], "error", "the grammar allows no token here")


# n followers


def test_n_followers_read_the_prompt_once_and_give_the_leaders_text() -> None:
    scheduler, backend = fake_scheduler("four times", slots=4)
    prompt = tokens(PROMPT)
    scheduler.start()

    async def scenario() -> list[tuple[list[TextDelta], Finished]]:
        loop = asyncio.get_running_loop()
        leader = Generation(prompt, SamplingParams(max_tokens=50), loop)
        followers = [Generation(prompt, SamplingParams(max_tokens=50), loop, follows=leader) for _ in range(3)]
        scheduler.submit_all([leader, *followers])
        return list(await asyncio.gather(*(collect(g) for g in [leader, *followers])))

    try:
        answers = asyncio.run(scenario())
    finally:
        scheduler.close()
    assert [text_of(deltas) for deltas, _ in answers] == ["four times"] * 4
    assert [finished.cached_tokens for _, finished in answers] == [0] + [len(prompt) - 1] * 3
    assert all(finished.prompt_tokens == len(prompt) for _, finished in answers)
    # The leader read the prompt in chunks of 8; each follower only its last token, in a generation call.
    assert backend.prompt_rows() == len(prompt) + 3
    prompt_calls = [call for call in backend.calls if any(size > 1 for _, _, size, _ in call)]
    assert all(len(call) == 1 and call[0][0] == prompt_calls[0][0][0] for call in prompt_calls)
    joined = [call for call in backend.calls if any(reading and size == 1 for _, _, size, reading in call)]
    assert all(len(call) > 1 for call in joined)  # no call of its own for a follower's last prompt token


def test_without_followers_each_choice_reads_the_prompt_itself() -> None:
    scheduler, backend = fake_scheduler("four times", slots=4)
    prompt = tokens("short prompt")  # under 16 tokens: not worth a copy
    scheduler.start()

    async def scenario() -> list[str]:
        loop = asyncio.get_running_loop()
        leader = Generation(prompt, SamplingParams(max_tokens=50), loop)
        follower = Generation(prompt, SamplingParams(max_tokens=50), loop, follows=leader)
        scheduler.submit_all([leader, follower])
        return [text_of((await collect(g))[0]) for g in (leader, follower)]

    try:
        assert asyncio.run(scenario()) == ["four times"] * 2
    finally:
        scheduler.close()
    assert backend.prompt_rows() == 2 * len(prompt)


class BeginRecordingBackend(FakeBackend):
    def __init__(self) -> None:
        super().__init__(lambda prompt: "ok", n_ctx=4096, token_delay_s=0.0)
        self.begun: list[tuple[int, int]] = []  # (prompt length so far in the slot's cache, keep)

    def begin(self, slot: int, params: SamplingParams, keep: int) -> int:
        self.begun.append((params.max_tokens, keep))
        return super().begin(slot, params, keep)


def test_a_waiting_follower_does_not_hold_up_the_requests_behind_it() -> None:
    backend = BeginRecordingBackend()
    scheduler = BatchScheduler(backend, slots=2, max_queue=8, prefill_chunk=8, cut_invariant=True)
    long_prompt = tokens(PROMPT * 4)  # the leader reads it in many chunks

    async def scenario() -> list[Finished]:
        loop = asyncio.get_running_loop()
        # max_tokens tells the three apart in the backend's record
        leader = Generation(long_prompt, SamplingParams(max_tokens=5), loop)
        follower = Generation(long_prompt, SamplingParams(max_tokens=6), loop, follows=leader)
        other = Generation(tokens("another request entirely"), SamplingParams(max_tokens=7), loop)
        scheduler.submit_all([leader, follower])
        scheduler.submit(other)
        scheduler.start()  # all three wait: the first admission sees them together
        return [(await collect(generation))[1] for generation in (leader, follower, other)]

    try:
        leader_end, follower_end, other_end = asyncio.run(scenario())
    finally:
        scheduler.close()
    # The second slot went to the request behind the follower; the follower came after, copying the prompt.
    assert [max_tokens for max_tokens, _ in backend.begun] == [5, 7, 6]
    assert follower_end.cached_tokens == len(long_prompt) - 1
    assert (leader_end.reason, follower_end.reason, other_end.reason) == ("stop", "stop", "stop")


def test_a_follower_of_a_cancelled_leader_reads_the_prompt_itself() -> None:
    scheduler, _ = fake_scheduler("still here", slots=1)
    prompt = tokens(PROMPT)

    async def scenario() -> tuple[Finished, str]:
        loop = asyncio.get_running_loop()
        leader = Generation(prompt, SamplingParams(max_tokens=50), loop)
        follower = Generation(prompt, SamplingParams(max_tokens=50), loop, follows=leader)
        leader.cancel()
        scheduler.submit_all([leader, follower])
        scheduler.start()
        (_, leader_end), (deltas, _) = await asyncio.gather(collect(leader), collect(follower))
        return leader_end, text_of(deltas)

    try:
        leader_end, text = asyncio.run(scenario())
    finally:
        scheduler.close()
    assert leader_end.reason == "cancelled"
    assert text == "still here"


def test_submit_all_queues_every_choice_or_none() -> None:
    scheduler, _ = fake_scheduler("x", slots=2, max_queue=2)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        first = [Generation(tokens(PROMPT), SamplingParams(max_tokens=1), loop) for _ in range(3)]
        scheduler.submit_all(first)
        with pytest.raises(OverloadedError, match="2 choices"):
            scheduler.submit_all([Generation(tokens(PROMPT), SamplingParams(max_tokens=1), loop) for _ in range(2)])
        assert scheduler.stats().queued == 3  # nothing of the refused request was queued
        scheduler.submit(Generation(tokens(PROMPT), SamplingParams(max_tokens=1), loop))  # the last place
        assert scheduler.stats().queued == 4

    asyncio.run(scenario())  # never started: everything stays queued
    scheduler.close()


# The fake engine's surface


def test_the_fake_engine_offers_submit_all_and_json_grammar() -> None:
    engine = FakeEngine(slots=2)
    assert engine.info.n_vocab == 257 and engine.info.build
    assert "root" in engine.json_grammar(None)
    assert "root" in engine.json_grammar({"type": "object", "properties": {"a": {"type": "string"}}})
    with pytest.raises(RequestError):
        engine.json_grammar({"type": "array", "maxItems": 100000})


# Schema bounds (pure)


def nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


HOSTILE_SCHEMAS: list[tuple[str, object, str]] = [
    ("not an object", [{"type": "string"}], "must be a JSON object"),
    ("a string", "object", "must be a JSON object"),
    ("deep nesting", nested(40), "levels deep"),
    ("very deep nesting", nested(5000), "levels deep"),
    ("maxItems bomb", {"type": "array", "items": {"type": "string"}, "maxItems": 100000}, "maxItems"),
    ("minLength bomb", {"type": "string", "minLength": MAX_REPEAT + 1}, "minLength"),
    ("negative count", {"type": "string", "maxLength": -1}, "maxLength"),
    ("count of the wrong type", {"type": "string", "maxLength": "9"}, "maxLength"),
    ("boolean count", {"type": "array", "minItems": True}, "minItems"),
    ("huge enum", {"enum": list(range(1000))}, "more than 256"),
    ("many properties", {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(300)}}, "256"),
    ("remote $ref", {"$ref": "https://example.com/schema.json"}, "local references"),
    ("file $ref", {"type": "object", "properties": {"a": {"$ref": "file:///etc/passwd"}}}, "local references"),
    ("pattern bomb", {"type": "string", "pattern": "^a{0,100000}$"}, "repeats"),
    ("pattern lookahead", {"type": "string", "pattern": "^(?=a)a$"}, "(?"),
    ("unanchored pattern", {"type": "string", "pattern": "a+"}, "must start"),
    ("minimum", {"type": "integer", "minimum": 3}, "minimum"),
    ("not", {"not": {"type": "string"}}, "not"),
    ("required without property", {"type": "object", "properties": {}, "required": ["a"]}, "'a'"),
    ("properties of the wrong type", {"type": "object", "properties": [1, 2]}, "object of schemas"),
    ("subschema of the wrong type", {"type": "object", "properties": {"a": 5}}, "must be a schema"),
    ("items of the wrong type", {"type": "array", "items": "x"}, "items"),
    ("empty anyOf", {"anyOf": []}, "non-empty"),
]


@pytest.mark.parametrize(("case", "schema", "why"), HOSTILE_SCHEMAS, ids=[case for case, _, _ in HOSTILE_SCHEMAS])
def test_a_hostile_schema_is_refused_naming_the_part(case: str, schema: object, why: str) -> None:
    with pytest.raises(RequestError) as caught:
        check_schema(schema)
    assert caught.value.param == "response_format"
    assert caught.value.message.startswith("response_format.json_schema.schema")
    assert why in caught.value.message
    assert len(caught.value.message) < 600


def test_ordinary_schemas_pass() -> None:
    check_schema(
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "description": "who", "maxLength": 40},
                "minimum": {"type": "number"},  # a property named like a keyword
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
                "kind": {"$ref": "#/$defs/Kind"},
                "note": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": {"minimum": 1}},
            },
            "required": ["name", "kind"],
            "$defs": {"Kind": {"enum": ["cat", "dog"]}},
        }
    )


# Log-probabilities from a logits row (pure numpy; the function lives in the llama.cpp seam)


def test_log_softmax_top_sorts_ties_by_token_id_and_puts_the_argmax_first() -> None:
    from peerinfer.engine.llama import log_softmax_top

    row = np.array([0.5, 2.0, -1.0, 2.0, 1.0, 2.0], dtype=np.float32)
    chosen, top = log_softmax_top(row, int(row.argmax()), 4)
    assert [token for token, _ in top] == [1, 3, 5, 4]
    assert top[0][1] == chosen
    expected = 2.0 - math.log(float(np.exp(row.astype(np.float64)).sum()))
    assert chosen == pytest.approx(expected, abs=1e-6)
    assert log_softmax_top(row, 2, 0) == (
        pytest.approx(-1.0 - math.log(float(np.exp(row.astype(np.float64)).sum()))),
        (),
    )
    _, everything = log_softmax_top(row, 0, 20)  # k above the vocabulary: all of it
    assert len(everything) == 6
    assert sum(math.exp(logprob) for _, logprob in everything) == pytest.approx(1.0)


def test_log_softmax_top_matches_a_full_sort_near_the_top_and_far_from_it() -> None:
    from peerinfer.engine.llama import log_softmax_top

    rng = np.random.default_rng(3)
    spread = np.array([0.0, 20.0, 40.0, 60.0, 60.0], dtype=np.float32)  # the 2nd best is 20 logits down
    for row in (rng.standard_normal(5000).astype(np.float32) * 4, spread):
        for k in (1, 3, 5):
            _, top = log_softmax_top(row, 0, k)
            expected = sorted(range(len(row)), key=lambda token: (-float(row[token]), token))[:k]
            assert [token for token, _ in top] == expected
            assert [logprob for _, logprob in top] == sorted((logprob for _, logprob in top), reverse=True)
