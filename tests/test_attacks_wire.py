"""Bodies a hostile or sloppy client sends: each error names the field that was wrong."""

from __future__ import annotations

import pytest

from peerinfer.api import openai as wire
from peerinfer.errors import RequestError


@pytest.mark.parametrize(
    ("model", "body", "param"),
    [
        (wire.CompletionRequest, b'{"prompt": "hi", "stream_options": "x"}', "stream_options"),
        (wire.ChatCompletionRequest, b'{"messages": ["hi"]}', "messages.0"),
        (wire.CompletionRequest, b'["hi"]', "body"),
        (wire.CompletionRequest, b'"hi"', "body"),
    ],
)
def test_a_field_that_is_not_an_object_is_named(model: type[wire.SamplingFields], body: bytes, param: str) -> None:
    with pytest.raises(RequestError) as caught:
        wire.parse_request(model, body)
    assert caught.value.param == param
    assert (param == "body") == ("the request body" in caught.value.message)
