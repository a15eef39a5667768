"""The worker's connection limits against a real uvicorn on 127.0.0.1, spoken to through raw sockets.

No test here measures time: the limits are set small, and each test waits generously for the close.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
import requests
import uvicorn

from peerinfer.engine.fake import FakeEngine
from peerinfer.server.app import create_app
from peerinfer.server.protocol import departure_log
from peerinfer.settings import WorkerSettings
from tests.conftest import live_worker, worker_settings
from tests.test_api_fake import CHAT, HELLO

WAIT_S = 20.0


def connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=WAIT_S)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a test fails if it never does)."""
    received = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        received.extend(chunk)
    return bytes(received)


def error_of(response: bytes) -> dict[str, object]:
    head, _, body = response.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower()
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return dict(error)


@pytest.fixture
def slow_worker() -> Iterator[str]:
    engine = FakeEngine(lambda prompt: "0123456789" * 10, token_delay_s=0.01, slots=2)
    settings = worker_settings(head_timeout_s=0.5, body_timeout_s=0.5, max_header_bytes=8192, max_connections=20)
    with live_worker(engine, settings) as url:
        yield url


def stream_text(url: str) -> str:
    response = requests.post(url + CHAT, json={**HELLO, "stream": True}, stream=True, timeout=WAIT_S)
    text = ""
    for line in response.iter_lines():
        if line.startswith(b"data: {"):
            choices = json.loads(line[6:])["choices"]
            text += choices[0]["delta"].get("content", "") if choices else ""
    return text


def test_a_huge_header_gets_431_and_a_concurrent_stream_keeps_streaming(slow_worker: str) -> None:
    results: dict[str, str] = {}
    streamer = threading.Thread(target=lambda: results.update(text=stream_text(slow_worker)))
    streamer.start()
    with connect(slow_worker) as sock:
        head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 500_000
        sender = threading.Thread(target=lambda: _send_ignoring_reset(sock, head))
        sender.start()
        response = read_until_closed(sock)
        sender.join(timeout=WAIT_S)
    streamer.join(timeout=WAIT_S)
    assert response.startswith(b"HTTP/1.1 431 ")
    assert "8192" in str(error_of(response)["message"])
    assert results["text"] == "0123456789" * 10
    assert requests.get(slow_worker + "/health", timeout=WAIT_S).status_code == 200


def _send_ignoring_reset(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):  # the server closes after its answer
        sock.sendall(data)


def test_a_head_just_under_the_limit_passes(slow_worker: str) -> None:
    pad = "b" * 7000
    assert requests.get(slow_worker + "/health", headers={"X-Pad": pad}, timeout=WAIT_S).status_code == 200


def test_incomplete_heads_get_408_and_are_closed(slow_worker: str) -> None:
    sockets = [connect(slow_worker) for _ in range(15)]
    try:
        for sock in sockets:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        for sock in sockets:
            response = read_until_closed(sock)
            assert response.startswith(b"HTTP/1.1 408 "), response[:80]
            assert error_of(response)["code"] == "head_timeout"
    finally:
        for sock in sockets:
            sock.close()
    metrics = requests.get(slow_worker + "/metrics", timeout=WAIT_S).text
    assert 'peerinfer_http_refused_total{reason="head_timeout"} 15.0' in metrics


def test_a_connection_that_sends_nothing_is_closed(slow_worker: str) -> None:
    with connect(slow_worker) as sock:
        assert read_until_closed(sock) == b""


def test_a_body_shorter_than_its_content_length_gets_408(slow_worker: str) -> None:
    with connect(slow_worker) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"messages":'
        )
        response = read_until_closed(sock)
    assert response.startswith(b"HTTP/1.1 408 ")
    assert error_of(response)["code"] == "body_timeout"
    assert requests.post(slow_worker + CHAT, json=HELLO, timeout=WAIT_S).status_code == 200


