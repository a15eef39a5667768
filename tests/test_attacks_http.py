"""Requests that are not valid HTTP/1.1 (Content-Length lies, a Transfer-Encoding uvicorn cannot read):
a 400 in OpenAI's shape, a count in /metrics, and rate-limited log lines, as for the other refusals."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import pytest
import requests

from peerinfer.engine.fake import FakeEngine
from peerinfer.server.protocol import refusal_log
from peerinfer.settings import WorkerSettings
from tests.conftest import live_worker, worker_settings
from tests.test_http_limits import connect, error_of, h11_worker, read_until_closed

BODY = b'{"prompt": "hi", "max_tokens": 2}'
BAD_HEADS = [
    b"Content-Length: -5\r\n",
    b"Content-Length: abc\r\n",
    b"Content-Length: 30\r\nContent-Length: 5\r\n",
    b"Transfer-Encoding: gzip\r\n",
]


def _fake_worker(settings: WorkerSettings) -> AbstractContextManager[str]:
    return live_worker(FakeEngine(), settings)


@pytest.fixture(params=[_fake_worker, lambda settings: h11_worker(settings)], ids=["auto", "h11"])
def worker(request: pytest.FixtureRequest) -> Iterator[str]:
    start: Callable[[WorkerSettings], AbstractContextManager[str]] = request.param
    with start(worker_settings()) as url:
        yield url


def test_invalid_http_gets_an_openai_400_and_one_counted_refusal_line(
    worker: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    refusal_log.last.pop("bad_request", None)  # a line from an earlier test would hide this one
    for head in BAD_HEADS:
        with connect(worker) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n" + head + b"\r\n" + BODY)
            response = read_until_closed(sock)
        assert response.startswith(b"HTTP/1.1 400 ")
        assert error_of(response)["code"] == "bad_request"
    lines = [record.getMessage() for record in caplog.records]
    assert not any("Invalid HTTP request received" in line for line in lines)
    assert len([line for line in lines if "is not valid HTTP/1.1" in line]) == 1  # the others are counted
    metrics = requests.get(worker + "/metrics", timeout=10).text
    assert f'peerinfer_http_refused_total{{reason="bad_request"}} {float(len(BAD_HEADS))}' in metrics
    assert requests.get(worker + "/health", timeout=10).status_code == 200
