"""The stream stitcher (``peerinfer.api.relay``): what a client of the gateway sees of a routed answer. No server."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest

from peerinfer.api.relay import StreamStitcher, checked_error, stream_choice, whole_answer


@dataclass(frozen=True)
class Move:
    from_url: str
    to_url: str
    reason: str
    resumed_chars: int


def role() -> dict[str, Any]:
    return {
        "id": "chatcmpl-peer",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "peer-model",
        "system_fingerprint": "fp_abc",
        "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        ],
    }


def text(piece: str, peer: str = "peer") -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{peer}",
        "object": "chat.completion.chunk",
        "created": 2,
        "model": "peer-model",
        "choices": [{"index": 0, "delta": {"content": piece}, "logprobs": None, "finish_reason": None}],
    }


def finish(reason: str = "stop") -> dict[str, Any]:
    return {"id": "x", "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}]}


def usage(prompt: int, completion: int) -> dict[str, Any]:
    return {"id": "x", "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion}}


def content(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])


def resumed_stream(wants_usage: bool) -> tuple[StreamStitcher, list[dict[str, Any]]]:
    """Peer A streams 'Once upon', dies; peer B continues ' a time.' with its own opening and usage."""
    stitch = StreamStitcher("chat", model="my-model", wants_usage=wants_usage, request_id="chatcmpl-gw", created=7)
    out: list[dict[str, Any]] = []
    out += stitch.opened("A", "http://a", None)
    for payload in (role(), text("Once"), text(" upon")):
        out += stitch.chunk(payload)
    out += stitch.opened("B", "http://b", Move("http://a", "http://b", "the connection broke", 9))
    for payload in (role(), text(" a", "b"), text(" time.", "b"), finish(), usage(30, 2)):
        out += stitch.chunk(payload)
    out += stitch.finish(21, 4)
    return stitch, out


def test_a_resumed_stream_is_one_stream_with_one_id_one_role_and_no_repeat() -> None:
    _, out = resumed_stream(wants_usage=False)
    assert content(out) == "Once upon a time."
    assert {c["id"] for c in out} == {"chatcmpl-gw"}
    assert {c["created"] for c in out} == {7}
    assert {c["model"] for c in out} == {"my-model"}
    assert {c["object"] for c in out} == {"chat.completion.chunk"}
    roles = [c for c in out if c["choices"] and "role" in c["choices"][0]["delta"]]
    assert len(roles) == 1 and roles[0] is out[0]
    assert [c["choices"][0]["finish_reason"] for c in out if c["choices"]].count("stop") == 1
    assert all("usage" not in c for c in out)  # the peers' usage never passes; the client did not ask


def test_the_peerinfer_note_names_each_peer_where_it_starts_and_sums_up_at_the_end() -> None:
    _, out = resumed_stream(wants_usage=False)
    notes = [(i, c["peerinfer"]) for i, c in enumerate(out) if "peerinfer" in c]
    assert notes[0] == (0, {"peer": "A", "url": "http://a"})
    index, after_switch = notes[1]
    assert content([out[index]]) == " a"  # the first chunk B serves
    assert after_switch == {
        "peer": "B",
        "url": "http://b",
        "switch": {"from": "http://a", "to": "http://b", "reason": "the connection broke", "resumed_chars": 9},
    }
    assert notes[-1][0] == len(out) - 1
    assert notes[-1][1] == {"peers": ["http://a", "http://b"], "failovers": 0, "resumes": 1}
    assert out[-1]["choices"][0]["finish_reason"] == "stop"


def test_usage_covers_the_whole_answer_and_comes_last_only_when_asked() -> None:
    _, out = resumed_stream(wants_usage=True)
    assert out[-1]["choices"] == []
    assert out[-1]["usage"] == {"prompt_tokens": 21, "completion_tokens": 4, "total_tokens": 25}
    assert out[-1]["peerinfer"]["peers"] == ["http://a", "http://b"]
    assert sum("usage" in c for c in out) == 1


def test_a_failover_before_any_chunk_opens_with_the_second_peers_role() -> None:
    stitch = StreamStitcher("chat", model=None, wants_usage=False)
    out = stitch.opened("A", "http://a", None)
    out += stitch.opened("B", "http://b", Move("http://a", "http://b", "refused", 0))
    out += stitch.chunk(role()) + stitch.chunk(text("Hi")) + stitch.chunk(finish())
    out += stitch.finish(3, 1)
    assert out[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert out[0]["peerinfer"]["peer"] == "B" and out[0]["peerinfer"]["switch"]["resumed_chars"] == 0
    assert out[0]["model"] == "peer-model"  # none asked: the first peer's
    assert out[-1]["peerinfer"] == {"peers": ["http://a", "http://b"], "failovers": 1, "resumes": 0}


def test_a_finish_sent_by_a_peer_that_then_died_does_not_reach_the_client() -> None:
    stitch = StreamStitcher("chat", model="m", wants_usage=False)
    out = stitch.opened("A", "http://a", None)
    out += stitch.chunk(role()) + stitch.chunk(text("Once"))
    cut = {"choices": [{"index": 0, "delta": {"content": " upon"}, "finish_reason": "stop"}]}
    out += stitch.chunk(cut)  # then no [DONE]: the core resumes after "Once upon"
    out += stitch.opened("B", "http://b", Move("http://a", "http://b", "cut", 9))
    out += stitch.chunk(role()) + stitch.chunk(text(" a")) + stitch.chunk(finish("length"))
    out += stitch.finish(None, 3)
    assert content(out) == "Once upon a"
    assert [c["choices"][0]["finish_reason"] for c in out if c["choices"]] == [None, None, None, None, "length"]


def test_a_stream_without_any_finish_still_ends_with_the_summary() -> None:
    stitch = StreamStitcher("completion", model="m", wants_usage=False, request_id="cmpl-1")
    out = stitch.opened("A", "http://a", None)
    out += stitch.chunk({"choices": [{"index": 0, "text": "abc"}]})
    out += stitch.finish(None, 1)
    assert [c["object"] for c in out] == ["text_completion", "text_completion"]
    assert out[0]["choices"][0]["text"] == "abc"
    assert out[-1]["choices"] == [] and out[-1]["peerinfer"]["peers"] == ["http://a"]


def test_a_single_chunk_stream_carries_both_notes() -> None:
    stitch = StreamStitcher("completion", model="m", wants_usage=False)
    out = stitch.opened("A", "http://a", None)
    out += stitch.chunk({"choices": [{"index": 0, "text": "x", "finish_reason": "length"}]})
    out += stitch.finish(2, 1)
    assert len(out) == 1
    assert out[0]["peerinfer"] == {"peer": "A", "url": "http://a", "peers": ["http://a"], "failovers": 0, "resumes": 0}


HOSTILE_CHUNKS = [
    {"choices": [{"index": 0, "delta": {"content": "ok", "evil": "<script>"}, "x": 1}], "peerinfer": {"peer": "me"}},
    {"choices": [{"index": 0, "delta": {"content": "ok"}, "logprobs": {"content": [{"token": 5}]}}]},
    {"choices": [{"index": 0, "delta": {"content": "ok", "role": "system"}}], "id": "chatcmpl-evil", "created": 0},
    {"choices": [{"index": 0, "delta": {"content": "ok", "tool_calls": "rm -rf"}, "finish_reason": None}]},
    {"choices": [{"index": 0, "delta": {"content": "ok"}}], "usage": {"prompt_tokens": 10**9}, "object": "evil"},
    {"choices": [{"index": 0, "delta": {"content": "ok"}}], "model": {"$gt": ""}, "system_fingerprint": ["x"]},
]


@pytest.mark.parametrize("payload", HOSTILE_CHUNKS)
def test_a_peers_unknown_or_ill_typed_keys_never_reach_the_client(payload: dict[str, Any]) -> None:
    stitch = StreamStitcher("chat", model=None, wants_usage=False, request_id="chatcmpl-gw", created=5)
    stitch.opened("A", "http://a", None)
    out = stitch.chunk(payload)
    assert len(out) == 1
    chunk = out[0]
    assert set(chunk) <= {"id", "object", "created", "model", "system_fingerprint", "choices", "peerinfer"}
    assert chunk["id"] == "chatcmpl-gw" and chunk["created"] == 5 and chunk["object"] == "chat.completion.chunk"
    assert chunk["peerinfer"] == {"peer": "A", "url": "http://a"}
    assert isinstance(chunk["model"], str)
    assert chunk["choices"] == [{"index": 0, "delta": {"content": "ok"}, "logprobs": None, "finish_reason": None}]


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"choices": "many"},
        {"choices": [None, 3, "x", {"index": -1}, {"index": 10**6}, {"index": True}]},
        {"choices": [{"index": 0, "delta": "text"}]},
        {"choices": [{"index": 0, "delta": {"content": 5}}]},
        {"choices": [{"index": 0, "delta": {"content": ""}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "self-destruct"}]},
    ],
)
def test_a_chunk_with_nothing_checkable_sends_nothing_and_never_raises(payload: dict[str, Any]) -> None:
    stitch = StreamStitcher("chat", model="m", wants_usage=False)
    stitch.opened("A", "http://a", None)
    assert stitch.chunk(payload) == []
    assert stitch.finish(None, 0)[-1]["peerinfer"]["peers"] == ["http://a"]


def test_well_formed_logprobs_and_tool_calls_pass_whole() -> None:
    logprobs = {
        "content": [
            {
                "token": "Hi",
                "logprob": -0.5,
                "bytes": [72, 105],
                "top_logprobs": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105]}],
            }
        ],
        "refusal": None,
    }
    calls = [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    choice = stream_choice({"index": 0, "delta": {"tool_calls": calls}, "logprobs": logprobs}, "chat")
    assert choice == {"index": 0, "delta": {"tool_calls": calls}, "logprobs": logprobs, "finish_reason": None}
    legacy = {"tokens": ["a"], "token_logprobs": [-1.0], "top_logprobs": [{"a": -1.0}], "text_offset": [0]}
    assert stream_choice({"index": 0, "text": "a", "logprobs": legacy}, "completion") == {
        "index": 0,
        "text": "a",
        "logprobs": legacy,
        "finish_reason": None,
    }
    broken = {**legacy, "text_offset": ["zero"]}
    assert stream_choice({"index": 0, "text": "a", "logprobs": broken}, "completion")["logprobs"] is None  # type: ignore[index]


def test_every_payload_sent_is_json_however_deep_the_peers_lies() -> None:
    stitch = StreamStitcher("chat", model="m", wants_usage=True)
    stitch.opened("A", "http://a", None)
    deep: Any = "x"
    for _ in range(50):
        deep = {"content": [deep]}
    out = stitch.chunk({"choices": [{"index": 0, "delta": {"content": "y"}, "logprobs": deep}]})
    out += stitch.finish(1, 1)
    for chunk in out:
        json.dumps(chunk)
    assert out[0]["choices"][0]["logprobs"] is None


def test_whole_answers_keep_only_checked_keys_and_get_the_gateways_id() -> None:
    peer = {
        "id": "chatcmpl-peer",
        "object": "chat.completion",
        "created": 1,
        "model": "peer-model",
        "system_fingerprint": "fp_1",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello", "refusal": None, "audio": "x"},
                "logprobs": None,
                "finish_reason": "stop",
                "junk": 1,
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        "evil": True,
    }
    answer = whole_answer(peer, "chat", model=None, request_id="chatcmpl-gw", created=9)
    assert answer == {
        "id": "chatcmpl-gw",
        "object": "chat.completion",
        "created": 9,
        "model": "peer-model",
        "system_fingerprint": "fp_1",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }


@pytest.mark.parametrize(
    "payload",
    [None, [], "x", {}, {"choices": []}, {"choices": [{"index": 0}]}, {"choices": [{"index": 0, "text": 5}]}],
)
def test_a_whole_answer_that_is_not_one_is_the_peers_failure(payload: Any) -> None:
    assert whole_answer(payload, "completion", model="m") is None
    assert whole_answer(payload, "chat", model="m") is None


def test_a_workers_error_object_is_bounded_and_stringly_typed() -> None:
    assert checked_error({"message": "bad  \n field", "type": "invalid_request_error", "param": 5, "code": None}) == {
        "message": "bad field",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    assert checked_error({"message": 5}) is None
    assert checked_error("oops") is None


def test_each_choice_of_several_keeps_its_own_role() -> None:
    stitch = StreamStitcher("chat", model="m", wants_usage=False)
    stitch.opened("A", "http://a", None)
    out = []
    for index in (0, 1):
        out += stitch.chunk({"choices": [{"index": index, "delta": {"role": "assistant", "content": ""}}]})
    out += stitch.chunk({"choices": [{"index": 1, "delta": {"role": "assistant", "content": "x"}}]})
    assert [c["choices"][0]["delta"] for c in out] == [
        {"role": "assistant", "content": ""},
        {"role": "assistant", "content": ""},
        {"content": "x"},
    ]
