"""A slow, lossy link for the NAT lab, built on NFQUEUE (this kernel has no netem qdisc).

    python -m tests.link_shaper --queue 0 --delay-ms 50 --loss 0.01 --seed 1

Run inside a router's namespace whose ``mangle FORWARD`` chain sends packets to queue ``--queue``
(``tests/nat_lab.py`` ``NatLab.shape`` adds the rules and starts this). Each packet is held
``--delay-ms`` after it reached the queue, then accepted; a seeded ``random.Random`` drops
``--loss`` of them on arrival. One delay for every packet and a heap ordered by (release time,
arrival number) keep arrival order, so no flow is reordered. One thread: a ``select`` on the
queue's socket whose timeout is the next release, and a self-pipe for SIGTERM/SIGINT.

Prints ``ready`` on stdout once bound, and on SIGTERM/SIGINT accepts what it still holds, unbinds
and prints ``stopped seen=N dropped=N accepted=N``. Exit status 2 with one line on stderr when
the queue cannot be bound (not root, ``netfilterqueue`` missing, queue taken).

Fails closed: the rules are added without ``--queue-bypass``, so while the rule exists and no
shaper listens (it crashed, was killed) the kernel drops every packet. A test that asked for a
shaped link then sees no traffic at all, never traffic that silently skipped the shaping.
"""

from __future__ import annotations

import argparse
import heapq
import os
import random
import select
import signal
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# Packets held at once: at 50 ms this covers 160,000 pps, far above what one Python thread verdicts.
QUEUE_MAX_LEN = 8192


@dataclass
class ShaperCounts:
    seen: int = 0
    dropped: int = 0
    accepted: int = 0


@dataclass
class Shaper:
    """The delay/loss decision and the held packets; ``now`` is passed in, so it is testable."""

    delay_s: float
    loss: float
    rng: random.Random
    counts: ShaperCounts = field(default_factory=ShaperCounts)
    held: list[tuple[float, int, Any]] = field(default_factory=list)

    def arrive(self, packet: Any, now: float) -> None:
        self.counts.seen += 1
        if self.loss > 0.0 and self.rng.random() < self.loss:
            self.counts.dropped += 1
            packet.drop()
            return
        heapq.heappush(self.held, (now + self.delay_s, self.counts.seen, packet))

    def on_packet(self, packet: Any, now: float) -> None:
        # Releasing here too: under a flood the queue's socket never runs dry, so the select loop
        # alone would hold every packet until the kernel's queue overflows.
        self.arrive(packet, now)
        self.release_due(now)

    def release_due(self, now: float) -> None:
        while self.held and self.held[0][0] <= now:
            _, _, packet = heapq.heappop(self.held)
            packet.accept()
            self.counts.accepted += 1

    def release_all(self) -> None:
        self.release_due(float("inf"))

    def wait_s(self, now: float) -> float | None:
        """How long ``select`` may sleep: until the next release, or for ever when nothing is held."""
        return max(0.0, self.held[0][0] - now) if self.held else None


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.link_shaper", description="Hold and drop packets of an NFQUEUE: a slow, lossy link."
    )
    parser.add_argument("--queue", type=int, required=True, help="NFQUEUE number (0..65535)")
    parser.add_argument("--delay-ms", type=float, default=50.0, help="time each packet is held (ms, >= 0)")
    parser.add_argument("--loss", type=float, default=0.0, help="share of packets dropped (0..1)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the loss draws")
    args = parser.parse_args(argv)
    if not 0 <= args.queue <= 65535:
        parser.error(f"--queue {args.queue} is not a queue number; use 0..65535")
    if not 0.0 <= args.delay_ms <= 60_000.0:
        parser.error(f"--delay-ms {args.delay_ms} is out of range; use 0..60000")
    if not 0.0 <= args.loss <= 1.0:
        parser.error(f"--loss {args.loss} is not a probability; use 0..1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        from netfilterqueue import NetfilterQueue
    except ImportError:
        print("link_shaper: the netfilterqueue package is missing; run scripts/setup.sh --dev", file=sys.stderr)
        return 2
    shaper = Shaper(args.delay_ms / 1000.0, args.loss, random.Random(args.seed))
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)  # the wakeup fd does the work; the default would kill us

    queue = NetfilterQueue()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a smaller socket buffer than asked is fine
            queue.bind(args.queue, lambda packet: shaper.on_packet(packet, time.monotonic()), max_len=QUEUE_MAX_LEN)
    except OSError as exc:
        print(f"link_shaper: cannot bind NFQUEUE {args.queue}: {exc} (needs root; is it taken?)", file=sys.stderr)
        return 2
    queue_fd = queue.get_fd()
    print("ready", flush=True)
    try:
        while True:
            readable, _, _ = select.select([queue_fd, wake_read], [], [], shaper.wait_s(time.monotonic()))
            if wake_read in readable:
                break
            if queue_fd in readable:
                queue.run(block=False)
            shaper.release_due(time.monotonic())
    finally:
        shaper.release_all()
        queue.unbind()
    counts = shaper.counts
    print(f"stopped seen={counts.seen} dropped={counts.dropped} accepted={counts.accepted}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
