"""LAN discovery benchmark: from a worker's start to its listing by ``--lan`` discovery.

    .venv/bin/python bench/bench_lan.py [--rounds 10] [--mode auto|netns|loopback]

Each round starts a fake-engine worker process with ``PEERINFER_LAN=1`` and measures, with a
client process that browses the LAN (``open_discovery(lan=True)``, ``Discovery``):

- start to listed: from launching the worker process (Python start, app, the fake engine's speed
  measurement, mDNS probing and announcement) to a client already browsing listing its verified
  record;
- cold client: from opening a fresh discovery to its first lookup listing the running worker (what
  ``peers --lan`` or a gateway started after the worker waits);
- stop to gone: from SIGTERM to the worker (withdrawal, then goodbye) to the browsing client no
  longer listing it.

``netns`` (needs root) puts the worker and the client in two network namespaces on one bridge:
real multicast over veths. ``loopback`` runs both on 127.0.0.1. ``auto``: netns when possible.
Prints a markdown table (median and p90, ms). Times are wall-clock between processes on one machine.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.netns_lab import Host, NetnsLab, unavailable  # noqa: E402

NET = 0x4C414E42  # "LANB"
PORT = 8000  # in the worker's own namespace; on loopback, a free port
LINE_TIMEOUT_S = 60.0
# The browsing client: prints READY, then LISTED/COLD/GONE lines with wall-clock times.
CLIENT = """
import sys, time
from peerinfer.network.records import DIRECTORY_KEY
from peerinfer.network.sources import open_discovery
net, interfaces = int(sys.argv[1]), tuple(a for a in sys.argv[2].split(",") if a)
def opened():
    return open_discovery(bootstrap="", lan=True, network_id=net, dht_host=None, timeout_s=30.0,
                          lan_interfaces=interfaces)
def listed(discovery):
    return bool(discovery.verified(DIRECTORY_KEY).records)
with opened() as browsing:
    browsing.discovery.verified(DIRECTORY_KEY)  # the first get: waits briefly for answers (there are none yet)
    print("READY", flush=True)
    while not listed(browsing.discovery):
        time.sleep(0.01)
    print("LISTED", time.time(), flush=True)
    started = time.time()
    with opened() as cold:
        records = cold.discovery.lookup().records
    print("COLD", time.time() - started if records else -1, flush=True)
    while listed(browsing.discovery):
        time.sleep(0.01)
    print("GONE", time.time(), flush=True)
"""


@dataclass
class Rounds:
    listed: list[float] = field(default_factory=list)
    cold: list[float] = field(default_factory=list)
    gone: list[float] = field(default_factory=list)


def read_line(process: subprocess.Popen[str], word: str) -> list[str]:
    """The next stdout line of ``process``, which must start with ``word`` (within LINE_TIMEOUT_S)."""
    assert process.stdout is not None
    deadline = time.monotonic() + LINE_TIMEOUT_S
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        parts = line.split()
        if parts and parts[0] == word:
            return parts
    raise RuntimeError(f"the client did not print {word} (exit {process.poll()})")


def spawn(host: Host | None, argv: list[str], **options: Any) -> subprocess.Popen[str]:
    if host is not None:
        return host.popen(argv, **options)
    return subprocess.Popen(argv, text=True, **options)


def one_round(worker_host: Host | None, client_host: Host | None, interfaces: str, home: Path) -> tuple[float, ...]:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PEERINFER_NETWORK_ID": str(NET),
        "PEERINFER_LAN_INTERFACES": interfaces,
        "PEERINFER_LOG_LEVEL": "WARNING",
        "PEERINFER_HOME": str(home),
        "PEERINFER_WITHDRAW_GRACE_S": "0.2",
        "NO_PROXY": "*",
    }
    port = PORT
    if worker_host is None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        env["PEERINFER_ANNOUNCE_URL"] = f"http://127.0.0.1:{port}"
    client = spawn(
        client_host, [sys.executable, "-c", CLIENT, str(NET), interfaces], cwd=REPO, env=env, stdout=subprocess.PIPE
    )
    worker: subprocess.Popen[str] | None = None
    try:
        read_line(client, "READY")
        started = time.time()
        worker = spawn(
            worker_host,
            [sys.executable, "-m", "tests.test_lan_netns", "serve", str(port)],
            cwd=REPO,
            env={**env, "PEERINFER_LAN": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        listed = float(read_line(client, "LISTED")[1]) - started
        cold = float(read_line(client, "COLD")[1])
        stopping = time.time()
        worker.send_signal(signal.SIGTERM)
        gone = float(read_line(client, "GONE")[1]) - stopping
        return listed, cold, gone
    finally:
        for process in (client, worker):
            if process is not None and process.poll() is None:
                process.kill()
            if process is not None:
                process.wait(timeout=10)


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--mode", choices=("auto", "netns", "loopback"), default="auto")
    args = parser.parse_args()
    reason = unavailable() if args.mode != "loopback" else "asked for loopback"
    if args.mode == "netns" and reason:
        print(f"netns mode: {reason}", file=sys.stderr)
        return 2
    mode = "loopback" if reason else "netns"
    rounds = Rounds()
    with tempfile.TemporaryDirectory() as tmp, NetnsLab() as lab:
        worker_host = client_host = None
        interfaces = "127.0.0.1"
        if mode == "netns":
            lan = lab.bridge("lan")
            worker_host = lab.host("worker", lan, "10.78.0.1/24")
            client_host = lab.host("client", lan, "10.78.0.2/24")
            interfaces = ""  # every interface, as a real machine
        for index in range(args.rounds):
            listed, cold, gone = one_round(worker_host, client_host, interfaces, Path(tmp) / "home")
            rounds.listed.append(listed)
            rounds.cold.append(cold)
            rounds.gone.append(gone)
            print(
                f"round {index + 1}: listed {listed * 1000:.0f} ms, cold {cold * 1000:.0f} ms, "
                f"gone {gone * 1000:.0f} ms",
                file=sys.stderr,
            )
    print(f"\nLAN discovery ({mode}, {args.rounds} rounds; one fake-engine worker)\n")
    print("| measurement | median ms | p90 ms | min ms | max ms |")
    print("|---|---|---|---|---|")
    for name, values in (
        ("worker start to listed (client browsing)", rounds.listed),
        ("cold client: open + first lookup", rounds.cold),
        ("SIGTERM to gone (withdrawal + goodbye)", rounds.gone),
    ):
        ms = [value * 1000 for value in values]
        print(f"| {name} | {statistics.median(ms):.0f} | {p90(ms):.0f} | {min(ms):.0f} | {max(ms):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
