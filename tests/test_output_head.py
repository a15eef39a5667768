"""peerinfer's output head against llama.cpp's own output product, on the real bundled model.

Each case decodes the same batch twice from the same cache: once with llama.cpp computing the
logits, once with the head, and requires every one of the 262k logits per row to be identical.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from peerinfer.engine import llama, output_head
from peerinfer.engine.llama import LlamaBackend
from peerinfer.engine.model_files import open_model_file
from peerinfer.engine.output_head import AVX2, AVX512, KERNEL_NAMES, OFF, OutputHead, mapped_address
from peerinfer.engine.scheduler import SlotWork
from tests.conftest import worker_settings

PROMPTS = [
    "The history of the Indian railways begins in",
    "भारत की राजधानी नई दिल्ली है और",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Once upon a time, in a village by the sea, there lived",
    "The monsoon reaches Kerala in early June, and",
    "SELECT name, city FROM users WHERE",
    "चाय बनाने के लिए सबसे पहले",
    "Photosynthesis is the process by which plants",
    "The train from Mumbai to Pune leaves at",
]
SLOTS = len(PROMPTS)  # 9: one more than the head's 8 rows per pass over the weights, so two passes


def _backend() -> LlamaBackend:
    settings = worker_settings(slots=SLOTS, n_ctx=512)
    backend = LlamaBackend(open_model_file(settings.model, settings.cache_dir), settings)
    backend.calibrate()
    return backend


@pytest.fixture(scope="module")
def backend() -> Iterator[LlamaBackend]:
    backend = _backend()
    yield backend
    backend.close()


def _read_prompts(backend: LlamaBackend) -> list[int]:
    """Each slot reads its prompt but the last token; returns the prompts' lengths."""
    lengths = []
    for slot, text in enumerate(PROMPTS):
        tokens = backend.tokenize(text, True)
        backend._cut(slot, 0)
        backend._decode([SlotWork(slot, tokens[:-1], 0, False)])
        lengths.append(len(tokens) - 1)
    return lengths


def _both_ways(backend: LlamaBackend, work: list[SlotWork]) -> tuple[np.ndarray, np.ndarray, int]:
    """Logits of ``work`` from llama.cpp's product and from the head's choice; rows the head computed."""
    head = backend._head
    assert head is not None
    outputs = backend._decode(work, head_mode=OFF)
    reference = np.stack([backend.logits(index) for _, index in outputs])
    for item in work:
        backend._cut(item.slot, item.start)
    before = head.rows_computed
    outputs = backend._decode(work)
    ours = np.stack([backend.logits(index) for _, index in outputs])
    for item in work:
        backend._cut(item.slot, item.start)
    return reference, ours, head.rows_computed - before


MAPS = """\
55d0c0a00000-55d0c0a21000 r--p 00000000 fe:00 1234 /usr/bin/python3.11
7f0000000000-7f0000100000 r--p 00000000 fe:00 777 /models/m.gguf
7f1000000000-7f100e000000 r--s 00639000 fe:00 777 /models/m.gguf
7f2000000000-7f2000001000 ---p 00000000 fe:00 777 /models/m.gguf
7f3000000000-7f300e000000 r--s 00639000 fe:00 778 /models/other.gguf
"""


@pytest.mark.parametrize(
    ("path", "inode", "offset", "length", "address"),
    [
        ("/models/m.gguf", 777, 0x639000, 0x1000, 0x7F1000000000),  # the mapping that starts at the data
        ("/models/m.gguf", 777, 0x639000 + 2560, 1 << 20, 0x7F1000000000 + 2560),
        ("/models/m.gguf", 777, 0x100, 0x100, 0x7F0000000100),  # the header's own mapping
        ("/models/m.gguf", 777, 0x600000, 0x100000, None),  # straddles the two: no single mapping holds it
        ("/models/m.gguf", 777, 0x639000, 0xE000001, None),  # one byte past the mapping's end
        ("/models/m.gguf", 999, 0x639000, 0x1000, None),  # same path, another file (replaced since)
        ("/models/other.gguf", 777, 0x639000, 0x1000, None),
    ],
)
def test_the_weights_are_found_in_llama_cpps_mapping(
    path: str, inode: int, offset: int, length: int, address: int | None
) -> None:
    assert mapped_address(MAPS, path, inode, offset, length) == address


