"""The relay's configuration: checked values, and a real coturn on 127.0.0.1 that obeys what was rendered.

The coturn tests drive aioice's TURN client (the one ICE uses) against ``turnserver`` started from
``render_turnserver_conf``: credentials, the session quota, denied private ranges, and relayed data.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import ipaddress
import json
import os
import shlex
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aioice import stun
from aioice.turn import TurnTransport, create_turn_endpoint

from peerinfer.errors import ConfigError
from peerinfer.network.ice_config import parse_ice_servers
from peerinfer.network.relay_cli import add_relay_config_parser, config_from_args, run_relay_config
from peerinfer.network.relay_config import (
    DENIED_PEER_RANGES,
    RelayConfig,
    coturn_range,
    ice_servers_json,
    render_turnserver_conf,
)
from tests import turn_server
from tests.turn_server import TurnServer, free_udp_port, relay_port_range

DEADLINE_S = 15.0
PASSWORD = "Tq4v-9xLw.2mZr_7Kp"


def lines(config: RelayConfig) -> list[str]:
    return render_turnserver_conf(config).splitlines()


# ---------------------------------------------------------------- the configuration, without a server


def test_the_rendered_config_has_credentials_limits_and_safe_defaults() -> None:
    config = RelayConfig(
        external_ip="198.51.100.7",
        username="volunteer",
        password=PASSWORD,
        max_sessions=10,
        max_sessions_per_user=4,
        session_bytes_per_s=8000,
        total_bytes_per_s=80_000,
        max_allocation_lifetime_s=900,
    )
    rendered = lines(config)
    for line in [
        "external-ip=198.51.100.7",
        "listening-port=3478",
        "lt-cred-mech",
        "realm=peerinfer",
        f"user=volunteer:{PASSWORD}",
        "fingerprint",
        "no-cli",
        "no-tls",
        "no-dtls",
        "no-multicast-peers",
        "no-tcp-relay",
        "total-quota=10",
        "user-quota=4",
        "max-bps=8000",
        "bps-capacity=80000",
        "max-allocate-lifetime=900",
        "stale-nonce=600",
        "log-file=stdout",
        "simple-log",
    ]:
        assert line in rendered
    assert not [line for line in rendered if line.startswith(("allowed-peer-ip", "allow-loopback-peers"))]


def test_every_non_public_range_is_denied_in_coturns_own_range_form() -> None:
    denied = [line.removeprefix("denied-peer-ip=") for line in lines(RelayConfig()) if line.startswith("denied-")]
    assert denied == [
        coturn_range(net) for net in map(ipaddress.ip_network, dict(DENIED_PEER_RANGES)) if net.version == 4
    ]
    six = RelayConfig(relay_ips=("2001:db8::1",), external_ip="2001:db8::1")
    denied6 = [line.removeprefix("denied-peer-ip=") for line in lines(six) if line.startswith("denied-")]
    assert denied6 == [
        coturn_range(net) for net in map(ipaddress.ip_network, dict(DENIED_PEER_RANGES)) if net.version == 6
    ]
    with pytest.raises(ConfigError, match="one relay per family"):
        render_turnserver_conf(RelayConfig(relay_ips=("203.0.113.1", "2001:db8::1"), external_ip="203.0.113.1"))
    assert not [rule for rule in denied if "/" in rule]  # coturn 4.6 ignores CIDR rules
    covered = [ipaddress.ip_network(net) for net, _ in DENIED_PEER_RANGES]
    for address in [
        "10.1.2.3",
        "192.168.1.1",
        "172.31.255.255",
        "127.0.0.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "255.255.255.255",
        "224.0.0.251",
        "::1",
        "::",
        "::ffff:10.0.0.1",
        "64:ff9b::a00:1",
        "2002:a00:1::1",
        "fd00::1",
        "fe80::1",
        "ff02::1",
    ]:
        ip = ipaddress.ip_address(address)
        assert any(ip in net for net in covered if net.version == ip.version), address
    for public in ["1.1.1.1", "8.8.8.8", "2606:4700::1111"]:
        ip = ipaddress.ip_address(public)
        assert not any(ip in net for net in covered if net.version == ip.version), public


def test_lab_ranges_are_allowed_by_name_and_loopback_needs_coturns_switch() -> None:
    lab = lines(RelayConfig(allow_peer_ranges=("10.77.0.0/24",)))
    assert "allowed-peer-ip=10.77.0.0-10.77.0.255" in lab and "allow-loopback-peers" not in lab
    loop = lines(RelayConfig(allow_peer_ranges=("127.0.0.1/32",)))
    assert "allowed-peer-ip=127.0.0.1" in loop and "allow-loopback-peers" in loop
    assert any("labs and tests only" in warning for warning in RelayConfig(allow_peer_ranges=("::1/128",)).warnings())


def test_tls_listens_only_with_a_certificate() -> None:
    config = RelayConfig(
        server_name="relay.example.org", tls_cert="/etc/ssl/relay.pem", tls_key="/etc/ssl/relay.key", tls_port=5349
    )
    rendered = lines(config)
    assert "cert=/etc/ssl/relay.pem" in rendered and "pkey=/etc/ssl/relay.key" in rendered
    assert "no-tls" not in rendered and "tls-listening-port=5349" in rendered
    assert "turns:relay.example.org:5349?transport=tcp" in ice_servers_json(config)


def test_a_missing_password_is_generated_strong_and_new_each_time() -> None:
    first, second = RelayConfig(), RelayConfig()
    assert first.password != second.password and len(first.password) >= 32
    assert PASSWORD not in repr(RelayConfig(password=PASSWORD))


@pytest.mark.parametrize(
    ("host", "url_host"),
    [("external_ip", "198.51.100.7"), ("server_name", "relay.example.org"), ("listening_ips", "127.0.0.1")],
)
def test_the_client_line_is_what_peerinfer_ice_servers_reads(host: str, url_host: str) -> None:
    value: Any = (url_host,) if host == "listening_ips" else url_host
    config = RelayConfig(password=PASSWORD, port=3479, **{host: value})
    servers = parse_ice_servers(ice_servers_json(config))
    assert servers[0].is_turn and servers[0].username == "peerinfer" and servers[0].credential == PASSWORD
    assert f"turn:{url_host}:3479?transport=udp" in servers[0].urls
    assert servers[1].urls == (f"stun:{url_host}:3479",)


def test_an_ipv6_relay_is_written_in_brackets() -> None:
    servers = parse_ice_servers(ice_servers_json(RelayConfig(external_ip="2001:db8::7", password=PASSWORD)))
    assert servers[0].urls[0] == "turn:[2001:db8::7]:3478?transport=udp"


BAD_CONFIGS: list[tuple[str, dict[str, Any], str]] = [
    ("short password", {"password": "short"}, "16 to 128"),
    ("weak password", {"password": "aaaaaaaaaaaaaaaaaaaa"}, "weak"),
    ("password holds the username", {"username": "volunteer", "password": "volunteer-2024-abcdef"}, "weak"),
    ("password with a space", {"password": "correct horse battery"}, "16 to 128"),
    ("password with a newline", {"password": "Tq4v9xLw2mZr7Kp1\nno-auth"}, "16 to 128"),
    ("username with a colon", {"username": "a:b"}, "username"),
    ("username with a newline", {"username": "u\nno-auth"}, "username"),
    ("empty username", {"username": ""}, "username"),
    ("realm with a space", {"realm": "my realm"}, "realm"),
    ("external IP a name", {"external_ip": "relay.example.org"}, "not an IP address"),
    ("listening IP with a port", {"listening_ips": ("127.0.0.1:3478",)}, "listening IP"),
    ("relay IP bad", {"relay_ips": ("10.0.0.300",)}, "relay IP"),
    ("private IP alone", {"external_private_ip": "10.0.0.5"}, "give the external IP too"),
    ("server name bad", {"server_name": "relay_example..org"}, "DNS name"),
    ("port 0", {"port": 0}, "listening port 0"),
    ("port 70000", {"port": 70000}, "listening port 70000"),
    ("relay ports below 1024", {"min_port": 80}, "lowest relay port"),
    ("reversed relay range", {"min_port": 60000, "max_port": 50000}, "is empty"),
    ("range smaller than sessions", {"min_port": 50000, "max_port": 50009, "max_sessions": 11}, "fewer than 11"),
    ("listening port in the range", {"port": 50005, "min_port": 50000, "max_port": 50100}, "lies in the relay port"),
    ("no sessions", {"max_sessions": 0}, "max sessions 0"),
    ("negative bandwidth", {"session_bytes_per_s": -1}, "bytes/s per session"),
    ("a boolean limit", {"max_sessions": True}, "max sessions True"),
    ("per-user above total", {"max_sessions": 4, "max_sessions_per_user": 5}, "above max sessions"),
    ("session above total", {"session_bytes_per_s": 10, "total_bytes_per_s": 5}, "above the total"),
    ("lifetime too short", {"max_allocation_lifetime_s": 5}, "lifetime"),
    ("certificate without key", {"tls_cert": "/etc/ssl/c.pem", "server_name": "r.example.org"}, "both"),
    ("TLS without a name", {"tls_cert": "/etc/ssl/c.pem", "tls_key": "/etc/ssl/k.pem"}, "--server-name"),
    ("relative certificate", {"tls_cert": "c.pem", "tls_key": "/k", "server_name": "r.example.org"}, "absolute"),
    ("certificate with a newline", {"tls_cert": "/c\nno-auth", "tls_key": "/k", "server_name": "r.org"}, "absolute"),
    ("allowed range with host bits", {"allow_peer_ranges": ("10.0.0.1/8",)}, "host bits"),
    ("allowed range not a network", {"allow_peer_ranges": ("everything",)}, "not a network"),
]


@pytest.mark.parametrize(("values", "reason"), [(c[1], c[2]) for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_values_are_refused_saying_what_is_wrong(values: dict[str, Any], reason: str) -> None:
    values = {"password": PASSWORD, **values}
    with pytest.raises(ConfigError) as caught:
        RelayConfig(**values)
    assert reason in caught.value.message
    assert "\n" not in caught.value.message


@pytest.mark.parametrize("listening", [(), ("0.0.0.0",), ("::",)])
def test_no_address_for_clients_is_refused_when_the_client_line_is_made(listening: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError, match="--external-ip"):
        ice_servers_json(RelayConfig(listening_ips=listening))


# ---------------------------------------------------------------- a real coturn on 127.0.0.1


@pytest.fixture
def start_relay(tmp_path: Path) -> Iterator[Any]:
    reason = turn_server.unavailable()
    if reason:
        pytest.skip(reason)
    started: list[TurnServer] = []

    def start(**overrides: Any) -> TurnServer:
        low, high = relay_port_range()
        values: dict[str, Any] = {
            "listening_ips": ("127.0.0.1",),
            "relay_ips": ("127.0.0.1",),
            "port": free_udp_port(),
            "min_port": low,
            "max_port": high,
            "password": PASSWORD,
        }
        values.update(overrides)
        server = TurnServer.start(RelayConfig(**values), workdir=tmp_path / f"relay{len(started)}")
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


class Recorder(asyncio.DatagramProtocol):
    """What a TURN client's user sees: datagrams that came through the relay, and failed sends."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()
        self.errors: asyncio.Queue[Exception] = asyncio.Queue()
        self.closed = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.put_nowait((data, addr))

    def error_received(self, exc: Exception) -> None:
        self.errors.put_nowait(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


async def allocate(server: TurnServer, password: str | None = None) -> tuple[TurnTransport, Recorder]:
    config = server.config
    return await asyncio.wait_for(
        create_turn_endpoint(Recorder, server.address, config.username, password or config.password), DEADLINE_S
    )


async def allocate_when_free(server: TurnServer) -> tuple[TurnTransport, Recorder]:
    deadline = asyncio.get_running_loop().time() + DEADLINE_S
    while True:
        try:
            return await allocate(server)
        except stun.TransactionFailed as exc:
            if exc.response.error_code != 486 or asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)


