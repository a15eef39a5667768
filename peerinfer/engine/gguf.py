"""Reading a GGUF file's header: its metadata scalars and where each tensor's data lies.

Pure wire format over a byte buffer (an ``mmap`` of the model file in production). Array values,
such as the tokenizer's 262k-entry vocabulary, are skipped rather than decoded: nothing here needs
them. Layout (little endian): magic ``GGUF``, version (u32, 2 or 3), tensor count (u64), metadata
count (u64), the metadata as (key, type, value), the tensor infos as (name, n_dims, dims, type,
offset), then the data section, which starts at the next multiple of ``general.alignment`` (32 if
unset); tensor offsets count from there.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass

from peerinfer.errors import ModelFileError

GGML_TYPE_Q8_0 = 8
Q8_0_BLOCK = 32
Q8_0_BLOCK_BYTES = 34  # an fp16 scale and 32 int8 values

# metadata value types: struct format of each scalar; 8 is a string and 9 an array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9

Scalar = int | float | bool | str
ByteSource = bytes | bytearray | memoryview | mmap.mmap


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # ggml order: dims[0] is the row length
    ggml_type: int
    offset: int  # from the start of the file


@dataclass(frozen=True)
class GgufHeader:
    version: int
    metadata: dict[str, Scalar]  # scalars and strings; arrays are left out
    tensors: dict[str, TensorInfo]


class _Reader:
    def __init__(self, data: ByteSource) -> None:
        self._raw = memoryview(data)
        self.view = self._raw.cast("B")
        self.at = 0

    def release(self) -> None:
        self.view.release()
        self._raw.release()

    def take(self, fmt: str) -> Scalar:
        size = struct.calcsize("<" + fmt)
        if self.at + size > len(self.view):
            raise ModelFileError(f"GGUF header ends early at byte {self.at}; the file is truncated or corrupt")
        (value,) = struct.unpack_from("<" + fmt, self.view, self.at)
        self.at += size
        return value  # type: ignore[no-any-return]

    def count(self) -> int:
        value = int(self.take("Q"))
        if value > len(self.view):
            raise ModelFileError(f"GGUF header holds an impossible count ({value}) at byte {self.at - 8}")
        return value

    def string(self) -> str:
        size = self.count()
        if self.at + size > len(self.view):
            raise ModelFileError(f"GGUF header ends early at byte {self.at}; the file is truncated or corrupt")
        text = bytes(self.view[self.at : self.at + size]).decode("utf-8", "replace")
        self.at += size
        return text

    def value(self, kind: int) -> Scalar | None:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind = int(self.take("I"))
            items = self.count()
            if item_kind == _STRING:
                for _ in range(items):
                    size = self.count()  # read before moving on: `self.at += self.count()` would lose its 8 bytes
                    self.at += size
            elif item_kind in _SCALARS:
                self.at += struct.calcsize("<" + _SCALARS[item_kind]) * items
            else:
                raise ModelFileError(f"GGUF array of unknown type {item_kind} at byte {self.at}")
            return None
        if kind not in _SCALARS:
            raise ModelFileError(f"GGUF value of unknown type {kind} at byte {self.at}")
        return self.take(_SCALARS[kind])


def read_header(data: ByteSource) -> GgufHeader:
    """Parse the header of a GGUF file held in ``data``; raises ``ModelFileError`` if it is not one."""
    reader = _Reader(data)
    try:
        return _parse(reader)
    finally:
        reader.release()  # the caller may close an mmap behind ``data`` next, even after an error


def _parse(reader: _Reader) -> GgufHeader:
    if bytes(reader.view[:4]) != b"GGUF":
        raise ModelFileError("not a GGUF file: it does not start with the magic bytes 'GGUF'")
    reader.at = 4
    version = int(reader.take("I"))
    if version not in (2, 3):
        raise ModelFileError(f"GGUF version {version} is not supported (expected 2 or 3)")
    tensor_count = reader.count()
    metadata_count = reader.count()
    metadata: dict[str, Scalar] = {}
    for _ in range(metadata_count):
        key = reader.string()
        value = reader.value(int(reader.take("I")))
        if value is not None:
            metadata[key] = value
    infos: list[tuple[str, tuple[int, ...], int, int]] = []
    for _ in range(tensor_count):
        name = reader.string()
        dims = tuple(int(reader.take("Q")) for _ in range(int(reader.take("I"))))
        infos.append((name, dims, int(reader.take("I")), int(reader.take("Q"))))
    alignment = int(metadata.get("general.alignment", 32)) or 32
    start = -(-reader.at // alignment) * alignment
    tensors = {name: TensorInfo(name, dims, kind, start + offset) for name, dims, kind, offset in infos}
    return GgufHeader(version, metadata, tensors)


def output_weight(header: GgufHeader) -> TensorInfo:
    """The output projection: ``output.weight``, or the token embedding when the two are tied."""
    tensor = header.tensors.get("output.weight") or header.tensors.get("token_embd.weight")
    if tensor is None:
        raise ModelFileError("the GGUF file has neither output.weight nor token_embd.weight")
    return tensor
