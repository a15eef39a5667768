"""The Responses API's wire format, without a server: the request, its chat equivalent, the answer and its stream.

The answer is checked against the official ``openai`` package's own models, its SSE decoder and the
accumulator behind ``client.responses.stream``: what passes here is what that client accepts.
"""

from __future__ import annotations

import itertools
import json
from typing import Any, cast

import pytest
from openai import omit
from openai._models import construct_type
from openai._streaming import SSEDecoder
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from peerinfer.api import openai as wire
from peerinfer.api.choices import AnswerFailed, AnswerUsage, ChoiceDelta, ChoiceEnd, KeepAlive, Outcome, ToolCall
from peerinfer.api.responses import REFUSED, parse_responses_request, responses_error, to_chat_body
from peerinfer.api.responses_output import ResponseBuilder, ResponsesFormat, collect_response
from peerinfer.api.sse import KEEPALIVE
from peerinfer.engine.base import TokenLogprob, TopLogprob
from peerinfer.errors import ContextLengthError, RequestError

EVENTS = TypeAdapter(ResponseStreamEvent)


def parse(**fields: Any) -> Any:
    return parse_responses_request(json.dumps({"input": "hi", **fields}).encode())


def refusal(body: bytes) -> RequestError:
    with pytest.raises(RequestError) as caught:
        parse_responses_request(body)
    return caught.value


def counter_ids() -> Any:
    count = itertools.count()
    return lambda prefix: f"{prefix}_{next(count)}"


def builder(request: Any, **kwargs: Any) -> ResponseBuilder:
    return ResponseBuilder(request, model="gemma", ids=counter_ids(), clock=lambda: 1000.0, **kwargs)


# The request.

