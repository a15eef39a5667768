"""Identity, signed records, the reader's checks, addresses and model choice: pure, no network."""

from __future__ import annotations

import dataclasses
import json
import random
import stat
from pathlib import Path
from typing import Any

import pytest

from peerinfer.errors import ConfigError
from peerinfer.network.addresses import dht_bind_host, guess_announce_url, parse_bootstrap
from peerinfer.network.discovery import pick_model
from peerinfer.network.identity import PeerIdentity, b64, load_or_create_identity, peer_id_for
from peerinfer.network.records import (
    MAX_RECORD_BYTES,
    PeerRecord,
    RecordRejected,
    challenge_message,
    select_live,
    sign_record,
    verify_challenge,
    verify_record,
)

NOW = 1_800_000_000.0
SHA = "a" * 64


def make_record(identity: PeerIdentity, **changes: Any) -> PeerRecord:
    record = PeerRecord(
        peer_id=identity.peer_id,
        public_key=b64(identity.public_key),
        endpoints=("http://127.0.0.1:8000",),
        model="gemma-3-270m",
        sha256=SHA,
        n_ctx=2048,
        slots_total=4,
        slots_free=3,
        queue=0,
        tokens_per_s=42.5,
        issued_at=NOW,
        expires_at=NOW + 60,
        instance="0123456789abcdef",
    )
    return dataclasses.replace(record, **changes)


IDENTITY = PeerIdentity.generate()
OTHER = PeerIdentity.generate()


def test_identity_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    first = load_or_create_identity(tmp_path / "home")
    key_file = tmp_path / "home" / "peer_key.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    again = load_or_create_identity(tmp_path / "home")
    assert again.peer_id == first.peer_id == peer_id_for(first.public_key)
    assert len(first.peer_id) == 40


def test_unreadable_key_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "peer_key.pem").write_text("not a key")
    with pytest.raises(ConfigError, match="remove it"):
        load_or_create_identity(tmp_path)


def test_signed_record_round_trips() -> None:
    record = make_record(IDENTITY)
    assert verify_record(sign_record(record, IDENTITY), NOW + 1) == record


def _tamper(data: bytes, **fields: Any) -> bytes:
    envelope = json.loads(data)
    envelope["record"].update(fields)
    return json.dumps(envelope).encode()


def _resign_with(identity: PeerIdentity, signer: PeerIdentity, **fields: Any) -> bytes:
    return sign_record(make_record(identity, **fields), signer)


GOOD = sign_record(make_record(IDENTITY), IDENTITY)


@pytest.mark.parametrize(
    ("data", "now", "reason"),
    [
        (_tamper(GOOD, slots_free=4), NOW, "bad_signature"),  # changed after signing
        (_tamper(GOOD, endpoints=["http://evil.example:1"]), NOW, "bad_signature"),
        (_resign_with(IDENTITY, OTHER), NOW, "bad_signature"),  # signed by another key
        (_resign_with(IDENTITY, OTHER, public_key=b64(OTHER.public_key)), NOW, "id_mismatch"),  # key swapped
        (GOOD, NOW + 61, "expired"),
        (GOOD, NOW - 31, "future"),  # issued more than the allowed clock skew ahead
        (_resign_with(IDENTITY, IDENTITY, expires_at=NOW + 10_000), NOW, "bad_field"),  # lifetime too long
        (_resign_with(IDENTITY, IDENTITY, model="m" * 129), NOW, "bad_field"),
        (_resign_with(IDENTITY, IDENTITY, endpoints=("ftp://x",)), NOW, "bad_field"),
        (_resign_with(IDENTITY, IDENTITY, endpoints=()), NOW, "bad_field"),
        (_resign_with(IDENTITY, IDENTITY, slots_free=9), NOW, "bad_field"),
        (_resign_with(IDENTITY, IDENTITY, sha256="xyz"), NOW, "bad_field"),
        (_resign_with(IDENTITY, IDENTITY, version=2), NOW, "bad_version"),
        (_tamper(GOOD, extra="field"), NOW, "bad_field"),
        (GOOD + b" " * MAX_RECORD_BYTES, NOW, "too_large"),
        (b"\xff\xfe", NOW, "malformed"),
        (b"[1, 2]", NOW, "malformed"),
    ],
)
def test_reader_rejects(data: bytes, now: float, reason: str) -> None:
    with pytest.raises(RecordRejected) as caught:
        verify_record(data, now)
    assert caught.value.reason == reason


