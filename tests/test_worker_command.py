"""The proof of concept's own command: `python -m uvicorn worker:app`."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from peerinfer.engine.model_files import open_model_file, resolve_model_path
from peerinfer.errors import ModelFileError
from tests.conftest import REPO


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_worker(port: int, **env: str) -> subprocess.Popen[str]:
    clean = {key: value for key, value in os.environ.items() if not key.startswith("PEERINFER_")}
    return subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "worker:app", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO,
        env={**clean, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.real
def test_worker_command_prints_the_ready_line_and_serves() -> None:
    port = free_port()
    worker = start_worker(port, PEERINFER_SLOTS="1", PEERINFER_N_CTX="512")
    try:
        assert worker.stdout is not None
        line = worker.stdout.readline().strip()
        assert line == "Model loaded successfully! Ready for inference."
        health = requests.get(f"http://127.0.0.1:{port}/health", timeout=10).json()
        assert health["status"] == "ok" and health["n_ctx"] == 512 and health["slots_total"] == 1
        assert len(health["sha256"]) == 64
    finally:
        worker.terminate()
        _, stderr = worker.communicate(timeout=30)
    assert "sha256" in stderr and "threads" in stderr  # the load is logged with its details


@pytest.mark.parametrize(
    ("content", "fragment"),
    [(None, "does not exist"), (b"not a gguf at all", "is not a GGUF file")],
)
def test_worker_with_a_bad_model_file_exits_with_a_clear_message(
    tmp_path: Path, content: bytes | None, fragment: str
) -> None:
    model = tmp_path / "broken.gguf"
    if content is not None:
        model.write_bytes(content)
    worker = start_worker(free_port(), PEERINFER_MODEL=str(model), PEERINFER_CACHE_DIR=str(tmp_path))
    try:
        _, stderr = worker.communicate(timeout=60)
    finally:
        worker.kill()
    assert worker.returncode == 3
    assert str(model) in stderr and fragment in stderr


def test_worker_prefers_model_gguf_in_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)
    path, expected = resolve_model_path(None, tmp_path / "cache")
    assert path == tmp_path / "model.gguf" and expected is None
    explicit, _ = resolve_model_path(Path("/elsewhere/x.gguf"), tmp_path / "cache")
    assert explicit == Path("/elsewhere/x.gguf")


def test_bundled_model_is_assembled_into_the_cache_and_verified(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    model = open_model_file(None, tmp_path / "cache")
    assert model.path == tmp_path / "cache" / "models" / "gemma-3-270m-q4_k_m.gguf"
    assert model.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert model.size_bytes > 200_000_000


def test_a_corrupted_bundled_model_is_reported_with_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    broken = tmp_path / "cache" / "models" / "gemma-3-270m-q4_k_m.gguf"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"GGUF" + b"\0" * 100)
    with pytest.raises(ModelFileError, match=r"but a5fd3b62.* was expected; delete it"):
        open_model_file(None, tmp_path / "cache")


def test_a_bad_log_level_stops_the_worker_with_one_line(tmp_path: Path) -> None:
    worker = start_worker(free_port(), PEERINFER_LOG_LEVEL="LOUD", PEERINFER_CACHE_DIR=str(tmp_path))
    try:
        _, stderr = worker.communicate(timeout=60)
    finally:
        worker.kill()
    assert worker.returncode == 3
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "PEERINFER_LOG_LEVEL='LOUD'" in lines[0] and "DEBUG" in lines[0]


def raw_exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` and read until the worker closes the connection."""
    received = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(data)
        while chunk := sock.recv(65536):
            received.extend(chunk)
    return bytes(received)


def test_the_worker_command_has_the_http_guard(tmp_path: Path) -> None:
    """Through `python -m uvicorn worker:app` itself (default --http auto): head size and time are bounded."""
    port = free_port()
    worker = start_worker(
        port,
        PEERINFER_MODEL=str(tmp_path / "missing.gguf"),
        PEERINFER_EXIT_ON_LOAD_FAILURE="false",
        PEERINFER_CACHE_DIR=str(tmp_path),
        PEERINFER_MAX_HEADER_BYTES="4096",
        PEERINFER_HEAD_TIMEOUT_S="0.5",
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=10).json()["status"] == "failed":
                    break
            assert time.monotonic() < deadline and worker.poll() is None, "the worker did not come up"
            time.sleep(0.1)
        big = raw_exchange(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 100_000)
        assert big.startswith(b"HTTP/1.1 431 ")
        slow = raw_exchange(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert slow.startswith(b"HTTP/1.1 408 ")
        rebinding = requests.get(f"http://127.0.0.1:{port}/health", headers={"Host": "evil.example"}, timeout=10)
        assert rebinding.status_code == 400 and rebinding.json()["error"]["code"] == "host_not_allowed"
    finally:
        worker.terminate()
        _, stderr = worker.communicate(timeout=30)
    assert "Traceback" not in stderr
    assert "request head is larger than 4096 bytes" in stderr and "not complete after 0.5 s" in stderr
