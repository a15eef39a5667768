"""What every request is checked for before a route runs: Host, content type, CORS; and the bounded /metrics."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from peerinfer.engine.fake import FakeEngine
from peerinfer.errors import ConfigError
from peerinfer.network.identity import load_or_create_identity
from peerinfer.server.app import create_app
from peerinfer.settings import WorkerSettings, load_worker_settings
from tests.conftest import worker_settings
from tests.test_api_fake import CHAT, HELLO, assert_openai_error

LOCAL = "http://127.0.0.1:8000"


def ready_client(settings: WorkerSettings, base_url: str = LOCAL) -> TestClient:
    client = TestClient(create_app(settings, FakeEngine()), base_url=base_url)
    client.__enter__()
    while client.get("/health").status_code != 200:
        time.sleep(0.01)
    return client


@pytest.fixture
def client() -> Iterator[TestClient]:
    test_client = ready_client(worker_settings())
    yield test_client
    test_client.__exit__(None, None, None)


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",
        "application/json; charset=latin-1",
    ],
)
def test_a_post_body_that_is_not_json_gets_415(client: TestClient, content_type: str | None) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    response = client.post(CHAT, content=b'{"messages": [{"role": "user", "content": "hi"}]}', headers=headers)
    error = assert_openai_error(response, 415)
    assert error["code"] == "unsupported_media_type" and "application/json" in str(error["message"])


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8", "Application/JSON"])
def test_json_content_types_pass(client: TestClient, content_type: str) -> None:
    response = client.post(
        CHAT, content=b'{"messages": [{"role": "user", "content": "hi"}]}', headers={"Content-Type": content_type}
    )
    assert response.status_code == 200


def test_a_5000_deep_json_body_gets_a_clean_400(client: TestClient) -> None:
    deep = b'{"messages": [{"role": "user", "content": "hi"}], "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    error = assert_openai_error(client.post(CHAT, content=deep, headers={"Content-Type": "application/json"}), 400)
    assert "JSON" in str(error["message"])
    assert client.post(CHAT, json=HELLO).status_code == 200


@pytest.mark.parametrize("path", ["/health", "/metrics", "/v1/models", "/nothing"])
def test_a_rebinding_host_is_refused_on_every_route(client: TestClient, path: str) -> None:
    error = assert_openai_error(client.get(path, headers={"Host": "evil.example"}), 400)
    assert error["code"] == "host_not_allowed" and "evil.example" in str(error["message"])
    error = assert_openai_error(client.post(CHAT, json=HELLO, headers={"Host": "evil.example:8000"}), 400)


@pytest.mark.parametrize(
    "host", ["127.0.0.1:8000", "localhost", "LOCALHOST:1234", "[::1]:8000", "127.0.0.2", "localhost."]
)
def test_loopback_hosts_pass(client: TestClient, host: str) -> None:
    assert client.get("/health", headers={"Host": host}).status_code == 200


def test_the_announce_host_and_allowed_hosts_pass() -> None:
    settings = worker_settings(
        announce_url="http://worker.example:8001", allowed_hosts="box.lan, .corp.example, http://url.example:9/"
    )
    client = ready_client(settings)
    try:
        for host in ("worker.example:8001", "box.lan", "gpu.corp.example:80", "corp.example", "url.example"):
            assert client.get("/health", headers={"Host": host}).status_code == 200, host
        for host in ("evil.example", "worker.example.evil.example", "xcorp.example", "203.0.113.9.evil.example"):
            assert_openai_error(client.get("/health", headers={"Host": host}), 400)
        # An IP address (a port-forwarded worker named by its router's address) is no rebinding.
        for host in ("203.0.113.9:8000", "[2001:db8::5]:8000", "10.0.0.7"):
            assert client.get("/health", headers={"Host": host}).status_code == 200, host
    finally:
        client.__exit__(None, None, None)


def test_a_star_allows_any_host() -> None:
    client = ready_client(worker_settings(allowed_hosts="*"))
    try:
        assert client.get("/health", headers={"Host": "anything.example"}).status_code == 200
    finally:
        client.__exit__(None, None, None)


PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type,authorization"}


def test_no_cors_headers_by_default(client: TestClient) -> None:
    preflight = client.options(CHAT, headers={"Origin": "https://app.example", **PREFLIGHT})
    assert "access-control-allow-origin" not in preflight.headers
    answer = client.post(CHAT, json=HELLO, headers={"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in answer.headers


def test_cors_preflight_from_a_listed_origin_is_allowed_and_others_are_not() -> None:
    client = ready_client(worker_settings(cors_origins="https://app.example/"))
    try:
        allowed = client.options(CHAT, headers={"Origin": "https://app.example", **PREFLIGHT})
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        assert "POST" in allowed.headers["access-control-allow-methods"]
        assert "content-type" in allowed.headers["access-control-allow-headers"].lower()
        answer = client.post(CHAT, json=HELLO, headers={"Origin": "https://app.example"})
        assert answer.headers["access-control-allow-origin"] == "https://app.example"
        other = client.options(CHAT, headers={"Origin": "https://evil.example", **PREFLIGHT})
        assert "access-control-allow-origin" not in other.headers
        answer = client.post(CHAT, json=HELLO, headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in answer.headers
    finally:
        client.__exit__(None, None, None)


def test_unknown_paths_do_not_grow_metrics(client: TestClient) -> None:
    client.get("/v1/warmup")
    before = client.get("/metrics").text
    for index in range(2000):
        client.get(f"/v1/x{index}")
    after = client.get("/metrics").text
    assert abs(len(after) - len(before)) < 200
    endpoints = {
        line.split('endpoint="')[1].split('"')[0]
        for line in after.splitlines()
        if line.startswith("peerinfer_requests_total{")
    }
    assert endpoints <= {"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "unmatched"}
    assert 'peerinfer_requests_total{endpoint="unmatched",status="404"} 2001.0' in after


def test_openapi_documents_the_real_request_bodies(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    components = schema["components"]["schemas"]

    def resolve(node: object) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in components, ref
            for value in node.values():
                resolve(value)
        elif isinstance(node, list):
            for value in node:
                resolve(value)

    resolve(schema)
    for path, model in (("/v1/chat/completions", "ChatCompletionRequest"), ("/v1/completions", "CompletionRequest")):
        body = schema["paths"][path]["post"]["requestBody"]
        assert body["required"] is True
        assert body["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{model}"}
        assert set(schema["paths"][path]["post"]["responses"]) >= {"200", "400", "401", "413", "415", "503"}
    assert "messages" in components["ChatCompletionRequest"]["required"]
    assert "ContentPart" in components and "ErrorResponse" in components
    assert "$defs" not in str(schema)


def network_client(tmp_path: Path) -> TestClient:
    """An app with the challenge route; its identity is set by hand instead of by the DHT start-up."""
    app = create_app(worker_settings(dht=True, home=tmp_path, max_body_bytes=20_000), FakeEngine())
    app.state.network.identity = load_or_create_identity(tmp_path)
    return TestClient(app, base_url=LOCAL)


def test_the_challenge_route_has_the_api_body_limits(tmp_path: Path) -> None:
    client = network_client(tmp_path)
    nonce = base64.b64encode(b"n" * 32).decode()
    assert client.post("/peer/challenge", json={"nonce": nonce}).status_code == 200
    deep = b'{"nonce": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    assert_openai_error(client.post("/peer/challenge", content=deep, headers={"Content-Type": "application/json"}), 400)
    big = b'{"nonce": "' + b"A" * 50_000 + b'"}'
    assert_openai_error(client.post("/peer/challenge", content=big, headers={"Content-Type": "application/json"}), 413)
    assert_openai_error(client.post("/peer/challenge", content=f'{{"nonce": "{nonce}"}}'), 415)
    for bad in (b'{"nonce": 5}', b"[]", b'{"nonce": "***"}', b'{"nonce": "\xc3\xa9"}'):
        error = assert_openai_error(
            client.post("/peer/challenge", content=bad, headers={"Content-Type": "application/json"}), 400
        )
        assert error["type"] == "invalid_request_error"
    assert client.post("/peer/challenge", json={"nonce": nonce}).status_code == 200
    operation = client.get("/openapi.json").json()["paths"]["/peer/challenge"]["post"]
    assert "nonce" in operation["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert set(operation["responses"]) >= {"200", "400", "413", "415"}


def test_a_bad_log_level_is_one_config_error_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEERINFER_LOG_LEVEL", "LOUD")
    with pytest.raises(ConfigError, match=r"PEERINFER_LOG_LEVEL='LOUD'.*'DEBUG'"):
        load_worker_settings()
    monkeypatch.setenv("PEERINFER_LOG_LEVEL", "debug")
    assert load_worker_settings().log_level == "DEBUG"


def test_host_and_origin_lists_read_commas_or_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEERINFER_ALLOWED_HOSTS", "a.example, b.example")
    monkeypatch.setenv("PEERINFER_CORS_ORIGINS", '["https://app.example"]')
    settings = load_worker_settings()
    assert settings.allowed_hosts == ("a.example", "b.example")
    assert settings.cors_origins == ("https://app.example",)
