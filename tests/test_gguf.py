"""Reading GGUF headers: the bundled model's, and small files written here byte by byte."""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

import pytest

from peerinfer.engine.gguf import GGML_TYPE_Q8_0, output_weight, read_header
from peerinfer.engine.model_files import open_model_file
from peerinfer.errors import ModelFileError


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def _gguf(metadata: list[bytes], tensors: list[tuple[str, tuple[int, ...], int, int]], version: int = 3) -> bytes:
    """A GGUF header: ``metadata`` holds encoded (key, type, value) entries; tensors are (name, dims, type, offset)."""
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(metadata)) + b"".join(metadata)
    for name, dims, kind, offset in tensors:
        out += _string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", kind, offset)
    return out


def _entry(key: str, kind: int, value: bytes) -> bytes:
    return _string(key) + struct.pack("<I", kind) + value


def test_the_bundled_model_has_a_tied_q8_0_output_matrix() -> None:
    model = open_model_file(None, Path.home() / ".cache" / "peerinfer")
    with model.path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        header = read_header(data)
        assert header.metadata["general.architecture"] == "gemma3"
        weight = output_weight(header)
        assert (weight.name, weight.ggml_type, weight.dims) == ("token_embd.weight", GGML_TYPE_Q8_0, (640, 262144))
        size = 262144 * 640 // 32 * 34
        assert weight.offset % 32 == 0 and weight.offset + size <= len(data)
        assert all(0 < info.offset < model.size_bytes for info in header.tensors.values())


def test_arrays_are_skipped_and_offsets_count_from_the_aligned_data_section() -> None:
    metadata = [
        _entry("general.architecture", 8, _string("tiny")),
        _entry("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 3) + _string("a") + _string("bc") + _string("")),
        _entry("tokenizer.ggml.scores", 9, struct.pack("<IQ", 6, 2) + struct.pack("<ff", 0.5, -1.0)),
        _entry("tiny.embedding_length", 4, struct.pack("<I", 64)),
        _entry("general.alignment", 4, struct.pack("<I", 64)),
        _entry("tiny.flag", 7, struct.pack("<?", True)),
    ]
    tensors = [("token_embd.weight", (64, 10), GGML_TYPE_Q8_0, 0), ("output.weight", (64, 10), 8, 4096)]
    data = _gguf(metadata, tensors)
    header = read_header(data)
    assert header.metadata == {
        "general.architecture": "tiny",
        "tiny.embedding_length": 64,
        "general.alignment": 64,
        "tiny.flag": True,
    }
    start = -(-len(data) // 64) * 64
    assert header.tensors["token_embd.weight"].offset == start
    assert output_weight(header).name == "output.weight"  # an untied output matrix wins
    assert output_weight(header).offset == start + 4096


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GGML" + bytes(20), "magic bytes"),
        (_gguf([], [], version=1), "version 1"),
        (_gguf([_entry("general.name", 8, _string("cut"))], [])[:-2], "ends early"),
        (_gguf([_entry("x", 99, b"")], []), "unknown type 99"),
        (b"GGUF" + struct.pack("<IQQ", 3, 2**60, 0), "impossible count"),
    ],
)
def test_a_broken_header_is_a_model_file_error(data: bytes, message: str) -> None:
    with pytest.raises(ModelFileError, match=message):
        read_header(data)


def test_a_file_without_an_output_matrix_is_named() -> None:
    with pytest.raises(ModelFileError, match=r"neither output\.weight nor token_embd\.weight"):
        output_weight(read_header(_gguf([], [("blk.0.attn_q.weight", (64, 64), 8, 0)])))
