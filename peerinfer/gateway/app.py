"""The gateway's FastAPI app: the worker's OpenAI API, served from the network. It serves no model itself.

``create_gateway_app`` is cheap: discovery (a DHT node, an mDNS browser) opens in the lifespan. Each
request is checked exactly as a worker checks it (the same body reader and request models, so a bad
request gets the worker's 400 without bothering a peer), then routed by the shared routing core
(``client.core.Router``): verified records, the nonce challenge, probes, power of two choices, chat
affinity, bans. Streams fail over and resume inside the gateway (``gateway.serving``); the client
sees one stream.

``/v1/responses`` is served as the chat completion it means (``api.responses.to_chat_body``), routed
like any chat, and written back in the Responses format, so a text answer resumes like a chat.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from peerinfer.api import openai as wire
from peerinfer.api.network import NetworkView, network_view
from peerinfer.api.openai import error_body
from peerinfer.api.relay import Kind, StreamStitcher
from peerinfer.api.responses import ResponsesRequest, parse_responses_request
from peerinfer.client.core import Router, RouterOptions
from peerinfer.client.resume import CHAT_PATH, COMPLETIONS_PATH, chat_plan, completion_plan
from peerinfer.client.transport import WorkerHttp
from peerinfer.client.tunnels import IceOptions, ice_tunnels
from peerinfer.errors import ClientError, ConfigError, NoPeersError, NotFoundError
from peerinfer.gateway import responses as responses_api
from peerinfer.gateway.limits import Admission
from peerinfer.gateway.metrics import CONTENT_TYPE, GatewayMetrics
from peerinfer.gateway.serving import ChatRelay, relay_stream, whole
from peerinfer.network.sources import OpenedDiscovery, open_discovery
from peerinfer.server import openapi
from peerinfer.server.errors import add_error_handlers, error_response
from peerinfer.server.guards import HostGuard, HostPolicy, check_api_key, install_http_limits, read_json_body
from peerinfer.server.metrics import RequestCounter
from peerinfer.settings import GatewaySettings, load_gateway_settings
from peerinfer.web import page_router

log = logging.getLogger("peerinfer.gateway")
NO_PEERS_RETRY_AFTER_S = 5
READY_LINE = "Gateway ready."


@dataclass
class GatewayState:
    settings: GatewaySettings
    metrics: GatewayMetrics
    admission: Admission
    router: Router | None = None
    opened: OpenedDiscovery | None = None

    def routing(self) -> Router:
        if self.router is None:  # only between the app's creation and its start
            raise NoPeersError("the gateway is starting: its discovery is not open yet")
        return self.router


def _configure_logging(level: str) -> None:
    root = logging.getLogger("peerinfer")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.propagate = False
    root.setLevel(level.upper())


def build_router(settings: GatewaySettings, opened: OpenedDiscovery) -> Router:
    """The router of a gateway that found its peers through ``opened``."""
    http = WorkerHttp(
        api_key=settings.worker_api_key.get_secret_value() if settings.worker_api_key else None,
        connect_timeout_s=settings.connect_timeout_s,
        read_timeout_s=settings.read_timeout_s,
        max_connections=max(64, settings.max_in_flight * 2),
        tunnels=ice_tunnels(opened.signalling, IceOptions.from_settings(settings)),
    )
    options = RouterOptions(
        max_attempts=settings.max_attempts,
        probe_count=settings.probe_count,
        probe_timeout_s=settings.probe_timeout_s,
        choose_timeout_s=settings.choose_timeout_s,
        lookup_ttl_s=settings.lookup_ttl_s,
    )
    return Router(
        opened.discovery,
        http,
        model_sha256=settings.sha256,
        model_name=settings.model,
        options=options,
        description=opened.description,
    )


def open_network(settings: GatewaySettings) -> OpenedDiscovery:
    """The gateway's discovery: the DHT through ``bootstrap``, the LAN, or both (``ConfigError`` for neither)."""
    return open_discovery(
        bootstrap=settings.bootstrap,
        lan=settings.lan,
        network_id=settings.network_id,
        dht_host=settings.dht_host,
        timeout_s=settings.discovery_timeout_s,
        lan_interfaces=settings.lan_interfaces,
    )