def test_the_head_passes_its_load_check_on_the_bundled_model(backend: LlamaBackend) -> None:
    head = backend._head
    assert head is not None and head.shares_llama_mapping  # no second mapping: RSS does not count it twice
    assert AVX2 in head.kernels
    fastest = KERNEL_NAMES[max(head.kernels)]
    assert backend.head_status.startswith(f"peerinfer's, {fastest} kernel"), backend.head_status


@pytest.fixture(params=[AVX2, AVX512], ids=["AVX2 kernel", "AVX-512 kernel"])
def kernel(request: pytest.FixtureRequest, backend: LlamaBackend) -> Iterator[int]:
    """Each kernel in turn, where the CPU has it; the fastest again afterwards."""
    head = backend._head
    assert head is not None
    if request.param not in head.kernels:
        pytest.skip(f"this CPU lacks what the {KERNEL_NAMES[request.param]} kernel needs")
    chosen = head.kernel
    head.kernel = request.param
    yield request.param
    head.kernel = chosen


@pytest.mark.parametrize(
    "slots",
    [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [0, 2, 3], [1, 3], [0, 1, 2, 3, 4], list(range(8)), list(range(9))],
    ids=[
        "1 row",
        "2 rows",
        "3 rows",
        "4 rows",
        "slots 0,2,3 (two parts)",
        "slots 1,3 (two parts)",
        "5 rows",
        "8 rows (one full pass)",
        "9 rows (a second pass of one)",
    ],
)
def test_a_generation_step_gets_llama_cpps_logits_bit_for_bit(
    backend: LlamaBackend, kernel: int, slots: list[int]
) -> None:
    lengths = _read_prompts(backend)
    last = {slot: backend.tokenize(PROMPTS[slot], True)[-1] for slot in slots}
    work = [SlotWork(slot, [last[slot]], lengths[slot], True) for slot in slots]
    reference, ours, computed = _both_ways(backend, work)
    assert computed == len(slots)
    assert np.array_equal(reference, ours)
    assert all(not np.array_equal(ours[i], ours[j]) for i in range(len(slots)) for j in range(i))  # distinct rows


def test_the_last_chunk_of_a_prompt_gets_llama_cpps_logits_bit_for_bit(backend: LlamaBackend, kernel: int) -> None:
    tokens = backend.tokenize(PROMPTS[1] * 3, True)
    backend._cut(2, 0)
    backend._decode([SlotWork(2, tokens[:16], 0, False)])
    reference, ours, computed = _both_ways(backend, [SlotWork(2, tokens[16:], 16, True)])
    assert computed == 1 and np.array_equal(reference, ours)


def test_a_call_whose_outputs_llama_cpp_reorders_keeps_llama_cpps_product(backend: LlamaBackend) -> None:
    lengths = _read_prompts(backend)
    work = [SlotWork(slot, [7, 8], lengths[slot], True) for slot in (0, 1)]  # two tokens each: out of order
    reference, ours, computed = _both_ways(backend, work)
    assert computed == 0 and np.array_equal(reference, ours)


def test_a_head_that_disagrees_at_load_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = llama.open_head

    def off_by_one_row(*args: object, **kwargs: object) -> OutputHead:
        head = real_open(*args, **kwargs)  # type: ignore[arg-type]
        head._weights.value = (head._weights.value or 0) + 34 * 640 // 32  # logits of the next vocabulary row
        return head

    monkeypatch.setattr(llama, "open_head", off_by_one_row)
    backend = _backend()
    try:
        status = backend.head_status
        head = backend._head
        assert head is not None
        assert status.startswith("llama.cpp's: peerinfer's was checked at load and with the "), status
        # every kernel the CPU has was tried, and each one's difference reported
        assert all(f"{KERNEL_NAMES[kernel]} kernel, its logits differ" in status for kernel in head.kernels), status
        before = head.rows_computed
        tokens = backend.tokenize(PROMPTS[0], True)
        backend._decode([SlotWork(0, tokens, 0, True)])
        assert head.rows_computed == before
    finally:
        backend.close()


def test_without_llama_cpps_mapping_the_head_maps_the_file_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(output_head, "mapped_address", lambda *args: None)
    backend = _backend()
    try:
        head = backend._head
        assert head is not None and not head.shares_llama_mapping
        assert backend.head_status.startswith("peerinfer's"), backend.head_status
    finally:
        backend.close()
