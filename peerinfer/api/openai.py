"""OpenAI request models for /v1/chat/completions and /v1/completions, and the helpers every answer shares.

Requests are validated strictly (a string is not an int) and completely: a field this worker does not
know is refused with a 400 that names it, and so is a field of OpenAI's schema it does not honour (see
``REFUSED_FIELDS``), because a client that asked for something and silently did not get it is worse
off than one told no. Fields that change nothing about the answer and that real clients send
(``user``, ``metadata``, ``service_tier: "auto"``, ``store: false``, ...) are accepted; the README
lists every field, honoured or refused. Checks that need the loaded model (``n`` against the slots,
``logit_bias`` ids against the vocabulary) are the serving code's.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from peerinfer.engine.base import ModelInfo
from peerinfer.errors import RequestError

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions

M = TypeVar("M", bound=BaseModel)
Role = Literal["system", "developer", "user", "assistant", "tool"]
MAX_STOPS = 4
MAX_STOP_CHARS = 200
MAX_TOP_LOGPROBS = 20  # OpenAI's bound for chat; completions get the same (OpenAI's legacy bound is 5)
MAX_LOGIT_BIAS = 300  # OpenAI's bound on the entries of logit_bias
MAX_TOOLS = 128
MAX_N = 64  # the largest PEERINFER_SLOTS; the serving code checks n against the slots really there
TEXT_ONLY_PARTS = ("image_url", "input_audio", "file", "input_image", "input_file")
_SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_TOKEN_ID = re.compile(r"0|[1-9][0-9]{0,9}")

# Fields of OpenAI's request schemas this worker does not do, and what to do instead.
REFUSED_FIELDS: dict[str, str] = {
    "audio": "this model takes and writes text only; remove 'audio'",
    "prediction": "predicted outputs are not supported; remove 'prediction'",
    "reasoning_effort": "this model does not reason before it answers; remove 'reasoning_effort'",
    "reasoning": "this model does not reason before it answers; remove 'reasoning'",
    "verbosity": "this worker cannot set the verbosity of an answer; remove 'verbosity' and say it in a message",
    "web_search_options": "this worker cannot search the web; remove 'web_search_options'",
    "functions": "'functions' is OpenAI's deprecated form of tools; send 'tools' instead",
    "function_call": "'function_call' is OpenAI's deprecated form of tool calls; send 'tools' and 'tool_choice'",
    "suffix": "inserting text before a suffix is not supported; remove 'suffix' (or put the text in the prompt)",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ContentPart(BaseModel):
    """One part of a message's content. Only ``text`` parts are read; the others are refused by name."""

    model_config = ConfigDict(extra="allow", strict=True)

    type: str
    text: str | None = None


class ToolCallFunction(_Strict):
    name: str = Field(max_length=256)
    arguments: str


class MessageToolCall(_Strict):
    """A tool call an earlier assistant message made."""

    id: str = Field(max_length=256)
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Strict):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = Field(default=None, max_length=256)
    tool_calls: list[MessageToolCall] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_call_id: str | None = Field(default=None, max_length=256)
    refusal: str | None = None

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content)


