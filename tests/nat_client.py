"""The client side of the NAT tests, run inside the lab's client namespace: one routed answer, as JSON.

    python -m tests.nat_client chat "prompt" [--max-tokens N] [--exclude PEER_ID ...]
    python -m tests.nat_client raw PEER_ID "prompt"    # the raw SSE bytes of one stream over an ICE path

``chat`` uses ``RoutedClient`` exactly as a user would (PEERINFER_BOOTSTRAP, PEERINFER_ICE_SERVERS
and PEERINFER_NETWORK_ID from the environment) and prints the text, the peers and their paths, the
switches and the router's probe failures. ``raw`` opens an ICE path with ``IceDialer`` and prints
what the worker's stream carried, comments (keep-alives) included.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time

from peerinfer.client.routed import RoutedClient
from peerinfer.client.tunnels import IceOptions
from peerinfer.network.addresses import parse_bootstrap
from peerinfer.network.dht import DhtNode
from peerinfer.network.ice import IceDialer
from peerinfer.settings import ClientSettings


def chat(args: argparse.Namespace, settings: ClientSettings) -> dict[str, object]:
    client = RoutedClient(
        settings.bootstrap,
        network_id=settings.network_id,
        ice=IceOptions.from_settings(settings),
        choose_timeout_s=args.choose_timeout,
        discovery_timeout_s=20.0,
    )
    try:
        started = time.perf_counter()
        stream = client.chat_stream(
            [{"role": "user", "content": args.prompt}], max_tokens=args.max_tokens, temperature=0.0
        )
        pieces = []
        first = None
        for piece in stream:
            if first is None:
                first = time.perf_counter() - started
            pieces.append(piece)
        views = client._loop.run(client.router.views())
        return {
            "text": "".join(pieces),
            "ttft_s": first,
            "total_s": time.perf_counter() - started,
            "switches": [[s.from_url, s.to_url, s.reason, s.resumed_chars] for s in stream.switches],
            "peers": {v.peer_id: {"url": v.url, "path": v.path, "verified": v.verified} for v in views},
            "failures": dict(client.failures),
        }
    finally:
        client.close()


async def raw(args: argparse.Namespace, settings: ClientSettings) -> dict[str, object]:
    node = DhtNode(
        host="0.0.0.0", port=0, network_id=settings.network_id, bootstrap=parse_bootstrap(settings.bootstrap)
    )
    dialer = IceDialer(node, settings.ice_servers)
    try:
        tunnel = await dialer.tunnel(args.peer_id)
        host, port = tunnel.base_url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        body = json.dumps(
            {"messages": [{"role": "user", "content": args.prompt}], "stream": True, "max_tokens": args.max_tokens}
        ).encode()
        writer.write(
            b"POST /v1/chat/completions HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        await writer.drain()
        data = b""
        async with asyncio.timeout(120):
            while chunk := await reader.read(65536):
                data += chunk
        writer.close()
        return {"path": tunnel.path, "remote": tunnel.stats.remote, "raw": data.decode("utf-8", "replace")}
    finally:
        await dialer.aclose()
        node.close()


def main() -> int:
    logging.basicConfig(
        level=logging.DEBUG if "PEERINFER_TEST_DEBUG" in __import__("os").environ else logging.INFO,
        stream=sys.stderr,
        format="%(name)s %(levelname)s %(message)s",
    )
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    one = sub.add_parser("chat")
    one.add_argument("prompt")
    one.add_argument("--max-tokens", type=int, default=24)
    one.add_argument("--choose-timeout", type=float, default=15.0)
    two = sub.add_parser("raw")
    two.add_argument("peer_id")
    two.add_argument("prompt")
    two.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()
    settings = ClientSettings()
    result = chat(args, settings) if args.mode == "chat" else asyncio.run(raw(args, settings))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
