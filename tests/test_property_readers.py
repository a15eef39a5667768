"""Every function that reads bytes from the network ends in "accepted" or "rejected for reason X".

Hypothesis feeds each reader arbitrary bytes, arbitrary JSON (deep nesting, huge integers, NaN and
infinities) and validly signed records with a wrong value in one field. None may raise anything
but its own rejection.
"""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

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
