"""A volunteer's TURN relay: a checked coturn 4.6 configuration and its ``PEERINFER_ICE_SERVERS``. Pure.

A relay forwards UDP for peers that cannot reach each other, so whoever holds its credential can
make it send packets to any address it allows. The rendered configuration therefore denies every
address that is not reachable on the public internet (``DENIED_PEER_RANGES``: the operator's LAN,
loopback, link-local cloud metadata, multicast, IPv6 forms that embed an IPv4 address), and only
``allow_peer_ranges`` (for labs and tests) opens any of them again; in coturn an allowed address
wins over a denied one. coturn 4.6 reads ranges as ``first-last``, not CIDR: a CIDR line is logged
as a "Wrong address format" error and silently not enforced, so ranges are rendered as ``first-last``.

Limits map to coturn's options: ``max_sessions`` is ``total-quota``, ``max_sessions_per_user``
``user-quota``, ``session_bytes_per_s`` ``max-bps`` (each direction of one allocation) and
``total_bytes_per_s`` ``bps-capacity`` (all allocations together).
"""

from __future__ import annotations

import ipaddress
import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from peerinfer.errors import ConfigError

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# (range, why): every range a relay must not send into. The reasons are repeated in docs/relay.md.
DENIED_PEER_RANGES: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "'this network'; 0.0.0.0 reaches the relay host itself on Linux"),
    ("10.0.0.0/8", "private (RFC 1918): the operator's LAN"),
    ("100.64.0.0/10", "carrier-grade NAT space: the provider's side of the operator's line"),
    ("127.0.0.0/8", "loopback: services on the relay host"),
    ("169.254.0.0/16", "link-local, including cloud metadata at 169.254.169.254"),
    ("172.16.0.0/12", "private (RFC 1918)"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation (TEST-NET-1), not routed"),
    ("192.168.0.0/16", "private (RFC 1918): home routers and LANs"),
    ("198.18.0.0/15", "benchmarking, used inside some networks"),
    ("198.51.100.0/24", "documentation (TEST-NET-2), not routed"),
    ("203.0.113.0/24", "documentation (TEST-NET-3), not routed"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved, and 255.255.255.255 broadcast"),
    # Not ::/96: coturn 4.6 matches IPv4 peers against that range too, so it refused every IPv4 peer.
    ("::/127", "the unspecified address :: and loopback ::1"),
    ("::ffff:0:0/96", "IPv4-mapped: ::ffff:10.0.0.1 would bypass the IPv4 rules"),
    ("64:ff9b::/96", "NAT64: a NAT64 gateway would carry it to the embedded IPv4 address"),
    ("64:ff9b:1::/48", "local-use NAT64"),
    ("100::/64", "discard-only"),
    ("2001::/32", "Teredo: embeds an IPv4 address"),
    ("2001:db8::/32", "documentation, not routed"),
    ("2002::/16", "6to4: embeds an IPv4 address (2002:0a00:: is 10.0.0.0)"),
    ("3fff::/20", "documentation, not routed"),
    ("fc00::/7", "unique local: the IPv6 LAN"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local (deprecated), still a LAN"),
    ("ff00::/8", "multicast"),
)

USERNAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
PASSWORD = re.compile(r"[A-Za-z0-9._~-]{16,128}")
REALM = re.compile(r"[A-Za-z0-9.-]{1,127}")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOST_NAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*")
PATH = re.compile(r"/[A-Za-z0-9._/+@%-]{1,1023}")
MIN_DISTINCT_PASSWORD_CHARS = 8
_LOOPBACK_V4 = ipaddress.IPv4Network("127.0.0.0/8")
_LOOPBACK_V6 = ipaddress.IPv6Network("::1/128")
NEW_PASSWORD = "python3 -c 'import secrets; print(secrets.token_urlsafe(24))'"


def new_password() -> str:
    """32 URL-safe characters from ``secrets``: what a relay gets when its operator gives none."""
    return secrets.token_urlsafe(24)


@dataclass(frozen=True)
class RelayConfig:
    """One coturn relay: where it listens, its one long-term credential and its limits. Checked when made.

    ``external_ip`` is the public address clients are told (coturn's ``external-ip``); with
    ``external_private_ip`` the relay sits behind a 1:1 NAT that maps that public address to this
    private one. ``server_name`` (a DNS name) replaces the address in the ICE URLs and is needed
    for TLS. ``allow_peer_ranges`` re-opens denied ranges: for labs and tests only, never on a
    relay on the internet.
    """

    external_ip: str | None = None
    external_private_ip: str | None = None
    listening_ips: tuple[str, ...] = ()
    relay_ips: tuple[str, ...] = ()
    server_name: str | None = None
    realm: str = "peerinfer"
    username: str = "peerinfer"
    password: str = field(default_factory=new_password, repr=False)
    port: int = 3478
    min_port: int = 49152
    max_port: int = 65535
    max_sessions: int = 64
    max_sessions_per_user: int | None = None
    session_bytes_per_s: int = 62_500
    total_bytes_per_s: int = 6_250_000
    max_allocation_lifetime_s: int = 3600
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_port: int = 5349
    allow_peer_ranges: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def user_quota(self) -> int:
        return self.max_sessions if self.max_sessions_per_user is None else self.max_sessions_per_user

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def public_host(self) -> str:
        """The host clients dial: ``server_name``, else ``external_ip``, else the first listening address."""
        listening = [ip for ip in self.listening_ips if not ipaddress.ip_address(ip).is_unspecified]
        host = self.server_name or self.external_ip or (listening[0] if listening else None)
        if host is None:
            raise ConfigError(
                "the relay has no address to give clients; set its public address (--external-ip 203.0.113.10) "
                "or its DNS name (--server-name relay.example.org)"
            )
        return f"[{host}]" if ":" in host else host

    def warnings(self) -> list[str]:
        """What works but is probably a mistake on a relay meant for the internet."""
        found = []
        if self.external_ip is not None and not ipaddress.ip_address(self.external_ip).is_global:
            found.append(
                f"external IP {self.external_ip} is not a public address; clients outside this network cannot "
                "reach it (fine in a lab)"
            )
        if self.allow_peer_ranges:
            found.append(
                f"peers in {', '.join(self.allow_peer_ranges)} are allowed: anyone holding the credential can make "
                "this relay send there; use it in labs and tests only"
            )
        return found


def _address(value: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | str:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return f"{what} {value[:60]!r} is not an IP address such as 203.0.113.10 or 2001:db8::10"


def _port_problem(value: int, what: str, low: int = 1) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 65535:
        return f"{what} {value!r} is not a port number from {low} to 65535"
    return None


def _limit_problem(value: int, what: str, high: int, hint: str, low: int = 1) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        return f"{what} {value!r} must be a whole number from {low} to {high}; {hint}"
    return None


def _network(value: str) -> IpNetwork | str:
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        return f"allowed peer range {value[:60]!r} is not a network such as 10.77.0.0/24 ({exc})"


def _credential_problems(config: RelayConfig) -> list[str]:
    problems = []
    if not isinstance(config.username, str) or not USERNAME.fullmatch(config.username):
        problems.append(
            f"username {str(config.username)[:40]!r} must be 1 to 64 letters, digits, '.', '_' or '-' (coturn's "
            "configuration and STUN's USERNAME carry it as it is)"
        )
    if not isinstance(config.realm, str) or not REALM.fullmatch(config.realm):
        problems.append(f"realm {str(config.realm)[:40]!r} must be 1 to 127 letters, digits, '.' or '-'")
    password = config.password if isinstance(config.password, str) else ""
    if not PASSWORD.fullmatch(password):
        problems.append(
            f"the password must be 16 to 128 letters, digits, '.', '_', '~' or '-' (it has {len(password)} "
            f"characters); leave it out to have one generated, or make one with {NEW_PASSWORD}"
        )
    elif len(set(password)) < MIN_DISTINCT_PASSWORD_CHARS or str(config.username) in password:
        problems.append(
            "the password is weak (few distinct characters, or it holds the username); leave it out to have one "
            f"generated, or make one with {NEW_PASSWORD}"
        )
    return problems


def _address_problems(config: RelayConfig) -> list[str]:
    problems = []
    named = [(config.external_ip, "external IP"), (config.external_private_ip, "external private IP")]
    named += [(ip, "listening IP") for ip in config.listening_ips] + [(ip, "relay IP") for ip in config.relay_ips]
    for value, what in named:
        if value is not None:
            checked = _address(value, what) if isinstance(value, str) else f"{what} {value!r} is not text"
            if isinstance(checked, str):
                problems.append(checked)
    if config.external_private_ip is not None and config.external_ip is None:
        problems.append("an external private IP maps a public one; give the external IP too")
    if config.server_name is not None and not HOST_NAME.fullmatch(str(config.server_name)):
        problems.append(f"server name {str(config.server_name)[:60]!r} is not a DNS name such as relay.example.org")
    for value in config.allow_peer_ranges:
        network = _network(value) if isinstance(value, str) else f"allowed peer range {value!r} is not text"
        if isinstance(network, str):
            problems.append(network)
    return problems


def _limit_problems(config: RelayConfig) -> list[str]:
    problems = [
        _port_problem(config.port, "listening port"),
        _port_problem(config.min_port, "lowest relay port", 1024),
        _port_problem(config.max_port, "highest relay port", 1024),
        _port_problem(config.tls_port, "TLS port"),
        _limit_problem(config.max_sessions, "max sessions", 100_000, "it caps relayed sessions at once"),
        _limit_problem(config.session_bytes_per_s, "bytes/s per session", 10**10, "a stream needs a few KB/s"),
        _limit_problem(config.total_bytes_per_s, "total bytes/s", 10**11, "set it below your uplink"),
        _limit_problem(config.max_allocation_lifetime_s, "max allocation lifetime (s)", 86_400, "3600 is usual", 60),
    ]
    if config.max_sessions_per_user is not None:
        problems.append(_limit_problem(config.max_sessions_per_user, "max sessions per user", 100_000, "or leave out"))
    found = [problem for problem in problems if problem is not None]
    if found:
        return found
    if config.min_port > config.max_port:
        found.append(f"relay port range {config.min_port}-{config.max_port} is empty; the lowest port comes first")
    elif config.max_port - config.min_port + 1 < config.max_sessions:
        found.append(
            f"relay ports {config.min_port}-{config.max_port} hold fewer than {config.max_sessions} sessions "
            "(one port each); widen the range or lower max sessions"
        )
    for port, what in ((config.port, "listening port"), (config.tls_port if config.tls else None, "TLS port")):
        if port is not None and config.min_port <= port <= config.max_port:
            found.append(f"{what} {port} lies in the relay port range {config.min_port}-{config.max_port}")
    if config.user_quota > config.max_sessions:
        found.append(f"max sessions per user {config.user_quota} is above max sessions {config.max_sessions}")
    if config.session_bytes_per_s > config.total_bytes_per_s:
        found.append(f"bytes/s per session {config.session_bytes_per_s} is above the total {config.total_bytes_per_s}")
    return found


def _tls_problems(config: RelayConfig) -> list[str]:
    if (config.tls_cert is None) != (config.tls_key is None):
        return ["TLS needs both a certificate and its key (--tls-cert and --tls-key), or neither"]
    if config.tls_cert is None:
        return []
    problems = [
        f"{what} {str(path)[:80]!r} must be an absolute path of letters, digits and ./_+@%-"
        for path, what in ((config.tls_cert, "TLS certificate"), (config.tls_key, "TLS key"))
        if not isinstance(path, str) or not PATH.fullmatch(path)
    ]
    if config.server_name is None:
        problems.append("TLS needs the name its certificate is for; give --server-name relay.example.org")
    return problems


def _problems(config: RelayConfig) -> list[str]:
    return _credential_problems(config) + _address_problems(config) + _limit_problems(config) + _tls_problems(config)


def coturn_range(network: IpNetwork) -> str:
    """coturn 4.6's form of a range: ``first-last``, or the one address."""
    if network.num_addresses == 1:
        return str(network.network_address)
    return f"{network.network_address}-{network.broadcast_address}"


def _allows_loopback(networks: list[IpNetwork]) -> bool:
    """coturn refuses loopback peers unless ``allow-loopback-peers`` is set, whatever ``allowed-peer-ip`` says."""
    return any(
        net.overlaps(_LOOPBACK_V4) if isinstance(net, ipaddress.IPv4Network) else net.overlaps(_LOOPBACK_V6)
        for net in networks
    )


def render_turnserver_conf(config: RelayConfig) -> str:
    """The ``turnserver.conf`` text for ``config``; every option name is coturn 4.6.1's."""
    lines = ["# coturn relay for peerinfer, made by 'python3 -m peerinfer relay-config'; see docs/relay.md", ""]
    lines += [f"listening-ip={ip}" for ip in config.listening_ips]
    lines += [f"relay-ip={ip}" for ip in config.relay_ips]
    if config.external_ip is not None:
        mapped = f"/{config.external_private_ip}" if config.external_private_ip else ""
        lines.append(f"external-ip={config.external_ip}{mapped}")
    lines += [f"listening-port={config.port}", f"min-port={config.min_port}", f"max-port={config.max_port}"]
    if config.tls:
        lines += [f"tls-listening-port={config.tls_port}", f"cert={config.tls_cert}", f"pkey={config.tls_key}"]
        lines += ["no-tlsv1", "no-tlsv1_1"]
    else:
        lines += ["no-tls", "no-dtls"]
    lines += [
        "",
        "# one long-term credential; clients list it in PEERINFER_ICE_SERVERS",
        "lt-cred-mech",
        f"realm={config.realm}",
        f"user={config.username}:{config.password}",
        "fingerprint",
        "stale-nonce=600",
        "",
        "# limits",
        f"total-quota={config.max_sessions}",
        f"user-quota={config.user_quota}",
        f"max-bps={config.session_bytes_per_s}",
        f"bps-capacity={config.total_bytes_per_s}",
        f"max-allocate-lifetime={config.max_allocation_lifetime_s}",
        "",
        "# less to abuse: UDP relays only, no admin console, small STUN answers, no version string",
        "no-tcp-relay",
        "no-cli",
        "no-rfc5780",
        "no-stun-backward-compatibility",
        "response-origin-only-with-rfc5780",
        "no-software-attribute",
        "no-multicast-peers",
        "",
        "# peers the relay never sends to: every range that is not on the public internet",
    ]
    lines += [f"denied-peer-ip={coturn_range(net)}" for net in denied_ranges(config)]
    allowed = [ipaddress.ip_network(net) for net in config.allow_peer_ranges]
    if allowed:
        lines += ["", "# LAB ONLY: re-opened ranges (an allowed address wins over a denied one)"]
        lines += [f"allowed-peer-ip={coturn_range(net)}" for net in allowed]
        if _allows_loopback(allowed):
            lines.append("allow-loopback-peers")
    lines += ["", "log-file=stdout", "simple-log", ""]
    return "\n".join(lines)


def relayed_families(config: RelayConfig) -> set[int]:
    """The IP versions the relay relays: its relay IPs', else its public and listening addresses', else IPv4."""
    named = list(config.relay_ips) or [ip for ip in (config.external_ip, *config.listening_ips) if ip is not None]
    families: set[int] = {
        ipaddress.ip_address(ip).version for ip in named if not ipaddress.ip_address(ip).is_unspecified
    }
    return families or {4}


def denied_ranges(config: RelayConfig) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The ``DENIED_PEER_RANGES`` of the relayed family.

    coturn 4.6.1 matches an IPv4 peer against IPv6 ranges too (measured: 11.0.0.3 was refused as
    "in the range ::-::1"), so a relay with IPv6 rules refuses every IPv4 peer. One relay therefore
    relays one family, and gets that family's rules only.
    """
    families = relayed_families(config)
    if len(families) > 1:
        raise ConfigError(
            "this relay would relay IPv4 and IPv6; coturn 4.6 checks IPv4 peers against IPv6 deny rules and then "
            "refuses them all, so run one relay per family: give --relay-ip addresses of one family"
        )
    networks = [ipaddress.ip_network(net) for net, _ in DENIED_PEER_RANGES]
    return [net for net in networks if net.version in families]


def ice_servers(config: RelayConfig) -> list[dict[str, Any]]:
    """The relay as WebRTC ``iceServers`` entries: STUN, TURN over UDP and TCP, and TURN over TLS if it has TLS."""
    host = config.public_host
    turn = [f"turn:{host}:{config.port}?transport=udp", f"turn:{host}:{config.port}?transport=tcp"]
    if config.tls:
        turn.append(f"turns:{host}:{config.tls_port}?transport=tcp")
    return [
        {"urls": turn, "username": config.username, "credential": config.password},
        {"urls": [f"stun:{host}:{config.port}"]},
    ]


def ice_servers_json(config: RelayConfig) -> str:
    """``ice_servers(config)`` as the one-line JSON that ``PEERINFER_ICE_SERVERS`` takes."""
    return json.dumps(ice_servers(config), separators=(",", ":"))
