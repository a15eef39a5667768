"""The one place exceptions become HTTP responses in OpenAI's error shape."""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from peerinfer.api.openai import error_body
from peerinfer.errors import BodyTooLargeError, OverloadedError, PeerInferError

log = logging.getLogger(__name__)


def error_response(exc: Exception) -> JSONResponse:
    if not isinstance(exc, PeerInferError):
        log.exception("unexpected error while serving a request", exc_info=exc)
        return JSONResponse(
            error_body("internal error in the worker; see its log", "server_error", code="internal_error"),
            status_code=500,
        )
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, OverloadedError) else None
    if isinstance(exc, BodyTooLargeError):
        headers = {"Connection": "close"}  # do not read the rest of a body that is refused anyway
    if exc.status_code >= 500:
        log.warning("%s", exc.message)
    return JSONResponse(
        error_body(exc.message, exc.error_type, exc.param, exc.code), status_code=exc.status_code, headers=headers
    )


def http_error_response(status: int, detail: str) -> JSONResponse:
    """Starlette's own errors (unknown route, wrong method) in the same shape."""
    return JSONResponse(error_body(detail, "invalid_request_error", code=str(status)), status_code=status)


def add_error_handlers(app: FastAPI, to_response: Callable[[PeerInferError], JSONResponse] = error_response) -> None:
    """Every error of ``app`` in OpenAI's shape: ours through ``to_response``, Starlette's, and the unexpected."""

    @app.exception_handler(PeerInferError)
    async def on_peerinfer_error(request: Request, exc: PeerInferError) -> JSONResponse:
        return to_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return http_error_response(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}")

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)