def app_from_environment() -> FastAPI:
    """The gateway from ``PEERINFER_*``; a bad value is one line on stderr and exit code 3."""
    try:
        return create_gateway_app(load_gateway_settings())
    except ConfigError as exc:
        print(f"peerinfer: {exc.message}", file=sys.stderr, flush=True)
        raise SystemExit(3) from None


def create_gateway_app(
    settings: GatewaySettings | None = None,
    router: Router | None = None,
    *,
    opened: OpenedDiscovery | None = None,
) -> FastAPI:
    """Build the gateway. Without ``router`` it routes through ``opened``, else opens discovery when it starts.

    The gateway closes its router and ``opened`` when it stops, injected ones too: the router's
    connections live on the gateway's event loop.
    """
    settings = settings or GatewaySettings()
    _configure_logging(settings.log_level)
    metrics = GatewayMetrics()
    state = GatewayState(
        settings=settings,
        metrics=metrics,
        admission=Admission(settings.max_in_flight, settings.max_queue, settings.queue_timeout_s),
        router=router,
        opened=opened,
    )
    metrics.in_flight.set_function(lambda: state.admission.in_flight)
    metrics.queued.set_function(lambda: state.admission.waiting)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state.router is None:
            if state.opened is None:
                state.opened = await asyncio.to_thread(open_network, settings)
            state.router = build_router(settings, state.opened)
        log.info("gateway routing requests to peers found through %s", state.router.description)
        print(READY_LINE, flush=True)
        try:
            yield
        finally:
            await state.router.aclose()
            if state.opened is not None:
                await asyncio.to_thread(state.opened.close)

    app = FastAPI(title="peerinfer gateway", lifespan=lifespan, description=openapi.API_DESCRIPTION)
    app.state.gateway = state
    install_http_limits(app, settings, metrics.count_refusal, expose_headers=("X-PeerInfer-Peer", "X-PeerInfer-Peers"))
    app.add_middleware(HostGuard, policy=HostPolicy.build(settings.allowed_hosts, ()))
    app.add_middleware(RequestCounter, requests=metrics.requests)
    add_error_handlers(app, gateway_error_response)
    _add_routes(app, state)
    app.include_router(page_router(lambda request: _network_view(state, request)))
    openapi.document_request_bodies(app, (wire.ChatCompletionRequest, wire.CompletionRequest, ResponsesRequest))
    return app


def gateway_error_response(exc: Exception) -> JSONResponse:
    """The gateway's errors: a worker's own refusal as the worker said it, no peer as 503 with Retry-After."""
    if isinstance(exc, NoPeersError):
        log.warning("%s", exc.message)
        return JSONResponse(
            error_body(exc.message, "server_error", code="no_peers"),
            status_code=503,
            headers={"Retry-After": str(exc.retry_after or NO_PEERS_RETRY_AFTER_S)},
        )
    if isinstance(exc, ClientError):
        if exc.status is not None and 400 <= exc.status < 500 and exc.error is not None:
            headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
            return JSONResponse({"error": exc.error}, status_code=exc.status, headers=headers)
        log.warning("%s", exc.message)
        return JSONResponse(error_body(exc.message, "server_error", code="peer_failed"), status_code=502)
    return error_response(exc)


def _check_api_key(settings: GatewaySettings, request: Request) -> None:
    check_api_key(request, settings.api_key, "this gateway")


async def _network_view(state: GatewayState, request: Request) -> NetworkView:
    _check_api_key(state.settings, request)
    router = state.routing()
    return network_view(router.description, await router.views(survey=True))


async def _models(state: GatewayState) -> list[dict[str, Any]]:
    """One entry per model the verified peers serve (by name and sha256), with how many serve it."""
    counts: dict[tuple[str, str], int] = {}
    for view in await state.routing().views(survey=True):
        if view.verified and not view.banned:
            counts[(view.model, view.sha256)] = counts.get((view.model, view.sha256), 0) + 1
    return [
        {"id": model, "object": "model", "created": 0, "owned_by": "peerinfer", "sha256": sha256, "peers": peers}
        for (model, sha256), peers in sorted(counts.items())
    ]


