"""Is a worker reachable from outside? A bootstrap node dials it back and says so.

A worker cannot tell by itself whether clients elsewhere can open its URL (NAT, a firewall, a
``--host`` that is not the address others see), and its own claim is worth nothing to a client. So
it asks the bootstrap nodes it joins through:

- The worker sends ``POST /peer/dialback`` over TCP to a bootstrap's host and port (the DHT's UDP
  port number) with ``{"port": 8000, "peer_id": "<hex>", "public_key": "<base64>"}``.
- The bootstrap dials back the TCP *source address* of that request, never a host the caller
  names (no one can point it at a third machine; ``X-Forwarded-For`` and the like are ignored),
  with ``POST http://<source>:<port>/peer/challenge`` and a fresh 32-byte nonce, and checks that
  the answer is ``public_key`` signing that nonce for ``peer_id``: the whole exchange by
  ``DIAL_TIMEOUT_S``, the reply read up to ``MAX_REPLY_BYTES``.
- It answers ``{"reachable": bool, "url": "http://<source>:<port>", "observed": "<source>",
  "reason": "..."}``. Every failure of the dial is such an answer; a bad request is 400, 413 or
  415; a second dial-back for one source (an IPv6 /64 counts as one) within ``MIN_INTERVAL_S`` is
  429, and more than ``MAX_DIALS`` at once, or more fresh sources than ``MAX_SOURCES``, is 503.

The worker reads the answer as strictly as a record (``read_report``: anything else is "no
answer") and ``endpoints_for`` decides what its record lists. Wire formats and decisions here are
pure; ``ask_dialback`` (the worker) and ``network.dialback_server`` (the bootstrap) carry them out
over ``WorkerHttp``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from peerinfer.client.peer_http import HttpReply, PeerRejected
from peerinfer.client.transport import WorkerHttp
from peerinfer.errors import RequestError
from peerinfer.network.identity import PUBLIC_KEY_BYTES, PeerIdentity, b64, peer_id_for, unb64, verify_signature
from peerinfer.network.records import MAX_ENDPOINTS, challenge_message, ice_endpoint

DIALBACK_PATH = "/peer/dialback"
DIAL_TIMEOUT_S = 3.0
"""The bootstrap's whole dial (connect, send, read the answer), however slowly the worker drips it."""
ASK_TIMEOUT_S = DIAL_TIMEOUT_S + 2.0
"""The worker's whole question to one bootstrap: the bootstrap's dial and the round trips around it."""
RECHECK_S = 300.0
"""A worker asks again this often: an address or a router's port forwarding can change."""
MAX_ASK_BYTES = 4096
MAX_REPLY_BYTES = 4096
MAX_REPORT_BYTES = 4096
MAX_DIALS = 16
MIN_INTERVAL_S = 5.0
MAX_SOURCES = 4096
MAX_REASON_CHARS = 300
NONCE_BYTES = 32
_HEX40 = re.compile(r"[0-9a-f]{40}")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


# --- the wire, pure ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DialbackAsk:
    """A worker's request: dial me back at ``port``; I hold ``public_key``, whose id is ``peer_id``."""

    port: int
    peer_id: str
    public_key: bytes

    def wire(self) -> bytes:
        return json.dumps({"port": self.port, "peer_id": self.peer_id, "public_key": b64(self.public_key)}).encode()


def read_ask(body: bytes) -> DialbackAsk:
    """The request in ``body``; raises ``RequestError`` (400) saying what is wrong. Pure."""
    expected = 'expected {"port": <1-65535>, "peer_id": "<40 hex digits>", "public_key": "<base64 Ed25519 key>"}'
    try:
        value = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise RequestError(f"the body is not JSON; {expected}") from exc
    if not isinstance(value, dict) or set(value) != {"port", "peer_id", "public_key"}:
        raise RequestError(f"the body must have exactly the fields port, peer_id and public_key; {expected}")
    port, peer_id, key_text = value["port"], value["peer_id"], value["public_key"]
    if type(port) is not int or not 0 < port < 65536:
        raise RequestError(f"port={str(port)[:20]!r} is not a TCP port; {expected}", param="port")
    if not isinstance(peer_id, str) or not _HEX40.fullmatch(peer_id):
        raise RequestError(f"peer_id is not 40 lower-case hex digits; {expected}", param="peer_id")
    try:
        public_key = unb64(key_text) if isinstance(key_text, str) and len(key_text) <= 64 else b""
    except ValueError:
        public_key = b""
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise RequestError(f"public_key is not a base64 Ed25519 public key; {expected}", param="public_key")
    if peer_id_for(public_key) != peer_id:
        raise RequestError("peer_id does not belong to public_key (it is the key's SHA-256, first 40 hex digits)")
    return DialbackAsk(port, peer_id, public_key)


