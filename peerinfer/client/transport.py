"""Every HTTP exchange with a worker goes through ``WorkerHttp``: the one module that imports httpx.

The SDK, the routed client, ``peers`` and the gateway all use it, and tests replace the network
under it by passing a transport (``httpx.MockTransport``, or an ASGI app).

A worker is a stranger, so nothing here trusts it to answer, to answer quickly or briefly:

- a probe or a challenge (``exchange``) has one deadline for the whole exchange, however slowly
  the peer drips its bytes, and reads at most ``max_bytes`` of the reply;
- replies must come identity-encoded: a compressed body is refused rather than inflated;
- a stream (``WorkerStream``) is read strictly, event by event (see ``TextStream`` rules in
  ``WorkerStream``'s docstring).

Every failure is a ``PeerRejected`` (probes) or a ``ClientError`` (requests), never an httpx error.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx

from peerinfer.client.peer_http import HttpReply, PeerRejected
from peerinfer.client.sse_parser import SSEError, SSEParser
from peerinfer.client.stream_events import StreamChunk, read_chunk
from peerinfer.errors import ClientError
from peerinfer.network.records import is_ice_endpoint


class Tunnels(Protocol):
    """What opens ``ice://`` endpoints (``client.tunnels.IceEndpoints``): each becomes a loopback HTTP origin."""

    timeout_s: float

    async def origin(self, endpoint: str) -> str:
        """The ``http://127.0.0.1:PORT`` that reaches ``endpoint``, opened now if needed; raises ``PeerRejected``."""
        ...

    def is_open(self, endpoint: str) -> bool: ...

    def path(self, endpoint: str) -> str | None: ...

    async def aclose(self) -> None: ...


Transport = httpx.AsyncBaseTransport
"""What replaces the network under ``WorkerHttp`` in tests (``httpx.MockTransport``, ``httpx.ASGITransport``)."""

MAX_ERROR_BYTES = 64 * 1024
ERROR_READ_S = 5.0
MAX_ANSWER_TOKENS = 131072  # the largest context a worker can have (PEERINFER_N_CTX): no answer is longer
MAX_CHARS_PER_TOKEN = 256  # far above any vocabulary's longest piece
_RETRY_AFTER = re.compile(r"[0-9]{1,6}")
_IDENTITY = {"Accept-Encoding": "identity"}


def _target(url: str, path: str) -> str:
    """``url`` + ``path`` if ``url`` is an http(s) origin; raises ``PeerRejected`` ("malformed")."""
    try:
        parts = urlsplit(url)
        valid = parts.scheme in ("http", "https") and parts.hostname is not None
        parts.port  # noqa: B018 -- raises ValueError for a bad port
    except ValueError:
        valid = False
    if not valid:
        raise PeerRejected("malformed", f"bad endpoint URL {url[:60]!r}")
    return url.rstrip("/") + path


def _loop_deadline(deadline: float) -> float:
    """A ``time.monotonic`` deadline on the running loop's clock."""
    loop = asyncio.get_running_loop()
    return loop.time() + (deadline - time.monotonic())


async def _read_capped(response: httpx.Response, max_bytes: int, what: str) -> bytes:
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise PeerRejected("malformed", f"the reply to {what} is {encoding[:20]}-encoded; identity was asked for")
    body = bytearray()
    async for piece in response.aiter_bytes():  # identity-encoded: the bytes as they came
        body += piece
        if len(body) > max_bytes:
            raise PeerRejected("too_large", f"the reply to {what} is over {max_bytes} bytes")
    return bytes(body)


