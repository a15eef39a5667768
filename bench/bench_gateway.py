"""Gateway benchmark: what the gateway adds to a request, and how many streams one gateway core carries.

    .venv/bin/python bench/bench_gateway.py [--rounds 10] [--streams 64,128] [--only overhead|carry]

Everything runs on 127.0.0.1: one bootstrap DHT node, workers in their own processes, and the gateway
in its own process (``python -m peerinfer gateway``, one event loop), so the measuring client shares
a core with neither.

- overhead: one real-model worker (``worker:app``, the bundled model, 4 slots) and a gateway in
  front of it. Each round sends the same streamed chat request straight to the worker and through
  the gateway, in alternating order (so load drift hits both alike), at concurrency 1 and 4.
  TTFT is from sending to the first text; time per token is (last text - first text) / (texts - 1)
  of each stream. The table gives p50 of both paths and the difference (gateway - direct). The
  gateway asks its worker with a probe of ``/health`` before each request (its routing core's
  choice), which is part of what it adds.
- carry: two fake-engine workers (64 slots each, one token every 20 ms, so the workers are never
  the bottleneck) and one gateway; N streams at once, first all straight to the workers (split
  between them), then all through the gateway. For each stream the gaps between its texts; the
  table gives p50 and p99 of those gaps both ways and what the gateway added to each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from quantiles import quantile  # noqa: E402

from peerinfer.network.dht import DhtNode  # noqa: E402

NET = 0x47415445  # "GATE"
QUESTION = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
GATEWAY = (
    "import argparse, sys\n"
    "from peerinfer.gateway.cli import add_gateway_parser, run_gateway\n"
    "parser = argparse.ArgumentParser()\n"
    "add_gateway_parser(parser.add_subparsers(dest='command'))\n"
    "sys.exit(run_gateway(parser.parse_args(sys.argv[1:]), sys.stderr))\n"
)
FAKE_WORKER = (
    "import socket, sys, uvicorn\n"
    "from peerinfer.engine.fake import FakeEngine\n"
    "from peerinfer.server.app import create_app\n"
    "from peerinfer.settings import WorkerSettings\n"
    "from tests.network_support import story_responder\n"
    "sock = socket.socket(); sock.bind(('127.0.0.1', 0)); url = f'http://127.0.0.1:{sock.getsockname()[1]}'\n"
    "settings = WorkerSettings(announce_url=url, exit_on_load_failure=False, log_level='WARNING', max_queue=256)\n"
    "engine = FakeEngine(story_responder, token_delay_s=0.02, slots=64, max_queue=256)\n"
    "print('URL', url, flush=True)\n"
    "uvicorn.Server(uvicorn.Config(create_app(settings, engine), log_level='warning')).run(sockets=[sock])\n"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def network_env(boot: DhtNode, home: Path) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("PEERINFER_")},
        "PYTHONPATH": str(REPO),
        "PEERINFER_BOOTSTRAP": f"127.0.0.1:{boot.port}",
        "PEERINFER_NETWORK_ID": str(NET),
        "PEERINFER_HOME": str(home),
        "PEERINFER_LOG_LEVEL": "WARNING",
        "PEERINFER_RECORD_REFRESH_S": "1",
    }


def wait_for(condition: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if condition():  # type: ignore[operator]
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} within {timeout_s:g} s")
        time.sleep(0.2)


class Process:
    def __init__(self, command: list[str], env: dict[str, str], url_line: bool) -> None:
        self.proc = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE if url_line else subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.url = ""
        if url_line and self.proc.stdout is not None:
            self.url = self.proc.stdout.readline().split()[-1]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def real_worker(boot: DhtNode, home: Path, threads: int | None = None) -> Process:
    port = free_port()
    env = {**network_env(boot, home), "PEERINFER_SLOTS": "4", "PEERINFER_N_CTX": "1024"}
    if threads is not None:
        env["PEERINFER_N_THREADS"] = str(threads)
    env["PEERINFER_ANNOUNCE_URL"] = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "uvicorn", "worker:app", "--host", "127.0.0.1", "--port", str(port)]
    worker = Process(command, env, url_line=False)
    worker.url = f"http://127.0.0.1:{port}"
    wait_for(lambda: httpx.get(worker.url + "/health").status_code == 200, 300, "the real worker did not load")
    return worker


def gateway(boot: DhtNode, home: Path, peers: int, sha256: str) -> Process:
    port = free_port()
    env = {**network_env(boot, home), "PEERINFER_LOOKUP_TTL_S": "5"}
    command = [sys.executable, "-c", GATEWAY, "gateway", "--port", str(port), "--sha256", sha256]
    process = Process(command, env, url_line=False)
    process.url = f"http://127.0.0.1:{port}"
    wait_for(lambda: httpx.get(process.url + "/health").json()["peers_known"] >= peers, 60, "the gateway saw no peers")
    return process


@dataclass
class Stream:
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    texts: int = 0

    @property
    def per_token_s(self) -> float | None:
        return sum(self.gaps_s) / len(self.gaps_s) if self.gaps_s else None


async def stream(client: httpx.AsyncClient, url: str, body: dict[str, object]) -> Stream:
    result = Stream()
    started = time.perf_counter()
    last: float | None = None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise SystemExit(f"{url} answered {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            if not choices[0].get("delta", {}).get("content"):
                continue
            now = time.perf_counter()
            if last is None:
                result.ttft_s = now - started
            else:
                result.gaps_s.append(now - last)
            last = now
            result.texts += 1
    return result


async def batch(urls: list[str], count: int, body: dict[str, object]) -> list[Stream]:
    limits = httpx.Limits(max_connections=count + 8, max_keepalive_connections=count + 8)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        return await asyncio.gather(*(stream(client, urls[i % len(urls)], body) for i in range(count)))


def ms(value: float) -> str:
    return f"{value * 1000:.1f}"


def overhead(boot: DhtNode, tmp: Path, rounds: int, threads: int | None = None) -> dict[int, dict[str, list[Stream]]]:
    """The paired rounds' streams, by concurrency and path ("direct", "gateway"); prints the table."""
    measured: dict[int, dict[str, list[Stream]]] = {}
    worker = real_worker(boot, tmp / "real", threads)
    front = gateway(boot, tmp / "gw-real", 1, httpx.get(worker.url + "/health").json()["sha256"])
    try:
        body = {"messages": QUESTION, "max_tokens": 48, "temperature": 0, "stream": True}
        print(f"worker threads: {threads or 'its default (all cores)'}\n")
        asyncio.run(batch([worker.url], 1, body))  # warm both paths
        asyncio.run(batch([front.url], 1, body))
        print(
            "| concurrency | TTFT p50 direct (ms) | TTFT p50 gateway (ms) | added (ms) | time/token p50 direct (ms) "
            "| time/token p50 gateway (ms) | added |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for concurrency in (1, 4):
            results: dict[str, list[Stream]] = {"direct": [], "gateway": []}
            for number in range(rounds):
                order = [("direct", worker.url), ("gateway", front.url)]
                for name, url in order if number % 2 == 0 else reversed(order):
                    results[name] += asyncio.run(batch([url], concurrency, body))
            measured[concurrency] = results
            ttft = {
                name: statistics.median(s.ttft_s for s in got if s.ttft_s is not None) for name, got in results.items()
            }
            tpot = {
                name: statistics.median(s.per_token_s for s in got if s.per_token_s is not None)
                for name, got in results.items()
            }
            added_ttft = ms(ttft["gateway"] - ttft["direct"])
            added_tpot = f"{100 * (tpot['gateway'] / tpot['direct'] - 1):+.1f}%"
            print(
                f"| {concurrency} | {ms(ttft['direct'])} | {ms(ttft['gateway'])} | {added_ttft} "
                f"| {ms(tpot['direct'])} | {ms(tpot['gateway'])} | {added_tpot} |"
            )
    finally:
        front.stop()
        worker.stop()
    return measured


def chart(measured: dict[int, dict[str, list[Stream]]], path: Path) -> None:
    """Box plots of every stream's TTFT and time per token, direct and through the gateway."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, what, unit in ((axes[0], "ttft_s", "TTFT (ms)"), (axes[1], "per_token_s", "time per token (ms)")):
        data, labels = [], []
        for concurrency, results in measured.items():
            for name in ("direct", "gateway"):
                values = [getattr(s, what) * 1000 for s in results[name] if getattr(s, what) is not None]
                data.append(values)
                labels.append(f"{name}\nc{concurrency}")
        axis.boxplot(data, tick_labels=labels, showfliers=False)
        axis.set_ylabel(unit)
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle("streamed chat, straight to the worker and through the gateway (paired rounds)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    print(f"\nchart: {path}")


def carry(boot: DhtNode, tmp: Path, counts: list[int]) -> None:
    workers = [
        Process([sys.executable, "-c", FAKE_WORKER], network_env(boot, tmp / f"fake{i}"), url_line=True)
        for i in range(2)
    ]
    for worker in workers:
        wait_for(lambda w=worker: httpx.get(w.url + "/health").status_code == 200, 60, "a fake worker did not start")
    front = gateway(boot, tmp / "gw-fake", 2, httpx.get(workers[0].url + "/health").json()["sha256"])
    try:
        body = {"messages": QUESTION, "stream": True}
        print()
        print(
            "| streams | gap p50 direct (ms) | gap p50 gateway (ms) | added p50 (ms) | gap p99 direct (ms) "
            "| gap p99 gateway (ms) | added p99 (ms) | streams whole |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for count in counts:
            direct = asyncio.run(batch([worker.url for worker in workers], count, body))
            through = asyncio.run(batch([front.url], count, body))
            whole = sum(s.texts == direct[0].texts for s in through)
            gaps = {name: [g for s in got for g in s.gaps_s] for name, got in (("d", direct), ("g", through))}
            p50 = (quantile(gaps["d"], 0.5), quantile(gaps["g"], 0.5))
            p99 = (quantile(gaps["d"], 0.99), quantile(gaps["g"], 0.99))
            print(
                f"| {count} | {ms(p50[0])} | {ms(p50[1])} | {ms(p50[1] - p50[0])} | {ms(p99[0])} | {ms(p99[1])} "
                f"| {ms(p99[1] - p99[0])} | {whole}/{count} |"
            )
    finally:
        front.stop()
        for worker in workers:
            worker.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="paired rounds per concurrency (default: 10)")
    parser.add_argument("--streams", default="64,128", help="concurrent streams to carry (default: 64,128)")
    parser.add_argument("--only", choices=("overhead", "carry"), default=None)
    parser.add_argument(
        "--worker-threads",
        type=int,
        default=None,
        help="the real worker's llama.cpp threads (default: its own, all cores); 1 leaves a core to the gateway",
    )
    parser.add_argument("--chart", type=Path, default=None, help="write box plots of the overhead rounds here (PNG)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="peerinfer-bench-gateway-"))
    boot = DhtNode(host="127.0.0.1", port=0, network_id=NET)
    try:
        print(f"# gateway benchmark ({os.cpu_count()} CPUs)\n")
        if args.only in (None, "overhead"):
            measured = overhead(boot, tmp, args.rounds, args.worker_threads)
            if args.chart is not None:
                chart(measured, args.chart)
        if args.only in (None, "carry"):
            carry(boot, tmp, [int(part) for part in args.streams.split(",")])
    finally:
        boot.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
