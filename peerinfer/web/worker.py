"""A worker's ``/network``: one row, the worker itself, from its own engine stats and metrics."""

from __future__ import annotations

from typing import TYPE_CHECKING

from peerinfer.api.network import NetworkView, worker_row
from peerinfer.engine.base import Engine
from peerinfer.server.metrics import WorkerMetrics

if TYPE_CHECKING:
    from peerinfer.network.worker import WorkerNetwork

THIS_WORKER = "this worker"


def measured_tokens_per_s(metrics: WorkerMetrics) -> float | None:
    """Decode speed of the requests served so far: one over the mean time per output token."""
    total = count = 0.0
    for family in metrics.tpot.collect():
        for sample in family.samples:
            if sample.name.endswith("_sum"):
                total = sample.value
            elif sample.name.endswith("_count"):
                count = sample.value
    if count <= 0 or total <= 0:
        return None
    return count / total


def worker_network_view(
    engine: Engine, metrics: WorkerMetrics, network: WorkerNetwork | None, base_url: str
) -> NetworkView:
    """What a worker answers on ``/network``; ``base_url`` is the URL the page reached it at."""
    info = engine.info
    stats = engine.stats()
    identity = network.identity if network is not None else None
    source = "this worker alone"
    if network is not None:
        source += " (it also announces itself to the network)"
    row = worker_row(
        peer_id=identity.peer_id if identity is not None else THIS_WORKER,
        url=network.announce_url if network is not None else base_url.rstrip("/"),
        model=info.model_id,
        sha256=info.sha256,
        slots_total=stats.slots_total,
        slots_busy=stats.slots_busy,
        queue=stats.queued,
        tokens_per_s=measured_tokens_per_s(metrics),
        claimed_tokens_per_s=network.tokens_per_s if network is not None else 0.0,
        age_s=0.0,
        last_failure=(stats.last_error or "decode failed") if stats.failing else None,
    )
    return NetworkView(mode="worker", source=source, peers=[row])