IMAGE = {"type": "input_image", "image_url": "https://example.com/cat.png", "detail": "auto"}
BAD_BODIES = [
    (b"", "body", "empty"),
    (b"{nope", "body", "not valid JSON"),
    (b"[1, 2]", "body", "JSON object"),
    (b"{}", "input", "required"),
    (b'{"input": 5}', "input", "a string or a list of input items"),
    (b'{"input": []}', "input", "at least one item"),
    (b'{"input": ["hi"]}', "input.0", "JSON object"),
    (b'{"input": "hi", "temprature": 0}', "temprature", "unknown field 'temprature'"),
    (b'{"input": [{"role": "user", "content": "x", "name": "bob"}]}', "input.0.name", "unknown field 'name'"),
    (b'{"input": [{"role": "robot", "content": "x"}]}', "input.0.role", "'user'"),
    (b'{"input": [{"role": "user", "content": 7}]}', "input.0.content", "got 7"),
    (b'{"input": [{"role": "user", "content": [7]}]}', "input.0.content.0", "JSON object"),
    (b'{"input": [{"role": "user", "content": [{"type": "input_text"}]}]}', "input.0.content.0.text", "required"),
    (
        b'{"input": [{"role": "user", "content": [{"type": "input_video", "text": "x"}]}]}',
        "input.0.content.0.type",
        "'input_video'",
    ),
    (json.dumps({"input": [{"role": "user", "content": [IMAGE]}]}).encode(), "input.0.content.0.type", "text only"),
    (
        b'{"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}',
        "input.0.content.0.type",
        "text only",
    ),
    (b'{"input": [{"role": "user", "content": [{"type": "input_audio"}]}]}', "input.0.content.0.type", "text only"),
    (b'{"input": [{"type": "item_reference", "id": "msg_1"}]}', "input.0", "stores no responses"),
    (b'{"input": [{"type": "reasoning", "id": "rs_1", "summary": []}]}', "input.0", "does not reason"),
    (b'{"input": [{"type": "web_search_call", "id": "ws"}]}', "input.0.type", "'web_search_call'"),
    (b'{"input": [{"type": "function_call", "call_id": "c", "name": "f"}]}', "input.0.arguments", "required"),
    (b'{"input": "hi", "max_output_tokens": 0}', "max_output_tokens", "greater than or equal to 1"),
    (b'{"input": "hi", "max_output_tokens": "9"}', "max_output_tokens", "valid integer"),
    (b'{"input": "hi", "temperature": 2.5}', "temperature", "less than or equal to 2"),
    (b'{"input": "hi", "top_p": 0}', "top_p", "greater than 0"),
    (b'{"input": "hi", "stream": "yes"}', "stream", "valid boolean"),
    (b'{"input": "hi", "top_logprobs": 21}', "top_logprobs", "less than or equal to 20"),
    (b'{"input": "hi", "top_logprobs": 100000000000000000000000000000}', "top_logprobs", "less than or equal to 20"),
    (b'{"input": "hi", "include": ["file_search_call.results"]}', "include.0", "'file_search_call.results'"),
    (b'{"input": "hi", "text": {"format": {"type": "xml"}}}', "text.format.type", "'xml'"),
    (b'{"input": "hi", "text": {"format": {"type": "json_schema", "schema": {}}}}', "text.format.name", "required"),
    (
        b'{"input": "hi", "text": {"format": {"type": "json_schema", "name": "a b", "schema": {}}}}',
        "text.format.name",
        "pattern",
    ),
    (
        b'{"input": "hi", "text": {"format": {"type": "json_object", "schema": {}}}}',
        "text.format.schema",
        "unknown field",
    ),
    (
        b'{"input": "hi", "text": {"format": {"type": "json_schema", "name": "a", "schema": []}}}',
        "text.format.schema",
        "JSON object",
    ),
    (b'{"input": "hi", "text": {"verbosity": "low"}}', "text.verbosity", "not supported"),
    (b'{"input": "hi", "text": 5}', "text", "JSON object"),
    (b'{"input": "hi", "tools": [{"type": "web_search"}]}', "tools.0.type", "no built-in tools"),
    (b'{"input": "hi", "tools": [{"type": "function"}]}', "tools.0.name", "required"),
    (
        b'{"input": "hi", "tools": [{"type": "function", "name": "f", "defer_loading": true}]}',
        "tools.0",
        "defer_loading",
    ),
    (b'{"input": "hi", "tool_choice": "required"}', "tool_choice", "no tools were given"),
    (b'{"input": "hi", "tool_choice": {"type": "file_search"}}', "tool_choice", "no built-in tools"),
    (
        json.dumps(
            {
                "input": "hi",
                "tools": [{"type": "function", "name": "f"}],
                "tool_choice": {"type": "function", "name": "g"},
            }
        ).encode(),
        "tool_choice.name",
        "'g'",
    ),
    (json.dumps({"input": "hi", "metadata": {str(key): "v" for key in range(17)}}).encode(), "metadata", "at most 16"),
    (json.dumps({"input": "hi", "metadata": {"k": "v" * 513}}).encode(), "metadata", "at most 64"),
    (b'{"input": "hi", "metadata": {"k": 5}}', "metadata.k", "valid string"),
    (b'{"input": "hi", "user": 5}', "user", "valid string"),
    # An attacker's nesting is refused by the JSON reader before any of it is walked.
    (b'{"input": ' + b"[" * 5000 + b"]" * 5000 + b"}", "body", "recursion limit"),
]


@pytest.mark.parametrize(("body", "param", "fragment"), BAD_BODIES)
def test_bad_requests_name_the_field_and_the_problem(body: bytes, param: str, fragment: str) -> None:
    error = refusal(body)
    assert error.param == param
    assert fragment in error.message
    assert error.status_code == 400


