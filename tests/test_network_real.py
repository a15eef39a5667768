"""End to end with the real bundled model: a worker found on the DHT answers through client.py."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from peerinfer.client.cli import main as client_main
from peerinfer.client.routed import RoutedClient
from peerinfer.client.sdk import PeerInferClient
from peerinfer.engine.base import Engine
from tests.network_support import ThreadWorker, bootstrap_node, net_settings, network_id

pytestmark = pytest.mark.real


def test_real_model_answer_through_the_network_matches_a_direct_request(real_engine: Engine, tmp_path: Path) -> None:
    net = network_id()
    with bootstrap_node(net) as boot:
        worker = ThreadWorker(real_engine, lambda url: net_settings(tmp_path, boot, net, url, n_ctx=1024, slots=4))
        try:
            # The record appears once the worker has measured its speed; under load that takes a while.
            with RoutedClient(f"127.0.0.1:{boot.port}", network_id=net, discovery_timeout_s=60) as routed:
                assert [r.endpoints[0] for r in routed.peers()] == [worker.url]
            question = "What is the capital of France?"
            direct = PeerInferClient(worker.url).chat(
                [{"role": "user", "content": question}], max_tokens=24, temperature=0
            )
            out, err = io.StringIO(), io.StringIO()
            argv = [question, "--bootstrap", f"127.0.0.1:{boot.port}", "--network-id", str(net)]
            code = client_main(
                [*argv, "--max-tokens", "24", "--temperature", "0", "--model", real_engine.info.model_id], out, err
            )
            assert code == 0, err.getvalue()
            assert out.getvalue() == direct + "\n"
            assert direct.strip()
            assert "TTFT" in err.getvalue()
        finally:
            worker.stop()
