"""OpenAI wire models and SSE framing, without a server."""

from __future__ import annotations

import json

import pytest

from peerinfer.api import openai as wire
from peerinfer.api import sse
from peerinfer.client.sse_parser import SSEParser
from peerinfer.errors import RequestError

GOOD = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        (b"{bad json", "body", "not valid JSON"),
        (b"", "body", "empty"),
        (b"[1, 2]", "body", "JSON object"),
        (b"{}", "messages", "required"),
        (b'{"messages": []}', "messages", "at least one"),
        (b'{"messages": "hi"}', "messages", "valid array"),
        (b'{"messages": [{"role": "robot", "content": "x"}]}', "messages.0.role", "'user'"),
        (b'{"messages": [{"role": "user", "content": 5}]}', "messages.0.content", "got 5"),
        (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', "max_tokens", "greater than or equal"),
        (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}', "max_tokens", "valid integer"),
        (b'{"messages": [{"role": "user", "content": "x"}], "temperature": 2.5}', "temperature", "less than or equal"),
        (b'{"messages": [{"role": "user", "content": "x"}], "temperature": -1}', "temperature", "greater than"),
        (b'{"messages": [{"role": "user", "content": "x"}], "top_p": 0}', "top_p", "greater than"),
        (b'{"messages": [{"role": "user", "content": "x"}], "n": 65}', "n", "less than or equal"),
        (b'{"messages": [{"role": "user", "content": "x"}], "n": 0}', "n", "greater than or equal"),
        (b'{"messages": [{"role": "user", "content": "x"}], "top_k": -1}', "top_k", "greater than or equal"),
        (b'{"messages": [{"role": "user", "content": "x"}], "stop": ["a","b","c","d","e"]}', "stop", "at most 4"),
        (b'{"messages": [{"role": "user", "content": "x"}], "stream": "yes"}', "stream", "valid boolean"),
    ],
)
def test_bad_chat_requests_name_the_field_and_the_problem(body: bytes, param: str, fragment: str) -> None:
    with pytest.raises(RequestError) as caught:
        wire.parse_request(wire.ChatCompletionRequest, body)
    assert caught.value.param == param
    assert fragment in caught.value.message


def test_good_request_reads_content_parts_and_the_sampling_fields() -> None:
    body = {
        "model": "anything",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        "presence_penalty": 0.5,
        "logit_bias": {"12": -100, "7": 2.5},
        "stop": "END",
        "stream_options": {"include_usage": True},
    }
    parsed = wire.parse_request(wire.ChatCompletionRequest, json.dumps(body).encode())
    assert parsed.messages[0].text == "ab"
    assert parsed.stops == ("END",)
    assert parsed.include_usage
    assert parsed.presence_penalty == 0.5
    assert parsed.biases == ((12, -100.0), (7, 2.5))


def test_an_unknown_field_is_refused_by_name() -> None:
    with pytest.raises(RequestError) as caught:
        wire.parse_request(wire.ChatCompletionRequest, json.dumps({**GOOD, "temperatur": 0}).encode())
    assert caught.value.param == "temperatur"
    assert "not a field" in caught.value.message


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    body = {**GOOD, "max_tokens": 5, "max_completion_tokens": 7}
    assert wire.parse_request(wire.ChatCompletionRequest, json.dumps(body).encode()).token_limit == 7


def test_completion_accepts_a_single_prompt_in_a_list() -> None:
    parsed = wire.parse_request(wire.CompletionRequest, b'{"prompt": ["once upon"]}')
    assert parsed.prompt_text == "once upon"
    with pytest.raises(RequestError, match="exactly one prompt"):
        wire.parse_request(wire.CompletionRequest, b'{"prompt": ["a", "b"]}')


def test_sse_event_is_one_data_line_and_keeps_unicode() -> None:
    frame = sse.event({"text": "नमस्ते\nline"})
    assert frame.startswith(b"data: ") and frame.endswith(b"\n\n")
    assert frame.count(b"\n") == 2
    assert "नमस्ते".encode() in frame


def test_sse_parser_survives_any_split_of_the_bytes() -> None:
    stream = sse.event({"t": "வணக்கம் 👋"}) + sse.KEEPALIVE + b"data: a\r\ndata: b\r\n\r\n" + sse.DONE
    for size in (1, 2, 3, 7, len(stream)):
        parser = SSEParser()
        events = []
        for start in range(0, len(stream), size):
            events.extend(parser.feed(stream[start : start + size]))
        assert [event.data for event in events] == [wire.dumps({"t": "வணக்கம் 👋"}), "a\nb", "[DONE]"]
