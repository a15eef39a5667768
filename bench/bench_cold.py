"""Cold prompt reading: this worker side by side with llama-server, paired by round (issue 14, part 1).

    .venv/bin/python bench/bench_cold.py            # writes the cold section of bench/RESULTS.md and bench/cold.png
    .venv/bin/python bench/bench_cold.py --quick    # one round, prints only

Each round starts every server once, with the context per slot raised to hold the longest prompt, and
sends, for each prompt length, ``--repeats`` requests that each start with a line no earlier request
had: nothing of the prompt is in any cache, so the whole prompt is read. The time to the first token
(one token asked for) is the read. Same model, threads, slots and prompts for every server; one server
runs at a time.

Then the cost to running streams: a stream is generating when the longest prompt arrives; its time
per token while that prompt is read, against its time per token before.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shlex
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import (
    ONE_ROW_KQ,
    REPO,
    cpu_name,
    free_port,
    serve,
    servers,
    stream_completion,
    worker_env,
    write_results,
)

sys.path.insert(0, str(REPO))
from peerinfer.engine.model_files import open_model_file

TEXT = (
    "The booking office at Howrah opens at eight. Tatkal tickets for AC classes open at ten, the day "
    "before the journey, and for other classes at eleven. A passenger may cancel a confirmed ticket up "
    "to four hours before departure; the refund depends on the class and on how early it is cancelled. "
    "Trains on the eastern lines were late this week because of fog near Kanpur and track work at Mughalsarai. "
)
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"  # a base model goes on counting: a stream that does not stop early
SYSTEMS = ("peerinfer worker", "bf16 peerinfer worker (stock attention)", "llama-server")


@dataclass
class Cell:
    ttft_s: list[float] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    errors: int = 0


@dataclass
class Interference:
    before_ms: float
    during_ms: float
    read_s: float


def prompt_of(tokenizer: object, length: int, tag: str) -> str:
    """About ``length`` tokens of text that start with ``tag`` (as the model's tokenizer counts them)."""
    head = f"Request {tag}.\n"
    used = len(tokenizer.tokenize(head.encode(), add_bos=True))  # type: ignore[attr-defined]
    ids = tokenizer.tokenize((TEXT * (length // 40 + 2)).encode(), add_bos=False)  # type: ignore[attr-defined]
    return head + tokenizer.detokenize(ids[: length - used]).decode("utf-8", "ignore")  # type: ignore[attr-defined]


def interference(url: str, long_prompt: str) -> Interference | None:
    """A running stream's time per token before and while ``long_prompt`` is read."""
    stamps: list[float] = []
    runner = threading.Thread(target=stream_completion, args=(url, COUNTING, 400), kwargs={"stamps": stamps})
    runner.start()
    while len(stamps) < 40 and runner.is_alive():
        time.sleep(0.005)
    sent = time.perf_counter()
    read = stream_completion(url, long_prompt, 1)
    done = time.perf_counter()
    runner.join()
    if read.error is not None or read.first_s is None or len(stamps) < 60:
        return None
    before = [b - a for a, b in itertools.pairwise(stamps[10:41])]
    during = [t for t in stamps if sent <= t <= done]
    if len(during) < 2:
        return Interference(1000 * statistics.median(before), 1000 * (done - sent), done - sent)
    return Interference(1000 * statistics.median(before), 1000 * (during[-1] - sent) / len(during), read.first_s)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="512,1372,4000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="cold requests per length, per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--chart", default=str(REPO / "bench" / "cold.png"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--section", default="cold", help="RESULTS.md section to write (default: cold)")
    args = parser.parse_args()
    lengths = [int(length) for length in args.lengths.split(",")]
    rounds = 1 if args.quick else args.rounds
    n_ctx = max(2048, max(lengths) + 512)
    model = open_model_file(None, Path.home() / ".cache" / "peerinfer").path
    import llama_cpp

    tokenizer = llama_cpp.Llama(str(model), vocab_only=True, verbose=False)
    found = servers(model, args.threads, n_ctx, args.slots)
    worker = found[SYSTEMS[0]]
    server = next((command for name, command in found.items() if name.startswith("llama-server")), None)
    # the one-row K-quant worker: what scripts/llama-cpp-patches/ggml-kq-rows.patch buys a prompt read
    commands = {SYSTEMS[0]: worker, SYSTEMS[1]: found[SYSTEMS[1]], ONE_ROW_KQ: found[ONE_ROW_KQ]}
    if server is not None:
        commands[SYSTEMS[2]] = server
    else:
        print("llama-server not built (bash bench/setup_peers.sh): its rows are left out", file=sys.stderr)
    env = worker_env(model, args.threads, n_ctx, args.slots)
    cells: dict[tuple[str, int, int], Cell] = {}
    crossed: dict[str, list[Interference]] = {name: [] for name in commands}
    for round_number in range(rounds):
        for name, command in commands.items():
            print(f"round {round_number + 1} of {rounds}: {name}", file=sys.stderr)
            port = free_port()
            url, process = serve(command(port), env, port)
            try:
                for length in lengths:
                    cell = cells.setdefault((name, length, round_number), Cell())
                    for repeat in range(args.repeats):
                        tag = f"{name[:4]}-{round_number}-{length}-{repeat}-{time.monotonic_ns()}"
                        read = stream_completion(url, prompt_of(tokenizer, length, tag), 1)
                        if read.error is not None or read.first_s is None:
                            cell.errors += 1
                            continue
                        cell.ttft_s.append(read.first_s)
                        cell.prompt_tokens.append(int(read.usage.get("prompt_tokens") or 0))
                tag = f"{name[:4]}-{round_number}-running-{time.monotonic_ns()}"
                measured = interference(url, prompt_of(tokenizer, max(lengths), tag))
                if measured is not None:
                    crossed[name].append(measured)
            finally:
                process.terminate()
                process.wait(timeout=30)
    report = tables(commands, lengths, rounds, cells, crossed)
    print(report)
    if not args.quick:
        chart(commands, lengths, rounds, cells, Path(args.chart))
        command = "bash bench/setup_peers.sh && .venv/bin/python bench/bench_cold.py " + shlex.join(sys.argv[1:])
        title = "" if args.section == "cold" else f": {args.section}"
        body = (
            f"## Cold prompt reading (issue 14, part 1){title}\n\n"
            f"Command: `{command.strip()}`\n\n"
            f"Machine: {os.cpu_count()} cores ({cpu_name()}).\n\n"
            f"{rounds} rounds, {args.repeats} cold requests per length and round, {args.threads} threads, "
            f"{args.slots} slots of {n_ctx} tokens, temperature 0, one token asked for, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Every request starts with a line of its own, "
            "so nothing is reused. Read: the time to the first token.\n\n"
            f"{report}\n\n![cold prompt reading]({Path(args.chart).name})\n"
        )
        write_results(args.section, body)
    return 0


def _median_ms(values: list[float]) -> str:
    return f"{1000 * statistics.median(values):.0f}" if values else "-"


def tables(
    commands: dict[str, object],
    lengths: list[int],
    rounds: int,
    cells: dict[tuple[str, int, int], Cell],
    crossed: dict[str, list[Interference]],
) -> str:
    lines = [
        "| system | prompt tokens | read ms (median) | prompt tokens/s | errors |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name in commands:
        for length in lengths:
            mine = [cells[(name, length, r)] for r in range(rounds) if (name, length, r) in cells]
            times = [t for cell in mine for t in cell.ttft_s]
            counts = [c for cell in mine for c in cell.prompt_tokens]
            tokens = statistics.median_low(counts) if counts else length
            rate = f"{tokens / statistics.median(times):.0f}" if times else "-"
            errors = sum(cell.errors for cell in mine)
            lines.append(f"| {name} | {tokens} | {_median_ms(times)} | {rate} | {errors} |")
    lines += [
        "",
        "Paired by round (each round's median read, llama-server's over the worker's: above 1 is faster):",
        "",
    ]
    lines += ["| prompt tokens | " + " | ".join(f"round {r + 1}" for r in range(rounds)) + " | median |"]
    lines += ["| ---: |" + " ---: |" * (rounds + 1)]
    for length in lengths:
        ratios: list[float] = []
        for r in range(rounds):
            ours = cells.get((SYSTEMS[0], length, r))
            theirs = cells.get((SYSTEMS[2], length, r))
            if ours and theirs and ours.ttft_s and theirs.ttft_s:
                ratios.append(statistics.median(theirs.ttft_s) / statistics.median(ours.ttft_s))
        shown = [f"{ratio:.2f}" for ratio in ratios] + ["-"] * (rounds - len(ratios))
        median = f"{statistics.median(ratios):.2f}" if ratios else "-"
        lines.append(f"| {length} | " + " | ".join(shown) + f" | {median} |")
    lines += [
        "",
        f"A running stream while a {max(lengths)}-token prompt is read (medians over rounds):",
        "",
        "| system | time per token before, ms | while the prompt is read, ms | ratio | read ms |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, measured in crossed.items():
        if not measured:
            lines.append(f"| {name} | - | - | - | - |")
            continue
        before = statistics.median(m.before_ms for m in measured)
        during = statistics.median(m.during_ms for m in measured)
        read = statistics.median(m.read_s for m in measured)
        lines.append(f"| {name} | {before:.1f} | {during:.1f} | {during / before:.2f} | {1000 * read:.0f} |")
    return "\n".join(lines)


def chart(
    commands: dict[str, object], lengths: list[int], rounds: int, cells: dict[tuple[str, int, int], Cell], path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(commands)
    for index, name in enumerate(commands):
        rates = []
        for length in lengths:
            times = [t for r in range(rounds) for t in cells.get((name, length, r), Cell()).ttft_s]
            rates.append(length / statistics.median(times) if times else 0)
        axis.bar([i + index * width for i in range(len(lengths))], rates, width, label=name)
    axis.set_xticks([i + width * (len(commands) - 1) / 2 for i in range(len(lengths))], [str(n) for n in lengths])
    axis.set(xlabel="prompt tokens (cold)", ylabel="prompt tokens read per second", title="Cold prompt reading")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
