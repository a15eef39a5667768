"""A small lab of Linux network namespaces for tests: hosts on bridges, joined by veth pairs.

    with NetnsLab() as lab:
        lan = lab.bridge("lan")
        a = lab.host("a", lan, "10.77.0.1/24")
        b = lab.host("b", lan, "10.77.0.2/24")
        server = a.popen([sys.executable, "-m", "http.server", "8000"])
        print(b.run(["curl", "-s", "http://10.77.0.1:8000/"]).stdout)

Every bridge lives in a namespace of its own, so nothing is added to the machine's own network
and deleting the lab's namespaces removes everything (veths go with them). Namespace names start
with ``pilab<pid>-``; a lab first deletes what a killed earlier run left behind (names whose pid is
no longer alive). Needs root and iproute2: ``unavailable()`` says why a test must skip.

A host gets ``lo`` up and one interface per ``attach``; routes (``route``), sysctls
(``sysctl``) and arbitrary ``ip`` commands (``ip``) are there for NAT and routing labs.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

PREFIX = "pilab"
_OWNED = re.compile(rf"^{PREFIX}(\d+)-")
COMMAND_TIMEOUT_S = 20.0


class LabError(RuntimeError):
    """An ``ip`` command failed; the message holds the command and its stderr."""


def _ip(*args: str, timeout_s: float = COMMAND_TIMEOUT_S) -> str:
    command = ["ip", *args]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"{' '.join(command)}: {exc}") from exc
    if done.returncode != 0:
        raise LabError(f"{' '.join(command)}: exit {done.returncode}: {done.stderr.strip()[:500]}")
    return done.stdout


def unavailable() -> str | None:
    """Why namespaces cannot be used here (not root, no ``ip``, ``ip netns`` fails), or None."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces (CI runs as root)"
    if shutil.which("ip") is None:
        return "needs iproute2's 'ip' command"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        _ip("netns", "add", probe)
        _ip("netns", "exec", probe, "ip", "link", "set", "lo", "up")
    except LabError as exc:
        return f"'ip netns' does not work here: {exc}"
    finally:
        subprocess.run(["ip", "netns", "delete", probe], capture_output=True, timeout=COMMAND_TIMEOUT_S, check=False)
    return None


def namespaces() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def delete_leftovers() -> list[str]:
    """Delete the namespaces of lab runs whose process is gone (a run killed before its cleanup)."""
    deleted = []
    for name in namespaces():
        match = _OWNED.match(name)
        if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
            _delete(name)
            deleted.append(name)
    return deleted


def _delete(netns: str) -> None:
    """Kill what still runs in ``netns`` (an orphan keeps a namespace alive after its name is gone), delete it."""
    pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    for pid in pids.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    subprocess.run(["ip", "netns", "delete", netns], capture_output=True, timeout=COMMAND_TIMEOUT_S, check=False)


def stop_process(process: subprocess.Popen[str], *, kill: bool = False, grace_s: float = 15.0) -> None:
    """SIGTERM (or SIGKILL with ``kill``) ``process``, and SIGKILL it if it outlives ``grace_s``; waits."""
    if process.poll() is not None:
        return
    if kill:
        process.kill()
    else:
        process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@dataclass
class Bridge:
    """A Linux bridge ``br0`` alone in namespace ``netns``."""

    name: str
    netns: str
    ports: int = 0


@dataclass
class Host:
    """A namespace with ``lo`` up; ``addresses`` maps its interfaces to their CIDR addresses."""

    lab: NetnsLab
    name: str
    netns: str
    addresses: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        """The first interface's address, without the prefix length."""
        return next(iter(self.addresses.values())).split("/")[0]

    def command(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv]

    def popen(self, argv: Sequence[str], **options: Any) -> subprocess.Popen[str]:
        """Start ``argv`` in this namespace; the lab kills it (and waits) when it closes."""
        options.setdefault("text", True)
        process: subprocess.Popen[str] = subprocess.Popen(self.command(argv), **options)
        self.lab.processes.append(process)
        return process

    def run(self, argv: Sequence[str], timeout_s: float, **options: Any) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` here to its end (killed after ``timeout_s``); stdout and stderr are captured."""
        return subprocess.run(
            self.command(argv), capture_output=True, text=True, timeout=timeout_s, check=False, **options
        )

    def ip(self, *args: str) -> str:
        return _ip("-n", self.netns, *args)

    def route(self, *args: str) -> None:
        """``ip route add ARGS`` here, e.g. ``route("default", "via", "10.77.0.254")``."""
        self.ip("route", "add", *args)

    def sysctl(self, key: str, value: str) -> None:
        self.run(["sysctl", "-q", "-w", f"{key}={value}"], COMMAND_TIMEOUT_S).check_returncode()


class NetnsLab:
    """Namespaces, bridges and veths created for one test; ``close()`` deletes them all, even half-built."""

    def __init__(self) -> None:
        self.tag = f"{PREFIX}{os.getpid()}-{os.urandom(2).hex()}"
        self.netns: list[str] = []
        self.processes: list[subprocess.Popen[str]] = []
        delete_leftovers()

    def _namespace(self, name: str) -> str:
        netns = f"{self.tag}-{name}"
        _ip("netns", "add", netns)
        self.netns.append(netns)
        _ip("-n", netns, "link", "set", "lo", "up")
        return netns

    def bridge(self, name: str) -> Bridge:
        netns = self._namespace(f"br-{name}")
        _ip("-n", netns, "link", "add", "br0", "type", "bridge")
        _ip("-n", netns, "link", "set", "br0", "up")
        return Bridge(name, netns)

    def host(self, name: str, bridge: Bridge | None = None, address: str | None = None) -> Host:
        """A new namespace; with ``bridge`` and ``address`` (CIDR), its ``eth0`` is on that bridge."""
        host = Host(self, name, self._namespace(name))
        if bridge is not None and address is not None:
            self.attach(host, bridge, address)
        return host

    def attach(self, host: Host, bridge: Bridge, address: str, ifname: str | None = None) -> str:
        """Join ``host`` to ``bridge`` with a new veth (``eth0``, ``eth1``, ... in the host) holding ``address``."""
        ifname = ifname or f"eth{len(host.addresses)}"
        port = f"p{bridge.ports}"
        bridge.ports += 1
        _ip("-n", bridge.netns, "link", "add", port, "type", "veth", "peer", "name", ifname, "netns", host.netns)
        _ip("-n", bridge.netns, "link", "set", port, "master", "br0", "up")
        _ip("-n", host.netns, "addr", "add", address, "dev", ifname)
        _ip("-n", host.netns, "link", "set", ifname, "up")
        host.addresses[ifname] = address
        return ifname

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):  # stuck in the kernel: its namespace goes anyway
                process.wait(timeout=10)
        self.processes.clear()
        for netns in reversed(self.netns):
            subprocess.run(
                ["ip", "netns", "delete", netns], capture_output=True, timeout=COMMAND_TIMEOUT_S, check=False
            )
        self.netns.clear()

    def __enter__(self) -> NetnsLab:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