async def release(*clients: tuple[TurnTransport, Recorder]) -> None:
    for transport, protocol in clients:
        transport.close()
        await asyncio.wait_for(protocol.closed, DEADLINE_S)


async def refusal(coroutine: Any) -> int:
    """The STUN error code the relay answered ``coroutine``'s request with."""
    with pytest.raises(stun.TransactionFailed) as caught:
        await asyncio.wait_for(coroutine, DEADLINE_S)
    code = caught.value.response.error_code
    assert code is not None
    return code


def test_right_credentials_get_a_relayed_address(start_relay: Any) -> None:
    server = start_relay()

    async def scenario() -> None:
        client = await allocate(server)
        host, port = client[0].get_extra_info("sockname")
        assert host == "127.0.0.1" and server.config.min_port <= port <= server.config.max_port
        await release(client)

    asyncio.run(scenario())


def test_a_wrong_password_gets_no_allocation(start_relay: Any) -> None:
    server = start_relay()

    async def scenario() -> None:
        assert await refusal(allocate(server, password="Wrong-password-1234")) == 401
        client = await allocate(server)  # the relay still serves the right credential
        await release(client)

    asyncio.run(scenario())


def test_the_session_quota_refuses_a_second_allocation_while_the_first_holds(start_relay: Any) -> None:
    server = start_relay(max_sessions=1)

    async def scenario() -> None:
        first = await allocate(server)
        assert await refusal(allocate(server)) == 486  # Allocation Quota Reached
        await release(first)
        await release(await allocate_when_free(server))  # coturn frees a deleted session on its next tick (~1 s)

    asyncio.run(scenario())


