"""Workers behind NAT and carrier-grade NAT serve a client behind its own NAT: the lab of ``tests/nat_lab.py``.

``public`` runs the bootstrap node and a real coturn relay; workers run in ``home`` (an
endpoint-independent NAT) and ``cgnat`` (a symmetric NAT) with the worker's own command,
``python3 -m uvicorn ... --host 0.0.0.0 --port 8000``; the client runs in ``client`` behind a third
NAT. Every path is read from what ICE chose (``tests/nat_client.py`` prints it), not assumed.
Needs root, iptables, coturn and (for the 4G profile) netfilterqueue: CI has them all
(``scripts/setup.sh --dev``); elsewhere these tests skip with the reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from peerinfer.network.relay_config import RelayConfig
from tests import turn_server
from tests.nat_lab import NatLab, nat_lab_or_skip, shaper_unavailable
from tests.netns_lab import Host, stop_process
from tests.network_support import STORY
from tests.turn_server import TurnServer

REPO = Path(__file__).resolve().parent.parent
BOOTSTRAP = "198.51.100.1:4222"
RELAY_PORT = 3478
STUN_PORT = 3479
CLIENT_TIMEOUT_S = 180


@dataclass
class Lab:
    nat: NatLab
    tmp: Path
    net: int
    relay_config: RelayConfig
    relay: TurnServer | None = None
    workers: dict[str, subprocess.Popen[str]] = field(default_factory=dict)

    @property
    def ice_servers(self) -> str:
        """A STUN server of its own (as a network would list a public one) and the TURN relay."""
        config = self.relay_config
        relay = {"urls": f"turn:198.51.100.1:{RELAY_PORT}", "username": config.username, "credential": config.password}
        return json.dumps([{"urls": f"stun:198.51.100.1:{STUN_PORT}"}, relay])

    def env(self, home: str, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "PEERINFER_BOOTSTRAP": BOOTSTRAP,
            "PEERINFER_NETWORK_ID": str(self.net),
            "PEERINFER_ICE_SERVERS": self.ice_servers,
            "PEERINFER_HOME": str(self.tmp / home),
            "PEERINFER_LOG_LEVEL": "INFO",
            "NO_PROXY": "*",
            **extra,
        }

    def start_relay(self) -> None:
        self.relay = TurnServer.start(self.relay_config, workdir=self.tmp / "relay", popen=self.nat.public)

    def stop_relay(self) -> None:
        if self.relay is not None:
            self.relay.stop()
            self.relay = None

    def start_worker(self, name: str, *, real: bool = False, **extra: str) -> str:
        """Start the worker of namespace ``name`` (``home``, ``cgnat``); returns its peer id once it announced."""
        host: Host = getattr(self.nat, name)
        log = self.tmp / f"{name}.log"
        app = "worker:app" if real else "tests.fake_worker_app:app"
        command = [sys.executable, "-m", "uvicorn", app, "--host", "0.0.0.0", "--port", "8000"]
        with log.open("w") as sink:  # the child keeps its own copy of the descriptor
            home = f"{name}-real" if real else name  # a real model is another peer: its own identity
            self.workers[name] = host.popen(
                command, cwd=REPO, env=self.env(home, **extra), stdout=sink, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            text = log.read_text()
            if "listing only ice://" in text or "reachable at" in text:
                return re.search(r"peer ([0-9a-f]{40}): DHT node", text).group(1)  # type: ignore[union-attr]
            if self.workers[name].poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"the {name} worker did not announce itself:\n{log.read_text()[-3000:]}")

    def stop_worker(self, name: str, *, kill: bool = False) -> None:
        """A graceful stop (its record is withdrawn), or kill -9."""
        process = self.workers.pop(name, None)
        if process is not None:
            stop_process(process, kill=kill)

    def worker_log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text()[-4000:]

    def client(self, *argv: str, timeout_s: float = CLIENT_TIMEOUT_S) -> dict[str, object]:
        done = self.nat.client.run(
            [sys.executable, "-m", "tests.nat_client", *argv], timeout_s, cwd=REPO, env=self.env("client")
        )
        assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        return json.loads(done.stdout.splitlines()[-1])  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    reason = nat_lab_or_skip() or turn_server.unavailable()
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("nat")
    net = int.from_bytes(os.urandom(3), "big") + 1
    with NatLab() as nat:
        config = RelayConfig(
            listening_ips=("198.51.100.1",),
            relay_ips=("198.51.100.1",),
            port=RELAY_PORT,
            min_port=40000,
            max_port=40999,
            allow_peer_ranges=("198.51.100.0/24",),  # the lab's "Internet" is a documentation range
        )
        made = Lab(nat, tmp, net, config)
        boot = [sys.executable, "-m", "peerinfer", "bootstrap", "--port", "4222", "--host", "198.51.100.1"]
        with (tmp / "boot.log").open("w") as sink:
            nat.public.popen(
                [*boot, "--network-id", str(net)], cwd=REPO, env=made.env("boot"), stdout=sink, stderr=subprocess.STDOUT
            )
        made.start_relay()
        stun = TurnServer.start(
            dataclasses.replace(config, port=STUN_PORT, min_port=41000, max_port=41099),
            workdir=tmp / "stun",
            popen=nat.public,
            extra_lines=["stun-only"],
        )
        try:
            yield made
        finally:
            for name in list(made.workers):
                made.stop_worker(name)
            made.stop_relay()
            stun.stop()


@pytest.fixture
def fresh(lab: Lab) -> Iterator[Lab]:
    """The lab with no worker running and the relay up when the test starts, whatever the test leaves."""
    for name in list(lab.workers):
        lab.stop_worker(name)
    if lab.relay is None:
        lab.start_relay()
    yield lab
    for name in list(lab.workers):
        lab.stop_worker(name)
    for link in list(lab.nat.links):
        lab.nat.unshape(link)


def _path_of(result: dict[str, object], peer_id: str) -> str:
    peers = result["peers"]
    assert isinstance(peers, dict) and peer_id in peers, result
    return str(peers[peer_id]["path"])


@contextlib.contextmanager
def _blocked(router: Host, tool: str, peer: str) -> Iterator[None]:
    """No UDP through ``router`` to or from ``peer`` (an address or a prefix) while the block runs."""
    rules = [["-d", peer, "-p", "udp", "-j", "DROP"], ["-s", peer, "-p", "udp", "-j", "DROP"]]
    for rule in rules:
        router.run([tool, "-w", "-I", "FORWARD", *rule], 20).check_returncode()
    try:
        yield
    finally:
        for rule in rules:
            router.run([tool, "-w", "-D", "FORWARD", *rule], 20)


def test_the_home_worker_is_reached_by_hole_punching_and_the_cgnat_worker_through_the_relay(fresh: Lab) -> None:
    home = fresh.start_worker("home")
    assert f"listing only ice://{home}" in fresh.worker_log("home")  # the bootstrap could not dial it back
    with _blocked(fresh.nat.client_router, "ip6tables", "2001:db8:1::/64"):  # IPv4 alone: through two NATs
        result = fresh.client("chat", "Tell me the story.", "--max-tokens", "40")
    assert str(result["text"]) == STORY[: len(str(result["text"]))] and len(str(result["text"])) > 20
    assert _path_of(result, home) == "hole-punched", result
    assert result["peers"][home]["url"] == f"ice://{home}"  # type: ignore[index]
    fresh.stop_worker("home")

    cgnat = fresh.start_worker("cgnat")
    assert f"listing only ice://{cgnat}" in fresh.worker_log("cgnat")
    result = fresh.client("chat", "Tell me the story.", "--max-tokens", "40")
    assert str(result["text"]).startswith("Once upon a time"), result
    assert _path_of(result, cgnat) == "relayed", result
    assert "relayed path" in fresh.worker_log("cgnat")
    # The PoC's own client, unchanged: it streams through the relay and says so on stderr, once.
    argv = [sys.executable, "client.py", "Tell me the story.", "--bootstrap", BOOTSTRAP, "--max-tokens", "30"]
    done = fresh.nat.client.run(
        [*argv, "--network-id", str(fresh.net)], CLIENT_TIMEOUT_S, cwd=REPO, env=fresh.env("c2")
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("Once upon a time"), done.stdout
    assert done.stderr.count("through a TURN relay") == 1, done.stderr


def test_through_the_relay_the_real_model_writes_what_it_writes_locally(fresh: Lab) -> None:
    cgnat = fresh.start_worker("cgnat", real=True)
    prompt = "The capital of France is"
    result = fresh.client("chat", prompt, "--max-tokens", "24")
    assert _path_of(result, cgnat) == "relayed", result
    body = json.dumps({"messages": [{"role": "user", "content": prompt}], "max_tokens": 24, "temperature": 0.0})
    local = fresh.nat.cgnat.run(
        [
            sys.executable,
            "-c",
            "import sys, json, urllib.request as u; r = u.urlopen(u.Request('http://127.0.0.1:8000/v1/chat/completions',"
            " data=sys.argv[1].encode(), headers={'Content-Type': 'application/json'}), timeout=120);"
            " print(json.load(r)['choices'][0]['message']['content'])",
            body,
        ],
        180,
    )
    assert local.returncode == 0, local.stderr[-2000:]
    assert str(result["text"]) == local.stdout.rstrip("\n") and result["text"], (result, local.stdout)


def test_with_the_relay_stopped_the_cgnat_worker_is_unreachable_and_the_client_moves_on(fresh: Lab) -> None:
    home = fresh.start_worker("home")
    cgnat = fresh.start_worker("cgnat")
    fresh.stop_relay()
    listed = fresh.nat.client.run(
        [sys.executable, "-m", "peerinfer", "peers", "--json", "--min-peers", "2", "--timeout", "30"],
        120,
        cwd=REPO,
        env=fresh.env("client"),
    )
    assert listed.returncode == 0, listed.stderr[-3000:]
    rows = {row["id"]: row for row in json.loads(listed.stdout)}
    assert rows[home]["verified"] is True and rows[home]["path"] in ("direct", "hole-punched"), json.dumps(rows)
    assert rows[cgnat]["verified"] is False and rows[cgnat]["failure"].startswith("unreachable"), rows
    for _ in range(2):  # whichever peer the choice tries first, the answer comes from the one that works
        result = fresh.client("chat", "Tell me the story.", "--max-tokens", "30")
        assert str(result["text"]).startswith("Once upon a time"), result
        assert _path_of(result, home) in ("direct", "hole-punched")


class Capture:
    """Every frame on ``public``'s interface, raw (AF_PACKET), while it runs: what a relay operator can record."""

    def __init__(self, host: Host, out: Path) -> None:
        script = (
            "import socket, sys, select\n"
            "s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))\n"
            "s.bind(('eth0', 0))\n"
            "out = open(sys.argv[1], 'wb')\n"
            "print('ready', flush=True)\n"
            "while True:\n"
            "    r, _, _ = select.select([s, sys.stdin], [], [])\n"
            "    if sys.stdin in r: break\n"
            "    out.write(s.recv(65535)); out.flush()\n"
        )
        self.out = out
        self.process = host.popen(
            [sys.executable, "-c", script, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert self.process.stdout is not None and self.process.stdout.readline().strip() == "ready"

    def stop(self) -> bytes:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.out.read_bytes()


def test_a_relay_operator_who_records_the_traffic_sees_no_prompt_and_no_answer(fresh: Lab) -> None:
    cgnat = fresh.start_worker("cgnat")
    marker = f"ZEBRA-{secrets.token_hex(6)} please tell me the story"
    capture = Capture(fresh.nat.public, fresh.tmp / "relay.pcap")
    try:
        result = fresh.client("chat", marker, "--max-tokens", "60")
    finally:
        recorded = capture.stop()
    assert _path_of(result, cgnat) == "relayed"
    assert str(result["text"]).startswith("Once upon a time a small model")
    # The capture holds the relayed stream (TURN data on the relay's ports) and readable signalling...
    assert len(recorded) > 20_000
    assert b"a=ice-ufrag:" in recorded  # the DHT's offers and answers cross public in the clear: the capture works
    # ...but neither the prompt nor the answer in any form a reader could find.
    assert marker.encode() not in recorded
    assert b"ZEBRA" not in recorded
    assert b"Once upon a time" not in recorded
    assert b"chat/completions" not in recorded


def _sse(raw: str) -> tuple[str, str]:
    """The SSE body of a raw HTTP answer (de-chunked), and the text its chunks carry."""
    head, _, body = raw.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.") and " 200 " in head.splitlines()[0], head
    if "transfer-encoding: chunked" in head.lower():
        body = _dechunk(body)
    text = ""
    for line in body.splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[len("data: ") :])["choices"]:
                text += choice.get("delta", {}).get("content") or ""
    return body, text


def _dechunk(body: str) -> str:
    """The payload of an HTTP/1.1 chunked body (sizes in hex, each chunk followed by CRLF)."""
    payload, rest = "", body
    while rest:
        size_line, _, rest = rest.partition("\r\n")
        size = int(size_line.split(";")[0], 16)
        if size == 0:
            break
        payload, rest = payload + rest[:size], rest[size + 2 :]
    return payload


def _shape_4g(lab: Lab) -> None:
    if reason := shaper_unavailable():
        pytest.skip(reason)
    for router in (lab.nat.client_router, lab.nat.home_router, lab.nat.cgnat_router):
        lab.nat.shape(router, delay_ms=50.0, loss=0.01, seed=int.from_bytes(os.urandom(2), "big"))


def test_on_the_4g_profile_streams_arrive_whole_with_their_keep_alives(fresh: Lab) -> None:
    home = fresh.start_worker("home", PEERINFER_TEST_TOKEN_DELAY_S="0.15", PEERINFER_KEEPALIVE_S="0.1")
    _shape_4g(fresh)
    result = fresh.client("raw", home, "Tell me the story.", "--max-tokens", "40")
    assert result["path"] in ("direct", "hole-punched"), result  # IPv6 host to host, or IPv4 through the NATs
    body, text = _sse(str(result["raw"]))
    assert ": keep-alive" in body
    assert text and STORY.startswith(text), text
    assert body.rstrip().endswith("data: [DONE]")


# A relayed path on the 4G profile takes about 5.3 s to set up on an idle machine (bench/RESULTS.md),
# against the 10 s default for one ICE path. This test failed twice with NoPeersError after the kill, both
# times while the suite shared its 2 cores with other work, most likely because that set-up ran past the
# default (the logs were gone; a failure now carries them). So the client here gets deadlines sized for the
# shaped link: the test asks whether failover works across these links, not whether it beats the defaults
# on a busy machine.
SHAPED_CLIENT = {"PEERINFER_ICE_TIMEOUT_S": "30", "PEERINFER_CHOOSE_TIMEOUT_S": "15"}


def test_on_the_4g_profile_a_worker_killed_mid_answer_is_resumed_by_the_other(fresh: Lab) -> None:
    slow = {"PEERINFER_TEST_TOKEN_DELAY_S": "0.1"}
    peers = {"home": fresh.start_worker("home", **slow), "cgnat": fresh.start_worker("cgnat", **slow)}
    _shape_4g(fresh)
    with (fresh.tmp / "client.log").open("w") as sink:
        client = fresh.nat.client.popen(
            [sys.executable, "-m", "tests.nat_client", "chat", "Tell me the story.", "--max-tokens", "200"],
            cwd=REPO,
            env=fresh.env("client", **SHAPED_CLIENT),
            stdout=subprocess.PIPE,
            stderr=sink,
        )
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and time.monotonic() < deadline and client.poll() is None:
        for name in peers:
            if "POST /v1/chat/completions" in fresh.worker_log(name):
                time.sleep(1.0)  # some text has streamed
                fresh.stop_worker(name, kill=True)
                killed = name
                break
        time.sleep(0.05)
    out, _ = client.communicate(timeout=CLIENT_TIMEOUT_S)
    if client.stdout is not None:
        client.stdout.close()
    # the later tests of this module rewrite the workers' logs: a failure carries them now
    logs = "\n".join(f"--- {name}.log\n{fresh.worker_log(name)[-2000:]}" for name in peers)
    assert killed is not None, (fresh.tmp / "client.log").read_text()[-3000:] + logs
    assert client.returncode == 0, (fresh.tmp / "client.log").read_text()[-3000:] + logs
    result = json.loads(out.splitlines()[-1])
    assert result["text"] == STORY, result
    switches = result["switches"]
    assert len(switches) == 1 and switches[0][0] == f"ice://{peers[killed]}" and switches[0][3] > 0, result


def test_over_ipv6_the_home_worker_is_reached_through_its_firewall_when_ipv4_cannot_punch(fresh: Lab) -> None:
    """IPv6 has no NAT here, only stateful firewalls on both sides: ICE's host pair opens them from both ends."""
    home = fresh.start_worker("home")
    with _blocked(fresh.nat.client_router, "iptables", "198.51.100.11"):  # no hole punching over IPv4
        result = fresh.client("raw", home, "Tell me the story.", "--max-tokens", "20")
    assert result["remote"] == "2001:db8:1::2", result
    assert result["path"] == "direct", result
    assert _sse(str(result["raw"]))[1].startswith("Once upon")


def test_a_relay_that_goes_away_mid_answer_is_a_peer_failure_and_the_answer_resumes(fresh: Lab) -> None:
    slow = {"PEERINFER_TEST_TOKEN_DELAY_S": "0.1"}
    cgnat = fresh.start_worker("cgnat", **slow)  # the only peer: the answer starts on the relayed path
    with (fresh.tmp / "client-relay.log").open("w") as sink:
        client = fresh.nat.client.popen(
            [sys.executable, "-m", "tests.nat_client", "chat", "Tell me the story.", "--max-tokens", "200"],
            cwd=REPO,
            env=fresh.env("client"),
            stdout=subprocess.PIPE,
            stderr=sink,
        )
    deadline = time.monotonic() + 120
    while "POST /v1/chat/completions" not in fresh.worker_log("cgnat"):
        assert time.monotonic() < deadline and client.poll() is None, (fresh.tmp / "client-relay.log").read_text()
        time.sleep(0.05)
    home = fresh.start_worker("home", **slow)  # a second peer appears while the first answers
    fresh.stop_relay()  # the relayed stream loses its path mid-answer
    out, _ = client.communicate(timeout=CLIENT_TIMEOUT_S)
    if client.stdout is not None:
        client.stdout.close()
    assert client.returncode == 0, (fresh.tmp / "client-relay.log").read_text()[-3000:]
    result = json.loads(out.splitlines()[-1])
    assert result["text"] == STORY, result
    switches = result["switches"]
    assert len(switches) == 1 and switches[0][:2] == [f"ice://{cgnat}", f"ice://{home}"] and switches[0][3] > 0
