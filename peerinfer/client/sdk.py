"""A small SDK over ``requests`` that streams text deltas from a worker's OpenAI API.

client = PeerInferClient("http://127.0.0.1:8000")
stream = client.chat_stream([{"role": "user", "content": "Hi"}])
for delta in stream:
    print(delta, end="", flush=True)
print(stream.stats)
"""

from __future__ import annotations

import http.client
import json
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import requests
import urllib3

from peerinfer.api.openai import COMPLETIONS_DEFAULT_MAX_TOKENS
from peerinfer.client.peer_http import PeerRejected
from peerinfer.client.sse_parser import SSEError, SSEParser
from peerinfer.client.stream_events import read_chunk
from peerinfer.errors import ClientError

Message = dict[str, str]


@dataclass(frozen=True)
class StreamStats:
    """What one streamed answer cost. Token counts come from the server's ``usage``."""

    ttft_s: float | None
    total_s: float
    prompt_tokens: int | None
    completion_tokens: int
    tokens_per_s: float
    finish_reason: str | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


MAX_ERROR_BYTES = 64 * 1024
READ_SIZE = 64 * 1024
_RETRY_AFTER = re.compile(r"[0-9]{1,6}")
_READ_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException, OSError)


def _read_some(response: requests.Response) -> bytes:
    """What has arrived of the body, at most ``READ_SIZE`` bytes; b"" at its end.

    ``read1`` returns as soon as any bytes are there, so a peer that drips bytes cannot keep one
    read going (``iter_content(chunk_size=None)`` reads a body without chunked framing to its end).
    """
    data: bytes = response.raw.read1(READ_SIZE)
    return data


def _error_message(response: requests.Response) -> str:
    """The message of an error reply, reading at most ``MAX_ERROR_BYTES`` of it."""
    body = bytearray()
    deadline = time.monotonic() + 5.0
    try:
        while len(body) <= MAX_ERROR_BYTES and time.monotonic() < deadline:
            piece = _read_some(response)
            if not piece:
                break
            body += piece
    except _READ_ERRORS:
        pass
    try:
        return " ".join(str(json.loads(bytes(body[:MAX_ERROR_BYTES]))["error"]["message"]).split())[:300]
    except (ValueError, KeyError, TypeError, RecursionError):
        return bytes(body[:200]).decode("utf-8", "replace").strip() or response.reason or "no reason given"


MAX_ANSWER_TOKENS = 131072  # the largest context a worker can have (PEERINFER_N_CTX): no answer is longer
MAX_CHARS_PER_TOKEN = 256  # far above any vocabulary's longest piece


def _token_limit(value: Any) -> int | None:
    """The request's token limit, if it is one (the worker refuses any other value with a 400)."""
    return value if type(value) is int and value > 0 else None


class TextStream:
    """Iterate for text deltas; afterwards ``stats`` holds the timings and token counts.

    What the worker sends is checked as it arrives: an event that is not a well-formed chunk, an
    error event, a line or event over the parser's limits, a stream that ends before ``[DONE]``,
    and a stream that keeps sending bytes (keep-alives, junk) but no text for ``idle_timeout_s``
    all end the iteration with a ``ClientError``, so a routed client fails over or resumes.

    A worker sends at most one text delta per token, so a stream that sends more than
    ``max_tokens`` deltas (or more than ``MAX_CHARS_PER_TOKEN`` characters per token) is lying: the
    iteration ends at the limit, as an honest worker's would with ``finish_reason`` "length", and
    ``overran`` says so (a routed client bans the peer).
    """

    def __init__(
        self,
        response: requests.Response,
        started: float,
        idle_timeout_s: float = 120.0,
        max_tokens: int | None = None,
    ) -> None:
        self._response = response
        self._started = started
        self._idle_timeout_s = idle_timeout_s
        self._max_deltas = max_tokens if max_tokens is not None and max_tokens > 0 else MAX_ANSWER_TOKENS
        self.stats: StreamStats | None = None
        self.finish_reason: str | None = None
        self.overran = False

    def __iter__(self) -> Iterator[str]:
        parser = SSEParser()
        first: float | None = None
        deltas = 0
        prompt_tokens: int | None = None
        completion_tokens: int | None = None
        progress = time.monotonic()  # when text last arrived
        chars = 0
        finished = False
        try:
            while not finished:
                piece = _read_some(self._response)
                if not piece:
                    raise ClientError("the worker's stream ended before [DONE]; the answer may be cut short")
                if time.monotonic() - progress > self._idle_timeout_s:
                    raise ClientError(f"the worker sent no text for {self._idle_timeout_s:g} s")
                for event in parser.feed(piece):
                    if event.data == "[DONE]":
                        finished = True
                        break
                    chunk = read_chunk(event.data)
                    prompt_tokens = chunk.prompt_tokens if chunk.prompt_tokens is not None else prompt_tokens
                    if chunk.completion_tokens is not None:
                        completion_tokens = chunk.completion_tokens
                    self.finish_reason = chunk.finish_reason or self.finish_reason
                    if chunk.text:
                        chars += len(chunk.text)
                        if deltas >= self._max_deltas or chars > MAX_CHARS_PER_TOKEN * self._max_deltas:
                            self.overran = finished = True
                            self.finish_reason = "length"
                            break
                        first = first if first is not None else time.perf_counter()
                        progress = time.monotonic()
                        deltas += 1
                        yield chunk.text
        except PeerRejected as exc:
            if exc.reason == "stream_error":
                raise ClientError(f"the worker failed mid-stream: {exc.detail}") from exc
            raise ClientError(f"the worker sent a bad event ({exc.reason}: {exc.detail})") from exc
        except SSEError as exc:
            raise ClientError(f"the worker's stream is not valid SSE: {exc}") from exc
        except _READ_ERRORS as exc:
            raise ClientError(f"the connection to the worker broke mid-stream: {exc}") from exc
        finally:
            self._response.close()
        total = time.perf_counter() - self._started
        tokens = completion_tokens if completion_tokens is not None else deltas
        generating = total - (first - self._started) if first is not None else 0.0
        self.stats = StreamStats(
            ttft_s=None if first is None else first - self._started,
            total_s=total,
            prompt_tokens=prompt_tokens,
            completion_tokens=tokens,
            tokens_per_s=(tokens - 1) / generating if tokens > 1 and generating > 0 else 0.0,
            finish_reason=self.finish_reason,
        )


