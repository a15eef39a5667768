"""Prometheus metrics of the gateway, in a registry of its own, with a bounded set of peer labels.

Peers are strangers and can be many: a label per peer id would let anyone who announces records
grow every scrape without bound. The first ``MAX_PEER_LABELS`` peers seen get a label of their own
(a prefix of their id); every later one is counted under ``other``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
MAX_PEER_LABELS = 64
OTHER_PEERS = "other"
REFUSAL_REASONS = ("header_too_large", "head_timeout", "body_timeout", "too_many_connections", "bad_request")
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "peerinfer_gateway_requests",
            "Answered HTTP requests by route (its path template, or 'unmatched') and HTTP status.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.failovers = Counter(
            "peerinfer_gateway_failovers",
            "Answers moved to another peer before any text had streamed.",
            registry=self.registry,
        )
        self.resumes = Counter(
            "peerinfer_gateway_resumes",
            "Answers continued on another peer after text had streamed.",
            registry=self.registry,
        )
        self.stream_errors = Counter(
            "peerinfer_gateway_stream_errors",
            "Streams that could not go on and ended with an error event.",
            registry=self.registry,
        )
        self.ttft = Histogram(
            "peerinfer_gateway_time_to_first_token_seconds",
            "From the request reaching the gateway to its first text, by the peer that sent it "
            f"(at most {MAX_PEER_LABELS} peers by id prefix, then '{OTHER_PEERS}').",
            ["peer"],
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.refused = Counter(
            "peerinfer_gateway_http_refused",
            "Connections closed by the gateway's HTTP limits (head size and time, body time, connections), by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.in_flight = Gauge("peerinfer_gateway_in_flight", "Requests being served.", registry=self.registry)
        self.queued = Gauge("peerinfer_gateway_queued", "Requests waiting for room.", registry=self.registry)
        self._peer_labels: dict[str, str] = {}

    def peer_label(self, peer_id: str) -> str:
        """The label of ``peer_id``: its own for the first ``MAX_PEER_LABELS`` peers, else ``other``."""
        label = self._peer_labels.get(peer_id)
        if label is not None:
            return label
        if len(self._peer_labels) >= MAX_PEER_LABELS:
            return OTHER_PEERS
        label = "".join(c for c in peer_id[:16] if c.isalnum() or c in "-_") or OTHER_PEERS
        self._peer_labels[peer_id] = label
        return label

    def count_refusal(self, reason: str) -> None:
        self.refused.labels(reason if reason in REFUSAL_REASONS else "other").inc()

    def observe_ttft(self, peer_id: str, seconds: float) -> None:
        self.ttft.labels(self.peer_label(peer_id)).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
