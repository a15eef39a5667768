"""An emulated Internet for the NAT-traversal tests: a public segment, three NAT routers, IPv6 with a firewall.

    with NatLab() as lab:
        lab.public.popen([...bootstrap...])
        lab.home.popen([...worker...])
        link = lab.shape(lab.client_router, delay_ms=50.0, loss=0.01, seed=1)

Addresses (fixed)::

    bridge "wan": 198.51.100.0/24 and 2001:db8:ff::/64, no default routes
      public          198.51.100.1    2001:db8:ff::1     bootstrap node, TURN relay
      public_worker   198.51.100.2    2001:db8:ff::2     a worker with a public address
      home_router     198.51.100.11   2001:db8:ff::11    eth0 wan | eth1 192.168.1.1/24, 2001:db8:1::1/64
      cgnat_router    198.51.100.12                      eth0 wan | eth1 100.64.0.1/24
      client_router   198.51.100.13   2001:db8:ff::13    eth0 wan | eth1 192.168.2.1/24, 2001:db8:2::1/64
    home    192.168.1.2   2001:db8:1::2   (behind home_router; IPv6 routed, no NAT66)
    cgnat   100.64.0.2                    (behind cgnat_router; IPv4 only)
    client  192.168.2.2   2001:db8:2::2   (behind client_router)

public and public_worker route 2001:db8:1::/64 and 2001:db8:2::/64 via the routers' wan
addresses, and home_router and client_router route each other's /64; inside hosts have
default routes via their router. No host routes the private
IPv4 ranges: they are only reachable through NAT.

The routers (iptables, nf_tables backend):

- home_router and client_router: endpoint-independent mapping, plain ``MASQUERADE`` (keeps the
  source port when it is free). cgnat_router: symmetric, ``MASQUERADE --random-fully`` (a new
  random port per destination).
- All three filter statefully: FORWARD from wan accepts established/related only, and INPUT
  drops new packets from wan. The INPUT drop matters for hole punching: without it, a peer's
  first punch packet that arrives before ours is answered by the router itself, its conntrack
  entry holds the tuple, and the NAT then picks another port for our outbound flow, so
  punching fails even through an endpoint-independent NAT.
- IPv6 (home_router, client_router): forwarding with an ip6tables firewall that drops new
  inbound connections from wan; established/related and ICMPv6 pass.

DAD is off in every namespace, so addresses work at once. ``shape`` puts tests/link_shaper.py
on the traffic a router forwards (both directions, IPv4 and IPv6; not the router's own). Needs
root, iproute2 and iptables; ``nat_lab_or_skip()`` and ``shaper_unavailable()`` say why not.
"""

from __future__ import annotations

import contextlib
import importlib.util
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.netns_lab import COMMAND_TIMEOUT_S, Bridge, Host, LabError, NetnsLab, unavailable

REPO = Path(__file__).resolve().parent.parent
SHAPER_READY_TIMEOUT_S = 20.0
SHAPER_STOP_TIMEOUT_S = 10.0


def nat_lab_or_skip() -> str | None:
    """Why a NatLab cannot be built here (not root, no ``ip``, no iptables), or None."""
    reason = unavailable()
    if reason is not None:
        return reason
    for tool in ("iptables", "ip6tables"):
        if shutil.which(tool) is None:
            return f"needs {tool} (Debian package iptables; scripts/setup.sh --dev installs it)"
    return None


def shaper_unavailable() -> str | None:
    """Why ``NatLab.shape`` cannot work here (no lab, no netfilterqueue package), or None."""
    reason = nat_lab_or_skip()
    if reason is not None:
        return reason
    if importlib.util.find_spec("netfilterqueue") is None:
        return "needs the netfilterqueue package (scripts/setup.sh --dev installs it with libnetfilter-queue-dev)"
    return None


