"""The signed peer record: fields, canonical encoding, signing and the reader's checks. Pure.

On the wire a record is the canonical JSON of ``{"record": {...}, "sig": base64}``. The signature
covers ``RECORD_DOMAIN`` followed by the canonical JSON of the record alone (sorted keys, no spaces,
ASCII), so a reader re-encodes what it parsed and verifies that. A reader accepts a record only if
it is small enough, has exactly the expected fields with values in bounds, its id belongs to its
key, its signature verifies, it has not expired and it was not issued too far in the future.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from peerinfer.network.identity import PeerId, PeerIdentity, b64, peer_id_for, unb64, verify_signature

PROTOCOL_VERSION = 1
RECORD_DOMAIN = b"peerinfer-record-v1\n"
MAX_RECORD_BYTES = 2048
MAX_ENDPOINTS = 4
MAX_URL_CHARS = 256
MAX_MODEL_CHARS = 128
MAX_LIFETIME_S = 600.0
DEFAULT_MAX_SKEW_S = 30.0
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX40 = re.compile(r"[0-9a-f]{40}")
_HEX16 = re.compile(r"[0-9a-f]{16}")


def model_key(sha256: str) -> str:
    """The DHT key a model's peers announce under."""
    return f"peerinfer/v{PROTOCOL_VERSION}/model/{sha256}"


DIRECTORY_KEY = f"peerinfer/v{PROTOCOL_VERSION}/models"
"""Every record is also announced here, so a client that names no sha256 can see which models exist."""


@dataclass(frozen=True)
class PeerRecord:
    """What a worker says about itself. ``withdrawn`` records announce a graceful stop."""

    peer_id: PeerId
    public_key: str
    endpoints: tuple[str, ...]
    model: str
    sha256: str
    n_ctx: int
    slots_total: int
    slots_free: int
    queue: int
    tokens_per_s: float
    issued_at: float
    expires_at: float
    instance: str
    withdrawn: bool = False
    version: int = PROTOCOL_VERSION

    def as_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body["endpoints"] = list(self.endpoints)
        return body

    def age_s(self, now: float) -> float:
        return max(0.0, now - self.issued_at)


class RecordRejected(ValueError):
    """A record a reader must drop; ``reason`` is a short, countable word."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def sign_record(record: PeerRecord, identity: PeerIdentity) -> bytes:
    """The wire bytes of ``record`` signed by ``identity``."""
    body = record.as_dict()
    signature = identity.sign(RECORD_DOMAIN + canonical(body))
    return canonical({"record": body, "sig": b64(signature)})


_INT_FIELDS = {"n_ctx": (1, 10_000_000), "slots_total": (1, 4096), "slots_free": (0, 4096), "queue": (0, 1_000_000)}
_FIELDS = {f.name for f in PeerRecord.__dataclass_fields__.values()}
MAX_TOKENS_PER_S = 10_000_000.0
"""A claimed speed above this is no machine's; such a record is refused. Workers announce at most this."""
MAX_TIMESTAMP = 1e11
"""Issue and expiry times are Unix seconds; beyond this (year 5138) a value is not a time."""
MAX_SIGNATURES_PER_READ = 512
"""Signature checks one ``select_live`` does at most; the rest are counted as ``over_limit``."""


def _check_int(body: dict[str, Any], name: str, low: int, high: int) -> int:
    value = body[name]
    if type(value) is not int or not low <= value <= high:
        raise RecordRejected("bad_field", f"{name}={str(value)[:40]!r} is not an integer in [{low}, {high}]")
    return value


def _check_number(body: dict[str, Any], name: str, high: float = MAX_TIMESTAMP) -> float:
    value = body[name]
    # Compared before any float(): a 400-digit integer does not fit in one. NaN fails every comparison.
    if type(value) not in (int, float) or not 0 <= value <= high:
        raise RecordRejected("bad_field", f"{name}={str(value)[:40]!r} is not a number in [0, {high:g}]")
    return float(value)


def _check_str(body: dict[str, Any], name: str, limit: int, pattern: re.Pattern[str] | None = None) -> str:
    value = body[name]
    if not isinstance(value, str) or not 0 < len(value) <= limit or (pattern and not pattern.fullmatch(value)):
        raise RecordRejected("bad_field", f"{name} must be a string of 1 to {limit} characters in the expected form")
    return value


ICE_SCHEME = "ice://"
"""An endpoint ``ice://<peer id>``: reach this peer through ICE, its offers and answers carried by the DHT."""


def ice_endpoint(peer_id: str) -> str:
    return ICE_SCHEME + peer_id


def is_ice_endpoint(url: str) -> bool:
    return url.startswith(ICE_SCHEME)


