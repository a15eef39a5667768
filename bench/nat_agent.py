"""What ``bench/bench_nat.py`` runs inside the NAT lab's namespaces: the measuring agent and its helpers.

    python bench/nat_agent.py agent --net N --bootstrap HOST:PORT --ice JSON  # JSON requests on stdin
    python bench/nat_agent.py turnload --streams N ...                       # synthetic TURN streams
    python bench/nat_agent.py rtt HOST PORT COUNT                            # STUN round trips, as JSON
    python -m uvicorn --factory --app-dir bench nat_agent:fake_app ...        # the relay-load worker

The agent holds a DHT node, an ``IceDialer`` and HTTP clients, so its paths stay open between the
driver's requests; each request is one JSON line in and one JSON line out (``op``: open, close,
connect, stream, pair, load, rtt).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RELAY = ("198.51.100.1", 3478)
TOKENS_PER_S = 20.0
LONG_TEXT = " ".join(f"word{i % 97}" for i in range(4000))


def stun_rtts(host: str, port: int, count: int, timeout_s: float = 1.0) -> list[float]:
    """Round trips (s) of ``count`` STUN Binding requests; a lost one is skipped."""
    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout_s)
        for _ in range(count):
            txid = os.urandom(12)
            started = time.perf_counter()
            sock.sendto(struct.pack("!HHI", 0x0001, 0, 0x2112A442) + txid, (host, port))
            deadline = started + timeout_s
            while time.perf_counter() < deadline:
                try:
                    data = sock.recv(2048)
                except OSError:
                    break
                if data[8:20] == txid:
                    found.append(time.perf_counter() - started)
                    break
            time.sleep(0.02)
    return found


class Breakdown(logging.Handler):
    """Keeps ice.py's debug line of each attempt: gathered, answered, opened (seconds)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.attempts: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("ICE to %s (relay %s): gathered") and isinstance(record.args, tuple):
            _, relay, gathered, answered, opened = record.args
            self.attempts.append({"relay": relay, "gather_s": gathered, "answer_s": answered, "open_s": opened})


