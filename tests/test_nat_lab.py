"""The NAT lab's controls, with real packets: each NAT maps and filters as tests/nat_lab.py says.

TCP to a worker behind NAT fails from outside and works from inside; UDP mappings are
endpoint-independent at home and symmetric behind the CGNAT; unsolicited UDP is filtered; the
IPv6 firewall opens only for replies to what the inside host sent; the link shaper delays and
drops what a router forwards without reordering or altering it, and fails closed.

Run as ``python -m tests.test_nat_lab agent|connect|rtt ...`` it is the small prober that runs
inside a namespace (see ``_main``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import random
import select
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.link_shaper import Shaper, parse_args
from tests.nat_lab import REPO, NatLab, nat_lab_or_skip, shaper_unavailable
from tests.netns_lab import Host

HTTP_PORT = 8000
READY_TIMEOUT_S = 20.0
# Long enough for a dropped packet to have arrived had it not been dropped (no shaping: < 1 ms).
QUIET_S = 1.5
DATAGRAMS = 200


@pytest.fixture
def lab() -> Iterator[NatLab]:
    reason = nat_lab_or_skip()
    if reason is not None:
        pytest.skip(reason)
    with NatLab() as made:
        yield made


@pytest.fixture
def shaper_lab() -> Iterator[NatLab]:
    reason = shaper_unavailable()
    if reason is not None:
        pytest.skip(reason)
    with NatLab() as made:
        yield made


# --- helpers run in the test process -----------------------------------------------------------


def _prober(*args: str) -> list[str]:
    return [sys.executable, "-m", "tests.test_nat_lab", *args]


def serve_http(host: Host, directory: Path) -> None:
    """``python -m http.server`` on [::]:8000 (dual stack) in ``host``; returns once it answers there."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "index.html").write_text(f"hello from {host.name}\n")
    argv = [sys.executable, "-m", "http.server", str(HTTP_PORT), "--bind", "::", "--directory", str(directory)]
    host.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if connect(host, "127.0.0.1", HTTP_PORT, timeout_s=1.0) == "200":
            return
        time.sleep(0.1)
    raise AssertionError(f"http.server in {host.name} did not answer within {READY_TIMEOUT_S:.0f} s")


def connect(host: Host, address: str, port: int, timeout_s: float = 2.0) -> str:
    """An HTTP GET from ``host``: the status code, or why the connection failed."""
    done = host.run(_prober("connect", address, str(port), str(timeout_s)), timeout_s + 20, cwd=REPO)
    return (done.stdout.strip() or done.stderr.strip()[-300:]) or f"exit {done.returncode}"


@dataclass(frozen=True)
class Datagram:
    local_port: int
    peer: str
    peer_port: int
    payload: bytes


class Agent:
    """A UDP prober in a namespace: sends on command from bound ports, reports what arrives."""

    def __init__(self, host: Host, *ports: int, echo: bool = False) -> None:
        argv = _prober("agent", *(str(port) for port in ports), *(["--echo"] if echo else []))
        self.host = host
        self.process = host.popen(argv, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=1)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        first = self.lines.get(timeout=READY_TIMEOUT_S)
        assert first.startswith("bound "), f"agent in {host.name} said {first!r}"

    def _read(self) -> None:
        assert self.process.stdout is not None
        with contextlib.suppress(ValueError, OSError):  # the lab closed the pipe first
            for line in self.process.stdout:
                self.lines.put(line.rstrip("\n"))

    def send(self, local_port: int, address: str, port: int, payload: bytes, count: int = 1) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(f"send {local_port} {address} {port} {count} {payload.hex()}\n")
        self.process.stdin.flush()

    def received(self, quiet_s: float = QUIET_S, want: int | None = None, limit_s: float = 30.0) -> list[Datagram]:
        """What arrived until ``quiet_s`` passed without a datagram; with ``want``, until that many
        arrived or ``limit_s`` passed (on a loaded machine the agents and the Python shaper can fall
        behind by more than ``quiet_s``, and a quiet spell would read late datagrams as lost)."""
        got: list[Datagram] = []
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline and (want is None or len(got) < want):
            wait_s = quiet_s if want is None else max(0.0, deadline - time.monotonic())
            try:
                line = self.lines.get(timeout=wait_s)
            except queue.Empty:
                break
            _, local, peer, peer_port, payload = line.split(" ")
            got.append(Datagram(int(local), peer, int(peer_port), bytes.fromhex(payload)))
        return got