@dataclass
class ShapedLink:
    """A running link_shaper on one router; ``stop()`` removes its rules, then stops it (idempotent)."""

    router: Host
    queue: int
    process: subprocess.Popen[str]
    rules: list[list[str]]
    stopped_line: str | None = None

    def stop(self) -> str | None:
        """Remove the NFQUEUE rules, stop the shaper; returns its ``stopped seen=...`` line if it printed one."""
        for rule in self.rules:
            self.router.run([rule[0], "-t", "mangle", "-D", *rule[1:]], COMMAND_TIMEOUT_S)
        self.rules.clear()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                out, _ = self.process.communicate(timeout=SHAPER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                out, _ = self.process.communicate(timeout=SHAPER_STOP_TIMEOUT_S)
            lines = [line for line in (out or "").splitlines() if line.startswith("stopped ")]
            self.stopped_line = lines[-1] if lines else None
        return self.stopped_line


class NatLab:
    """The topology of the module docstring, built at construction; ``close()`` deletes it all."""

    def __init__(self) -> None:
        self.net = NetnsLab()
        self.links: list[ShapedLink] = []
        self._next_queue = 0
        try:
            self._build()
        except BaseException:
            self.net.close()
            raise

    @classmethod
    def build(cls) -> NatLab:
        return cls()

    def _host(self, name: str, router: bool = False) -> Host:
        host = self.net.host(name)
        for scope in ("all", "default"):
            host.sysctl(f"net.ipv6.conf.{scope}.accept_dad", "0")
            host.sysctl(f"net.ipv6.conf.{scope}.accept_ra", "0")
        if router:
            host.sysctl("net.ipv4.ip_forward", "1")
            host.sysctl("net.ipv6.conf.all.forwarding", "1")
        return host

    def _attach(self, host: Host, bridge: Bridge, v4: str, v6: str | None = None) -> str:
        ifname = self.net.attach(host, bridge, v4)
        if v6 is not None:
            host.ip("addr", "add", v6, "dev", ifname, "nodad")
        return ifname

    def _build(self) -> None:
        wan = self.net.bridge("wan")
        self.public = self._host("public")
        self._attach(self.public, wan, "198.51.100.1/24", "2001:db8:ff::1/64")
        self.public_worker = self._host("pubworker")
        self._attach(self.public_worker, wan, "198.51.100.2/24", "2001:db8:ff::2/64")

        self.home_router, self.home = self._site("home", wan, "198.51.100.11", "192.168.1", "2001:db8:1::")
        self.cgnat_router, self.cgnat = self._site("cgnat", wan, "198.51.100.12", "100.64.0", None, symmetric=True)
        self.client_router, self.client = self._site("client", wan, "198.51.100.13", "192.168.2", "2001:db8:2::")
        for host in (self.public, self.public_worker):
            host.ip("-6", "route", "add", "2001:db8:1::/64", "via", "2001:db8:ff::11")
            host.ip("-6", "route", "add", "2001:db8:2::/64", "via", "2001:db8:ff::13")
        # IPv6 is routed end to end, as on the Internet: each site reaches the other's /64 (past its firewall).
        self.home_router.ip("-6", "route", "add", "2001:db8:2::/64", "via", "2001:db8:ff::13")
        self.client_router.ip("-6", "route", "add", "2001:db8:1::/64", "via", "2001:db8:ff::11")

    def _site(
        self, name: str, wan: Bridge, wan_v4: str, lan_v4: str, lan_v6: str | None, symmetric: bool = False
    ) -> tuple[Host, Host]:
        """A router with ``eth0`` on wan and ``eth1`` on a LAN of its own, and one host on that LAN."""
        lan = self.net.bridge(f"{name}-lan")
        router = self._host(f"{name}-router", router=True)
        suffix = wan_v4.rsplit(".", 1)[1]
        self._attach(router, wan, f"{wan_v4}/24", f"2001:db8:ff::{suffix}/64" if lan_v6 else None)
        self._attach(router, lan, f"{lan_v4}.1/24", f"{lan_v6}1/64" if lan_v6 else None)
        host = self._host(name)
        self._attach(host, lan, f"{lan_v4}.2/24", f"{lan_v6}2/64" if lan_v6 else None)
        host.route("default", "via", f"{lan_v4}.1")
        masquerade = ["-t", "nat", "-A", "POSTROUTING", "-o", "eth0", "-j", "MASQUERADE"]
        self._iptables(router, "iptables", [*masquerade, "--random-fully"] if symmetric else masquerade)
        self._stateful_filter(router, "iptables")
        if lan_v6:
            host.ip("-6", "route", "add", "default", "via", f"{lan_v6}1")
            self._stateful_filter(router, "ip6tables")
        return router, host

    def _stateful_filter(self, router: Host, tool: str) -> None:
        established = ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"]
        self._iptables(router, tool, ["-A", "FORWARD", "-i", "eth0", *established])
        if tool == "ip6tables":
            self._iptables(router, tool, ["-A", "FORWARD", "-i", "eth0", "-p", "ipv6-icmp", "-j", "ACCEPT"])
        self._iptables(router, tool, ["-A", "FORWARD", "-i", "eth0", "-j", "DROP"])
        if tool == "iptables":
            self._iptables(
                router, tool, ["-A", "INPUT", "-i", "eth0", "-m", "conntrack", "--ctstate", "NEW", "-j", "DROP"]
            )

    @staticmethod
    def _iptables(router: Host, tool: str, args: list[str]) -> None:
        done = router.run([tool, "-w", *args], COMMAND_TIMEOUT_S)
        if done.returncode != 0:
            raise LabError(f"{router.name}: {tool} {' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")

    def shape(
        self, router: Host, delay_ms: float = 50.0, loss: float = 0.01, seed: int = 1, *, end_host: bool = False
    ) -> ShapedLink:
        """Hold every packet ``router`` forwards ``delay_ms`` and drop ``loss`` of them (seeded), until stopped.

        ``end_host``: shape what ``router`` itself sends and receives (not loopback) instead, for a
        host with no router of its own (``public_worker``): the same delay and loss each way."""
        queue = self._next_queue
        self._next_queue += 1
        argv = [sys.executable, "-m", "tests.link_shaper", "--queue", str(queue)]
        argv += ["--delay-ms", str(delay_ms), "--loss", str(loss), "--seed", str(seed)]
        process = router.popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        link = ShapedLink(router, queue, process, [])
        self.links.append(link)
        self._wait_ready(link)
        matches = [["INPUT", "!", "-i", "lo"], ["OUTPUT", "!", "-o", "lo"]] if end_host else [["FORWARD"]]
        for tool in ("iptables", "ip6tables"):
            for match in matches:
                rule = [tool, *match, "-j", "NFQUEUE", "--queue-num", str(queue)]
                self._iptables(router, tool, ["-t", "mangle", "-A", *rule[1:]])
                link.rules.append(rule)
        return link

    @staticmethod
    def _wait_ready(link: ShapedLink) -> None:
        stdout = link.process.stdout
        assert stdout is not None
        deadline = time.monotonic() + SHAPER_READY_TIMEOUT_S
        while time.monotonic() < deadline:
            ready, _, _ = select.select([stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            line = stdout.readline()
            if line.strip() == "ready":
                return
            if line == "":
                break
        stderr = ""
        if link.process.poll() is None:
            link.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            _, stderr = link.process.communicate(timeout=SHAPER_STOP_TIMEOUT_S)
        raise LabError(
            f"{link.router.name}: link_shaper did not say ready within {SHAPER_READY_TIMEOUT_S:.0f} s "
            f"(exit {link.process.poll()}): {(stderr or '').strip()[-1000:]}"
        )

    def unshape(self, target: ShapedLink | Host) -> None:
        """Stop one shaped link, or every link shaping the router ``target``."""
        for link in list(self.links):
            if link is target or link.router is target:
                link.stop()
                self.links.remove(link)

    def close(self) -> None:
        for link in self.links:
            with contextlib.suppress(Exception):
                link.stop()
        self.links.clear()
        processes = list(self.net.processes)
        self.net.close()
        for process in processes:
            for pipe in (process.stdin, process.stdout, process.stderr):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()

    def __enter__(self) -> NatLab:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
