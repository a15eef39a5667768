"""``client.py``: stream an answer to stdout, stats and diagnostics to stderr."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TextIO

from peerinfer.client.routed import RoutedClient, Switch
from peerinfer.client.sdk import Message, PeerInferClient, StreamStats
from peerinfer.client.tunnels import IceOptions
from peerinfer.errors import ClientError, PeerInferError
from peerinfer.settings import ClientSettings

DEFAULT_PROMPT = "Explain in two sentences why the sky is blue."


def build_parser(settings: ClientSettings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="client.py", description="Stream an answer from a peerinfer worker. Text goes to stdout, stats to stderr."
    )
    parser.add_argument("prompt", nargs="?", default=None, help=f"what to ask (default: {DEFAULT_PROMPT!r})")
    parser.add_argument("--url", default=settings.url, help="worker base URL (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default: 256)")
    parser.add_argument("--temperature", type=float, default=0.2, help="sampling temperature (default: 0.2)")
    parser.add_argument("--system", default=None, help="a system message to put first")
    parser.add_argument(
        "--api-key",
        default=settings.api_key.get_secret_value() if settings.api_key else None,
        help="API key, if the worker needs one (default: $PEERINFER_API_KEY)",
    )
    parser.add_argument("--chat", action="store_true", help="interactive chat that keeps the conversation")
    parser.add_argument("--json", action="store_true", help="print stats as one JSON object on stderr")
    network = parser.add_argument_group("network (instead of --url): --bootstrap, --lan or both")
    network.add_argument(
        "--bootstrap", default=settings.bootstrap or None, help="find peers through this DHT node, host:port"
    )
    network.add_argument(
        "--lan", action="store_true", default=settings.lan, help="find workers on this LAN (mDNS), no bootstrap needed"
    )
    network.add_argument("--model", default=None, help="model name to ask for (default: the most served)")
    network.add_argument("--sha256", default=None, help="exact model file to ask for")
    network.add_argument("--network-id", type=int, default=settings.network_id, help="private DHT network id")
    network.add_argument("--max-attempts", type=int, default=3, help="peers to try per answer (default: 3)")
    network.add_argument("--discovery-timeout", type=float, default=5.0, help="seconds to look for peers")
    network.add_argument(
        "--choose-timeout", type=float, default=5.0, help="most seconds to choose a peer once found (default: 5)"
    )
    return parser


def _routed(args: argparse.Namespace, settings: ClientSettings, err: TextIO) -> RoutedClient:
    def note(switch: Switch) -> None:
        after = f" after {switch.resumed_chars} characters" if switch.resumed_chars else " before the first token"
        print(
            f"\n[peer {switch.from_url} failed{after} ({switch.reason}); continuing on {switch.to_url}]",
            file=err,
            flush=True,
        )

    return RoutedClient(
        args.bootstrap or "",
        lan=args.lan,
        lan_interfaces=settings.lan_interfaces,
        model_sha256=args.sha256,
        model_name=args.model,
        api_key=args.api_key,
        network_id=args.network_id,
        dht_host=settings.dht_host,
        max_attempts=args.max_attempts,
        discovery_timeout_s=args.discovery_timeout,
        choose_timeout_s=args.choose_timeout,
        on_switch=note,
        ice=IceOptions.from_settings(settings),
    )


def _report(stats: StreamStats | None, as_json: bool, err: TextIO) -> None:
    if stats is None:
        return
    if as_json:
        print(json.dumps(stats.as_dict()), file=err, flush=True)
        return
    ttft = f"{stats.ttft_s:.3f} s" if stats.ttft_s is not None else "n/a"
    print(
        f"TTFT {ttft} | total {stats.total_s:.3f} s | {stats.completion_tokens} tokens | "
        f"{stats.tokens_per_s:.1f} tokens/s | finish {stats.finish_reason}",
        file=err,
        flush=True,
    )


def _answer(
    client: PeerInferClient | RoutedClient, messages: list[Message], args: argparse.Namespace, out: TextIO, err: TextIO
) -> str:
    stream = client.chat_stream(messages, max_tokens=args.max_tokens, temperature=args.temperature)
    parts: list[str] = []
    for delta in stream:
        parts.append(delta)
        out.write(delta)
        out.flush()
    out.write("\n")
    out.flush()
    _report(stream.stats, args.json, err)
    return "".join(parts)


def _chat_loop(
    client: PeerInferClient | RoutedClient, base: list[Message], args: argparse.Namespace, out: TextIO, err: TextIO
) -> int:
    history = list(base)
    print("Chat with the worker. Empty line or Ctrl-D ends; /reset forgets the conversation.", file=err)
    while True:
        try:
            print("> ", end="", file=err, flush=True)
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            return 130
        if not line or not line.strip():
            return 0
        if line.strip() == "/reset":
            history = list(base)
            continue
        history.append({"role": "user", "content": line.strip()})
        history.append({"role": "assistant", "content": _answer(client, history, args, out, err)})


def main(argv: list[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    settings = ClientSettings()
    args = build_parser(settings).parse_args(argv)
    if args.max_tokens < 1:
        print(f"error: --max-tokens must be at least 1, got {args.max_tokens}", file=err)
        return 2
    base: list[Message] = [{"role": "system", "content": args.system}] if args.system else []
    try:
        client: PeerInferClient | RoutedClient = (
            _routed(args, settings, err)
            if args.bootstrap or args.lan
            else PeerInferClient(args.url, api_key=args.api_key)
        )
    except PeerInferError as exc:
        print(f"error: {exc.message}", file=err, flush=True)
        return 2
    try:
        if args.chat:
            return _chat_loop(client, base, args, out, err)
        _answer(client, [*base, {"role": "user", "content": args.prompt or DEFAULT_PROMPT}], args, out, err)
        return 0
    except ClientError as exc:
        print(f"error: {exc.message}", file=err, flush=True)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=err)
        return 130
    finally:
        client.close()
