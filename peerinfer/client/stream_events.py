"""The payload of one event of an OpenAI-style completion stream, read strictly. Pure.

``read_chunk`` ends in a ``StreamChunk`` or in ``PeerRejected`` (``malformed``, ``bad_field``, or
``stream_error`` for an error event the worker sent), never in another exception: text of the wrong
type, a ``usage`` that is not counts, nesting too deep for ``json`` are the peer's failure.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from peerinfer.client.peer_http import PeerRejected

MAX_TOKENS_COUNT = 100_000_000


@dataclass(frozen=True)
class StreamChunk:
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    payload: dict[str, Any] = field(default_factory=dict)
    """The event's JSON object as the peer sent it: its shape is checked above, the rest is still the peer's."""


def _optional_str(value: Any, name: str, limit: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise PeerRejected("bad_field", f"{name} is not a string of at most {limit} characters")
    return value


def _count(usage: dict[str, Any], name: str) -> int | None:
    value = usage.get(name)
    if value is None:
        return None
    if type(value) is not int or not 0 <= value <= MAX_TOKENS_COUNT:
        raise PeerRejected("bad_field", f"usage.{name}={str(value)[:40]!r} is not a token count")
    return value


def read_chunk(data: str) -> StreamChunk:
    """What one ``data:`` payload (not ``[DONE]``) says; raises ``PeerRejected``."""
    try:
        payload = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise PeerRejected("malformed", f"an event is not JSON: {data[:60]!r}") from exc
    if not isinstance(payload, dict):
        raise PeerRejected("malformed", "an event is not a JSON object")
    if "error" in payload:
        error = payload["error"]
        message = error.get("message") if isinstance(error, dict) else error
        raise PeerRejected("stream_error", " ".join(str(message).split())[:200])
    choices = payload.get("choices", [])
    if not isinstance(choices, list):
        raise PeerRejected("bad_field", "choices is not a list")
    texts: list[str] = []
    finish_reason = None
    for choice in choices:
        if not isinstance(choice, dict):
            raise PeerRejected("bad_field", "a choice is not an object")
        delta = choice.get("delta")
        if delta is not None and not isinstance(delta, dict):
            raise PeerRejected("bad_field", "a delta is not an object")
        text = _optional_str((delta or {}).get("content"), "delta.content", 1 << 20)
        if not text:
            text = _optional_str(choice.get("text"), "text", 1 << 20)
        texts.append(text or "")
        finish_reason = _optional_str(choice.get("finish_reason"), "finish_reason", 64) or finish_reason
    usage = payload.get("usage")
    if usage is not None and not isinstance(usage, dict):
        raise PeerRejected("bad_field", "usage is not an object")
    return StreamChunk(
        text="".join(texts),
        finish_reason=finish_reason,
        prompt_tokens=_count(usage, "prompt_tokens") if usage else None,
        completion_tokens=_count(usage, "completion_tokens") if usage else None,
        payload=payload,
    )