def _requested_model(body: dict[str, Any]) -> str | None:
    model = body.get("model")
    return model if isinstance(model, str) and model else None


async def _serve(state: GatewayState, body: dict[str, Any], kind: Kind) -> Response:
    """One chat or completion request, checked already: streamed through the relay, or whole."""
    settings, router = state.settings, state.routing()
    entered = await state.admission.enter()
    handed_over = False
    try:
        if body.get("stream") is True:
            plan = chat_plan(body) if kind == "chat" else completion_plan(body)
            stitcher = StreamStitcher(kind, model=_requested_model(body), wants_usage=plan.client_wants_usage)
            handed_over = True  # from here the stream frees the place when it ends
            return await relay_stream(
                router.answer(plan),
                ChatRelay(stitcher, plan.max_deltas),
                state.metrics,
                keepalive_s=settings.keepalive_s,
                stall_s=settings.read_timeout_s,
                on_end=lambda: state.admission.leave(entered),
            )
        path = CHAT_PATH if kind == "chat" else COMPLETIONS_PATH
        return await whole(
            router,
            path,
            body,
            kind,
            state.metrics,
            model=_requested_model(body),
            max_bytes=settings.max_answer_bytes,
            timeout_s=settings.answer_timeout_s,
        )
    finally:
        if not handed_over:
            state.admission.leave(entered)


def _add_routes(app: FastAPI, state: GatewayState) -> None:
    settings = state.settings

    @app.get("/health")
    async def health() -> JSONResponse:
        """The gateway's own health: it is up; the peers it knows, not banned, and those that proved their key."""
        router = state.routing()
        views = await router.views()
        usable = sum(not view.banned for view in views)
        verified = sum(view.verified and not view.banned for view in views)
        return JSONResponse(
            {
                "status": "ok" if usable else "no_peers",
                "mode": "gateway",
                "source": router.description,
                "peers_known": len(views),
                "peers_verified": verified,
            }
        )

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    for prefix in ("/v1", ""):
        documented = prefix == "/v1"

        @app.get(prefix + "/models", responses=openapi.MODELS_RESPONSES, include_in_schema=documented)
        async def models(request: Request) -> JSONResponse:
            _check_api_key(settings, request)
            return JSONResponse({"object": "list", "data": await _models(state)})

        @app.get(prefix + "/models/{model_id:path}", responses=openapi.MODEL_RESPONSES, include_in_schema=documented)
        async def model(request: Request, model_id: str) -> JSONResponse:
            _check_api_key(settings, request)
            for entry in await _models(state):
                if entry["id"] == model_id:
                    return JSONResponse(entry)
            raise NotFoundError(
                f"no verified peer serves the model {model_id[:200]!r} (see GET /v1/models)", param="model"
            )

        @app.post(
            prefix + "/chat/completions",
            openapi_extra=openapi.request_body(wire.ChatCompletionRequest),
            responses=openapi.CHAT_RESPONSES,
            include_in_schema=documented,
        )
        async def chat_completions(request: Request) -> Response:
            _check_api_key(settings, request)
            raw = await read_json_body(request, settings.max_body_bytes)
            wire.parse_request(wire.ChatCompletionRequest, raw)
            return await _serve(state, json.loads(raw), "chat")

        @app.post(
            prefix + "/completions",
            openapi_extra=openapi.request_body(wire.CompletionRequest),
            responses=openapi.COMPLETION_RESPONSES,
            include_in_schema=documented,
        )
        async def completions(request: Request) -> Response:
            _check_api_key(settings, request)
            raw = await read_json_body(request, settings.max_body_bytes)
            wire.parse_request(wire.CompletionRequest, raw)
            return await _serve(state, json.loads(raw), "completion")

        @app.post(
            prefix + "/responses",
            openapi_extra=openapi.request_body(ResponsesRequest),
            responses=openapi.RESPONSES_API_RESPONSES,
            include_in_schema=documented,
        )
        async def responses(request: Request) -> Response:
            _check_api_key(settings, request)
            parsed = parse_responses_request(await read_json_body(request, settings.max_body_bytes))
            return await responses_api.serve(state, parsed)
