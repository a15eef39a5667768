"""The worker's FastAPI app. ``create_app`` is cheap: the model loads in the lifespan, off the loop.

Until the model is ready, ``/health`` answers 503 ``{"status": "loading"}`` and the API answers 503
with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from peerinfer.api import openai as wire
from peerinfer.api.health import HealthReport
from peerinfer.api.network import NetworkView
from peerinfer.api.responses import ResponsesRequest, parse_responses_request
from peerinfer.engine.base import Engine
from peerinfer.errors import ConfigError, NotFoundError, OverloadedError, PeerInferError
from peerinfer.network.addresses import guess_announce_url
from peerinfer.server import openapi
from peerinfer.server.chat import ChatServing
from peerinfer.server.completions import CompletionServing
from peerinfer.server.errors import add_error_handlers
from peerinfer.server.guards import HostGuard, HostPolicy, check_api_key, install_http_limits, read_json_body
from peerinfer.server.metrics import CONTENT_TYPE, RequestCounter, WorkerMetrics
from peerinfer.server.responses import ResponsesServing
from peerinfer.server.serving import Serving
from peerinfer.settings import WorkerSettings, load_worker_settings
from peerinfer.web import page_router
from peerinfer.web.worker import worker_network_view

if TYPE_CHECKING:
    from peerinfer.network.worker import WorkerNetwork

log = logging.getLogger("peerinfer.worker")
READY_LINE = "Model loaded successfully! Ready for inference."


@dataclass
class WorkerState:
    settings: WorkerSettings
    engine: Engine
    owns_engine: bool
    serving: Serving
    chat: ChatServing
    completions: CompletionServing
    metrics: WorkerMetrics
    ready: bool = False
    load_error: str | None = None
    loaded_at: int = 0
    load_task: asyncio.Task[None] | None = field(default=None, repr=False)


def _configure_logging(level: str) -> None:
    root = logging.getLogger("peerinfer")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.propagate = False
    root.setLevel(level.upper())


async def _load(state: WorkerState) -> None:
    started = time.monotonic()
    try:
        await asyncio.to_thread(state.engine.load)
    except PeerInferError as exc:
        state.load_error = exc.message
        log.error("cannot start: %s", exc.message)
        if state.settings.exit_on_load_failure:
            os._exit(3)  # the same code uvicorn uses for a failed startup
        return
    info = state.engine.info
    state.ready = True
    state.loaded_at = wire.now()
    # The proof of concept's contract: scripts wait for exactly this line on stdout.
    print(READY_LINE, flush=True)
    log.info(
        "model %s (%s, %.1f MB, sha256 %s), context %d tokens x %d slots, %d threads, loaded in %.2f s",
        info.model_id,
        info.path,
        info.size_bytes / 1e6,
        info.sha256,
        info.n_ctx,
        info.slots,
        info.n_threads,
        time.monotonic() - started,
    )


def app_from_environment() -> FastAPI:
    """``worker.py``'s app: settings from ``PEERINFER_*``; a bad value is one line on stderr and exit code 3."""
    try:
        return create_app(load_worker_settings())
    except ConfigError as exc:
        print(f"peerinfer: {exc.message}", file=sys.stderr, flush=True)
        raise SystemExit(3) from None  # the code uvicorn and a failed model load use


