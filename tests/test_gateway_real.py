"""The gateway in front of a worker on the real bundled model: the same text as from the worker itself."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from peerinfer.engine.base import Engine
from tests.network_support import ThreadWorker, bootstrap_node, net_settings, network_id
from tests.test_gateway import ThreadGateway, gateway_settings

pytestmark = pytest.mark.real
QUESTION = [{"role": "user", "content": "Name three colours of the rainbow."}]


@pytest.fixture(scope="module")
def real_network(real_engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A networked worker on the real model and a gateway in front of it: (worker URL, gateway URL)."""
    net = network_id()
    home: Path = tmp_path_factory.mktemp("real-gateway")
    with bootstrap_node(net) as boot:
        worker = ThreadWorker(real_engine, lambda url: net_settings(home, boot, net, url, slots=4, n_ctx=1024))
        gateway = ThreadGateway(
            gateway_settings(
                bootstrap=f"127.0.0.1:{boot.port}", network_id=net, sha256=real_engine.info.sha256, read_timeout_s=60
            )
        )
        try:
            gateway.wait_for_peers(1)
            yield worker.url, gateway.url
        finally:
            gateway.stop()
            worker.stop()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


def streamed_chat(url: str) -> str:
    stream = client(url).chat.completions.create(
        model="gemma", messages=QUESTION, max_tokens=40, temperature=0, stream=True
    )
    return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


def test_the_gateway_gives_the_workers_own_text_at_temperature_zero(real_network: tuple[str, str]) -> None:
    worker, gateway = real_network
    direct = streamed_chat(worker)
    assert direct.strip()
    assert streamed_chat(gateway) == direct
    whole = client(gateway).chat.completions.create(model="gemma", messages=QUESTION, max_tokens=40, temperature=0)
    assert whole.choices[0].message.content == direct
    prompt = "The capital of France is"
    direct_completion = client(worker).completions.create(model="g", prompt=prompt, max_tokens=12, temperature=0)
    through = client(gateway).completions.create(model="g", prompt=prompt, max_tokens=12, temperature=0)
    assert through.choices[0].text == direct_completion.choices[0].text
    assert through.usage is not None and direct_completion.usage is not None
    assert through.usage.completion_tokens == direct_completion.usage.completion_tokens