def test_select_live_keeps_newest_drops_withdrawn_and_counts_rejects() -> None:
    second = PeerIdentity.generate()
    values = [
        sign_record(make_record(IDENTITY, slots_free=1), IDENTITY),
        sign_record(make_record(IDENTITY, issued_at=NOW + 5, expires_at=NOW + 65, slots_free=2), IDENTITY),
        sign_record(make_record(second), second),
        sign_record(make_record(second, issued_at=NOW + 3, expires_at=NOW + 63, withdrawn=True), second),
        _tamper(GOOD, queue=5, issued_at=NOW + 7, expires_at=NOW + 67),  # the newest, but forged: checked, dropped
        b"junk",
    ]
    live = select_live(values, NOW + 10)
    assert [(record.peer_id, record.slots_free) for record in live.records] == [(IDENTITY.peer_id, 2)]
    assert live.rejected == {"bad_signature": 1, "malformed": 1}


def test_a_withdrawal_hides_only_its_own_instance() -> None:
    old = make_record(IDENTITY, instance="1" * 16, issued_at=NOW + 2, expires_at=NOW + 62)
    gone = make_record(IDENTITY, instance="2" * 16, issued_at=NOW + 3, expires_at=NOW + 63, withdrawn=True)
    live = select_live([sign_record(old, IDENTITY), sign_record(gone, IDENTITY)], NOW + 5)
    assert live.records == [old]


def test_challenge_answer_must_come_from_the_records_key() -> None:
    record = make_record(IDENTITY)
    nonce = b"n" * 32
    good = {"peer_id": IDENTITY.peer_id, "signature": b64(IDENTITY.sign(challenge_message(nonce)))}
    assert verify_challenge(record, nonce, good)
    assert not verify_challenge(record, b"m" * 32, good)  # a replayed answer to another nonce
    forged = {"peer_id": IDENTITY.peer_id, "signature": b64(OTHER.sign(challenge_message(nonce)))}
    assert not verify_challenge(record, nonce, forged)
    assert not verify_challenge(record, nonce, {"error": "not found"})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", []),
        ("127.0.0.1:4222", [("127.0.0.1", 4222)]),
        ("a.example:1, b.example:65535", [("a.example", 1), ("b.example", 65535)]),
        ("[::1]:4222", [("::1", 4222)]),
    ],
)
def test_parse_bootstrap(text: str, expected: list[tuple[str, int]]) -> None:
    assert parse_bootstrap(text) == expected


@pytest.mark.parametrize("text", ["localhost", "host:", ":4222", "host:0", "host:70000", "host:port"])
def test_parse_bootstrap_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="host:port"):
        parse_bootstrap(text)


@pytest.mark.parametrize(
    ("configured", "bootstrap", "expected"),
    [
        ("10.0.0.5", [("127.0.0.1", 1)], "10.0.0.5"),
        (None, [("127.0.0.1", 1), ("localhost", 2)], "127.0.0.1"),
        (None, [("127.0.0.1", 1), ("10.0.0.1", 2)], "0.0.0.0"),
        (None, [], "0.0.0.0"),
    ],
)
def test_dht_bind_host(configured: str | None, bootstrap: list[tuple[str, int]], expected: str) -> None:
    assert dht_bind_host(configured, bootstrap) == expected


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["uvicorn", "worker:app"], "http://127.0.0.1:8000"),
        (["uvicorn", "worker:app", "--host", "0.0.0.0", "--port", "9000"], "http://192.0.2.7:9000"),
        (["uvicorn", "worker:app", "--host=10.1.1.1", "--port=81"], "http://10.1.1.1:81"),
        (["uvicorn", "--host", "::1"], "http://[::1]:8000"),
    ],
)
def test_guess_announce_url(argv: list[str], expected: str) -> None:
    assert guess_announce_url(argv, "192.0.2.7") == expected