def _error_object(body: bytes) -> dict[str, Any] | None:
    """The OpenAI error object of an error reply, with only its string fields, bounded; None if there is none."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return None
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return None
    checked: dict[str, Any] = {"message": " ".join(error["message"].split())[:1000]}
    for name in ("type", "param", "code"):
        value = error.get(name)
        checked[name] = value[:200] if isinstance(value, str) else None
    return checked


class WorkerHttp:
    """One pool of connections to workers. Use it on one event loop; close it with ``aclose``."""

    def __init__(
        self,
        *,
        transport: Transport | None = None,
        api_key: str | None = None,
        connect_timeout_s: float = 3.0,
        read_timeout_s: float = 60.0,
        max_connections: int = 1024,
        tunnels: Tunnels | None = None,
    ) -> None:
        self.tunnels = tunnels
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(read_timeout_s, connect=connect_timeout_s, pool=connect_timeout_s),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=64),
            trust_env=False,  # no proxy or netrc from the environment: a peer's address is used as it is
            follow_redirects=False,
        )

    @property
    def can_tunnel(self) -> bool:
        """Whether ``ice://`` endpoints can be opened (a DHT node and ICE on)."""
        return self.tunnels is not None

    def is_open(self, url: str) -> bool:
        """False for an ``ice://`` endpoint whose path is not open yet: using it costs the set-up first."""
        return not is_ice_endpoint(url) or (self.tunnels is not None and self.tunnels.is_open(url))

    def path(self, url: str) -> str | None:
        """How ``url`` is reached: "direct" for http(s), the ICE path's kind, or None while none is open."""
        if not is_ice_endpoint(url):
            return "direct"
        return self.tunnels.path(url) if self.tunnels is not None else None

    async def prepare(self, url: str) -> None:
        """Open the path to an ``ice://`` endpoint now, within the tunnels' own time limit; raises ``PeerRejected``."""
        await self._origin(url)

    async def _origin(self, url: str) -> str:
        if not is_ice_endpoint(url):
            return url
        if self.tunnels is None:
            raise PeerRejected(
                "unreachable", f"{url[:60]} is an ICE endpoint; this client opens those only with a DHT node and ICE on"
            )
        return await self.tunnels.origin(url)

    async def exchange(
        self, url: str, method: str, path: str, *, deadline: float, max_bytes: int, body: bytes | None = None
    ) -> HttpReply:
        """One request and its whole reply by ``deadline`` (``time.monotonic``), at most ``max_bytes`` read.

        Raises ``PeerRejected``: "unreachable", "timeout", "too_large" or "malformed".
        """
        headers = {**_IDENTITY, "Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        return await self._exchange(method, url, path, body, headers, deadline, max_bytes)

    async def request(self, url: str, path: str, body: dict[str, Any], *, max_bytes: int, deadline: float) -> HttpReply:
        """A non-streamed POST, any status; ``ClientError`` (no status) when no whole reply came back in time."""
        headers = {**_IDENTITY, **self._auth, "Accept": "application/json", "Content-Type": "application/json"}
        content = json.dumps(body, ensure_ascii=False).encode()
        try:
            return await self._exchange("POST", url, path, content, headers, deadline, max_bytes)
        except PeerRejected as exc:
            raise ClientError(f"the worker at {url} failed to answer: {exc}") from exc

    async def _exchange(
        self,
        method: str,
        url: str,
        path: str,
        content: bytes | None,
        headers: dict[str, str],
        deadline: float,
        max_bytes: int,
    ) -> HttpReply:
        what = f"{method} {path}"
        try:
            async with asyncio.timeout_at(_loop_deadline(deadline)):
                target = _target(await self._origin(url), path)
                async with self._client.stream(method, target, content=content, headers=headers) as response:
                    data = await _read_capped(response, max_bytes, what)
                    return HttpReply(response.status_code, dict(response.headers), data)
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise PeerRejected("timeout", f"no complete reply to {what} in time") from exc
        except (httpx.RemoteProtocolError, httpx.DecodingError, httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
            raise PeerRejected("malformed", f"not an HTTP reply to {what}: {type(exc).__name__}") from exc
        except (httpx.HTTPError, OSError) as exc:  # refused, reset, unreachable, TLS errors, DNS
            raise PeerRejected("unreachable", f"{type(exc).__name__} on {what}") from exc

    async def open_stream(
        self, url: str, path: str, body: dict[str, Any], *, max_tokens: int | None = None
    ) -> WorkerStream:
        """POST a streamed request; the worker's answer once it said 200. Raises ``ClientError``.

        A non-200 answer is a ``ClientError`` with its ``status``, ``retry_after`` and the worker's
        error object; a connection failure or a time-out has no status.
        """
        try:
            origin = await self._origin(url)
        except PeerRejected as exc:
            raise ClientError(f"cannot open a path to the worker at {url}: {exc.detail}") from exc
        try:
            target = _target(origin, path)
        except PeerRejected as exc:
            raise ClientError(f"invalid worker URL {url[:60]!r}: it must be http:// or https:// and a host") from exc
        request = self._client.build_request(
            "POST", target, json=body, headers={**_IDENTITY, **self._auth, "Accept": "text/event-stream"}
        )
        started = time.perf_counter()
        try:
            response = await self._client.send(request, stream=True)
        except httpx.ConnectError as exc:
            raise ClientError(f"cannot connect to a worker at {url}: is it running and is the URL right?") from exc
        except httpx.TimeoutException as exc:
            raise ClientError(f"the worker at {url} did not answer within {self.read_timeout_s:g} s") from exc
        except (httpx.HTTPError, OSError) as exc:
            raise ClientError(f"the request to {url} failed: {type(exc).__name__}") from exc
        if response.status_code != 200:
            raise await _refusal(response, url)
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            await response.aclose()
            raise ClientError(f"the worker at {url} sent a {encoding[:20]}-encoded stream; identity was asked for")
        return WorkerStream(response, url, started, idle_timeout_s=self.read_timeout_s, max_tokens=max_tokens)

    async def aclose(self) -> None:
        await self._client.aclose()
        if self.tunnels is not None:
            await self.tunnels.aclose()


async def _refusal(response: httpx.Response, url: str) -> ClientError:
    """The ``ClientError`` for a non-200 answer, reading at most ``MAX_ERROR_BYTES`` of it for ``ERROR_READ_S``."""
    body = b""
    try:
        async with asyncio.timeout(ERROR_READ_S):
            body = await _read_capped(response, MAX_ERROR_BYTES, "the request")
    except (TimeoutError, PeerRejected, httpx.HTTPError, OSError):
        pass
    finally:
        await response.aclose()
    error = _error_object(body)
    reason = error["message"] if error else (body[:200].decode("utf-8", "replace").strip() or response.reason_phrase)
    retry = response.headers.get("retry-after")
    retry_after = int(retry) if retry and _RETRY_AFTER.fullmatch(retry.strip()) else None
    message = f"the worker at {url} answered {response.status_code}: {' '.join(str(reason).split())[:300]}"
    if retry_after is not None:
        message += f" (retry after {retry_after} s)"
    return ClientError(message, status=response.status_code, retry_after=retry_after, error=error)


class WorkerStream:
    """A worker's streamed answer, read event by event; ``chunks()`` yields each ``StreamChunk``.

    What the worker sends is checked as it arrives: an event that is not a well-formed chunk, an
    error event, a line or event over the parser's limits, a stream that ends before ``[DONE]``,
    and one that keeps sending bytes (keep-alives, junk) but no text for ``idle_timeout_s`` all
    end the iteration with a ``ClientError``, so a routed client fails over or resumes.

    A worker sends at most one text delta per token, so a stream that sends more than
    ``max_tokens`` deltas (or more than ``MAX_CHARS_PER_TOKEN`` characters per token) is lying: it
    ends at the limit with a last chunk whose ``finish_reason`` is "length", as an honest worker's
    would, and ``overran`` says so (a routed client bans the peer).
    """

    def __init__(
        self, response: httpx.Response, url: str, started: float, *, idle_timeout_s: float, max_tokens: int | None
    ) -> None:
        self._response = response
        self.url = url
        self.started = started
        self._idle_timeout_s = idle_timeout_s
        self._max_deltas = max_tokens if max_tokens is not None and max_tokens > 0 else MAX_ANSWER_TOKENS
        self.overran = False
        self.first_text_at: float | None = None  # time.perf_counter() of the first text

    async def chunks(self) -> AsyncIterator[StreamChunk]:
        parser = SSEParser()
        deltas = 0
        chars = 0
        progress = time.monotonic()  # when text last arrived
        # Closed in ``finally``: left to the garbage collector, its clean-up would be a task the loop
        # may never run (asyncio then prints "Task was destroyed but it is pending" at exit).
        pieces = self._response.aiter_bytes()  # identity-encoded (checked on opening)
        try:
            async for piece in pieces:
                if time.monotonic() - progress > self._idle_timeout_s:
                    raise ClientError(f"the worker sent no text for {self._idle_timeout_s:g} s")
                for event in parser.feed(piece):
                    if event.data == "[DONE]":
                        return
                    chunk = read_chunk(event.data)
                    if chunk.text:
                        chars += len(chunk.text)
                        if deltas >= self._max_deltas or chars > MAX_CHARS_PER_TOKEN * self._max_deltas:
                            self.overran = True
                            yield StreamChunk(finish_reason="length", payload=_length_payload(chunk.payload))
                            return
                        deltas += 1
                        progress = time.monotonic()
                        if self.first_text_at is None:
                            self.first_text_at = time.perf_counter()
                    yield chunk
            raise ClientError("the worker's stream ended before [DONE]; the answer may be cut short")
        except PeerRejected as exc:
            if exc.reason == "stream_error":
                raise ClientError(f"the worker failed mid-stream: {exc.detail}") from exc
            raise ClientError(f"the worker sent a bad event ({exc.reason}: {exc.detail})") from exc
        except SSEError as exc:
            raise ClientError(f"the worker's stream is not valid SSE: {exc}") from exc
        except httpx.TimeoutException as exc:
            raise ClientError(f"the worker sent nothing for {self._idle_timeout_s:g} s mid-stream") from exc
        except (httpx.HTTPError, OSError) as exc:
            raise ClientError(f"the connection to the worker broke mid-stream: {type(exc).__name__}") from exc
        finally:
            await pieces.aclose()  # type: ignore[attr-defined]
            await self._response.aclose()

    async def aclose(self) -> None:
        await self._response.aclose()


def _length_payload(last: dict[str, Any]) -> dict[str, Any]:
    """The closing chunk of a stream cut at its token limit: the last chunk's frame with no text."""
    frame = {key: last[key] for key in ("id", "object", "created", "model", "system_fingerprint") if key in last}
    closing: dict[str, Any] = {"index": 0, "finish_reason": "length"}
    if last.get("object") == "text_completion":
        closing["text"] = ""
    else:
        closing["delta"] = {}
    return frame | {"choices": [closing]}
