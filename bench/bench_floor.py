"""How close a decode step is to the machine: memory bandwidth, the bytes a step must read, the floor.

    .venv/bin/python bench/bench_floor.py                  # the bundled model; writes bench/RESULTS.md
    .venv/bin/python bench/bench_floor.py --model X.gguf --section floor-x

At concurrency 1 a decode step reads every weight the token passes through once (the output matrix
whole; of the token embedding one row, unless the output is tied to it) and the KV cache of the
positions so far; on a CPU that is memory-bound, so bytes / read bandwidth is a floor on the time
per token. This script measures the bandwidth (``stream_read.c``: a 1 GiB read with every core, the
best of 5), reads the weights' sizes from the GGUF header, and sets the time per token that
llama.cpp in-process and this worker reach against that floor, in one run.
"""

from __future__ import annotations

import argparse
import mmap
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_serving import CACHE, Row, cpu_name, free_port, in_process, run_level, serve, worker_env, write_results  # noqa: E402

from peerinfer.engine.gguf import GgufHeader, read_header  # noqa: E402
from peerinfer.engine.model_files import open_model_file  # noqa: E402

KV_BYTES = 2  # the batch-invariant worker keeps its KV cache in bf16 (llama.cpp's default, f16, is 2 too)


def bandwidth_gb_s(mebibytes: int, repeats: int) -> tuple[float, int]:
    """The best read bandwidth over ``repeats`` passes of a ``mebibytes`` buffer, and the threads that read it."""
    source = REPO / "bench" / "stream_read.c"
    binary = CACHE / "stream_read"
    if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
        binary.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([os.environ.get("CC", "cc"), "-O3", "-fopenmp", str(source), "-o", str(binary)], check=True)
    output = subprocess.run([str(binary), str(mebibytes), str(repeats)], check=True, capture_output=True, text=True)
    rate, threads, _ = output.stdout.split()
    return float(rate), int(threads)


@dataclass(frozen=True)
class StepBytes:
    weights: int  # bytes of weights one decode step reads
    kv_per_position: int  # bytes of K and V per cached position, all layers
    layers: int
    file_bytes: int


def tensor_sizes(header: GgufHeader, file_bytes: int) -> dict[str, int]:
    """Each tensor's bytes, from the distance to the next tensor's data (the padding between is < 32 bytes)."""
    ordered = sorted(header.tensors.values(), key=lambda tensor: tensor.offset)
    ends = [tensor.offset for tensor in ordered[1:]] + [file_bytes]
    return {tensor.name: end - tensor.offset for tensor, end in zip(ordered, ends, strict=True)}


def step_bytes(path: Path) -> StepBytes:
    file_bytes = path.stat().st_size
    with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        header = read_header(data)
    sizes = tensor_sizes(header, file_bytes)
    weights = sum(sizes.values())
    embedding = header.tensors.get("token_embd.weight")
    if embedding is not None and "output.weight" in header.tensors:
        # Untied: the step reads one row of the embedding, not the matrix (the output matrix is read whole).
        rows = embedding.dims[1] if len(embedding.dims) > 1 else 1
        weights -= sizes["token_embd.weight"] - sizes["token_embd.weight"] // rows
    arch = str(header.metadata.get("general.architecture", "llama"))
    meta = header.metadata
    layers = int(meta[f"{arch}.block_count"])
    heads = int(meta[f"{arch}.attention.head_count"])
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
    head_dim = int(meta.get(f"{arch}.attention.key_length", int(meta[f"{arch}.embedding_length"]) // heads))
    value_dim = int(meta.get(f"{arch}.attention.value_length", head_dim))
    kv = layers * kv_heads * (head_dim + value_dim) * KV_BYTES
    return StepBytes(weights, kv, layers, file_bytes)


def tpot_ms(row: Row) -> float:
    values = [sample.tpot_s for sample in row.ok() if sample.tpot_s is not None]
    return 1000 * statistics.median(values) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="a .gguf (default: the bundled model)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--mebibytes", type=int, default=1024, help="the bandwidth test's buffer (default: 1024)")
    parser.add_argument("--section", default="floor", help="RESULTS.md section to write (default: floor)")
    parser.add_argument("--quick", action="store_true", help="print only, don't write RESULTS.md")
    args = parser.parse_args()
    model = args.model or open_model_file(None, Path.home() / ".cache" / "peerinfer").path

    rate, threads = bandwidth_gb_s(args.mebibytes, 5)
    step = step_bytes(model)
    print(
        f"read bandwidth {rate:.1f} GB/s with {threads} threads; a step reads {step.weights / 1e6:.1f} MB",
        file=sys.stderr,
    )

    rows = [in_process(model, args.threads, 2048, args.max_tokens, args.requests, repacked=False)]
    port = free_port()
    worker = [str(REPO / ".venv/bin/python"), "-m", "uvicorn", "worker:app", "--host", "127.0.0.1", "--port", str(port)]
    url, process = serve(worker, worker_env(model, args.threads, 2048, 4), port)
    try:
        rows.append(run_level("peerinfer worker", url, 1, args.requests, args.max_tokens))
    finally:
        process.terminate()
        process.wait(timeout=30)

    # The KV read grows with the position: take the middle of an answer to a short prompt (~10 tokens).
    position = 10 + args.max_tokens // 2
    floor_bytes = step.weights + step.kv_per_position * position
    floor_ms = 1000 * floor_bytes / (rate * 1e9)
    lines = [
        "| what | value |",
        "| --- | --- |",
        f"| memory read bandwidth, {threads} threads, {args.mebibytes} MiB, best of 5 | {rate:.1f} GB/s |",
        f"| model file | {step.file_bytes / 1e6:.1f} MB |",
        f"| weights a decode step reads | {step.weights / 1e6:.1f} MB |",
        f"| KV cache read per step at position {position} ({step.layers} layers, {KV_BYTES}-byte cells) | "
        f"{step.kv_per_position * position / 1e6:.2f} MB |",
        f"| floor on time per token at concurrency 1 | {floor_ms:.2f} ms |",
        "",
        "| system | TPOT p50 ms | over the floor |",
        "| --- | ---: | ---: |",
    ]
    for row in rows:
        measured = tpot_ms(row)
        lines.append(f"| {row.system} | {measured:.2f} | {measured / floor_ms:.2f}x |")
    report = "\n".join(lines)
    print(report)
    if not args.quick:
        command = ".venv/bin/python bench/bench_floor.py " + shlex.join(sys.argv[1:])
        cpu = cpu_name()
        title = "## How close to the machine (issue 14, part 4)" + (
            "" if args.section == "floor" else ": " + args.section
        )
        body = (
            f"{title}\n\n"
            f"Command: `{command.strip()}`\n\n"
            f"Machine: {os.cpu_count()} cores ({cpu}), model {model.name}, {args.threads} threads, "
            f"{args.max_tokens} max tokens, temperature 0, {args.requests} requests each, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n\n{report}\n"
        )
        write_results(args.section, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
