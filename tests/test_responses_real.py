"""``POST /v1/responses`` on the real model, read by the official client's ``client.responses``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

pytestmark = pytest.mark.real

QUESTION = "What is the capital of France?"


@pytest.fixture
def client(real_worker: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=real_worker + "/v1", api_key="unused", max_retries=0) as client:
        yield client


def test_a_string_input_gets_a_completed_response_with_usage(client: openai.OpenAI) -> None:
    response = client.responses.create(model="gemma", input=QUESTION, temperature=0, max_output_tokens=24)
    assert "Paris" in response.output_text
    assert response.status == "completed"
    assert response.id.startswith("resp_")
    assert response.usage is not None
    assert response.usage.input_tokens > 5
    assert 0 < response.usage.output_tokens <= 24
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens


def test_messages_and_instructions_answer_as_the_same_chat_completion(client: openai.OpenAI) -> None:
    instructions = "Answer in one short sentence."
    history: list[Any] = [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Hello! How can I help?"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": QUESTION}]},
    ]
    response = client.responses.create(
        model="gemma", input=history, instructions=instructions, temperature=0, max_output_tokens=20
    )
    chat = client.chat.completions.create(
        model="gemma",
        messages=[
            {"role": "system", "content": instructions},
            {"role": "user", "content": "Hello!"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": QUESTION},
        ],
        temperature=0,
        max_completion_tokens=20,
    )
    assert response.output_text == chat.choices[0].message.content
    assert response.instructions == instructions


def test_max_output_tokens_ends_an_incomplete_response(client: openai.OpenAI) -> None:
    response = client.responses.create(model="gemma", input="Tell me a long story.", temperature=0, max_output_tokens=3)
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None and response.usage.output_tokens == 3
    assert response.output_text


def test_a_streamed_response_is_typed_events_that_add_up_to_the_whole_one(client: openai.OpenAI) -> None:
    whole = client.responses.create(model="gemma", input=QUESTION, temperature=0, max_output_tokens=24)
    events = list(
        client.responses.create(model="gemma", input=QUESTION, temperature=0, max_output_tokens=24, stream=True)
    )
    kinds = [event.type for event in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert deltas == whole.output_text
    final = events[-1]
    assert final.type == "response.completed"
    assert final.response.output_text == whole.output_text
    assert final.response.usage is not None and whole.usage is not None
    assert final.response.usage.output_tokens == whole.usage.output_tokens


def test_the_stream_helper_of_the_client_reads_the_stream(client: openai.OpenAI) -> None:
    with client.responses.stream(model="gemma", input=QUESTION, temperature=0, max_output_tokens=24) as stream:
        texts = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(texts) == final.output_text
    assert "Paris" in final.output_text


def test_log_probabilities_streamed_and_whole_are_equal_and_the_chosen_token_leads(client: openai.OpenAI) -> None:
    asked: dict[str, Any] = {
        "model": "gemma",
        "input": "Tell me a long story about a cat.",
        "temperature": 0,
        "max_output_tokens": 8,
        "top_logprobs": 3,
        "include": ["message.output_text.logprobs"],
    }
    whole = client.responses.create(**asked)
    part = whole.output[0].content[0]
    assert part.type == "output_text"
    assert part.logprobs is not None
    assert whole.usage is not None
    assert len(part.logprobs) == whole.usage.output_tokens == 8
    # Every token has its entry (the answer's leading space, which a chat answer drops, too).
    assert b"".join(bytes(entry.bytes) for entry in part.logprobs).decode("utf-8").lstrip() == part.text
    for entry in part.logprobs:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # temperature 0 takes the likeliest token
        assert entry.logprob <= 0
    streamed = [
        (lp.token, lp.logprob)
        for event in client.responses.create(**asked, stream=True)
        if event.type == "response.output_text.delta"
        for lp in event.logprobs
    ]
    assert streamed == [(entry.token, entry.logprob) for entry in part.logprobs]


CITY = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
    "required": ["city", "country"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("stream", [False, True])
def test_text_format_json_schema_answers_json_that_matches(client: openai.OpenAI, stream: bool) -> None:
    asked: dict[str, Any] = {
        "model": "gemma",
        "input": "Name a city in Italy as JSON.",
        "temperature": 0,
        "max_output_tokens": 60,
        "text": {"format": {"type": "json_schema", "name": "city", "schema": CITY, "strict": True}},
    }
    if stream:
        events = list(client.responses.create(**asked, stream=True))
        final = events[-1]
        assert final.type == "response.completed"
        text = final.response.output_text
    else:
        response = client.responses.create(**asked)
        assert response.status == "completed"
        assert response.text is not None and response.text.format is not None
        assert response.text.format.type == "json_schema"
        text = response.output_text
    value = json.loads(text)
    assert set(value) == {"city", "country"}
    assert all(isinstance(item, str) for item in value.values())


@pytest.mark.parametrize(
    ("fields", "param", "fragment"),
    [
        ({"store": True}, "store", "stores no responses"),
        ({"previous_response_id": "resp_abc"}, "previous_response_id", "stores no responses"),
        ({"background": True}, "background", "no background"),
        ({"reasoning": {"effort": "high"}}, "reasoning", "does not reason"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]},
            "input.0.content.0.type",
            "text only",
        ),
        ({"max_output_tokens": 100000}, "max_output_tokens", "max_output_tokens is 100000"),
        (
            {"tools": [{"type": "function", "name": "weather", "parameters": {"type": "object"}, "strict": False}]},
            "tools",
            "tools",
        ),
        ({"input": "x" * 20000}, "input", "context holds"),
    ],
)
def test_what_the_worker_does_not_do_is_a_400_that_names_the_field(
    client: openai.OpenAI, fields: dict[str, Any], param: str, fragment: str
) -> None:
    asked: dict[str, Any] = {"model": "gemma", "input": QUESTION, **fields}
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(**asked)
    error = caught.value
    assert isinstance(error.body, dict)
    assert error.body.get("param") == param
    assert fragment in str(error.body.get("message"))


def test_the_worker_still_answers_after_the_refusals(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="gemma", input=QUESTION, extra_body={"temprature": 0})
    response = client.responses.create(model="gemma", input=QUESTION, temperature=0, max_output_tokens=4)
    assert response.output_text


def test_a_base_url_without_v1_reaches_the_same_endpoint(real_worker: str) -> None:
    with openai.OpenAI(base_url=real_worker, api_key="unused", max_retries=0) as bare:
        response = bare.responses.create(model="gemma", input=QUESTION, temperature=0, max_output_tokens=24)
    assert "Paris" in response.output_text


def test_a_long_conversation_of_items_is_served(client: openai.OpenAI) -> None:
    turns: list[Any] = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}] * 50
    response = client.responses.create(
        model="gemma", input=[*turns, {"role": "user", "content": QUESTION}], temperature=0, max_output_tokens=4
    )
    assert response.status in ("completed", "incomplete")
    assert response.usage is not None and response.usage.input_tokens > 300
