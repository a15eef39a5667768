"""The web page on the gateway, in a real browser: two workers, the serving one killed with -9 mid-answer.

The workers are fake-engine processes on a private DHT (tests/network_support.py), telling the same
story slowly enough to be killed in the middle of it; the gateway runs in a thread on uvicorn.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from peerinfer.client.core import Chooser, Router, RouterOptions
from peerinfer.client.routing import Probe
from peerinfer.client.transport import WorkerHttp
from peerinfer.engine.fake import FakeEngine
from peerinfer.gateway.app import create_gateway_app
from peerinfer.network.dht import DhtNode
from peerinfer.network.sources import open_discovery
from peerinfer.settings import GatewaySettings
from tests.browser import live_app, open_page, page_errors
from tests.network_support import STORY, ProcessWorker, bootstrap_node, network_id, wait_until

FAKE_SHA = FakeEngine().info.sha256
TOKEN_DELAY_S = 0.04  # the story takes a few seconds: time to see it grow, and to kill its worker


class Network:
    def __init__(self, boot: DhtNode, net: int, tmp: Path) -> None:
        self.boot, self.net, self.tmp = boot, net, tmp
        self.workers: list[ProcessWorker] = []

    def spawn(self, responder: str = "story") -> ProcessWorker:
        env = {
            "PEERINFER_HOME": str(self.tmp / f"home{len(self.workers)}"),
            "PEERINFER_BOOTSTRAP": f"127.0.0.1:{self.boot.port}",
            "PEERINFER_NETWORK_ID": str(self.net),
            "PEERINFER_RECORD_LIFETIME_S": "30",
            "PEERINFER_RECORD_REFRESH_S": "0.5",
        }
        worker = ProcessWorker(responder, env, TOKEN_DELAY_S)
        self.workers.append(worker)
        return worker

    def gateway_settings(self) -> GatewaySettings:
        return GatewaySettings.model_validate(
            {
                "bootstrap": f"127.0.0.1:{self.boot.port}",
                "network_id": self.net,
                "sha256": FAKE_SHA,
                "lookup_ttl_s": 0.5,
                "log_level": "WARNING",
            }
        )


@pytest.fixture
def network(tmp_path: Path) -> Iterator[Network]:
    net = network_id()
    with bootstrap_node(net) as boot:
        group = Network(boot, net, tmp_path)
        try:
            yield group
        finally:
            for worker in group.workers:
                worker.kill()


def test_the_answer_goes_on_after_its_worker_is_killed_and_the_page_says_so(network: Network) -> None:
    workers = [network.spawn(), network.spawn()]
    with live_app(create_gateway_app(network.gateway_settings())) as url, open_page(url) as page:
        page.locator("#peers tbody tr").nth(1).wait_for()  # two peers listed
        assert "gateway" in page.locator("#mode").inner_text()
        table = page.locator("#peers tbody").inner_text()
        assert all(worker.url in table for worker in workers)
        page.locator("#model option").first.wait_for(state="attached")
        page.fill("#max-tokens", "400")
        page.fill("#prompt", "tell me a story")
        page.press("#prompt", "Enter")
        answer = page.locator(".msg.assistant")
        text = answer.locator(".text")
        wait_until(lambda: len(text.text_content() or "") >= 30, 30, "the story did not start streaming")
        served = answer.locator(".peer").inner_text()
        (serving,) = [worker for worker in workers if worker.url in served]
        (other,) = [worker for worker in workers if worker is not serving]
        partial = text.text_content() or ""
        assert len(partial) < len(STORY)  # killed mid-answer, not after it
        serving.kill()
        answer.and_(page.locator("[data-state]")).wait_for()
        assert answer.get_attribute("data-state") == "done"
        assert text.text_content() == STORY  # nothing lost, nothing repeated
        notes = answer.locator(".note").all_inner_texts()
        assert notes[0].startswith(f"Resumed on {other.url} after ")
        assert f"{serving.url} failed" in notes[0]
        assert notes[-1].startswith("2 peers served this answer")
        assert other.url in answer.locator(".peer").inner_text()
        assert page_errors(page) == []


def prefer(url: str) -> Chooser:
    def chooser(probes: Sequence[Probe], rng: random.Random) -> Probe:
        return next((probe for probe in probes if probe.url == url), probes[0])

    return chooser


def test_a_worker_that_dies_before_the_first_token_is_a_failover_note(network: Network) -> None:
    dying, healthy = network.spawn("dying"), network.spawn("story")
    settings = network.gateway_settings()
    opened = open_discovery(
        bootstrap=settings.bootstrap, lan=False, network_id=network.net, dht_host=None, timeout_s=5.0
    )
    router = Router(
        opened.discovery,
        WorkerHttp(),
        model_sha256=FAKE_SHA,
        options=RouterOptions(lookup_ttl_s=0.5, probe_grace_s=0.3),
        chooser=prefer(dying.url),  # the gateway's first choice is the worker that dies
        description=opened.description,
    )
    with live_app(create_gateway_app(settings, router, opened=opened)) as url, open_page(url) as page:
        page.locator("#peers tbody tr").nth(1).wait_for()
        page.locator("#model option").first.wait_for(state="attached")
        page.fill("#max-tokens", "400")
        page.fill("#prompt", "tell me a story")
        page.press("#prompt", "Enter")
        answer = page.locator(".msg.assistant")
        answer.and_(page.locator("[data-state]")).wait_for()
        assert answer.get_attribute("data-state") == "done"
        assert answer.locator(".text").text_content() == STORY
        assert dying.proc.wait(timeout=10) in (-9, 9)
        notes = answer.locator(".note").all_inner_texts()
        assert notes[0].startswith(f"Failed over from {dying.url} to {healthy.url} before the first token")
        # The dying worker never accepted the request (it died before its headers): it served nothing.
        assert notes[-1] == f"1 peer served this answer: {healthy.url} (1 failover, 0 resumes)"
        assert answer.locator(".peer").inner_text().endswith(f"({healthy.url})")
        assert page_errors(page) == []
