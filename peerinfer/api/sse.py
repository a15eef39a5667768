"""Server-Sent Events framing (server side). Pure."""

from __future__ import annotations

from typing import Any

from peerinfer.api.openai import dumps

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}
MEDIA_TYPE = "text/event-stream"


def event(payload: dict[str, Any]) -> bytes:
    """One ``data:`` event. JSON never holds a raw newline, so one line is always enough."""
    return b"data: " + dumps(payload).encode("utf-8") + b"\n\n"