def test_connections_beyond_the_limit_get_503_and_the_worker_recovers() -> None:
    settings = worker_settings(max_connections=5, head_timeout_s=60)
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    with live_worker(FakeEngine(), settings) as url:
        held = [connect(url) for _ in range(5)]
        try:
            deadline = time.monotonic() + WAIT_S
            while True:  # until the server has taken all five held ones
                with connect(url) as extra:
                    extra.sendall(request)
                    response = read_until_closed(extra)
                if response.startswith(b"HTTP/1.1 503 "):
                    break
                assert time.monotonic() < deadline, response[:80]
                time.sleep(0.05)
            assert b"retry-after: 1" in response.lower()
            assert error_of(response)["code"] == "too_many_connections"
        finally:
            for sock in held:
                sock.close()
        deadline = time.monotonic() + WAIT_S
        while requests.get(url + "/health", timeout=WAIT_S).status_code != 200:
            assert time.monotonic() < deadline, "the worker did not take connections again"
            time.sleep(0.05)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_an_aborted_upload_logs_one_line_and_no_traceback(capfd: pytest.CaptureFixture[str]) -> None:
    partial = b'{"messages": ['
    departure_log.last.clear()  # the line of an earlier test's departure would hide this one (rate limit)
    records = Records()
    loggers = [logging.getLogger(name) for name in ("peerinfer", "uvicorn", "uvicorn.error")]
    for logger in loggers:
        logger.addHandler(records)
    try:
        with live_worker(FakeEngine(), worker_settings(log_level="INFO")) as url:
            with connect(url) as sock:
                sock.sendall(
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 1000\r\nExpect: 100-continue\r\n\r\n"
                )
                # The server says 100 Continue once the app reads the body: then the upload starts and stops.
                assert sock.recv(1024).startswith(b"HTTP/1.1 100 ")
                sock.sendall(partial)
            deadline = time.monotonic() + WAIT_S
            while not any("left while sending" in record.getMessage() for record in records.records):
                assert time.monotonic() < deadline, "the aborted upload was not logged"
                time.sleep(0.05)
            assert requests.post(url + CHAT, json=HELLO, timeout=WAIT_S).status_code == 200
    finally:
        for logger in loggers:
            logger.removeHandler(records)
    lines = [record for record in records.records if record.levelno >= logging.INFO and record.name != "uvicorn.access"]
    about_it = [record for record in lines if "left while sending" in record.getMessage()]
    # The partial body may or may not reach the app before the disconnect does.
    assert len(about_it) == 1 and re.search(r": \d+ of 1000 bytes arrived", about_it[0].getMessage())
    assert not [record for record in lines if record.exc_info or record.levelno >= logging.ERROR]
    assert "Traceback" not in capfd.readouterr().err


def test_a_body_declared_too_large_gets_413_and_the_connection_closes_without_reading_it() -> None:
    settings = worker_settings(body_timeout_s=600, max_body_bytes=4096)
    with live_worker(FakeEngine(), settings) as url, connect(url) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 50000000\r\n\r\n{"
        )
        response = read_until_closed(sock)
    assert response.startswith(b"HTTP/1.1 413 ")
    assert error_of(response)["code"] == "request_too_large"


@contextlib.contextmanager
def h11_worker(settings: WorkerSettings) -> Iterator[str]:
    """Like ``live_worker``, with uvicorn's ``--http h11``."""
    app = create_app(settings, FakeEngine())
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, http="h11", log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    deadline = time.monotonic() + WAIT_S
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=WAIT_S)
        sock.close()


def test_the_h11_protocol_has_the_same_deadlines() -> None:
    with h11_worker(worker_settings(head_timeout_s=0.5, body_timeout_s=0.5)) as url:
        with connect(url) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            assert error_of(read_until_closed(sock))["code"] == "head_timeout"
        with connect(url) as sock:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n{"
            )
            assert error_of(read_until_closed(sock))["code"] == "body_timeout"
        deadline = time.monotonic() + WAIT_S
        while requests.get(url + "/health", timeout=WAIT_S).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with requests.Session() as session:  # keep-alive requests, each within the deadlines
            for _ in range(3):
                assert session.post(url + CHAT, json=HELLO, timeout=WAIT_S).status_code == 200
