"""The worker's OpenAPI schema (``/openapi.json``, ``/docs``): the real request bodies and the error shape.

The routes read their raw body themselves (size, type and JSON depth are checked before pydantic sees it),
so FastAPI cannot infer the bodies; these helpers describe them, with the models' ``$defs`` moved into
``components/schemas`` where their ``$ref``s point.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from peerinfer.api import openai as wire

API_DESCRIPTION = (
    "An OpenAI-compatible worker of the peerinfer network. POST bodies must be `application/json`; every "
    'error is `{"error": {"message", "type", "param", "code"}}`.'
)
SCHEMA_REF = "#/components/schemas/{model}"
ERROR_MEANINGS = {
    400: "Invalid request (the message names the field), or a Host this worker does not serve.",
    401: "Missing or wrong API key.",
    408: "The request body did not arrive in time (PEERINFER_BODY_TIMEOUT_S).",
    413: "The request body is larger than PEERINFER_MAX_BODY_BYTES.",
    404: "No such model here (another id than the loaded model's).",
    415: "The request body is not application/json.",
    503: "The model is loading or failed, the queue is full, or too many connections; see Retry-After.",
}
ANY_JSON: dict[str, Any] = {"application/json": {"schema": {"type": "object"}}}
# Before OpenAPI 3.2, the schema of text/event-stream describes one event.
SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "properties": {"data": {"type": "string", "description": "A JSON chunk, or `[DONE]` at the end."}},
    "required": ["data"],
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": wire.ErrorResponse, "description": ERROR_MEANINGS[status]} for status in statuses}


def completion_responses(answer: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    return {
        200: {
            "model": answer,
            "description": "The answer, or with `stream` an SSE stream of chunks ending in `data: [DONE]`.",
            "content": {"text/event-stream": {"schema": SSE_EVENT}},
        },
        **errors(400, 401, 408, 413, 415, 503),
    }


CHAT_RESPONSES = completion_responses(wire.ChatCompletion)
COMPLETION_RESPONSES = completion_responses(wire.TextCompletion)
RESPONSES_API_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The Response, or with `stream` an SSE stream of typed events (`response.created`, ...).",
        "content": {**ANY_JSON, "text/event-stream": {"schema": SSE_EVENT}},
    },
    **errors(400, 401, 408, 413, 415, 503),
}
MODELS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The loaded model.", "content": ANY_JSON},
    **errors(400, 401, 503),
}
MODEL_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The model, when it is the one loaded.", "content": ANY_JSON},
    **errors(400, 401, 404, 503),
}
HEALTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Ready: model, sha256, context, slots and queue.", "content": ANY_JSON},
    503: {"description": "Loading, failed to load, or decoding fails (`status` says which).", "content": ANY_JSON},
    **errors(400),
}
METRICS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Prometheus text format.", "content": {"text/plain": {"schema": {"type": "string"}}}},
    **errors(400),
}


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads ``model`` from the raw body itself."""
    schema = {"$ref": SCHEMA_REF.format(model=model.__name__)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def document_request_bodies(app: FastAPI, models: tuple[type[BaseModel], ...]) -> None:
    """Put the request models (and their ``$defs``) into the schema's components, where the routes point."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                body = model.model_json_schema(ref_template=SCHEMA_REF)
                schemas.update(body.pop("$defs", {}))
                schemas[model.__name__] = body
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]
