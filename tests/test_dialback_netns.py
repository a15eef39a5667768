"""The dial-back through a real NAT (tests/nat_lab.py): a public worker lists its URL, one behind NAT only ice://.

The bootstrap (``python -m peerinfer bootstrap``) runs on ``public`` (198.51.100.1); two fake-engine
workers start as a user starts one, ``uvicorn ... --host 0.0.0.0 --port 8000``, with no
PEERINFER_ANNOUNCE_URL: one on ``public_worker`` (198.51.100.2), one on ``home`` (192.168.1.2,
behind ``home_router`` 198.51.100.11, which drops new connections from outside). Another host reads
their records from the DHT. Needs root, iproute2 and iptables.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.nat_lab import REPO, NatLab, nat_lab_or_skip
from tests.netns_lab import Host

BOOTSTRAP = "198.51.100.1:4222"
PORT = 8000
START_TIMEOUT_S = 30.0
RECORDS_TIMEOUT_S = 60.0
PEER_LINE = re.compile(r"peer ([0-9a-f]{40}): DHT node on udp")

# Run on a host of the lab: prints {peer id: endpoints} of the live records on the network in argv[1].
READ_RECORDS = """
import json, sys, time
from peerinfer.network.dht import DhtNode
from peerinfer.network.records import DIRECTORY_KEY, select_live
node = DhtNode(host="0.0.0.0", port=0, network_id=int(sys.argv[1]), bootstrap=[("198.51.100.1", 4222)])
try:
    time.sleep(1.0)
    found = select_live(node.get(DIRECTORY_KEY, 5.0), time.time())
    print(json.dumps({record.peer_id: list(record.endpoints) for record in found.records}))
finally:
    node.close()
