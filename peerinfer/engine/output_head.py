"""The seam to ``output_head.c``: the model's output product (hidden state -> logits) done by peerinfer.

``scripts/setup.sh`` compiles the C file into ``_output_head.so`` next to this module. Where that
library, the CPU (AVX2, FMA, F16C; AVX-512 with VNNI for the faster kernel) or the model (q8_0 output
weights) does not allow it, ``open_head`` says why and the worker lets llama.cpp compute the product
as before.

The weights are read through llama.cpp's own mapping of the model file, found in /proc/self/maps, so
they add nothing to the process. Where there is none (llama.cpp loaded without mmap, or not Linux),
through a mapping of our own: the pages are shared in the page cache, but RSS counts them twice.
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Sequence
from pathlib import Path

from peerinfer.engine.gguf import (
    GGML_TYPE_Q8_0,
    Q8_0_BLOCK,
    Q8_0_BLOCK_BYTES,
    TensorInfo,
    output_weight,
    read_header,
)
from peerinfer.errors import EngineError, ModelFileError

LIBRARY = Path(__file__).with_name("_output_head.so")

OFF, SKIP, CAPTURE = 0, 1, 2  # po_capture.mode
AVX2, AVX512 = 1, 2  # the kernels (PO_KERNEL_*): the same logits, AVX-512 faster where the CPU has it
KERNEL_NAMES = {AVX2: "AVX2", AVX512: "AVX-512 VNNI"}


class _Capture(ctypes.Structure):
    _fields_ = [
        ("mode", ctypes.c_int32),
        ("n_embd", ctypes.c_int32),
        ("max_rows", ctypes.c_int32),
        ("rows", ctypes.c_int32),
        ("overflow", ctypes.c_int32),
        ("hidden", ctypes.POINTER(ctypes.c_float)),
    ]


class HeadUnavailable(EngineError):
    """Why the output head cannot be used here; the worker catches it and keeps llama.cpp's product."""


class OutputHead:
    """Captures the hidden rows of each decode (through llama.cpp's eval callback) and computes their logits."""

    def __init__(
        self,
        library: ctypes.CDLL,
        weights: int,
        own_map: mmap.mmap | None,
        n_vocab: int,
        n_embd: int,
        max_rows: int,
        threads: int,
        kernels: int,
    ) -> None:
        self._library = library
        self._weights = ctypes.c_void_p(weights)
        self._own_map = own_map  # None when the weights are read through llama.cpp's own mapping
        self.n_vocab = n_vocab
        self.n_embd = n_embd
        self._threads = threads
        self._hidden = (ctypes.c_float * (max_rows * n_embd))()
        self._capture = _Capture(OFF, n_embd, max_rows, 0, 0, ctypes.cast(self._hidden, ctypes.POINTER(ctypes.c_float)))
        self.rows_computed = 0  # logits rows written since load
        self.kernels = tuple(kernel for kernel in KERNEL_NAMES if kernels & kernel)  # what this CPU runs
        self.kernel = max(self.kernels)  # the fastest; tests set each in turn
        self.eval_address: int = ctypes.cast(library.po_eval, ctypes.c_void_p).value or 0
        self.capture_address: int = ctypes.addressof(self._capture)

    @property
    def shares_llama_mapping(self) -> bool:
        return self._own_map is None

    def arm(self, mode: int) -> None:
        """Set what the next decode's callback does: ``OFF``, ``SKIP`` or ``CAPTURE``."""
        self._capture.mode = mode
        self._capture.rows = 0
        self._capture.overflow = 0

    def write_logits(self, rows: Sequence[int]) -> None:
        """Compute the captured rows' logits into ``rows`` (addresses of n_vocab floats), in capture order."""
        capture = self._capture
        if capture.overflow or capture.rows != len(rows):
            raise EngineError(
                f"the output head captured {capture.rows} hidden rows for {len(rows)} outputs"
                f"{' (overflow)' if capture.overflow else ''}; set PEERINFER_OUTPUT_HEAD=false and report this"
            )
        pointers = (ctypes.c_void_p * len(rows))(*rows)
        status = self._library.po_logits(
            self._weights, self.n_vocab, self.n_embd, self._hidden, len(rows), pointers, self._threads, self.kernel
        )
        if status != 0:
            raise EngineError(f"the output head could not compute {len(rows)} rows (status {status})")
        self.rows_computed += len(rows)

    def close(self) -> None:
        """Call before llama.cpp frees the model: the weights may be read through its mapping."""
        self._capture.mode = OFF
        self._weights = ctypes.c_void_p(0)
        if self._own_map is not None:
            self._own_map.close()