def plain_address(ip: str) -> str:
    """An IP in its usual form: ``::ffff:192.0.2.1`` (IPv4 on a dual-stack socket) is ``192.0.2.1``."""
    try:
        address = ipaddress.ip_address(ip.split("%")[0])
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def origin(host: str, port: int) -> str:
    """``http://host:port``, an IPv6 address in brackets."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def source_key(ip: str) -> str:
    """What the rate limit counts as one source: an IPv4 address, or an IPv6 /64 (one home's prefix)."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@dataclass(frozen=True)
class DialbackReport:
    """A bootstrap's verdict: could it open ``url`` (the asker's ``observed`` address) and get the key's answer?"""

    reachable: bool
    url: str
    observed: str
    reason: str

    def wire(self) -> dict[str, Any]:
        return {"reachable": self.reachable, "url": self.url, "observed": self.observed, "reason": self.reason}


def one_line(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """``text`` safe for one log line: printable ASCII only, at most ``limit`` characters."""
    return _UNPRINTABLE.sub("?", " ".join(text.split()))[:limit]


def read_report(reply: HttpReply, port: int) -> DialbackReport | None:
    """The bootstrap's answer to a question about ``port``, or None when it is anything but a well-formed one. Pure.

    The observed address must be an IP and the URL exactly ``http://<observed>:<port>``: a bootstrap
    cannot make a worker list some other host or port.
    """
    if reply.status != 200 or len(reply.body) > MAX_REPORT_BYTES:
        return None
    try:
        value = json.loads(reply.body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, dict) or set(value) != {"reachable", "url", "observed", "reason"}:
        return None
    reachable, url, observed, reason = value["reachable"], value["url"], value["observed"], value["reason"]
    if not isinstance(reachable, bool) or not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS:
        return None
    if not isinstance(observed, str) or len(observed) > 64 or plain_address(observed) != observed:
        return None
    try:
        ipaddress.ip_address(observed)
    except ValueError:
        return None
    if url != origin(observed, port):
        return None
    return DialbackReport(reachable, url, observed, one_line(reason))


def challenge_failure(reply: HttpReply, ask: DialbackAsk, nonce: bytes) -> str | None:
    """Why ``reply`` is not ``ask``'s key signing ``nonce`` (None: it is). Pure, never raises."""
    if reply.status != 200:
        return f"/peer/challenge answered HTTP {reply.status}"
    try:
        answer = json.loads(reply.body)
    except (ValueError, RecursionError):
        return "/peer/challenge did not answer JSON"
    if not isinstance(answer, dict) or answer.get("peer_id") != ask.peer_id:
        return "the answer is not from the peer id asked about (another worker on that port?)"
    signature = answer.get("signature")
    try:
        signed = unb64(signature) if isinstance(signature, str) and len(signature) <= 128 else b""
    except ValueError:
        signed = b""
    if not verify_signature(ask.public_key, signed, challenge_message(nonce)):
        return "the answer is not signed with the given key (another worker on that port?)"
    return None


# --- the decision, pure -----------------------------------------------------------------------


Verdict = Literal["operator", "reachable", "unreachable", "no_answer", "unchecked"]


def verdict(explicit_url: str | None, reports: Sequence[DialbackReport | None]) -> Verdict:
    """Which case of ``endpoints_for`` applies; the answers count, a bootstrap that gave none does not."""
    if explicit_url:
        return "operator"
    if not reports:
        return "unchecked"
    answered = [report for report in reports if report is not None]
    if any(report.reachable for report in answered):
        return "reachable"
    return "unreachable" if answered else "no_answer"


def endpoints_for(
    guessed_url: str,
    explicit_url: str | None,
    reports: Sequence[DialbackReport | None],
    ice_on: bool,
    peer_id: str,
) -> tuple[str, ...]:
    """What the record lists, in the order clients try them. Pure.

    - ``PEERINFER_ANNOUNCE_URL`` set: that URL; the operator knows (behind a proxy no dial-back can tell).
    - a bootstrap reached the worker: the URLs it was reached at (what the bootstraps observed).
    - bootstraps answered and none could connect: nothing over http; if ICE is off, the guessed URL,
      since listing nothing would drop the worker from the network altogether.
    - no bootstrap answered (none asked, an old bootstrap without dial-back, time-outs): the guessed URL.

    The ``ice://<peer id>`` endpoint comes last whenever ICE is on.
    """
    ice = [ice_endpoint(peer_id)] if ice_on else []
    case = verdict(explicit_url, reports)
    if case == "operator" and explicit_url:
        urls = [explicit_url]
    elif case == "reachable":
        urls = list(dict.fromkeys(r.url for r in reports if r is not None and r.reachable))
    elif case == "unreachable":
        urls = [] if ice else [guessed_url]
    else:
        urls = [guessed_url]
    return (*urls[: MAX_ENDPOINTS - len(ice)], *ice)


@dataclass(frozen=True)
class DialbackResult:
    """What asking one bootstrap came to: its report, or why there is none."""

    bootstrap: str
    report: DialbackReport | None
    failure: str = ""

    def describe(self) -> str:
        if self.report is None:
            return f"bootstrap {self.bootstrap}: no answer ({self.failure})"
        if self.report.reachable:
            return f"bootstrap {self.bootstrap} connected to {self.report.url}"
        return f"bootstrap {self.bootstrap}: {self.report.reason}"


def reachability_line(
    explicit_url: str | None, results: Sequence[DialbackResult], endpoints: Sequence[str], ice_on: bool
) -> tuple[int, str]:
    """The log level and line for one round of dial-backs. Pure."""
    case = verdict(explicit_url, [result.report for result in results])
    listed = ", ".join(endpoints)
    said = "; ".join(result.describe() for result in results)
    if case == "operator":
        reports = [result.report for result in results if result.report is not None]
        if reports and not any(report.reachable for report in reports):
            return logging.WARNING, (
                f"PEERINFER_ANNOUNCE_URL={explicit_url} is listed as set, but no bootstrap could connect to this "
                f"worker ({said}); check that clients outside this network can reach it"
            )
        return logging.INFO, f"listing PEERINFER_ANNOUNCE_URL as set: {listed} (dial-back: {said or 'not asked'})"
    if case == "reachable":
        return logging.INFO, f"reachable from outside ({said}): listing {listed}"
    if case == "unreachable" and ice_on:
        return logging.WARNING, (
            f"not reachable from outside ({said}): listing only {listed}; clients reach this worker through ICE. "
            "To be reached directly, forward its TCP port on the router or set PEERINFER_ANNOUNCE_URL"
        )
    if case == "unreachable":
        return logging.ERROR, (
            f"not reachable from outside ({said}) and PEERINFER_ICE=0: listing {listed}, which clients outside "
            "this network cannot open. Forward its TCP port on the router, set PEERINFER_ICE=1, or use a relay"
        )
    return logging.WARNING, f"no bootstrap answered the dial-back ({said or 'none asked'}): listing {listed} as guessed"


# --- the worker's side ------------------------------------------------------------------------


def dialback_port(url: str) -> int | None:
    """The TCP port a bootstrap should dial for ``url``; None for what it cannot check (https, no port)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme != "http":
        return None  # the bootstrap dials plain http; TLS (or a proxy in front) it cannot check
    return port or 80


async def ask_dialback(
    http: WorkerHttp, bootstrap: tuple[str, int], port: int, identity: PeerIdentity, *, timeout_s: float = ASK_TIMEOUT_S
) -> DialbackResult:
    """Ask ``bootstrap`` (host, port: its TCP port is the DHT's number) to dial ``port`` back. Never raises."""
    host, boot_port = bootstrap
    name = host_port(host, boot_port)
    ask = DialbackAsk(port, identity.peer_id, identity.public_key)
    try:
        reply = await http.exchange(
            origin(host, boot_port),
            "POST",
            DIALBACK_PATH,
            deadline=time.monotonic() + timeout_s,
            max_bytes=MAX_REPORT_BYTES,
            body=ask.wire(),
        )
    except PeerRejected as exc:
        return DialbackResult(name, None, exc.reason)
    except Exception as exc:  # whatever the bootstrap does, the worker goes on as if it gave no answer
        return DialbackResult(name, None, type(exc).__name__)
    report = read_report(reply, port)
    if report is None:
        failure = "not a dial-back report" if reply.status == 200 else f"HTTP {reply.status}"
        return DialbackResult(name, None, failure)
    return DialbackResult(name, report)


async def wait_listening(url: str, timeout_s: float) -> bool:
    """Whether a TCP connection to ``url``'s host and port opens within ``timeout_s`` (tried every 0.1 s).

    A worker asks for its dial-back only once its own server accepts connections: uvicorn starts
    listening after the app's start-up, and a fake engine is ready before that.
    """
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port or 80
    except ValueError:
        return False
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            async with asyncio.timeout(0.5):
                _, writer = await asyncio.open_connection(host, port)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return True
        except (OSError, TimeoutError):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.1)