@pytest.mark.parametrize(
    ("served", "name", "expected"),
    [
        ([], None, None),
        ([("m1", "b" * 64), ("m2", "c" * 64), ("m2", "c" * 64)], None, "c" * 64),
        ([("m1", "b" * 64), ("m2", "c" * 64), ("m2", "c" * 64)], "m1", "b" * 64),
        ([("m1", "d" * 64), ("m1", "b" * 64)], None, "b" * 64),  # a tie goes to the smallest sha256
        ([("m1", "b" * 64)], "nope", None),
    ],
)
def test_pick_model(served: list[tuple[str, str]], name: str | None, expected: str | None) -> None:
    records = [make_record(IDENTITY, model=model, sha256=sha) for model, sha in served]
    assert pick_model(records, name) == expected


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"[" * 2000, "malformed"),  # deep nesting: json.loads raised RecursionError through every reader
        (b'{"record": ' + b"[" * 1990, "malformed"),
        (_tamper(GOOD, tokens_per_s=10**400), "bad_field"),  # raised OverflowError in math.isfinite
        (_tamper(GOOD, issued_at=10**400), "bad_field"),
        (_tamper(GOOD, tokens_per_s=float("nan")), "bad_field"),
        (_tamper(GOOD, tokens_per_s=float("inf")), "bad_field"),
        (_tamper(GOOD, tokens_per_s=1e9), "bad_field"),  # a claimed speed no CPU peer has
        (_tamper(GOOD, version=True), "bad_version"),  # True == 1 in Python, but it is not the version
        (_tamper(GOOD, endpoints=[[[]]]), "bad_field"),
        (GOOD.replace(b'"sig":"', b'"sig":["'), "malformed"),
    ],
)
def test_hostile_values_are_rejected_not_raised(data: bytes, reason: str) -> None:
    with pytest.raises(RecordRejected) as caught:
        verify_record(data, NOW)
    assert caught.value.reason == reason
    assert select_live([data, GOOD], NOW).records == [make_record(IDENTITY)]  # the reader goes on


def test_select_live_checks_each_signature_once_and_caps_the_checks() -> None:
    sybils = [PeerIdentity.generate() for _ in range(6)]
    flood = [sign_record(make_record(s), s) for s in sybils]
    # The same value again and again costs one check; garbage costs none.
    live = select_live([GOOD] * 50 + [b"x" * 100] * 50, NOW)
    assert live.records == [make_record(IDENTITY)] and live.rejected == {"malformed": 50}
    capped = select_live([*flood, GOOD], NOW, max_signatures=3, rng=random.Random(1))
    assert len(capped.records) == 3 and capped.rejected == {"over_limit": 4}
    # A peer that proved its key before is checked first, whatever the flood's order.
    for seed in range(10):
        first = select_live([*flood, GOOD], NOW, max_signatures=1, trusted={IDENTITY.peer_id}, rng=random.Random(seed))
        assert first.records == [make_record(IDENTITY)]


class _Store:
    def __init__(self) -> None:
        self.values: list[bytes] = []

    def get(self, key: str, timeout_s: float) -> list[bytes]:
        return list(self.values)


def test_a_flood_that_hides_a_peer_from_one_get_does_not_hide_it_from_discovery() -> None:
    from peerinfer.network.discovery import Discovery

    clock = [NOW]
    store = _Store()
    discovery = Discovery(store, timeout_s=0, clock=lambda: clock[0])
    store.values = [GOOD]
    assert [r.peer_id for r in discovery.lookup(SHA).records] == [IDENTITY.peer_id]
    store.values = [b"garbage"] * 100  # this get read only the flood
    assert [r.peer_id for r in discovery.lookup(SHA).records] == [IDENTITY.peer_id]
    clock[0] = NOW + 61  # until the record expires
    assert discovery.lookup(SHA).records == []
    # A withdrawal that is read hides the instance at once, cached or not.
    clock[0] = NOW
    store.values = [GOOD]
    discovery.lookup(SHA)
    store.values = [
        sign_record(make_record(IDENTITY, issued_at=NOW + 1, expires_at=NOW + 61, withdrawn=True), IDENTITY)
    ]
    assert discovery.lookup(SHA).records == []