async def next_error(protocol: Recorder) -> int:
    error = await asyncio.wait_for(protocol.errors.get(), DEADLINE_S)
    assert isinstance(error, stun.TransactionFailed), error
    code = error.response.error_code
    assert code is not None
    return code


def test_private_ranges_and_loopback_are_refused_as_peers(start_relay: Any) -> None:
    server = start_relay()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as local_service:
        local_service.bind(("127.0.0.1", 0))
        local_service.settimeout(0.5)

        async def scenario() -> None:
            transport, protocol = await allocate(server)
            for peer in [("10.0.0.1", 9), ("192.168.1.1", 53), ("169.254.169.254", 80), local_service.getsockname()]:
                transport.sendto(b"to the operator's network", peer)
                assert await next_error(protocol) == 403, peer
            await release((transport, protocol))

        asyncio.run(scenario())
        with pytest.raises(TimeoutError):
            local_service.recv(100)


def test_two_clients_relay_to_each_other_in_an_allowed_lab_range(start_relay: Any) -> None:
    server = start_relay(allow_peer_ranges=("127.0.0.1/32",))

    async def scenario() -> None:
        a_transport, a = await allocate(server)
        b_transport, b = await allocate(server)
        a_address, b_address = a_transport.get_extra_info("sockname"), b_transport.get_extra_info("sockname")
        b_transport.sendto(b"permission for a", a_address)  # TURN drops data from peers without a permission
        a_transport.sendto(b"hello through the relay", b_address)
        data, sender = await asyncio.wait_for(b.received.get(), DEADLINE_S)
        assert (data, sender) == (b"hello through the relay", a_address)

        # A refused peer (a relay once stopped relaying after one) leaves the allowed path working.
        a_transport.sendto(b"x", ("10.0.0.1", 9))
        assert await next_error(a) == 403
        a_transport.sendto(b"still here", b_address)
        while (data := (await asyncio.wait_for(b.received.get(), DEADLINE_S))[0]) != b"still here":
            pass
        await release((a_transport, a), (b_transport, b))

    asyncio.run(scenario())


