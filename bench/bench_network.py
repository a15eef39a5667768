"""Network benchmark: discovery time, the cost of choosing a peer, and recovery from a killed worker.

    .venv/bin/python bench/bench_network.py [--reps 5]

Everything runs on 127.0.0.1: one bootstrap DHT node and real-model workers, each a separate
``python -m uvicorn worker:app`` process with 1 thread and 2 slots. Prints a markdown table.

- start to discovery: from launching a worker process to a client's lookup listing it (model
  load and the worker's one-off speed measurement included).
- TTFT direct / routed: time to first token of the same request sent straight to a worker's URL,
  through a warm ``RoutedClient`` (lookup cached; 2 probes in parallel + the request), and through a
  cold one (DHT join, lookup, probes, signed-nonce check, then the request).
- recovery: a worker is killed with -9 while it serves the request, before its first token
  (during prefill of a long prompt) or after 20 streamed tokens; the time from the kill to the next
  token, which comes from the other worker. Every long prompt is new to the workers, so none of it
  is reused from a slot's cache.
- under attack (``--flood N,M``, default 60,2000; ``--only-flood`` runs just this row, with one
  worker): N self-signed records claiming 4096 free slots at an endpoint that accepts connections
  and never answers, and M garbage values, all under the model key; TTFT of a cold routed client
  (DHT join, a lookup that reads the flood, the choice among N + 1 peers, the request).
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
import threading
import time
from collections.abc import Callable
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from peerinfer.client.routed import RoutedClient  # noqa: E402
from peerinfer.client.sdk import PeerInferClient  # noqa: E402
from peerinfer.network.dht import DhtNode  # noqa: E402
from peerinfer.network.identity import PeerIdentity, b64  # noqa: E402
from peerinfer.network.records import PeerRecord, model_key, sign_record  # noqa: E402

NET = 0x42454E43  # "BENC"
QUESTION = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


def long_prompt(number: int) -> list[dict[str, str]]:
    """About 420 tokens, different from its first line on: no worker holds any of it (prefix reuse)."""
    text = f"Text {number}. Summarise it. " + "The lighthouse stood on the rocks by the sea. " * 40
    return [{"role": "user", "content": text}]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Worker:
    def __init__(self, boot_port: int, home: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "PEERINFER_BOOTSTRAP": f"127.0.0.1:{boot_port}",
            "PEERINFER_NETWORK_ID": str(NET),
            "PEERINFER_HOME": str(home),
            "PEERINFER_N_THREADS": "1",
            "PEERINFER_SLOTS": "2",
            "PEERINFER_N_CTX": "1024",
            "PEERINFER_LOG_LEVEL": "WARNING",
        }
        command = [sys.executable, "-m", "uvicorn", "worker:app", "--host", "127.0.0.1", "--port", str(self.port)]
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def kill(self) -> float:
        self.proc.send_signal(signal.SIGKILL)
        killed = time.perf_counter()
        self.proc.wait()
        return killed


def wait_discovered(client: RoutedClient, url: str, timeout_s: float = 120) -> float:
    deadline = time.perf_counter() + timeout_s
    while url not in {record.endpoints[0] for record in client.peers(fresh=True)}:
        if time.perf_counter() > deadline:
            raise SystemExit(f"worker {url} was not discovered within {timeout_s} s")
        time.sleep(0.05)
    return time.perf_counter()


def ttft(stream_factory: Callable[[], object]) -> float:
    started = time.perf_counter()
    stream = stream_factory()
    for _ in stream:  # type: ignore[attr-defined]
        return time.perf_counter() - started
    raise SystemExit("no token")


def recovery(client: RoutedClient, workers: dict[str, Worker], messages: list[dict[str, str]], after: int) -> float:
    """Seconds from killing the serving worker to the next token; ``after`` tokens stream first."""
    stream = client.chat_stream(messages, max_tokens=60, temperature=0)
    killed: list[float] = []
    if after == 0:
        # Kill while the prompt is still being read: the request is in flight, no token yet.
        def killer() -> None:
            while stream.peer_url is None:
                time.sleep(0.001)
            time.sleep(0.1)
            killed.append(workers[stream.peer_url].kill())

        threading.Thread(target=killer, daemon=True).start()
    for count, _ in enumerate(stream, start=1):
        if killed:
            return time.perf_counter() - killed[0]
        if after and count == after:
            killed.append(workers[str(stream.peer_url)].kill())
    raise SystemExit("the answer ended before the kill took effect")


def black_hole() -> socket.socket:
    """A port that accepts every connection, holds it open, and never reads or answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(sock.accept()[0])
            except OSError:  # closed at the end of the row
                for conn in held:
                    conn.close()
                return

    threading.Thread(target=accept, daemon=True).start()
    return sock