REFUSED_VALUES = [
    ("store", True, "stores no responses"),
    ("previous_response_id", "resp_123", "stores no responses"),
    ("conversation", "conv_123", "stores no responses"),
    ("conversation", {"id": "conv_123"}, "stores no responses"),
    ("prompt", {"id": "pmpt_1"}, "no prompt templates"),
    ("background", True, "no background"),
    ("background_options", {"completion_window": "2h"}, "no background"),
    ("truncation", "auto", "never drops input"),
    ("reasoning", {"effort": "high"}, "does not reason"),
    ("reasoning", {"summary": "auto"}, "does not reason"),
    ("service_tier", "flex", "one service tier"),
    ("context_management", [{"type": "compaction"}], "does not compact"),
    ("moderation", {"model": "omni-moderation-latest"}, "no moderation"),
    ("image", {"context_compression": "auto"}, "text only"),
    ("access_programs", {"cyber": "standard"}, "no access programs"),
    ("prompt_cache_options", {"mode": "explicit"}, "takes no options"),
]


@pytest.mark.parametrize(("field", "value", "fragment"), REFUSED_VALUES)
def test_fields_the_worker_does_not_do_are_refused_by_name(field: str, value: object, fragment: str) -> None:
    error = refusal(json.dumps({"input": "hi", field: value}).encode())
    assert error.param == field
    assert f"'{field}' is not supported" in error.message
    assert fragment in error.message


def test_every_refused_field_has_a_refused_value_in_the_table() -> None:
    assert {field for field, _, _ in REFUSED_VALUES} == set(REFUSED)


@pytest.mark.parametrize(
    "fields",
    [
        {"store": False},
        {"background": False},
        {"truncation": "disabled"},
        {"reasoning": {"effort": None, "summary": None}},
        {"reasoning": {"effort": "none"}},
        {"service_tier": "auto"},
        {"service_tier": "default"},
        {"metadata": {"team": "docs"}},
        {"user": "u-1", "safety_identifier": "s-1", "prompt_cache_key": "k", "prompt_cache_retention": "24h"},
        {"stream_options": {"include_obfuscation": False}},
        {"max_tool_calls": 3},
        {"previous_response_id": None, "conversation": None, "prompt": None, "text": {"verbosity": None}},
        {"tool_choice": "auto", "tools": []},
        {"tool_choice": "none"},
        {"parallel_tool_calls": True},
    ],
)
def test_fields_that_cannot_change_the_answer_are_accepted_and_change_nothing(fields: dict[str, Any]) -> None:
    body = to_chat_body(parse(**fields))
    body.pop("parallel_tool_calls", None)  # passed on as given: the chat path reads it
    body.pop("tool_choice", None)
    assert body == to_chat_body(parse())


# The chat equivalent.


def test_a_string_input_is_one_user_message_and_instructions_come_first() -> None:
    body = to_chat_body(parse(instructions="Answer in French.", max_output_tokens=12, temperature=0, top_p=0.5, seed=7))
    assert body == {
        "messages": [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "hi"}],
        "max_completion_tokens": 12,
        "temperature": 0,
        "top_p": 0.5,
        "seed": 7,
    }
    wire.parse_request(wire.ChatCompletionRequest, json.dumps(body).encode())  # the chat path reads it


def test_message_items_keep_roles_and_join_their_text_parts() -> None:
    request = parse(
        input=[
            {"role": "developer", "content": "Be brief."},
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "Hello, "}, {"type": "input_text", "text": "there"}],
            },
            {
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": "Hi!", "annotations": [], "logprobs": []}],
            },
            {"role": "user", "content": "And now?"},
        ]
    )
    assert to_chat_body(request)["messages"] == [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Hello, there"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "And now?"},
    ]


def test_function_calls_and_their_outputs_become_the_chat_turns_that_mean_them() -> None:
    request = parse(
        input=[
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"type": "function_call", "call_id": "call_a", "name": "weather", "arguments": '{"city":"Paris"}'},
            {"type": "function_call", "call_id": "call_b", "name": "weather", "arguments": '{"city":"Rome"}'},
            {"type": "function_call_output", "call_id": "call_a", "output": "18C"},
            {"type": "function_call_output", "call_id": "call_b", "output": [{"type": "input_text", "text": "21C"}]},
        ],
        tools=[{"type": "function", "name": "weather", "parameters": {"type": "object"}, "strict": True}],
        tool_choice={"type": "function", "name": "weather"},
        parallel_tool_calls=False,
    )
    body = to_chat_body(request)
    calls = [
        {"id": "call_a", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}},
        {"id": "call_b", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Rome"}'}},
    ]
    assert body["messages"] == [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_a", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_b", "content": "21C"},
    ]
    assert body["tools"] == [
        {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}, "strict": True}}
    ]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    assert body["parallel_tool_calls"] is False


