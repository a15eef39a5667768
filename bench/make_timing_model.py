"""A timing model with TinyLlama-1.1B-Chat-v1.0's shape: the same architecture, tensor shapes, quantization mix,
vocabulary size and chat template, with random weights. Its text is meaningless; it exists to time llama.cpp and
the worker on a 1.1B llama body whose output weights are Q6_K, since the real model cannot be downloaded here.

    .venv/bin/python bench/make_timing_model.py          # prints the .gguf's path (builds it once, ~2 minutes)
    .venv/bin/python bench/bench_serving.py --model "$(.venv/bin/python bench/make_timing_model.py)"

How it is made: the weights are written as F16 (norms F32) with the ``gguf`` package, seeded, N(0, 0.02) with
norms 1.0; the vendored llama.cpp's ``llama-quantize`` (built by bench/build_llama_server.sh, next to llama-server)
turns that into Q4_K_M, which chooses Q6_K for ``output.weight`` and for some ``attn_v``/``ffn_down`` as it does for
the real TinyLlama. The ~2.2 GB F16 file is deleted afterwards. The result is cached outside the repo in
``~/.cache/peerinfer/bench/timing-models/`` (``PEERINFER_BENCH_CACHE`` moves the root); a second run finds it and
only prints its path. Progress goes to stderr, the path alone to stdout.

The vocabulary is SentencePiece-style, as llama.cpp's "llama" tokenizer reads it: <unk>, <s>, </s>, the 256 byte
pieces, then pieces made from a small built-in text and from letter pairs and triples, with decreasing scores, so
that English text splits into word-sized and sub-word pieces (the count per word is not TinyLlama's; a prompt's
token count is what the benches report, from each server's ``usage``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("PEERINFER_BENCH_CACHE", Path.home() / ".cache" / "peerinfer" / "bench"))
NAME = "tinyllama-1.1b-shape-timing-model-q4_k_m"
LABEL = "tinyllama-1.1b-shape-timing-model (random weights: the text is meaningless)"
DESCRIPTION = (
    "A timing model made by peerinfer's bench/make_timing_model.py: TinyLlama-1.1B-Chat-v1.0's architecture, "
    "tensor shapes, Q4_K_M quantization mix, vocabulary size and chat template, with random weights and a "
    "generated vocabulary. It measures speed only; everything it writes is meaningless."
)
SEED = 1100
NEEDED_FREE_BYTES = 4 * 1024**3

# Zephyr style, as TinyLlama-1.1B-Chat-v1.0's template renders it (with Hugging Face's trim_blocks): each turn is
# "<|role|>\n" + text + eos_token + "\n", and the answer starts after "<|assistant|>\n". Written with explicit
# whitespace control so that it renders the same with or without trim_blocks. TinyLlama's drops other roles
# silently; this one refuses them.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('this template knows the roles system, user and assistant, not ' + message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|assistant|>\\n' -}}"
    "{%- endif -%}"
)

# Words for the vocabulary (written for this script): common English, the benches' topics, code and chat markup.
TEXT = """
The history of the railways begins in the nineteenth century, when the first lines were built to carry cotton,
coal and people between the ports and the cities. A short story about a fisherman: every morning he took his boat
out before the sun was up, and every evening he came back with fish for the market. Photosynthesis is the process
by which plants use the energy of light to make sugar from water and carbon dioxide, and it gives the oxygen we
breathe. The best way to learn a new programming language is to write small programs, read other people's code,
and fix your own mistakes one at a time. Monsoon rains usually start in June and end in September; they bring
water for the farms and floods for the streets. A recipe for tea: first, boil water with ginger and cardamom, then
add milk, sugar and the leaves, and let it simmer for two minutes. The three laws of thermodynamics are about
energy, entropy and the temperature at which all motion would stop. You are a helpful assistant. Please answer the
question below in a few sentences. What is the capital of the country? How many people live there, and why did
they come? I think that this is a good idea, but we should also ask what they would say about it. There is no
reason to wait: the model reads the prompt, then writes one token after another until it has written enough.
def main(argv: list[str]) -> int: return 0 if the result is true else 1; import json, print(value), for item in
items: if item is None: continue, while not done: class Server(object): self.name = name; return self.value.
system user assistant message content role function tool call arguments response request error status model
number string object array boolean null true false data time date year month week day hour minute second.
One two three four five six seven eight nine ten hundred thousand million first second third last next other.
North south east west city village river mountain sea island road school hospital market government world.
"""
BYTE_PIECES = 256
SPECIAL_PIECES = ("<unk>", "<s>", "</s>")


@dataclass(frozen=True)
class Shape:
    """TinyLlama-1.1B-Chat-v1.0's hyperparameters, from its config.json."""

    layers: int = 22
    hidden: int = 2048
    ffn: int = 5632
    heads: int = 32
    kv_heads: int = 4
    vocab: int = 32000
    context: int = 2048
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def vocabulary(size: int) -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and token types for a SentencePiece-style vocabulary of exactly ``size`` pieces.

    llama.cpp's SPM tokenizer starts from single characters (bytes where a character is not a piece) and merges
    the adjacent pair whose concatenation is a piece with the highest score, so every piece here comes after the
    prefixes it is built from, and the scores fall with the order.
    """
    from gguf import TokenType

    pieces: list[str] = []
    seen: set[str] = set()

    def add(piece: str) -> None:
        if piece and piece not in seen and len(pieces) < size - len(SPECIAL_PIECES) - BYTE_PIECES:
            seen.add(piece)
            pieces.append(piece)

    def add_with_prefixes(piece: str) -> None:
        for end in range(1, len(piece) + 1):
            add(piece[:end])

    add("▁")
    for character in sorted(set(TEXT) - {"\n", " "}) + [chr(code) for code in range(33, 127)]:
        add(character)
        add("▁" + character)
    words = Counter(re.findall(r"[A-Za-z]+|[0-9]+|[^\sA-Za-z0-9]+", TEXT))
    for word, _ in words.most_common():
        add_with_prefixes("▁" + word)
        add_with_prefixes(word)
        add_with_prefixes("▁" + word.lower())
        add_with_prefixes("▁" + word.capitalize())
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    pairs = [a + b for a in letters for b in letters]
    for pair in pairs:
        add(pair)
        add("▁" + pair)
    for pair in pairs:
        for c in letters:
            add(pair + c)
            add("▁" + pair + c)
    if len(pieces) < size - len(SPECIAL_PIECES) - BYTE_PIECES:
        raise RuntimeError(f"the vocabulary builder made {len(pieces)} pieces, too few for {size}")

    tokens = [*SPECIAL_PIECES, *(f"<0x{byte:02X}>" for byte in range(BYTE_PIECES)), *pieces]
    scores = [0.0] * (len(SPECIAL_PIECES) + BYTE_PIECES) + [-float(rank) for rank in range(len(pieces))]
    types = (
        [int(TokenType.UNKNOWN), int(TokenType.CONTROL), int(TokenType.CONTROL)]
        + [int(TokenType.BYTE)] * BYTE_PIECES
        + [int(TokenType.NORMAL)] * len(pieces)
    )
    return tokens, scores, types


def tensors(shape: Shape) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Each tensor's name and shape (numpy order: rows, columns) as TinyLlama's GGUF has them, in file order."""
    kv = shape.kv_heads * shape.head_dim
    yield "token_embd.weight", (shape.vocab, shape.hidden)
    for layer in range(shape.layers):
        block = f"blk.{layer}."
        yield block + "attn_norm.weight", (shape.hidden,)
        yield block + "attn_q.weight", (shape.hidden, shape.hidden)
        yield block + "attn_k.weight", (kv, shape.hidden)
        yield block + "attn_v.weight", (kv, shape.hidden)
        yield block + "attn_output.weight", (shape.hidden, shape.hidden)
        yield block + "ffn_norm.weight", (shape.hidden,)
        yield block + "ffn_gate.weight", (shape.ffn, shape.hidden)
        yield block + "ffn_up.weight", (shape.ffn, shape.hidden)
        yield block + "ffn_down.weight", (shape.hidden, shape.ffn)
    yield "output_norm.weight", (shape.hidden,)
    yield "output.weight", (shape.vocab, shape.hidden)