def flood(boot: DhtNode, sha256: str, holes: int, garbage: int, hole_url: str) -> None:
    """``holes`` self-signed records at ``hole_url`` claiming 4096 free slots, and ``garbage`` random values."""
    now = time.time()
    for _ in range(holes):
        liar = PeerIdentity.generate()
        record = PeerRecord(
            peer_id=liar.peer_id,
            public_key=b64(liar.public_key),
            endpoints=(hole_url,),
            model="liar",
            sha256=sha256,
            n_ctx=2048,
            slots_total=4096,
            slots_free=4096,
            queue=0,
            tokens_per_s=9999.0,
            issued_at=now,
            expires_at=now + 600,
            instance=os.urandom(8).hex(),
        )
        boot.put(model_key(sha256), sign_record(record, liar))
    for _ in range(garbage):
        boot.put(model_key(sha256), os.urandom(500))


LISTED: list[int] = []  # peers each attacked client's lookup listed (the flood is read in part)


def attacked_ttft(bootstrap: str, reps: int) -> tuple[list[float], list[float]]:
    """TTFT and the choice alone of cold clients while the flood is there."""
    ttfts, picks = [], []
    for _ in range(reps):
        started = time.perf_counter()
        with RoutedClient(bootstrap, network_id=NET) as client:
            LISTED.append(len(client.peers()))
            looked_up = time.perf_counter()
            client.pick(set())
            picks.append(time.perf_counter() - looked_up)
            for _ in client.chat_stream(QUESTION, max_tokens=8, temperature=0):
                ttfts.append(time.perf_counter() - started)
                break
    return ttfts, picks


def summary(values: list[float]) -> str:
    ms = [value * 1000 for value in values]
    return f"{statistics.median(ms):.0f} | {min(ms):.0f} | {max(ms):.0f}"


