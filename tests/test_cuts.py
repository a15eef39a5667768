"""The same tokens give the same logits however they reach llama.cpp: in other cuts, or one per call.

With batch invariance on (the default) every matmul row takes the same kernel whatever else is in
the call, so where a prompt is cut into calls, and whether a token was read as prompt or decoded
after being generated, leaves no trace in the numbers.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from peerinfer.engine.llama import LlamaBackend, _row_exact_attention
from peerinfer.engine.model_files import open_model_file
from peerinfer.engine.scheduler import SlotWork
from tests.conftest import worker_settings

LENGTH = 300


@pytest.fixture(scope="module")
def backend() -> Iterator[LlamaBackend]:
    settings = worker_settings(slots=2, n_ctx=512)
    backend = LlamaBackend(open_model_file(settings.model, settings.cache_dir), settings)
    backend.calibrate()
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def tokens(backend: LlamaBackend) -> list[int]:
    text = "Indian railways carry 23 million passengers a day on 68,000 km of track. " * 30
    return backend.tokenize(text, True)[:LENGTH]


@pytest.fixture(scope="module")
def reference(backend: LlamaBackend, tokens: list[int]) -> np.ndarray:
    """The logits after reading the prompt as the scheduler does: chunks of 64 from the start."""
    return _last_logits(backend, tokens, _chunks(LENGTH))


def _last_logits(backend: LlamaBackend, tokens: list[int], calls: list[int]) -> np.ndarray:
    """Read ``tokens`` in calls of the given sizes, in order; the logits after the last one."""
    backend._cut(0, 0)
    start = 0
    for size in calls:
        outputs = backend._decode([SlotWork(0, tokens[start : start + size], start, start + size == len(tokens))])
        start += size
    assert start == len(tokens)
    return backend.logits(outputs[-1][1]).copy()


def _chunks(length: int, size: int = 64) -> list[int]:
    return [min(size, length - start) for start in range(0, length, size)]


@pytest.mark.parametrize("tail", [1, 2, 3, 4, 7, 8, 9, 16])
def test_where_a_prompt_is_cut_leaves_the_logits_unchanged(backend: LlamaBackend, tokens: list[int], tail: int) -> None:
    reference = _last_logits(backend, tokens, _chunks(LENGTH))
    cut = _last_logits(backend, tokens, [*_chunks(LENGTH - tail), tail])
    assert np.array_equal(reference, cut)


@pytest.mark.parametrize("generated", [5, 50])
def test_tokens_decoded_one_per_call_give_the_logits_of_a_prompt_read(
    backend: LlamaBackend, tokens: list[int], reference: np.ndarray, generated: int
) -> None:
    one_by_one = _last_logits(backend, tokens, [*_chunks(LENGTH - generated), *([1] * generated)])
    assert np.array_equal(reference, one_by_one)


def test_the_invariant_worker_keeps_an_f16_cache_with_the_attention_patch_setup_applies(backend: LlamaBackend) -> None:
    # scripts/setup.sh builds llama.cpp with scripts/llama-cpp-patches/; without the patch this backend
    # would fall back to a bf16 cache (invariant too, but long prompts read 1.3-1.5x slower).
    assert backend.kv_cache == "f16"


_AVX2 = "peerinfer's, each thread its own share of rows: Q4_K/Q6_K and Q5_0/Q8_0 8 rows at a time (AVX2)"
_AVX512 = "peerinfer's, each thread its own share of rows: Q4_K/Q6_K 8 rows at a time, Q5_0/Q8_0 16 (AVX-512)"


def _cpu_has_avx512_vnni() -> bool:
    flags = Path("/proc/cpuinfo").read_text().split()
    return all(flag in flags for flag in ("avx512bw", "avx512vl", "avx512_vnni"))


def _patch_label() -> str:
    """What the patch's kernels say on this CPU: the AVX-512 ones need VNNI."""
    return _AVX512 if _cpu_has_avx512_vnni() else _AVX2


def test_several_rows_of_k_quant_weights_take_the_patch_setup_applies(backend: LlamaBackend) -> None:
    # scripts/llama-cpp-patches/ggml-kq-rows.patch: the cut cases above then run prompt chunks through it
    # and single tokens through ggml's one-row kernels (the bundled model's attn_output and ffn_down are
    # Q4_K and Q6_K, most of the rest Q5_0), so they fail if its numbers differ from ggml's by one rounding.
    assert backend.kq_matmul == _patch_label()


def test_a_users_row_exact_zero_keeps_the_stock_attention_and_a_bf16_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _row_exact_attention()  # this build has the patch
    monkeypatch.setenv("GGML_CPU_FA_ROW_EXACT", "0")
    assert not _row_exact_attention()


_DIGEST_SCRIPT = """
import hashlib
from peerinfer.engine.llama import LlamaBackend
from peerinfer.engine.model_files import open_model_file
from peerinfer.engine.scheduler import SlotWork
from tests.conftest import worker_settings

settings = worker_settings(slots=8, n_ctx=512, n_threads=2)
backend = LlamaBackend(open_model_file(settings.model, settings.cache_dir), settings)
text = "Indian railways carry 23 million passengers a day on 68,000 km of track. " * 10
tokens = backend.tokenize(text, True)[:130]
digest = hashlib.sha256()
# 8 sequences: chunks of 64 and the 2-row rest, then decode steps of 8, 7, 5, 3, 2 and 1 rows
for slot in range(8):
    for start in range(0, 130, 64):
        part = tokens[start : start + 64]
        outputs = backend._decode([SlotWork(slot, part, start, start + len(part) == 130)])
    digest.update(backend.logits(outputs[-1][1]).tobytes())
for step, rows in enumerate((8, 7, 5, 3, 2, 1)):
    outputs = backend._decode([SlotWork(slot, [tokens[slot + rows]], 130 + step, True) for slot in range(rows)])
    for _, index in outputs:
        digest.update(backend.logits(index).tobytes())
    if rows < 8:  # the other slots' token for this position, without logits
        backend._decode([SlotWork(slot, [tokens[slot]], 130 + step, False) for slot in range(rows, 8)])
print(backend.kq_matmul)
print(digest.hexdigest())
backend.close()
"""


def test_the_k_quant_patch_gives_ggmls_own_numbers_bit_for_bit_with_either_kernel() -> None:
    # The patch's kernels (AVX-512 VNNI here when the CPU has it, AVX2 otherwise or when asked) and its
    # per-thread shares of rows must give exactly the logits of ggml's own matmul (GGML_CPU_KQ_ROWS=0:
    # vec_dot for one row, tinyBLAS for Q5_0 from two), for prompt chunks, a 2-row rest, and decode steps
    # of 8 rows down to 1, odd counts included, with 2 threads. On a CPU without AVX-512 the first two
    # runs are the same kernels; the AVX-512 ones are then checked where CI has such a CPU.
    results = {}
    for mode in ("", "avx2", "0"):
        env = (
            {**os.environ, "GGML_CPU_KQ_ROWS": mode}
            if mode
            else {key: value for key, value in os.environ.items() if key != "GGML_CPU_KQ_ROWS"}
        )
        done = subprocess.run(
            [sys.executable, "-c", _DIGEST_SCRIPT],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            cwd=Path(__file__).resolve().parent.parent,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        label, digest = done.stdout.split("\n")[-3:-1]
        results[mode] = (label, digest)
    assert results[""][0] == _patch_label()
    assert results["avx2"][0] == _AVX2
    assert results["0"][0].startswith("ggml's one row at a time")
    assert results[""][1] == results["0"][1]
    assert results["avx2"][1] == results["0"][1]