class Recording:
    """The DHT as ICE's signalling, with the size of every offer put and every value heard."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self.put_sizes: list[int] = []
        self.heard_sizes: list[int] = []

    def put(self, key: str, data: bytes) -> None:
        self.put_sizes.append(len(data))
        self.node.put(key, data)

    def listen(self, key: str, on_value: Callable[[bytes], None]) -> Any:
        def heard(data: bytes) -> None:
            self.heard_sizes.append(len(data))
            on_value(data)

        return self.node.listen(key, heard)


async def stream_once(http: Any, base: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    body = {"messages": [{"role": "user", "content": prompt}], "stream": True, "temperature": 0.0}
    body["max_tokens"] = max_tokens
    started = time.perf_counter()
    first = last = None
    texts, chars, gaps = 0, 0, []
    async with http.stream("POST", base + "/v1/chat/completions", json=body) as response:
        headers_s = time.perf_counter() - started
        if response.status_code != 200:
            return {"error": f"{base} answered {response.status_code}: {(await response.aread())[:200]!r}"}
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            content = choices[0].get("delta", {}).get("content")
            if not content:
                continue
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            first = now if first is None else first
            last = now
            texts += 1
            chars += len(content)
    if first is None or last is None:
        return {"error": f"{base} sent no text"}
    return {
        "ttft_s": first - started,
        "headers_s": headers_s,
        "per_token_s": (last - first) / (texts - 1) if texts > 1 else None,
        "texts": texts,
        "chars": chars,
        "gaps": gaps,
        "total_s": time.perf_counter() - started,
    }


async def agent(args: argparse.Namespace) -> int:
    import httpx

    from peerinfer.network.addresses import parse_bootstrap
    from peerinfer.network.dht import DhtNode
    from peerinfer.network.ice import IceDialer
    from peerinfer.network.ice_config import parse_ice_servers

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    breakdown = Breakdown()
    ice_log = logging.getLogger("peerinfer.network.ice")
    ice_log.setLevel(logging.DEBUG)
    ice_log.addHandler(breakdown)
    node = DhtNode(host="0.0.0.0", port=0, network_id=args.net, bootstrap=parse_bootstrap(args.bootstrap))
    signalling = Recording(node)
    dialer = IceDialer(signalling, parse_ice_servers(args.ice))
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=1024)
    http = httpx.AsyncClient(timeout=120, limits=limits, trust_env=False)
    loop = asyncio.get_running_loop()

    async def base_of(target: str) -> tuple[str, str | None]:
        if target.startswith("ice:"):
            tunnel = await dialer.tunnel(target[4:])
            return tunnel.base_url, tunnel.path
        return target, None

    async def handle(request: dict[str, Any]) -> dict[str, Any]:
        op = request["op"]
        if op == "open":
            puts, heard, attempts = len(signalling.put_sizes), len(signalling.heard_sizes), len(breakdown.attempts)
            started = time.perf_counter()
            tunnel = await dialer.tunnel(request["peer"])
            return {
                "s": time.perf_counter() - started,
                "path": tunnel.path,
                "attempts": breakdown.attempts[attempts:],
                "offer_bytes": signalling.put_sizes[puts:],
                "heard_bytes": signalling.heard_sizes[heard:],
            }
        if op == "close":
            open_path = dialer.tunnel_of(request["peer"])
            if open_path is not None:
                await open_path.close()
            return {}
        if op == "connect":
            started = time.perf_counter()
            _, writer = await asyncio.open_connection(request["host"], request["port"])
            took = time.perf_counter() - started
            writer.close()
            return {"s": took}
        if op == "stream":
            base, path = await base_of(request["target"])
            return {**await stream_once(http, base, request["prompt"], request["max_tokens"]), "path": path}
        if op == "pair":  # on a new HTTP connection, then again at once on the same one (kept alive)
            base, path = await base_of(request["target"])
            pair = []
            async with httpx.AsyncClient(timeout=120, trust_env=False) as fresh:
                for conn, prompt in zip(("new", "reused"), request["prompts"], strict=True):
                    try:
                        got = await stream_once(fresh, base, prompt, request["max_tokens"])
                    except Exception as exc:  # counted by the driver as this path's failure, not the run's
                        got = {"error": f"{type(exc).__name__}: {exc}"}
                    pair.append({**got, "path": path, "conn": conn})
            return {"pair": pair}
        if op == "load":
            base, _ = await base_of(request["target"])
            deadline_s = request["max_tokens"] / TOKENS_PER_S + 20.0
            streams = await asyncio.gather(
                *(
                    asyncio.wait_for(stream_once(http, base, f"load {i}", request["max_tokens"]), deadline_s)
                    for i in range(request["streams"])
                ),
                return_exceptions=True,
            )
            return {"streams": [g if isinstance(g, dict) else {"error": repr(g)} for g in streams]}
        if op == "rtt":
            rtts = await loop.run_in_executor(None, stun_rtts, request["host"], request["port"], request["count"])
            return {"rtts": rtts}
        raise ValueError(f"unknown op {op!r}")

    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line or line.strip() == "quit":
                break
            try:
                answer = await handle(json.loads(line))
            except Exception as exc:
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()
    finally:
        await dialer.aclose()
        await http.aclose()
        node.close()
    return 0


async def turnload(args: argparse.Namespace) -> int:
    """N TURN allocations (the client's side) and N plain UDP sockets (the worker's side) in this namespace.

    Each stream sends, per token, ``down`` packets of ``down_bytes`` from the plain socket to the
    allocation's relayed address and ``up`` packets of ``up_bytes`` back through the allocation,
    at ``--rate`` tokens/s. Prints ``READY`` when every allocation exists, then at EOF on stdin the
    packets each side received, as JSON.
    """
    from aioice.stun import TransactionFailed
    from aioice.turn import create_turn_endpoint

    loop = asyncio.get_running_loop()
    received = {"down": 0, "up": 0}

    class Count(asyncio.DatagramProtocol):
        def __init__(self, side: str) -> None:
            self.side = side

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            received[self.side] += 1

    pairs = []

    async def allocate() -> Any:
        for attempt in range(3):
            try:
                turn, _ = await create_turn_endpoint(lambda: Count("down"), RELAY, args.username, args.password)
                return turn
            except TransactionFailed as exc:  # e.g. 437 when a retransmitted Allocate meets its own allocation
                print(f"allocation attempt {attempt + 1} failed: {exc}", file=sys.stderr)
        raise SystemExit("turnload: the relay refused 3 allocations in a row")

    for _ in range(args.streams):
        turn = await allocate()
        relayed = turn.get_extra_info("sockname")
        peer, _ = await loop.create_datagram_endpoint(lambda: Count("up"), local_addr=(args.peer_host, 0))
        pairs.append((turn, relayed, peer, peer.get_extra_info("sockname")))
    for turn, _, _, peer_addr in pairs:  # a permission (and channel) for the worker's side
        turn.sendto(b"\0" * 4, peer_addr)
    await asyncio.sleep(0.5)
    print("READY", flush=True)
    down = b"\x17" * args.down_bytes
    up = b"\x17" * args.up_bytes
    period = 1.0 / args.rate
    stop = asyncio.Event()

    async def one(index: int) -> None:
        turn, relayed, peer, peer_addr = pairs[index]
        await asyncio.sleep(period * index / len(pairs))
        owed_down = owed_up = 0.0
        while not stop.is_set():
            owed_down += args.down
            owed_up += args.up
            while owed_down >= 1:
                peer.sendto(down, relayed)
                owed_down -= 1
            while owed_up >= 1:
                turn.sendto(up, peer_addr)
                owed_up -= 1
            await asyncio.sleep(period)

    tasks = [asyncio.create_task(one(i)) for i in range(len(pairs))]
    await loop.run_in_executor(None, sys.stdin.read)
    stop.set()
    await asyncio.gather(*tasks)
    print(json.dumps(received), flush=True)
    for turn, _, peer, _ in pairs:
        turn.close()
        peer.close()
    return 0


def fake_app() -> Any:
    """The relay-load worker: the fake engine, a text every 50 ms, room for every stream at once."""
    from peerinfer.engine.fake import FakeEngine
    from peerinfer.server.app import create_app
    from peerinfer.settings import load_worker_settings

    engine = FakeEngine(lambda prompt: LONG_TEXT, token_delay_s=1 / TOKENS_PER_S, slots=512, max_queue=64)
    return create_app(load_worker_settings(), engine)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    one = sub.add_parser("agent", help="the measuring agent: JSON requests on stdin, answers on stdout")
    one.add_argument("--net", type=int, required=True)
    one.add_argument("--bootstrap", required=True)
    one.add_argument("--ice", required=True)
    two = sub.add_parser("turnload", help="synthetic TURN streams until stdin closes")
    two.add_argument("--streams", type=int, required=True)
    two.add_argument("--username", required=True)
    two.add_argument("--password", required=True)
    two.add_argument("--rate", type=float, default=TOKENS_PER_S)
    two.add_argument("--down", type=float, required=True)
    two.add_argument("--down-bytes", type=int, required=True)
    two.add_argument("--up", type=float, required=True)
    two.add_argument("--up-bytes", type=int, required=True)
    two.add_argument("--peer-host", required=True)
    three = sub.add_parser("rtt", help="STUN round trips to HOST PORT, COUNT of them, as JSON")
    three.add_argument("host")
    three.add_argument("port", type=int)
    three.add_argument("count", type=int)
    args = parser.parse_args()
    if args.mode == "rtt":
        print(json.dumps(stun_rtts(args.host, args.port, args.count)))
        return 0
    if args.mode == "agent":
        return asyncio.run(agent(args))
    return asyncio.run(turnload(args))


if __name__ == "__main__":
    sys.exit(main())