def weights(index: int, dims: tuple[int, ...]) -> np.ndarray[Any, np.dtype[Any]]:
    """Norms are 1.0 (F32); matrices N(0, 0.02) in F16, seeded per tensor so the file is the same on every run."""
    if len(dims) == 1:
        return np.ones(dims, dtype=np.float32)
    rng = np.random.default_rng([SEED, index])
    values = rng.standard_normal(dims, dtype=np.float32)
    values *= 0.02
    return values.astype(np.float16)


def write_f16(path: Path, shape: Shape) -> None:
    """The unquantized model, written tensor by tensor so that at most one tensor is in memory."""
    import gguf

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(LABEL)
    writer.add_description(DESCRIPTION)
    writer.add_type("model")
    writer.add_size_label("1.1B")
    writer.add_bool("peerinfer.timing_model", True)
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_vocab_size(shape.vocab)
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16))

    tokens, scores, types = vocabulary(shape.vocab)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    layout = list(tensors(shape))
    for name, dims in layout:
        dtype = np.dtype(np.float32 if len(dims) == 1 else np.float16)
        writer.add_tensor_info(name, dims, dtype, int(np.prod(dims)) * dtype.itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    started = time.monotonic()
    for index, (name, dims) in enumerate(layout):
        writer.write_tensor_data(weights(index, dims))
        if name.endswith("ffn_down.weight") or name == "output.weight":
            say(f"  wrote {name} ({index + 1}/{len(layout)} tensors, {time.monotonic() - started:.0f} s)")
    writer.close()


def llama_quantize() -> Path:
    """The vendored llama.cpp's llama-quantize, built (with llama-server) by bench/build_llama_server.sh."""
    say("finding llama-quantize with bench/build_llama_server.sh (the first time it builds it, ~11 minutes on 2 cores)")
    server = subprocess.run(
        ["bash", str(REPO / "bench" / "build_llama_server.sh")], check=True, stdout=subprocess.PIPE, text=True
    ).stdout.strip()
    return Path(server).with_name("llama-quantize")


def tensor_types(path: Path) -> Counter[str]:
    """How many tensors of each ggml type the file holds, read from its header."""
    import gguf

    reader = gguf.GGUFReader(path)
    return Counter(tensor.tensor_type.name for tensor in reader.tensors)


def describe(path: Path) -> None:
    """Each kind of tensor's types; for a kind whose type differs between layers, the layers of each type."""
    import gguf

    reader = gguf.GGUFReader(path)
    kinds: dict[str, dict[str, list[str]]] = {}
    for tensor in reader.tensors:
        match = re.match(r"^blk\.(\d+)\.(.*)$", tensor.name)
        kind, layer = (f"blk.*.{match[2]}", match[1]) if match else (tensor.name, "")
        kinds.setdefault(kind, {}).setdefault(tensor.tensor_type.name, []).append(layer)
    say(f"{path.name}: {path.stat().st_size / 1e6:.0f} MB, {len(reader.tensors)} tensors")
    for kind, types in kinds.items():
        if len(types) == 1:
            say(f"  {kind}: {next(iter(types))}")
        else:
            say(f"  {kind}: " + "; ".join(f"{name} in layers {','.join(layers)}" for name, layers in types.items()))


def build(target: Path, shape: Shape, threads: int) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(target.parent).free
    if free < NEEDED_FREE_BYTES:
        raise SystemExit(
            f"make_timing_model: {free / 1024**3:.1f} GB free in {target.parent}, it needs about "
            f"{NEEDED_FREE_BYTES / 1024**3:.0f} GB (2.2 GB of F16 before quantizing); free some space or point "
            "PEERINFER_BENCH_CACHE elsewhere"
        )
    quantize = llama_quantize()
    f16 = target.with_name(target.stem + ".f16.gguf.partial")
    partial = target.with_name(target.name + ".partial")
    try:
        started = time.monotonic()
        say(f"writing the F16 model (random weights, seed {SEED}) to {f16}")
        write_f16(f16, shape)
        say(f"  {f16.stat().st_size / 1e9:.2f} GB in {time.monotonic() - started:.0f} s; quantizing to Q4_K_M")
        started = time.monotonic()
        result = subprocess.run(
            [str(quantize), str(f16), str(partial), "Q4_K_M", str(threads)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        if result.returncode != 0:
            say(result.stdout[-4000:])
            raise SystemExit(f"make_timing_model: llama-quantize failed with exit code {result.returncode}")
        for line in result.stdout.splitlines():
            if "llama_model_quantize_impl" in line and ("size" in line or "ftype" in line):
                say("  " + line.strip())
        say(f"  quantized in {time.monotonic() - started:.0f} s")
        types = tensor_types(partial)
        say("  tensor types: " + ", ".join(f"{count} {kind}" for kind, count in sorted(types.items())))
        os.replace(partial, target)
    finally:
        f16.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama-quantize's threads")
    parser.add_argument("--describe", action="store_true", help="also list each tensor kind's types")
    args = parser.parse_args(argv)
    target = CACHE / "timing-models" / f"{NAME}.gguf"
    say(f"timing model: {LABEL}")
    if not target.exists():
        build(target, Shape(), args.threads)
    if args.describe:
        describe(target)
    say(f"timing model: {LABEL}")
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
