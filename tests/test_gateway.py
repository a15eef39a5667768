"""The gateway in front of fake-engine workers on a private DHT: what OpenAI tools see through it.

Workers run in their own processes so that a test can kill the serving one with -9 mid-answer;
the gateway is a real uvicorn in a thread. Clients are the official ``openai`` package, LangChain,
curl, and plain httpx where the test reads the raw SSE.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn

from peerinfer.client.core import Router, RouterOptions
from peerinfer.client.routing import Probe
from peerinfer.client.transport import WorkerHttp
from peerinfer.engine.fake import FakeEngine
from peerinfer.gateway.app import create_gateway_app
from peerinfer.network.dht import DhtNode
from peerinfer.network.discovery import Discovery
from peerinfer.network.records import model_key, select_live
from peerinfer.network.sources import open_discovery
from peerinfer.settings import GatewaySettings
from tests.conftest import live_worker, worker_settings
from tests.hostile_peer import HostilePeer
from tests.network_support import (
    REPO,
    STORY,
    ProcessWorker,
    ThreadWorker,
    bootstrap_node,
    net_settings,
    network_id,
    story_responder,
    wait_until,
)

FAKE_SHA = FakeEngine().info.sha256
HELLO = [{"role": "user", "content": "tell me a story"}]


def gateway_settings(**overrides: object) -> GatewaySettings:
    values: dict[str, object] = {
        "log_level": "WARNING",
        "sha256": FAKE_SHA,
        "lookup_ttl_s": 0.2,
        "probe_timeout_s": 1.0,
        "choose_timeout_s": 4.0,
        "read_timeout_s": 5.0,
        "keepalive_s": 0.5,
    }
    values.update(overrides)
    return GatewaySettings.model_validate(values)


class ThreadGateway:
    """The gateway on a real uvicorn in a thread, on an ephemeral port of 127.0.0.1."""

    def __init__(self, settings: GatewaySettings, router: Router | None = None, **kwargs: Any) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.app = create_gateway_app(settings, router, **kwargs)
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, 30, "the gateway did not start")

    def openai(self, **options: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, **options)

    def wait_for_peers(self, count: int) -> None:
        def enough() -> bool:
            return int(httpx.get(self.url + "/health", timeout=10).json()["peers_known"]) >= count

        wait_until(enough, 20, f"the gateway did not find {count} peers")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def prefer(url: str) -> Any:
    def chooser(probes: Sequence[Probe], rng: random.Random) -> Probe:
        return next((probe for probe in probes if probe.url == url), probes[0])

    return chooser


class Network:
    """A bootstrap node, workers in processes and gateways in threads; everything stops at the end."""

    def __init__(self, boot: DhtNode, net: int, tmp: Path) -> None:
        self.boot, self.net, self.tmp = boot, net, tmp
        self.workers: list[ProcessWorker] = []
        self.gateways: list[ThreadGateway] = []

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.boot.port}"

    def spawn(self, responder: str = "story", token_delay_s: float = 0.0, **env: str) -> ProcessWorker:
        variables = {
            "PEERINFER_HOME": str(self.tmp / f"home{len(self.workers)}"),
            "PEERINFER_BOOTSTRAP": self.bootstrap,
            "PEERINFER_NETWORK_ID": str(self.net),
            "PEERINFER_RECORD_LIFETIME_S": "30",
            "PEERINFER_RECORD_REFRESH_S": "0.5",
            **env,
        }
        worker = ProcessWorker(responder, variables, token_delay_s)
        self.workers.append(worker)
        return worker

    def gateway(self, peers: int, chooser: Any = None, **overrides: object) -> ThreadGateway:
        settings = gateway_settings(bootstrap=self.bootstrap, network_id=self.net, **overrides)
        router = None
        opened = None
        if chooser is not None:
            opened = open_discovery(
                bootstrap=self.bootstrap, lan=False, network_id=self.net, dht_host=None, timeout_s=5.0
            )
            router = routed(settings, opened.discovery, chooser, opened.description)
        gateway = ThreadGateway(settings, router, opened=opened)
        self.gateways.append(gateway)
        if peers:
            gateway.wait_for_peers(peers)
        return gateway

    def by_url(self, url: str) -> ProcessWorker:
        return next(worker for worker in self.workers if worker.url == url)


def routed(settings: GatewaySettings, discovery: Discovery, chooser: Any, description: str = "a test") -> Router:
    options = RouterOptions(
        probe_timeout_s=settings.probe_timeout_s,
        choose_timeout_s=settings.choose_timeout_s,
        lookup_ttl_s=settings.lookup_ttl_s,
        probe_grace_s=0.3,
    )
    http = WorkerHttp(read_timeout_s=settings.read_timeout_s)
    return Router(discovery, http, model_sha256=FAKE_SHA, options=options, chooser=chooser, description=description)


@pytest.fixture
def network(tmp_path: Path) -> Iterator[Network]:
    net = network_id()
    with bootstrap_node(net) as boot:
        group = Network(boot, net, tmp_path)
        try:
            yield group
        finally:
            for gateway in group.gateways:
                gateway.stop()
            for worker in group.workers:
                worker.kill()


def note(chunk: Any) -> dict[str, Any] | None:
    extra = chunk.model_extra or {}
    value = extra.get("peerinfer")
    return value if isinstance(value, dict) else None


def direct_usage(worker_url: str) -> Any:
    client = openai.OpenAI(base_url=worker_url + "/v1", api_key="none", max_retries=0)
    stream = client.chat.completions.create(
        model="m", messages=HELLO, max_tokens=400, stream=True, stream_options={"include_usage": True}
    )
    return [chunk for chunk in stream][-1].usage


# --- streams through a kill --------------------------------------------------------------------


def test_the_openai_client_streams_through_a_kill_as_one_stream(network: Network) -> None:
    network.spawn(token_delay_s=0.01)
    network.spawn(token_delay_s=0.01)
    gateway = network.gateway(peers=2)
    stream = gateway.openai().chat.completions.create(
        model="my-model", messages=HELLO, max_tokens=400, stream=True, stream_options={"include_usage": True}
    )
    chunks, texts = [], []
    victim: ProcessWorker | None = None
    for chunk in stream:
        chunks.append(chunk)
        if chunk.choices and chunk.choices[0].delta.content:
            texts.append(chunk.choices[0].delta.content)
        if len(texts) == 40 and victim is None:
            first_note = note(chunks[0])
            assert first_note is not None
            victim = network.by_url(first_note["url"])
            victim.kill()
    assert victim is not None
    assert "".join(texts) == STORY  # nothing repeated, nothing missing
    assert len({chunk.id for chunk in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert len({chunk.created for chunk in chunks}) == 1
    assert {chunk.model for chunk in chunks} == {"my-model"}
    roles = [chunk for chunk in chunks if chunk.choices and chunk.choices[0].delta.role]
    assert len(roles) == 1
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert finishes == ["stop"]
    # Usage: one chunk, the last, covering the whole answer as one worker would have counted it.
    assert [chunk.usage is not None for chunk in chunks].count(True) == 1 and chunks[-1].usage is not None
    survivor = next(worker for worker in network.workers if worker is not victim)
    expected = direct_usage(survivor.url)
    assert chunks[-1].usage.completion_tokens == expected.completion_tokens == len(STORY)
    # The resumed prompt is the first one plus the text so far; the core subtracts that text's deltas,
    # but the transcript may put a separator token before it (the base model's "Answer:" + " ").
    assert abs(chunks[-1].usage.prompt_tokens - expected.prompt_tokens) <= 1
    # The peerinfer note names the first peer, the switch where it happened, and both peers at the end.
    notes = [note(chunk) for chunk in chunks]
    switches = [n for n in notes if n is not None and "switch" in n]
    assert len(switches) == 1
    switch = switches[0]["switch"]
    assert switch["from"] == victim.url and switch["to"] == survivor.url
    assert 40 <= switch["resumed_chars"] < len(STORY)
    assert notes[-1] is not None and notes[-1]["peers"] == [victim.url, survivor.url]
    assert notes[-1]["resumes"] == 1 and notes[-1]["failovers"] == 0
    metrics = httpx.get(gateway.url + "/metrics").text
    assert "peerinfer_gateway_resumes_total 1.0" in metrics
    assert 'peerinfer_gateway_requests_total{endpoint="/v1/chat/completions",status="200"} 1.0' in metrics


def test_a_worker_that_dies_before_the_first_token_is_replaced_unseen(network: Network) -> None:
    dying = network.spawn("dying")
    healthy = network.spawn("story")
    gateway = network.gateway(peers=2, chooser=prefer(dying.url))
    with httpx.stream(
        "POST",
        gateway.url + "/v1/completions",
        json={"prompt": "Question: tell me a story\nAnswer:", "max_tokens": 400, "stream": True},
        timeout=30,
    ) as response:
        assert response.status_code == 200
        assert response.headers["x-peerinfer-peer"] != ""
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks if chunk["choices"]) == STORY
    assert {chunk["id"] for chunk in chunks} == {chunks[0]["id"]} and chunks[0]["id"].startswith("cmpl-")
    assert chunks[0]["peerinfer"]["url"] == healthy.url
    assert chunks[0]["peerinfer"]["switch"] == {
        "from": dying.url,
        "to": healthy.url,
        "reason": chunks[0]["peerinfer"]["switch"]["reason"],
        "resumed_chars": 0,
    }
    assert chunks[-1]["peerinfer"]["failovers"] == 1
    assert dying.proc.wait(timeout=5) in (-9, 9)


def test_langchain_streams_through_a_kill(network: Network) -> None:
    from langchain_openai import ChatOpenAI

    network.spawn(token_delay_s=0.01)
    network.spawn(token_delay_s=0.01)
    gateway = network.gateway(peers=2)
    chat = ChatOpenAI(base_url=gateway.url + "/v1", api_key="none", model="m", max_tokens=400, max_retries=0)  # type: ignore[arg-type]
    parts: list[str] = []
    killed = False
    for piece in chat.stream("tell me a story"):
        parts.append(str(piece.content))
        if len(parts) == 30 and not killed:
            # Both are busy only with this answer: the one whose slot is busy serves it.
            busy = [w for w in network.workers if httpx.get(w.url + "/health").json()["slots_busy"] > 0]
            assert len(busy) == 1
            busy[0].kill()
            killed = True
    assert killed
    assert "".join(parts) == STORY


def test_curl_sees_the_workers_sse_framing(network: Network) -> None:
    worker = network.spawn()
    gateway = network.gateway(peers=1)
    body = json.dumps({"messages": HELLO, "max_tokens": 400, "stream": True})
    out = {}
    for name, base in (("direct", worker.url), ("gateway", gateway.url)):
        done = subprocess.run(
            [
                "curl",
                "-sN",
                "-D",
                "-",
                "-H",
                "Content-Type: application/json",
                "-d",
                body,
                base + "/v1/chat/completions",
            ],
            capture_output=True,
            timeout=30,
            check=True,
        )
        out[name] = done.stdout.decode()
    for text in out.values():
        head, _, stream = text.partition("\r\n\r\n")
        assert "content-type: text/event-stream" in head.lower()
        assert "cache-control: no-cache" in head.lower()
        events = stream.split("\n\n")
        assert events[-1] == "" and events[-2] == "data: [DONE]"
        assert all(event.startswith("data: {") for event in events[:-2])
        text_of = [json.loads(e[6:])["choices"] for e in events[:-2]]
        assert "".join(c[0]["delta"].get("content", "") for c in text_of if c) == STORY
    assert "x-peerinfer-peer:" in out["gateway"].lower()


# --- whole answers, refusals, limits -------------------------------------------------------------


def test_whole_answers_come_from_one_peer_and_name_it(network: Network) -> None:
    worker = network.spawn()
    gateway = network.gateway(peers=1)
    client = gateway.openai()
    raw = client.chat.completions.with_raw_response.create(model="mine", messages=HELLO, max_tokens=400)
    answer = raw.parse()
    assert answer.choices[0].message.content == STORY
    assert answer.model == "mine" and answer.id.startswith("chatcmpl-")
    assert answer.usage is not None and answer.usage.completion_tokens == len(STORY)
    assert raw.headers["x-peerinfer-peers"]
    assert (answer.model_extra or {})["peerinfer"]["url"] == worker.url
    completion = client.completions.create(model="m", prompt="Question: tell me a story\nAnswer:", max_tokens=400)
    assert completion.choices[0].text == STORY
    assert completion.object == "text_completion"
    # The same routes answer without /v1, as a worker's do.
    bare = httpx.post(gateway.url + "/completions", json={"prompt": "x", "max_tokens": 5}, timeout=30)
    assert bare.status_code == 200 and bare.json()["choices"][0]["text"] == STORY[:5]
    models = client.models.list().data
    assert [(m.id, (m.model_extra or {})["sha256"]) for m in models] == [("fake-model", FAKE_SHA)]


def test_a_non_streamed_request_fails_over_from_a_dead_worker(network: Network) -> None:
    dying = network.spawn("dying")
    healthy = network.spawn("story")
    gateway = network.gateway(peers=2, chooser=prefer(dying.url))
    response = httpx.post(gateway.url + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 400}, timeout=30)
    assert response.status_code == 200
    answer = response.json()
    assert answer["choices"][0]["message"]["content"] == STORY
    assert answer["peerinfer"]["peers"] == [dying.url, healthy.url] and answer["peerinfer"]["failovers"] == 1


BAD_REQUESTS = [
    {"messages": []},
    {"messages": HELLO, "temperature": 5},
    {"messages": HELLO, "n": "two"},
    {"messages": HELLO, "no_such_field": 1},
    {"messages": [{"role": "wizard", "content": "hi"}]},
]


@pytest.mark.parametrize("body", BAD_REQUESTS)
def test_a_bad_request_gets_the_workers_400_without_asking_a_peer(body: dict[str, Any]) -> None:
    # No peer at all: a request the gateway can refuse itself never needs one.
    net = network_id()
    with bootstrap_node(net) as boot, live_worker(FakeEngine(), worker_settings()) as worker:
        gateway = ThreadGateway(gateway_settings(bootstrap=f"127.0.0.1:{boot.port}", network_id=net))
        try:
            through = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=30)
            direct = httpx.post(worker + "/v1/chat/completions", json=body, timeout=30)
            assert through.status_code == direct.status_code == 400
            assert through.json() == direct.json()
            wrong_type = httpx.post(gateway.url + "/v1/chat/completions", content=b"{}", timeout=30)
            assert wrong_type.status_code == 415
        finally:
            gateway.stop()


def test_a_workers_own_refusal_reaches_the_client_as_the_worker_said_it(network: Network) -> None:
    worker = network.spawn()
    gateway = network.gateway(peers=1)
    body = {"messages": HELLO, "n": 5, "stream": True}  # more choices than the worker's 4 slots: its 400
    direct = httpx.post(worker.url + "/v1/chat/completions", json=body, timeout=30)
    through = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=30)
    assert direct.status_code == through.status_code == 400
    assert through.json() == direct.json()
    whole = httpx.post(gateway.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=30)
    assert whole.status_code == 400 and whole.json()["error"]["param"] == direct.json()["error"]["param"]


def test_no_peer_is_a_503_with_retry_after_naming_the_bootstrap(network: Network) -> None:
    gateway = network.gateway(peers=0, choose_timeout_s=0.5, discovery_timeout_s=0.5)
    for stream in (True, False):
        response = httpx.post(
            gateway.url + "/v1/chat/completions", json={"messages": HELLO, "stream": stream}, timeout=30
        )
        assert response.status_code == 503
        assert int(response.headers["retry-after"]) >= 1
        error = response.json()["error"]
        assert network.bootstrap in error["message"] and error["code"] == "no_peers"
    health = httpx.get(gateway.url + "/health").json()
    assert health["status"] == "no_peers" and health["peers_known"] == 0 and network.bootstrap in health["source"]


def test_a_full_gateway_answers_503_with_retry_after(network: Network) -> None:
    network.spawn(token_delay_s=0.02)
    gateway = network.gateway(peers=1, max_in_flight=1, max_queue=0)
    with httpx.stream(
        "POST", gateway.url + "/v1/chat/completions", json={"messages": HELLO, "stream": True}, timeout=30
    ) as first:
        assert first.status_code == 200
        lines = first.iter_lines()
        next(lines)
        second = httpx.post(gateway.url + "/v1/chat/completions", json={"messages": HELLO}, timeout=30)
        assert second.status_code == 503 and int(second.headers["retry-after"]) >= 1
        assert "PEERINFER_MAX_IN_FLIGHT" in second.json()["error"]["message"]
        rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
    # The place is free again once the stream ended.
    wait_until(
        lambda: httpx.post(gateway.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200,
        10,
        "the gateway's place was not freed",
    )


def test_the_api_key_guards_the_gateway_and_a_worker_key_reaches_the_workers(network: Network) -> None:
    network.spawn(PEERINFER_API_KEY="worker-secret")
    gateway = network.gateway(peers=1, api_key="gateway-secret", worker_api_key="worker-secret")
    url = gateway.url + "/v1/chat/completions"
    body = {"messages": HELLO, "max_tokens": 400}
    assert httpx.post(url, json=body, timeout=30).status_code == 401
    wrong = httpx.post(url, json=body, headers={"Authorization": "Bearer worker-secret"}, timeout=30)
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    right = httpx.post(url, json=body, headers={"Authorization": "Bearer gateway-secret"}, timeout=30)
    assert right.status_code == 200 and right.json()["choices"][0]["message"]["content"] == STORY
    assert httpx.get(gateway.url + "/network").status_code == 401
    assert httpx.get(gateway.url + "/v1/models").status_code == 401
    assert httpx.get(gateway.url + "/health").status_code == 200  # public, as a worker's


def test_a_host_the_gateway_does_not_serve_is_refused(network: Network) -> None:
    gateway = network.gateway(peers=0)
    response = httpx.get(gateway.url + "/health", headers={"Host": "evil.example"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "host_not_allowed"


# --- streams that cannot go on, clients that leave --------------------------------------------


def test_a_stream_that_cannot_be_resumed_ends_with_an_error_event_not_a_cut(network: Network) -> None:
    network.spawn(token_delay_s=0.01)
    network.spawn(token_delay_s=0.01)
    gateway = network.gateway(peers=2)
    body = {"messages": HELLO, "max_tokens": 400, "stream": True, "n": 2}  # two choices: not resumable
    events: list[str] = []
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[6:])
            if len(events) == 20:
                network.by_url(json.loads(events[0])["peerinfer"]["url"]).kill()
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "cannot be resumed" in error["message"]
    with pytest.raises(openai.APIError):  # the openai client raises rather than ending quietly
        for _ in gateway.openai().chat.completions.create(model="m", messages=HELLO, stream=True, n=2):
            for worker in network.workers:
                worker.kill()


def test_a_client_that_leaves_stops_the_peers_stream(network: Network) -> None:
    worker = network.spawn(token_delay_s=0.05)
    gateway = network.gateway(peers=1)
    with httpx.stream(
        "POST", gateway.url + "/v1/chat/completions", json={"messages": HELLO, "stream": True}, timeout=30
    ) as response:
        lines = response.iter_lines()
        for _ in range(5):
            next(lines)
    # The worker frees its slot long before the story's ~8 s, and generated far fewer tokens than it holds.
    wait_until(lambda: httpx.get(worker.url + "/health").json()["slots_busy"] == 0, 30, "the slot stayed busy")
    generated = next(
        float(line.split()[-1])
        for line in httpx.get(worker.url + "/metrics").text.splitlines()
        if line.startswith("peerinfer_generated_tokens_total")
    )
    assert generated < len(STORY) / 2


# --- hostile peers --------------------------------------------------------------------------


def test_sixty_four_concurrent_streams_through_one_gateway_all_arrive_whole(tmp_path: Path) -> None:
    net = network_id()
    with bootstrap_node(net) as boot:
        workers = [
            ThreadWorker(
                FakeEngine(story_responder, token_delay_s=0.002, slots=32, max_queue=64),
                lambda url, i=i: net_settings(tmp_path / f"w{i}", boot, net, url, max_queue=64),
            )
            for i in range(2)
        ]
        # Probes of busy workers on a busy machine are slow: a probe that times out bans its peer, so allow time.
        settings = gateway_settings(
            bootstrap=f"127.0.0.1:{boot.port}", network_id=net, probe_timeout_s=10.0, choose_timeout_s=20.0
        )
        gateway = ThreadGateway(settings)
        try:
            gateway.wait_for_peers(2)

            async def one(client: httpx.AsyncClient, number: int) -> tuple[str, set[str]]:
                body = {"messages": [{"role": "user", "content": f"story {number}"}], "stream": True}
                texts, ids = [], set()
                async with client.stream("POST", gateway.url + "/v1/chat/completions", json=body) as response:
                    assert response.status_code == 200
                    async for line in response.aiter_lines():
                        if line.startswith("data: {"):
                            chunk = json.loads(line[6:])
                            ids.add(chunk["id"])
                            if chunk["choices"]:
                                texts.append(chunk["choices"][0]["delta"].get("content", ""))
                return "".join(texts), ids

            async def all_of_them() -> list[tuple[str, set[str]]]:
                limits = httpx.Limits(max_connections=100)
                async with httpx.AsyncClient(timeout=60, limits=limits) as client:
                    return await asyncio.gather(*(one(client, number) for number in range(64)))

            results = asyncio.run(all_of_them())
            assert [text for text, _ in results] == [STORY] * 64
            assert all(len(ids) == 1 for _, ids in results)
            assert len({next(iter(ids)) for _, ids in results}) == 64  # each stream its own id
        finally:
            gateway.stop()
            for worker in workers:
                worker.stop()


def test_the_health_metrics_network_and_page_routes(network: Network) -> None:
    network.spawn()
    network.spawn()
    gateway = network.gateway(peers=2)
    assert list(gateway.openai().chat.completions.create(model="m", messages=HELLO, max_tokens=5, stream=True))
    table = httpx.get(gateway.url + "/network", timeout=30).json()
    assert table["mode"] == "gateway" and network.bootstrap in table["source"]
    assert sorted(row["url"] for row in table["peers"]) == sorted(worker.url for worker in network.workers)
    assert all(row["verified"] for row in table["peers"])
    health = httpx.get(gateway.url + "/health").json()
    assert health["status"] == "ok" and health["peers_known"] == 2 and health["peers_verified"] == 2
    page = httpx.get(gateway.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    metrics = httpx.get(gateway.url + "/metrics").text
    assert "peerinfer_gateway_time_to_first_token_seconds_bucket" in metrics
    assert 'peerinfer_gateway_requests_total{endpoint="/network",status="200"} 1.0' in metrics
    assert 'endpoint="unmatched"' not in metrics
    httpx.get(gateway.url + "/no/such/path")
    assert 'endpoint="unmatched",status="404"' in httpx.get(gateway.url + "/metrics").text


def test_the_responses_api_streams_through_a_kill(network: Network) -> None:
    network.spawn(token_delay_s=0.01)
    network.spawn(token_delay_s=0.01)
    gateway = network.gateway(peers=2)
    events = []
    killed = False
    with gateway.openai().responses.create(model="m", input="tell me a story", stream=True) as stream:
        for event in stream:
            events.append(event)
            deltas = [e for e in events if e.type == "response.output_text.delta"]
            if len(deltas) == 30 and not killed:
                busy = [w for w in network.workers if httpx.get(w.url + "/health").json()["slots_busy"] > 0]
                busy[0].kill()
                killed = True
    assert killed
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == STORY
    assert events[-1].response.output_text == STORY
    assert events[-1].response.usage is not None and events[-1].response.usage.output_tokens == len(STORY)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    whole = gateway.openai().responses.create(model="m", input="tell me a story")
    assert whole.output_text == STORY and whole.status == "completed"
    refused = httpx.post(gateway.url + "/v1/responses", json={"input": "x", "max_output_tokens": 0}, timeout=30)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_output_tokens"


class Store:
    """A ``ValueStore`` that answers every get with the records the test put there."""

    def __init__(self, values: list[bytes]) -> None:
        self.values = values

    def get(self, key: str, timeout_s: float) -> list[bytes]:
        return list(self.values)


class Forger(HostilePeer):
    """Streams the whole story honestly, in chunks full of forged and unknown keys."""

    async def _stream(self, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
        forged = {
            "id": "chatcmpl-forged",
            "created": 1,
            "model": "<b>evil</b>",
            "object": "evil",
            "peerinfer": {"peer": "a-trusted-peer", "url": "http://trusted.example"},
            "usage": {"prompt_tokens": 1, "completion_tokens": 10**6},
            "evil": {"x": ["<script>alert(1)</script>"]},
        }
        words = STORY.split(" ")
        pieces = [word if i == 0 else " " + word for i, word in enumerate(words)]
        for piece in pieces:
            choice = {"index": 0, "delta": {"content": piece, "role": "system", "evil": 1}, "also": "evil"}
            payload = {**forged, "choices": [choice]}
            writer.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
        end = {**forged, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        writer.write(b"data: " + json.dumps(end).encode() + b"\n\ndata: [DONE]\n\n")
        await writer.drain()


def honest_values(network: Network) -> list[bytes]:
    found: list[bytes] = []

    def fresh() -> bool:
        found[:] = network.boot.get(model_key(FAKE_SHA), 2.0)
        return bool(select_live(found, time.time()).records)

    wait_until(fresh, 15, "the honest worker's record is not on the DHT")
    return found


@pytest.mark.parametrize("mode", ["sse_cut", "sse_error", "sse_garbage", "sse_endless_line", "sse_keepalive"])
def test_a_hostile_peer_behind_the_gateway_never_reaches_the_client_as_garbage(network: Network, mode: str) -> None:
    honest = network.spawn()
    with HostilePeer(mode, FAKE_SHA) as hostile:
        settings = gateway_settings(read_timeout_s=1.0)
        router = routed(settings, Discovery(Store([hostile.record(), *honest_values(network)])), prefer(hostile.url))
        gateway = ThreadGateway(settings, router)
        network.gateways.append(gateway)
        stream = gateway.openai().chat.completions.create(model="m", messages=HELLO, max_tokens=400, stream=True)
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == STORY
        assert hostile.requests[-1] == "POST /v1/chat/completions"  # it did serve, and was left
        assert len({c.id for c in chunks}) == 1
        last = note(chunks[-1])
        assert last is not None and last["peers"] == [hostile.url, honest.url]
        assert router.bans.is_banned(hostile.identity.peer_id, time.monotonic())


def test_a_peers_forged_keys_never_reach_the_client(network: Network) -> None:
    with Forger("sse_cut", FAKE_SHA) as forger:
        settings = gateway_settings()
        router = routed(settings, Discovery(Store([forger.record()])), prefer(forger.url))
        gateway = ThreadGateway(settings, router)
        network.gateways.append(gateway)
        body = {"messages": HELLO, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 100}
        with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body, timeout=30) as response:
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == STORY
    for chunk in chunks:
        assert set(chunk) <= {"id", "object", "created", "model", "system_fingerprint", "choices", "usage", "peerinfer"}
        assert chunk["id"] != "chatcmpl-forged" and chunk["object"] == "chat.completion.chunk"
        assert chunk["model"] == "<b>evil</b>"  # the peer's model name, as text in JSON (no other place to take it)
        for choice in chunk["choices"]:
            assert set(choice) == {"index", "delta", "logprobs", "finish_reason"}
            assert set(choice["delta"]) <= {"content"}
    assert chunks[0]["peerinfer"] == {"peer": forger.identity.peer_id, "url": forger.url}
    # It claims a million tokens: the client is never told more than it asked for.
    assert chunks[-1]["usage"]["completion_tokens"] <= 100
    assert "<script>" not in "".join(events)


GATEWAY_COMMAND = (
    "import argparse, sys\n"
    "from peerinfer.gateway.cli import add_gateway_parser, run_gateway\n"
    "parser = argparse.ArgumentParser()\n"
    "add_gateway_parser(parser.add_subparsers(dest='command'))\n"
    "sys.exit(run_gateway(parser.parse_args(sys.argv[1:]), sys.stderr))\n"
)


def gateway_command(*args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEERINFER_")}
    return subprocess.Popen(
        [sys.executable, "-c", GATEWAY_COMMAND, "gateway", *args],
        cwd=REPO,
        env={**env, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_the_gateway_command_serves_the_network_until_interrupted(network: Network) -> None:
    network.spawn()
    proc = gateway_command("--bootstrap", network.bootstrap, "--network-id", str(network.net), "--port", "0")
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert line.startswith("gateway on http://127.0.0.1:") and network.bootstrap in line, line
        url = line.split()[2]
        wait_until(lambda: httpx.get(url + "/health").json()["peers_known"] == 1, 20, "the gateway found no peer")
        answer = httpx.post(url + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 400}, timeout=30)
        assert answer.json()["choices"][0]["message"]["content"] == STORY
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def test_the_gateway_command_without_a_source_says_how_to_give_one() -> None:
    proc = gateway_command("--port", "0")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "--bootstrap" in err and "--lan" in err and "Traceback" not in err
    proc = gateway_command("--bootstrap", "127.0.0.1:1", "--port", "70000")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "PEERINFER_PORT" in err and "Traceback" not in err


def test_a_lan_gateway_finds_a_lan_worker_with_no_bootstrap(tmp_path: Path) -> None:
    from tests.test_lan import LOOPBACK, start_worker

    net = network_id()
    worker = start_worker(tmp_path / "lan-home", net)
    gateway = ThreadGateway(gateway_settings(lan=True, lan_interfaces=LOOPBACK, network_id=net))
    try:
        gateway.wait_for_peers(1)
        stream = gateway.openai().chat.completions.create(model="m", messages=HELLO, max_tokens=400, stream=True)
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == STORY
        assert note(chunks[0]) == {"peer": worker.peer_id, "url": worker.url}
        assert "LAN" in httpx.get(gateway.url + "/health").json()["source"]
    finally:
        gateway.stop()
        worker.stop()
