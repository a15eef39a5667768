"""Sampling constraints, log-probabilities, penalties, logit bias and n followers on the real model."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest

from peerinfer.engine.base import Engine, Finished, Generation, SamplingParams, TextDelta, TokenLogprob
from peerinfer.engine.prompt import PromptPart
from peerinfer.errors import RequestError

pytestmark = pytest.mark.real

REPEATING = "Question: Write the word 'apple' many times.\nAnswer: apple apple apple apple apple"
PET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer"},
        "weight": {"type": "number"},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "indoor": {"type": "boolean"},
    },
    "required": ["name", "age", "kind"],
}


class Answer:
    def __init__(self, deltas: Sequence[TextDelta], finished: Finished) -> None:
        self.deltas = list(deltas)
        self.finished = finished
        self.text = "".join(delta.text for delta in deltas)
        self.logprobs: list[TokenLogprob] = [entry for delta in deltas for entry in delta.logprobs]


async def _collect(generation: Generation) -> Answer:
    deltas: list[TextDelta] = []
    async for event in generation.stream():
        if isinstance(event, TextDelta):
            deltas.append(event)
        else:
            return Answer(deltas, event)
    raise AssertionError("no Finished")


def generate(engine: Engine, requests: Sequence[tuple[str, SamplingParams]]) -> list[Answer]:
    """Submit all of ``requests`` at once (they are batched together), and wait for every answer."""

    async def scenario() -> list[Answer]:
        loop = asyncio.get_running_loop()
        generations = [Generation(engine.tokenize(prompt, add_bos=True), params, loop) for prompt, params in requests]
        for generation in generations:
            engine.submit(generation)
        return list(await asyncio.gather(*(_collect(generation) for generation in generations)))

    return asyncio.run(scenario())


def one(engine: Engine, prompt: str, params: SamplingParams) -> Answer:
    return generate(engine, [(prompt, params)])[0]


def first_token(engine: Engine, prompt: str) -> int:
    answer = one(engine, prompt, SamplingParams(max_tokens=1, temperature=0.0, logprobs=1))
    assert len(answer.logprobs) == 1
    piece = answer.logprobs[0].piece
    ids = engine.tokenize(piece.decode("utf-8"), add_bos=False)
    assert len(ids) == 1
    return ids[0]


def matches_pet_schema(value: object) -> bool:
    if not isinstance(value, dict) or not {"name", "age", "kind"} <= value.keys() <= PET_SCHEMA["properties"].keys():
        return False
    return (
        isinstance(value["name"], str)
        and len(value["name"]) <= 24
        and isinstance(value["age"], int)
        and not isinstance(value["age"], bool)
        and value["kind"] in ("cat", "dog", "bird")
        and isinstance(value.get("weight", 0.0), (int, float))
        and isinstance(value.get("indoor", False), bool)
    )


# Penalties


def test_penalties_break_a_repetition_and_stay_deterministic(real_engine: Engine) -> None:
    plain = one(real_engine, REPEATING, SamplingParams(max_tokens=24, temperature=0.0))
    assert plain.text.count("apple") >= 8  # the base model repeats
    penalised = SamplingParams(max_tokens=24, temperature=0.0, frequency_penalty=2.0, presence_penalty=1.0)
    first = one(real_engine, REPEATING, penalised)
    second = one(real_engine, REPEATING, penalised)
    assert first.text != plain.text
    assert first.text.count("apple") < plain.text.count("apple")
    assert first.text == second.text


def test_penalties_count_generated_tokens_only(real_engine: Engine) -> None:
    plain = one(real_engine, REPEATING, SamplingParams(max_tokens=16, temperature=0.0, logprobs=0))
    # A presence penalty far beyond OpenAI's range: no generated token may come twice...
    params = SamplingParams(max_tokens=16, temperature=0.0, presence_penalty=50.0, logprobs=0)
    penalised = one(real_engine, REPEATING, params)
    pieces = [entry.piece for entry in penalised.logprobs]
    assert len(pieces) == len(set(pieces)) == 16
    # ...but the prompt's " apple"s do not count: the first token is still the plain greedy one, " apple"
    assert pieces[0] == plain.logprobs[0].piece == b" apple"


# logit_bias


def test_logit_bias_minus_100_bans_the_greedy_token_and_plus_100_forces_one(real_engine: Engine) -> None:
    prompt = "The capital of France is"
    greedy = first_token(real_engine, prompt)
    banned = one(real_engine, prompt, SamplingParams(max_tokens=1, temperature=0.0, logit_bias=((greedy, -100.0),)))
    forced_token = real_engine.tokenize(" banana", add_bos=False)[0]
    forced = one(
        real_engine, prompt, SamplingParams(max_tokens=3, temperature=0.8, seed=1, logit_bias=((forced_token, 100.0),))
    )
    alone = one(real_engine, prompt, SamplingParams(max_tokens=1, temperature=0.0))
    assert banned.text and banned.text != alone.text
    assert forced.text.startswith(" banana")


# Log-probabilities


@pytest.mark.parametrize("k", [0, 1, 5, 20])
def test_logprobs_at_temperature_0_put_the_chosen_token_first(real_engine: Engine, k: int) -> None:
    answer = one(
        real_engine, "Question: What is the sun?\nAnswer:", SamplingParams(max_tokens=12, temperature=0.0, logprobs=k)
    )
    assert answer.finished.completion_tokens == len(answer.logprobs) or answer.finished.reason == "stop"
    assert b"".join(entry.piece for entry in answer.logprobs).decode() == answer.text
    for entry in answer.logprobs:
        assert entry.logprob <= 0.0
        assert len(entry.top) == k
        if k:
            assert entry.top[0].piece == entry.piece
            assert entry.top[0].logprob == entry.logprob
            values = [top.logprob for top in entry.top]
            assert values == sorted(values, reverse=True)
            assert sum(math.exp(value) for value in values) <= 1.0 + 1e-9


def test_logprobs_of_sampled_tokens_are_those_of_the_raw_distribution(real_engine: Engine) -> None:
    prompt = "Question: Tell me about the sea.\nAnswer:"
    params = SamplingParams(max_tokens=10, temperature=1.5, seed=7, logprobs=20)
    answer = one(real_engine, prompt, params)
    assert answer.logprobs
    for entry in answer.logprobs:
        assert entry.logprob <= entry.top[0].logprob  # the most likely token under the model, not the sampler
        listed = {top.piece: top.logprob for top in entry.top}
        if entry.piece in listed:
            assert listed[entry.piece] == entry.logprob


SCRIPTS = {
    "hindi": "भारत एक विशाल देश है। इसकी राजधानी",
    "tamil": "தமிழ்நாடு இந்தியாவின் ஒரு மாநிலம். அதன் தலைநகரம்",
    "emoji": "Favourite emoji: 😀 🎉 🚀 🌍 🙏🏽 🇮🇳 and also",
}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_each_delta_carries_the_log_probabilities_of_its_own_tokens(real_engine: Engine, script: str) -> None:
    answer = one(real_engine, SCRIPTS[script], SamplingParams(max_tokens=40, temperature=0.0, logprobs=2))
    assert any(ord(char) > 0x7F for char in answer.text), answer.text
    for delta in answer.deltas:
        assert b"".join(entry.piece for entry in delta.logprobs).decode() == delta.text


def test_a_character_over_several_tokens_carries_all_of_their_log_probabilities(real_engine: Engine) -> None:
    # Gemma has a token for the whole emoji; banning it and asking a grammar for the emoji leaves its bytes
    ban = tuple((token, -100.0) for text in ("😀", " 😀") for token in real_engine.tokenize(text, add_bos=False))
    params = SamplingParams(
        max_tokens=12, temperature=0.0, logprobs=1, grammar='root ::= " " "😀" " " "😀"', logit_bias=ban
    )
    answer = one(real_engine, SCRIPTS["emoji"], params)
    assert answer.text == " 😀 😀"
    assert answer.finished.reason == "stop"
    assert [(delta.text, len(delta.logprobs)) for delta in answer.deltas] == [(" ", 1), ("😀", 4), (" ", 1), ("😀", 4)]
    assert b"".join(entry.piece for entry in answer.deltas[1].logprobs) == "😀".encode()


# Grammars


def test_json_mode_output_parses(real_engine: Engine) -> None:
    grammar = real_engine.json_grammar(None)
    prompt = "Question: Describe a cat as a small JSON object.\nAnswer:"
    # (greedy, this model repeats a key until the token limit: the schema test below bounds it.) Sampled,
    # some answers ramble past the limit too; every one that ends is a JSON object, and most end.
    finished = 0
    for seed in range(1, 9):
        answer = one(real_engine, prompt, SamplingParams(max_tokens=80, temperature=0.9, seed=seed, grammar=grammar))
        if answer.finished.reason == "stop":
            finished += 1
            assert isinstance(json.loads(answer.text), dict), answer.text
    assert finished >= 4


def test_schema_output_parses_and_matches_the_schema(real_engine: Engine) -> None:
    grammar = real_engine.json_grammar(PET_SCHEMA)
    prompt = "Question: Describe a pet.\nAnswer:"
    for seed in (1, 2, 3):
        answer = one(real_engine, prompt, SamplingParams(max_tokens=80, temperature=1.0, seed=seed, grammar=grammar))
        assert answer.finished.reason == "stop", answer.text
        assert matches_pet_schema(json.loads(answer.text)), answer.text


def test_a_grammar_overrules_a_forced_token_and_an_early_end(real_engine: Engine) -> None:
    grammar = real_engine.json_grammar(PET_SCHEMA)
    prompt = "Question: Describe a pet.\nAnswer:"
    hello = real_engine.tokenize("Hello", add_bos=False)[0]
    (end,) = real_engine.tokenize([PromptPart(real_engine.info.eos_token, markup=True)], add_bos=False)
    # The model is pushed to say "Hello" and to stop at once: the grammar allows neither until the JSON is whole.
    bias = ((hello, 100.0), (end, 100.0))
    answer = one(real_engine, prompt, SamplingParams(max_tokens=80, temperature=0.0, grammar=grammar, logit_bias=bias))
    assert answer.finished.reason == "stop", answer.text
    assert matches_pet_schema(json.loads(answer.text))
    # and the worker still serves
    assert one(real_engine, prompt, SamplingParams(max_tokens=3, temperature=0.0)).finished.reason == "length"


def test_a_constrained_and_a_logprobs_slot_batched_with_plain_ones_are_as_alone(real_engine: Engine) -> None:
    grammar = real_engine.json_grammar(PET_SCHEMA)
    requests = [
        (
            "Question: Describe a pet.\nAnswer:",
            SamplingParams(max_tokens=40, temperature=0.0, grammar=grammar, logprobs=3),
        ),
        ("Question: What is rain?\nAnswer:", SamplingParams(max_tokens=24, temperature=0.0, logprobs=5)),
        ("Question: Name a river.\nAnswer:", SamplingParams(max_tokens=30, temperature=0.0)),
        ("Question: What is a star?\nAnswer:", SamplingParams(max_tokens=30, temperature=0.8, seed=5)),
    ]
    seeded = [
        (prompt, replace(params, temperature=0.9, seed=21 + index)) if index < 2 else (prompt, params)
        for index, (prompt, params) in enumerate(requests)
    ]
    for batch in (requests, seeded):
        together = generate(real_engine, batch)
        alone = [one(real_engine, prompt, params) for prompt, params in batch]
        assert [a.text for a in together] == [a.text for a in alone]
        assert [a.logprobs for a in together] == [a.logprobs for a in alone]
        json.loads(together[0].text)


# Hostile schemas on the real converter


HOSTILE = [
    {"type": "array", "items": {"type": "string"}, "maxItems": 100000},
    {"enum": [f"value {i}" for i in range(5000)]},
    [{"type": "object"}],
    {"$ref": "https://example.com/schema.json"},
    {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}},
    {"type": "frog"},
    {"type": "string", "pattern": "^(a$"},
    {"type": "object", "properties": {"a": {"type": "string", "const": "x" * 70000}}},
]


@pytest.mark.parametrize("schema", HOSTILE, ids=[f"schema{i}" for i in range(len(HOSTILE))])
def test_a_hostile_schema_gets_a_request_error_and_the_engine_serves_on(real_engine: Engine, schema: Any) -> None:
    with pytest.raises(RequestError) as caught:
        real_engine.json_grammar(schema)
    assert caught.value.param == "response_format"
    assert caught.value.message.startswith("response_format.json_schema.schema")
    assert one(real_engine, "Hello", SamplingParams(max_tokens=2, temperature=0.0)).finished.reason == "length"


def test_a_deeply_nested_schema_is_refused(real_engine: Engine) -> None:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(200):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    with pytest.raises(RequestError, match="levels deep"):
        real_engine.json_grammar(schema)


# n followers


def test_n_followers_at_temperature_0_give_the_text_of_one_alone(real_engine: Engine) -> None:
    prompt = "Question: Why is the sky blue? Explain it to a child in two sentences.\nAnswer:"
    params = SamplingParams(max_tokens=24, temperature=0.0, logprobs=2)
    alone = one(real_engine, prompt, params)
    tokens = real_engine.tokenize(prompt, add_bos=True)

    async def scenario() -> list[Answer]:
        loop = asyncio.get_running_loop()
        leader = Generation(tokens, params, loop)
        followers = [Generation(tokens, params, loop, follows=leader) for _ in range(3)]
        real_engine.submit_all([leader, *followers])
        return list(await asyncio.gather(*(_collect(g) for g in (leader, *followers))))

    answers = asyncio.run(scenario())
    assert [a.text for a in answers] == [alone.text] * 4
    assert [a.logprobs for a in answers] == [alone.logprobs] * 4
    assert all(a.finished.cached_tokens >= len(tokens) - 1 for a in answers[1:])


def test_seeded_followers_sample_their_own_streams(real_engine: Engine) -> None:
    prompt = "Question: Write a short line about autumn.\nAnswer:"
    tokens = real_engine.tokenize(prompt, add_bos=True)

    async def scenario() -> list[Answer]:
        loop = asyncio.get_running_loop()
        params = [SamplingParams(max_tokens=16, temperature=1.0, seed=100 + i) for i in range(4)]
        leader = Generation(tokens, params[0], loop)
        followers = [Generation(tokens, p, loop, follows=leader) for p in params[1:]]
        real_engine.submit_all([leader, *followers])
        return list(await asyncio.gather(*(_collect(g) for g in (leader, *followers))))

    answers = asyncio.run(scenario())
    assert len({a.text for a in answers}) > 1
    again = [one(real_engine, prompt, SamplingParams(max_tokens=16, temperature=1.0, seed=100 + i)) for i in range(4)]
    assert [a.text for a in answers] == [a.text for a in again]


def test_greedy_under_a_grammar_picks_what_the_whole_vocabulary_would(real_engine: Engine) -> None:
    # Greedy alone checks the grammar against the likeliest tokens only; a chain (here a bias of 0, which
    # changes nothing) takes llama.cpp's path over the whole vocabulary. The two must agree.
    grammar = real_engine.json_grammar(PET_SCHEMA)
    prompt = "Question: Describe a small dog.\nAnswer:"
    fast = one(real_engine, prompt, SamplingParams(max_tokens=60, temperature=0.0, grammar=grammar, logprobs=1))
    whole = SamplingParams(max_tokens=60, temperature=0.0, grammar=grammar, logprobs=1, logit_bias=((7, 0.0),))
    assert fast.text == one(real_engine, prompt, whole).text
    assert matches_pet_schema(json.loads(fast.text))


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=40, temperature=0.0),
        SamplingParams(max_tokens=40, temperature=1.0, seed=7),  # dist over the whole row: no top_k
        SamplingParams(max_tokens=40, temperature=0.8, top_k=40, top_p=0.9, seed=3),
    ],
    ids=["greedy", "dist", "top-k-top-p"],
)
def test_the_tokens_a_grammar_state_allows_are_kept_without_changing_an_answer(
    real_engine: Engine, params: SamplingParams
) -> None:
    """A schema forces ``{"`` and its first key, which the model finds unlikely: the whole vocabulary is
    scanned once per such state, then only the tokens it allowed are offered. The answers are the same."""
    backend = real_engine._backend  # type: ignore[attr-defined]
    grammar = real_engine.json_grammar(PET_SCHEMA)
    constrained = replace(params, grammar=grammar, logprobs=2)
    prompt = "Question: Describe a small dog.\nAnswer:"
    backend._allowed_by_state.clear()
    cold = one(real_engine, prompt, constrained)
    assert backend._allowed_by_state, "the forced start of the answer was scanned and kept"
    warm = one(real_engine, prompt, constrained)
    assert warm.text == cold.text
    assert warm.logprobs == cold.logprobs
    assert cold.text.startswith("{")