def numbered(index: int) -> bytes:
    """Datagram ``index`` of a run: its number, then 600 bytes that depend on it (to see damage)."""
    return f"{index:05d}:".encode() + hashlib.sha256(str(index).encode()).hexdigest().encode() * 10


def rtt_ms(host: Host, address: str, port: int, count: int = 10) -> float:
    done = host.run(_prober("rtt", address, str(port), str(count)), 60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return float(done.stdout)


# --- TCP: closed from outside, open from inside ------------------------------------------------


def test_nobody_outside_opens_a_tcp_connection_to_a_worker_behind_nat(lab: NatLab, tmp_path: Path) -> None:
    serve_http(lab.home, tmp_path / "home")
    serve_http(lab.cgnat, tmp_path / "cgnat")
    # An attacker on the wan segment can send to the private addresses through the router's MAC.
    lab.public.route("192.168.1.0/24", "via", "198.51.100.11")
    lab.public.route("100.64.0.0/24", "via", "198.51.100.12")
    lab.client_router.route("192.168.1.0/24", "via", "198.51.100.11")
    lab.client_router.route("100.64.0.0/24", "via", "198.51.100.12")
    for outsider in (lab.public, lab.client):
        for target in ("198.51.100.11", "192.168.1.2", "198.51.100.12", "100.64.0.2"):
            assert connect(outsider, target, HTTP_PORT) != "200", f"{outsider.name} reached {target}:{HTTP_PORT}"


def test_workers_behind_nat_reach_a_public_server_and_a_public_worker_is_reachable(lab: NatLab, tmp_path: Path) -> None:
    serve_http(lab.public, tmp_path / "public")
    serve_http(lab.public_worker, tmp_path / "public_worker")
    for inside in (lab.home, lab.cgnat, lab.client):
        assert connect(inside, "198.51.100.1", HTTP_PORT) == "200", inside.name
    assert connect(lab.public, "198.51.100.2", HTTP_PORT) == "200"
    assert connect(lab.client, "198.51.100.2", HTTP_PORT) == "200"


# --- UDP: mapping and filtering ----------------------------------------------------------------


def test_the_home_nat_maps_one_local_port_to_one_public_port_for_every_destination(lab: NatLab) -> None:
    public = Agent(lab.public, 3478, 3479)
    home = Agent(lab.home, 40000)
    home.send(40000, "198.51.100.1", 3478, b"a")
    home.send(40000, "198.51.100.1", 3479, b"b")
    seen = {(d.local_port, d.peer, d.peer_port) for d in public.received(want=2)}
    assert seen == {(3478, "198.51.100.11", 40000), (3479, "198.51.100.11", 40000)}


def test_the_cgnat_maps_each_destination_to_a_port_of_its_own(lab: NatLab) -> None:
    public = Agent(lab.public, 3478, 3479)
    cgnat = Agent(lab.cgnat, 40000)
    cgnat.send(40000, "198.51.100.1", 3478, b"a")
    cgnat.send(40000, "198.51.100.1", 3479, b"b")
    seen = {d.local_port: (d.peer, d.peer_port) for d in public.received(want=2)}
    assert set(seen) == {3478, 3479}
    assert seen[3478][0] == seen[3479][0] == "198.51.100.12"
    assert seen[3478][1] != seen[3479][1]


def test_only_the_endpoint_home_wrote_to_can_answer_through_the_mapping(lab: NatLab) -> None:
    public = Agent(lab.public, 3478, 3479)
    home = Agent(lab.home, 40000)
    home.send(40000, "198.51.100.1", 3478, b"out")
    (mapped,) = public.received(want=1)
    public.send(3479, "198.51.100.11", mapped.peer_port, b"unsolicited")
    assert home.received() == []
    public.send(3478, "198.51.100.11", mapped.peer_port, b"reply")
    assert [d.payload for d in home.received(want=1)] == [b"reply"]


def test_a_peer_packet_that_arrives_before_ours_does_not_move_the_mapping(lab: NatLab) -> None:
    # Hole punching: the peer's first packet often reaches our router before ours leaves it.
    public = Agent(lab.public, 3478, 3479)
    home = Agent(lab.home, 40000)
    public.send(3479, "198.51.100.11", 40000, b"early punch")
    assert home.received() == []
    home.send(40000, "198.51.100.1", 3478, b"to the server")
    home.send(40000, "198.51.100.1", 3479, b"to the peer")
    seen = {(d.local_port, d.peer_port) for d in public.received(want=2)}
    assert seen == {(3478, 40000), (3479, 40000)}
    public.send(3479, "198.51.100.11", 40000, b"punched")
    assert [d.payload for d in home.received(want=1)] == [b"punched"]


# --- IPv6: no NAT, a stateful firewall -----------------------------------------------------------


def test_ipv6_inbound_is_closed_until_home_writes_out_and_then_open_to_that_endpoint_only(
    lab: NatLab, tmp_path: Path
) -> None:
    serve_http(lab.home, tmp_path / "home")
    serve_http(lab.public, tmp_path / "public")
    assert connect(lab.public, "2001:db8:1::2", HTTP_PORT) != "200"
    assert connect(lab.home, "2001:db8:ff::1", HTTP_PORT) == "200"

    public = Agent(lab.public, 3478, 3479)
    home = Agent(lab.home, 40000)
    public.send(3478, "2001:db8:1::2", 40000, b"before")
    assert home.received() == []
    home.send(40000, "2001:db8:ff::1", 3478, b"out")
    assert [(d.peer, d.peer_port) for d in public.received(want=1)] == [("2001:db8:1::2", 40000)]
    public.send(3479, "2001:db8:1::2", 40000, b"other port")
    assert home.received() == []
    public.send(3478, "2001:db8:1::2", 40000, b"reply")
    assert [d.payload for d in home.received(want=1)] == [b"reply"]


# --- the link shaper -----------------------------------------------------------------------------


def test_a_delayed_link_delivers_every_datagram_intact_and_in_order(shaper_lab: NatLab) -> None:
    lab = shaper_lab
    echo = Agent(lab.public, 7, echo=True)
    before = rtt_ms(lab.client, "198.51.100.1", 7)
    link = lab.shape(lab.client_router, delay_ms=50.0, loss=0.0)
    shaped = rtt_ms(lab.client, "198.51.100.1", 7)
    print(f"\nclient -> public UDP echo RTT: {before:.2f} ms unshaped, {shaped:.2f} ms with 50 ms each way")
    echo.process.kill()

    public = Agent(lab.public, 3478)
    client = Agent(lab.client, 40000)
    for index in range(DATAGRAMS):
        client.send(40000, "198.51.100.1", 3478, numbered(index))
    got = public.received(want=DATAGRAMS)
    stopped = link.stop()
    assert [d.payload for d in got] == [numbered(index) for index in range(DATAGRAMS)], f"shaper: {stopped}"
    assert stopped is not None and "dropped=0" in stopped


def test_full_loss_passes_nothing_and_unshaping_restores_the_link(shaper_lab: NatLab) -> None:
    lab = shaper_lab
    public = Agent(lab.public, 3478)
    client = Agent(lab.client, 40000)
    lab.shape(lab.client_router, delay_ms=0.0, loss=1.0)
    client.send(40000, "198.51.100.1", 3478, b"lost", count=20)
    client.send(40000, "2001:db8:ff::1", 3478, b"lost too", count=20)
    assert public.received() == []
    lab.unshape(lab.client_router)
    client.send(40000, "198.51.100.1", 3478, b"through")
    assert [d.payload for d in public.received(want=1)] == [b"through"]


def test_partial_loss_drops_some_datagrams_and_keeps_the_others_in_order(shaper_lab: NatLab) -> None:
    lab = shaper_lab
    public = Agent(lab.public, 3478)
    client = Agent(lab.client, 40000)
    lab.shape(lab.client_router, delay_ms=10.0, loss=0.3, seed=7)
    for index in range(DATAGRAMS):
        client.send(40000, "198.51.100.1", 3478, numbered(index))
    payloads = [d.payload for d in public.received()]
    indexes = [int(payload[:5]) for payload in payloads]
    assert 0 < len(indexes) < DATAGRAMS
    assert indexes == sorted(set(indexes))
    assert payloads == [numbered(index) for index in indexes]


def test_a_killed_shaper_stops_the_traffic_instead_of_letting_it_pass_unshaped(shaper_lab: NatLab) -> None:
    lab = shaper_lab
    public = Agent(lab.public, 3478)
    client = Agent(lab.client, 40000)
    link = lab.shape(lab.client_router, delay_ms=0.0, loss=0.0)
    link.process.send_signal(signal.SIGKILL)
    link.process.wait(timeout=10)
    client.send(40000, "198.51.100.1", 3478, b"unshaped?")
    assert public.received() == []
    link.stop()
    client.send(40000, "198.51.100.1", 3478, b"through")
    assert [d.payload for d in public.received(want=1)] == [b"through"]


# --- the shaper's decisions, without a kernel ----------------------------------------------------


class FakePacket:
    def __init__(self, name: str, verdicts: list[tuple[str, str]]) -> None:
        self.name = name
        self.verdicts = verdicts

    def accept(self) -> None:
        self.verdicts.append(("accept", self.name))

    def drop(self) -> None:
        self.verdicts.append(("drop", self.name))


def test_the_shaper_holds_each_packet_for_the_delay_and_releases_in_arrival_order() -> None:
    verdicts: list[tuple[str, str]] = []
    shaper = Shaper(delay_s=0.05, loss=0.0, rng=random.Random(1))
    for index, now in enumerate([0.0, 0.0, 0.01, 0.01]):
        shaper.on_packet(FakePacket(f"p{index}", verdicts), now)
    assert verdicts == [] and shaper.wait_s(0.02) == pytest.approx(0.03)
    shaper.release_due(0.05)
    assert verdicts == [("accept", "p0"), ("accept", "p1")]
    shaper.on_packet(FakePacket("p4", verdicts), 0.07)  # a late arrival releases what is due
    assert verdicts[2:] == [("accept", "p2"), ("accept", "p3")]
    shaper.release_all()
    assert verdicts[4:] == [("accept", "p4")] and shaper.wait_s(1.0) is None


def test_the_shaper_drops_the_same_seeded_share_every_run() -> None:
    def run(seed: int) -> list[tuple[str, str]]:
        verdicts: list[tuple[str, str]] = []
        shaper = Shaper(delay_s=0.0, loss=0.25, rng=random.Random(seed))
        for index in range(2000):
            shaper.on_packet(FakePacket(str(index), verdicts), float(index))
        return verdicts

    first = run(1)
    dropped = sum(1 for verdict, _ in first if verdict == "drop")
    assert first == run(1) and first != run(2)
    assert 400 < dropped < 600
    assert len(first) == 2000


@pytest.mark.parametrize(
    "argv",
    [
        ["--queue", "70000"],
        ["--queue", "1", "--loss", "1.5"],
        ["--queue", "1", "--loss", "-0.1"],
        ["--queue", "1", "--delay-ms", "-5"],
        ["--queue", "1", "--delay-ms", "nan"],
        ["--queue", "x"],
        [],
    ],
)
def test_the_shaper_refuses_arguments_that_make_no_link(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(argv)
    assert exited.value.code == 2
    assert "--" in capsys.readouterr().err


# --- scripts/install_system.sh: the lab's Debian packages ---------------------------------------


def run_system_installer(tmp_path: Path, stubs: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The installer as root with only ``stubs`` on PATH: no tool of the lab is there."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, script in {"id": "echo 0", **stubs}.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + script + "\n")
        (bin_dir / name).chmod(0o755)
    env = {
        "PATH": str(bin_dir),
        "TMPDIR": str(tmp_path),
        "PEERINFER_CHROMIUM": str(tmp_path / "no-chromium"),
        "PEERINFER_NFQUEUE_HEADER": str(tmp_path / "no-header.h"),
    }
    return subprocess.run(
        ["/bin/bash", str(REPO / "scripts" / "install_system.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_setup_installs_the_nat_labs_packages_when_they_are_missing(tmp_path: Path) -> None:
    calls = tmp_path / "apt-calls"
    result = run_system_installer(tmp_path, {"apt-get": f'echo "$*" >> {calls}'})
    assert result.returncode == 0
    assert {"iptables", "conntrack", "coturn", "libnetfilter-queue-dev"} <= set(calls.read_text().split())
    assert result.stderr.count("\n") == 1 and "NAT lab tests (log: " in result.stderr


def test_setup_stops_the_turn_relay_that_installing_coturn_started_and_only_that_one(tmp_path: Path) -> None:
    running = tmp_path / "turnservers"
    already = subprocess.Popen(["sleep", "300"])
    running.write_text(f"{already.pid}\n")
    try:
        result = run_system_installer(
            tmp_path,
            {
                # As Debian's postinst does on a machine with systemd: the service starts at once.
                "apt-get": f"/bin/sleep 300 </dev/null >/dev/null 2>&1 &\necho $! >> {running}",
                "pgrep": f"/bin/cat {running}",
            },
        )
        assert result.returncode == 0, result.stderr
        pids = [int(pid) for pid in running.read_text().split()]
        assert len(pids) == 2 and pids[0] == already.pid
        new_pid = pids[1]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _running(new_pid):
            time.sleep(0.05)
        assert not _running(new_pid), "the turnserver the install started is still running"
        assert already.poll() is None, "a turnserver that ran before the setup was stopped"
    finally:
        already.kill()
        already.wait(timeout=10)
        for pid in [int(pid) for pid in running.read_text().split()[1:]]:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    """``pid`` exists and is not a zombie (the reparented sleep is reaped by init, maybe late)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# --- the prober that runs inside the namespaces ------------------------------------------------


def _as_v6(address: str) -> str:
    return address if ":" in address else f"::ffff:{address}"


def _shown(address: str) -> str:
    return address.removeprefix("::ffff:")


SO_RCVBUFFORCE = 33  # Linux's value; Python's socket module does not name it
AGENT_RCVBUF_BYTES = 4 * 1024 * 1024


def _agent(ports: list[int], echo: bool) -> None:
    """Dual-stack UDP sockets on ``ports``; stdin ``send LOCAL ADDR PORT COUNT HEX``; stdout ``recv ...``."""
    sockets: dict[int, socket.socket] = {}
    for port in ports:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        # The default buffer holds about 90 of the shaper's 600-byte datagrams, and the shaper lets
        # a held burst out at once: a starved agent lost 4 of 200 on a loaded machine (the shaper
        # had accepted all). 4 MiB (root may force past rmem_max) takes any burst a test sends.
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, AGENT_RCVBUF_BYTES)
        sock.bind(("::", port))
        sockets[sock.getsockname()[1]] = sock
    print("bound " + " ".join(str(port) for port in sockets), flush=True)
    by_fd = {sock.fileno(): (port, sock) for port, sock in sockets.items()}
    stdin = sys.stdin.fileno()
    pending = b""  # os.read, not sys.stdin: its buffer would hide lines from select
    while True:
        readable, _, _ = select.select([stdin, *by_fd], [], [])
        for fd in readable:
            if fd == stdin:
                chunk = os.read(stdin, 65536)
                if not chunk:
                    return
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    _, local, address, to_port, count, payload = line.decode().split()
                    for _ in range(int(count)):
                        sockets[int(local)].sendto(bytes.fromhex(payload), (_as_v6(address), int(to_port)))
                continue
            local_port, sock = by_fd[fd]
            data, peer = sock.recvfrom(65535)
            if echo:
                sock.sendto(data, peer)
            else:
                print(f"recv {local_port} {_shown(peer[0])} {peer[1]} {data.hex() or '-'}", flush=True)


def _connect(address: str, port: int, timeout_s: float) -> int:
    try:
        with socket.create_connection((address, port), timeout=timeout_s) as sock:
            sock.sendall(f"GET / HTTP/1.0\r\nHost: {address}\r\n\r\n".encode())
            status = sock.recv(64).split(b" ")
    except OSError as exc:
        print(f"failed: {exc}")
        return 1
    print(status[1].decode() if len(status) > 1 else "no status line")
    return 0


def _rtt(address: str, port: int, count: int) -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.settimeout(5.0)
        samples = []
        for index in range(count):
            started = time.perf_counter()
            sock.sendto(str(index).encode(), (_as_v6(address), port))
            while sock.recv(64) != str(index).encode():
                pass
            samples.append((time.perf_counter() - started) * 1000.0)
    print(f"{statistics.median(samples):.3f}")
    return 0


def _main(argv: list[str]) -> int:
    command, *rest = argv
    if command == "agent":
        echo = "--echo" in rest
        _agent([int(port) for port in rest if port != "--echo"], echo)
        return 0
    if command == "connect":
        return _connect(rest[0], int(rest[1]), float(rest[2]))
    if command == "rtt":
        return _rtt(rest[0], int(rest[1]), int(rest[2]))
    print(f"unknown command {command!r}; use agent, connect or rtt", file=sys.stderr)
    return 2


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(_main(sys.argv[1:]))
