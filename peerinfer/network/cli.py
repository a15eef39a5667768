"""``python3 -m peerinfer``: run a bootstrap node or the gateway, list the verified peers, or print a relay's config."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, TextIO

from peerinfer.client.peer_http import PeerRejected
from peerinfer.client.routing import ICE_PROBE_S, endpoint_for
from peerinfer.client.transport import Tunnels, WorkerHttp
from peerinfer.client.tunnels import IceOptions, ice_tunnels
from peerinfer.client.vetting import prove_key, vet_peer
from peerinfer.errors import PeerInferError
from peerinfer.gateway.cli import add_gateway_parser, run_gateway
from peerinfer.network.dht import DhtNode
from peerinfer.network.dialback_server import DialbackServer
from peerinfer.network.records import DIRECTORY_KEY, PeerRecord, is_ice_endpoint, model_key
from peerinfer.network.relay_cli import add_relay_config_parser, run_relay_config
from peerinfer.network.sources import open_discovery
from peerinfer.settings import ClientSettings


def build_parser(settings: ClientSettings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python3 -m peerinfer", description="peerinfer network tools")
    commands = parser.add_subparsers(dest="command", required=True)
    boot = commands.add_parser("bootstrap", help="run a stand-alone DHT bootstrap node until interrupted")
    boot.add_argument(
        "--port", type=int, default=4222, help="UDP port, and the dial-back's TCP port (default: %(default)s)"
    )
    boot.add_argument("--host", default=settings.dht_host or "0.0.0.0", help="address to bind (default: %(default)s)")
    boot.add_argument(
        "--no-dialback",
        action="store_true",
        help="do not serve POST /peer/dialback on TCP (workers then cannot learn here whether they are reachable)",
    )
    peers = commands.add_parser("peers", help="list the verified peers on the network")
    peers.add_argument(
        "--bootstrap", default=settings.bootstrap, help="host:port of a DHT node (default: $PEERINFER_BOOTSTRAP)"
    )
    peers.add_argument(
        "--lan",
        action="store_true",
        default=settings.lan,
        help="find workers on this LAN (mDNS), with or without a bootstrap",
    )
    peers.add_argument("--sha256", default=None, help="only peers serving this model file")
    peers.add_argument("--model", default=None, help="only peers serving a model of this name")
    peers.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    peers.add_argument("--min-peers", type=int, default=1, help="wait until this many are found (default: 1)")
    peers.add_argument("--timeout", type=float, default=5.0, help="most seconds to wait for them (default: 5)")
    add_gateway_parser(commands)
    add_relay_config_parser(commands)
    for sub in (boot, peers):
        sub.add_argument("--network-id", type=int, default=settings.network_id, help="private DHT network id")
    return parser


def run_bootstrap(args: argparse.Namespace, err: TextIO) -> int:
    node = DhtNode(host=args.host, port=args.port, network_id=args.network_id)
    dialback = None if args.no_dialback else _start_dialback(args.host, node.port, err)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):  # before the line that says it runs: a script may stop it then
        signal.signal(signum, lambda *_: stop.set())
    print(f"bootstrap node on udp {args.host}:{node.port} (network {args.network_id:#x}); Ctrl-C stops it", file=err)
    try:
        stop.wait()
    finally:
        if dialback is not None:
            dialback.stop()
        node.close()
    return 0


def _start_dialback(host: str, port: int, err: TextIO) -> DialbackServer | None:
    """The dial-back service on TCP ``host:port``; without it (port taken) the node still serves the DHT."""
    try:
        server = DialbackServer.listen(host, port)
    except OSError as exc:
        print(
            f"warning: cannot serve the dial-back on tcp {host}:{port} ({exc.strerror or exc}); workers will not "
            "learn here whether they are reachable. Free that TCP port, or pass --no-dialback",
            file=err,
        )
        return None
    print(f"dial-back service on tcp {host}:{port} (POST /peer/dialback)", file=err)
    return server


@dataclass(frozen=True)
class PeerCheck:
    """What ``peers`` found out about a listed peer itself: its /health round trip, its key and its path."""

    rtt_ms: float | None
    verified: bool
    failure: str | None = None
    endpoint: str | None = None
    path: str | None = None


async def check_peer(http: WorkerHttp, record: PeerRecord, timeout_s: float = 2.0) -> PeerCheck:
    """Probe ``/health`` and ask for the signed nonce, within ``timeout_s`` in all. Never raises.

    A direct endpoint comes first; when none can be reached, the ``ice://`` one is opened (in the
    tunnels' own time limit) and probed.
    """
    unreachable: set[str] = set()
    while True:
        endpoint = endpoint_for(record.endpoints, can_tunnel=http.can_tunnel, unreachable=unreachable)
        check = await _check_endpoint(http, record, endpoint, timeout_s)
        if check.verified or check.failure not in ("unreachable", "timeout") or is_ice_endpoint(endpoint):
            return check
        unreachable.add(endpoint)
        if endpoint_for(record.endpoints, can_tunnel=http.can_tunnel, unreachable=unreachable) == endpoint:
            return check


async def _check_endpoint(http: WorkerHttp, record: PeerRecord, endpoint: str, timeout_s: float) -> PeerCheck:
    ice = is_ice_endpoint(endpoint)
    if ice:  # as the router does: room for a resent packet, and one more try on a new path's first stall
        timeout_s = max(timeout_s, ICE_PROBE_S)
    try:
        if not http.is_open(endpoint):
            await http.prepare(endpoint)
        deadline = time.monotonic() + timeout_s
        try:
            probe = await vet_peer(http, record, deadline=deadline, challenge=False, endpoint=endpoint)
        except PeerRejected as exc:
            if not ice or exc.reason != "timeout":
                raise
            deadline = time.monotonic() + timeout_s
            probe = await vet_peer(http, record, deadline=deadline, challenge=False, endpoint=endpoint)
    except PeerRejected as exc:
        return PeerCheck(None, False, f"{exc.reason}: {exc.detail}"[:300], endpoint, http.path(endpoint))
    rtt_ms = round(probe.rtt_s * 1000, 1)
    try:
        await prove_key(http, record, deadline=deadline, endpoint=endpoint)
    except PeerRejected as exc:
        return PeerCheck(rtt_ms, False, exc.reason, endpoint, http.path(endpoint))
    return PeerCheck(rtt_ms, True, None, endpoint, http.path(endpoint))


async def check_peers(records: list[PeerRecord], tunnels: Tunnels | None = None) -> list[PeerCheck]:
    """Every record's check, at once, over one connection pool (and ICE paths, with ``tunnels``)."""
    http = WorkerHttp(tunnels=tunnels)
    try:
        return list(await asyncio.gather(*(check_peer(http, record) for record in records)))
    finally:
        await http.aclose()


