"""Vetting a peer before use: its ``/health`` probe and, the first time, its signed-nonce challenge.

The readers (``read_health``, ``read_challenge``) are pure and end in a ``Probe`` or in
``PeerRejected`` with a reason (``unhealthy``, ``wrong_model``, ``malformed``, ``bad_field``,
``bad_challenge``), never in another exception: whatever a peer sends is that peer's failure. A
health report is checked as strictly as a record: a ``"slots_total": "four"`` is a lie, not a
default (``api.health``, the same model the worker writes). ``vet_peer`` carries them out over
``WorkerHttp.exchange``, within one deadline.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from peerinfer.api.health import HealthRejected
from peerinfer.api.health import read_health as read_health_report
from peerinfer.client.peer_http import HttpReply, PeerRejected
from peerinfer.client.routing import Probe
from peerinfer.client.transport import WorkerHttp
from peerinfer.network.identity import b64
from peerinfer.network.records import PeerRecord, verify_challenge

MAX_HEALTH_BYTES = 16 * 1024
MAX_CHALLENGE_BYTES = 4 * 1024
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


def read_health(reply: HttpReply, record: PeerRecord, rtt_s: float, url: str | None = None) -> Probe:
    """The probe of a ``/health`` reply for the peer of ``record``; raises ``PeerRejected``. Pure."""
    if reply.status != 200:
        raise PeerRejected("unhealthy", f"/health answered {reply.status}")
    try:
        report = read_health_report(reply.body)
    except HealthRejected as exc:
        raise PeerRejected(exc.reason, exc.detail) from exc
    if report.sha256 != record.sha256:
        raise PeerRejected("wrong_model", "/health reports another model file than the record")
    if not report.serving or report.slots_total is None or report.slots_free is None:
        raise PeerRejected("unhealthy", f"/health says {report.status!r} without its slots")
    return Probe(
        peer_id=record.peer_id,
        url=url or record.endpoints[0],
        rtt_s=rtt_s,
        slots_total=report.slots_total,
        slots_free=report.slots_free,
        queue=report.requests_waiting or 0,
        tokens_per_s=min(record.tokens_per_s, MAX_TRUSTED_SPEED),
    )


def read_challenge(reply: HttpReply, record: PeerRecord, nonce: bytes) -> None:
    """Returns only if the reply is ``record``'s key signing ``nonce``; raises ``PeerRejected``. Pure."""
    if reply.status != 200:
        raise PeerRejected("bad_challenge", f"/peer/challenge answered {reply.status}")
    if not verify_challenge(record, nonce, _json_object(reply.body)):
        raise PeerRejected("bad_challenge", "the endpoint cannot sign with the record's key")


async def vet_peer(
    http: WorkerHttp, record: PeerRecord, *, deadline: float, challenge: bool, endpoint: str | None = None
) -> Probe:
    """Probe ``/health`` and, if ``challenge``, check the nonce, all by ``deadline``; raises ``PeerRejected``.

    ``endpoint`` is the one of the record's endpoints to use (the first by default).
    """
    url = endpoint or record.endpoints[0]
    started = time.monotonic()
    reply = await http.exchange(url, "GET", "/health", deadline=deadline, max_bytes=MAX_HEALTH_BYTES)
    probe = read_health(reply, record, time.monotonic() - started, url)
    if challenge:
        await prove_key(http, record, deadline=deadline, endpoint=url)
    return probe


async def prove_key(http: WorkerHttp, record: PeerRecord, *, deadline: float, endpoint: str | None = None) -> None:
    """Ask the endpoint to sign a fresh nonce by ``deadline``; raises ``PeerRejected`` unless it is the record's key."""
    nonce = secrets.token_bytes(32)
    body = json.dumps({"nonce": b64(nonce)}).encode()
    reply = await http.exchange(
        endpoint or record.endpoints[0],
        "POST",
        "/peer/challenge",
        deadline=deadline,
        max_bytes=MAX_CHALLENGE_BYTES,
        body=body,
    )
    read_challenge(reply, record, nonce)
