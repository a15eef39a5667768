"""PEERINFER_ICE_SERVERS: WebRTC's iceServers shapes are read; everything else is refused with a reason."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from peerinfer.errors import ConfigError
from peerinfer.network.ice_config import MAX_FIELD_CHARS, MAX_SERVERS, MAX_URLS, IceServer, parse_ice_servers
from peerinfer.settings import ClientSettings, load_worker_settings, settings_error

TURN = {"urls": "turn:203.0.113.10:3478", "username": "u", "credential": "p"}

ACCEPTED: list[tuple[str, object, tuple[IceServer, ...]]] = [
    ("nothing", "", ()),
    ("blank", "  \n", ()),
    ("empty list", [], ()),
    ("stun, no port", [{"urls": "stun:stun.example.org"}], (IceServer(("stun:stun.example.org",)),)),
    ("turn, urls as string", [TURN], (IceServer(("turn:203.0.113.10:3478",), "u", "p"),)),
    (
        "turn, urls as list with transports",
        [{**TURN, "urls": ["turn:relay.example.org:3478?transport=udp", "turn:relay.example.org:3478?transport=tcp"]}],
        (
            IceServer(
                ("turn:relay.example.org:3478?transport=udp", "turn:relay.example.org:3478?transport=tcp"), "u", "p"
            ),
        ),
    ),
    (
        "turns over TLS",
        [{**TURN, "urls": "turns:relay.example.org:5349?transport=tcp"}],
        (IceServer(("turns:relay.example.org:5349?transport=tcp",), "u", "p"),),
    ),
    (
        "IPv6 host in brackets",
        [{**TURN, "urls": ["turn:[2001:db8::10]:3478"]}, {"urls": "stun:[2001:db8::10]"}],
        (IceServer(("turn:[2001:db8::10]:3478",), "u", "p"), IceServer(("stun:[2001:db8::10]",))),
    ),
    ("credentialType password", [{**TURN, "credentialType": "password"}], (IceServer((TURN["urls"],), "u", "p"),)),
    ("stun with a credential", [{"urls": "stun:h", "username": "u"}], (IceServer(("stun:h",), "u"),)),
    ("the most servers", [{"urls": "stun:h"}] * MAX_SERVERS, (IceServer(("stun:h",)),) * MAX_SERVERS),
]

REFUSED: list[tuple[str, str, str]] = [
    ("not JSON", "turn:203.0.113.10:3478", "not JSON"),
    ("truncated JSON", '[{"urls": "stun:h"', "not JSON"),
    ("deep nesting", "[" * 100_000 + "]" * 100_000, "not JSON"),
    ("nested lists", json.dumps([[[{"urls": "stun:h"}]]]), "each entry must be an object"),
    ("an object, not a list", json.dumps(TURN), "expected a JSON list"),
    ("a string", json.dumps("stun:h"), "expected a JSON list"),
    ("too many servers", json.dumps([{"urls": "stun:h"}] * (MAX_SERVERS + 1)), "at most 16 servers"),
    ("too many urls", json.dumps([{"urls": ["stun:h"] * (MAX_URLS + 1)}]), "1 to 8 URLs"),
    ("no urls", json.dumps([{"username": "u"}]), "urls must be"),
    ("empty urls", json.dumps([{"urls": []}]), "urls must be"),
    ("urls as a number", json.dumps([{"urls": 3478}]), "urls must be"),
    ("a url that is a number", json.dumps([{"urls": [3478]}]), "is not a STUN or TURN URL"),
    ("unknown key", json.dumps([{**TURN, "password": "p"}]), "unknown field(s) ['password']"),
    ("TURN without credentials", json.dumps([{"urls": "turn:h:3478"}]), "needs a username and a credential"),
    ("TURN without credential", json.dumps([{"urls": "turn:h", "username": "u"}]), "needs a username and a credential"),
    ("port 0", json.dumps([{**TURN, "urls": "turn:h:0"}]), "not a STUN or TURN URL"),
    ("port 65536", json.dumps([{**TURN, "urls": "turn:h:65536"}]), "not a STUN or TURN URL"),
    ("port too long", json.dumps([{**TURN, "urls": "turn:h:034780"}]), "not a STUN or TURN URL"),
    ("http URL", json.dumps([{"urls": "http://relay.example.org"}]), "not a STUN or TURN URL"),
    ("unknown transport", json.dumps([{**TURN, "urls": "turn:h:3478?transport=sctp"}]), "not a STUN or TURN URL"),
    ("IPv6 without brackets", json.dumps([{**TURN, "urls": "turn:2001:db8::10:3478"}]), "not a STUN or TURN URL"),
    ("newline in a URL", json.dumps([{"urls": "stun:h\nstun:evil"}]), "not a STUN or TURN URL"),
    ("username a number", json.dumps([{**TURN, "username": 5}]), "username must be a string"),
    ("credential a boolean", json.dumps([{**TURN, "credential": True}]), "credential must be a string"),
    ("empty username", json.dumps([{**TURN, "username": ""}]), "username must be a string"),
    ("huge credential", json.dumps([{**TURN, "credential": "x" * (MAX_FIELD_CHARS + 1)}]), "1 to 256 characters"),
    ("oauth credential", json.dumps([{**TURN, "credentialType": "oauth"}]), "credentialType must be 'password'"),
    ("entry a string", json.dumps(["stun:h"]), "each entry must be an object"),
]


@pytest.mark.parametrize(("text", "expected"), [(case[1], case[2]) for case in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_webrtc_shapes_are_read(text: object, expected: tuple[IceServer, ...]) -> None:
    parsed = parse_ice_servers(text if isinstance(text, str) else json.dumps(text))
    assert parsed == expected
    assert parse_ice_servers(json.dumps([server.as_dict() for server in parsed])) == parsed


@pytest.mark.parametrize(("text", "reason"), [(c[1], c[2]) for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_bad_values_are_refused_with_the_reason(text: str, reason: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_ice_servers(text)
    message = str(caught.value)
    assert reason in message
    assert len(message) < 300 and "\n" not in message


def test_a_refusal_does_not_echo_a_huge_value() -> None:
    with pytest.raises(ValueError) as caught:
        parse_ice_servers(json.dumps([{"urls": "stun:" + "a" * 10_000}]))
    assert len(str(caught.value)) < 200


def test_settings_read_the_servers_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEERINFER_ICE_SERVERS", json.dumps([TURN, {"urls": ["stun:203.0.113.10:3478"]}]))
    settings = ClientSettings(_env_file=None)  # type: ignore[call-arg]
    assert settings.ice_servers == (
        IceServer(("turn:203.0.113.10:3478",), "u", "p"),
        IceServer(("stun:203.0.113.10:3478",)),
    )
    assert settings.ice_servers[0].is_turn and not settings.ice_servers[1].is_turn


def test_settings_without_the_variable_contact_no_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PEERINFER_ICE_SERVERS", raising=False)
    assert ClientSettings(_env_file=None).ice_servers == ()  # type: ignore[call-arg]


def test_a_bad_variable_names_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEERINFER_ICE_SERVERS", '[{"urls": "turn:203.0.113.10:3478"}]')
    with pytest.raises(ValidationError) as caught:
        ClientSettings(_env_file=None)  # type: ignore[call-arg]
    message = settings_error(caught.value).message
    assert message.startswith("invalid setting PEERINFER_ICE_SERVERS=")
    assert "needs a username and a credential" in message


def test_a_worker_with_a_bad_variable_gets_one_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEERINFER_ICE_SERVERS", "stun:203.0.113.10")
    with pytest.raises(ConfigError) as caught:
        load_worker_settings()
    assert "PEERINFER_ICE_SERVERS" in caught.value.message and "not JSON" in caught.value.message
