"""Every field of OpenAI's requests is honoured, accepted as meaning nothing here, or refused by name (fake engine).

A client that asks for something and silently does not get it is worse off than one told no: each refusal is
a 400 in OpenAI's shape whose ``param`` names the field and whose message says what to do instead.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from peerinfer.api import openai as wire
from peerinfer.engine.fake import FakeEngine
from peerinfer.server.app import create_app
from tests.conftest import worker_settings

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hello"}]
HELLO: dict[str, Any] = {"messages": USER}
PROMPT: dict[str, Any] = {"prompt": "hello"}
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    app = create_app(worker_settings(n_ctx=512, max_tokens_cap=64), FakeEngine(n_ctx=512, slots=2))
    with TestClient(app, base_url="http://127.0.0.1:8000") as test_client:
        while test_client.get("/health").status_code != 200:
            time.sleep(0.01)
        yield test_client


def part(kind: str, **fields: object) -> dict[str, object]:
    return {"type": kind, **fields}


REFUSED: list[tuple[str, dict[str, Any], str, str]] = [
    # (route, body, param, a fragment of the message that says why or what to do)
    (CHAT, {**HELLO, "audio": {"voice": "alloy", "format": "mp3"}}, "audio", "text only"),
    (CHAT, {**HELLO, "prediction": {"type": "content", "content": "x"}}, "prediction", "remove 'prediction'"),
    (CHAT, {**HELLO, "reasoning_effort": "high"}, "reasoning_effort", "does not reason"),
    (CHAT, {**HELLO, "verbosity": "low"}, "verbosity", "remove 'verbosity'"),
    (CHAT, {**HELLO, "web_search_options": {}}, "web_search_options", "cannot search the web"),
    (CHAT, {**HELLO, "functions": [{"name": "f"}]}, "functions", "send 'tools'"),
    (CHAT, {**HELLO, "function_call": "auto"}, "function_call", "'tools'"),
    (CHAT, {**HELLO, "store": True}, "store", "no server-side storage"),
    (CHAT, {**HELLO, "service_tier": "priority"}, "service_tier", "one tier"),
    (CHAT, {**HELLO, "modalities": ["text", "audio"]}, "modalities", "text only"),
    (CHAT, {**HELLO, "top_logprobs": 3}, "top_logprobs", "needs logprobs: true"),
    (CHAT, {**HELLO, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
    (CHAT, {**HELLO, "logprobs": "yes"}, "logprobs", "valid boolean"),
    (CHAT, {**HELLO, "presence_penalty": 2.5}, "presence_penalty", "less than or equal to 2"),
    (CHAT, {**HELLO, "frequency_penalty": -3}, "frequency_penalty", "greater than or equal to -2"),
    (CHAT, {**HELLO, "logit_bias": {"x": 1}}, "logit_bias", "token ids"),
    (CHAT, {**HELLO, "logit_bias": {"1": 101}}, "logit_bias", "-100 to 100"),
    (CHAT, {**HELLO, "logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "at most 300"),
    (CHAT, {**HELLO, "logit_bias": {"257": 5}}, "logit_bias", "tokens 0 to 256"),
    (CHAT, {**HELLO, "logit_bias": {"99999999999999": 5}}, "logit_bias", "token ids"),
    (CHAT, {**HELLO, "logit_bias": []}, "logit_bias", "JSON object"),
    (CHAT, {**HELLO, "n": 3}, "n", "at most 2 answers"),
    (CHAT, {**HELLO, "n": 10**30}, "n", "less than or equal"),
    (CHAT, {**HELLO, "response_format": {"type": "xml"}}, "response_format.type", "'json_schema'"),
    (CHAT, {**HELLO, "response_format": {"type": "json_schema"}}, "response_format.json_schema", "needs"),
    (
        CHAT,
        {**HELLO, "response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": SCHEMA}}},
        "response_format.json_schema.name",
        "letters, digits",
    ),
    (
        CHAT,
        {**HELLO, "response_format": {"type": "json_object", "json_schema": {"name": "a", "schema": SCHEMA}}},
        "response_format.json_schema",
        "goes with type json_schema",
    ),
    (CHAT, {**HELLO, "tool_choice": "required"}, "tool_choice", "needs tools"),
    (
        CHAT,
        {**HELLO, "tools": [{"type": "function", "function": {"name": "get_weather"}}]},
        "tools",
        "cannot express tools",
    ),
    (
        CHAT,
        {
            **HELLO,
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": {"name": "g"}},
        },
        "tool_choice",
        "not among the tools",
    ),
    (CHAT, {**HELLO, "temperatur": 0.5}, "temperatur", "not a field this worker knows"),
    (CHAT, {**HELLO, "stream_options": {"include_usage": True, "x": 1}}, "stream_options.x", "not a field"),
    (CHAT, {"messages": [{"role": "user", "content": "x", "colour": "red"}]}, "messages.0.colour", "not a field"),
    (CHAT, {"messages": [{"role": "user", "content": "x", "audio": {"id": "a"}}]}, "messages.0.audio", "text only"),
    (
        CHAT,
        {"messages": [{"role": "user", "content": [part("text", text="hi"), part("image_url", image_url={})]}]},
        "messages.0.content.1",
        "this model takes text only",
    ),
    (
        CHAT,
        {"messages": [{"role": "user", "content": [part("input_audio", input_audio={})]}]},
        "messages.0.content.0",
        "this model takes text only",
    ),
    (
        CHAT,
        {"messages": [{"role": "user", "content": [part("file", file={"file_id": "f"})]}]},
        "messages.0.content.0",
        "this model takes text only",
    ),
    (CHAT, {"messages": [{"role": "user", "content": [part("video")]}]}, "messages.0.content.0", "text parts"),
    (CHAT, {"messages": [{"role": "user", "content": [part("text")]}]}, "messages.0.content.0.text", "required"),
    (
        CHAT,
        {"messages": [{"role": "user", "content": [part("text", text="a", cache_control={})]}]},
        "messages.0.content.0.cache_control",
        "not a field of a text part",
    ),
    (
        CHAT,
        {"messages": [*USER, {"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]},
        "messages",
        "two assistant messages",
    ),
    (CHAT, {"messages": [*USER, {"role": "tool", "content": "42"}]}, "messages.1.tool_call_id", "tool_call_id"),
    (
        CHAT,
        {"messages": [{"role": "user", "content": "x", "tool_call_id": "c1"}]},
        "messages.0.tool_call_id",
        "only tool messages",
    ),
    (
        CHAT,
        {
            "messages": [
                {
                    "role": "user",
                    "content": "x",
                    "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
                }
            ]
        },
        "messages.0.tool_calls",
        "only assistant messages",
    ),
    (CHAT, {"messages": [{"role": "function", "content": "x", "name": "f"}]}, "messages.0.role", "'tool'"),
    (CHAT, {**HELLO, "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "at most 16"),
    (CHAT, {**HELLO, "max_completion_tokens": 65}, "max_completion_tokens", "at most 64"),
    (COMPLETIONS, {**PROMPT, "suffix": "end"}, "suffix", "remove 'suffix'"),
    (COMPLETIONS, {**PROMPT, "best_of": 2}, "best_of", "does not rank"),
    (COMPLETIONS, {**PROMPT, "echo": True, "logprobs": 1}, "echo", "prompt's log-probabilities"),
    (COMPLETIONS, {**PROMPT, "logprobs": 21}, "logprobs", "less than or equal to 20"),
    (COMPLETIONS, {**PROMPT, "logprobs": True}, "logprobs", "valid integer"),
    (COMPLETIONS, {"prompt": [1, 2, 3]}, "prompt", "token ids"),
    (COMPLETIONS, {"prompt": [[1, 2]]}, "prompt", "token ids"),
    (COMPLETIONS, {**PROMPT, "n": 3}, "n", "at most 2 answers"),
    (COMPLETIONS, {**PROMPT, "messages": USER}, "messages", "not a field"),
    (COMPLETIONS, {**PROMPT, "response_format": {"type": "json_schema"}}, "response_format.json_schema", "needs"),
    (COMPLETIONS, {**PROMPT, "response_format": {"type": "xml"}}, "response_format.type", "'json_schema'"),
]


@pytest.mark.parametrize(("route", "body", "param", "fragment"), REFUSED)
def test_a_field_the_worker_does_not_honour_is_refused_by_name(
    client: TestClient, route: str, body: dict[str, Any], param: str, fragment: str
) -> None:
    response = client.post(route, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert fragment in error["message"]


ACCEPTED: list[tuple[str, dict[str, Any]]] = [
    # Fields real clients send that change nothing about a text answer here.
    (CHAT, {**HELLO, "user": "u-123", "safety_identifier": "s", "prompt_cache_key": "k"}),
    (CHAT, {**HELLO, "metadata": {"app": "test"}}),
    (CHAT, {**HELLO, "service_tier": "auto"}),
    (CHAT, {**HELLO, "service_tier": "default"}),
    (CHAT, {**HELLO, "store": False}),
    (CHAT, {**HELLO, "parallel_tool_calls": True}),
    (CHAT, {**HELLO, "logprobs": False}),
    (CHAT, {**HELLO, "n": 1}),
    (CHAT, {**HELLO, "modalities": ["text"]}),
    (CHAT, {**HELLO, "stream_options": {"include_usage": False, "include_obfuscation": False}}),
    (CHAT, {**HELLO, "response_format": {"type": "text"}}),
    (CHAT, {**HELLO, "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none"}),
    (CHAT, {**HELLO, "tool_choice": "none"}),
    # What clients send for "the default": null.
    (
        CHAT,
        {
            **HELLO,
            "model": None,
            "temperature": None,
            "top_p": None,
            "n": None,
            "stream": None,
            "stop": None,
            "max_tokens": None,
            "presence_penalty": None,
            "frequency_penalty": None,
            "logit_bias": None,
            "seed": None,
            "user": None,
        },
    ),
    (CHAT, {"messages": [{"role": "system", "content": "Be brief.", "name": "rules"}, {**USER[0], "name": "ann"}]}),
    (COMPLETIONS, {**PROMPT, "user": "u", "best_of": 1, "echo": False, "n": 1, "store": False}),
]


@pytest.mark.parametrize(("route", "body"), ACCEPTED)
def test_a_field_that_means_nothing_here_is_accepted(client: TestClient, route: str, body: dict[str, Any]) -> None:
    response = client.post(route, json=body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_the_readme_lists_every_field_of_the_request_models() -> None:
    readme = (wire.__file__.rsplit("/peerinfer/", 1)[0] + "/README.md").replace("\\", "/")
    with open(readme, encoding="utf-8") as handle:
        text = handle.read()
    section = text[text.index("### Fields, honoured and refused") : text.index("## The client")]
    for model in (wire.ChatCompletionRequest, wire.CompletionRequest, wire.ChatMessage):
        for name, info in model.model_fields.items():
            assert f"`{info.alias or name}`" in section, f"{model.__name__}.{name} is not in the README's field list"
    for name in wire.REFUSED_FIELDS:
        assert f"`{name}`" in section


def chunks(client: TestClient, route: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with client.stream("POST", route, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def test_n_choices_each_get_an_answer_and_the_prompt_is_counted_once(client: TestClient) -> None:
    alone = client.post(CHAT, json=HELLO).json()
    body = client.post(CHAT, json={**HELLO, "n": 2}).json()
    assert [choice["index"] for choice in body["choices"]] == [0, 1]
    texts = {choice["message"]["content"] for choice in body["choices"]}
    assert texts == {alone["choices"][0]["message"]["content"]}
    assert body["usage"]["prompt_tokens"] == alone["usage"]["prompt_tokens"]
    assert body["usage"]["completion_tokens"] == 2 * alone["usage"]["completion_tokens"]


def test_streamed_n_choices_carry_their_index_and_give_the_same_texts(client: TestClient) -> None:
    streamed = chunks(client, CHAT, {**HELLO, "n": 2, "stream_options": {"include_usage": True}})
    texts = ["", ""]
    finishes: dict[int, str] = {}
    for chunk in streamed:
        for choice in chunk["choices"]:
            texts[choice["index"]] += choice["delta"].get("content", "")
            if choice["finish_reason"]:
                finishes[choice["index"]] = choice["finish_reason"]
    assert texts == ["You said: Answer:"] * 2
    assert finishes == {0: "stop", 1: "stop"}
    assert streamed[-1]["choices"] == [] and streamed[-1]["usage"]["completion_tokens"] == 2 * 17


def test_completion_n_with_a_seed_gives_each_choice_an_answer(client: TestClient) -> None:
    body = client.post(COMPLETIONS, json={**PROMPT, "n": 2, "seed": 7, "max_tokens": 5}).json()
    assert [choice["text"] for choice in body["choices"]] == ["You s", "You s"]


def test_chat_logprobs_come_in_openais_shape_streamed_and_not(client: TestClient) -> None:
    body = client.post(CHAT, json={**HELLO, "logprobs": True, "top_logprobs": 2, "max_tokens": 3}).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert [entry["token"] for entry in content] == ["Y", "o", "u"]
    assert [entry["bytes"] for entry in content] == [[89], [111], [117]]
    assert all(len(entry["top_logprobs"]) == 2 for entry in content)
    assert all(set(entry["top_logprobs"][0]) == {"token", "logprob", "bytes"} for entry in content)
    assert body["choices"][0]["logprobs"]["refusal"] is None
    streamed = chunks(client, CHAT, {**HELLO, "logprobs": True, "top_logprobs": 2, "max_tokens": 3})
    entries = [
        entry
        for chunk in streamed
        for choice in chunk["choices"]
        for entry in (choice["logprobs"] or {}).get("content", [])
    ]
    assert entries == content


def test_without_logprobs_the_field_is_null(client: TestClient) -> None:
    assert client.post(CHAT, json=HELLO).json()["choices"][0]["logprobs"] is None


def test_a_character_split_over_tokens_keeps_each_tokens_bytes() -> None:
    engine = FakeEngine(lambda prompt: "नम", n_ctx=256)
    app = create_app(worker_settings(n_ctx=256), engine)
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        while client.get("/health").status_code != 200:
            time.sleep(0.01)
        body = client.post(CHAT, json={**HELLO, "logprobs": True}).json()
        streamed = chunks(client, CHAT, {**HELLO, "logprobs": True})
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == 6  # two characters of three bytes, one byte per token
    assert bytes(byte for entry in content for byte in entry["bytes"]).decode() == "नम"
    assert content[0]["token"] == "bytes:\\xe0"
    # A streamed chunk holds whole characters, and the entries of every token of them.
    deltas = [choice for chunk in streamed for choice in chunk["choices"] if choice["delta"].get("content")]
    assert [choice["delta"]["content"] for choice in deltas] == ["न", "म"]
    assert [len(choice["logprobs"]["content"]) for choice in deltas] == [3, 3]


def test_completion_logprobs_come_in_the_legacy_shape(client: TestClient) -> None:
    body = client.post(COMPLETIONS, json={**PROMPT, "logprobs": 2, "max_tokens": 3}).json()
    logprobs = body["choices"][0]["logprobs"]
    assert logprobs["tokens"] == ["Y", "o", "u"]
    assert logprobs["text_offset"] == [0, 1, 2]
    assert len(logprobs["token_logprobs"]) == 3
    assert all("Y" in logprobs["top_logprobs"][0] for _ in range(1))
    streamed = chunks(client, COMPLETIONS, {**PROMPT, "logprobs": 2, "max_tokens": 3})
    tokens = [
        token
        for chunk in streamed
        for choice in chunk["choices"]
        for token in (choice["logprobs"] or {}).get("tokens", [])
    ]
    assert tokens == ["Y", "o", "u"]


def test_echo_puts_the_prompt_first_streamed_and_not(client: TestClient) -> None:
    body = client.post(COMPLETIONS, json={**PROMPT, "echo": True, "max_tokens": 3}).json()
    assert body["choices"][0]["text"] == "helloYou"
    streamed = chunks(client, COMPLETIONS, {**PROMPT, "echo": True, "max_tokens": 3})
    assert "".join(choice["text"] for chunk in streamed for choice in chunk["choices"]) == "helloYou"


def test_json_mode_is_accepted(client: TestClient) -> None:
    for response_format in (
        {"type": "json_object"},
        {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}},
    ):
        assert client.post(CHAT, json={**HELLO, "response_format": response_format}).status_code == 200


def test_every_answer_and_chunk_has_the_system_fingerprint(client: TestClient) -> None:
    whole = client.post(CHAT, json=HELLO).json()
    fingerprint = whole["system_fingerprint"]
    assert fingerprint.startswith("fp_") and len(fingerprint) == 15
    assert client.post(COMPLETIONS, json=PROMPT).json()["system_fingerprint"] == fingerprint
    assert {chunk["system_fingerprint"] for chunk in chunks(client, CHAT, HELLO)} == {fingerprint}


def test_the_routes_answer_without_v1(client: TestClient) -> None:
    assert client.post("/chat/completions", json=HELLO).json()["choices"][0]["message"]["content"]
    assert client.post("/completions", json=PROMPT).json()["choices"][0]["text"]
    assert client.get("/models").json()["data"][0]["id"] == "fake-model"


def test_a_model_is_retrieved_by_id_and_another_id_is_a_404(client: TestClient) -> None:
    assert client.get("/v1/models/fake-model").json()["id"] == "fake-model"
    missing = client.get("/v1/models/gpt-4o")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found" and "fake-model" in missing.json()["error"]["message"]


def test_routes_without_v1_stay_out_of_the_schema(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert "/v1/chat/completions" in paths and "/v1/models/{model_id}" in paths
    assert "/chat/completions" not in paths and "/models" not in paths


CALL = '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def tool_client() -> Iterator[TestClient]:
    template = (wire.__file__.rsplit("/peerinfer/", 1)[0] + "/tests/templates/hermes_tools.jinja").replace("\\", "/")
    with open(template, encoding="utf-8") as handle:
        engine = FakeEngine(lambda prompt: CALL, n_ctx=2048, chat_template=handle.read())
    app = create_app(worker_settings(n_ctx=2048), engine)
    with TestClient(app, base_url="http://127.0.0.1:8000") as test_client:
        while test_client.get("/health").status_code != 200:
            time.sleep(0.01)
        yield test_client


def test_a_tool_call_comes_back_as_tool_calls_streamed_and_not(tool_client: TestClient) -> None:
    body = {"messages": USER, "tools": TOOLS}
    choice = tool_client.post(CHAT, json=body).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    streamed = chunks(tool_client, CHAT, body)
    deltas = [c for chunk in streamed for c in chunk["choices"] if c["delta"].get("tool_calls")]
    assert [d["delta"]["tool_calls"][0]["function"]["name"] for d in deltas] == ["weather"]
    assert deltas[0]["delta"]["tool_calls"][0]["index"] == 0
    assert streamed[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert "".join(c["delta"].get("content", "") for chunk in streamed for c in chunk["choices"]) == ""
