"""NAT benchmark (issue 12): TTFT and time per token over local, direct, hole-punched and relayed paths.

    sudo .venv/bin/python bench/bench_nat.py [--rounds 10] [--tokens 64] [--only clean|4g|relay-load]
                                             [--setup-rounds 5] [--streams 16,64,256] [--chart bench/nat.png]
                                             [--shared-cpus] [--direct-unshaped]

Runs the NAT lab of ``tests/nat_lab.py`` (needs root, iptables, coturn; the 4G profile needs
netfilterqueue). ``public`` holds the bootstrap node and coturn, pinned to one core (``taskset -c 0``,
``--relay-threads 1``). Three real-model workers (the bundled model, the worker's own command
``python -m uvicorn worker:app --host 0.0.0.0 --port 8000``) run at once, idle but for the one being
asked: in ``pubworker`` (a public address), ``home`` (behind an endpoint-independent NAT, its IPv6
turned off so that ICE must punch the IPv4 NAT) and ``cgnat`` (behind a symmetric NAT). A measuring
agent (``bench/nat_agent.py``) runs in ``client`` behind its own NAT, one more in ``cgnat`` for the
local row. Both hold their paths open across rounds. What stands for another machine (the agents,
coturn, the link shapers, the bootstrap, and by RPS the lab's packet forwarding) runs on CPU 0 at a
real-time priority (``chrt -f 10``); the workers keep the other CPUs, a model thread for each, as on a
machine of their own (``--shared-cpus``: everything on every CPU, as before 2026-12-03).

- paths: local (the cgnat agent to 127.0.0.1:8000), direct (the pubworker's http:// URL),
  hole-punched (home, ice://) and relayed (cgnat, ice://). Each round sends one streamed chat
  request (temperature 0, ``--tokens``, a prompt of its own so no cache is reused) over every
  path, the order rotated from round to round. A path is opened and used once before the first
  round, so TTFT is that of an open path. TTFT: request sent to first text; time per token:
  (last text - first text) / (texts - 1).
- profiles: clean, then 4G (50 ms each way and 1% loss, seeded, on client_router, on each
  worker's router, and on the public worker's own interface, so that every path crosses two
  mobile links and the relay's cost is what differs; ``--direct-unshaped`` leaves that last one
  clean). RTT is measured with STUN Binding requests to the relay from each namespace;
  a path's RTT is the sum of its two ends' (the wan bridge adds nothing).
- set-up: ``IceDialer.tunnel()`` on a closed path, to a usable loopback origin (the breakdown comes
  from ice.py's own debug line); for direct, a TCP connect.
- wire: what one relayed stream costs the relay, from iptables counters on the relay's TURN and
  relay ports (IP bytes, both legs).
- relay-load: a fake-engine worker in cgnat (a text every 50 ms: 20 tok/s), N streams at once over
  one relayed path, then N synthetic streams, each its own TURN allocation (``nat_agent.py turnload``), sending
  the packets and bytes per token measured on the real path at 20 tokens/s. coturn's CPU from
  /proc/<pid>/stat over a window in the middle of the load; streams per core is 100% over the slope
  of a least-squares line through (streams, CPU%).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import select
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
AGENT = str(Path(__file__).resolve().with_name("nat_agent.py"))
sys.path.insert(0, str(REPO))

from nat_agent import RELAY, TOKENS_PER_S  # noqa: E402
from quantiles import quantile  # noqa: E402

BOOTSTRAP = ("198.51.100.1", 4222)
RELAY_PORTS = (40000, 41999)
PUBLIC_WORKER = "http://198.51.100.2:8000"
LOCAL = "http://127.0.0.1:8000"
FAKE_PORT = 8001
PATHS = ("local", "direct", "hole-punched", "relayed")
CALL_TIMEOUT_S = 300.0
SIDES = {"client": "198.51.100.13", "cgnat": "198.51.100.12", "home": "198.51.100.11", "peer": "198.51.100.2"}


# --- the driver ----------------------------------------------------------------------------------


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


OTHERS_CPU = "0"  # the CPU of what stands for other machines, unless --shared-cpus
WORKER_CPUS: str | None = None  # the CPUs the workers keep to themselves; None with --shared-cpus
WORKER_THREADS = 1  # a model thread per worker CPU


def split_cpus(shared: bool) -> None:
    """Give what stands for other machines CPU 0 and the workers the rest, each model one thread
    per CPU it has. On 2 shared cores the client's own aiortc stack, the link shapers and the relay
    (1.5-2.2 ms of CPU per token on an ICE path, 0.7 ms on plain TCP) ran on the model's cores and
    were charged to the path, as they would never be on a real network."""
    global WORKER_CPUS, WORKER_THREADS
    count = os.cpu_count() or 1
    WORKER_CPUS = None if shared or count < 2 else f"1-{count - 1}"
    WORKER_THREADS = count - 1


def other_machine(pid: int) -> None:
    """Run ``pid`` (every thread) at a real-time priority, on the others' CPU unless CPUs are shared:
    it stands for another machine (a router, the relay, a client), so the model's busy threads must
    not delay it. On one 2-core box a shaper woken late by the scheduler added its lateness to every
    packet it held."""
    subprocess.run(["chrt", "-a", "-f", "-p", "10", str(pid)], check=True, capture_output=True, timeout=10)
    if WORKER_CPUS is not None:
        subprocess.run(["taskset", "-a", "-p", "-c", OTHERS_CPU, str(pid)], check=True, capture_output=True, timeout=10)


class Agent:
    """``nat_agent.py agent`` in a lab namespace: one JSON request line in, one JSON answer line out."""

    def __init__(self, host: Any, env: dict[str, str], log: Path) -> None:
        self.log = log
        command = [sys.executable, AGENT, "agent", "--net", env["PEERINFER_NETWORK_ID"]]
        command += ["--bootstrap", env["PEERINFER_BOOTSTRAP"], "--ice", env["PEERINFER_ICE_SERVERS"]]
        with log.open("w") as sink:
            self.process = host.popen(
                command, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=sink
            )
        other_machine(self.process.pid)

    def send(self, **request: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()

    def receive(self, what: str, timeout_s: float = CALL_TIMEOUT_S) -> dict[str, Any]:
        """The answer to the request sent last; exits with the agent's log if none comes or it is an error."""
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout_s)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            raise SystemExit(f"the agent gave no answer to {what} in {timeout_s:g} s:\n{self.tail()}")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise SystemExit(f"{what} failed: {answer['error']}\n{self.tail()}")
        return answer

    def call(self, timeout_s: float = CALL_TIMEOUT_S, **request: Any) -> dict[str, Any]:
        self.send(**request)
        return self.receive(request["op"], timeout_s)

    def tail(self) -> str:
        return self.log.read_text()[-3000:]

    def stop(self) -> None:
        if self.process.poll() is None and self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.write("quit\n")
                self.process.stdin.close()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()


