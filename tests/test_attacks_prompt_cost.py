"""A prompt that cannot fit the context is refused before the whole of it is tokenised.

llama.cpp's tokenizer is quadratic in the user-defined tokens of a text (``"a\\n\\n" * 60000``, 180 KB, took
49 s of a core before its 400), so a hostile client could keep every core busy with bodies that are
refused anyway. These tests count what the engine is asked to tokenise; none of them times anything.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from fastapi.testclient import TestClient

from peerinfer.engine.fake import FakeEngine
from peerinfer.engine.prompt import PromptPart
from peerinfer.server.app import create_app
from peerinfer.server.reading import PROBE_FIRST_CHARS
from tests.conftest import live_worker, worker_settings


class CountingEngine(FakeEngine):
    """The fake engine, recording how many characters each tokenize call was given."""

    def __init__(self, n_ctx: int) -> None:
        super().__init__(n_ctx=n_ctx)
        self.tokenized: list[int] = []

    def tokenize(self, prompt: str | Sequence[PromptPart], *, add_bos: bool) -> list[int]:
        self.tokenized.append(len(prompt) if isinstance(prompt, str) else sum(len(part.text) for part in prompt))
        return super().tokenize(prompt, add_bos=add_bos)


@pytest.fixture
def served() -> Iterator[tuple[TestClient, CountingEngine]]:
    engine = CountingEngine(n_ctx=256)
    app = create_app(worker_settings(n_ctx=256, max_body_bytes=1_048_576), engine)
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        while client.get("/health").status_code != 200:
            time.sleep(0.01)
        yield client, engine


def test_a_long_completion_prompt_is_refused_after_reading_its_head(
    served: tuple[TestClient, CountingEngine],
) -> None:
    client, engine = served
    response = client.post("/v1/completions", json={"prompt": "a\n\n" * 200_000, "max_tokens": 1})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert "the context holds 256" in error["message"]
    assert max(engine.tokenized) <= PROBE_FIRST_CHARS


def test_a_chat_of_many_messages_is_refused_after_reading_its_head(
    served: tuple[TestClient, CountingEngine],
) -> None:
    client, engine = served
    messages = [{"role": "user", "content": "a\n\n" * 30}] * 5000
    response = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages"
    assert max(engine.tokenized) <= PROBE_FIRST_CHARS


def test_a_long_prompt_that_fits_is_read_whole_and_served() -> None:
    engine = CountingEngine(n_ctx=40_000)
    app = create_app(worker_settings(n_ctx=40_000, max_body_bytes=1_048_576), engine)
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        while client.get("/health").status_code != 200:
            time.sleep(0.01)
        response = client.post("/v1/completions", json={"prompt": "b" * 30_000, "max_tokens": 2})
    assert response.status_code == 200
    assert response.json()["usage"]["prompt_tokens"] == 30_000
    assert engine.tokenized[-1] == 30_000


class SlowTokenizer(FakeEngine):
    """The fake engine, counting how many long prompts it tokenises at once."""

    def __init__(self) -> None:
        super().__init__(n_ctx=40_000)
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0

    def tokenize(self, prompt: str | Sequence[PromptPart], *, add_bos: bool) -> list[int]:
        long = (len(prompt) if isinstance(prompt, str) else sum(len(part.text) for part in prompt)) > 10_000
        if not long:
            return super().tokenize(prompt, add_bos=add_bos)
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(0.2)  # a slow tokenizer, so that overlapping calls would overlap
        with self.lock:
            self.running -= 1
        return super().tokenize(prompt, add_bos=add_bos)


def test_long_prompts_are_tokenised_one_at_a_time() -> None:
    engine = SlowTokenizer()
    with live_worker(engine, worker_settings(n_ctx=40_000, max_body_bytes=1_048_576, slots=2)) as url:

        def send(index: int) -> int:
            body = {"prompt": f"{index} " + "c" * 20_000, "max_tokens": 1}
            return requests.post(url + "/v1/completions", json=body, timeout=60).status_code

        with ThreadPoolExecutor(4) as pool:
            statuses = list(pool.map(send, range(4)))
    assert statuses == [200] * 4
    assert engine.most == 1
