"""Prefix reuse benchmark: many requests that start with the same long system prompt.

    .venv/bin/python bench/bench_prefix.py                  # writes the prefix section of bench/RESULTS.md
    .venv/bin/python bench/bench_prefix.py --quick          # fewer requests, prints only

Each round starts every server fresh and sends, per concurrency level, requests that share a system
prompt of ~1370 tokens (Gemma 3) and differ in their last line. The first request of a round reads
the whole prompt; the rest may find it in the server's cache. Same model, threads, context per
stream and prompts for every server, one server at a time on the machine.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import REPO, free_port, serve, servers, stream_completion, worker_env, write_results
from quantiles import quantile

sys.path.insert(0, str(REPO))
from peerinfer.engine.model_files import open_model_file

RULES = [
    "Greet the traveller by name when it is given.",
    "Quote fares in rupees and say which class they are for.",
    "Say that Tatkal bookings open one day before the journey, at 10:00 for AC classes and 11:00 for others.",
    "Never ask for a card number, a password or an OTP.",
    "When a train is late, give the running status source and advise checking again before leaving.",
    "For refunds, explain that the amount depends on how long before departure the ticket is cancelled.",
    "Answer in the traveller's language: Hindi, Tamil, Bengali, Marathi, Telugu or English.",
    "Keep answers short: three sentences unless the traveller asks for more.",
]
SYSTEM = (
    "You are Saathi, the enquiry assistant of a railway booking service in India. "
    "Follow these rules in every answer.\n"
    + "".join(
        f"Rule {number}. {rule} This rule applies to every station and every train.\n"
        for number, rule in enumerate(RULES * 4, start=1)
    )
    + "Examples of good answers follow.\n"
    + "".join(f"Q: What is rule {n}?\nA: Rule {n} says: {RULES[n % len(RULES)]}\n" for n in range(1, 9))
)
QUESTIONS = [
    "When does Tatkal booking open for the Rajdhani?",
    "My train from Chennai is late, what should I do?",
    "How much refund do I get if I cancel today?",
    "Can you book a sleeper ticket from Pune to Nagpur?",
    "ट्रेन का किराया कितना है?",
    "Is there a pantry car on the Shatabdi?",
    "What do I need to show at the station?",
    "Can I change the name on my ticket?",
]


@dataclass
class Sample:
    ttft_s: float
    cached: int | None
    prompt_tokens: int | None = None
    error: str | None = None


@dataclass
class Row:
    system: str
    concurrency: int
    cold: list[Sample] = field(default_factory=list)
    warm: list[Sample] = field(default_factory=list)


def ask(url: str, question: str, max_tokens: int) -> Sample:
    streamed = stream_completion(url, f"{SYSTEM}\nQ: {question}\nA:", max_tokens)
    if streamed.error is not None:
        return Sample(0, None, None, streamed.error)
    details = streamed.usage.get("prompt_tokens_details") or {}
    cached = int(details["cached_tokens"]) if "cached_tokens" in details else None
    prompt_tokens = streamed.usage.get("prompt_tokens")
    if streamed.first_s is None:
        return Sample(0, cached, prompt_tokens, "no tokens")
    return Sample(streamed.first_s, cached, prompt_tokens)


def run_level(row: Row, url: str, concurrency: int, waves: int, max_tokens: int) -> None:
    """One cold request alone, then ``waves`` waves of ``concurrency`` requests at once."""
    row.cold.append(ask(url, QUESTIONS[0], max_tokens))
    lock = threading.Lock()

    def client(index: int, wave: int) -> None:
        sample = ask(url, QUESTIONS[(1 + index + wave * concurrency) % len(QUESTIONS)], max_tokens)
        with lock:
            row.warm.append(sample)

    for wave in range(waves):
        threads = [threading.Thread(target=client, args=(index, wave)) for index in range(concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()


def table(rows: list[Row]) -> str:
    lines = [
        "| system | conc. | prompt tokens | cold TTFT ms (median) | warm requests | warm TTFT p50 ms "
        "| warm TTFT p90 ms | cached tokens (median, warm) | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        cold = [1000 * s.ttft_s for s in row.cold if s.error is None]
        warm = [1000 * s.ttft_s for s in row.warm if s.error is None]
        cached = [s.cached for s in row.warm if s.cached is not None]
        errors = sum(1 for s in [*row.cold, *row.warm] if s.error is not None)
        counts = [s.prompt_tokens for s in [*row.cold, *row.warm] if s.prompt_tokens is not None]
        lines.append(
            f"| {row.system} | {row.concurrency} | {statistics.median_low(counts) if counts else 'not reported'} | "
            f"{statistics.median(cold):.0f} | {len(warm)} | "
            f"{quantile(warm, 0.5):.0f} | {quantile(warm, 0.9):.0f} | "
            f"{statistics.median_low(cached) if cached else 'not reported'} | {errors} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--levels", default="1,4")
    parser.add_argument("--waves", type=int, default=4, help="waves of requests per level after the cold one")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--only", default="", help="comma-separated systems to run (default: all found)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    levels = [int(level) for level in args.levels.split(",")]
    waves = 1 if args.quick else args.waves
    model = open_model_file(None, Path.home() / ".cache" / "peerinfer").path
    wanted = {name.strip() for name in args.only.split(",") if name.strip()}
    entries = servers(model, args.threads, args.n_ctx, args.slots)
    worker = entries["peerinfer worker"]
    entries = {
        "peerinfer worker": worker,
        "peerinfer worker, prefix_cache=false": lambda port: ["env", "PEERINFER_PREFIX_CACHE=false", *worker(port)],
        **{name: command for name, command in entries.items() if not name.startswith("peerinfer")},
    }
    env = worker_env(model, args.threads, args.n_ctx, args.slots)
    rows: dict[tuple[str, int], Row] = {}
    for round_number in range(args.rounds):
        print(f"round {round_number + 1} of {args.rounds}", file=sys.stderr)
        for name, command in entries.items():
            if wanted and not any(name.startswith(w) for w in wanted):
                continue
            for level in levels:  # a fresh server per level: its first request is really cold
                port = free_port()
                print(f"running {name} at concurrency {level} ...", file=sys.stderr)
                url, process = serve(command(port), env, port)
                try:
                    row = rows.setdefault((name, level), Row(name, level))
                    run_level(row, url, level, waves, args.max_tokens)
                finally:
                    process.terminate()
                    process.wait(timeout=30)
    report = table(list(rows.values()))
    print(report)
    if not args.quick:
        command = "bash bench/setup_peers.sh && .venv/bin/python bench/bench_prefix.py " + shlex.join(sys.argv[1:])
        body = (
            "## Prefix reuse\n\n"
            f"Command: `{command.strip()}`\n\n"
            "Requests share a system prompt and differ in their last line (prompt tokens: as each server "
            f"counts them); {args.max_tokens} max tokens, temperature 0, {args.threads} threads, "
            f"{args.slots} slots, {args.rounds} round(s) pooled, a fresh server per level and round, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Cold: the first request, which reads the "
            f"whole prompt. Warm: {waves} waves of as many requests at once as the concurrency.\n\n"
            f"{report}\n"
        )
        write_results("prefix", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
