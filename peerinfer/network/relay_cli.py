"""``python3 -m peerinfer relay-config``: print a checked coturn configuration for a volunteer's TURN relay.

The configuration goes to stdout (or ``--output FILE``, created with mode 0600: it holds the password);
the matching ``PEERINFER_ICE_SERVERS`` line and how to run the relay go to stderr.
"""

from __future__ import annotations

import argparse
import os
import shlex
from typing import Any, TextIO

from peerinfer.errors import ConfigError
from peerinfer.network.relay_config import RelayConfig, ice_servers_json, render_turnserver_conf

EXIT_BAD_VALUE = 2
_NUMBERS = {
    "port": "--port",
    "min_port": "--min-port",
    "max_port": "--max-port",
    "max_sessions": "--max-sessions",
    "max_sessions_per_user": "--max-sessions-per-user",
    "max_kbps_per_session": "--max-kbps-per-session",
    "max_mbps_total": "--max-mbps-total",
    "max_lifetime": "--max-lifetime",
    "tls_port": "--tls-port",
}


def add_relay_config_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``relay-config`` subcommand on ``commands``."""
    defaults = RelayConfig()
    relay = commands.add_parser(
        "relay-config",
        help="print a checked coturn (turnserver) configuration for a TURN relay; see docs/relay.md",
        description="Print a coturn configuration for a peerinfer TURN relay on stdout, and the "
        "PEERINFER_ICE_SERVERS value for workers and clients on stderr.",
    )
    # Numbers are read as text and checked in run_relay_config, so that a bad one is one line, not usage.
    add = relay.add_argument
    add("--external-ip", help="the relay's public IP address, as clients reach it")
    add("--private-ip", help="with --external-ip: the private address a 1:1 NAT maps it to (cloud hosts)")
    add("--listen-ip", action="append", default=[], help="address to listen on (repeatable; default: all)")
    add("--relay-ip", action="append", default=[], help="address to relay from (repeatable; default: coturn's)")
    add("--server-name", help="the relay's DNS name, used in the ICE URLs instead of the address; needed for TLS")
    add("--realm", default=defaults.realm, help="long-term credential realm (default: %(default)s)")
    add("--user", default=defaults.username, help="the one TURN username (default: %(default)s)")
    add("--password", help="its password, 16+ characters (default: a new random one, printed on stderr)")
    add("--port", default=str(defaults.port), help="UDP and TCP listening port (default: %(default)s)")
    add("--min-port", default=str(defaults.min_port), help="lowest relay port (default: %(default)s)")
    add("--max-port", default=str(defaults.max_port), help="highest relay port (default: %(default)s)")
    add("--max-sessions", default=str(defaults.max_sessions), help="relayed sessions at once (default: %(default)s)")
    add("--max-sessions-per-user", help="sessions at once per username (default: --max-sessions)")
    add(
        "--max-kbps-per-session",
        default=str(defaults.session_bytes_per_s * 8 // 1000),
        help="kilobits per second per session and direction (default: %(default)s)",
    )
    add(
        "--max-mbps-total",
        default=str(defaults.total_bytes_per_s * 8 // 1_000_000),
        help="megabits per second for all sessions, per direction (default: %(default)s)",
    )
    add(
        "--max-lifetime",
        default=str(defaults.max_allocation_lifetime_s),
        help="longest allocation lifetime in seconds before a refresh (default: %(default)s)",
    )
    add("--tls-cert", help="PEM certificate for TURN over TLS (absolute path; with --tls-key and --server-name)")
    add("--tls-key", help="its PEM private key (absolute path)")
    add("--tls-port", default=str(defaults.tls_port), help="TLS listening port (default: %(default)s)")
    add(
        "--allow-peer-range",
        action="append",
        default=[],
        metavar="CIDR",
        help="LAB ONLY: let peers in this private range be relayed to (repeatable)",
    )
    add("--output", "-o", help="write the configuration to this new file (mode 0600) instead of stdout")


def _number(args: argparse.Namespace, name: str) -> int | None:
    value = getattr(args, name)
    if value is None:
        return None
    text = str(value).strip()
    if not text.isascii() or not text.isdigit() or len(text) > 12:
        raise ConfigError(f"{_NUMBERS[name]} {text[:40]!r} is not a whole number")
    return int(text)


def config_from_args(args: argparse.Namespace) -> tuple[RelayConfig, bool]:
    """The checked configuration, and whether its password was generated. Raises ``ConfigError``."""
    numbers = {name: _number(args, name) for name in _NUMBERS}
    options: dict[str, Any] = {
        "external_ip": args.external_ip,
        "external_private_ip": args.private_ip,
        "listening_ips": tuple(args.listen_ip),
        "relay_ips": tuple(args.relay_ip),
        "server_name": args.server_name,
        "realm": args.realm,
        "username": args.user,
        "port": numbers["port"],
        "min_port": numbers["min_port"],
        "max_port": numbers["max_port"],
        "max_sessions": numbers["max_sessions"],
        "max_sessions_per_user": numbers["max_sessions_per_user"],
        "max_allocation_lifetime_s": numbers["max_lifetime"],
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "tls_port": numbers["tls_port"],
        "allow_peer_ranges": tuple(args.allow_peer_range),
    }
    for name, key, bytes_per_unit in (
        ("max_kbps_per_session", "session_bytes_per_s", 125),
        ("max_mbps_total", "total_bytes_per_s", 125_000),
    ):
        value = numbers[name]
        if value is not None:
            if value < 1:
                raise ConfigError(f"{_NUMBERS[name]} {value} must be at least 1")
            options[key] = value * bytes_per_unit
    if args.password is not None:
        options["password"] = args.password
    return RelayConfig(**options), args.password is None


def _write_new_file(path: str, text: str) -> None:
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise ConfigError(f"--output {path!r} exists; remove it or choose another name") from exc
    except OSError as exc:
        raise ConfigError(f"--output {path!r}: {exc.strerror or exc}") from exc
    with os.fdopen(descriptor, "w") as file:
        file.write(text)


def run_relay_config(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Print the configuration on ``out`` and the client line on ``err``; a bad value is one line and exit 2."""
    try:
        config, generated = config_from_args(args)
        text = render_turnserver_conf(config)
        client_line = ice_servers_json(config)
        if args.output:
            _write_new_file(args.output, text)
    except ConfigError as exc:
        print(f"relay-config: {exc.message}", file=err)
        return EXIT_BAD_VALUE
    if not args.output:
        out.write(text)
    for warning in config.warnings():
        print(f"# warning: {warning}", file=err)
    if generated:
        print("# a new password was generated; it is in the configuration and in the line below", file=err)
    where = args.output or "relay.conf"
    ports = f"{config.min_port}-{config.max_port}"
    print(f"# run it: turnserver -c {shlex.quote(where)}   (keep the file private: it holds the password)", file=err)
    print(f"# open UDP {config.port} and TCP {config.port}, and UDP {ports} for the relayed traffic", file=err)
    print("# workers and clients that may use this relay set:", file=err)
    print(f"PEERINFER_ICE_SERVERS={shlex.quote(client_line)}", file=err)
    return 0
