"""Every function that reads bytes from the network ends in "accepted" or "rejected for reason X".

Hypothesis feeds each reader arbitrary bytes, arbitrary JSON (deep nesting, huge integers, NaN and
infinities) and validly signed records with a wrong value in one field. None may raise anything
but its own rejection.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from peerinfer.client.peer_http import HttpReply, PeerRejected
from peerinfer.client.sse_parser import SSEError, SSEParser
from peerinfer.client.stream_events import read_chunk
from peerinfer.client.transport import WorkerHttp
from peerinfer.client.vetting import read_challenge, read_health
from peerinfer.network.identity import b64
from peerinfer.network.records import (
    _FIELDS,
    RecordRejected,
    canonical,
    select_live,
    sign_record,
    verify_challenge,
    verify_record,
)
from tests.test_network_records import IDENTITY, NOW, make_record

REASONS = {"too_large", "malformed", "bad_field", "bad_version", "id_mismatch", "bad_signature", "expired", "future"}
FAST = settings(derandomize=True, max_examples=300, deadline=None)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=10**300, max_value=10**1000),  # too big for a float
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
deep = st.builds(
    lambda n, opener, tail: (opener * n + tail).encode(),
    st.one_of(st.integers(min_value=1, max_value=3000), st.sampled_from([999, 1000, 1001, 2000, 3000])),
    st.sampled_from(["[", '{"a":', '[{"record":']),
    st.sampled_from(["", "1", "]" * 3]),
)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


def _signed_with(field: str, value: Any) -> bytes:
    """A record signed by its own key whose ``field`` holds ``value``: only the field checks can refuse it."""
    body = make_record(IDENTITY).as_dict()
    body[field] = value
    try:
        message = b"peerinfer-record-v1\n" + canonical(body)
    except (ValueError, TypeError):
        message = b"peerinfer-record-v1\n" + _dumps(body)  # NaN cannot be canonical; sign what is sent
    return _dumps({"record": body, "sig": b64(IDENTITY.sign(message))})


def _read(data: bytes) -> str:
    try:
        verify_record(data, NOW + 1)
    except RecordRejected as exc:
        assert exc.reason in REASONS, exc.reason
        return exc.reason
    return "accepted"


@FAST
@given(st.binary(max_size=3000))
def test_any_bytes(data: bytes) -> None:
    _read(data)
    assert select_live([data], NOW).records == []


@FAST
@given(json_values)
def test_any_json(value: Any) -> None:
    assert _read(_dumps(value)) != "accepted"
    _read(_dumps({"record": value, "sig": value}))


@FAST
@given(deep)
@example(b"[" * 2000)
def test_deep_nesting(data: bytes) -> None:
    assert _read(data) in {"malformed", "too_large"}


@FAST
@given(st.sampled_from(sorted(_FIELDS)), json_values)
@example("tokens_per_s", 10**400)
@example("slots_total", "four")
def test_a_signed_record_with_any_value_in_any_field(field: str, value: Any) -> None:
    outcome = _read(_signed_with(field, value))
    if outcome == "accepted":  # only a value of the right type and range gets through
        assert type(value) is type(make_record(IDENTITY).as_dict()[field]) or field in {"tokens_per_s", "issued_at"}
    live = select_live([_signed_with(field, value), sign_record(make_record(IDENTITY), IDENTITY)], NOW + 1)
    assert len(live.records) == 1


@FAST
@given(json_values, st.binary(min_size=16, max_size=64))
def test_challenge_answers(answer: Any, nonce: bytes) -> None:
    record = make_record(IDENTITY)
    assert verify_challenge(record, nonce, answer) is False
    assert verify_challenge(record, nonce, {"peer_id": IDENTITY.peer_id, "signature": answer}) is False


def test_finite_check_is_real() -> None:
    assert _read(_signed_with("tokens_per_s", math.inf)) == "bad_field"


# --- what a peer answers the routed client ------------------------------------------------------

PEER_REASONS = {"unhealthy", "wrong_model", "malformed", "bad_field", "bad_challenge", "stream_error", "too_large"}
RECORD = make_record(IDENTITY)
health_fields = st.fixed_dictionaries(
    {"sha256": st.one_of(st.just(RECORD.sha256), json_values)},
    optional={name: json_values for name in ("slots_total", "slots_free", "requests_waiting", "status")},
)


def _peer_outcome(read: Any, *args: Any) -> str:
    try:
        read(*args)
    except PeerRejected as exc:
        assert exc.reason in PEER_REASONS, exc.reason
        return exc.reason
    return "accepted"


@FAST
@given(
    st.one_of(st.binary(max_size=2000), json_values.map(_dumps), health_fields.map(_dumps), deep), st.integers(100, 599)
)
@example(b'{"sha256": "' + RECORD.sha256.encode() + b'", "slots_total": "four"}', 200)
def test_health_replies(body: bytes, status: int) -> None:
    outcome = _peer_outcome(read_health, HttpReply(status, {}, body), RECORD, 0.01)
    if outcome == "accepted":
        probe = read_health(HttpReply(status, {}, body), RECORD, 0.01)
        assert 1 <= probe.slots_total <= 4096 and 0 <= probe.slots_free <= probe.slots_total


@FAST
@given(st.one_of(st.binary(max_size=2000), json_values.map(_dumps), deep), st.binary(min_size=16, max_size=64))
def test_challenge_replies(body: bytes, nonce: bytes) -> None:
    assert _peer_outcome(read_challenge, HttpReply(200, {}, body), RECORD, nonce) in {"bad_challenge", "malformed"}


class _OneReply:
    """A TCP server on 127.0.0.1 that answers each connection with ``reply`` bytes, then closes."""

    def __init__(self) -> None:
        self.reply = b""
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.recv(65536)
                    conn.sendall(self.reply)
                except OSError:
                    pass

    def close(self) -> None:
        self._server.close()


@pytest.fixture(scope="module")
def one_reply() -> Iterator[_OneReply]:
    server = _OneReply()
    yield server
    server.close()


@settings(derandomize=True, max_examples=120, deadline=None)
@given(st.binary(max_size=3000), st.booleans())
@example(b"Transfer-Encoding: chunked\r\n\r\nffffffff\r\nab", True)
@example(b"Content-Length: 99999999999999999999\r\n\r\n", True)
@example(b"Content-Encoding: gzip\r\nContent-Length: 4\r\n\r\nabcd", True)
def test_http_replies(one_reply: _OneReply, data: bytes, with_status: bool) -> None:
    """Whatever bytes a peer answers a probe with, the transport ends in a reply or a ``PeerRejected``."""
    one_reply.reply = (b"HTTP/1.1 200 OK\r\n" + data) if with_status else data

    async def probe() -> str:
        http = WorkerHttp()
        try:
            await http.exchange(
                f"http://127.0.0.1:{one_reply.port}", "GET", "/health", deadline=time.monotonic() + 2, max_bytes=1024
            )
        except PeerRejected as exc:
            assert exc.reason in {"malformed", "too_large", "timeout", "unreachable"}, exc
            return exc.reason
        finally:
            await http.aclose()
        return "accepted"

    outcome = asyncio.run(probe())
    if data.startswith(b"Content-Encoding: gzip"):
        assert outcome == "malformed"  # never inflated


@FAST
@given(st.one_of(st.text(max_size=500), json_values.map(lambda v: _dumps(v).decode()), deep.map(bytes.decode)))
@example('{"choices": [{"delta": {"content": 5}}]}')
@example('{"error": ["not", "an", "object"]}')
@example('{"usage": {"completion_tokens": "many"}}')
def test_stream_payloads(data: str) -> None:
    outcome = _peer_outcome(read_chunk, data)
    if outcome == "accepted":
        chunk = read_chunk(data)
        assert isinstance(chunk.text, str)


@FAST
@given(st.lists(st.binary(max_size=300), max_size=20))
def test_sse_parser_on_any_bytes(pieces: list[bytes]) -> None:
    parser = SSEParser(max_line_bytes=256, max_event_bytes=512)
    try:
        for piece in pieces:
            for event in parser.feed(piece):
                assert isinstance(event.data, str)
    except SSEError:
        pass  # over the limits: the stream is refused, memory stays bounded


def test_sse_parser_refuses_a_line_that_never_ends() -> None:
    parser = SSEParser(max_line_bytes=1000)
    with pytest.raises(SSEError):
        for _ in range(100):
            parser.feed(b"x" * 100)
    assert len(parser._buffer) <= 1100
