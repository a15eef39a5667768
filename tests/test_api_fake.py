"""The HTTP API with the fake engine: every bad input, auth, health, queue limits, keep-alives."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import pytest
import requests
from fastapi.testclient import TestClient

from peerinfer.engine.fake import FakeEngine
from peerinfer.server.app import create_app
from tests.conftest import live_worker, worker_settings

CHAT = "/v1/chat/completions"
HELLO = {"messages": [{"role": "user", "content": "hello"}]}
JSON = {"Content-Type": "application/json"}


@pytest.fixture
def client() -> Iterator[TestClient]:
    app = create_app(worker_settings(n_ctx=256, max_tokens_cap=100, max_body_bytes=4096), FakeEngine(n_ctx=256))
    with TestClient(app, base_url="http://127.0.0.1:8000") as test_client:
        while test_client.get("/health").status_code != 200:
            time.sleep(0.01)
        yield test_client


def assert_openai_error(response: requests.Response | object, status: int) -> dict[str, object]:
    assert response.status_code == status  # type: ignore[attr-defined]
    error = response.json()["error"]  # type: ignore[attr-defined]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    return dict(error)


def test_chat_answer_and_usage(client: TestClient) -> None:
    body = client.post(CHAT, json=HELLO).json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "You said: Answer:", "refusal": None}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == len(b"You said: Answer:")


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        (b"{not json", "body"),
        (b'{"model": "x"}', "messages"),
        (b'{"messages": []}', "messages"),
        (b'{"messages": [{"role": "user", "content": ["x"]}]}', "messages.0.content"),
        (b'{"messages": [{"role": "wizard", "content": "x"}]}', "messages.0.role"),
        (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', "max_tokens"),
        (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": -5}', "max_tokens"),
        (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 101}', "max_tokens"),
        (b'{"messages": [{"role": "user", "content": "x"}], "temperature": 9}', "temperature"),
        (b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', "temperature"),
    ],
)
def test_bad_input_gets_400_in_openai_shape_and_the_worker_keeps_serving(
    client: TestClient, payload: bytes, param: str
) -> None:
    error = assert_openai_error(client.post(CHAT, content=payload, headers=JSON), 400)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert client.post(CHAT, json=HELLO).status_code == 200


def test_max_tokens_above_cap_says_the_limit(client: TestClient) -> None:
    error = assert_openai_error(client.post(CHAT, json={**HELLO, "max_tokens": 5000}), 400)
    assert "5000" in str(error["message"]) and "100" in str(error["message"])


def test_oversized_body_gets_413(client: TestClient) -> None:
    big = {"messages": [{"role": "user", "content": "x" * 10_000}]}
    error = assert_openai_error(client.post(CHAT, json=big), 413)
    assert "4096" in str(error["message"])


def test_prompt_longer_than_context_says_how_many_tokens(client: TestClient) -> None:
    long = {"messages": [{"role": "user", "content": "y" * 300}]}
    error = assert_openai_error(client.post(CHAT, json=long), 400)
    assert error["code"] == "context_length_exceeded"
    assert "has 318 tokens but the context holds 256" in str(error["message"])


def test_unknown_route_and_method_use_the_same_error_shape(client: TestClient) -> None:
    assert_openai_error(client.get("/v1/nothing"), 404)
    assert_openai_error(client.get(CHAT), 405)


def test_models_lists_the_loaded_model(client: TestClient) -> None:
    data = client.get("/v1/models").json()["data"]
    assert [model["id"] for model in data] == ["fake-model"]


def test_stop_sequence_cuts_the_answer(client: TestClient) -> None:
    body = client.post(CHAT, json={**HELLO, "stop": ["said"]}).json()
    assert body["choices"][0]["message"]["content"] == "You "
    assert body["choices"][0]["finish_reason"] == "stop"


def test_max_tokens_gives_finish_reason_length(client: TestClient) -> None:
    body = client.post(CHAT, json={**HELLO, "max_tokens": 3}).json()
    assert body["choices"][0]["message"]["content"] == "You"
    assert body["choices"][0]["finish_reason"] == "length"


def test_streaming_chunks_end_with_finish_usage_and_done(client: TestClient) -> None:
    payload = {**HELLO, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", CHAT, json=payload) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks if chunk["choices"])
    assert text == "You said: Answer:"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 17


def test_api_key_is_required_when_set_but_health_stays_public() -> None:
    app = create_app(worker_settings(api_key="s3cret"), FakeEngine())
    with TestClient(app, base_url="http://127.0.0.1:8000") as test_client:
        while test_client.get("/health").status_code != 200:
            time.sleep(0.01)
        assert_openai_error(test_client.post(CHAT, json=HELLO), 401)
        wrong = test_client.post(CHAT, json=HELLO, headers={"Authorization": "Bearer nope"})
        assert assert_openai_error(wrong, 401)["code"] == "invalid_api_key"
        right = test_client.post(CHAT, json=HELLO, headers={"Authorization": "Bearer s3cret"})
        assert right.status_code == 200


def test_health_says_loading_until_the_model_is_ready() -> None:
    app = create_app(worker_settings(), FakeEngine(load_delay_s=0.5))
    with TestClient(app, base_url="http://127.0.0.1:8000") as test_client:
        loading = test_client.get("/health")
        assert loading.status_code == 503 and loading.json() == {"status": "loading"}
        busy = test_client.post(CHAT, json=HELLO)
        assert_openai_error(busy, 503)
        assert busy.headers["retry-after"].isdigit()
        while test_client.get("/health").status_code != 200:
            time.sleep(0.02)
        health = test_client.get("/health").json()
        assert health["model"] == "fake-model" and health["n_ctx"] == 4096
        assert health["requests_running"] == 0 and health["requests_waiting"] == 0


def test_full_queue_answers_503_with_retry_after_and_keeps_running_streams_whole() -> None:
    engine = FakeEngine(lambda prompt: "0123456789" * 3, token_delay_s=0.02, slots=1, max_queue=1)
    with live_worker(engine, worker_settings(keepalive_s=0.1)) as url:
        results: dict[str, str] = {}

        def stream(name: str) -> None:
            response = requests.post(url + CHAT, json={**HELLO, "stream": True}, stream=True, timeout=30)
            results[name] = response.content.decode()

        threads = [threading.Thread(target=stream, args=(name,)) for name in ("first", "second")]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while requests.get(url + "/health", timeout=5).json()["requests_waiting"] < 1:
            assert time.monotonic() < deadline
        rejected = requests.post(url + CHAT, json=HELLO, timeout=30)
        for thread in threads:
            thread.join()
    error = assert_openai_error(rejected, 503)
    assert int(rejected.headers["Retry-After"]) >= 1
    assert "queue" in str(error["message"])
    for body in results.values():
        content = "".join(
            json.loads(line[6:])["choices"][0]["delta"].get("content", "")
            for line in body.splitlines()
            if line.startswith("data: {")
        )
        assert content == "0123456789" * 3
        assert body.rstrip().endswith("data: [DONE]")
    # The request that waited in the queue was kept alive with SSE comments.
    assert any(": keep-alive" in body for body in results.values())


def test_metrics_count_requests_tokens_and_latency(client: TestClient) -> None:
    client.post(CHAT, json=HELLO)
    client.post(CHAT, json={"messages": []})
    text = client.get("/metrics").text
    assert 'peerinfer_requests_total{endpoint="/v1/chat/completions",status="200"} 1.0' in text
    assert 'peerinfer_requests_total{endpoint="/v1/chat/completions",status="400"} 1.0' in text
    assert "peerinfer_generated_tokens_total 17.0" in text
    assert "peerinfer_time_to_first_token_seconds_count 1.0" in text
    assert "peerinfer_time_per_output_token_seconds_count 1.0" in text
    assert "peerinfer_slots_total 2.0" in text and "peerinfer_queue_depth 0.0" in text


def test_a_non_streaming_client_that_gives_up_frees_its_slot() -> None:
    engine = FakeEngine(lambda prompt: "z" * 2000, token_delay_s=0.01, slots=1, max_queue=0)
    with live_worker(engine, worker_settings()) as url:
        with pytest.raises(requests.Timeout):
            requests.post(url + CHAT, json={**HELLO, "max_tokens": 2000}, timeout=(5, 0.5))
        deadline = time.monotonic() + 5  # the whole answer would take 20 s
        while requests.get(url + "/health", timeout=5).json()["slots_busy"]:
            assert time.monotonic() < deadline, "the abandoned request kept its slot"
            time.sleep(0.05)
        assert requests.post(url + CHAT, json={**HELLO, "max_tokens": 3}, timeout=10).status_code == 200