class RelayCounters:
    """iptables counters in ``public`` on the relay's UDP ports (3478 and the relay range), by neighbour."""

    CHAIN_RULES = (
        ("INPUT", "-i", "eth0", "-s"),
        ("OUTPUT", "-o", "eth0", "-d"),
    )

    def __init__(self, public: Any) -> None:
        self.public = public
        ports = f"3478,{RELAY_PORTS[0]}:{RELAY_PORTS[1]}"
        for chain, iface_flag, iface, addr_flag in self.CHAIN_RULES:
            ports_flag = "--dports" if chain == "INPUT" else "--sports"
            for side, address in SIDES.items():
                tag = f"bench-{chain.lower()}-{side}"
                rule = [chain, iface_flag, iface, addr_flag, address, "-p", "udp", "-m", "multiport", ports_flag]
                self._iptables(["-A", *rule, ports, "-m", "comment", "--comment", tag])
        # relay to relay (both ends allocated on this relay) crosses loopback: counted apart
        self._iptables(["-A", "INPUT", "-i", "lo", "-p", "udp", "--dport", f"{RELAY_PORTS[0]}:{RELAY_PORTS[1]}"])
        self._iptables(["-A", "INPUT", "-m", "comment", "--comment", "bench-end"])

    def _iptables(self, args: list[str]) -> str:
        done = self.public.run(["iptables", "-w", *args], 20)
        if done.returncode != 0:
            raise SystemExit(f"iptables {' '.join(args)}: {done.stderr.strip()}")
        return str(done.stdout)

    def read(self) -> dict[str, tuple[int, int]]:
        """(packets, IP bytes) by tag, e.g. ``input-cgnat``; ``loopback`` for relay-to-relay."""
        found: dict[str, tuple[int, int]] = {}
        for chain in ("INPUT", "OUTPUT"):
            for line in self._iptables(["-nvxL", chain]).splitlines():
                parts = line.split()
                if len(parts) < 2 or not parts[0].isdigit():
                    continue
                match = re.search(r"/\* bench-(\S+) \*/", line)
                if match:
                    found[match.group(1)] = (int(parts[0]), int(parts[1]))
                elif chain == "INPUT" and " lo " in f" {line} ":
                    found["loopback"] = (int(parts[0]), int(parts[1]))
        return found

    @staticmethod
    def delta(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
        return {k: (after[k][0] - before.get(k, (0, 0))[0], after[k][1] - before.get(k, (0, 0))[1]) for k in after}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` and all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Profile:
    name: str
    rtt_s: dict[str, float] = field(default_factory=dict)  # per path
    legs_s: dict[str, float] = field(default_factory=dict)  # per namespace, to the relay
    streams: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {name: [] for name in PATHS})
    setups: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    wire: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def ttft(self, path: str, q: float = 0.5, conn: str = "reused") -> float:
        """TTFT of ``path`` over a new or a reused (kept-alive) HTTP connection."""
        return quantile([s["ttft_s"] for s in self.streams[path] if s["conn"] == conn], q)

    def per_token(self, path: str, q: float = 0.5) -> float:
        return quantile([s["per_token_s"] for s in self.streams[path] if s["per_token_s"] is not None], q)


class Bench:
    """The NAT lab with its bootstrap, relay, real workers and agents."""

    def __init__(self, tmp: Path) -> None:
        from peerinfer.network.relay_config import RelayConfig
        from tests.nat_lab import NatLab
        from tests.turn_server import TurnServer

        self.tmp = tmp
        self.net = int.from_bytes(os.urandom(3), "big") + 1
        self.lab = NatLab()
        # home and client route each other's IPv6: ICE would pick that host-to-host pair (a direct
        # path through two firewalls) and never punch the IPv4 NAT this row is about.
        self.lab.home.sysctl("net.ipv6.conf.all.disable_ipv6", "1")
        self.agents: list[Agent] = []
        self.workers: dict[str, subprocess.Popen[str]] = {}
        self.peers: dict[str, str] = {}
        self.relay_config = RelayConfig(
            listening_ips=(RELAY[0],),
            relay_ips=(RELAY[0],),
            port=RELAY[1],
            min_port=RELAY_PORTS[0],
            max_port=RELAY_PORTS[1],
            max_sessions=1500,
            session_bytes_per_s=4_000_000,  # coturn reserves this per allocation against the total
            total_bytes_per_s=10_000_000_000,
            allow_peer_ranges=("198.51.100.0/24",),  # the lab's "Internet" is a documentation range
        )
        boot = [sys.executable, "-m", "peerinfer", "bootstrap", "--port", str(BOOTSTRAP[1]), "--host", BOOTSTRAP[0]]
        if WORKER_CPUS is not None:
            boot = ["taskset", "-c", OTHERS_CPU, *boot]
        with (tmp / "boot.log").open("w") as sink:
            self.lab.public.popen(
                [*boot, "--network-id", str(self.net)], cwd=REPO, env=self.env("boot"), stdout=sink, stderr=sink
            )

        def pinned(argv: Sequence[str], **options: Any) -> subprocess.Popen[str]:
            if argv and argv[0] == "turnserver":
                argv = ["taskset", "-c", "0", *argv, "--relay-threads", "1"]
            return self.lab.public.popen(argv, **options)

        self.relay = TurnServer.start(self.relay_config, workdir=tmp / "relay", popen=pinned)
        other_machine(self.relay.process.pid)
        self.counters = RelayCounters(self.lab.public)
        if WORKER_CPUS is not None:
            self.steer_packets()

    def steer_packets(self) -> None:
        """Process every packet the lab's veths receive on the others' CPU (RPS): the routing, NAT,
        bridging and shaping a real network does on other machines. Without it a worker's own
        send went on through its router, and that router's NAT and queue, on the worker's CPU."""
        mask = format(1 << int(OTHERS_CPU), "x")
        steer = "for q in /sys/class/net/*/queues/rx-*/rps_cpus; do case $q in */lo/*) ;; *) echo $0 > $q;; esac; done"
        for netns in self.lab.net.netns:
            argv = ["ip", "netns", "exec", netns, "sh", "-c", steer, mask]
            subprocess.run(argv, check=True, capture_output=True, timeout=10)

    def host(self, name: str) -> Any:
        return getattr(self.lab, "public_worker" if name == "pubworker" else name)

    @property
    def ice_servers(self) -> str:
        c = self.relay_config
        return json.dumps([{"urls": f"turn:{RELAY[0]}:{RELAY[1]}", "username": c.username, "credential": c.password}])

    def env(self, home: str, **extra: str) -> dict[str, str]:
        return {
            **{k: v for k, v in os.environ.items() if not k.startswith("PEERINFER_")},
            "PYTHONPATH": str(REPO),
            "PEERINFER_BOOTSTRAP": f"{BOOTSTRAP[0]}:{BOOTSTRAP[1]}",
            "PEERINFER_NETWORK_ID": str(self.net),
            "PEERINFER_ICE_SERVERS": self.ice_servers,
            "PEERINFER_HOME": str(self.tmp / home),
            "PEERINFER_LOG_LEVEL": "INFO",
            "NO_PROXY": "*",
            **extra,
        }

    def start_worker(self, name: str, command: list[str], home: str | None = None, **extra: str) -> None:
        host = self.host(name)
        if WORKER_CPUS is not None:
            command = ["taskset", "-c", WORKER_CPUS, *command]
            extra = {"PEERINFER_N_THREADS": str(WORKER_THREADS), **extra}
        with (self.tmp / f"{name}.log").open("w") as sink:
            self.workers[name] = host.popen(
                command, cwd=REPO, env=self.env(home or name, **extra), stdout=sink, stderr=subprocess.STDOUT
            )

    def wait_worker(self, name: str, timeout_s: float = 300.0) -> str:
        """The worker's peer id, once it has announced itself (its model loaded)."""
        log = self.tmp / f"{name}.log"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = log.read_text()
            if any(said in text for said in ANNOUNCED):
                self.peers[name] = text.split("created peer identity ", 1)[1].split()[0]
                return self.peers[name]
            if self.workers[name].poll() is not None:
                break
            time.sleep(0.3)
        raise SystemExit(f"the {name} worker did not announce itself:\n{log.read_text()[-3000:]}")

    def stop_worker(self, name: str) -> None:
        from tests.netns_lab import stop_process

        stop_process(self.workers.pop(name))

    def agent(self, where: str) -> Agent:
        made = Agent(self.host(where), self.env(f"agent-{where}-{len(self.agents)}"), self.tmp / f"{where}.agent")
        self.agents.append(made)
        return made

    def rtt(self, where: str, count: int) -> float:
        """Median round trip (s) of STUN Binding requests from namespace ``where`` to the relay."""
        command = [sys.executable, AGENT, "rtt", RELAY[0], str(RELAY[1]), str(count)]
        done = self.host(where).run(command, 120, cwd=REPO, env=self.env("rtt"))
        rtts = json.loads(done.stdout.splitlines()[-1]) if done.returncode == 0 and done.stdout.strip() else []
        if not rtts:
            raise SystemExit(f"no STUN answer from the relay in {where}: {done.stderr[-1000:]}")
        return float(statistics.median(rtts))

    def close(self) -> None:
        for made in self.agents:
            with contextlib.suppress(Exception):
                made.stop()
        for name in list(self.workers):
            with contextlib.suppress(Exception):
                self.stop_worker(name)
        with contextlib.suppress(Exception):
            self.relay.stop()
        self.lab.close()


ANNOUNCED = ("reachable from outside", "listing PEERINFER_ANNOUNCE_URL", "no bootstrap answered the dial-back")
WORKER = [sys.executable, "-m", "uvicorn", "worker:app", "--host", "0.0.0.0", "--port", "8000"]
FAKE_WORKER = [sys.executable, "-m", "uvicorn", "--factory", "--app-dir", str(REPO / "bench"), "nat_agent:fake_app"]
FAKE_WORKER += ["--host", "0.0.0.0", "--port", str(FAKE_PORT), "--log-level", "warning"]


def prompt_of(number: int) -> str:
    return f"Text {number:05d}. Write a long story about a lighthouse keeper and the sea, with many details."


def measure_profile(
    bench: Bench,
    profile: Profile,
    client: Agent,
    local: Agent,
    rounds: int,
    tokens: int,
    setup_rounds: int,
    numbers: Any,
) -> None:
    targets = {
        "local": (local, LOCAL),
        "direct": (client, PUBLIC_WORKER),
        "hole-punched": (client, f"ice:{bench.peers['home']}"),
        "relayed": (client, f"ice:{bench.peers['cgnat']}"),
    }
    for where in ("client", "pubworker", "home", "cgnat"):
        profile.legs_s[where] = bench.rtt(where, 20)
    profile.rtt_s = {
        "local": 0.0,
        "direct": profile.legs_s["client"] + profile.legs_s["pubworker"],
        "hole-punched": profile.legs_s["client"] + profile.legs_s["home"],
        "relayed": profile.legs_s["client"] + profile.legs_s["cgnat"],
    }
    for who, target in targets.values():  # open every path and use it once
        who.call(op="stream", target=target, prompt=prompt_of(next(numbers)), max_tokens=tokens)
    for number in range(rounds):
        order = list(PATHS[number % 4 :] + PATHS[: number % 4])
        for name in order:
            who, target = targets[name]
            before = bench.counters.read() if name == "relayed" else None
            prompts = [prompt_of(next(numbers)), prompt_of(next(numbers))]
            pair = who.call(op="pair", target=target, prompts=prompts, max_tokens=tokens)["pair"]
            for got in pair:
                if "error" in got:
                    profile.failures.append(f"{name}, {got['conn']} connection: {got['error'][:200]}")
                    print(f"  {profile.name} {name}: a stream failed: {got['error'][:200]}", file=sys.stderr)
            whole = all("error" not in got for got in pair)
            pair = [got for got in pair if "error" not in got]
            profile.streams[name] += pair
            if before is not None and whole:
                texts = sum(got["texts"] for got in pair)
                profile.wire.append({"texts": texts, "counts": RelayCounters.delta(before, bench.counters.read())})
        print(f"  {profile.name} round {number + 1}/{rounds}", file=sys.stderr)
    profile.setups = {"direct": [], "hole-punched": [], "relayed": []}
    for number in range(setup_rounds):
        profile.setups["direct"].append(client.call(op="connect", host="198.51.100.2", port=8000))
        for name, worker in (("hole-punched", "home"), ("relayed", "cgnat")):
            client.call(op="close", peer=bench.peers[worker])
            time.sleep(0.5)
            opened = client.call(op="open", peer=bench.peers[worker])
            if opened["path"] != name:
                print(f"  warning: a new path to {worker} was {opened['path']}, not {name}", file=sys.stderr)
            profile.setups[name].append(opened)
        print(f"  {profile.name} set-up {number + 1}/{setup_rounds}", file=sys.stderr)


def print_profile(profile: Profile) -> None:
    print(f"\n### {profile.name}\n")
    legs = ", ".join(f"{k} {ms(v)} ms" for k, v in profile.legs_s.items())
    print(f"STUN RTT to the relay (median of 20): {legs}\n")
    if profile.failures:
        print(f"Streams that failed (left out of the table): {len(profile.failures)}")
        print("".join(f"\n- {failure}" for failure in profile.failures) + "\n")
    print(
        "| path | RTT (ms) | TTFT p50, new conn (ms) | TTFT p50 (ms) | TTFT p90 (ms) | time/token p50 (ms) "
        "| time/token p90 (ms) | streams |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in PATHS:
        got = profile.streams[name]
        kinds = Counter(str(s["path"]) for s in got if s.get("path"))
        seen = f" ({', '.join(f'{n} {k}' for k, n in kinds.items())})" if kinds else ""
        print(
            f"| {name} | {ms(profile.rtt_s[name])} | {ms(profile.ttft(name, conn='new'))} | {ms(profile.ttft(name))} "
            f"| {ms(profile.ttft(name, 0.9))} | {ms(profile.per_token(name))} | {ms(profile.per_token(name, 0.9))} "
            f"| {len(got)}{seen} |"
        )
    print("\nSet-up of a new path (IceDialer.tunnel() on a closed path; direct: a TCP connect):\n")
    print("| path | p50 (ms) | min (ms) | max (ms) | gather (ms) | DHT offer→answer (ms) | ICE+DTLS+SCTP (ms) | n |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, got in profile.setups.items():
        times = [g["s"] for g in got]
        last = [g["attempts"][-1] for g in got if g.get("attempts")]
        parts = [ms(statistics.median(a[k] for a in last)) if last else "-" for k in ("gather_s", "answer_s", "open_s")]
        kinds = Counter(str(g["path"]) for g in got if g.get("path"))
        seen = f" ({', '.join(f'{n} {k}' for k, n in kinds.items())})" if kinds else ""
        print(
            f"| {name} | {ms(quantile(times, 0.5))} | {ms(min(times))} | {ms(max(times))} | {' | '.join(parts)} "
            f"| {len(got)}{seen} |"
        )
    for name, got in profile.setups.items():
        offers = [size for g in got for size in g.get("offer_bytes", [])]
        heard = [size for g in got for size in g.get("heard_bytes", [])]
        if offers:
            print(
                f"\n{name} signalling: {len(offers) / len(got):.1f} offers per set-up, {min(offers)}-{max(offers)} B; "
                f"{len(heard) / len(got):.1f} values heard under the worker's key per set-up, "
                f"{min(heard, default=0)}-{max(heard, default=0)} B",
                end="",
            )
    print()


def wire_summary(profile: Profile) -> dict[str, float]:
    """Per token of a relayed stream: packets and IP bytes into the relay from each side, and out."""
    texts = sum(w["texts"] for w in profile.wire)
    totals: dict[str, list[int]] = {}
    for w in profile.wire:
        for tag, (packets, octets) in w["counts"].items():
            totals.setdefault(tag, [0, 0])
            totals[tag][0] += packets
            totals[tag][1] += octets
    zero = [0, 0]
    found = {
        "down_pkts": totals.get("input-cgnat", zero)[0] / texts,
        "down_bytes": totals.get("input-cgnat", zero)[1] / texts,
        "up_pkts": totals.get("input-client", zero)[0] / texts,
        "up_bytes": totals.get("input-client", zero)[1] / texts,
        "out_pkts": sum(v[0] for k, v in totals.items() if k.startswith("output-")) / texts,
        "out_bytes": sum(v[1] for k, v in totals.items() if k.startswith("output-")) / texts,
        "loopback_pkts": totals.get("loopback", zero)[0] / texts,
    }
    return found


def print_wire(name: str, streams: int, wire: dict[str, float]) -> None:
    print(f"\nOne relayed stream on the wire ({name}; per text, {streams} streams, IP bytes):\n")
    print("| into the relay from the worker | into the relay from the client | out of the relay | relay to relay |")
    print("| --- | --- | --- | --- |")
    print(
        f"| {wire['down_pkts']:.2f} pkts, {wire['down_bytes']:.0f} B | {wire['up_pkts']:.2f} pkts, "
        f"{wire['up_bytes']:.0f} B | {wire['out_pkts']:.2f} pkts, {wire['out_bytes']:.0f} B "
        f"| {wire['loopback_pkts']:.2f} pkts |"
    )


def verdicts(clean: Profile | None, g4: Profile | None) -> list[str]:
    """The issue's three targets, at p50, each met or not, with its numbers."""
    lines = []

    def said(ok: bool) -> str:
        return "met" if ok else "**not met**"

    for profile in (q for q in (clean, g4) if q is not None):
        rtt = profile.rtt_s["relayed"]
        for conn in ("reused", "new"):
            local, relayed = profile.ttft("local", conn=conn), profile.ttft("relayed", conn=conn)
            limit = local + 3 * rtt + 0.050
            lines.append(
                f"- {profile.name}, {conn} connection: relayed TTFT {ms(relayed)} ms <= local {ms(local)} + 3 x RTT "
                f"{ms(rtt)} + 50 = {ms(limit)} ms: {said(relayed <= limit)}"
            )
        direct_tpt, relayed_tpt = profile.per_token("direct"), profile.per_token("relayed")
        change = relayed_tpt / direct_tpt - 1
        lines.append(
            f"- {profile.name}: relayed time/token {ms(relayed_tpt)} ms vs direct {ms(direct_tpt)} ms: "
            f"{100 * change:+.1f}% (at most +5%): {said(change <= 0.05)}"
        )
        punched_tpt = profile.per_token("hole-punched")
        lines.append(
            f"  - the same two links without the relay (hole-punched, {ms(punched_tpt)} ms): relayed is "
            f"{100 * (relayed_tpt / punched_tpt - 1):+.1f}% (not a target)"
        )
    if g4 is not None:
        for conn in ("reused", "new"):
            local = g4.ttft("local", conn=conn)
            for name in ("direct", "hole-punched", "relayed"):
                got, rtt = g4.ttft(name, conn=conn), g4.rtt_s[name]
                limit = rtt + 1.1 * local
                verdict = said(got <= limit) if conn == "reused" else "not a target (it asks once a path exists)"
                lines.append(
                    f"- 4g {name}, {conn} connection: TTFT {ms(got)} ms <= RTT {ms(rtt)} + 1.1 x local {ms(local)} "
                    f"= {ms(limit)} ms: {verdict}"
                )
    return lines


def relay_load(bench: Bench, counts: list[int], window_s: float) -> dict[str, Any]:
    """coturn's CPU at each count of streams: real streams over one relayed path, then synthetic ones."""
    for name in list(bench.workers):
        bench.stop_worker(name)
    bench.start_worker(
        "cgnat",
        FAKE_WORKER,
        "cgnat-fake",
        PEERINFER_MAX_CONNECTIONS="2000",
        PEERINFER_ICE_TARGET=f"127.0.0.1:{FAKE_PORT}",
    )
    peer = bench.wait_worker("cgnat", 120)
    client = bench.agent("client")
    ramp_s = 3.0
    max_tokens = int((ramp_s + window_s + 3.0) * TOKENS_PER_S)
    client.call(op="stream", target=f"ice:{peer}", prompt="warm", max_tokens=4)
    pid = bench.relay.process.pid
    results: dict[str, Any] = {"real": [], "synthetic": []}
    before = bench.counters.read()
    one = client.call(op="load", target=f"ice:{peer}", streams=1, max_tokens=max_tokens)["streams"][0]
    calibration = Profile("one stream at 20 tok/s")
    calibration.wire.append({"texts": one["texts"], "counts": RelayCounters.delta(before, bench.counters.read())})
    results["wire_20"] = wire = wire_summary(calibration)
    idle_before, idle_counts = cpu_seconds(pid), bench.counters.read()
    time.sleep(window_s)
    results["idle_cpu"] = (cpu_seconds(pid) - idle_before) / window_s
    idle = RelayCounters.delta(idle_counts, bench.counters.read())
    results["idle_pps_in"] = sum(v[0] for k, v in idle.items() if k.startswith("input-")) / window_s
    for count in counts:
        client.send(op="load", target=f"ice:{peer}", streams=count, max_tokens=max_tokens)
        time.sleep(ramp_s)
        c0, n0, t0 = cpu_seconds(pid), bench.counters.read(), time.perf_counter()
        time.sleep(window_s)
        c1, n1, t1 = cpu_seconds(pid), bench.counters.read(), time.perf_counter()
        streams: list[dict[str, Any]] = client.receive("load")["streams"]
        good = [s for s in streams if "error" not in s]
        rates = [(s["texts"] - 1) / sum(s["gaps"]) for s in good if s["gaps"]]
        gaps = [g for s in good for g in s["gaps"]]
        packets = sum(v[0] for k, v in RelayCounters.delta(n0, n1).items() if k.startswith("input-"))
        results["real"].append(
            {
                "streams": count,
                "cpu": (c1 - c0) / (t1 - t0),
                "pps_in": packets / (t1 - t0),
                "whole": sum(s["chars"] == max_tokens for s in good),
                "tok_s_p50": quantile(rates, 0.5) if rates else 0.0,
                "gap_p99": quantile(gaps, 0.99) if gaps else None,
                "errors": sorted({s["error"][:160] for s in streams if "error" in s})[:3],
                "chars": sorted({s["chars"] for s in good})[:5],
            }
        )
        print(f"  relay-load real {count}: {results['real'][-1]}", file=sys.stderr)
    for count in counts:
        results["synthetic"].append(synthetic(bench, count, wire, window_s))
        print(f"  relay-load synthetic {count}: {results['synthetic'][-1]}", file=sys.stderr)
    return results


def synthetic(bench: Bench, count: int, wire: dict[str, float], window_s: float) -> dict[str, Any]:
    c = bench.relay_config
    argv = ["taskset", "-c", "1", sys.executable, AGENT, "turnload", "--streams", str(count)]
    argv += ["--username", c.username, "--password", c.password, "--rate", str(TOKENS_PER_S)]
    argv += [
        "--down",
        f"{wire['down_pkts']:.3f}",
        "--down-bytes",
        str(max(1, round(wire["down_bytes"] / max(wire["down_pkts"], 1e-9)) - 28)),
    ]
    argv += [
        "--up",
        f"{wire['up_pkts']:.3f}",
        "--up-bytes",
        str(max(1, round(wire["up_bytes"] / max(wire["up_pkts"], 1e-9)) - 28 - 4)),
    ]
    argv += ["--peer-host", SIDES["peer"]]
    with (bench.tmp / f"turnload{count}.log").open("w") as sink:
        process = bench.lab.public_worker.popen(
            argv, cwd=REPO, env=bench.env("turnload"), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=sink
        )
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], 120)
    line = process.stdout.readline() if ready else ""
    if line.strip() != "READY":
        process.kill()
        raise SystemExit(f"turnload did not start: {(bench.tmp / f'turnload{count}.log').read_text()[-2000:]}")
    pid = bench.relay.process.pid
    time.sleep(2.0)
    c0, n0, t0 = cpu_seconds(pid), bench.counters.read(), time.perf_counter()
    time.sleep(window_s)
    c1, n1, t1 = cpu_seconds(pid), bench.counters.read(), time.perf_counter()
    out, _ = process.communicate("", timeout=60)
    received = json.loads(out.splitlines()[-1])
    packets = sum(v[0] for k, v in RelayCounters.delta(n0, n1).items() if k.startswith("input-"))
    return {"streams": count, "cpu": (c1 - c0) / (t1 - t0), "pps_in": packets / (t1 - t0), "received": received}


def slope(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares line through ``points``: (slope, intercept)."""
    xs, ys = [x for x, _ in points], [y for _, y in points]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mean_x) ** 2 for x in xs)
    k = sum((x - mean_x) * (y - mean_y) for x, y in points) / den if den else 0.0
    return k, mean_y - k * mean_x


def print_load(load: dict[str, Any]) -> None:
    print_wire("fake engine, 20 tok/s, what the synthetic streams send", 1, load["wire_20"])
    print(f"\n### relay-load (coturn pinned to one core; {100 * load['idle_cpu']:.2f}% with one idle path)\n")
    print(
        "| streams | kind | coturn CPU (% of a core) | packets/s into the relay | tokens/s per stream p50 "
        "| gap p99 (ms) | whole |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in load["real"]:
        print(
            f"| {row['streams']} | real, one path | {100 * row['cpu']:.1f} | {row['pps_in']:.0f} "
            f"| {row['tok_s_p50']:.1f} | {ms(row['gap_p99'])} | {row['whole']}/{row['streams']} |"
        )
    wire = load["wire_20"]
    nominal = (wire["down_pkts"] + wire["up_pkts"]) * TOKENS_PER_S
    for row in load["synthetic"]:
        achieved = row["pps_in"] / row["streams"] / (wire["down_pkts"] + wire["up_pkts"])
        print(
            f"| {row['streams']} | synthetic, an allocation each | {100 * row['cpu']:.1f} | {row['pps_in']:.0f} "
            f"| {achieved:.1f} (from packets in) | - | - |"
        )
    print(f"\nOne open relayed path with no stream: {load['idle_pps_in']:.1f} packets/s into the relay (heartbeats).")
    rows = load["synthetic"]
    if len(rows) >= 2:
        k, b = slope([(r["streams"], r["cpu"]) for r in rows])
        per_packet = slope([(r["pps_in"], r["cpu"]) for r in rows])[0]
        if k > 0 and per_packet > 0:
            print(
                f"\nStreams per relay core (synthetic, an allocation each): the least-squares line through "
                f"(streams, CPU) has {100 * k:.3f}% of a core per stream (+{100 * b:.1f}% at none), so 100% is "
                f"{1 / k:.0f} streams; by packets, {1e6 * per_packet:.1f} µs of coturn CPU per packet into the relay "
                f"and {nominal:.0f} packets/s per stream at {TOKENS_PER_S:.0f} tok/s give "
                f"{1 / (per_packet * nominal):.0f}."
            )


def chart(profiles: list[Profile], load: dict[str, Any] | None, path: Path) -> None:
    """Box plots of every stream (TTFT by connection, time per token) and coturn's CPU under relay-load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, grid = plt.subplots(2, 2, figsize=(13, 8.5))
    axes = list(grid.flat)
    panels = (
        (axes[0], "ttft_s", "new", "TTFT, new HTTP connection (ms)"),
        (axes[1], "ttft_s", "reused", "TTFT, kept-alive connection (ms)"),
        (axes[2], "per_token_s", None, "time per token (ms)"),
    )
    for axis, key, conn, unit in panels:
        data, labels = [], []
        for profile in profiles:
            for name in PATHS:
                got = [s for s in profile.streams[name] if conn is None or s["conn"] == conn]
                data.append([s[key] * 1000 for s in got if s[key] is not None])
                labels.append(f"{name}\n{profile.name}")
        if data:
            axis.boxplot(data, tick_labels=labels, showfliers=False)
        axis.set_ylabel(unit)
        axis.tick_params(axis="x", labelsize=7)
        axis.grid(axis="y", alpha=0.3)
    axis = axes[3]
    if load:
        for kind, marker in (("real", "o-"), ("synthetic", "s--")):
            rows = load[kind]
            if rows:
                axis.plot([r["streams"] for r in rows], [100 * r["cpu"] for r in rows], marker, label=kind)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent relayed streams (20 tok/s each)")
        axis.set_ylabel("coturn CPU (% of one core)")
        axis.legend()
        axis.grid(alpha=0.3)
    else:
        axis.set_axis_off()
    figure.suptitle("NAT traversal: paired rounds over local, direct, hole-punched and relayed paths")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    print(f"\nchart: {path}")


def run(args: argparse.Namespace) -> int:
    from tests.nat_lab import nat_lab_or_skip, shaper_unavailable
    from tests.turn_server import unavailable as no_coturn

    reason = nat_lab_or_skip() or no_coturn() or (shaper_unavailable() if args.only in (None, "4g") else None)
    if reason:
        print(f"bench_nat: cannot run here: {reason}", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="peerinfer-bench-nat-"))
    split_cpus(args.shared_cpus)
    cpus = "shared" if WORKER_CPUS is None else f"workers on CPU {WORKER_CPUS}, the rest on CPU {OTHERS_CPU}"
    print(f"# NAT benchmark ({os.cpu_count()} CPUs, {cpus}; load average {os.getloadavg()[0]:.2f}; logs in {tmp})\n")
    bench = Bench(tmp)
    profiles: list[Profile] = []
    load = None
    numbers = iter(range(100_000))
    try:
        if args.only in (None, "clean", "4g"):
            for name in ("pubworker", "home", "cgnat"):
                bench.start_worker(name, WORKER)
            for name in ("pubworker", "home", "cgnat"):
                bench.wait_worker(name)
            client, local = bench.agent("client"), bench.agent("cgnat")
            for name in ("clean", "4g"):
                if args.only not in (None, name):
                    continue
                if name == "4g":
                    for seed, router in enumerate(
                        (bench.lab.client_router, bench.lab.home_router, bench.lab.cgnat_router)
                    ):
                        other_machine(bench.lab.shape(router, delay_ms=50.0, loss=0.01, seed=seed + 1).process.pid)
                    if not args.direct_unshaped:
                        shaped = bench.lab.shape(bench.lab.public_worker, 50.0, 0.01, seed=4, end_host=True)
                        other_machine(shaped.process.pid)
                profile = Profile(name)
                measure_profile(bench, profile, client, local, args.rounds, args.tokens, args.setup_rounds, numbers)
                profiles.append(profile)
                print_profile(profile)
                print_wire(profile.name, len(profile.wire), wire_summary(profile))
            for link in list(bench.lab.links):
                bench.lab.unshape(link)
            client.stop()
            local.stop()
        if args.only in (None, "relay-load"):
            load = relay_load(bench, [int(x) for x in args.streams.split(",")], args.window)
            print_load(load)
        if profiles:
            print("\nTargets:\n")
            print("\n".join(verdicts(*(next((q for q in profiles if q.name == n), None) for n in ("clean", "4g")))))
        if args.chart is not None:
            chart(profiles, load, args.chart)
        (tmp / "results.json").write_text(json.dumps({"profiles": [vars(q) for q in profiles], "load": load}))
    finally:
        bench.close()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="paired rounds per profile (default: 10)")
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens of each request (default: 64)")
    parser.add_argument(
        "--setup-rounds", type=int, default=5, help="new paths opened per kind and profile (default: 5)"
    )
    parser.add_argument("--streams", default="16,64,256", help="concurrent streams for relay-load (default: 16,64,256)")
    parser.add_argument("--window", type=float, default=8.0, help="seconds of CPU sampling per relay-load step")
    parser.add_argument("--only", choices=("clean", "4g", "relay-load"), default=None)
    parser.add_argument(
        "--direct-unshaped",
        action="store_true",
        help="on 4G, leave the public worker's own link clean (its direct path then crosses one lossy link)",
    )
    parser.add_argument(
        "--shared-cpus",
        action="store_true",
        help="run the workers on every CPU, beside the client, shapers and relay (as before 2026-12-03)",
    )
    parser.add_argument("--chart", type=Path, default=None, help="write box plots and the relay-load curve here (PNG)")
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