@pytest.mark.parametrize(
    ("text", "response_format"),
    [
        ({"format": {"type": "text"}}, None),
        ({"format": {"type": "json_object"}}, {"type": "json_object"}),
        (
            {"format": {"type": "json_schema", "name": "city", "schema": {"type": "object"}, "strict": True}},
            {"type": "json_schema", "json_schema": {"name": "city", "schema": {"type": "object"}, "strict": True}},
        ),
    ],
)
def test_text_format_becomes_the_chat_response_format(text: dict[str, Any], response_format: object) -> None:
    assert to_chat_body(parse(text=text)).get("response_format") == response_format


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, {}),
        ({"top_logprobs": 3}, {"logprobs": True, "top_logprobs": 3}),
        ({"include": ["message.output_text.logprobs"]}, {"logprobs": True, "top_logprobs": 0}),
        ({"stream": True}, {"stream": True, "stream_options": {"include_usage": True}}),
        ({"stream": False}, {}),
    ],
)
def test_logprobs_and_streaming_are_asked_of_the_chat_path(fields: dict[str, Any], expected: dict[str, Any]) -> None:
    body = to_chat_body(parse(**fields))
    assert {key: body[key] for key in body if key not in ("messages",)} == expected


# Errors of the chat path, renamed.


@pytest.mark.parametrize(
    ("fields", "chat_param", "chat_message", "param", "message"),
    [
        ({}, "messages", "the prompt has 9000 tokens", "input", "the prompt has 9000 tokens"),
        (
            {"max_output_tokens": 5000},
            "max_tokens",
            "max_tokens is 5000 but this worker allows at most 512",
            "max_output_tokens",
            "max_output_tokens is 5000 but this worker allows at most 512",
        ),
        (
            {"instructions": "x", "input": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
            "messages.2.content",
            "invalid 'messages.2.content'",
            "input.1.content",
            "invalid 'input.1.content'",
        ),
        (
            {"instructions": "x"},
            "messages.0",
            "a system turn cannot go there",
            "instructions",
            "a system turn cannot go there",
        ),
        (
            {"text": {"format": {"type": "json_schema", "name": "a", "schema": {}}}},
            "response_format.json_schema.schema.properties.when",
            "'format': 'date-time' cannot be expressed",
            "text.format.schema.properties.when",
            "'format': 'date-time' cannot be expressed",
        ),
        (
            {"tools": [{"type": "function", "name": "f"}]},
            "tools.0.function.parameters",
            "the template cannot express tools",
            "tools.0.parameters",
            "the template cannot express tools",
        ),
        ({"top_logprobs": 2}, "logprobs", "logprobs: too many", "top_logprobs", "top_logprobs: too many"),
    ],
)
def test_chat_path_errors_name_the_fields_this_client_sent(
    fields: dict[str, Any], chat_param: str, chat_message: str, param: str, message: str
) -> None:
    request = parse(**fields)
    renamed = responses_error(RequestError(chat_message, param=chat_param), request)
    assert (renamed.param, renamed.message) == (param, message)
    assert str(renamed) == message


def test_a_renamed_error_keeps_its_class_and_code() -> None:
    original = ContextLengthError("the prompt has 9000 tokens but the context holds 1024", param="messages")
    renamed = responses_error(original, parse())
    assert isinstance(renamed, ContextLengthError)
    assert renamed.code == "context_length_exceeded"
    assert renamed.param == "input"
    assert original.param == "messages"  # the original is not changed


# The answer.

LOGPROB = TokenLogprob(b"Hi", -0.25, (TopLogprob(b"Hi", -0.25), TopLogprob(b"\xe0\xa4", -2.5)))
TEXT_ANSWER: list[Outcome] = [
    ChoiceDelta(0, "Hi", (LOGPROB,)),
    KeepAlive(),
    ChoiceDelta(0, " there", (TokenLogprob(b" there", -0.5),)),
    ChoiceEnd(0, "stop", 2),
    AnswerUsage(prompt_tokens=11, completion_tokens=2, cached_tokens=4),
]


def test_a_whole_response_is_an_openai_response_with_text_usage_and_echoes() -> None:
    request = parse(instructions="Be kind.", max_output_tokens=30, temperature=0.2, metadata={"a": "b"}, top_logprobs=1)
    body = collect_response(request, TEXT_ANSWER, model="gemma")
    response = Response.model_validate(body)
    assert response.output_text == "Hi there"
    assert response.id.startswith("resp_")
    assert response.status == "completed"
    assert response.incomplete_details is None
    message = response.output[0]
    assert message.type == "message"
    assert message.id.startswith("msg_")
    assert (message.status, message.role) == ("completed", "assistant")
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens, response.usage.total_tokens) == (11, 2, 13)
    assert response.usage.input_tokens_details.cached_tokens == 4
    assert response.usage.output_tokens_details.reasoning_tokens == 0
    assert (response.instructions, response.max_output_tokens, response.temperature) == ("Be kind.", 30, 0.2)
    assert response.metadata == {"a": "b"}
    assert response.model == "gemma"
    assert body["store"] is False


