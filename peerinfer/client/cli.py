"""``client.py``: stream an answer to stdout, stats and diagnostics to stderr."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TextIO

from peerinfer.client.sdk import Message, PeerInferClient, StreamStats
from peerinfer.errors import ClientError
from peerinfer.settings import ClientSettings

DEFAULT_PROMPT = "Explain in two sentences why the sky is blue."


def build_parser(settings: ClientSettings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="client.py", description="Stream an answer from a peerinfer worker. Text goes to stdout, stats to stderr."
    )
    parser.add_argument("prompt", nargs="?", default=None, help=f"what to ask (default: {DEFAULT_PROMPT!r})")
    parser.add_argument("--url", default=settings.url, help="worker base URL (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default: 256)")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default: 0.7)")
    parser.add_argument("--system", default=None, help="a system message to put first")
    parser.add_argument(
        "--api-key",
        default=settings.api_key.get_secret_value() if settings.api_key else None,
        help="API key, if the worker needs one (default: $PEERINFER_API_KEY)",
    )
    parser.add_argument("--chat", action="store_true", help="interactive chat that keeps the conversation")
    parser.add_argument("--json", action="store_true", help="print stats as one JSON object on stderr")
    return parser


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
    client: PeerInferClient, messages: list[Message], args: argparse.Namespace, out: TextIO, err: TextIO
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


def _chat_loop(client: PeerInferClient, base: list[Message], args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
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
    args = build_parser(ClientSettings()).parse_args(argv)
    if args.max_tokens < 1:
        print(f"error: --max-tokens must be at least 1, got {args.max_tokens}", file=err)
        return 2
    base: list[Message] = [{"role": "system", "content": args.system}] if args.system else []
    try:
        client = PeerInferClient(args.url, api_key=args.api_key)
    except ClientError as exc:
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
