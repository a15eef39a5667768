"""A real coturn relay for tests: write a ``RelayConfig``'s turnserver.conf, start it, wait until it answers STUN.

    reason = turn_server.unavailable()
    if reason:
        pytest.skip(reason)
    config = RelayConfig(listening_ips=("127.0.0.1",), relay_ips=("127.0.0.1",), port=free_udp_port())
    with TurnServer.start(config, workdir=tmp_path) as relay:
        ...  # TURN at 127.0.0.1:config.port, credentials config.username / config.password

In a network namespace pass the lab's host: ``TurnServer.start(config, popen=host, workdir=...)``. The
readiness probe (a STUN Binding request) then runs in that namespace too, so it needs no route from here.
Remember that ``RelayConfig`` denies private ranges as peers: a lab on 10.x needs ``allow_peer_ranges``.

coturn 4.6.1 runs as root without complaint (CI runs as root), so no user switch is made. Its pid file
and user database go to ``workdir``, never to /var.
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from peerinfer.network.relay_config import RelayConfig, render_turnserver_conf

TURNSERVER = "turnserver"
START_TIMEOUT_S = 20.0
STOP_GRACE_S = 5.0
LOG_LINES = 400

# Runs where the server runs (maybe in a namespace): a bare STUN Binding request until a matching answer.
PROBE = r"""
import os, socket, struct, sys, time
host, port, deadline = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
while time.monotonic() < deadline:
    txid = os.urandom(12)
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)
        sock.sendto(struct.pack("!HHI", 0x0001, 0, 0x2112A442) + txid, (host, port))
        try:
            data = sock.recv(2048)
        except OSError:
            continue
        if len(data) >= 20 and data[:2] == b"\x01\x01" and data[8:20] == txid:
            sys.exit(0)
sys.exit(1)
"""


class Popen(Protocol):
    def __call__(self, argv: Sequence[str], **options: Any) -> subprocess.Popen[str]: ...


@runtime_checkable
class HasPopen(Protocol):
    def popen(self, argv: Sequence[str], **options: Any) -> subprocess.Popen[str]: ...


class TurnServerError(RuntimeError):
    """turnserver did not start, did not answer, or refused part of its configuration; the message has its log."""


def unavailable() -> str | None:
    """Why a test cannot run coturn here, or None."""
    if shutil.which(TURNSERVER) is None:
        return "needs coturn's turnserver (apt-get install coturn; scripts/setup.sh --dev installs it in CI)"
    return None


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A port free for UDP and TCP on ``host`` just now (coturn listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((host, 0))
            port: int = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((host, port))
                except OSError:
                    continue
            return port
    raise OSError("no port free for both UDP and TCP")


def relay_port_range(size: int = 200) -> tuple[int, int]:
    """Relay ports below Linux's ephemeral range (so never the listening port), unlikely another test's."""
    low = 20000 + int.from_bytes(os.urandom(2), "big") % (12000 - size)
    return low, low + size - 1


class TurnServer:
    """A running ``turnserver -c CONF``; ``stop()`` (or leaving ``with``) ends it."""

    def __init__(self, config: RelayConfig, process: subprocess.Popen[str], conf_path: Path) -> None:
        self.config = config
        self.process = process
        self.conf_path = conf_path
        self._lines: collections.deque[str] = collections.deque(maxlen=LOG_LINES)
        self._reader = threading.Thread(target=self._read, name="turnserver-log", daemon=True)
        self._reader.start()

    @property
    def host(self) -> str:
        return self.config.listening_ips[0] if self.config.listening_ips else "127.0.0.1"

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.config.port

    @classmethod
    def start(
        cls,
        config: RelayConfig,
        *,
        workdir: Path,
        popen: Popen | HasPopen | None = None,
        timeout_s: float = START_TIMEOUT_S,
        extra_lines: Sequence[str] = (),
    ) -> TurnServer:
        """Write the configuration to ``workdir``, start coturn, return once it answers a STUN Binding request.

        ``popen`` starts processes: ``subprocess.Popen`` by default, or a lab ``Host`` (its ``popen``).
        ``extra_lines`` are appended to the configuration (``stun-only`` makes a plain STUN server).
        """
        run: Callable[..., subprocess.Popen[str]]
        if popen is None:
            run = subprocess.Popen
        elif isinstance(popen, HasPopen):
            run = popen.popen
        else:
            run = popen
        workdir.mkdir(parents=True, exist_ok=True)
        conf_path = workdir / "turnserver.conf"
        text = render_turnserver_conf(config) + f"pidfile={workdir / 'turnserver.pid'}\nuserdb={workdir / 'turndb'}\n"
        text += "".join(f"{line}\n" for line in extra_lines)
        descriptor = os.open(conf_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
        process = run(
            [TURNSERVER, "-c", str(conf_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        server = cls(config, process, conf_path)
        try:
            server._wait_ready(run, timeout_s)
        except BaseException:
            server.stop()
            raise
        return server

    def _wait_ready(self, run: Callable[..., subprocess.Popen[str]], timeout_s: float) -> None:
        probe = run(
            [sys.executable, "-c", PROBE, self.host, str(self.config.port), str(timeout_s)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            answered = probe.wait(timeout=timeout_s + 5) == 0
        except subprocess.TimeoutExpired:
            probe.kill()
            probe.wait(timeout=5)
            answered = False
        if self.process.poll() is not None:
            self._reader.join(timeout=2)
            raise TurnServerError(f"turnserver exited with {self.process.returncode}:\n{self.log()}")
        if not answered:
            raise TurnServerError(f"turnserver did not answer STUN on {self.address} in {timeout_s} s:\n{self.log()}")
        # coturn logs a rule it cannot read and runs without it: a test must not pass on a half-read config.
        deadline = time.monotonic() + 2.0
        while "Relay ports initialization done" not in self.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        refused = [line for line in self._lines if "ERROR" in line or "Wrong address" in line]
        if refused:
            raise TurnServerError("turnserver refused part of its configuration:\n" + "\n".join(refused))

    def _read(self) -> None:
        stream = self.process.stdout
        if stream is None:
            return
        with contextlib.suppress(OSError, ValueError):
            for line in stream:
                self._lines.append(line.rstrip("\n"))

    def log(self) -> str:
        """The last lines coturn wrote (stdout and stderr)."""
        return "\n".join(list(self._lines))

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period; waits for the process and its log."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_GRACE_S)
        self._reader.join(timeout=2)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def __enter__(self) -> TurnServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