class _Done(Exception):
    """``--only-flood``: the attack row is measured, skip the others."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--flood", default="60,2000", help="N black-hole records, M garbage values")
    parser.add_argument("--only-flood", action="store_true", help="one worker and the attack row only")
    args = parser.parse_args()
    holes, garbage = (int(part) for part in args.flood.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="peerinfer-bench-"))
    boot = DhtNode(host="127.0.0.1", port=0, network_id=NET)
    bootstrap = f"127.0.0.1:{boot.port}"
    names = ("discovery", "direct", "warm", "cold", "pick", "join", "long", "before", "after", "attack", "choice")
    rows: dict[str, list[float]] = {name: [] for name in names}
    workers: dict[str, Worker] = {}
    homes = iter(range(1000))

    def spawn(client: RoutedClient) -> Worker:
        worker = Worker(boot.port, tmp / f"home{next(homes)}")
        workers[worker.url] = worker
        rows["discovery"].append(wait_discovered(client, worker.url) - worker.started)
        return worker

    try:
        with RoutedClient(bootstrap, network_id=NET, lookup_ttl_s=0, probe_count=2) as watcher:
            if args.only_flood:
                only = spawn(watcher)
                hole = black_hole()
                sha256 = requests.get(only.url + "/health", timeout=5).json()["sha256"]
                flood(boot, sha256, holes, garbage, f"http://127.0.0.1:{hole.getsockname()[1]}")
                time.sleep(2)  # let the puts land
                rows["attack"], rows["choice"] = attacked_ttft(bootstrap, args.reps)
                hole.close()
                raise _Done
            first, second = spawn(watcher), spawn(watcher)
            direct = PeerInferClient(first.url)
            direct.chat(QUESTION, max_tokens=1)
            with RoutedClient(bootstrap, network_id=NET, probe_count=2, lookup_ttl_s=60) as warm:
                warm.chat(QUESTION, max_tokens=1)
                for rep in range(args.reps):  # interleaved, so load drift hits both alike
                    rows["direct"].append(ttft(lambda: direct.chat_stream(QUESTION, max_tokens=8, temperature=0)))
                    rows["warm"].append(ttft(lambda: warm.chat_stream(QUESTION, max_tokens=8, temperature=0)))
                    started = time.perf_counter()
                    warm.pick(set())
                    rows["pick"].append(time.perf_counter() - started)
                    prompt = long_prompt(rep)
                    rows["long"].append(ttft(lambda p=prompt: direct.chat_stream(p, max_tokens=8, temperature=0)))
            for _ in range(args.reps):
                started = time.perf_counter()
                with RoutedClient(bootstrap, network_id=NET, probe_count=2) as cold:
                    cold.pick(set())
                    rows["join"].append(time.perf_counter() - started)
                    for _ in cold.chat_stream(QUESTION, max_tokens=8, temperature=0):
                        rows["cold"].append(time.perf_counter() - started)
                        break
            for case, after in (("before", 0), ("after", 20)):
                for rep in range(args.reps):
                    messages = long_prompt(1000 + rep) if case == "before" else QUESTION
                    with RoutedClient(bootstrap, network_id=NET, probe_count=2, lookup_ttl_s=60) as client:
                        client.peers()
                        rows[case].append(recovery(client, workers, messages, after))
                    # Replace the killed worker so the next repetition again has two.
                    for url, worker in list(workers.items()):
                        if worker.proc.poll() is not None:
                            del workers[url]
                            spawn(watcher)
            hole = black_hole()
            live = next(worker for worker in workers.values() if worker.proc.poll() is None)  # recovery killed some
            sha256 = requests.get(live.url + "/health", timeout=5).json()["sha256"]
            flood(boot, sha256, holes, garbage, f"http://127.0.0.1:{hole.getsockname()[1]}")
            time.sleep(2)
            rows["attack"], rows["choice"] = attacked_ttft(bootstrap, args.reps)
            hole.close()
            del first, second
    except _Done:
        pass
    finally:
        for worker in workers.values():
            if worker.proc.poll() is None:
                worker.proc.terminate()
                worker.proc.wait()
        boot.close()

    labels = {
        "discovery": "worker process start → listed by a client (model load included)",
        "direct": "TTFT, direct --url request (8 tokens)",
        "warm": "TTFT, routed, warm client (2 probes + request)",
        "cold": "TTFT, routed, cold client (DHT join + lookup + probes + nonce + request)",
        "pick": "choosing a peer alone, warm client (2 health probes in parallel)",
        "join": "choosing a peer alone, cold client (DHT join + lookup + probes + nonce check)",
        "long": "TTFT, direct, a 420-token prompt like those used below (reference: its prefill)",
        "before": "recovery, worker killed before first token (kill → first token elsewhere)",
        "after": "recovery, worker killed after 20 tokens (kill → next token elsewhere)",
        "attack": f"TTFT, routed, cold client, with {holes} black-hole records and {garbage} garbage values",
        "choice": f"choosing a peer alone (after the lookup), with {holes} black holes claiming 4096 free slots",
    }
    print(f"| measurement (n={args.reps}; discovery n={len(rows['discovery'])}) | median ms | min ms | max ms |")
    print("|---|---|---|---|")
    for key, label in labels.items():
        if rows[key]:
            print(f"| {label} | {summary(rows[key])} |")
    if LISTED:
        print(f"\nUnder attack, each cold client's lookup listed {LISTED} peers (of {holes} + the real ones).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
