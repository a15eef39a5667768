"""``python -m peerinfer gateway``: serve the network's OpenAI API on one address.

    python -m peerinfer gateway --bootstrap 127.0.0.1:4222 --port 8080
    python -m peerinfer gateway --lan

Flags override the ``PEERINFER_*`` settings (``GatewaySettings``); uvicorn serves the app with the
same HTTP limits as a worker.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
from typing import Any, TextIO

from peerinfer.errors import ConfigError
from peerinfer.settings import GatewaySettings


def add_gateway_parser(commands: Any) -> argparse.ArgumentParser:
    """Adds ``gateway`` to ``commands`` (the ``add_subparsers`` of ``python -m peerinfer``)."""
    defaults = GatewaySettings.model_construct()  # the documented defaults; the environment is read at start
    parser: argparse.ArgumentParser = commands.add_parser(
        "gateway",
        help="serve the network's OpenAI-compatible API (failover and resume inside) on one address",
        description="One OpenAI-compatible door into the network: every request is routed to a verified "
        "peer, and a stream whose peer dies continues on another. PEERINFER_* settings apply; flags win.",
    )
    parser.add_argument(
        "--bootstrap", default=None, help="host:port[,host:port] of DHT nodes (default: $PEERINFER_BOOTSTRAP)"
    )
    parser.add_argument(
        "--lan", action="store_true", default=None, help="find workers on this LAN (mDNS), with or without a bootstrap"
    )
    parser.add_argument("--host", default=None, help=f"address to listen on (default: {defaults.host})")
    parser.add_argument("--port", type=int, default=None, help=f"TCP port (default: {defaults.port})")
    parser.add_argument("--network-id", type=int, default=None, help="private network id (default: peerinfer's)")
    parser.add_argument("--sha256", default=None, help="route only to peers serving this model file")
    parser.add_argument("--model", default=None, help="route only to peers serving a model of this name")
    return parser


def gateway_settings(args: argparse.Namespace) -> GatewaySettings:
    """The settings from the environment with the flags that were given on top; ``ConfigError`` if invalid."""
    from peerinfer.settings import load_gateway_settings

    flags = {
        "bootstrap": args.bootstrap,
        "lan": args.lan,
        "host": args.host,
        "port": args.port,
        "network_id": args.network_id,
        "sha256": args.sha256,
        "model": args.model,
    }
    return load_gateway_settings(**{name: value for name, value in flags.items() if value is not None})


def run_gateway(args: argparse.Namespace, err: TextIO) -> int:
    """Runs the gateway until interrupted; 2 for bad settings, 1 if the address cannot be bound."""
    import uvicorn

    from peerinfer.errors import PeerInferError
    from peerinfer.gateway.app import create_gateway_app, open_network
    from peerinfer.network.sources import NO_SOURCE

    try:
        settings = gateway_settings(args)
    except ConfigError as exc:
        print(f"error: {exc.message}", file=err)
        return 2
    if not settings.bootstrap.strip() and not settings.lan:
        print(f"error: {NO_SOURCE}", file=err)
        return 2
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.port))
        sock.listen(2048)  # connections wait for the server from now on, so the line below can be trusted
    except OSError as exc:
        print(f"error: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}", file=err)
        sock.close()
        return 1
    try:
        opened = open_network(settings)  # here, so that a DHT port in use is one line, not a traceback
    except PeerInferError as exc:
        print(f"error: {exc.message}", file=err)
        sock.close()
        return 1
    port = sock.getsockname()[1]
    print(
        f"gateway on http://{settings.host}:{port} (the web page at /, the API at /v1), routing through "
        f"{opened.description}; Ctrl-C stops it",
        file=err,
        flush=True,
    )
    app = create_gateway_app(settings, opened=opened)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    # uvicorn shuts down gracefully, then re-raises the Ctrl-C it caught: the normal way to stop.
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.Server(config).run(sockets=[sock])
    return 0
