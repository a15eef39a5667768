"""Vetting a peer before use: its ``/health`` probe and, the first time, its signed-nonce challenge.

The readers (``read_health``, ``read_challenge``) are pure and end in a ``Probe`` or in
``PeerRejected`` with a reason (``unhealthy``, ``wrong_model``, ``malformed``, ``bad_field``,
``bad_challenge``), never in another exception: whatever a peer sends is that peer's failure. A
health report is checked as strictly as a record: a ``"slots_total": "four"`` is a lie, not a
default. ``vet_peer`` carries them out over ``peer_http.exchange``, within one deadline.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from peerinfer.client.peer_http import HttpReply, PeerRejected, exchange
from peerinfer.client.routing import Probe
from peerinfer.network.identity import b64
from peerinfer.network.records import PeerRecord, verify_challenge

MAX_HEALTH_BYTES = 16 * 1024
MAX_CHALLENGE_BYTES = 4 * 1024
MAX_SLOTS = 4096
MAX_QUEUE = 1_000_000
MAX_TRUSTED_SPEED = 1_000.0
"""Tokens/s a record may claim for choice purposes; more is clamped (records allow up to 100,000)."""


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise PeerRejected("malformed", "the body is not JSON") from exc
    if not isinstance(value, dict):
        raise PeerRejected("malformed", "the body is not a JSON object")
    return value


def _count(body: dict[str, Any], name: str, low: int, high: int) -> int:
    value = body.get(name)
    if type(value) is not int or not low <= value <= high:
        raise PeerRejected("bad_field", f"{name}={str(value)[:40]!r} is not an integer in [{low}, {high}]")
    return value


def read_health(reply: HttpReply, record: PeerRecord, rtt_s: float) -> Probe:
    """The probe of a ``/health`` reply for the peer of ``record``; raises ``PeerRejected``. Pure."""
    if reply.status != 200:
        raise PeerRejected("unhealthy", f"/health answered {reply.status}")
    body = _json_object(reply.body)
    if body.get("sha256") != record.sha256:
        raise PeerRejected("wrong_model", "/health reports another model file than the record")
    slots_total = _count(body, "slots_total", 1, MAX_SLOTS)
    return Probe(
        peer_id=record.peer_id,
        url=record.endpoints[0],
        rtt_s=rtt_s,
        slots_total=slots_total,
        slots_free=_count(body, "slots_free", 0, slots_total),
        queue=_count(body, "requests_waiting", 0, MAX_QUEUE),
        tokens_per_s=min(record.tokens_per_s, MAX_TRUSTED_SPEED),
    )


def read_challenge(reply: HttpReply, record: PeerRecord, nonce: bytes) -> None:
    """Returns only if the reply is ``record``'s key signing ``nonce``; raises ``PeerRejected``. Pure."""
    if reply.status != 200:
        raise PeerRejected("bad_challenge", f"/peer/challenge answered {reply.status}")
    if not verify_challenge(record, nonce, _json_object(reply.body)):
        raise PeerRejected("bad_challenge", "the endpoint cannot sign with the record's key")


def vet_peer(record: PeerRecord, *, deadline: float, challenge: bool) -> Probe:
    """Probe ``/health`` and, if ``challenge``, check the nonce, all by ``deadline``; raises ``PeerRejected``."""
    url = record.endpoints[0]
    started = time.monotonic()
    probe = read_health(
        exchange(url, "GET", "/health", deadline=deadline, max_bytes=MAX_HEALTH_BYTES),
        record,
        time.monotonic() - started,
    )
    if challenge:
        prove_key(record, deadline=deadline)
    return probe


def prove_key(record: PeerRecord, *, deadline: float) -> None:
    """Ask the endpoint to sign a fresh nonce by ``deadline``; raises ``PeerRejected`` unless it is the record's key."""
    nonce = secrets.token_bytes(32)
    body = json.dumps({"nonce": b64(nonce)}).encode()
    reply = exchange(
        record.endpoints[0], "POST", "/peer/challenge", deadline=deadline, max_bytes=MAX_CHALLENGE_BYTES, body=body
    )
    read_challenge(reply, record, nonce)