"""


@pytest.fixture
def lab() -> Iterator[NatLab]:
    reason = nat_lab_or_skip()
    if reason is not None:
        pytest.skip(reason)
    with NatLab() as built:
        yield built


def clean_env(**values: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PEERINFER_")}
    return {**env, "PYTHONPATH": str(REPO), **values}


def start_worker(host: Host, home: Path, network_id: int, log: Path) -> None:
    env = clean_env(
        PEERINFER_BOOTSTRAP=BOOTSTRAP,
        PEERINFER_NETWORK_ID=str(network_id),
        PEERINFER_HOME=str(home),
        PEERINFER_LOG_LEVEL="INFO",
        PEERINFER_RECORD_LIFETIME_S="30",
        PEERINFER_RECORD_REFRESH_S="1",
        PEERINFER_EXIT_ON_LOAD_FAILURE="0",
    )
    argv = [sys.executable, "-m", "uvicorn", "tests.fake_worker_app:app", "--host", "0.0.0.0", "--port", str(PORT)]
    argv += ["--log-level", "warning"]
    with log.open("w") as out:
        host.popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def read_records(host: Host, network_id: int) -> dict[str, list[str]]:
    done = host.run([sys.executable, "-c", READ_RECORDS, str(network_id)], 30, cwd=REPO, env=clean_env())
    if done.returncode != 0:
        return {}
    try:
        value = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {}
    return value if isinstance(value, dict) else {}


def peer_id_in(log: Path) -> str | None:
    found = PEER_LINE.search(log.read_text(errors="replace"))
    return found.group(1) if found else None


def wait_for(what: str, condition: object, timeout_s: float, *logs: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not callable(condition) or not condition():
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {log.name}:\n{log.read_text(errors='replace')[-3000:]}" for log in logs)
            raise AssertionError(f"{what} within {timeout_s:.0f} s\n{tails}")
        time.sleep(0.5)


def start_bootstrap(lab: NatLab, tmp_path: Path) -> int:
    """``python -m peerinfer bootstrap`` on ``public``; returns its network id once it listens."""
    network_id = 0x50490000 + os.getpid() % 0xFFFF
    boot_log = tmp_path / "bootstrap.log"
    with boot_log.open("w") as out:
        lab.public.popen(
            [sys.executable, "-m", "peerinfer", "bootstrap", "--port", "4222", "--network-id", str(network_id)],
            cwd=REPO,
            env=clean_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    wait_for("the bootstrap did not start", lambda: "bootstrap node on udp" in boot_log.read_text(), 30, boot_log)
    assert "dial-back service on tcp 0.0.0.0:4222" in boot_log.read_text()
    return network_id


def test_a_public_worker_lists_its_url_and_one_behind_nat_only_ice(lab: NatLab, tmp_path: Path) -> None:
    network_id = start_bootstrap(lab, tmp_path)

    public_log, home_log = tmp_path / "public_worker.log", tmp_path / "home_worker.log"
    start_worker(lab.public_worker, tmp_path / "public_home", network_id, public_log)
    start_worker(lab.home, tmp_path / "home_home", network_id, home_log)
    wait_for("the workers did not join the DHT", lambda: peer_id_in(public_log) and peer_id_in(home_log), 30)
    public_id, home_id = peer_id_in(public_log), peer_id_in(home_log)
    assert public_id and home_id

    expected = {public_id: [f"http://198.51.100.2:{PORT}", f"ice://{public_id}"], home_id: [f"ice://{home_id}"]}
    seen: dict[str, list[str]] = {}

    def listed() -> bool:
        seen.update(read_records(lab.client, network_id))
        return all(seen.get(peer) == endpoints for peer, endpoints in expected.items())

    wait_for(f"the records did not list {expected} (last seen {seen})", listed, RECORDS_TIMEOUT_S, public_log, home_log)

    public_text, home_text = public_log.read_text(), home_log.read_text()
    assert "reachable from outside (bootstrap 198.51.100.1:4222 connected to http://198.51.100.2:8000)" in public_text
    assert "not reachable from outside" in home_text and f"198.51.100.11:{PORT}" in home_text
    assert f"listing only ice://{home_id}" in home_text

    # What a user sees: `peers --json` from another network lists the public worker at its public URL.
    argv = [sys.executable, "-m", "peerinfer", "peers", "--json", "--bootstrap", BOOTSTRAP]
    argv += ["--network-id", str(network_id), "--min-peers", "2", "--timeout", "20"]
    peers = lab.client.run(argv, 60, cwd=REPO, env=clean_env())
    rows = {row["id"]: row for row in json.loads(peers.stdout or "[]")}
    assert rows[public_id]["endpoint"] == f"http://198.51.100.2:{PORT}" and rows[public_id]["verified"] is True
    assert rows[home_id]["endpoint"] == f"ice://{home_id}"


def test_a_worker_behind_a_forwarded_port_lists_the_routers_url(lab: NatLab, tmp_path: Path) -> None:
    forward = [["-t", "nat", "-I", "PREROUTING", "-i", "eth0", "-p", "tcp", "--dport", str(PORT)]]
    forward[0] += ["-j", "DNAT", "--to-destination", f"192.168.1.2:{PORT}"]
    forward.append(
        ["-I", "FORWARD", "-i", "eth0", "-p", "tcp", "-d", "192.168.1.2", "--dport", str(PORT), "-j", "ACCEPT"]
    )
    for rule in forward:
        lab.home_router.run(["iptables", "-w", *rule], 20).check_returncode()
    network_id = start_bootstrap(lab, tmp_path)
    log = tmp_path / "home_worker.log"
    start_worker(lab.home, tmp_path / "home_home", network_id, log)
    wait_for("the worker did not report its reachability", lambda: "reachable from outside" in log.read_text(), 30, log)
    peer_id = peer_id_in(log)
    assert peer_id is not None
    seen: dict[str, list[str]] = {}

    def listed() -> bool:
        seen.update(read_records(lab.client, network_id))
        return peer_id in seen

    wait_for("the record was not listed", listed, RECORDS_TIMEOUT_S, log)
    assert seen[peer_id] == [f"http://198.51.100.11:{PORT}", f"ice://{peer_id}"]
