"""The fields of issue 11 through the official ``openai`` client, on the real bundled model."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from peerinfer.engine.base import Engine

pytestmark = pytest.mark.real

QUESTION = "What is the capital of France?"
HINDI = "भारत की राजधानी क्या है? हिंदी में उत्तर दें।"


def client(url: str, v1: bool = True) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + ("/v1" if v1 else ""), api_key="unused", max_retries=0)


def ask(url: str, content: str = QUESTION, **fields: Any) -> Any:
    fields.setdefault("max_tokens", 8)
    return client(url).chat.completions.create(
        model="gemma", messages=[{"role": "user", "content": content}], temperature=0, **fields
    )


def ask_streamed(url: str, content: str = QUESTION, **fields: Any) -> tuple[str, list[Any]]:
    fields.setdefault("max_tokens", 8)
    stream = client(url).chat.completions.create(
        model="gemma", messages=[{"role": "user", "content": content}], temperature=0, stream=True, **fields
    )
    text, entries = "", []
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.logprobs is not None and choice.logprobs.content:
                entries.extend(choice.logprobs.content)
    return text, entries


@pytest.mark.parametrize("content", [QUESTION, HINDI])
def test_logprobs_streamed_equal_whole_and_the_chosen_token_is_the_top_one(real_worker: str, content: str) -> None:
    whole = ask(real_worker, content, logprobs=True, top_logprobs=3, max_tokens=12)
    entries = whole.choices[0].logprobs.content
    # Tokens of a stop string (the transcript's next "Question") are counted, not shown: no entries.
    assert 1 <= len(entries) <= whole.usage.completion_tokens
    for entry in entries:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].bytes == entry.bytes  # temperature 0: the likeliest token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.logprob <= 0
    joined = bytes(byte for entry in entries for byte in entry.bytes).decode("utf-8", "replace")
    assert joined.lstrip() == whole.choices[0].message.content
    text, streamed = ask_streamed(real_worker, content, logprobs=True, top_logprobs=3, max_tokens=12)
    assert text == whole.choices[0].message.content
    assert [entry.model_dump() for entry in streamed] == [entry.model_dump() for entry in entries]


@pytest.mark.parametrize("top", [0, 20])
def test_top_logprobs_gives_that_many_alternatives(real_worker: str, top: int) -> None:
    entries = ask(real_worker, logprobs=True, top_logprobs=top, max_tokens=3).choices[0].logprobs.content
    assert [len(entry.top_logprobs) for entry in entries] == [top] * len(entries)


def test_logit_bias_bans_the_tokens_of_the_greedy_answer(real_worker: str, real_engine: Engine) -> None:
    plain = ask(real_worker, logprobs=True).choices[0]
    first = plain.logprobs.content[0].bytes
    banned = {token for token in real_engine.tokenize(bytes(first).decode(), add_bos=False)}
    biased = ask(real_worker, logit_bias={str(token): -100 for token in banned}, logprobs=True).choices[0]
    assert biased.logprobs.content[0].bytes != first
    assert biased.message.content != plain.message.content


@pytest.mark.parametrize("penalty", ["frequency_penalty", "presence_penalty"])
def test_penalties_change_a_repetitive_answer(real_worker: str, penalty: str) -> None:
    completions = client(real_worker).completions
    fields: dict[str, Any] = {"model": "gemma", "prompt": "yes yes yes yes yes yes", "max_tokens": 12, "temperature": 0}
    plain = completions.create(**fields).choices[0].text
    assert plain.count("yes") >= 3  # the model goes on repeating
    penalised = completions.create(**fields, **{penalty: 2.0}).choices[0].text
    if penalty == "frequency_penalty":
        assert penalised.count("yes") < plain.count("yes")
    # A presence penalty lowers a token once, by at most 2: " yes" here is likelier by more than that.
    # Greedy decoding numbers an empty list here ("1.", "2.", ...); penalised, the items get names.
    fields["prompt"] = "Question: Name three vegetables.\nAnswer:"
    plain = completions.create(**fields).choices[0].text
    assert len(set(plain.split())) <= 4 and plain.split()[:2] == ["1.", "2."]
    penalised = completions.create(**fields, **{penalty: 2.0}).choices[0].text
    assert len(set(penalised.split())) > len(set(plain.split()))


SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "population": {"type": "integer"}},
    "required": ["city", "population"],
    "additionalProperties": False,
}


def test_json_object_output_parses_streamed_and_not(real_worker: str) -> None:
    fields: dict[str, Any] = {"response_format": {"type": "json_object"}, "max_tokens": 40}
    whole = ask(real_worker, "Describe Paris as JSON.", **fields).choices[0]
    text, _ = ask_streamed(real_worker, "Describe Paris as JSON.", **fields)
    assert text == whole.message.content
    if whole.finish_reason == "stop":
        assert isinstance(json.loads(whole.message.content), dict)
    else:
        assert whole.message.content.lstrip().startswith("{")


def test_json_schema_output_matches_the_schema_streamed_and_not(real_worker: str) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}
    whole = ask(real_worker, "Paris as JSON.", response_format=response_format, max_tokens=48).choices[0]
    assert whole.finish_reason == "stop", whole.message.content
    value = json.loads(whole.message.content)
    assert set(value) == {"city", "population"}
    assert isinstance(value["city"], str) and type(value["population"]) is int
    text, _ = ask_streamed(real_worker, "Paris as JSON.", response_format=response_format, max_tokens=48)
    assert text == whole.message.content


def test_a_schema_the_converter_cannot_express_is_a_400_naming_it(real_worker: str) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=x)y"}}}
    response_format = {"type": "json_schema", "json_schema": {"name": "bad", "schema": schema}}
    with pytest.raises(openai.BadRequestError) as caught:
        ask(real_worker, response_format=response_format)
    assert caught.value.body["param"].startswith("response_format.json_schema")  # type: ignore[index]


def test_n_choices_at_temperature_0_are_equal_and_the_prompt_is_counted_once(real_worker: str) -> None:
    one = ask(real_worker)
    three = ask(real_worker, n=3)
    assert [choice.index for choice in three.choices] == [0, 1, 2]
    assert {choice.message.content for choice in three.choices} == {one.choices[0].message.content}
    assert three.usage.prompt_tokens == one.usage.prompt_tokens
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens


def test_n_with_a_seed_gives_choice_i_the_seed_plus_i(real_worker: str) -> None:
    def sample(**fields: Any) -> list[str]:
        answer = client(real_worker).chat.completions.create(
            model="gemma", messages=[{"role": "user", "content": QUESTION}], temperature=1.0, max_tokens=8, **fields
        )
        return [choice.message.content or "" for choice in answer.choices]

    both = sample(n=2, seed=11)
    assert both == sample(seed=11) + sample(seed=12)


def test_streamed_n_choices_carry_their_index(real_worker: str) -> None:
    stream = client(real_worker).chat.completions.create(
        model="gemma", messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=6, n=2, stream=True
    )
    texts = ["", ""]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts[0] == texts[1] == ask(real_worker, max_tokens=6).choices[0].message.content


def test_completions_echo_and_legacy_logprobs(real_worker: str) -> None:
    completions = client(real_worker).completions
    echoed = completions.create(model="gemma", prompt="The sky is", max_tokens=4, temperature=0, echo=True)
    plain = completions.create(model="gemma", prompt="The sky is", max_tokens=4, temperature=0, logprobs=2)
    assert echoed.choices[0].text == "The sky is" + plain.choices[0].text
    logprobs = plain.choices[0].logprobs
    assert logprobs is not None and 1 <= len(logprobs.tokens or []) <= plain.usage.completion_tokens  # type: ignore[union-attr]
    assert "".join(logprobs.tokens or []) == plain.choices[0].text
    assert logprobs.text_offset and logprobs.text_offset[0] == 0
    assert all(len(top) >= 2 for top in logprobs.top_logprobs or [])


def test_system_fingerprint_routes_without_v1_and_models_retrieve(real_worker: str) -> None:
    bare = client(real_worker, v1=False)
    answer = bare.chat.completions.create(
        model="gemma", messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=4
    )
    assert answer.choices[0].message.content
    assert answer.system_fingerprint and answer.system_fingerprint == ask(real_worker).system_fingerprint
    model_id = bare.models.list().data[0].id
    assert bare.models.retrieve(model_id).id == model_id
    with pytest.raises(openai.NotFoundError):
        client(real_worker).models.retrieve("gpt-4o")


def test_tools_on_a_model_without_a_tool_template_are_a_400(real_worker: str) -> None:
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    with pytest.raises(openai.BadRequestError) as caught:
        ask(real_worker, tools=tools, tool_choice="required")
    assert "cannot express tools" in str(caught.value)


def test_json_mode_with_logprobs_streamed_equals_whole(real_worker: str) -> None:
    """At temperature 0 a constrained answer and its log-probabilities are the same streamed and whole."""
    response_format = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}
    fields: dict[str, Any] = {"response_format": response_format, "max_tokens": 48, "logprobs": True, "top_logprobs": 3}
    whole = ask(real_worker, "Paris as JSON.", **fields).choices[0]
    text, entries = ask_streamed(real_worker, "Paris as JSON.", **fields)
    assert text == whole.message.content
    assert whole.logprobs is not None and whole.logprobs.content
    assert [(e.token, e.logprob, [t.token for t in e.top_logprobs]) for e in entries] == [
        (e.token, e.logprob, [t.token for t in e.top_logprobs]) for e in whole.logprobs.content
    ]
    json.loads(whole.message.content)


def test_completions_take_response_format_too(real_worker: str) -> None:
    """An extension (vLLM's): a raw prompt's completion constrained to a JSON schema."""
    response_format = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}
    answer = client(real_worker).completions.create(
        model="gemma",
        prompt="Paris as JSON:",
        max_tokens=48,
        temperature=0,
        extra_body={"response_format": response_format},
    )
    value = json.loads(answer.choices[0].text)
    assert set(value) == {"city", "population"} and type(value["population"]) is int


def test_a_length_finish_never_ends_in_the_start_of_the_transcripts_turn_marker(real_worker: str) -> None:
    """The issue's "…source of light.\\nQuestion": the base model writes the next ``Question:`` itself, and
    an answer cut by ``max_tokens`` inside that marker must not show the part it had written."""
    from peerinfer.engine.prompt import TRANSCRIPT_STOPS

    starts = tuple({stop[:size] for stop in TRANSCRIPT_STOPS for size in range(1, len(stop))})
    whole = ask(real_worker, "Why is the sky blue?", max_tokens=200)
    assert whole.choices[0].finish_reason == "stop"  # at the transcript's next "\nQuestion:"
    tokens = whole.usage.completion_tokens
    answer = whole.choices[0].message.content
    # The marker's tokens are the last ones generated: a limit among them cuts inside it.
    cuts = [
        ask(real_worker, "Why is the sky blue?", max_tokens=limit).choices[0] for limit in range(tokens - 3, tokens)
    ]
    for cut in cuts:
        assert cut.finish_reason == "length"
        assert answer.startswith(cut.message.content)
        assert not cut.message.content.endswith(starts), cut.message.content
    assert any(cut.message.content == answer for cut in cuts), "no limit cut inside the marker"
