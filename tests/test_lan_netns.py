"""Real multicast between network namespaces on one bridge: a LAN worker is found by ``--lan`` discovery.

Namespace A runs a fake-engine worker with ``PEERINFER_LAN=1`` on ``--host 0.0.0.0`` (so its
announce URL is guessed: the veth's address); namespace B lists the network with
``python -m peerinfer peers --lan --json`` and sees the worker verified, its challenge answered
over HTTP across the bridge. Each namespace has only ``lo`` and one veth. Needs root.

Run as ``python -m tests.test_lan_netns serve PORT`` it is the worker of namespace A.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns_lab import NetnsLab, unavailable

REPO = Path(__file__).resolve().parent.parent
PEERS_TIMEOUT_S = 30


@pytest.fixture
def lab() -> Iterator[NetnsLab]:
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    with NetnsLab() as made:
        yield made


def _env(home: Path, net: int) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PEERINFER_HOME": str(home),
        "PEERINFER_NETWORK_ID": str(net),
        "PEERINFER_LOG_LEVEL": "INFO",
        "NO_PROXY": "*",
    }


def test_a_worker_in_one_namespace_is_found_verified_from_another(lab: NetnsLab, tmp_path: Path) -> None:
    lan = lab.bridge("lan")
    a = lab.host("a", lan, "10.77.0.1/24")
    b = lab.host("b", lan, "10.77.0.2/24")
    net = 0x4C414E  # namespaces see no one else's multicast: any id works
    log = (tmp_path / "worker.log").open("w")
    worker = a.popen(
        [sys.executable, "-m", "tests.test_lan_netns", "serve", "8000"],
        cwd=REPO,
        env={**_env(tmp_path / "a", net), "PEERINFER_LAN": "1"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    argv = ["-m", "peerinfer", "peers", "--lan", "--json", "--network-id", str(net), "--timeout", str(PEERS_TIMEOUT_S)]
    listed = b.run([sys.executable, *argv], PEERS_TIMEOUT_S + 30, cwd=REPO, env=_env(tmp_path / "b", net))
    log.close()
    worker_log = (tmp_path / "worker.log").read_text()[-3000:]
    assert worker.poll() is None, f"the worker died:\n{worker_log}"
    assert listed.returncode == 0, f"{listed.stdout}\n{listed.stderr}\nworker:\n{worker_log}"
    peers = json.loads(listed.stdout)
    assert [(peer["endpoint"], peer["verified"]) for peer in peers] == [("http://10.77.0.1:8000", True)], (
        f"{listed.stderr}\nworker:\n{worker_log}"
    )


def _serve(port: int) -> None:
    """The worker of namespace A: the fake engine, every interface, PEERINFER_* from the environment."""
    import uvicorn

    from peerinfer.engine.fake import FakeEngine
    from peerinfer.server.app import create_app
    from peerinfer.settings import load_worker_settings

    # The announce URL is guessed from these, as for `uvicorn worker:app --host 0.0.0.0 --port N`.
    sys.argv = [sys.argv[0], "--host", "0.0.0.0", "--port", str(port)]
    app = create_app(load_worker_settings().model_copy(update={"exit_on_load_failure": False}), FakeEngine())
    uvicorn.Server(uvicorn.Config(app, host="0.0.0.0", port=port, log_level="warning")).run()


if __name__ == "__main__":
    _serve(int(sys.argv[2]))
