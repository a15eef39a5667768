"""Shared fixtures: the real bundled model (loaded once) and live uvicorn workers on 127.0.0.1."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import uvicorn

from peerinfer.engine.base import Engine
from peerinfer.server.app import create_app
from peerinfer.settings import WorkerSettings

REPO = Path(__file__).resolve().parent.parent


def worker_settings(**overrides: object) -> WorkerSettings:
    """Settings for tests: never read the environment's PEERINFER_* and never exit the process."""
    values: dict[str, object] = {"exit_on_load_failure": False, "log_level": "WARNING"}
    values.update(overrides)
    return WorkerSettings.model_validate(values)


@contextlib.contextmanager
def live_worker(
    engine: Engine | None, settings: WorkerSettings | None = None, wait_ready: bool = True
) -> Iterator[str]:
    """A real uvicorn serving the app on an ephemeral port; yields its base URL."""
    app = create_app(settings or worker_settings(), engine)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    if wait_ready:
        while time.monotonic() < deadline and requests.get(url + "/health", timeout=5).status_code != 200:
            time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="session")
def real_engine() -> Iterator[Engine]:
    """The bundled Gemma 3 270M through real llama.cpp, loaded once for the whole session."""
    from peerinfer.engine.llama import LlamaEngine

    engine = LlamaEngine(worker_settings(slots=4, n_ctx=1024))
    engine.load()
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def real_worker(real_engine: Engine) -> Iterator[str]:
    with live_worker(real_engine, worker_settings(slots=4, n_ctx=1024, keepalive_s=0.5)) as url:
        yield url