def test_log_probabilities_come_in_the_response_shape_with_exact_bytes() -> None:
    body = collect_response(parse(top_logprobs=1), TEXT_ANSWER, model="gemma")
    logprobs = body["output"][0]["content"][0]["logprobs"]
    assert logprobs[0] == {
        "token": "Hi",
        "bytes": [72, 105],
        "logprob": -0.25,
        "top_logprobs": [
            {"token": "Hi", "bytes": [72, 105], "logprob": -0.25},
            {"token": "bytes:\\xe0\\xa4", "bytes": [0xE0, 0xA4], "logprob": -2.5},  # part of a character
        ],
    }
    assert [entry["token"] for entry in logprobs] == ["Hi", " there"]


def test_an_impossible_token_has_a_finite_logprob_so_the_body_stays_json() -> None:
    outcomes: list[Outcome] = [
        ChoiceDelta(0, "a", (TokenLogprob(b"a", float("-inf"), (TopLogprob(b"b", float("nan")),)),)),
        ChoiceEnd(0, "stop", 1),
        AnswerUsage(2, 1),
    ]
    raw, _ = stream_bytes(parse(top_logprobs=1), outcomes)
    assert b"Infinity" not in raw and b"NaN" not in raw
    entry = decoded(raw)[-1]["response"]["output"][0]["content"][0]["logprobs"][0]
    assert (entry["logprob"], entry["top_logprobs"][0]["logprob"]) == (-9999.0, -9999.0)


def test_the_whole_format_is_the_collected_response() -> None:
    request = parse()
    whole = ResponsesFormat(request, model="gemma", builder=builder(request)).whole(TEXT_ANSWER)
    assert Response.model_validate(whole).output_text == "Hi there"


def test_a_length_finish_is_an_incomplete_response_that_says_why() -> None:
    outcomes: list[Outcome] = [ChoiceDelta(0, "Once upon"), ChoiceEnd(0, "length", 2), AnswerUsage(5, 2)]
    response = Response.model_validate(collect_response(parse(max_output_tokens=2), outcomes, model="gemma"))
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete"  # type: ignore[union-attr]
    assert response.output_text == "Once upon"


def test_an_empty_answer_is_one_empty_message() -> None:
    response = Response.model_validate(
        collect_response(parse(), [ChoiceEnd(0, "stop", 0), AnswerUsage(5, 0)], model="m")
    )
    assert response.output_text == ""
    assert len(response.output) == 1


