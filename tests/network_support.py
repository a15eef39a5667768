"""Helpers for the network tests: DHT nodes, in-thread and subprocess workers on 127.0.0.1.

Run as ``python -m tests.network_support RESPONDER`` it is a worker process configured by
PEERINFER_* variables; it prints ``URL http://127.0.0.1:PORT`` once it listens.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import requests
import uvicorn

from peerinfer.engine.base import Engine
from peerinfer.engine.fake import FakeEngine
from peerinfer.network.dht import DhtNode
from peerinfer.server.app import create_app
from peerinfer.settings import WorkerSettings

REPO = Path(__file__).resolve().parent.parent
STORY = (
    "Once upon a time a small model lived on many machines. Each answered in turn, "
    "and when one fell silent another took up the tale without missing a word."
)


def story_responder(prompt: str) -> str:
    """Always the same story; a prompt ending in a prefix of it gets the rest (what resume asks for)."""
    cut = prompt.rfind("Answer:")
    if cut < 0:
        return STORY
    partial = prompt[cut + len("Answer:") :]
    partial = partial[1:] if partial.startswith(" ") else partial
    return STORY[len(partial) :] if STORY.startswith(partial) else STORY


def dying_responder(prompt: str) -> str:
    """Dies like kill -9 as soon as a user's request reaches the engine, before any token."""
    if "Answer:" in prompt:
        os._exit(9)
    return STORY


RESPONDERS: dict[str, Callable[[str], str]] = {"story": story_responder, "dying": dying_responder}


def network_id() -> int:
    """A fresh private network per test, so tests never see each other's records."""
    return random.randrange(1 << 20, 1 << 31)


@contextlib.contextmanager
def bootstrap_node(net: int, lifetime_s: float = 60.0) -> Iterator[DhtNode]:
    node = DhtNode(host="127.0.0.1", port=0, network_id=net, value_lifetime_s=lifetime_s)
    try:
        yield node
    finally:
        node.close()


def net_settings(home: Path, boot: DhtNode, net: int, url: str, **overrides: object) -> WorkerSettings:
    values: dict[str, object] = {
        "exit_on_load_failure": False,
        "log_level": "WARNING",
        "home": home,
        "bootstrap": f"127.0.0.1:{boot.port}",
        "network_id": net,
        "announce_url": url,
        "record_lifetime_s": 30.0,
        "record_refresh_s": 1.0,
        "withdraw_grace_s": 0.1,
    }
    values.update(overrides)
    return WorkerSettings.model_validate(values)


class ThreadWorker:
    """A real uvicorn in a thread serving a networked app; ``stop()`` is a graceful shutdown."""

    def __init__(self, engine: Engine, make_settings: Callable[[str], WorkerSettings]) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.app = create_app(make_settings(self.url), engine)
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        wait_until(lambda: _healthy(self.url), 30, f"worker {self.url} did not become healthy")

    @property
    def peer_id(self) -> str:
        return str(self.app.state.network.identity.peer_id)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def _healthy(url: str) -> bool:
    try:
        return requests.get(url + "/health", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def wait_until(condition: Callable[[], object], timeout_s: float, message: str) -> None:
    """Poll ``condition`` until it is truthy; fail with ``message`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(0.05)


class ProcessWorker:
    """A worker in its own process, so the test can kill it with -9."""

    def __init__(self, responder: str, env: dict[str, str], token_delay_s: float = 0.0) -> None:
        full_env = {**os.environ, **env, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.network_support", responder, str(token_delay_s)],
            cwd=REPO,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.startswith("URL "):
            self.kill()
            raise AssertionError(f"worker process did not start: {line!r}")
        self.url = line.split()[1]
        wait_until(lambda: _healthy(self.url), 30, f"worker process {self.url} did not become healthy")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _serve(responder: str, token_delay_s: float) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    settings = WorkerSettings(announce_url=url, exit_on_load_failure=False, log_level="WARNING")
    engine = FakeEngine(RESPONDERS[responder], token_delay_s=token_delay_s, slots=4, max_queue=8)
    app = create_app(settings, engine)
    print(f"URL {url}", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


if __name__ == "__main__":
    _serve(sys.argv[1], float(sys.argv[2]))
