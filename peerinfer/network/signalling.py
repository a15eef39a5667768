"""ICE signalling on the DHT: the offer a client leaves for a worker, and the worker's signed answer. Pure.

A client that wants an ICE path to the peer of ``ice://<peer id>`` puts an *offer* under
``ice_key(peer_id)``: a random session id, its SDP (ICE credentials, candidates, DTLS
fingerprint), whether the worker should gather relay candidates, and the time, and listens under
the same key. The worker, which listens under it too, puts there its *answer*. One key for both
because a DHT search for a key costs up to seconds when nodes behind NAT do not answer (measured
in the NAT lab: 2.2 s from offer to answer with a key per session), and the put and the listen of
each side then share one search. The answer holds its SDP, the session, the sha256 of the
offer's SDP, its peer id and public key, signed with its Ed25519 key (``ANSWER_DOMAIN`` + the
canonical JSON of the answer). Or it is a signed refusal.

What this buys: the answer's SDP carries the fingerprint of the worker's DTLS certificate, and the
signature ties it to the key whose hash is the peer id the client asked for. The DTLS handshake
then proves that the other end holds that certificate, so a relay (or a DHT node that swaps
values) sees only ciphertext and cannot pose as the worker. The answer names the offer's hash, so
an offer replaced on its way yields an answer the client refuses.

Offers come from strangers: they are unsigned, small (``MAX_SIGNAL_BYTES``), fresh (``MAX_AGE_S``),
and list at most ``MAX_CANDIDATES`` candidates, since the worker sends connectivity checks to each.
Every reader here raises ``SignalRejected`` and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from typing import Any

from peerinfer.network.identity import PeerIdentity, b64, peer_id_for, unb64, verify_signature
from peerinfer.network.records import PROTOCOL_VERSION, canonical

ANSWER_DOMAIN = b"peerinfer-ice-answer-v1\n"
MAX_SIGNAL_BYTES = 4000
MAX_SDP_CHARS = 3200
MAX_CANDIDATES = 12
MAX_AGE_S = 30.0
MAX_REASON_CHARS = 80
_HEX32 = re.compile(r"[0-9a-f]{32}")
_SDP_LINE = re.compile(r"[a-z]=[\x20-\x7e]{0,600}")


def ice_key(peer_id: str) -> str:
    """Where the offers to a worker and the worker's answers meet: one key, so one DHT search serves both."""
    return f"peerinfer/v{PROTOCOL_VERSION}/ice/{peer_id}"


class SignalRejected(ValueError):
    """An offer or answer a reader must drop; ``reason`` is a short word."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class Offer:
    session: str
    sdp: str
    relay: bool
    issued_at: float

    def encode(self) -> bytes:
        return canonical({"kind": "ice-offer", "v": PROTOCOL_VERSION, **asdict(self)})


@dataclass(frozen=True)
class Answer:
    """A worker's reply to one offer: ``sdp`` to connect, or ``refused`` (a short reason) and no sdp."""

    session: str
    offer_sha256: str
    sdp: str | None
    refused: str | None
    peer_id: str
    public_key: str
    issued_at: float


def sdp_sha256(sdp: str) -> str:
    return hashlib.sha256(sdp.encode()).hexdigest()


def check_sdp(sdp: Any) -> str:
    """``sdp`` if it is short, printable, line-shaped SDP with few candidates; else ``SignalRejected``."""
    if not isinstance(sdp, str) or not 0 < len(sdp) <= MAX_SDP_CHARS:
        raise SignalRejected("bad_sdp", f"the SDP must be a string of 1 to {MAX_SDP_CHARS} characters")
    lines = [line for line in sdp.replace("\r\n", "\n").split("\n") if line]
    if not lines or not lines[0].startswith("v=") or not all(_SDP_LINE.fullmatch(line) for line in lines):
        raise SignalRejected("bad_sdp", "not SDP: every line must be 'x=' and printable ASCII")
    candidates = sum(line.startswith("a=candidate:") for line in lines)
    if candidates > MAX_CANDIDATES:
        raise SignalRejected("bad_sdp", f"{candidates} candidates, at most {MAX_CANDIDATES}")
    return sdp


def _object(data: Any) -> dict[str, Any]:
    if not isinstance(data, bytes) or len(data) > MAX_SIGNAL_BYTES:
        raise SignalRejected("too_large", f"a signal must be bytes of at most {MAX_SIGNAL_BYTES}")
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise SignalRejected("malformed", "not JSON") from exc
    if not isinstance(value, dict):
        raise SignalRejected("malformed", "not a JSON object")
    return value


def _time(value: Any, now: float) -> float:
    if type(value) not in (int, float) or not abs(value - now) <= MAX_AGE_S:
        raise SignalRejected("stale", f"issued more than {MAX_AGE_S:g} s from now (a replay, or clock skew)")
    return float(value)


