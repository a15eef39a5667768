"""What the worker checks in every request before a route sees it: the ``Host``, the body's type and size.

Two attacks come through the user's own browser when the worker listens on 127.0.0.1 without a key:

- CSRF: any web page can POST to ``http://127.0.0.1:8000``, but without a preflight only as
  ``text/plain``, a form or multipart. So a POST body must be ``application/json`` (415 otherwise),
  which a page can only send cross-origin after a CORS preflight that ``PEERINFER_CORS_ORIGINS`` allows.
- DNS rebinding: a page on ``evil.example`` re-points its name to 127.0.0.1 and then reads the answers
  as same-origin. Its requests still carry ``Host: evil.example``, so only the names this worker is
  known by pass (``allowed_host_names``), on every route, ``/health`` included: peers probe it through
  the announce URL, whose host is allowed.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from pydantic import SecretStr
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from peerinfer.api.openai import dumps, error_body
from peerinfer.errors import AuthError, BodyTooLargeError, ClientDisconnectedError, UnsupportedMediaTypeError
from peerinfer.server.protocol import HttpLimits, departure_log, refusal_log
from peerinfer.server.protocol import install as install_protocol
from peerinfer.settings import GatewaySettings, WorkerSettings

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
JSON_TYPE = re.compile(r"^\s*application/json\s*(;.*)?$", re.IGNORECASE)
CHARSET = re.compile(r";\s*charset\s*=\s*\"?([^\";\s]+)\"?", re.IGNORECASE)


def split_host(header: str) -> str:
    """The host name of a ``Host`` header, lower-case, without port, brackets or a trailing dot."""
    host = header.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def url_host(url: str | None) -> str | None:
    if not url:
        return None
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return None
    return host.rstrip(".").lower() if host else None


@dataclass(frozen=True)
class HostPolicy:
    """The host names a worker answers; ``.example.com`` allows its subdomains, ``*`` allows any."""

    names: frozenset[str]
    suffixes: tuple[str, ...] = ()
    any_host: bool = False

    @classmethod
    def build(cls, configured: Iterable[str], announce_urls: Iterable[str | None]) -> HostPolicy:
        names = set(LOOPBACK_HOSTS)
        suffixes: list[str] = []
        any_host = False
        for entry in configured:
            entry = entry.strip().lower()
            if "://" in entry:  # a URL given where a host name was meant
                entry = url_host(entry) or ""
            if entry == "*":
                any_host = True
            elif entry.startswith("."):
                suffixes.append(entry.rstrip("."))
            elif entry:
                names.add(split_host(entry))
        names.update(host for host in (url_host(url) for url in announce_urls) if host)
        return cls(frozenset(names), tuple(suffixes), any_host)

    def allows(self, host: str, local_address: str | None) -> bool:
        if self.any_host or host in self.names or host == local_address or _is_ip(host):
            # An IP address is no rebinding: that attack needs a domain name that resolves to this machine.
            # A port-forwarded worker is named by its router's public address, which it cannot know.
            return True
        if host.startswith("127.") and host.replace(".", "").isdigit():
            return True  # all of 127.0.0.0/8 is this machine
        return any(host.endswith(suffix) or host == suffix[1:] for suffix in self.suffixes)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


class HostGuard:
    """Plain ASGI middleware: a request whose ``Host`` this worker does not serve gets 400, on every route.

    The address the connection arrived at (``scope["server"]``) is allowed too: a client that names the
    worker by the IP it is bound to is not a rebinding page, whose requests carry its own domain.
    """

    def __init__(self, app: ASGIApp, policy: HostPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = next((value for name, value in scope["headers"] if name == b"host"), None)
        if raw is None:  # HTTP/1.0 without Host: not a browser
            await self.app(scope, receive, send)
            return
        header = raw.decode("latin-1")
        server = scope.get("server")
        local = str(server[0]).lower() if server else None
        if self.policy.allows(split_host(header), local):
            await self.app(scope, receive, send)
            return
        shown = header if len(header) <= 100 else header[:97] + "..."
        refusal_log("host_not_allowed", f"refused a request for Host {shown!r} (not a name of this worker)")
        message = (
            f"this worker does not serve the host {shown!r}; use http://127.0.0.1:<port>, the announce URL, "
            "or add the name to PEERINFER_ALLOWED_HOSTS"
        )
        body = dumps(error_body(message, "invalid_request_error", "Host", "host_not_allowed")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 400, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def check_json_content_type(value: str | None) -> None:
    """A POST body must be ``application/json`` (UTF-8): a cross-site form or ``text/plain`` cannot be."""
    if value is None or not JSON_TYPE.match(value):
        shown = "none" if value is None else repr(value[:80])
        raise UnsupportedMediaTypeError(
            f"the request body must be JSON with the header 'Content-Type: application/json' (got {shown})",
            param="Content-Type",
        )
    charset = CHARSET.search(value)
    if charset is not None and charset.group(1).lower() not in ("utf-8", "utf8"):
        raise UnsupportedMediaTypeError(
            f"the request body must be UTF-8 JSON, got charset {charset.group(1)!r}; send "
            "'Content-Type: application/json'",
            param="Content-Type",
        )


async def read_json_body(request: Request, limit: int) -> bytes:
    """The body of a JSON POST, refused early when it is not JSON or larger than ``limit`` bytes."""
    check_json_content_type(request.headers.get("content-type"))
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLargeError(f"the request body has {declared} bytes but this worker accepts at most {limit}")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > limit:
                raise BodyTooLargeError(f"the request body is larger than the {limit} bytes this worker accepts")
    except ClientDisconnect as exc:
        client = f"{request.client.host}:{request.client.port}" if request.client else "a client"
        expected = f" of {declared}" if declared is not None else ""
        departure_log(
            "left_during_upload",
            f"{client} left while sending {request.url.path!r}: {len(body)}{expected} bytes arrived",
        )
        raise ClientDisconnectedError("the client disconnected before its request body was complete") from exc
    return bytes(body)


def check_api_key(request: Request, expected: SecretStr | None, who: str) -> None:
    """Raises ``AuthError`` unless ``expected`` is None or the request carries it as a Bearer token
    (compared in constant time); ``who`` names the server in the message ("this worker")."""
    if expected is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise AuthError("missing API key; send the header 'Authorization: Bearer <key>'")
    if not hmac.compare_digest(token.strip().encode(), expected.get_secret_value().encode()):
        raise AuthError(f"invalid API key; check the key {who} was started with (PEERINFER_API_KEY)")


def install_http_limits(
    app: FastAPI,
    settings: WorkerSettings | GatewaySettings,
    on_refusal: Callable[[str], None],
    *,
    expose_headers: Sequence[str] = (),
) -> None:
    """The protocol limits (head size and time, body time, connections) and CORS (only for
    ``cors_origins``) of a worker or the gateway, set up alike on both."""
    app.state.http_limits = HttpLimits(
        max_header_bytes=settings.max_header_bytes,
        head_timeout_s=settings.head_timeout_s,
        body_timeout_s=settings.body_timeout_s,
        max_connections=settings.max_connections,
        on_refusal=on_refusal,
    )
    install_protocol()
    if settings.cors_origins:
        origins = ["*"] if "*" in settings.cors_origins else [origin.rstrip("/") for origin in settings.cors_origins]
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=list(expose_headers),
            max_age=600,
        )
