"""Prometheus metrics of one worker, in a registry of its own (several apps can live in one process)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from peerinfer.engine.base import EngineStats

CONTENT_TYPE = CONTENT_TYPE_LATEST
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TPOT_BUCKETS = (0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1)
UNMATCHED = "unmatched"
REFUSAL_REASONS = ("header_too_large", "head_timeout", "body_timeout", "too_many_connections", "bad_request")


class WorkerMetrics:
    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "peerinfer_requests",
            "Answered HTTP requests by route (its path template, or 'unmatched') and HTTP status.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.refused = Counter(
            "peerinfer_http_refused",
            "Connections closed by the worker's HTTP limits, by reason.",
            ["reason"],
            registry=self.registry,
        )
        for reason in REFUSAL_REASONS:
            self.refused.labels(reason)
        self.ttft = Histogram(
            "peerinfer_time_to_first_token_seconds",
            "From request accepted to first text.",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.tpot = Histogram(
            "peerinfer_time_per_output_token_seconds",
            "Mean time between output tokens of a request.",
            buckets=TPOT_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter("peerinfer_prompt_tokens", "Prompt tokens processed.", registry=self.registry)
        self.cached_prompt_tokens = Counter(
            "peerinfer_prompt_tokens_cached",
            "Prompt tokens found in a slot's cache and not read again.",
            registry=self.registry,
        )
        self.generated_tokens = Counter("peerinfer_generated_tokens", "Tokens generated.", registry=self.registry)
        queue = Gauge("peerinfer_queue_depth", "Requests waiting for a slot.", registry=self.registry)
        busy = Gauge("peerinfer_slots_busy", "Slots decoding a request.", registry=self.registry)
        total = Gauge("peerinfer_slots_total", "Slots of this worker.", registry=self.registry)
        queue.set_function(lambda: stats().queued)
        busy.set_function(lambda: stats().slots_busy)
        total.set_function(lambda: stats().slots_total)

    def observe_generation(
        self, prompt_tokens: int, completion_tokens: int, ttft_s: float | None, total_s: float, cached_tokens: int = 0
    ) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.cached_prompt_tokens.inc(cached_tokens)
        self.generated_tokens.inc(completion_tokens)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
            if completion_tokens > 1:
                self.tpot.observe((total_s - ttft_s) / (completion_tokens - 1))

    def count_refusal(self, reason: str) -> None:
        self.refused.labels(reason if reason in REFUSAL_REASONS else "other").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestCounter:
    """Plain ASGI middleware counting responses by route and status in ``requests`` (a worker's or the
    gateway's); it adds nothing to streamed chunks.

    The label is the matched route's path template, never the raw path: a client cannot grow the label
    set (and so every scrape of ``/metrics``) by asking for paths that do not exist.
    """

    def __init__(self, app: ASGIApp, requests: Counter) -> None:
        self.app = app
        self.requests = requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = getattr(scope.get("route"), "path", None)
                endpoint = route if isinstance(route, str) else UNMATCHED
                self.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
