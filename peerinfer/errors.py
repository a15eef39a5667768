"""The one exception tree of peerinfer.

``PeerInferError`` is the root. Every error a user can cause or meet derives from it, carries a
message that says what was wrong and how to fix it, and maps to one HTTP status and OpenAI error
``type``/``code`` (see ``peerinfer.server.errors.error_response``):

- ``ConfigError``: bad settings or command-line values (no HTTP status; the CLI exits non-zero).
- ``ModelFileError``: the model file is missing, unreadable, not a GGUF or fails its sha256.
- ``EngineError``: llama.cpp failed while loading or decoding (500).
- ``RequestError``: the client sent something invalid (400). Subclasses:
  ``ContextLengthError`` (the prompt does not fit), ``BodyTooLargeError`` (413),
  ``UnsupportedMediaTypeError`` (415: a body that is not ``application/json``),
  ``HostNotAllowedError`` (400: a ``Host`` header this worker does not serve, as in DNS rebinding),
  ``ClientDisconnectedError`` (the client left while sending its body; nobody reads the answer).
- ``AuthError``: missing or wrong API key (401).
- ``OverloadedError``: the queue is full or the model is still loading (503, with ``retry_after``).
- ``ClientError``: raised by the SDK when a worker cannot be reached or answers with an error.
  ``NoPeersError`` (subclass): the network offered no usable peer for the request.
- ``NetworkError``: the DHT node cannot be used (stopped, or its UDP port is taken).

Foreign exceptions (ctypes, requests, pydantic) are translated into these once, at the boundary,
with ``raise ... from exc``.
"""

from __future__ import annotations

from typing import Any


class PeerInferError(Exception):
    """Root of every error peerinfer raises on purpose."""

    status_code = 500
    error_type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class ConfigError(PeerInferError):
    """Settings or command-line values that cannot work."""


class ModelFileError(PeerInferError):
    """The model file is missing, unreadable, not a GGUF, or fails its checksum."""


class EngineError(PeerInferError):
    """llama.cpp failed to load the model or to decode a batch."""


class RequestError(PeerInferError):
    """The request is invalid; the message names the field, the value and what was expected."""

    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthError(RequestError):
    code = "context_length_exceeded"


class BodyTooLargeError(RequestError):
    status_code = 413
    code = "request_too_large"


class UnsupportedMediaTypeError(RequestError):
    status_code = 415
    code = "unsupported_media_type"


class HostNotAllowedError(RequestError):
    code = "host_not_allowed"


class ClientDisconnectedError(RequestError):
    code = "client_disconnected"


class NotFoundError(RequestError):
    status_code = 404
    code = "not_found"


class AuthError(PeerInferError):
    status_code = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class OverloadedError(PeerInferError):
    """The worker cannot take the request now; try again after ``retry_after`` seconds."""

    status_code = 503
    error_type = "server_error"
    code = "overloaded"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ClientError(PeerInferError):
    """Raised by the SDK: the worker could not be reached or answered with an error.

    ``status`` is the worker's HTTP status (None: no answer), ``error`` its OpenAI error object, checked
    and bounded by the transport, so a gateway can hand a worker's 400 on to its own client.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after: int | None = None,
        error: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.error = error


class NoPeersError(ClientError):
    """Discovery found no verified peer, or every usable peer failed within the attempt limit."""


class NetworkError(PeerInferError):
    """The peer-to-peer layer cannot work: the DHT node is stopped or cannot start."""