def test_a_failed_answer_is_a_failed_response_with_the_reason() -> None:
    outcomes: list[Outcome] = [ChoiceDelta(0, "Hi"), AnswerFailed("decode failed: -3")]
    response = Response.model_validate(collect_response(parse(), outcomes, model="gemma"))
    assert response.status == "failed"
    assert response.error is not None
    assert response.error.message == "decode failed: -3"


def test_outcomes_that_end_without_a_result_are_a_failure_not_a_completed_answer() -> None:
    response = Response.model_validate(collect_response(parse(), [ChoiceDelta(0, "Hi")], model="gemma"))
    assert response.status == "failed"


def test_tool_calls_are_function_call_items_after_the_text() -> None:
    outcomes: list[Outcome] = [
        ChoiceDelta(0, "Let me check."),
        ChoiceDelta(0, tool_calls=(ToolCall("call_1", "weather", '{"city":"Paris"}'),)),
        ChoiceEnd(0, "tool_calls", 9),
        AnswerUsage(20, 9),
    ]
    request = parse(tools=[{"type": "function", "name": "weather", "parameters": {"type": "object"}}])
    response = Response.model_validate(collect_response(request, outcomes, model="gemma"))
    assert response.status == "completed"
    assert [item.type for item in response.output] == ["message", "function_call"]
    call = response.output[1]
    assert call.type == "function_call"
    assert (call.call_id, call.name, call.arguments, call.status) == (
        "call_1",
        "weather",
        '{"city":"Paris"}',
        "completed",
    )
    assert response.tools[0].type == "function"
    assert response.tools[0].name == "weather"


# The stream.


def stream_bytes(request: Any, outcomes: list[Outcome]) -> tuple[bytes, ResponseBuilder]:
    """What the serving core sends for these outcomes through the Responses API's format."""
    built = builder(request)
    answer = ResponsesFormat(request, model="gemma", builder=built)
    chunks = answer.opening()
    for outcome in outcomes:
        chunks += answer.frames(outcome)
    chunks += answer.closing()
    return b"".join(chunks), built


def decoded(raw: bytes) -> list[dict[str, Any]]:
    """What the official client's SSE decoder reads, fed a few bytes at a time as a network would."""
    pieces = (raw[start : start + 7] for start in range(0, len(raw), 7))
    events = []
    for sse in SSEDecoder().iter_bytes(pieces):
        data = sse.json()
        assert sse.event == data["type"]
        events.append(data)
    return events