def create_app(settings: WorkerSettings | None = None, engine: Engine | None = None) -> FastAPI:
    """Build the worker app. An injected engine is the caller's to load once and close.

    It also points uvicorn's HTTP protocols at ``peerinfer.server.protocol`` (head and body limits).
    """
    settings = settings or WorkerSettings()
    _configure_logging(settings.log_level)
    owns_engine = engine is None
    if engine is None:
        from peerinfer.engine.llama import LlamaEngine

        engine = LlamaEngine(settings)
    metrics = WorkerMetrics(engine.stats)
    serving = Serving(engine, settings, metrics)
    state = WorkerState(
        settings=settings,
        engine=engine,
        owns_engine=owns_engine,
        serving=serving,
        chat=ChatServing(serving),
        completions=CompletionServing(serving),
        metrics=metrics,
    )

    network = None
    if settings.dht_enabled or settings.lan:
        from peerinfer.network.worker import WorkerNetwork

        network = WorkerNetwork(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.load_task = asyncio.create_task(_load(state))
        if network is not None:
            await network.start()
            network.announce_when_ready(state.load_task, lambda: state.ready, state.engine)
        yield
        if network is not None:
            await network.stop(state.engine, state.ready)
        await state.load_task
        if state.owns_engine:
            state.engine.close()

    app = FastAPI(title="peerinfer worker", lifespan=lifespan, description=openapi.API_DESCRIPTION)
    app.state.worker = state
    app.state.network = network
    install_http_limits(app, settings, metrics.count_refusal)
    if network is not None:
        app.include_router(network.router)
    announced = network.announce_url if network is not None else guess_announce_url(sys.argv, "127.0.0.1")
    app.add_middleware(HostGuard, policy=HostPolicy.build(settings.allowed_hosts, (settings.announce_url, announced)))
    app.add_middleware(RequestCounter, requests=metrics.requests)
    add_error_handlers(app)
    _add_routes(app, state)
    _add_page(app, state, network)
    openapi.document_request_bodies(app, (wire.ChatCompletionRequest, wire.CompletionRequest, ResponsesRequest))
    return app


def _check_api_key(state: WorkerState, request: Request) -> None:
    check_api_key(request, state.settings.api_key, "this worker")


def _require_ready(state: WorkerState) -> None:
    if not state.ready:
        detail = f"the model failed to load: {state.load_error}" if state.load_error else "the model is still loading"
        raise OverloadedError(f"{detail}; retry shortly", retry_after=2)


def _health_report(state: WorkerState) -> HealthReport:
    if not state.ready:
        error = state.load_error[:2000] if state.load_error else None
        return HealthReport(status="failed" if error else "loading", error=error)
    info = state.engine.info
    stats = state.engine.stats()
    # The engine's last decode call failed: it may serve nothing until one works again (503).
    return HealthReport(
        status="degraded" if stats.failing else "ok",
        error=(stats.last_error or "decode failed")[:2000] if stats.failing else None,
        decode_failures=stats.decode_failures if stats.failing else None,
        model=info.model_id[:256],
        sha256=info.sha256,
        n_ctx=info.n_ctx,
        slots_total=stats.slots_total,
        slots_busy=stats.slots_busy,
        slots_free=stats.slots_total - stats.slots_busy,
        requests_running=stats.slots_busy,
        requests_waiting=stats.queued,
    )


def _add_page(app: FastAPI, state: WorkerState, network: WorkerNetwork | None) -> None:
    """The web page at ``/``, talking to this worker alone; ``/network`` needs the API key, as the API does."""

    async def network_view(request: Request) -> NetworkView:
        _check_api_key(state, request)
        _require_ready(state)
        return worker_network_view(state.engine, state.metrics, network, str(request.base_url))

    app.include_router(page_router(network_view))


def _add_routes(app: FastAPI, state: WorkerState) -> None:
    @app.get("/health", responses=openapi.HEALTH_RESPONSES)
    async def health() -> JSONResponse:
        report = _health_report(state)
        return JSONResponse(report.wire(), status_code=report.http_status())

    def model_object() -> dict[str, Any]:
        info = state.engine.info
        return {
            "id": info.model_id,
            "object": "model",
            "created": state.loaded_at,
            "owned_by": "peerinfer",
            "sha256": info.sha256,
            "n_ctx": info.n_ctx,
        }

    # Many tools' base_url settings leave out /v1: the same routes answer without it (not in the schema twice).
    for prefix in ("/v1", ""):
        documented = prefix == "/v1"

        @app.get(prefix + "/models", responses=openapi.MODELS_RESPONSES, include_in_schema=documented)
        async def models(request: Request) -> JSONResponse:
            _check_api_key(state, request)
            _require_ready(state)
            return JSONResponse({"object": "list", "data": [model_object()]})

        @app.get(prefix + "/models/{model_id:path}", responses=openapi.MODEL_RESPONSES, include_in_schema=documented)
        async def model(request: Request, model_id: str) -> JSONResponse:
            _check_api_key(state, request)
            _require_ready(state)
            if model_id != state.engine.info.model_id:
                raise NotFoundError(
                    f"the model {model_id[:200]!r} is not served here; this worker serves "
                    f"{state.engine.info.model_id!r} (see GET /v1/models)",
                    param="model",
                )
            return JSONResponse(model_object())

        @app.post(
            prefix + "/chat/completions",
            openapi_extra=openapi.request_body(wire.ChatCompletionRequest),
            responses=openapi.CHAT_RESPONSES,
            include_in_schema=documented,
        )
        async def chat_completions(request: Request) -> Response:
            _check_api_key(state, request)
            body = await read_json_body(request, state.settings.max_body_bytes)
            parsed = wire.parse_request(wire.ChatCompletionRequest, body)
            _require_ready(state)
            return await state.chat.serve(parsed, request.receive)

        @app.post(
            prefix + "/completions",
            openapi_extra=openapi.request_body(wire.CompletionRequest),
            responses=openapi.COMPLETION_RESPONSES,
            include_in_schema=documented,
        )
        async def completions(request: Request) -> Response:
            _check_api_key(state, request)
            body = await read_json_body(request, state.settings.max_body_bytes)
            parsed = wire.parse_request(wire.CompletionRequest, body)
            _require_ready(state)
            return await state.completions.serve(parsed, request.receive)

        @app.post(
            prefix + "/responses",
            openapi_extra=openapi.request_body(ResponsesRequest),
            responses=openapi.RESPONSES_API_RESPONSES,
            include_in_schema=documented,
        )
        async def responses(request: Request) -> Response:
            _check_api_key(state, request)
            parsed = parse_responses_request(await read_json_body(request, state.settings.max_body_bytes))
            _require_ready(state)
            return await ResponsesServing(state.chat).serve(parsed, request.receive)

    @app.get("/metrics", response_class=Response, responses=openapi.METRICS_RESPONSES)
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)
