"""client.py end to end: text on stdout, stats on stderr, one clear line and exit 1 on failure."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
import requests

from peerinfer.engine.fake import FakeEngine
from tests.conftest import REPO, live_worker, worker_settings


def run_client(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "client.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.real
def test_client_streams_the_answer_to_stdout_and_stats_to_stderr(real_worker: str) -> None:
    done = run_client(
        "--url", real_worker, "--temperature", "0", "--max-tokens", "20", "What is the capital of France?"
    )
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    assert "TTFT" not in done.stdout
    assert "TTFT" in done.stderr and "tokens/s" in done.stderr


@pytest.mark.real
def test_client_json_stats_are_machine_readable(real_worker: str) -> None:
    done = run_client("--url", real_worker, "--json", "--temperature", "0", "--max-tokens", "8", "Count: 1, 2, 3,")
    assert done.returncode == 0, done.stderr
    assert "Task was destroyed" not in done.stderr  # the SDK's loop closes its async generators itself
    stats = json.loads(done.stderr.strip().splitlines()[-1])
    assert stats["completion_tokens"] >= 1 and stats["ttft_s"] > 0 and stats["total_s"] >= stats["ttft_s"]
    assert stats["finish_reason"] in ("stop", "length")


@pytest.mark.real
def test_client_default_prompt_and_system_message(real_worker: str) -> None:
    done = run_client("--url", real_worker, "--system", "Answer briefly.", "--max-tokens", "12", "--temperature", "0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


@pytest.mark.real
def test_client_chat_mode_keeps_the_conversation(real_worker: str) -> None:
    done = subprocess.run(
        [sys.executable, "client.py", "--url", real_worker, "--chat", "--temperature", "0", "--max-tokens", "15"],
        cwd=REPO,
        input="What is the capital of France?\nAnd what river flows through it?\n\n",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    answers = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(answers) >= 2
    assert "Paris" in answers[0]
    assert done.stderr.count("TTFT") == 2


def assert_one_line_error(done: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert done.returncode == 1
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert fragment in lines[0]


def test_client_against_a_dead_url() -> None:
    with socket_free_port() as port:
        done = run_client("--url", f"http://127.0.0.1:{port}", "hi")
    assert_one_line_error(done, "cannot connect")


def test_client_with_a_malformed_url() -> None:
    done = run_client("--url", "localhost:8000", "hi")
    assert done.returncode == 2
    assert "must start with http://" in done.stderr and "Traceback" not in done.stderr


def test_client_with_a_wrong_api_key_gets_401() -> None:
    with live_worker(FakeEngine(), worker_settings(api_key="right")) as url:
        done = run_client("--url", url, "--api-key", "wrong", "hi")
    assert_one_line_error(done, "401")


def test_client_against_a_full_worker_gets_503() -> None:
    engine = FakeEngine(lambda prompt: "x" * 200, token_delay_s=0.05, slots=1, max_queue=0)
    with live_worker(engine, worker_settings()) as url:
        holder = threading.Thread(
            target=lambda: requests.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 200}, timeout=60)
        )
        holder.start()
        while requests.get(url + "/health", timeout=5).json()["slots_busy"] < 1:
            time.sleep(0.01)
        done = run_client("--url", url, "hi")
        holder.join()
    assert_one_line_error(done, "503")
    assert "retry after" in done.stderr


class socket_free_port:
    """A port that nothing listens on (bound, then released)."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        return None