def test_the_stream_is_openais_typed_events_in_order_and_each_validates() -> None:
    raw, _ = stream_bytes(parse(top_logprobs=1), TEXT_ANSWER)
    events = decoded(raw)
    assert [event["type"] for event in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    for event in events:
        parsed = EVENTS.validate_python(event)
        assert parsed.type == event["type"]
    deltas = [event for event in events if event["type"] == "response.output_text.delta"]
    assert "".join(event["delta"] for event in deltas) == "Hi there"
    assert deltas[0]["logprobs"] == [
        {
            "token": "Hi",
            "logprob": -0.25,
            "top_logprobs": [{"token": "Hi", "logprob": -0.25}, {"token": "bytes:\\xe0\\xa4", "logprob": -2.5}],
        }
    ]
    assert events[0]["response"]["status"] == "in_progress"
    assert events[-1]["response"]["usage"]["input_tokens"] == 11


def test_keepalives_are_comments_the_client_skips() -> None:
    raw, _ = stream_bytes(parse(), TEXT_ANSWER)
    assert KEEPALIVE in raw
    assert all(event["type"] != "" for event in decoded(raw))


def test_the_streamed_response_is_the_whole_response() -> None:
    request = parse(top_logprobs=2)
    raw, built = stream_bytes(request, TEXT_ANSWER)
    whole = collect_response(request, TEXT_ANSWER, model="gemma", builder=builder(request))
    assert decoded(raw)[-1]["response"] == whole == built.response()


def client_accumulates(raw: bytes, request_tools: Any = omit) -> Any:
    """The state behind ``client.responses.stream``: it checks ids, indexes and order as it goes."""
    state: ResponseStreamState[Any] = ResponseStreamState(input_tools=request_tools, text_format=omit)
    for event in decoded(raw):
        state.handle_event(cast(Any, construct_type(type_=ResponseStreamEvent, value=event)))
    return state._completed_response


def test_the_official_stream_helper_accumulates_the_same_answer() -> None:
    raw, _ = stream_bytes(parse(), TEXT_ANSWER)
    response = client_accumulates(raw)
    assert response is not None
    assert response.output_text == "Hi there"


def test_a_streamed_tool_call_is_an_item_with_its_arguments() -> None:
    tools = [{"type": "function", "name": "weather", "parameters": {"type": "object"}, "strict": False}]
    outcomes: list[Outcome] = [
        ChoiceDelta(0, tool_calls=(ToolCall("call_1", "weather", '{"city":"Rome"}'),)),
        ChoiceEnd(0, "tool_calls", 7),
        AnswerUsage(20, 7),
    ]
    raw, _ = stream_bytes(parse(tools=tools), outcomes)
    events = decoded(raw)
    for event in events:
        EVENTS.validate_python(event)
    kinds = [event["type"] for event in events]
    assert kinds[2:6] == [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
    ]
    response = client_accumulates(raw, tools)
    assert response is not None
    assert [(item.type, item.arguments) for item in response.output] == [("function_call", '{"city":"Rome"}')]


def test_the_end_waits_for_the_usage_whichever_comes_first() -> None:
    usage_first: list[Outcome] = [ChoiceDelta(0, "Hi"), AnswerUsage(3, 1), ChoiceEnd(0, "stop", 1)]
    events = decoded(stream_bytes(parse(), usage_first)[0])
    assert events[-1]["type"] == "response.completed"
    assert events[-1]["response"]["usage"]["total_tokens"] == 4
    assert sum(event["type"] == "response.completed" for event in events) == 1


def test_a_streamed_length_finish_ends_with_response_incomplete() -> None:
    outcomes: list[Outcome] = [ChoiceDelta(0, "Once"), ChoiceEnd(0, "length", 1), AnswerUsage(3, 1)]
    events = decoded(stream_bytes(parse(max_output_tokens=1), outcomes)[0])
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    EVENTS.validate_python(events[-1])


def test_a_streamed_failure_ends_with_response_failed_and_nothing_after() -> None:
    outcomes: list[Outcome] = [ChoiceDelta(0, "Hi"), AnswerFailed("decode failed"), ChoiceDelta(0, "more")]
    events = decoded(stream_bytes(parse(), outcomes)[0])
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["error"]["message"] == "decode failed"
    EVENTS.validate_python(events[-1])


def test_a_stream_without_usage_still_completes_at_the_end() -> None:
    events = decoded(stream_bytes(parse(), [ChoiceDelta(0, "Hi"), ChoiceEnd(0, "stop", 1)])[0])
    assert events[-1]["type"] == "response.completed"
    assert events[-1]["response"]["usage"] is None


@pytest.mark.parametrize(
    "fields",
    [
        {"instructions": "x", "max_output_tokens": 3, "temperature": 0, "top_p": 0.9, "seed": 1, "stream": True},
        {"text": {"format": {"type": "json_object"}}, "top_logprobs": 5},
        {"text": {"format": {"type": "json_schema", "name": "a", "schema": {"type": "object"}, "strict": True}}},
        {
            "input": [
                {"role": "user", "content": "q"},
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "42"},
            ],
            "tools": [{"type": "function", "name": "f", "description": "d", "parameters": {"type": "object"}}],
            "tool_choice": "required",
            "parallel_tool_calls": True,
        },
    ],
)
def test_the_chat_path_reads_every_field_the_translation_writes(fields: dict[str, Any]) -> None:
    chat = wire.parse_request(wire.ChatCompletionRequest, json.dumps(to_chat_body(parse(**fields))).encode())
    assert chat.messages
