"""The synchronous SDK for one worker, a thin layer over the async transport.

client = PeerInferClient("http://127.0.0.1:8000")
stream = client.chat_stream([{"role": "user", "content": "Hi"}])
for delta in stream:
    print(delta, end="", flush=True)
print(stream.stats)

For the network instead of one worker, use ``RoutedClient`` (``client.routed``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from peerinfer.api.health import HealthRejected, HealthReport, read_health
from peerinfer.api.openai import COMPLETIONS_DEFAULT_MAX_TOKENS
from peerinfer.client.answer import StreamStats, stream_stats
from peerinfer.client.loop import BackgroundLoop
from peerinfer.client.peer_http import PeerRejected
from peerinfer.client.transport import Transport, WorkerHttp, WorkerStream
from peerinfer.client.vetting import MAX_HEALTH_BYTES
from peerinfer.errors import ClientError

Message = dict[str, Any]

__all__ = ["Message", "PeerInferClient", "StreamStats", "TextStream"]


def _token_limit(value: Any) -> int | None:
    """The request's token limit, if it is one (the worker refuses any other value with a 400)."""
    return value if type(value) is int and value > 0 else None


class TextStream:
    """Iterate for text deltas; afterwards ``stats`` holds the timings and token counts.

    The worker's events are read strictly (``transport.WorkerStream``): a bad event, a cut before
    ``[DONE]`` or a stream with no text for the read time-out end the iteration with a
    ``ClientError``; a stream with more text than ``max_tokens`` ends at the limit and ``overran``.
    """

    def __init__(self, loop: BackgroundLoop, stream: WorkerStream) -> None:
        self._loop = loop
        self._stream = stream
        self.stats: StreamStats | None = None
        self.finish_reason: str | None = None

    @property
    def overran(self) -> bool:
        return self._stream.overran

    def __iter__(self) -> Iterator[str]:
        deltas = 0
        prompt_tokens: int | None = None
        completion_tokens: int | None = None
        for chunk in self._loop.iterate(self._stream.chunks()):
            if chunk.prompt_tokens is not None:
                prompt_tokens = chunk.prompt_tokens
            if chunk.completion_tokens is not None:
                completion_tokens = chunk.completion_tokens
            self.finish_reason = chunk.finish_reason or self.finish_reason
            if chunk.text:
                deltas += 1
                yield chunk.text
        tokens = completion_tokens if completion_tokens is not None else deltas
        self.stats = stream_stats(
            self._stream.started, self._stream.first_text_at, prompt_tokens, tokens, self.finish_reason
        )


class PeerInferClient:
    """Talks to one worker. Every failure is a ``ClientError`` with a one-line reason.

    ``transport`` replaces the network (``httpx.MockTransport``, ``httpx.ASGITransport``) in tests.
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 120.0,
        transport: Transport | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ClientError(f"invalid worker URL {base_url!r}: it must start with http:// or https://")
        self.base_url = base_url.rstrip("/")
        self._loop = BackgroundLoop()
        self._http = WorkerHttp(
            transport=transport, api_key=api_key, connect_timeout_s=connect_timeout_s, read_timeout_s=read_timeout_s
        )

    def _stream(self, path: str, body: dict[str, Any], limit: int | None) -> TextStream:
        return TextStream(
            self._loop, self._loop.run(self._http.open_stream(self.base_url, path, body, max_tokens=limit))
        )

    def chat_stream(self, messages: list[Message], **params: Any) -> TextStream:
        body = {"messages": messages, "stream": True, "stream_options": {"include_usage": True}, **params}
        limit = params.get("max_completion_tokens", params.get("max_tokens"))
        return self._stream("/v1/chat/completions", body, _token_limit(limit))

    def completion_stream(self, prompt: str, **params: Any) -> TextStream:
        body = {"prompt": prompt, "stream": True, "stream_options": {"include_usage": True}, **params}
        return self._stream(
            "/v1/completions", body, _token_limit(params.get("max_tokens", COMPLETIONS_DEFAULT_MAX_TOKENS))
        )

    def chat(self, messages: list[Message], **params: Any) -> str:
        return "".join(self.chat_stream(messages, **params))

    def health(self, timeout_s: float = 5.0) -> HealthReport:
        """The worker's ``/health``, read as strictly as a probe; ``ClientError`` if it is not one."""
        try:
            reply = self._loop.run(
                self._http.exchange(
                    self.base_url, "GET", "/health", deadline=time.monotonic() + timeout_s, max_bytes=MAX_HEALTH_BYTES
                )
            )
            return read_health(reply.body)
        except (PeerRejected, HealthRejected) as exc:
            raise ClientError(f"the worker at {self.base_url} sent no usable /health: {exc}") from exc

    def close(self) -> None:
        self._loop.close(self._http.aclose())

    def __enter__(self) -> PeerInferClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
