"""Serving benchmark: this worker side by side with llama.cpp in-process, llama_cpp.server and llama-server.

    .venv/bin/python bench/bench_serving.py                 # everything, writes bench/RESULTS.md
    .venv/bin/python bench/bench_serving.py --quick         # fewer requests, prints only
    .venv/bin/python bench/bench_serving.py --features plain,json_schema,top_logprobs,n4 --levels 1,4 \
        --only 'peerinfer worker,llama-server' --section features   # issue 11's rows

Every server gets the same model, threads, context per stream, prompts and max_tokens, and runs
alone on the machine (one after the other). Tokens are counted from each server's ``usage``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from quantiles import quantile  # noqa: E402

from peerinfer.client.sse_parser import SSEParser  # noqa: E402
from peerinfer.engine.model_files import open_model_file  # noqa: E402

CACHE = Path(os.environ.get("PEERINFER_BENCH_CACHE", Path.home() / ".cache" / "peerinfer" / "bench"))
PROMPTS = [
    "The history of the Indian railways begins in",
    "Here is a short story about a fisherman from Kerala:",
    "Photosynthesis is the process by which",
    "भारत की राजधानी नई दिल्ली है। दिल्ली",
    "The best way to learn a new programming language is",
    "Monsoon rains in Mumbai usually start in",
    "A recipe for masala chai: first,",
    "The three laws of thermodynamics are",
]


# Issue 11's request features, as each server spells them on /v1/completions (greedy, streamed).
ANSWER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"topic": {"type": "string"}, "facts": {"type": "array", "items": {"type": "string"}}},
    "required": ["topic", "facts"],
}
FEATURES: dict[str, Callable[[str], dict[str, Any]]] = {
    "plain": lambda system: {},
    # llama-server reads a schema on /v1/completions as "json_schema"; the worker takes OpenAI's response_format.
    "json_schema": lambda system: (
        {"json_schema": ANSWER_SCHEMA}
        if system.startswith("llama-server")
        else {"response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA}}}
    ),
    "top_logprobs": lambda system: {"logprobs": 5},  # the legacy completions field: the top 5 per token
    "n4": lambda system: {"n": 4},
}


@dataclass
class Sample:
    ttft_s: float
    total_s: float
    completion_tokens: int
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        if self.completion_tokens < 2:
            return None
        return (self.total_s - self.ttft_s) / (self.completion_tokens - 1)


@dataclass
class Row:
    system: str
    concurrency: int
    samples: list[Sample] = field(default_factory=list)
    wall_s: float = 0.0
    feature: str = "plain"

    @property
    def label(self) -> str:
        return self.system if self.feature == "plain" else f"{self.system} [{self.feature}]"

    def ok(self) -> list[Sample]:
        return [sample for sample in self.samples if sample.error is None]

    def summary(self) -> dict[str, float | int | str]:
        good = self.ok()
        ttfts = [sample.ttft_s for sample in good]
        tpots = [t for t in (sample.tpot_s for sample in good) if t is not None]
        tokens = sum(sample.completion_tokens for sample in good)
        return {
            "system": self.label,
            "concurrency": self.concurrency,
            "requests": len(self.samples),
            "ttft_p50_ms": 1000 * quantile(ttfts, 0.5),
            "ttft_p90_ms": 1000 * quantile(ttfts, 0.9),
            "tpot_p50_ms": 1000 * (statistics.median(tpots) if tpots else float("nan")),
            "agg_tok_s": tokens / self.wall_s if self.wall_s else float("nan"),
            "errors": len(self.samples) - len(good),
        }


def cpu_name() -> str:
    """The CPU's model name and widest vector kernels, for the results' machine line.

    A VM may call very different CPUs "AMD EPYC"; which of the patch's and the head's kernels run (AVX2
    or AVX-512 VNNI) moves every number here, so the line says it.
    """
    fields: dict[str, str] = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():  # the first CPU's lines are enough
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = fields.get("flags", "").split()
    vectors = "AVX-512 VNNI" if "avx512_vnni" in flags else "AVX2, no AVX-512" if "avx2" in flags else "no AVX2"
    name = fields.get("model name") or "unknown CPU"
    return f"{name}, family {fields.get('cpu family', '?')} model {fields.get('model', '?')}, {vectors}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Streamed:
    """One streamed completion as the client saw it."""

    first_s: float | None  # from sending to the first text; None if no text came
    total_s: float
    text_events: int
    usage: dict[str, Any]  # the server's last usage object ({} if it sent none)
    error: str | None = None


def stream_completion(
    url: str, prompt: str, max_tokens: int, extra: dict[str, Any] | None = None, stamps: list[float] | None = None
) -> Streamed:
    """POST a streamed, greedy ``/v1/completions`` request (with ``extra`` fields) and read it to the end.

    ``stamps``, if given, receives the arrival time (``time.perf_counter``) of every text event, as it comes.
    """
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **(extra or {}),
    }
    started = time.perf_counter()
    first: float | None = None
    usage: dict[str, Any] = {}
    events = 0
    try:
        with requests.post(url + "/v1/completions", json=body, stream=True, timeout=600) as response:
            if response.status_code != 200:
                return Streamed(None, 0, 0, {}, f"HTTP {response.status_code}")
            parser = SSEParser()
            for chunk in response.iter_content(chunk_size=None):
                for event in parser.feed(chunk):
                    if event.data == "[DONE]":
                        continue
                    payload = json.loads(event.data)
                    if payload.get("usage"):
                        usage = payload["usage"]
                    for choice in payload.get("choices") or []:
                        if choice.get("text"):
                            events += 1
                            now = time.perf_counter()
                            if stamps is not None:
                                stamps.append(now)
                            if first is None:
                                first = now
    except requests.RequestException as exc:
        return Streamed(None, 0, 0, {}, type(exc).__name__)
    total = time.perf_counter() - started
    return Streamed(None if first is None else first - started, total, events, usage)


def stream_request(url: str, prompt: str, max_tokens: int, extra: dict[str, Any] | None = None) -> Sample:
    streamed = stream_completion(url, prompt, max_tokens, extra)
    if streamed.error is not None:
        return Sample(0, 0, 0, streamed.error)
    if streamed.first_s is None:
        return Sample(0, streamed.total_s, 0, "no tokens")
    tokens = streamed.usage.get("completion_tokens")
    # llama-server's usage with n > 1 counts one choice's tokens only: take the text events when they are more.
    counted = streamed.text_events if tokens is None else max(tokens, streamed.text_events)
    return Sample(streamed.first_s, streamed.total_s, counted)


def run_level(
    system: str, url: str, concurrency: int, requests_per_client: int, max_tokens: int, feature: str = "plain"
) -> Row:
    row = Row(system, concurrency, feature=feature)
    lock = threading.Lock()
    extra = FEATURES[feature](system)

    def client(index: int) -> None:
        for number in range(requests_per_client):
            prompt = PROMPTS[(index + number * concurrency) % len(PROMPTS)]
            sample = stream_request(url, prompt, max_tokens, extra)
            with lock:
                row.samples.append(sample)

    threads = [threading.Thread(target=client, args=(index,)) for index in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    row.wall_s = time.perf_counter() - started
    return row


def in_process(model: Path, threads: int, n_ctx: int, max_tokens: int, repeats: int, repacked: bool) -> Row:
    """llama.cpp through llama-cpp-python's high-level API in this process: the single-stream limit.

    ``repacked=False`` loads the weights as the batch-invariant worker does (no extra buffer types).
    """
    import llama_cpp
    from llama_cpp import Llama

    defaults = llama_cpp.llama_model_default_params

    def model_params() -> llama_cpp.llama_model_params:
        params = defaults()
        params.use_extra_bufts = repacked
        return params

    llama_cpp.llama_model_default_params = model_params
    try:
        llm = Llama(str(model), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False)
    finally:
        llama_cpp.llama_model_default_params = defaults
    row = Row("llama.cpp in-process" + ("" if repacked else ", no repack"), 1)
    llm.create_completion(PROMPTS[0], max_tokens=4, temperature=0)  # warm-up, as for the servers
    started_all = time.perf_counter()
    for number in range(repeats):
        prompt = PROMPTS[number % len(PROMPTS)]
        started = time.perf_counter()
        first: float | None = None
        count = 0
        for chunk in llm.create_completion(prompt, max_tokens=max_tokens, temperature=0, stream=True):
            if chunk["choices"][0]["text"] and first is None:
                first = time.perf_counter()
            count += 1
        total = time.perf_counter() - started
        row.samples.append(Sample((first or started) - started, total, count))
    row.wall_s = time.perf_counter() - started_all
    del llm
    return row


def wait_healthy(url: str, process: subprocess.Popen[bytes], timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server at {url} exited with {process.returncode}")
        try:
            if requests.get(url + "/v1/models", timeout=2).status_code == 200:  # every server has it
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server at {url} did not become healthy")


def serve(
    command: list[str], env: dict[str, str], port: int, log: Path | None = None
) -> tuple[str, subprocess.Popen[bytes]]:
    """A server started with ``command`` and warmed up; its stderr goes to ``log`` if given."""
    if log is None:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    else:
        with log.open("wb") as sink:
            process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=sink)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)
    except RuntimeError:
        process.kill()
        raise
    stream_request(url, PROMPTS[0], 4)  # warm-up
    return url, process


def load_line(log: Path) -> str | None:
    """The worker's line on its load calibration (step time by rows, and which row counts it pads)."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    found = [line for line in lines if "decode step by rows" in line]
    return found[-1][found[-1].index("decode step by rows") :].split("; output product")[0] if found else None