def test_a_rule_coturn_cannot_read_stops_the_test_instead_of_being_skipped(
    start_relay: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # coturn 4.6 logs a CIDR rule as an error and runs without it: a relay that looks fine but relays to 10/8.
    monkeypatch.setattr(
        turn_server,
        "render_turnserver_conf",
        lambda config: render_turnserver_conf(config) + "denied-peer-ip=10.0.0.0/8\n",
    )
    with pytest.raises(turn_server.TurnServerError, match="refused part of its configuration") as caught:
        start_relay()
    assert "Wrong address format: 10.0.0.0/8" in str(caught.value)


# ---------------------------------------------------------------- python -m peerinfer relay-config


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m peerinfer")
    add_relay_config_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["relay-config", *argv])


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run_relay_config(parse(argv), out, err)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["--external-ip", "203.0.113.10", "--port", "abc"], "--port 'abc' is not a whole number"),
        (["--external-ip", "203.0.113.10", "--port", "-5"], "--port '-5' is not a whole number"),
        (["--external-ip", "203.0.113.10", "--port", "99999"], "listening port 99999"),
        (["--external-ip", "203.0.113.10", "--max-sessions", "1e9"], "--max-sessions '1e9' is not a whole number"),
        (["--external-ip", "203.0.113.10", "--max-kbps-per-session", "0"], "--max-kbps-per-session 0"),
        (["--external-ip", "not-an-ip"], "not an IP address"),
        (["--external-ip", "203.0.113.10", "--password", "hunter2"], "16 to 128"),
        (["--external-ip", "203.0.113.10", "--min-port", "60000", "--max-port", "50000"], "is empty"),
        (["--external-ip", "203.0.113.10", "--allow-peer-range", "10.0.0.1/8"], "host bits"),
        ([], "--external-ip"),
    ],
)
def test_cli_bad_values_are_one_line_and_exit_2(argv: list[str], reason: str) -> None:
    code, out, err = run_cli(argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("relay-config: ") and reason in err


def test_cli_prints_the_config_and_the_client_line(start_relay: Any) -> None:
    low, high = relay_port_range()
    argv = ["--listen-ip", "127.0.0.1", "--relay-ip", "127.0.0.1", "--port", str(free_udp_port())]
    argv += ["--min-port", str(low), "--max-port", str(high), "--max-sessions", "5", "--max-kbps-per-session", "800"]
    code, out, err = run_cli(argv)
    assert code == 0
    config, generated = config_from_args(parse(argv))
    assert generated and "a new password was generated" in err
    assert "total-quota=5" in out.splitlines() and "max-bps=100000" in out.splitlines()
    assert "turnserver -c" in err and f"UDP {low}-{high}" in err

    [line] = [line for line in err.splitlines() if line.startswith("PEERINFER_ICE_SERVERS=")]
    [value] = shlex.split(line.removeprefix("PEERINFER_ICE_SERVERS="))
    servers = parse_ice_servers(value)
    turn = servers[0]
    host_port = turn.urls[0].removeprefix("turn:").split("?")[0]
    assert host_port == f"127.0.0.1:{config.port}"
    password = next(line for line in out.splitlines() if line.startswith("user=")).split(":", 1)[1]
    assert turn.credential == password

    # The relay that runs this configuration takes the printed credential.
    server = start_relay(**{**vars_of(config), "password": password})
    assert render_turnserver_conf(server.config) == out

    async def scenario() -> None:
        client = await asyncio.wait_for(
            create_turn_endpoint(Recorder, server.address, turn.username, turn.credential), DEADLINE_S
        )
        await release(client)

    asyncio.run(scenario())


def vars_of(config: RelayConfig) -> dict[str, Any]:
    return {name: getattr(config, name) for name in config.__dataclass_fields__}


def test_cli_output_file_is_private_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "relay.conf"
    code, out, err = run_cli(["--external-ip", "198.51.100.7", "--output", str(path)])
    assert code == 0 and out == ""
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and "lt-cred-mech" in path.read_text()
    assert f"turnserver -c {path}" in err
    code, out, err = run_cli(["--external-ip", "198.51.100.7", "--output", str(path)])
    assert code == 2 and "exists" in err


def test_cli_client_line_carries_the_given_credential() -> None:
    code, _, err = run_cli(["--external-ip", "198.51.100.7", "--password", PASSWORD, "--user", "volunteer"])
    assert code == 0
    value = shlex.split(err.splitlines()[-1].removeprefix("PEERINFER_ICE_SERVERS="))[0]
    assert json.loads(value)[0]["username"] == "volunteer"
    assert json.loads(value)[0]["credential"] == PASSWORD


# ---------------------------------------------------------------- the helper in a network namespace

RECEIVER = r"""
import socket, sys
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
    sock.bind((sys.argv[1], int(sys.argv[2])))
    sock.settimeout(float(sys.argv[3]))
    print("ready", flush=True)
    data, sender = sock.recvfrom(2048)
    print(data.decode(), sender[0], flush=True)
"""

LAB_CLIENT = r"""
import asyncio, json, sys
from aioice import stun
from aioice.turn import create_turn_endpoint
server, username, password = (sys.argv[1], int(sys.argv[2])), sys.argv[3], sys.argv[4]
allowed, denied = (sys.argv[5], int(sys.argv[6])), (sys.argv[7], 9)

class Errors(asyncio.DatagramProtocol):
    def __init__(self):
        self.errors = asyncio.Queue()
    def error_received(self, exc):
        self.errors.put_nowait(exc)

async def main():
    transport, protocol = await asyncio.wait_for(create_turn_endpoint(Errors, server, username, password), 10)
    transport.sendto(b"hello from the lab", allowed)
    transport.sendto(b"x", denied)
    error = await asyncio.wait_for(protocol.errors.get(), 10)
    code = error.response.error_code if isinstance(error, stun.TransactionFailed) else repr(error)
    print(json.dumps({"relayed": transport.get_extra_info("sockname")[0], "denied": code}))
    transport.close()
    await asyncio.sleep(0.3)

asyncio.run(main())
"""


def test_a_relay_in_a_namespace_relays_only_into_the_allowed_lab_range(tmp_path: Path) -> None:
    from tests.netns_lab import NetnsLab, unavailable

    reason = turn_server.unavailable() or unavailable()
    if reason:
        pytest.skip(reason)
    with NetnsLab() as lab:
        lan = lab.bridge("lan")
        relay_host = lab.host("relay", lan, "10.77.0.1/24")
        client = lab.host("client", lan, "10.77.0.2/24")
        peer = lab.host("peer", lan, "10.77.0.3/24")
        config = RelayConfig(
            listening_ips=("10.77.0.1",),
            relay_ips=("10.77.0.1",),
            password=PASSWORD,
            allow_peer_ranges=("10.77.0.0/24",),
        )
        server = TurnServer.start(config, popen=relay_host, workdir=tmp_path)
        try:
            receiver = peer.popen(
                [sys.executable, "-c", RECEIVER, "10.77.0.3", "5000", str(DEADLINE_S)], stdout=subprocess.PIPE
            )
            assert receiver.stdout is not None and receiver.stdout.readline().strip() == "ready"
            argv = [sys.executable, "-c", LAB_CLIENT, "10.77.0.1", str(config.port), config.username, PASSWORD]
            done = client.run([*argv, "10.77.0.3", "5000", "10.99.0.1"], DEADLINE_S * 2, env={**os.environ})
            assert done.returncode == 0, done.stderr[-2000:]
            assert json.loads(done.stdout.splitlines()[-1]) == {"relayed": "10.77.0.1", "denied": 403}
            out, _ = receiver.communicate(timeout=DEADLINE_S * 2)
            assert out.strip() == "hello from the lab 10.77.0.1"  # it came from the relay, not the client
        finally:
            server.stop()


def test_a_relay_with_no_allowed_ranges_relays_to_a_public_address(tmp_path: Path) -> None:
    """The deny list must not catch public IPv4 peers: coturn matches IPv4 peers against IPv6 ranges
    such as ::/96 too, and such a rule once made the relay refuse every IPv4 peer."""
    from tests.netns_lab import NetnsLab, unavailable

    reason = turn_server.unavailable() or unavailable()
    if reason:
        pytest.skip(reason)
    with NetnsLab() as lab:  # public addresses, but only between the lab's own namespaces
        lan = lab.bridge("lan")
        relay_host = lab.host("relay", lan, "11.0.0.1/24")
        client = lab.host("client", lan, "11.0.0.2/24")
        peer = lab.host("peer", lan, "11.0.0.3/24")
        config = RelayConfig(listening_ips=("11.0.0.1",), relay_ips=("11.0.0.1",), password=PASSWORD)
        server = TurnServer.start(config, popen=relay_host, workdir=tmp_path)
        try:
            receiver = peer.popen(
                [sys.executable, "-c", RECEIVER, "11.0.0.3", "5000", str(DEADLINE_S)], stdout=subprocess.PIPE
            )
            assert receiver.stdout is not None and receiver.stdout.readline().strip() == "ready"
            argv = [sys.executable, "-c", LAB_CLIENT, "11.0.0.1", str(config.port), config.username, PASSWORD]
            done = client.run([*argv, "11.0.0.3", "5000", "10.99.0.1"], DEADLINE_S * 2, env={**os.environ})
            assert done.returncode == 0, done.stderr[-2000:] + server.log()[-2000:]
            assert json.loads(done.stdout.splitlines()[-1]) == {"relayed": "11.0.0.1", "denied": 403}
            out, _ = receiver.communicate(timeout=DEADLINE_S * 2)
            assert out.strip() == "hello from the lab 11.0.0.1", server.log()[-3000:]
        finally:
            server.stop()


def test_python_m_peerinfer_relay_config_prints_a_config_coturn_reads() -> None:
    from peerinfer.network.cli import main as peerinfer_main

    out, err = io.StringIO(), io.StringIO()
    code = peerinfer_main(["relay-config", "--external-ip", "203.0.113.10", "--relay-ip", "203.0.113.10"], out, err)
    assert code == 0, err.getvalue()
    assert "lt-cred-mech" in out.getvalue() and "denied-peer-ip=10.0.0.0-10.255.255.255" in out.getvalue()
    line = next(text for text in err.getvalue().splitlines() if text.startswith("PEERINFER_ICE_SERVERS="))
    assert parse_ice_servers(shlex.split(line.partition("=")[2])[0])[0].is_turn
    assert peerinfer_main(["relay-config", "--external-ip", "nope"], io.StringIO(), err) == 2