def mapped_address(maps: str, path: str, inode: int, offset: int, length: int) -> int | None:
    """Address of file bytes [offset, offset + length) of ``path`` in a readable mapping, from /proc/self/maps text."""
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or fields[5] != path or "r" not in fields[1] or int(fields[4]) != inode:
            continue
        first, last = (int(value, 16) for value in fields[0].split("-"))
        start = int(fields[2], 16)
        if start <= offset and offset + length <= start + (last - first):
            return first + offset - start
    return None


def open_head(model_path: Path, ggml_base: Path, n_vocab: int, n_embd: int, max_rows: int, threads: int) -> OutputHead:
    """Load the library and map the output weights; raises ``HeadUnavailable`` with the reason."""
    if not LIBRARY.exists():
        raise HeadUnavailable(f"{LIBRARY.name} is not built (run scripts/setup.sh; it needs a C compiler)")
    try:
        # The library calls ggml's accessors, which llama_cpp loaded without making them global.
        ctypes.CDLL(str(ggml_base), mode=ctypes.RTLD_GLOBAL)
        library = ctypes.CDLL(str(LIBRARY))
    except OSError as exc:
        raise HeadUnavailable(f"{LIBRARY.name} could not be loaded: {exc}") from exc
    library.po_supported.restype = ctypes.c_int
    library.po_kernels.restype = ctypes.c_int
    library.po_logits.restype = ctypes.c_int
    library.po_logits.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int32,
        ctypes.c_void_p,
        ctypes.c_int32,
        ctypes.POINTER(ctypes.c_void_p),
        ctypes.c_int32,
        ctypes.c_int32,
    ]
    kernels = int(library.po_kernels())
    if not library.po_supported() or not kernels:
        raise HeadUnavailable("this CPU lacks AVX2, FMA or F16C")
    path = model_path.resolve()
    try:
        stat = path.stat()
        inode, size = stat.st_ino, stat.st_size
        with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as header:
            tensor = _q8_0_output(header, n_vocab, n_embd, size)
    except OSError as exc:
        raise HeadUnavailable(f"the model file could not be mapped: {exc}") from exc
    length = n_vocab * n_embd // Q8_0_BLOCK * Q8_0_BLOCK_BYTES
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux
        maps = ""
    address = mapped_address(maps, str(path), inode, tensor.offset, length)
    if address is not None:  # llama.cpp's own mapping: reading through it adds no pages to this process
        return OutputHead(library, address, None, n_vocab, n_embd, max_rows, threads, kernels)
    try:
        with path.open("rb") as file:
            # copy-on-write, so that ctypes can take its address; nothing writes to it, so no page is copied
            own_map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    except OSError as exc:
        raise HeadUnavailable(f"the model file could not be mapped: {exc}") from exc
    base = ctypes.addressof(ctypes.c_char.from_buffer(own_map))
    return OutputHead(library, base + tensor.offset, own_map, n_vocab, n_embd, max_rows, threads, kernels)


def _q8_0_output(header: mmap.mmap, n_vocab: int, n_embd: int, file_size: int) -> TensorInfo:
    try:
        tensor = output_weight(read_header(header))
    except ModelFileError as exc:
        raise HeadUnavailable(f"its GGUF header could not be read: {exc}") from exc
    expected = (n_embd, n_vocab)
    if tensor.ggml_type != GGML_TYPE_Q8_0:
        raise HeadUnavailable(f"{tensor.name} is ggml type {tensor.ggml_type}, not q8_0")
    if tensor.dims != expected or n_embd % Q8_0_BLOCK:
        raise HeadUnavailable(f"{tensor.name} has shape {tensor.dims}, expected {expected}")
    if tensor.offset + n_vocab * n_embd // Q8_0_BLOCK * Q8_0_BLOCK_BYTES > file_size:
        raise HeadUnavailable(f"{tensor.name} runs past the end of the file")
    return tensor