def worker_env(model: Path, threads: int, n_ctx: int, slots: int, **extra: str) -> dict[str, str]:
    """This process's environment without its own PEERINFER_* settings, plus the bench's worker settings."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PEERINFER_")}
    env.update(
        PEERINFER_MODEL=str(model),
        PEERINFER_N_THREADS=str(threads),
        PEERINFER_N_CTX=str(n_ctx),
        PEERINFER_SLOTS=str(slots),
        PEERINFER_LOG_LEVEL="INFO",  # its INFO lines are the load's (the calibration), none per request
        **extra,
    )
    return env


ONE_ROW_KQ = "peerinfer worker (one-row K-quant matmul)"  # no comma: --only can name it


def worker_name(slots: int, slot_counts: list[int] | None = None) -> str:
    """The worker's row name: with its slots when the run compares several slot counts."""
    return "peerinfer worker" if slot_counts is None or len(slot_counts) == 1 else f"peerinfer worker, {slots} slots"


def servers(
    model: Path, threads: int, n_ctx: int, slots: int, slot_counts: list[int] | None = None
) -> dict[str, Callable[[int], list[str]]]:
    """Each entry: a function of the port giving the command line; missing peers are left out.

    With several slot counts, each count gets its own worker and llama-server rows; the systems that
    have no slots (llama_cpp.server, the other workers) run with the first count only.
    """
    worker = [str(REPO / ".venv/bin/python"), "-m", "uvicorn", "worker:app", "--host", "127.0.0.1"]
    entries: dict[str, Callable[[int], list[str]]] = {
        worker_name(slots, slot_counts): lambda port: [*worker, "--port", str(port), "--log-level", "warning"],
        # The same worker with stock ggml attention (a bf16 cache keeps it invariant): what the patch buys.
        "bf16 peerinfer worker (stock attention)": lambda port: [
            "env",
            "GGML_CPU_FA_ROW_EXACT=0",
            *worker,
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        # The same worker with ggml's one-row K-quant kernel (GGML_CPU_KQ_ROWS=0): what ggml-kq-rows.patch buys.
        ONE_ROW_KQ: lambda port: [
            "env",
            "GGML_CPU_KQ_ROWS=0",
            *worker,
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        # The same worker with llama.cpp's repacked weights: faster, but batched text may differ.
        "peerinfer worker, batch_invariant=false": lambda port: [
            "env",
            "PEERINFER_BATCH_INVARIANT=false",
            *worker,
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
    }
    slot_counts = slot_counts or [slots]
    if slots != slot_counts[0]:
        entries = {name: command for name, command in entries.items() if name == worker_name(slots, slot_counts)}
    python = CACHE / "venv/bin/python"
    if python.exists() and slots == slot_counts[0]:
        entries["llama_cpp.server"] = lambda port: [
            str(python),
            "-m",
            "llama_cpp.server",
            "--model",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            str(n_ctx),
            "--n_threads",
            str(threads),
            "--n_threads_batch",
            str(threads),
            "--interrupt_requests",
            "False",
        ]
    binary = next(CACHE.glob("llama-server-*/build/bin/llama-server"), None)
    if binary is not None:
        entries[f"llama-server -np {slots}"] = lambda port: [
            str(binary),
            "-m",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "-c",
            str(n_ctx * slots),
            "-np",
            str(slots),
            "-t",
            str(threads),
            "-tb",
            str(threads),
            "-b",
            "512",
            "--no-webui",
        ]
    return entries


def table(rows: list[Row]) -> str:
    header = "| system | conc. | requests | TTFT p50 ms | TTFT p90 ms | TPOT p50 ms | aggregate tok/s | errors |"
    lines = [header, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        s = row.summary()
        lines.append(
            f"| {s['system']} | {s['concurrency']} | {s['requests']} | {s['ttft_p50_ms']:.1f} | "
            f"{s['ttft_p90_ms']:.1f} | {s['tpot_p50_ms']:.2f} | {s['agg_tok_s']:.1f} | {s['errors']} |"
        )
    return "\n".join(lines)


def chart(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    systems = sorted({row.label for row in rows if row.concurrency > 1 or row.system.startswith("peerinfer")})
    for system in systems:
        mine = sorted((row for row in rows if row.label == system), key=lambda row: row.concurrency)
        levels = [row.concurrency for row in mine]
        left.plot(levels, [row.summary()["agg_tok_s"] for row in mine], marker="o", label=system)
        right.plot(levels, [row.summary()["ttft_p50_ms"] for row in mine], marker="o", label=system)
    for row in rows:
        if row.system == "llama.cpp in-process":
            left.axhline(float(row.summary()["agg_tok_s"]), linestyle=":", color="gray", label="in-process, 1 stream")
    left.set(xlabel="concurrent clients", ylabel="aggregate output tokens/s", title="Throughput")
    right.set(xlabel="concurrent clients", ylabel="TTFT p50 (ms, log)", title="Time to first token", yscale="log")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def write_results(section: str, body: str) -> None:
    results = REPO / "bench" / "RESULTS.md"
    text = results.read_text() if results.exists() else "# Benchmark results\n"
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    block = f"{start}\n{body}\n{end}"
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    results.write_text(text)


def run_round(
    args: argparse.Namespace, model: Path, levels: list[int], total: int, wanted: set[str], loads: list[str]
) -> list[Row]:
    """Every selected system once, each alone on the machine, one after the other.

    Each worker's load calibration line is added to ``loads``: a noisy one can pad a row count.
    """
    rows: list[Row] = []
    if not wanted or "in-process" in wanted:
        print("running llama.cpp in-process ...", file=sys.stderr)
        rows.append(in_process(model, args.threads, args.n_ctx, args.max_tokens, total, repacked=True))
        rows.append(in_process(model, args.threads, args.n_ctx, args.max_tokens, total, repacked=False))
    for slots in args.slots:
        env = worker_env(model, args.threads, args.n_ctx, slots, PEERINFER_MAX_QUEUE="64")
        for name, command in servers(model, args.threads, args.n_ctx, slots, args.slots).items():
            base = name.removesuffix(f", {slots} slots")  # --only names systems without their slots
            if wanted and not any(w in (name, base) or base.startswith(w + " ") for w in wanted):
                continue
            port = free_port()
            print(f"running {name} ...", file=sys.stderr)
            log = Path(tempfile.gettempdir()) / f"bench-serving-{port}.log"
            url, process = serve(command(port), env, port, log)
            line = load_line(log)
            if line is not None:
                loads.append(f"{name}: {line}")
                print(loads[-1], file=sys.stderr)
            try:
                for feature in args.features.split(","):
                    for level in levels:
                        per_client = max(2 if not args.quick else 1, -(-total // level))
                        rows.append(run_level(name, url, level, per_client, args.max_tokens, feature))
                        print(table(rows[-1:]).splitlines()[-1], file=sys.stderr)
            finally:
                process.terminate()
                process.wait(timeout=30)
                log.unlink(missing_ok=True)
    return rows


def paired(rounds: list[list[Row]], baselines: tuple[str, ...] = ()) -> str:
    """Each system's aggregate tok/s over llama-server's (and over ``baselines``), within each round, at each level.

    The machine's speed drifts between rounds (a 4-row step took 35 ms in one run, 45 ms in the next),
    so a ratio taken inside one round, minutes apart, says more than rows pooled over all rounds.
    """
    lines: list[str] = []
    features = sorted({row.feature for rows in rounds for row in rows}, key=lambda f: (f != "plain", f))
    servers = sorted({row.system for rows in rounds for row in rows if row.system.startswith("llama-server")})
    for reference in [*servers, *baselines]:
        systems = sorted(
            {row.system for rows in rounds for row in rows if row.system.startswith("peerinfer")} - {reference}
        )
        levels = sorted({row.concurrency for rows in rounds for row in rows})
        for feature in features:
            for system in systems:
                for level in levels:
                    ratios = _ratios(rounds, (system, feature, level), (reference, feature, level))
                    if ratios:
                        wins = sum(ratio >= 1.0 for ratio in ratios)
                        lines.append(
                            f"| {Row(system, level, feature=feature).label} | {reference} | {level} | {len(ratios)} "
                            f"| {statistics.median(ratios):.3f} | {min(ratios):.3f} | {max(ratios):.3f} | "
                            f"{wins} of {len(ratios)} |"
                        )
    if not lines:
        return ""
    header = (
        "| system | against | conc. | rounds | tok/s ratio, median | lowest | highest | rounds at or above 1 |\n"
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    return header + "\n" + "\n".join(lines)


def _ratios(rounds: list[list[Row]], ours: tuple[str, str, int], theirs: tuple[str, str, int]) -> list[float]:
    """Aggregate tok/s of row ``ours`` over row ``theirs`` (system, feature, level), within each round."""
    ratios = []
    for rows in rounds:
        mine = {(row.system, row.feature, row.concurrency): row for row in rows}
        if ours in mine and theirs in mine:
            ratios.append(float(mine[ours].summary()["agg_tok_s"]) / float(mine[theirs].summary()["agg_tok_s"]))
    return ratios


def scaling(rounds: list[list[Row]]) -> str:
    """Each system's aggregate tok/s at each level over its own at the level before, within each round."""
    lines: list[str] = []
    systems = sorted({row.system for rows in rounds for row in rows})
    levels = sorted({row.concurrency for rows in rounds for row in rows})
    for system in systems:
        for before, level in itertools.pairwise(levels):
            ratios = _ratios(rounds, (system, "plain", level), (system, "plain", before))
            if ratios:
                lines.append(
                    f"| {system} | {level} | {before} | {len(ratios)} | {statistics.median(ratios):.3f} | "
                    f"{min(ratios):.3f} | {max(ratios):.3f} |"
                )
    if not lines:
        return ""
    header = (
        "| system | conc. | over conc. | rounds | tok/s ratio, median | lowest | highest |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    return header + "\n" + "\n".join(lines)


def feature_costs(rounds: list[list[Row]]) -> str:
    """Each feature's aggregate tok/s over the same system's plain requests, within each round.

    ``n4`` is set against plain requests at the same number of clients: one request of 4 choices
    against one of 1 (issue 11's target: at least 3x).
    """
    lines: list[str] = []
    systems = sorted({row.system for rows in rounds for row in rows})
    levels = sorted({row.concurrency for rows in rounds for row in rows})
    features = sorted({row.feature for rows in rounds for row in rows} - {"plain"})
    for feature in features:
        for system in systems:
            for level in levels:
                ratios = _ratios(rounds, (system, feature, level), (system, "plain", level))
                if ratios:
                    lines.append(
                        f"| {system} | {feature} | {level} | {len(ratios)} | {statistics.median(ratios):.3f} | "
                        f"{min(ratios):.3f} | {max(ratios):.3f} |"
                    )
    if not lines:
        return ""
    header = (
        "| system | feature | conc. | rounds | tok/s over plain, median | lowest | highest |\n"
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |"
    )
    return header + "\n" + "\n".join(lines)


def merge(rows: list[Row]) -> list[Row]:
    """Pool the rounds: one row per system and level, samples and wall time added up."""
    merged: dict[tuple[str, str, int], Row] = {}
    for row in rows:
        into = merged.setdefault(
            (row.system, row.feature, row.concurrency), Row(row.system, row.concurrency, feature=row.feature)
        )
        into.samples.extend(row.samples)
        into.wall_s += row.wall_s
    return list(merged.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--levels", default="1,2,4,8", help="concurrency levels (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--requests", type=int, default=12, help="requests per level, at least 2 per client")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--n-ctx", type=int, default=2048, help="context per stream")
    parser.add_argument(
        "--slots",
        default="4",
        help="slots (llama-server: -np); several, comma-separated, give each count its own rows (default: 4)",
    )
    parser.add_argument("--model", type=Path, default=None, help="a .gguf (default: the bundled model)")
    parser.add_argument("--only", default="", help="comma-separated systems to run (default: all found)")
    parser.add_argument("--quick", action="store_true", help="few requests; print, don't write RESULTS.md")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat everything with fresh processes, interleaved; rows pool all rounds (default: 1)",
    )
    parser.add_argument("--section", default="serving", help="RESULTS.md section to write (default: serving)")
    parser.add_argument(
        "--features",
        default="plain",
        help=f"comma-separated request features, each a row per level (of {', '.join(FEATURES)}; default: plain)",
    )
    args = parser.parse_args()
    unknown = set(args.features.split(",")) - set(FEATURES)
    if unknown:
        parser.error(f"unknown features {sorted(unknown)}; choose from {', '.join(FEATURES)}")
    levels = [int(level) for level in args.levels.split(",")]
    args.slots = [int(count) for count in args.slots.split(",")]
    total = 4 if args.quick else args.requests
    model = args.model or open_model_file(None, Path.home() / ".cache" / "peerinfer").path
    rows: list[Row] = []
    wanted = {name.strip() for name in args.only.split(",") if name.strip()}

    rounds: list[list[Row]] = []
    loads: list[str] = []
    for round_number in range(args.rounds):
        print(f"round {round_number + 1} of {args.rounds}", file=sys.stderr)
        start = len(loads)
        rounds.append(run_round(args, model, levels, total, wanted, loads))
        loads[start:] = [f"round {round_number + 1}, {line}" for line in loads[start:]]
        rows.extend(rounds[-1])
    rows = merge(rows)
    report = table(rows)
    baselines = (worker_name(args.slots[0], args.slots),) if len(args.slots) > 1 else ()
    if any(row.system == ONE_ROW_KQ for row in rows):
        baselines = (*baselines, ONE_ROW_KQ)
    pairs = paired(rounds, baselines)
    if pairs:
        report += "\n\nPaired within each round (aggregate tok/s, this system / the other):\n\n" + pairs
    if len(levels) > 1:
        report += "\n\nScaling within each round (aggregate tok/s at one level over the level before):\n\n"
        report += scaling(rounds)
    costs = feature_costs(rounds)
    if costs:
        report += (
            "\n\nWhat each feature costs, within each round (aggregate tok/s over the same system's plain rows):\n\n"
        )
        report += costs
    if loads:
        report += "\n\nEach worker's load calibration (what it logged at start):\n\n"
        report += "\n".join(f"- {line}" for line in loads)
    print(report)
    if not args.quick:
        command = "bash bench/setup_peers.sh && .venv/bin/python bench/bench_serving.py " + shlex.join(sys.argv[1:])
        picture = f"\n\n![serving chart]({args.section}.png)" if len(levels) > 1 else ""
        if picture:
            chart(rows, REPO / "bench" / f"{args.section}.png")
        cpu = cpu_name()
        body = (
            f"## Serving (issues 2, 3 and 11){'' if args.section == 'serving' else ': ' + args.section}\n\n"
            f"Command: `{command.strip()}`\n\n"
            f"Machine: {os.cpu_count()} cores ({cpu}), model {model.name}, {args.threads} threads, "
            f"context {args.n_ctx} per stream, {args.max_tokens} max tokens, temperature 0, "
            f"slots {', '.join(map(str, args.slots))}, "
            f"{args.rounds} round(s) pooled, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n\n"
            f"{report}{picture}\n"
        )
        write_results(args.section, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