class PeerInferClient:
    """Talks to one worker. Every failure is a ``ClientError`` with a one-line reason."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 120.0,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ClientError(f"invalid worker URL {base_url!r}: it must start with http:// or https://")
        self.base_url = base_url.rstrip("/")
        self._timeout = (connect_timeout_s, read_timeout_s)
        self._session = requests.Session()
        if api_key:
            self._session.headers["Authorization"] = f"Bearer {api_key}"

    def _post(self, path: str, body: dict[str, Any]) -> requests.Response:
        url = self.base_url + path
        try:
            response = self._session.post(url, json=body, stream=True, timeout=self._timeout)
        except requests.exceptions.ConnectionError as exc:
            raise ClientError(
                f"cannot connect to a worker at {self.base_url}: is it running and is the URL right?"
            ) from exc
        except requests.exceptions.Timeout as exc:
            raise ClientError(f"the worker at {self.base_url} did not answer within {self._timeout[1]} s") from exc
        except requests.RequestException as exc:
            raise ClientError(f"invalid request to {url}: {exc}") from exc
        if response.status_code != 200:
            retry = response.headers.get("Retry-After")
            retry_after = int(retry) if retry and _RETRY_AFTER.fullmatch(retry) else None
            message = f"the worker at {self.base_url} answered {response.status_code}: {_error_message(response)}"
            if retry_after is not None:
                message += f" (retry after {retry_after} s)"
            response.close()
            raise ClientError(message, status=response.status_code, retry_after=retry_after)
        return response

    def chat_stream(self, messages: list[Message], **params: Any) -> TextStream:
        body = {"messages": messages, "stream": True, "stream_options": {"include_usage": True}, **params}
        started = time.perf_counter()
        limit = params.get("max_completion_tokens", params.get("max_tokens"))
        return TextStream(self._post("/v1/chat/completions", body), started, self._timeout[1], _token_limit(limit))

    def completion_stream(self, prompt: str, **params: Any) -> TextStream:
        body = {"prompt": prompt, "stream": True, "stream_options": {"include_usage": True}, **params}
        started = time.perf_counter()
        limit = params.get("max_tokens", COMPLETIONS_DEFAULT_MAX_TOKENS)
        return TextStream(self._post("/v1/completions", body), started, self._timeout[1], _token_limit(limit))

    def chat(self, messages: list[Message], **params: Any) -> str:
        return "".join(self.chat_stream(messages, **params))

    def health(self) -> dict[str, Any]:
        try:
            response = self._session.get(self.base_url + "/health", timeout=self._timeout)
        except requests.RequestException as exc:
            raise ClientError(f"cannot connect to a worker at {self.base_url}: {exc.__class__.__name__}") from exc
        try:
            payload = response.json()
        except (ValueError, RecursionError) as exc:
            raise ClientError(f"the worker at {self.base_url} sent a /health that is not JSON") from exc
        if not isinstance(payload, dict):
            raise ClientError(f"the worker at {self.base_url} sent a /health that is not a JSON object")
        return payload

    def close(self) -> None:
        self._session.close()