class StreamOptions(_Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # OpenAI pads chunks against length side channels; nothing to pad here


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str = Field(max_length=64)


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Strict):
    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingFields(_Strict):
    """What both endpoints take. ``None`` stands for "not sent" (clients send ``null`` for defaults)."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=1000)  # an extension, as in llama-server and vLLM
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    # Accepted, no effect on the answer.
    user: str | None = Field(default=None, max_length=512)
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    store: bool | None = None
    prompt_cache_key: str | None = Field(default=None, max_length=512)
    safety_identifier: str | None = Field(default=None, max_length=512)

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

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return None
        if len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} tokens may be biased, got {len(value)}")
        for key, bias in value.items():
            if not _TOKEN_ID.fullmatch(key):
                raise ValueError(f"keys must be token ids written as decimal strings, got {key[:40]!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"each bias must be from -100 to 100, got {bias} for token {key}")
        return value

    @field_validator("metadata")
    @classmethod
    def _check_metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and (len(value) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in value.items())):
            raise ValueError("at most 16 pairs, keys of at most 64 and values of at most 512 characters")
        return value

    @model_validator(mode="after")
    def _check_no_effect_fields(self) -> SamplingFields:
        if self.service_tier not in (None, "auto", "default"):
            raise RequestError(
                f"service_tier {self.service_tier[:40]!r} is not offered: this worker has one tier; send 'auto' "
                "or 'default', or leave it out",
                param="service_tier",
            )
        if self.store:
            raise RequestError(
                "this worker keeps no answers (no server-side storage); send store: false or leave it out",
                param="store",
            )
        return self

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and bool(self.stream_options.include_usage)

    @property
    def choices(self) -> int:
        return self.n or 1

    @property
    def biases(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(key), bias) for key, bias in (self.logit_bias or {}).items())


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    # An extension (vLLM's name): continue the last assistant message instead of starting a new one.
    continue_final_message: bool = False
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    modalities: list[str] | None = None

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        for index, message in enumerate(self.messages):
            _check_message(message, index)
        if not self.continue_final_message and [message.role for message in self.messages[-2:]] == ["assistant"] * 2:
            raise RequestError(
                "the conversation ends with two assistant messages; merge them into one, or set "
                "continue_final_message: true to continue the last one",
                param="messages",
            )
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError(
                "top_logprobs needs logprobs: true; send both, or leave top_logprobs out", param="top_logprobs"
            )
        if self.modalities is not None and self.modalities != ["text"]:
            raise RequestError(
                f'this model writes text only; send modalities: ["text"] or leave it out (got {self.modalities!r:.60})',
                param="modalities",
            )
        _check_response_format(self.response_format)
        if self.tool_choice is not None and not self.tools and self.tool_choice != "none":
            raise RequestError(
                "tool_choice needs tools; send the tools it may call, or leave it out", param="tool_choice"
            )
        if isinstance(self.tool_choice, NamedToolChoice) and self.tools:
            names = [tool.function.name for tool in self.tools]
            if self.tool_choice.function.name not in names:
                raise RequestError(
                    f"tool_choice names {self.tool_choice.function.name!r}, which is not among the tools {names}",
                    param="tool_choice",
                )
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def logprobs_top(self) -> int | None:
        """``SamplingParams.logprobs``: None for none, else how many alternatives each token gets."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def uses_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    # An extension (llama-server's name): read ``<eos>``-like text in the prompt as control tokens.
    parse_special: bool = False
    echo: bool | None = None
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)
    # An extension (vLLM takes it on completions too): JSON mode and JSON schemas for a raw prompt.
    response_format: ResponseFormat | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_prompt(cls, value: object) -> object:
        if isinstance(value, list) and value and not all(isinstance(item, str) for item in value):
            raise ValueError("a prompt of token ids is not supported; send the prompt as text")
        return value

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError(f"exactly one prompt is supported per request, got {len(value)}")
        return value

    @model_validator(mode="after")
    def _check_completion(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.choices:
            raise RequestError(
                f"best_of {self.best_of} with n {self.choices}: this worker returns every answer it generates and "
                "does not rank them; leave best_of out (or make it equal to n)",
                param="best_of",
            )
        if self.echo and self.logprobs is not None:
            raise RequestError(
                "echo with logprobs would need the prompt's log-probabilities, which this worker does not compute; "
                "drop one of them",
                param="echo",
            )
        _check_response_format(self.response_format)
        return self

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


def _check_message(message: ChatMessage, index: int) -> None:
    where = f"messages.{index}"
    if isinstance(message.content, list):
        for number, part in enumerate(message.content):
            param = f"{where}.content.{number}"
            if part.type in TEXT_ONLY_PARTS:
                raise RequestError(
                    f"this model takes text only: '{param}' is a part of type {part.type!r}; send text parts, "
                    "or use a worker whose model reads that",
                    param=param,
                )
            if part.type != "text":
                raise RequestError(
                    f"'{param}' has type {part.type[:40]!r}; this model takes text parts ({{'type': 'text', "
                    "'text': ...}}) only",
                    param=param,
                )
            if part.text is None:
                raise RequestError(f"'{param}.text' is required in a text part", param=f"{param}.text")
            if part.model_extra:
                extra = sorted(part.model_extra)[0]
                raise RequestError(
                    f"'{param}.{extra}' is not a field of a text part; remove it", param=f"{param}.{extra}"
                )
    if message.tool_calls is not None and message.role != "assistant":
        raise RequestError(
            f"only assistant messages make tool calls, this one is '{message.role}'", param=f"{where}.tool_calls"
        )
    if message.role == "tool" and not message.tool_call_id:
        raise RequestError(
            "a tool message needs the tool_call_id of the call it answers", param=f"{where}.tool_call_id"
        )
    if message.tool_call_id is not None and message.role != "tool":
        raise RequestError(
            f"only tool messages answer a tool call, this one is '{message.role}'", param=f"{where}.tool_call_id"
        )
    if message.refusal is not None and message.role != "assistant":
        raise RequestError(
            f"only assistant messages carry a refusal, this one is '{message.role}'", param=f"{where}.refusal"
        )


def _check_response_format(response_format: ResponseFormat | None) -> None:
    if response_format is None:
        return
    if response_format.type == "json_schema":
        if response_format.json_schema is None:
            raise RequestError(
                "response_format of type json_schema needs 'json_schema': {'name': ..., 'schema': {...}}",
                param="response_format.json_schema",
            )
        if not _SCHEMA_NAME.fullmatch(response_format.json_schema.name):
            raise RequestError(
                "response_format.json_schema.name must be 1 to 64 letters, digits, '_' or '-'",
                param="response_format.json_schema.name",
            )
    elif response_format.json_schema is not None:
        raise RequestError(
            f"response_format.json_schema goes with type json_schema, not {response_format.type}",
            param="response_format.json_schema",
        )


def _is_union_tag(part: object) -> bool:
    """pydantic puts the union member it tried into the location (``str``, ``list[TextPart]``)."""
    return isinstance(part, str) and (
        part in ("str", "int", "float", "bool", "none") or "[" in part or part.endswith(("Choice", "Part"))
    )


def _describe(error: dict[str, Any]) -> tuple[str, str]:
    param = ".".join(str(part) for part in error["loc"] if not _is_union_tag(part))
    kind = error["type"]
    if kind == "json_invalid":
        return f"the request body is not valid JSON: {error['msg']}", "body"
    if kind == "missing":
        return f"'{param}' is required", param
    if kind == "extra_forbidden":
        name = str(error["loc"][-1])
        reason = REFUSED_FIELDS.get(name) if len(error["loc"]) == 1 or name in ("audio", "function_call") else None
        if reason is not None:
            return f"'{param}' is not supported: {reason}", param
        return f"'{param}' is not a field this worker knows; remove it (the README lists every field)", param
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
        # An unknown field says more than the errors it causes elsewhere (a refused field first).
        first = next((error for error in errors if error["type"] == "extra_forbidden"), errors[0])
        if first["type"] in ("model_type", "model_attributes_type", "dict_type"):
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


def system_fingerprint(info: ModelInfo) -> str:
    """Which weights and which engine build wrote an answer: the same for as long as both stay the same."""
    return "fp_" + hashlib.sha256(f"{info.sha256}:{info.build}".encode()).hexdigest()[:12]


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; ``cached_tokens``: prompt tokens the worker did not read again."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def dumps(payload: dict[str, Any]) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    """What ``usage()`` builds; the models below describe the answers for the OpenAPI schema."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprobEntry(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class LogprobEntry(TopLogprobEntry):
    top_logprobs: list[TopLogprobEntry]


class ChatLogprobs(BaseModel):
    content: list[LogprobEntry]
    refusal: None


class AnswerToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: ToolCallFunction


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    refusal: None = None
    tool_calls: list[AnswerToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "tool_calls"]
    logprobs: ChatLogprobs | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class LegacyLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class TextChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: LegacyLogprobs | None


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str
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