def read_offer(data: Any, now: float) -> Offer:
    """The offer in ``data`` if a worker may act on it."""
    try:
        body = _object(data)
        if "answer" in body:
            raise SignalRejected("not_offer", "an answer (offers and answers share a key)")
        if set(body) != {"kind", "v", "session", "sdp", "relay", "issued_at"} or body["kind"] != "ice-offer":
            raise SignalRejected("malformed", "not an ice-offer with exactly its fields")
        if body["v"] != PROTOCOL_VERSION or type(body["v"]) is not int:
            raise SignalRejected("bad_version", f"version {str(body['v'])[:20]!r}")
        session = body["session"]
        if not isinstance(session, str) or not _HEX32.fullmatch(session):
            raise SignalRejected("malformed", "session must be 32 hex digits")
        if not isinstance(body["relay"], bool):
            raise SignalRejected("malformed", "relay must be true or false")
        return Offer(session, check_sdp(body["sdp"]), body["relay"], _time(body["issued_at"], now))
    except SignalRejected:
        raise
    except Exception as exc:  # a check we missed is still a rejection, never an exception
        raise SignalRejected("malformed", type(exc).__name__) from exc


def sign_answer(answer: Answer, identity: PeerIdentity) -> bytes:
    body = asdict(answer)
    return canonical({"answer": body, "sig": b64(identity.sign(ANSWER_DOMAIN + canonical(body)))})


def make_answer(offer: Offer, identity: PeerIdentity, now: float, *, sdp: str | None, refused: str | None) -> bytes:
    """The signed reply to ``offer``: ``sdp`` to connect, or ``refused`` saying why not."""
    answer = Answer(
        session=offer.session,
        offer_sha256=sdp_sha256(offer.sdp),
        sdp=sdp,
        refused=_printable(refused)[:MAX_REASON_CHARS] if refused is not None else None,
        peer_id=identity.peer_id,
        public_key=b64(identity.public_key),
        issued_at=round(now, 3),
    )
    return sign_answer(answer, identity)


def _printable(text: str) -> str:
    return "".join(char if char.isascii() and char.isprintable() else "?" for char in text)


def read_answer(data: Any, offer: Offer, peer_id: str, now: float) -> Answer:
    """The answer in ``data`` if it is ``peer_id``'s signed reply to ``offer``."""
    try:
        envelope = _object(data)
        if envelope.get("kind") == "ice-offer":
            raise SignalRejected("not_answer", "an offer (offers and answers share a key)")
        body = envelope.get("answer")
        fields = set(Answer.__dataclass_fields__)
        if set(envelope) != {"answer", "sig"} or not isinstance(body, dict) or set(body) != fields:
            raise SignalRejected("malformed", "not an answer with exactly its fields")
        if body["session"] != offer.session or body["offer_sha256"] != sdp_sha256(offer.sdp):
            raise SignalRejected("not_ours", "the answer is to another offer")
        if body["peer_id"] != peer_id or not isinstance(body["public_key"], str) or len(body["public_key"]) > 64:
            raise SignalRejected("wrong_peer", f"the answer is not from peer {peer_id}")
        public_key = unb64(body["public_key"])
        if peer_id_for(public_key) != peer_id:
            raise SignalRejected("wrong_peer", f"the answer's key is not peer {peer_id}'s")
        signature = envelope["sig"]
        if not isinstance(signature, str) or len(signature) > 128:
            raise SignalRejected("bad_signature", "sig must be a base64 string")
        if not verify_signature(public_key, unb64(signature), ANSWER_DOMAIN + canonical(body)):
            raise SignalRejected("bad_signature", f"the answer is not signed by peer {peer_id}")
        issued_at = _time(body["issued_at"], now)
        refused = body["refused"]
        if refused is not None:
            printable = isinstance(refused, str) and refused.isascii() and refused.isprintable()
            if not printable or len(refused) > MAX_REASON_CHARS or body["sdp"] is not None:
                raise SignalRejected("malformed", "a refusal has a short reason and no SDP")
            return Answer(body["session"], body["offer_sha256"], None, refused, peer_id, body["public_key"], issued_at)
        return Answer(
            body["session"], body["offer_sha256"], check_sdp(body["sdp"]), None, peer_id, body["public_key"], issued_at
        )
    except SignalRejected:
        raise
    except Exception as exc:
        raise SignalRejected("malformed", type(exc).__name__) from exc


__all__ = [
    "ANSWER_DOMAIN",
    "Answer",
    "Offer",
    "SignalRejected",
    "check_sdp",
    "ice_key",
    "make_answer",
    "read_answer",
    "read_offer",
    "sdp_sha256",
    "sign_answer",
]