def describe(record: PeerRecord, check: PeerCheck, now: float) -> dict[str, Any]:
    return {
        "id": record.peer_id,
        "endpoint": check.endpoint or record.endpoints[0],
        "endpoints": list(record.endpoints),
        "path": check.path,
        "model": record.model,
        "sha256": record.sha256,
        "slots_free": record.slots_free,
        "slots_total": record.slots_total,
        "queue": record.queue,
        "rtt_ms": check.rtt_ms,
        "verified": check.verified,
        "failure": check.failure,
        "tokens_per_s": record.tokens_per_s,
        "age_s": round(record.age_s(now), 1),
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ["ID", "ENDPOINT", "PATH", "MODEL", "SLOTS", "RTT_MS", "VERIFIED", "TOKENS/S", "AGE_S"]
    lines = [header] + [
        [
            row["id"][:12],
            row["endpoint"] if len(row["endpoint"]) <= 40 else row["endpoint"][:30] + "...",
            row["path"] or "-",
            row["model"],
            f"{row['slots_free']}/{row['slots_total']}",
            "down" if row["rtt_ms"] is None else f"{row['rtt_ms']:.1f}",
            "yes" if row["verified"] else "no",
            f"{row['tokens_per_s']:.1f}",
            f"{row['age_s']:.0f}",
        ]
        for row in rows
    ]
    widths = [max(len(line[col]) for line in lines) for col in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def run_peers(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    settings = ClientSettings()
    opened = open_discovery(
        bootstrap=args.bootstrap,
        lan=args.lan,
        network_id=args.network_id,
        dht_host=settings.dht_host,
        lan_interfaces=settings.lan_interfaces,
        timeout_s=args.timeout,
    )
    try:
        discovery = opened.discovery
        key = model_key(args.sha256) if args.sha256 else DIRECTORY_KEY
        deadline = time.monotonic() + args.timeout
        while True:
            found = discovery.verified(key)
            records = [r for r in found.records if args.model is None or r.model == args.model]
            if len(records) >= args.min_peers or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        # The DHT node stays up for the checks: it carries the offers and answers of ICE paths.
        checks = asyncio.run(check_peers(records, ice_tunnels(opened.signalling, IceOptions.from_settings(settings))))
    finally:
        opened.close()
    now = time.time()
    rows = [describe(record, check, now) for record, check in zip(records, checks, strict=True)]
    if args.json:
        print(json.dumps(rows, indent=2), file=out)
    else:
        print(format_table(rows), file=out)
    unverified = sum(not check.verified for check in checks)
    if unverified:
        print(
            f"{unverified} listed peers did not prove they hold their record's key (VERIFIED no): do not trust them",
            file=err,
        )
    rejected = opened.rejected
    if rejected:
        print(f"dropped {sum(rejected.values())} invalid records: {dict(rejected)}", file=err)
    return 0 if records else 1


def main(argv: list[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    args = build_parser(ClientSettings()).parse_args(argv)
    try:
        if args.command == "relay-config":
            return run_relay_config(args, out, err)
        if args.command == "gateway":
            return run_gateway(args, err)
        if args.command == "bootstrap":
            return run_bootstrap(args, err)
        return run_peers(args, out, err)
    except PeerInferError as exc:
        print(f"error: {exc.message}", file=err)
        return 2
