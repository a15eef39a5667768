"""OpenAI request models and response builders for /v1/chat/completions and /v1/completions.

Requests are validated strictly (a string is not an int) but unknown fields are ignored, as
clients such as LangChain send parameters this server does not use.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from peerinfer.errors import RequestError

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions

M = TypeVar("M", bound=BaseModel)
Role = Literal["system", "developer", "user", "assistant"]
MAX_STOPS = 4
MAX_STOP_CHARS = 200


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Role
    content: str | list[TextPart] | None = None

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=1000)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences are allowed, got {len(stops)}")
        for stop in stops:
            if not stop or len(stop) > MAX_STOP_CHARS:
                raise ValueError(f"each stop sequence must have 1 to {MAX_STOP_CHARS} characters")
        return value

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    continue_final_message: bool = False

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    # An extension (llama-server's name): read ``<eos>``-like text in the prompt as control tokens.
    parse_special: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError(f"exactly one prompt is supported per request, got {len(value)}")
        return value

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


def _is_union_tag(part: object) -> bool:
    """pydantic puts the union member it tried into the location (``str``, ``list[TextPart]``)."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "none") or "[" in part)


def _describe(error: dict[str, Any]) -> tuple[str, str]:
    param = ".".join(str(part) for part in error["loc"] if not _is_union_tag(part))
    kind = error["type"]
    if kind == "json_invalid":
        return f"the request body is not valid JSON: {error['msg']}", "body"
    if kind == "missing":
        return f"'{param}' is required", param
    if kind == "too_short" and param == "messages":
        return "'messages' must hold at least one message", param
    value = repr(error.get("input"))
    if len(value) > 80:
        value = value[:77] + "..."
    return f"invalid '{param}': {error['msg']} (got {value})", param


def parse_request(model: type[M], body: bytes) -> M:
    """Validate a JSON body; a failure becomes a ``RequestError`` naming the field and the value."""
    if not body.strip():
        raise RequestError("the request body is empty; send a JSON object", param="body")
    try:
        return model.model_validate_json(body, strict=True)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0]
        if first["type"] in ("model_type", "model_attributes_type"):
            if not first["loc"]:
                raise RequestError("the request body must be a JSON object", param="body") from exc
            param = ".".join(str(part) for part in first["loc"] if not _is_union_tag(part))
            raise RequestError(f"invalid '{param}': it must be a JSON object", param=param) from exc
        message, param = _describe(dict(first))
        raise RequestError(message, param=param) from exc


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; ``cached_tokens``: prompt tokens the worker did not read again."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def _envelope(
    object_name: str,
    request_id: str,
    created: int,
    model: str,
    choice: dict[str, Any] | None,
    counts: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The fields every completion object and chunk shares, around at most one choice."""
    body: dict[str, Any] = {
        "id": request_id,
        "object": object_name,
        "created": created,
        "model": model,
        "choices": [] if choice is None else [{"index": 0, **choice, "logprobs": None}],
    }
    if counts is not None:
        body["usage"] = counts
    return body


def chat_chunk(
    request_id: str, created: int, model: str, delta: dict[str, str], finish_reason: str | None = None
) -> dict[str, Any]:
    choice = {"delta": delta, "finish_reason": finish_reason}
    return _envelope("chat.completion.chunk", request_id, created, model, choice)


def completion_chunk(
    request_id: str, created: int, model: str, text: str, finish_reason: str | None = None
) -> dict[str, Any]:
    choice = {"text": text, "finish_reason": finish_reason}
    return _envelope("text_completion", request_id, created, model, choice)


def usage_chunk(object_name: str, request_id: str, created: int, model: str, counts: dict[str, Any]) -> dict[str, Any]:
    return _envelope(object_name, request_id, created, model, None, counts)


def chat_completion(
    request_id: str, created: int, model: str, text: str, finish_reason: str, counts: dict[str, Any]
) -> dict[str, Any]:
    choice = {"message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
    return _envelope("chat.completion", request_id, created, model, choice, counts)


def completion(
    request_id: str, created: int, model: str, text: str, finish_reason: str, counts: dict[str, Any]
) -> dict[str, Any]:
    choice = {"text": text, "finish_reason": finish_reason}
    return _envelope("text_completion", request_id, created, model, choice, counts)


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    """What ``usage()`` builds; the models below describe the answers for the OpenAPI schema."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class TextChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: None


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error shape, as ``error_body`` builds it; here for the OpenAPI schema."""

    error: ErrorDetail


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def dumps(payload: dict[str, Any]) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
