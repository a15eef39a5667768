"""``PEERINFER_ICE_SERVERS``: the STUN and TURN servers ICE may use, in WebRTC's ``iceServers`` shape. Pure.

    [{"urls": "turn:203.0.113.10:3478", "username": "u", "credential": "p"},
     {"urls": ["stun:203.0.113.10:3478"]}]

Only what is listed is ever contacted: with an empty list ICE gathers host candidates only (a LAN,
IPv6, a public address) and nothing asks a public STUN server.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

MAX_SERVERS = 16
MAX_URLS = 8
MAX_FIELD_CHARS = 256
_URL = re.compile(
    r"(?P<scheme>stun|stuns|turn|turns):(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]{1,253})"
    r"(?::(?P<port>[0-9]{1,5}))?(?:\?transport=(?P<transport>udp|tcp))?"
)
_KEYS = {"urls", "username", "credential", "credentialType"}
EXAMPLE = '[{"urls": "turn:203.0.113.10:3478", "username": "u", "credential": "p"}]'


@dataclass(frozen=True)
class IceServer:
    """One entry: its URLs (``stun:``/``turn:``, host, optional port and transport) and TURN credentials."""

    urls: tuple[str, ...]
    username: str | None = None
    credential: str | None = None

    @property
    def is_turn(self) -> bool:
        return any(url.startswith("turn") for url in self.urls)

    def as_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"urls": list(self.urls)}
        if self.username is not None:
            body["username"] = self.username
        if self.credential is not None:
            body["credential"] = self.credential
        return body


def check_ice_url(url: object) -> str:
    """``url`` if it is a ``stun:``/``turn:`` URL with a valid port; raises ``ValueError`` naming it."""
    match = _URL.fullmatch(url) if isinstance(url, str) else None
    port = match.group("port") if match else None
    if match is None or (port is not None and not 0 < int(port) < 65536):
        raise ValueError(f"{str(url)[:80]!r} is not a STUN or TURN URL such as turn:203.0.113.10:3478")
    return str(url)


def _text(entry: dict[str, Any], name: str) -> str | None:
    value = entry.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_FIELD_CHARS:
        raise ValueError(f"{name} must be a string of 1 to {MAX_FIELD_CHARS} characters")
    return value


def _server(entry: Any) -> IceServer:
    if not isinstance(entry, dict):
        raise ValueError(f"each entry must be an object such as {EXAMPLE[1:-1]}")
    unknown = set(entry) - _KEYS
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)[:4]}; an entry has urls, username and credential")
    if entry.get("credentialType", "password") != "password":
        raise ValueError("credentialType must be 'password' (the only kind WebRTC defines)")
    raw = entry.get("urls")
    urls = [raw] if isinstance(raw, str) else raw
    if not isinstance(urls, list) or not 0 < len(urls) <= MAX_URLS:
        raise ValueError(f"urls must be a URL or a list of 1 to {MAX_URLS} URLs")
    server = IceServer(tuple(check_ice_url(url) for url in urls), _text(entry, "username"), _text(entry, "credential"))
    if server.is_turn and (server.username is None or server.credential is None):
        raise ValueError(f"the TURN server {server.urls[0]} needs a username and a credential")
    return server


def parse_ice_servers(text: str) -> tuple[IceServer, ...]:
    """The servers in ``text`` (JSON); an empty string is none. Raises ``ValueError`` saying what is wrong."""
    if not text.strip():
        return ()
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"not JSON ({str(exc)[:60]}); expected a list such as {EXAMPLE}") from exc
    if not isinstance(value, list) or len(value) > MAX_SERVERS:
        raise ValueError(f"expected a JSON list of at most {MAX_SERVERS} servers, such as {EXAMPLE}")
    return tuple(_server(entry) for entry in value)
