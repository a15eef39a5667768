"""Requests that are not valid HTTP/1.1 (Content-Length lies, a Transfer-Encoding uvicorn cannot read):
a 400 in OpenAI's shape, a count in /metrics, and rate-limited log lines, as for the other refusals."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import pytest
import requests

from peerinfer.engine.fake import FakeEngine
from peerinfer.server.protocol import departure_log, refusal_log
from peerinfer.settings import WorkerSettings
from tests.conftest import live_worker, worker_settings
from tests.test_http_limits import Records, connect, error_of, h11_worker, read_until_closed

BODY = b'{"prompt": "hi", "max_tokens": 2}'
BAD_HEADS = [
    b"Content-Length: -5\r\n",
    b"Content-Length: abc\r\n",
    b"Content-Length: 30\r\nContent-Length: 5\r\n",
    b"Transfer-Encoding: gzip\r\n",
]


def _fake_worker(settings: WorkerSettings) -> AbstractContextManager[str]:
    return live_worker(FakeEngine(), settings)


@pytest.fixture
def records() -> Iterator[Records]:
    """What the worker logs (its logger does not propagate to pytest's caplog)."""
    handler = Records()
    loggers = [logging.getLogger(name) for name in ("peerinfer", "uvicorn", "uvicorn.error")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler
    for logger in loggers:
        logger.removeHandler(handler)


@pytest.fixture(params=[_fake_worker, lambda settings: h11_worker(settings)], ids=["auto", "h11"])
def worker(request: pytest.FixtureRequest) -> Iterator[str]:
    start: Callable[[WorkerSettings], AbstractContextManager[str]] = request.param
    with start(worker_settings()) as url:
        yield url


def test_invalid_http_gets_an_openai_400_and_one_counted_refusal_line(worker: str, records: Records) -> None:
    refusal_log.last.pop("bad_request", None)  # a line from an earlier test would hide this one
    for head in BAD_HEADS:
        with connect(worker) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n" + head + b"\r\n" + BODY)
            response = read_until_closed(sock)
        assert response.startswith(b"HTTP/1.1 400 ")
        assert error_of(response)["code"] == "bad_request"
    lines = [record.getMessage() for record in records.records]
    assert not any("Invalid HTTP request received" in line for line in lines)
    assert len([line for line in lines if "is not valid HTTP/1.1" in line]) == 1  # the others are counted
    metrics = requests.get(worker + "/metrics", timeout=10).text
    assert f'peerinfer_http_refused_total{{reason="bad_request"}} {float(len(BAD_HEADS))}' in metrics
    assert requests.get(worker + "/health", timeout=10).status_code == 200


@pytest.fixture
def fresh_departure_log() -> Iterator[None]:
    departure_log.last.pop("left_during_upload", None)
    yield
    departure_log.last.pop("left_during_upload", None)  # so that a later test sees its own line
    departure_log.suppressed.pop("left_during_upload", None)


def test_many_aborted_uploads_are_one_log_line_with_a_count(fresh_departure_log: None, records: Records) -> None:
    uploads = 20
    with live_worker(FakeEngine(), worker_settings(log_level="INFO")) as url:
        for _ in range(uploads):
            with connect(url) as sock:
                sock.sendall(
                    b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 1000\r\nExpect: 100-continue\r\n\r\n"
                )
                assert sock.recv(1024).startswith(b"HTTP/1.1 100 ")  # the app reads the body now
                sock.sendall(b'{"prompt": "')
        # The worker has seen every departure once it answers the next request on a fresh connection.
        assert requests.post(url + "/v1/completions", json={"prompt": "hi"}, timeout=20).status_code == 200
    lines = [record.getMessage() for record in records.records if "left while sending" in record.getMessage()]
    assert len(lines) == 1