def _check_endpoints(value: Any, peer_id: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not 0 < len(value) <= MAX_ENDPOINTS:
        raise RecordRejected("bad_field", f"endpoints must be a list of 1 to {MAX_ENDPOINTS} URLs")
    for url in value:
        if isinstance(url, str) and is_ice_endpoint(url):
            if url != ice_endpoint(str(peer_id)):
                raise RecordRejected("bad_field", f"endpoint {url[:60]!r} is not ice://<this record's peer id>")
            continue
        if not isinstance(url, str) or len(url) > MAX_URL_CHARS or not url.startswith(("http://", "https://")):
            raise RecordRejected(
                "bad_field", f"endpoint {str(url)[:60]!r} is not an http(s) URL of at most 256 chars or ice://<peer id>"
            )
    if len(set(value)) != len(value):
        raise RecordRejected("bad_field", "endpoints repeat")
    return tuple(value)


def _parse_body(body: dict[str, Any]) -> PeerRecord:
    if set(body) != _FIELDS:
        raise RecordRejected("bad_field", f"fields {sorted(set(body) ^ _FIELDS)[:8]} are missing or unexpected")
    if type(body["version"]) is not int or body["version"] != PROTOCOL_VERSION:
        raise RecordRejected(
            "bad_version", f"protocol version {str(body['version'])[:20]!r}, expected {PROTOCOL_VERSION}"
        )
    if not isinstance(body["withdrawn"], bool):
        raise RecordRejected("bad_field", "withdrawn must be true or false")
    ints = {name: _check_int(body, name, *bounds) for name, bounds in _INT_FIELDS.items()}
    if ints["slots_free"] > ints["slots_total"]:
        raise RecordRejected("bad_field", "slots_free is larger than slots_total")
    return PeerRecord(
        peer_id=PeerId(_check_str(body, "peer_id", 40, _HEX40)),
        public_key=_check_str(body, "public_key", 64),
        endpoints=_check_endpoints(body["endpoints"], body["peer_id"]),
        model=_check_str(body, "model", MAX_MODEL_CHARS),
        sha256=_check_str(body, "sha256", 64, _HEX64),
        tokens_per_s=_check_number(body, "tokens_per_s", MAX_TOKENS_PER_S),
        issued_at=_check_number(body, "issued_at"),
        expires_at=_check_number(body, "expires_at"),
        instance=_check_str(body, "instance", 16, _HEX16),
        withdrawn=body["withdrawn"],
        **ints,
    )


@dataclass(frozen=True)
class _Parsed:
    """A record whose form, id and times are checked; only its signature is not (the costly part)."""

    record: PeerRecord
    public_key: bytes
    signature: bytes

    def signature_ok(self) -> bool:
        return verify_signature(self.public_key, self.signature, RECORD_DOMAIN + canonical(self.record.as_dict()))


def _parse(data: bytes, now: float, max_skew_s: float) -> _Parsed:
    """Every check but the signature, cheapest first; raises ``RecordRejected``."""
    if len(data) > MAX_RECORD_BYTES:
        raise RecordRejected("too_large", f"{len(data)} bytes, at most {MAX_RECORD_BYTES}")
    if not data.lstrip()[:1] == b"{":
        raise RecordRejected("malformed", "not a JSON object")
    try:
        envelope = json.loads(data)
    except (ValueError, RecursionError) as exc:  # RecursionError: deep nesting such as b"[" * 2000
        raise RecordRejected("malformed", f"not JSON: {str(exc)[:80]}") from exc
    if not isinstance(envelope, dict) or set(envelope) != {"record", "sig"} or not isinstance(envelope["record"], dict):
        raise RecordRejected("malformed", "expected an object with 'record' and 'sig'")
    record = _parse_body(envelope["record"])
    if not isinstance(envelope["sig"], str) or len(envelope["sig"]) > 128:
        raise RecordRejected("bad_field", "sig must be a base64 string")
    try:
        public_key = unb64(record.public_key)
        signature = unb64(envelope["sig"])
    except ValueError as exc:
        raise RecordRejected("bad_field", "public_key or sig is not base64") from exc
    if peer_id_for(public_key) != record.peer_id:
        raise RecordRejected("id_mismatch", f"peer id {record.peer_id} does not belong to its public key")
    if record.issued_at > now + max_skew_s:
        raise RecordRejected("future", f"issued {record.issued_at - now:.0f} s in the future (clock skew)")
    if record.expires_at <= now:
        raise RecordRejected("expired", f"expired {now - record.expires_at:.0f} s ago")
    if not 0 < record.expires_at - record.issued_at <= MAX_LIFETIME_S:
        raise RecordRejected("bad_field", f"lifetime must be within (0, {MAX_LIFETIME_S:.0f}] s")
    return _Parsed(record, public_key, signature)


def _parse_any(data: Any, now: float, max_skew_s: float) -> _Parsed:
    """``_parse`` for a value of any type: whatever goes wrong is a rejection, never an exception."""
    if not isinstance(data, bytes):
        raise RecordRejected("malformed", f"a DHT value must be bytes, not {type(data).__name__}")
    try:
        return _parse(data, now, max_skew_s)
    except RecordRejected:
        raise
    except Exception as exc:  # a reader never raises on a value: a check we missed is still a rejection
        raise RecordRejected("malformed", f"{type(exc).__name__} while reading it") from exc


def verify_record(data: bytes, now: float, max_skew_s: float = DEFAULT_MAX_SKEW_S) -> PeerRecord:
    """The record in ``data`` if a reader may trust it; otherwise raises ``RecordRejected``, and nothing else."""
    parsed = _parse_any(data, now, max_skew_s)
    if not parsed.signature_ok():
        raise RecordRejected("bad_signature", f"the signature of peer {parsed.record.peer_id} does not verify")
    return parsed.record


@dataclass
class VerifiedRecords:
    """Each peer's newest live record, every live instance, and how many values were dropped, by reason.

    ``withdrawn`` holds the instances whose newest record is a withdrawal.
    """

    records: list[PeerRecord] = field(default_factory=list)
    instances: list[PeerRecord] = field(default_factory=list)
    rejected: Counter[str] = field(default_factory=Counter)
    withdrawn: list[PeerRecord] = field(default_factory=list)


def select_live(
    values: Iterable[bytes],
    now: float,
    max_skew_s: float = DEFAULT_MAX_SKEW_S,
    *,
    trusted: Collection[str] = (),
    max_signatures: int = MAX_SIGNATURES_PER_READ,
    rng: random.Random | None = None,
) -> VerifiedRecords:
    """Verify the values and keep what is live. Never raises on a value.

    Records are grouped by (peer id, instance): a running worker process is one instance. The newest
    record of an instance wins, and a withdrawal hides that instance at once. Of the live instances
    of one peer id (normally exactly one), the newest record is the peer's.

    Cost under a flood: repeated values are read once; every check but the signature runs first
    (JSON, fields, id, times); per instance only the newest values are verified, until one verifies.
    At most ``max_signatures`` signatures are checked: instances of ``trusted`` peers first (peers
    that proved their key before), the others in random order, so whoever floods the key cannot
    choose which records crowd out the rest. The values left unverified count as ``over_limit``.
    """
    result = VerifiedRecords()
    seen: set[bytes] = set()
    groups: dict[tuple[PeerId, str], list[_Parsed]] = {}
    for data in values:
        if isinstance(data, bytes) and data in seen:
            continue
        try:
            parsed = _parse_any(data, now, max_skew_s)
        except RecordRejected as exc:
            result.rejected[exc.reason] += 1
            continue
        seen.add(data)
        groups.setdefault((parsed.record.peer_id, parsed.record.instance), []).append(parsed)
    order = list(groups)
    (rng or random.Random()).shuffle(order)
    order.sort(key=lambda key: key[0] not in trusted)
    budget = max_signatures
    newest: dict[tuple[PeerId, str], PeerRecord] = {}
    for key in order:
        candidates = sorted(groups[key], key=lambda p: (p.record.issued_at, p.record.withdrawn), reverse=True)
        for index, parsed in enumerate(candidates):
            if budget <= 0:
                result.rejected["over_limit"] += len(candidates) - index
                break
            budget -= 1
            if parsed.signature_ok():
                newest[key] = parsed.record  # older values of this instance are superseded: not checked
                break
            result.rejected["bad_signature"] += 1
    result.withdrawn = [record for record in newest.values() if record.withdrawn]
    result.instances = sorted(
        (record for record in newest.values() if not record.withdrawn), key=lambda r: (r.peer_id, -r.issued_at)
    )
    by_peer: dict[PeerId, PeerRecord] = {}
    for record in result.instances:
        by_peer.setdefault(record.peer_id, record)
    result.records = list(by_peer.values())
    return result


CHALLENGE_DOMAIN = b"peerinfer-challenge-v1\n"
MIN_NONCE_BYTES = 16
MAX_NONCE_BYTES = 64


def challenge_message(nonce: bytes) -> bytes:
    """What a worker signs to prove it holds its record's key; the domain keeps it from signing records."""
    return CHALLENGE_DOMAIN + nonce


def verify_challenge(record: PeerRecord, nonce: bytes, answer: Any) -> bool:
    """True only if ``answer`` (the worker's JSON) is ``record``'s key signing ``nonce``. Never raises."""
    if not isinstance(answer, dict) or answer.get("peer_id") != record.peer_id:
        return False
    signature = answer.get("signature")
    if not isinstance(signature, str) or len(signature) > 128:
        return False
    try:
        return verify_signature(unb64(record.public_key), unb64(signature), challenge_message(nonce))
    except ValueError:
        return False
