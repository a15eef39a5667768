"""The ICE signalling wire format, pure: which offers a worker acts on and which answers a client believes.

Offers come from anyone on the DHT, unsigned; answers must be signed by the peer the client asked
for and name the client's own offer. Each refusal has its reason, since the worker and the client
count them; Hypothesis checks that nothing but ``SignalRejected`` ever comes out of a reader.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from peerinfer.network.identity import PeerIdentity, b64
from peerinfer.network.records import PROTOCOL_VERSION, canonical
from peerinfer.network.signalling import (
    ANSWER_DOMAIN,
    MAX_AGE_S,
    MAX_CANDIDATES,
    MAX_REASON_CHARS,
    MAX_SDP_CHARS,
    MAX_SIGNAL_BYTES,
    Answer,
    Offer,
    SignalRejected,
    check_sdp,
    ice_key,
    make_answer,
    read_answer,
    read_offer,
    sdp_sha256,
)

NOW = 1_800_000_000.0
WORKER = PeerIdentity.generate()
IMPOSTOR = PeerIdentity.generate()
SESSION = "0123456789abcdef0123456789abcdef"
OFFER_REASONS = {"too_large", "malformed", "not_offer", "bad_version", "bad_sdp", "stale"}
ANSWER_REASONS = {"too_large", "malformed", "not_answer", "not_ours", "wrong_peer", "bad_signature", "bad_sdp", "stale"}


def make_sdp(candidates: int = 2, ufrag: str = "c1Ab", extra: tuple[str, ...] = (), newline: str = "\r\n") -> str:
    """An SDP shaped like the lean data-channel offers aiortc makes."""
    lines = [
        "v=0",
        "o=- 3921372044 3921372044 IN IP4 0.0.0.0",
        "s=-",
        "t=0 0",
        "a=group:BUNDLE 0",
        "m=application 9 DTLS/SCTP 5000",
        "c=IN IP4 0.0.0.0",
        "a=mid:0",
        "a=sctpmap:5000 webrtc-datachannel 65535",
        *(
            f"a=candidate:{n:08x} 1 udp 2130706431 10.0.{n // 250}.{n % 250 + 1} {40000 + n} typ host"
            for n in range(candidates)
        ),
        "a=end-of-candidates",
        f"a=ice-ufrag:{ufrag}",
        "a=ice-pwd:0aBcDeFgHiJkLmNoPqRsTu",
        "a=fingerprint:sha-256 " + ":".join(["A7"] * 32),
        "a=setup:actpass",
        *extra,
    ]
    return newline.join(lines) + newline


def padded_sdp(length: int) -> str:
    """A valid SDP of exactly ``length`` characters (lines of padding, each within the line limit)."""
    sdp = make_sdp()
    while (room := length - len(sdp)) > 0:
        sdp += "a=" + "p" * min(room - 4, 600) + "\r\n" if room >= 4 else "\n" * room
    assert len(sdp) == length
    return sdp


SDP = make_sdp()
ANSWER_SDP = make_sdp(candidates=1, ufrag="w0rK")
OFFER = Offer(SESSION, SDP, False, NOW)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


def _offer_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"kind": "ice-offer", "v": PROTOCOL_VERSION, **dataclasses.asdict(OFFER)}
    body.update(changes)
    return body


def _offer_with(**changes: Any) -> bytes:
    return _dumps(_offer_body(**changes))


def _offer_without(field: str) -> bytes:
    body = _offer_body()
    del body[field]
    return _dumps(body)


def _offer_raw(field: str, token: str) -> bytes:
    """The offer with ``token`` written as the JSON text of ``field``: numbers Python would not write."""
    return _offer_with(**{field: "@@"}).replace(b'"@@"', token.encode())


def _reason(read: Any, *args: Any) -> str:
    with pytest.raises(SignalRejected) as caught:
        read(*args)
    return str(caught.value.reason)


# --- offers: what a worker acts on ----------------------------------------------------------------


def test_a_fresh_offer_round_trips() -> None:
    assert read_offer(OFFER.encode(), NOW) == OFFER
    relayed = Offer("f" * 32, make_sdp(candidates=MAX_CANDIDATES, newline="\n"), True, NOW - MAX_AGE_S)
    assert read_offer(relayed.encode(), NOW) == relayed
    assert read_offer(_offer_with(issued_at=int(NOW) + 30), NOW).issued_at == NOW + 30


def test_offers_at_the_limits_are_accepted() -> None:
    longest = Offer(SESSION, padded_sdp(MAX_SDP_CHARS), False, NOW)
    assert len(longest.encode()) <= MAX_SIGNAL_BYTES
    assert read_offer(longest.encode(), NOW) == longest
    widest_line = make_sdp(extra=("a=" + "w" * 600,))
    assert read_offer(_offer_with(sdp=widest_line), NOW).sdp == widest_line
    assert read_offer(_offer_with(issued_at=NOW + MAX_AGE_S), NOW).issued_at == NOW + MAX_AGE_S
    assert read_offer(b"  \n" + OFFER.encode() + b"\n", NOW) == OFFER


def test_the_key_is_per_worker_and_versioned() -> None:
    assert ice_key(WORKER.peer_id) == f"peerinfer/v{PROTOCOL_VERSION}/ice/{WORKER.peer_id}"
    assert ice_key(WORKER.peer_id) != ice_key(IMPOSTOR.peer_id)


OFFER_REFUSALS: list[tuple[str, Any, str]] = [
    ("too large", _offer_with(sdp=SDP, pad="x" * MAX_SIGNAL_BYTES), "too_large"),
    ("one byte over the limit", OFFER.encode() + b" " * (MAX_SIGNAL_BYTES + 1 - len(OFFER.encode())), "too_large"),
    ("a str, not bytes", OFFER.encode().decode(), "too_large"),
    ("None", None, "too_large"),
    ("not JSON", b"hello worker", "malformed"),
    ("JSON cut short", OFFER.encode()[:-1], "malformed"),
    ("not UTF-8", b'{"kind": "\xff\xfe"}', "malformed"),
    ("deep nesting within the size limit", b"[" * (MAX_SIGNAL_BYTES - 1), "malformed"),
    ("deep nesting over the size limit", b"[" * 5000, "too_large"),
    ("a list", b"[]", "malformed"),
    ("a number", b"1", "malformed"),
    ("null", b"null", "malformed"),
    ("a string", b'"ice-offer"', "malformed"),
    ("empty", b"", "malformed"),
    ("no session", _offer_without("session"), "malformed"),
    ("no sdp", _offer_without("sdp"), "malformed"),
    ("no relay", _offer_without("relay"), "malformed"),
    ("no issued_at", _offer_without("issued_at"), "malformed"),
    ("no kind", _offer_without("kind"), "malformed"),
    ("no version", _offer_without("v"), "malformed"),
    ("an extra field", _offer_with(extra=1), "malformed"),
    ("kind ice-answer", _offer_with(kind="ice-answer"), "malformed"),
    ("kind peer-record", _offer_with(kind="peer-record"), "malformed"),
    ("version 2", _offer_with(v=PROTOCOL_VERSION + 1), "bad_version"),
    ("version 0", _offer_with(v=0), "bad_version"),
    ("version true", _offer_with(v=True), "bad_version"),
    ("version 1.0", _offer_with(v=float(PROTOCOL_VERSION)), "bad_version"),
    ("version '1'", _offer_with(v=str(PROTOCOL_VERSION)), "bad_version"),
    ("version null", _offer_with(v=None), "bad_version"),
    ("version a list", _offer_with(v=[PROTOCOL_VERSION]), "bad_version"),
    ("version 1e999", _offer_raw("v", "1e999"), "bad_version"),
    ("version 10**3000", _offer_raw("v", "1" + "0" * 3000), "bad_version"),
    ("version NaN", _offer_raw("v", "NaN"), "bad_version"),
    ("session too short", _offer_with(session=SESSION[:-1]), "malformed"),
    ("session too long", _offer_with(session=SESSION + "0"), "malformed"),
    ("session upper case", _offer_with(session=SESSION.upper()), "malformed"),
    ("session not hex", _offer_with(session="g" * 32), "malformed"),
    ("session with a newline", _offer_with(session=SESSION + "\n"), "malformed"),
    ("session with non-ASCII digits", _offer_with(session="\u0661" * 32), "malformed"),
    ("session a number", _offer_with(session=int(SESSION[:15], 16)), "malformed"),
    ("session null", _offer_with(session=None), "malformed"),
    ("session a list", _offer_with(session=[SESSION]), "malformed"),
    ("relay 1", _offer_with(relay=1), "malformed"),
    ("relay 0", _offer_with(relay=0), "malformed"),
    ("relay 'true'", _offer_with(relay="true"), "malformed"),
    ("relay null", _offer_with(relay=None), "malformed"),
    ("relay NaN", _offer_raw("relay", "NaN"), "malformed"),
    ("stale", _offer_with(issued_at=NOW - MAX_AGE_S - 0.5), "stale"),
    ("an hour old", _offer_with(issued_at=NOW - 3600), "stale"),
    ("from the future", _offer_with(issued_at=NOW + MAX_AGE_S + 0.5), "stale"),
    ("issued at 0", _offer_with(issued_at=0), "stale"),
    ("issued at NaN", _offer_raw("issued_at", "NaN"), "stale"),
    ("issued at Infinity", _offer_raw("issued_at", "Infinity"), "stale"),
    ("issued at -Infinity", _offer_raw("issued_at", "-Infinity"), "stale"),
    ("issued at 1e999", _offer_raw("issued_at", "1e999"), "stale"),
    ("issued at 10**3000", _offer_raw("issued_at", "1" + "0" * 3000), "malformed"),
    ("issued at -10**3000", _offer_raw("issued_at", "-1" + "0" * 3000), "malformed"),
    ("issued at a string", _offer_with(issued_at=str(NOW)), "stale"),
    ("issued at true", _offer_with(issued_at=True), "stale"),
    ("issued at null", _offer_with(issued_at=None), "stale"),
    ("SDP empty", _offer_with(sdp=""), "bad_sdp"),
    ("SDP only newlines", _offer_with(sdp="\r\n\r\n"), "bad_sdp"),
    ("SDP too long", _offer_with(sdp=padded_sdp(MAX_SDP_CHARS + 1)), "bad_sdp"),
    ("SDP a line too long", _offer_with(sdp=make_sdp(extra=("a=" + "w" * 601,))), "bad_sdp"),
    ("SDP non-ASCII", _offer_with(sdp=make_sdp(extra=("s=caf\u00e9",))), "bad_sdp"),
    ("SDP a line separator", _offer_with(sdp=SDP + "a=x\u2028v=0"), "bad_sdp"),
    ("SDP a NUL", _offer_with(sdp=make_sdp(extra=("a=x\x00",))), "bad_sdp"),
    ("SDP a tab", _offer_with(sdp=make_sdp(extra=("a=x\ty",))), "bad_sdp"),
    ("SDP an escape sequence", _offer_with(sdp=make_sdp(extra=("a=\x1b[31mred",))), "bad_sdp"),
    ("SDP DEL", _offer_with(sdp=make_sdp(extra=("a=\x7f",))), "bad_sdp"),
    ("SDP a bare carriage return", _offer_with(sdp=SDP.replace("\r\n", "\r")), "bad_sdp"),
    ("SDP first line not v=", _offer_with(sdp=SDP.removeprefix("v=0\r\n") + "v=0\r\n"), "bad_sdp"),
    ("SDP upper-case type", _offer_with(sdp="V=0\r\n" + SDP.removeprefix("v=0\r\n")), "bad_sdp"),
    ("SDP a line without '='", _offer_with(sdp=make_sdp(extra=("hello",))), "bad_sdp"),
    ("SDP an HTTP request", _offer_with(sdp="GET / HTTP/1.1\r\nHost: x\r\n\r\n"), "bad_sdp"),
    ("SDP too many candidates", _offer_with(sdp=make_sdp(candidates=MAX_CANDIDATES + 1)), "bad_sdp"),
    ("SDP a number", _offer_with(sdp=0), "bad_sdp"),
    ("SDP null", _offer_with(sdp=None), "bad_sdp"),
    ("SDP a list of lines", _offer_with(sdp=SDP.split("\r\n")), "bad_sdp"),
    ("an answer", make_answer(OFFER, WORKER, NOW, sdp=ANSWER_SDP, refused=None), "not_offer"),
    ("a refusal", make_answer(OFFER, WORKER, NOW, sdp=None, refused="busy"), "not_offer"),
    ("an offer with an answer field", _offer_with(answer={}), "not_offer"),
]


@pytest.mark.parametrize(("data", "reason"), [case[1:] for case in OFFER_REFUSALS], ids=[c[0] for c in OFFER_REFUSALS])
def test_offers_a_worker_refuses(data: Any, reason: str) -> None:
    assert _reason(read_offer, data, NOW) == reason


def test_refusals_say_what_was_wrong() -> None:
    with pytest.raises(SignalRejected, match=r"stale: .*30 s"):
        read_offer(_offer_with(issued_at=NOW - 60), NOW)
    with pytest.raises(SignalRejected, match=rf"bad_sdp: 13 candidates, at most {MAX_CANDIDATES}"):
        read_offer(_offer_with(sdp=make_sdp(candidates=13)), NOW)
    with pytest.raises(SignalRejected, match="bad_version: version '2'"):
        read_offer(_offer_with(v=2), NOW)
    long_version = _offer_with(v="9" * 1000)
    with pytest.raises(SignalRejected) as caught:
        read_offer(long_version, NOW)
    assert len(str(caught.value)) < 100  # a stranger's value is not echoed at length into the logs


# --- answers: what a client believes --------------------------------------------------------------


def _answer_body(**changes: Any) -> dict[str, Any]:
    body = dataclasses.asdict(
        Answer(
            session=SESSION,
            offer_sha256=sdp_sha256(SDP),
            sdp=ANSWER_SDP,
            refused=None,
            peer_id=WORKER.peer_id,
            public_key=b64(WORKER.public_key),
            issued_at=NOW,
        )
    )
    body.update(changes)
    return body


def _signed(body: dict[str, Any], key: PeerIdentity = WORKER, domain: bytes = ANSWER_DOMAIN, **envelope: Any) -> bytes:
    """``body`` signed by ``key`` the way a worker signs: only the checks after the signature can refuse it."""
    try:
        message = domain + canonical(body)
    except (ValueError, TypeError):
        message = domain + _dumps(body)  # NaN has no canonical form: sign what is sent
    return _dumps({"answer": body, "sig": b64(key.sign(message)), **envelope})


def _tamper(data: bytes, **changes: Any) -> bytes:
    envelope = json.loads(data)
    envelope["answer"].update(changes)
    return _dumps(envelope)


def _envelope(data: bytes, **changes: Any) -> bytes:
    envelope = json.loads(data)
    envelope.update(changes)
    return _dumps(envelope)


def _without(data: bytes, field: str) -> bytes:
    envelope = json.loads(data)
    envelope["answer"].pop(field)
    return _dumps(envelope)


GOOD = make_answer(OFFER, WORKER, NOW, sdp=ANSWER_SDP, refused=None)
REFUSAL = make_answer(OFFER, WORKER, NOW, sdp=None, refused="busy: every ICE session of this worker is taken")


def test_a_signed_answer_to_the_offer_is_believed() -> None:
    answer = read_answer(GOOD, OFFER, WORKER.peer_id, NOW + 1)
    assert answer.sdp == ANSWER_SDP
    assert answer.refused is None
    assert (answer.session, answer.peer_id, answer.issued_at) == (SESSION, WORKER.peer_id, NOW)
    assert answer.offer_sha256 == sdp_sha256(OFFER.sdp)
    assert read_answer(GOOD, OFFER, WORKER.peer_id, NOW + MAX_AGE_S).sdp == ANSWER_SDP
    reformatted = json.dumps(json.loads(GOOD), indent=2).encode()  # the signature covers the content, not spacing
    assert read_answer(reformatted, OFFER, WORKER.peer_id, NOW).sdp == ANSWER_SDP


def test_a_signed_refusal_is_believed_and_its_reason_is_kept_short() -> None:
    refusal = read_answer(REFUSAL, OFFER, WORKER.peer_id, NOW)
    assert (refusal.sdp, refusal.refused) == (None, "busy: every ICE session of this worker is taken")
    rambling = make_answer(OFFER, WORKER, NOW, sdp=None, refused="too busy " * 40)
    assert read_answer(rambling, OFFER, WORKER.peer_id, NOW).refused == ("too busy " * 40)[:MAX_REASON_CHARS]
    assert read_answer(make_answer(OFFER, WORKER, NOW, sdp=None, refused=""), OFFER, WORKER.peer_id, NOW).refused == ""


def test_the_longest_sdp_fits_in_an_answer() -> None:
    longest = padded_sdp(MAX_SDP_CHARS)
    answer = make_answer(OFFER, WORKER, NOW, sdp=longest, refused=None)
    assert len(answer) <= MAX_SIGNAL_BYTES
    assert read_answer(answer, OFFER, WORKER.peer_id, NOW).sdp == longest


def test_answer_times_are_kept_to_the_millisecond() -> None:
    answer = read_answer(
        make_answer(OFFER, WORKER, NOW + 0.123456, sdp=ANSWER_SDP, refused=None), OFFER, WORKER.peer_id, NOW
    )
    assert answer.issued_at == pytest.approx(NOW + 0.123, abs=1e-6)


ANSWER_REFUSALS: list[tuple[str, bytes, str]] = [
    (
        "an old answer to another session",
        make_answer(dataclasses.replace(OFFER, session="f" * 32), WORKER, NOW, sdp=ANSWER_SDP, refused=None),
        "not_ours",
    ),
    (
        "the answer to an offer replaced in transit",
        make_answer(dataclasses.replace(OFFER, sdp=make_sdp(ufrag="evil")), WORKER, NOW, sdp=ANSWER_SDP, refused=None),
        "not_ours",
    ),
    ("session a number", _signed(_answer_body(session=7)), "not_ours"),
    ("offer hash upper case", _signed(_answer_body(offer_sha256=sdp_sha256(SDP).upper())), "not_ours"),
    ("another peer's own signed answer", make_answer(OFFER, IMPOSTOR, NOW, sdp=ANSWER_SDP, refused=None), "wrong_peer"),
    (
        "the asked peer id with another key",
        _signed(_answer_body(public_key=b64(IMPOSTOR.public_key)), IMPOSTOR),
        "wrong_peer",
    ),
    ("peer id upper case", _signed(_answer_body(peer_id=WORKER.peer_id.upper())), "wrong_peer"),
    ("public key too long", _signed(_answer_body(public_key=b64(WORKER.public_key) + "A" * 40)), "wrong_peer"),
    ("public key a number", _signed(_answer_body(public_key=12)), "wrong_peer"),
    ("public key null", _signed(_answer_body(public_key=None)), "wrong_peer"),
    ("public key empty", _signed(_answer_body(public_key="")), "wrong_peer"),
    ("public key not base64", _signed(_answer_body(public_key="not base64!")), "malformed"),
    ("the asked peer's id and key, another's signature", _signed(_answer_body(), IMPOSTOR), "bad_signature"),
    ("SDP changed after signing", _tamper(GOOD, sdp=make_sdp(candidates=1, ufrag="evil")), "bad_signature"),
    (
        "a refusal's reason changed after signing",
        _tamper(REFUSAL, refused="maintenance: try peer 1234"),
        "bad_signature",
    ),
    ("an answer turned into a refusal", _tamper(GOOD, sdp=None, refused="busy"), "bad_signature"),
    ("a refusal turned into an answer", _tamper(REFUSAL, sdp=ANSWER_SDP, refused=None), "bad_signature"),
    ("time changed after signing", _tamper(GOOD, issued_at=NOW + 1), "bad_signature"),
    ("signed for another purpose", _signed(_answer_body(), domain=b"peerinfer-record-v1\n"), "bad_signature"),
    ("signed without the domain", _signed(_answer_body(), domain=b""), "bad_signature"),
    ("sig not base64", _envelope(GOOD, sig="not*base64*at*all"), "malformed"),
    ("sig too long", _envelope(GOOD, sig="A" * 132), "bad_signature"),
    ("sig huge", _envelope(GOOD, sig="A" * 3000), "bad_signature"),
    ("sig one byte short", _envelope(GOOD, sig=b64(b"\x01" * 63)), "bad_signature"),
    ("sig empty", _envelope(GOOD, sig=""), "bad_signature"),
    ("sig a number", _envelope(GOOD, sig=1), "bad_signature"),
    ("sig a list", _envelope(GOOD, sig=[json.loads(GOOD)["sig"]]), "bad_signature"),
    ("stale", make_answer(OFFER, WORKER, NOW - MAX_AGE_S - 1, sdp=ANSWER_SDP, refused=None), "stale"),
    ("from the future", make_answer(OFFER, WORKER, NOW + MAX_AGE_S + 1, sdp=ANSWER_SDP, refused=None), "stale"),
    ("issued at a string", _signed(_answer_body(issued_at=str(NOW))), "stale"),
    ("issued at true", _signed(_answer_body(issued_at=True)), "stale"),
    ("issued at NaN", _signed(_answer_body(issued_at=float("nan"))), "malformed"),
    ("an offer", OFFER.encode(), "not_answer"),
    ("another client's offer", Offer("e" * 32, SDP, True, NOW).encode(), "not_answer"),
    ("a refusal with SDP", _signed(_answer_body(refused="busy")), "malformed"),
    ("a refusal reason too long", _signed(_answer_body(sdp=None, refused="x" * (MAX_REASON_CHARS + 1))), "malformed"),
    ("a refusal reason a number", _signed(_answer_body(sdp=None, refused=503)), "malformed"),
    ("neither SDP nor refusal", _signed(_answer_body(sdp=None)), "bad_sdp"),
    ("SDP with too many candidates", _signed(_answer_body(sdp=make_sdp(candidates=MAX_CANDIDATES + 1))), "bad_sdp"),
    ("SDP with control characters", _signed(_answer_body(sdp=make_sdp(extra=("a=\x1b]0;owned\x07",)))), "bad_sdp"),
    ("SDP a number", _signed(_answer_body(sdp=5)), "bad_sdp"),
    ("a field missing", _without(GOOD, "issued_at"), "malformed"),
    ("an extra field", _signed(_answer_body(relay_url="turn:evil")), "malformed"),
    ("an extra envelope field", _envelope(GOOD, note="hi"), "malformed"),
    ("no sig", json.dumps({"answer": json.loads(GOOD)["answer"]}).encode(), "malformed"),
    ("answer a list", _envelope(GOOD, answer=[1]), "malformed"),
    ("answer null", _envelope(GOOD, answer=None), "malformed"),
    ("too large", _envelope(GOOD, sig="A" * MAX_SIGNAL_BYTES), "too_large"),
    ("not JSON", b"\x00\x01answer", "malformed"),
    ("deep nesting", b"[" * (MAX_SIGNAL_BYTES - 1), "malformed"),
    ("deep nesting that parses", b"[" * 900 + b"]" * 900, "malformed"),
    ("a list", b"[]", "malformed"),
]


@pytest.mark.parametrize(
    ("data", "reason"), [case[1:] for case in ANSWER_REFUSALS], ids=[c[0] for c in ANSWER_REFUSALS]
)
def test_answers_a_client_refuses(data: bytes, reason: str) -> None:
    assert _reason(read_answer, data, OFFER, WORKER.peer_id, NOW) == reason


def test_an_answer_is_only_for_the_peer_that_was_asked() -> None:
    assert _reason(read_answer, GOOD, OFFER, IMPOSTOR.peer_id, NOW) == "wrong_peer"
    assert _reason(read_answer, GOOD, OFFER, "", NOW) == "wrong_peer"


def test_a_relayed_offer_is_answered_like_any_other() -> None:
    relayed = dataclasses.replace(OFFER, relay=True)
    answer = make_answer(relayed, WORKER, NOW, sdp=ANSWER_SDP, refused=None)
    assert read_answer(answer, relayed, WORKER.peer_id, NOW).sdp == ANSWER_SDP


# --- Hypothesis: nothing but SignalRejected comes out -----------------------------------------------

FAST = settings(derandomize=True, max_examples=300, deadline=None)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=10**300, max_value=10**1000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
deep = st.builds(
    lambda n, opener: (opener * n).encode(),
    st.integers(min_value=1, max_value=1400),
    st.sampled_from(["[", '{"a":', '{"answer":', '[{"sdp":']),
)
sdp_texts = st.one_of(
    st.text(max_size=400),
    st.lists(
        st.sampled_from(["v=0", "a=candidate:1", "a=x", "\r\n", "\n", "\r", " ", "é", "\x00", "=", "v"]), max_size=60
    ).map("".join),
    st.lists(st.sampled_from(make_sdp(candidates=MAX_CANDIDATES + 2).split("\r\n")), max_size=30).map("\r\n".join),
)


def _offer_outcome(data: Any) -> str:
    try:
        read_offer(data, NOW)
    except SignalRejected as exc:
        assert exc.reason in OFFER_REASONS, exc
        return exc.reason
    return "accepted"


def _answer_outcome(data: Any, offer: Offer = OFFER) -> str:
    try:
        read_answer(data, offer, WORKER.peer_id, NOW)
    except SignalRejected as exc:
        assert exc.reason in ANSWER_REASONS, exc
        return exc.reason
    return "accepted"


@FAST
@given(st.binary(max_size=MAX_SIGNAL_BYTES + 200))
@example(b"\xef\xbb\xbf" + OFFER.encode())
@example(b"[" * 3000)
def test_any_bytes(data: bytes) -> None:
    _offer_outcome(data)
    _answer_outcome(data)


@FAST
@given(json_values)
def test_any_json(value: Any) -> None:
    assert _offer_outcome(_dumps(value)) != "accepted"
    assert _answer_outcome(_dumps(value)) != "accepted"
    assert _answer_outcome(_dumps({"answer": value, "sig": value})) != "accepted"


@FAST
@given(deep)
def test_deep_nesting(data: bytes) -> None:
    assert _offer_outcome(data) in {"malformed", "too_large"}
    assert _answer_outcome(data) in {"malformed", "too_large"}


NEAR_VALID_OFFER_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "kind": st.sampled_from(["ice-offer", "ice-answer", "ICE-OFFER", "ice-offer ", ""]),
    "v": st.sampled_from([PROTOCOL_VERSION, float(PROTOCOL_VERSION), True, PROTOCOL_VERSION + 1, 0, -1]),
    "session": st.text(alphabet="0123456789abcdefABCDEF", min_size=31, max_size=33),
    "sdp": sdp_texts,
    "relay": st.booleans(),
    "issued_at": st.floats(NOW - 40, NOW + 40) | st.integers(int(NOW) - 40, int(NOW) + 40),
}
offer_changes = st.sampled_from(sorted(NEAR_VALID_OFFER_FIELDS)).flatmap(
    lambda name: st.dictionaries(
        st.just(name), st.one_of(NEAR_VALID_OFFER_FIELDS[name], json_values), min_size=1, max_size=1
    )
)


@FAST
@given(st.one_of(offer_changes, st.fixed_dictionaries({}, optional=NEAR_VALID_OFFER_FIELDS)))
@example({"v": True})
@example({"issued_at": 10**400})
@example({"session": SESSION.upper()})
def test_offers_with_any_values_in_their_fields(changes: dict[str, Any]) -> None:
    body = _offer_body(**changes)
    if _offer_outcome(_dumps(body)) == "accepted":
        offer = read_offer(_dumps(body), NOW)
        assert body["kind"] == "ice-offer" and type(body["v"]) is int
        assert len(offer.session) == 32 and offer.session == offer.session.lower()
        assert isinstance(offer.relay, bool)
        assert abs(offer.issued_at - NOW) <= MAX_AGE_S
        assert check_sdp(offer.sdp) == offer.sdp


answer_fields = st.sampled_from(sorted(Answer.__dataclass_fields__))


@FAST
@given(answer_fields, json_values)
@example("refused", "x" * 81)
@example("issued_at", 10**400)
@example("sdp", ["v=0"])
def test_signed_answers_with_any_value_in_any_field(field: str, value: Any) -> None:
    data = _signed(_answer_body(**{field: value}))
    if len(data) <= MAX_SIGNAL_BYTES and _answer_outcome(data) == "accepted":
        answer = read_answer(data, OFFER, WORKER.peer_id, NOW)
        assert field in {"sdp", "refused", "issued_at"}  # the others are bound to the offer and the key
        assert (answer.sdp is None) != (answer.refused is None)
        assert isinstance(answer.issued_at, float) and abs(answer.issued_at - NOW) <= MAX_AGE_S


@settings(FAST, max_examples=150)
@given(st.fixed_dictionaries({name: json_values for name in Answer.__dataclass_fields__}), json_values)
def test_answers_with_any_values_and_any_sig(body: dict[str, Any], sig: Any) -> None:
    assert _answer_outcome(_dumps({"answer": body, "sig": sig})) != "accepted"
    assert _answer_outcome(_dumps({"answer": {**_answer_body(), **body}, "sig": json.loads(GOOD)["sig"]})) != "accepted"


@FAST
@given(sdp_texts)
@example("v=0\r\n" + "a=candidate:x\r\n" * (MAX_CANDIDATES + 1))
@example("v=0\r\n\r\n\r\n")
def test_check_sdp_on_any_text(sdp: str) -> None:
    try:
        checked = check_sdp(sdp)
    except SignalRejected as exc:
        assert exc.reason == "bad_sdp"
        return
    assert checked == sdp and 0 < len(sdp) <= MAX_SDP_CHARS
    lines = [line for line in sdp.replace("\r\n", "\n").split("\n") if line]
    assert lines[0].startswith("v=")
    assert all(line.isascii() and line.isprintable() for line in lines)
    assert sum(line.startswith("a=candidate:") for line in lines) <= MAX_CANDIDATES


def test_a_refusal_cannot_carry_control_characters_into_a_clients_log() -> None:
    """A signing worker could otherwise write lines and terminal escapes into every client's log."""
    hostile = "busy\n\x1b[2J\x1b[31mERROR fake line"
    forged = _signed(_answer_body(sdp=None, refused=hostile))
    assert _reason(read_answer, forged, OFFER, WORKER.peer_id, NOW) == "malformed"
    cleaned = read_answer(make_answer(OFFER, WORKER, NOW, sdp=None, refused=hostile), OFFER, WORKER.peer_id, NOW)
    assert cleaned.refused is not None and cleaned.refused.isprintable() and "busy" in cleaned.refused
