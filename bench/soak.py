"""Soak test of one worker: many requests of mixed lengths, some clients vanishing mid-stream.

    .venv/bin/python bench/soak.py                       # 300 requests at concurrency 4, writes RESULTS.md
    .venv/bin/python bench/soak.py --requests 40 --quick # a short run that only prints

Records the worker's resident memory before and after, and every error.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import PROMPTS, REPO, free_port, serve, write_results


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one_request(url: str, rng: random.Random, counts: dict[str, int], errors: list[str], lock: threading.Lock) -> None:
    max_tokens = rng.choice([8, 32, 96, 200])
    prompt = rng.choice(PROMPTS) * rng.choice([1, 1, 4, 12])  # some long prompts, read in several chunks
    disconnect_after = rng.choice([None, None, None, 3])  # a quarter of the clients vanish mid-stream
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "stream": True}
    outcome = "completed"
    try:
        with requests.post(url + "/v1/completions", json=body, stream=True, timeout=300) as response:
            if response.status_code != 200:
                outcome = f"http {response.status_code}"
            else:
                events = 0
                for line in response.iter_lines():
                    if line.startswith(b"data: {"):
                        events += 1
                        if disconnect_after is not None and events >= disconnect_after:
                            outcome = "disconnected"
                            break
                    elif line == b"data: [DONE]":
                        break
                else:
                    outcome = "cut short"
    except requests.RequestException as exc:
        outcome = f"error {type(exc).__name__}"
    with lock:
        counts[outcome] = counts.get(outcome, 0) + 1
        if outcome not in ("completed", "disconnected"):
            errors.append(outcome)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="print only; don't write RESULTS.md")
    args = parser.parse_args()
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("PEERINFER_")}
    env["PEERINFER_LOG_LEVEL"] = "WARNING"
    command = [
        str(REPO / ".venv/bin/python"),
        "-m",
        "uvicorn",
        "worker:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    url, process = serve(command, env, port)
    rng = random.Random(42)
    counts: dict[str, int] = {}
    errors: list[str] = []
    lock = threading.Lock()
    try:
        for _ in range(8):  # warm-up, so allocator and caches settle before the baseline
            one_request(url, rng, {}, [], lock)
        time.sleep(1)
        before = rss_mb(process.pid)
        started = time.monotonic()
        remaining = [args.requests]

        def client() -> None:
            local = random.Random(rng.random())
            while True:
                with lock:
                    if remaining[0] <= 0:
                        return
                    remaining[0] -= 1
                one_request(url, local, counts, errors, lock)

        threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
        for thread in threads:
            thread.start()
        samples = []
        while any(thread.is_alive() for thread in threads):
            samples.append(rss_mb(process.pid))
            time.sleep(2)
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
        time.sleep(1)
        after = rss_mb(process.pid)
        health = requests.get(url + "/health", timeout=5).json()
    finally:
        process.terminate()
        process.wait(timeout=30)
    report = (
        "| requests | concurrency | duration s | outcomes | errors | RSS before MB | RSS peak MB "
        "| RSS after MB | growth MB |\n| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |\n"
        f"| {args.requests} | {args.concurrency} | {elapsed:.0f} | "
        f"{', '.join(f'{k}: {v}' for k, v in sorted(counts.items()))} | {len(errors)} | {before:.1f} | "
        f"{max(samples, default=after):.1f} | {after:.1f} | {after - before:+.1f} |\n\n"
        f"After the run: slots busy {health['slots_busy']}, waiting {health['requests_waiting']}."
    )
    print(report)
    if not args.quick:
        cmd = ".venv/bin/python bench/soak.py " + " ".join(sys.argv[1:])
        write_results("soak", f"## Soak (issue 3)\n\nCommand: `{cmd.strip()}`\n\n{report}\n")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
