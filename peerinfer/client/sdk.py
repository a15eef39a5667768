"""A small SDK over ``requests`` that streams text deltas from a worker's OpenAI API.

client = PeerInferClient("http://127.0.0.1:8000")
stream = client.chat_stream([{"role": "user", "content": "Hi"}])
for delta in stream:
    print(delta, end="", flush=True)
print(stream.stats)
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import requests

from peerinfer.client.sse_parser import SSEParser
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


def _error_message(response: requests.Response) -> str:
    try:
        payload = response.json()
        return str(payload["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text.strip()[:200] or response.reason


class TextStream:
    """Iterate for text deltas; afterwards ``stats`` holds the timings and token counts."""

    def __init__(self, response: requests.Response, started: float) -> None:
        self._response = response
        self._started = started
        self.stats: StreamStats | None = None
        self.finish_reason: str | None = None

    def __iter__(self) -> Iterator[str]:
        parser = SSEParser()
        first: float | None = None
        deltas = 0
        usage: dict[str, int] = {}
        try:
            for chunk in self._response.iter_content(chunk_size=None):
                for event in parser.feed(chunk):
                    if event.data == "[DONE]":
                        continue
                    payload = json.loads(event.data)
                    if "error" in payload:
                        raise ClientError(f"the worker failed mid-stream: {payload['error'].get('message')}")
                    usage = payload.get("usage") or usage
                    for choice in payload.get("choices", []):
                        text = choice.get("delta", {}).get("content") or choice.get("text") or ""
                        self.finish_reason = choice.get("finish_reason") or self.finish_reason
                        if text:
                            first = first if first is not None else time.perf_counter()
                            deltas += 1
                            yield text
        except requests.RequestException as exc:
            raise ClientError(f"the connection to the worker broke mid-stream: {exc}") from exc
        except ValueError as exc:
            raise ClientError(f"the worker sent an event that is not JSON: {exc}") from exc
        finally:
            self._response.close()
        total = time.perf_counter() - self._started
        tokens = usage.get("completion_tokens", deltas)
        generating = total - (first - self._started) if first is not None else 0.0
        self.stats = StreamStats(
            ttft_s=None if first is None else first - self._started,
            total_s=total,
            prompt_tokens=usage.get("prompt_tokens"),
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
            message = f"the worker at {self.base_url} answered {response.status_code}: {_error_message(response)}"
            if retry:
                message += f" (retry after {retry} s)"
            response.close()
            raise ClientError(
                message, status=response.status_code, retry_after=int(retry) if retry and retry.isdigit() else None
            )
        return response

    def chat_stream(self, messages: list[Message], **params: Any) -> TextStream:
        body = {"messages": messages, "stream": True, "stream_options": {"include_usage": True}, **params}
        started = time.perf_counter()
        return TextStream(self._post("/v1/chat/completions", body), started)

    def completion_stream(self, prompt: str, **params: Any) -> TextStream:
        body = {"prompt": prompt, "stream": True, "stream_options": {"include_usage": True}, **params}
        started = time.perf_counter()
        return TextStream(self._post("/v1/completions", body), started)

    def chat(self, messages: list[Message], **params: Any) -> str:
        return "".join(self.chat_stream(messages, **params))

    def health(self) -> dict[str, Any]:
        try:
            response = self._session.get(self.base_url + "/health", timeout=self._timeout)
        except requests.RequestException as exc:
            raise ClientError(f"cannot connect to a worker at {self.base_url}: {exc.__class__.__name__}") from exc
        payload: dict[str, Any] = response.json()
        return payload

    def close(self) -> None:
        self._session.close()
