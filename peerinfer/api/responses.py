"""The Responses API (``POST /v1/responses``) for a text model: the request, and its chat equivalent. Pure.

A Responses request is served as the chat completion it means: ``parse_responses_request`` checks the
body field by field, ``to_chat_body`` writes the equivalent ``/v1/chat/completions`` body (so the one
chat path tokenises, constrains and samples it), and ``responses_error`` renames the fields of a
chat-path error back to the ones this client sent. The answer's encoders live in
``peerinfer.api.responses_output``.

Every field of OpenAI's request schema is honoured, accepted where it cannot change the answer, or
refused with a 400 that names it (``REFUSED`` says why, field by field). Unknown fields get a 400:
a client that sends a field must not get an answer that ignored it. Nothing is stored, so ``store:
true``, ``previous_response_id``, ``conversation`` and ``background: true`` are refused: a client
that relies on them would lose its conversation without noticing.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from peerinfer.errors import RequestError

M = TypeVar("M", bound=BaseModel)

MAX_METADATA_KEYS = 16  # OpenAI's limits on metadata
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
MAX_TOP_LOGPROBS = 20
LOGPROBS_INCLUDE = "message.output_text.logprobs"
TEXT_ONLY_PARTS = ("input_image", "input_file", "input_audio")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextConfig(_Strict):
    format: dict[str, Any] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class FormatText(_Strict):
    type: Literal["text"]


class FormatJsonObject(_Strict):
    type: Literal["json_object"]


class FormatJsonSchema(_Strict):
    type: Literal["json_schema"]
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    # ``schema`` would shadow a BaseModel method: the field is ``json_schema`` in Python, ``schema`` in JSON.
    json_schema: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


class StreamOptions(_Strict):
    include_obfuscation: bool | None = None


class ResponsesRequest(_Strict):
    """A ``POST /v1/responses`` body. Build it with ``parse_responses_request``, which also checks the
    input items, the tools and the fields this worker refuses."""

    # Honoured.
    model: str | None = None
    input: str | list[Any]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stream: bool | None = None
    text: TextConfig | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    include: list[str] | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # Not in OpenAI's schema: an extension, as on the chat endpoint, for reproducible sampling.
    seed: int | None = None

    # Accepted, and cannot change the answer: echoed or ignored, as the README says.
    metadata: dict[str, str] | None = None
    user: str | None = Field(default=None, max_length=256)
    safety_identifier: str | None = Field(default=None, max_length=256)
    prompt_cache_key: str | None = Field(default=None, max_length=256)
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    stream_options: StreamOptions | None = None
    max_tool_calls: int | None = Field(default=None, ge=1)  # built-in tools only, and there are none
    truncation: Literal["auto", "disabled"] | None = None
    service_tier: str | None = None
    reasoning: dict[str, Any] | None = None
    store: bool | None = None
    background: bool | None = None

    # Refused whenever set (see REFUSED).
    previous_response_id: Any = None
    conversation: Any = None
    prompt: Any = None
    context_management: Any = None
    moderation: Any = None
    image: Any = None
    access_programs: Any = None
    background_options: Any = None
    prompt_cache_options: Any = None

    _messages: list[dict[str, Any]] = PrivateAttr(default_factory=list)
    _origins: list[str] = PrivateAttr(default_factory=list)
    _format: dict[str, Any] | None = PrivateAttr(default=None)
    _tools: list[dict[str, Any]] = PrivateAttr(default_factory=list)

    @field_validator("metadata")
    @classmethod
    def _check_metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        if len(value) > MAX_METADATA_KEYS:
            raise ValueError(f"at most {MAX_METADATA_KEYS} keys are allowed, got {len(value)}")
        for key, item in value.items():
            if len(key) > MAX_METADATA_KEY_CHARS or len(item) > MAX_METADATA_VALUE_CHARS:
                raise ValueError(
                    f"keys may have at most {MAX_METADATA_KEY_CHARS} characters and values {MAX_METADATA_VALUE_CHARS}"
                )
        return value

    @property
    def wants_logprobs(self) -> bool:
        return self.top_logprobs is not None or LOGPROBS_INCLUDE in (self.include or ())

    @property
    def text_format(self) -> dict[str, Any]:
        """``text.format`` as checked (``{"type": "text"}`` when not given): what the Response echoes."""
        return self._format or {"type": "text"}

    @property
    def function_tools(self) -> list[dict[str, Any]]:
        """The tools as checked, in the Response's shape (every field of a function tool present)."""
        return self._tools


def _is_set(value: object) -> bool:
    return value is not None


def _is_true(value: object) -> bool:
    return value is True


def _reasons(value: object) -> bool:
    # {"effort": null} or {"effort": "none"}, as some clients send to every model, asks for no reasoning.
    return isinstance(value, dict) and any(item not in (None, "none") for item in value.values())


NO_STORAGE = "this worker stores no responses or conversations; send the whole conversation in 'input'"

# Field -> (does this value ask for something the worker does not do?, why it is refused).
REFUSED: dict[str, tuple[Callable[[object], bool], str]] = {
    "store": (_is_true, NO_STORAGE + " and leave 'store' out or set it to false"),
    "previous_response_id": (_is_set, NO_STORAGE),
    "conversation": (_is_set, NO_STORAGE),
    "prompt": (_is_set, "this worker stores no prompt templates; send the text in 'instructions' and 'input'"),
    "background": (_is_true, "this worker runs no background responses (they need storage); send stream: true"),
    "background_options": (_is_set, "this worker runs no background responses"),
    "truncation": (lambda value: value == "auto", "this worker never drops input; send 'disabled' or leave it out"),
    "reasoning": (_reasons, "this model does not reason; leave 'reasoning' out"),
    "service_tier": (
        lambda value: value not in (None, "auto", "default"),
        "this worker has one service tier; send 'auto' or 'default' or leave it out",
    ),
    "context_management": (_is_set, "this worker does not compact context"),
    "moderation": (_is_set, "this worker runs no moderation model"),
    "image": (_is_set, "this model takes text only"),
    "access_programs": (_is_set, "this worker has no access programs"),
    "prompt_cache_options": (
        _is_set,
        "the worker reuses cached prompt prefixes by itself and takes no options for it; leave it out",
    ),
}


def parse_responses_request(body: bytes) -> ResponsesRequest:
    """Validate a ``/v1/responses`` JSON body; anything wrong or not honoured is a ``RequestError`` naming it."""
    if not body.strip():
        raise RequestError("the request body is empty; send a JSON object", param="body")
    try:
        request = ResponsesRequest.model_validate_json(body, strict=True)
    except ValidationError as exc:
        raise _request_error(exc, "") from exc
    for name, (refuses, why) in REFUSED.items():
        if refuses(getattr(request, name)):
            raise RequestError(f"'{name}' is not supported: {why}", param=name)
    if request.text is not None:
        if request.text.verbosity is not None:
            raise RequestError(
                "'text.verbosity' is not supported: this worker cannot ask the model for shorter or longer text; "
                "use max_output_tokens or instructions",
                param="text.verbosity",
            )
        if request.text.format is not None:
            request._format = _check_format(request.text.format)
    for index, item in enumerate(request.include or ()):
        if item != LOGPROBS_INCLUDE:
            raise RequestError(
                f"'include' value {item!r} is not supported: the only one this worker has is '{LOGPROBS_INCLUDE}'",
                param=f"include.{index}",
            )
    request._tools = [_check_tool(tool, f"tools.{index}") for index, tool in enumerate(request.tools or ())]
    _check_tool_choice(request)
    request._messages, request._origins = _chat_messages(request)
    return request


def _describe_value(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _loc(prefix: str, loc: Sequence[int | str]) -> str:
    # pydantic puts the member of a union it tried into the location (``str``, ``list[any]``): not a field.
    parts = [str(part) for part in loc if not (isinstance(part, str) and (part in ("str", "int") or "[" in part))]
    return ".".join([prefix, *parts] if prefix else parts) or prefix or "body"


def _request_error(exc: ValidationError, prefix: str) -> RequestError:
    first = exc.errors(include_url=False)[0]
    kind, param = first["type"], _loc(prefix, first["loc"])
    if kind == "json_invalid":
        return RequestError(f"the request body is not valid JSON: {first['msg']}", param="body")
    if kind in ("model_type", "model_attributes_type", "dict_type") and param == "body":
        return RequestError("the request body must be a JSON object", param="body")
    if kind == "missing":
        return RequestError(f"'{param}' is required", param=param)
    if kind == "extra_forbidden":
        where = "" if "." not in param else f" in '{param.rsplit('.', 1)[0]}'"
        return RequestError(
            f"unknown field '{param.rsplit('.', 1)[-1]}'{where}: this worker's /v1/responses does not take it; "
            "remove it (the README lists the fields it honours)",
            param=param,
        )
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return RequestError(f"invalid '{param}': it must be a JSON object", param=param)
    if param == "input" and kind in ("string_type", "list_type"):
        return RequestError(
            f"invalid 'input': send a string or a list of input items (got {_describe_value(first.get('input'))})",
            param=param,
        )
    return RequestError(f"invalid '{param}': {first['msg']} (got {_describe_value(first.get('input'))})", param=param)


def _validate(model: type[M], data: object, param: str) -> M:
    if not isinstance(data, dict):
        raise RequestError(f"invalid '{param}': it must be a JSON object (got {_describe_value(data)})", param=param)
    try:
        return model.model_validate(data, strict=True)
    except ValidationError as exc:
        raise _request_error(exc, param) from exc


def _check_format(value: dict[str, Any]) -> dict[str, Any]:
    kind = value.get("type")
    if kind == "text":
        return _validate(FormatText, value, "text.format").model_dump()
    if kind == "json_object":
        return _validate(FormatJsonObject, value, "text.format").model_dump()
    if kind == "json_schema":
        checked = _validate(FormatJsonSchema, value, "text.format")
        return {
            "type": "json_schema",
            "name": checked.name,
            "schema": checked.json_schema,
            "description": checked.description,
            "strict": checked.strict,
        }
    raise RequestError(
        f"invalid 'text.format.type': {_describe_value(kind)}; send 'text', 'json_object' or 'json_schema'",
        param="text.format.type",
    )


class FunctionTool(_Strict):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None
    defer_loading: bool | None = None


def _check_tool(value: object, param: str) -> dict[str, Any]:
    kind = value.get("type") if isinstance(value, dict) else None
    if isinstance(value, dict) and kind != "function":
        raise RequestError(
            f"tool type {_describe_value(kind)} is not supported: this worker runs no built-in tools; "
            "offer your own as {'type': 'function', 'name': ..., 'parameters': ...}",
            param=f"{param}.type",
        )
    tool = _validate(FunctionTool, value, param)
    if tool.defer_loading:
        raise RequestError("'defer_loading' is not supported: every tool is offered at once", param=param)
    return {
        "type": "function",
        "name": tool.name,
        "description": tool.description,
        "parameters": tool.parameters,
        "strict": tool.strict,
    }


def _check_tool_choice(request: ResponsesRequest) -> None:
    choice = request.tool_choice
    names = {tool["name"] for tool in request.function_tools}
    if choice is None or choice in ("auto", "none"):
        return
    if choice == "required":
        if not names:
            raise RequestError("tool_choice is 'required' but no tools were given; add 'tools'", param="tool_choice")
        return
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = choice.get("name")
        if set(choice) != {"type", "name"} or not isinstance(name, str):
            raise RequestError("invalid 'tool_choice': send {'type': 'function', 'name': ...}", param="tool_choice")
        if name not in names:
            raise RequestError(
                f"tool_choice names the function {name!r}, which is not among 'tools'", param="tool_choice.name"
            )
        return
    raise RequestError(
        f"invalid 'tool_choice': {_describe_value(choice)}; send 'auto', 'none', 'required' or "
        "{'type': 'function', 'name': ...} (this worker runs no built-in tools)",
        param="tool_choice",
    )


class InputText(_Strict):
    type: Literal["input_text", "output_text"]
    text: str
    # Sent back by clients that pass a Response's output as input; they do not change the text.
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None
    prompt_cache_breakpoint: dict[str, Any] | None = None


class Refusal(_Strict):
    type: Literal["refusal"]
    refusal: str


class MessageItem(_Strict):
    type: Literal["message"] | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Any]
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    phase: Literal["commentary", "final_answer"] | None = None


class FunctionCallItem(_Strict):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class FunctionCallOutputItem(_Strict):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | list[Any]
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


def _part_text(part: object, param: str) -> str:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in TEXT_ONLY_PARTS:
        raise RequestError(
            f"content part type {kind!r} is not supported: this model takes text only; send 'input_text' parts",
            param=f"{param}.type",
        )
    if kind == "refusal":
        return _validate(Refusal, part, param).refusal
    if isinstance(part, dict) and kind not in ("input_text", "output_text"):
        raise RequestError(
            f"content part type {_describe_value(kind)} is not supported; send 'input_text' (or 'output_text')",
            param=f"{param}.type",
        )
    return _validate(InputText, part, param).text


def _content_text(content: str | list[Any], param: str) -> str:
    if isinstance(content, str):
        return content
    return "".join(_part_text(part, f"{param}.{index}") for index, part in enumerate(content))


def _chat_messages(request: ResponsesRequest) -> tuple[list[dict[str, Any]], list[str]]:
    """The chat messages a request means, and for each the field of the request it came from."""
    messages: list[dict[str, Any]] = []
    origins: list[str] = []
    if request.instructions is not None:
        messages.append({"role": "system", "content": request.instructions})
        origins.append("instructions")
    if isinstance(request.input, str):
        messages.append({"role": "user", "content": request.input})
        origins.append("input")
        return messages, origins
    if not request.input:
        raise RequestError("'input' must hold at least one item", param="input")
    for index, item in enumerate(request.input):
        param = f"input.{index}"
        kind = item.get("type") if isinstance(item, dict) else None
        if kind in (None, "message"):
            message = _validate(MessageItem, item, param)
            messages.append({"role": message.role, "content": _content_text(message.content, f"{param}.content")})
        elif kind == "function_call":
            call = _validate(FunctionCallItem, item, param)
            entry = {
                "id": call.call_id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and origins[-1] != "instructions":
                last.setdefault("tool_calls", []).append(entry)  # one assistant turn: its text and its calls
                continue
            messages.append({"role": "assistant", "content": None, "tool_calls": [entry]})
        elif kind == "function_call_output":
            result = _validate(FunctionCallOutputItem, item, param)
            output = _content_text(result.output, f"{param}.output")
            messages.append({"role": "tool", "tool_call_id": result.call_id, "content": output})
        elif kind == "item_reference":
            raise RequestError(f"input items of type 'item_reference' are not supported: {NO_STORAGE}", param=param)
        elif kind == "reasoning":
            raise RequestError(
                "input items of type 'reasoning' are not supported: this model does not reason", param=param
            )
        else:
            raise RequestError(
                f"input items of type {_describe_value(kind)} are not supported: this worker takes messages, "
                "function calls and function call outputs",
                param=f"{param}.type",
            )
        origins.append(param)
    return messages, origins


def to_chat_body(request: ResponsesRequest) -> dict[str, Any]:
    """The ``/v1/chat/completions`` body that asks for what ``request`` asks (only fields the chat path honours)."""
    body: dict[str, Any] = {"messages": copy.deepcopy(request._messages)}
    if request.model is not None:
        body["model"] = request.model
    optional = {
        "max_completion_tokens": request.max_output_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "seed": request.seed,
        "parallel_tool_calls": request.parallel_tool_calls,
    }
    body.update({name: value for name, value in optional.items() if value is not None})
    if request.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    form = request._format
    if form is not None and form["type"] == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif form is not None and form["type"] == "json_schema":
        schema = {key: form[key] for key in ("name", "schema", "description", "strict") if form[key] is not None}
        body["response_format"] = {"type": "json_schema", "json_schema": schema}
    if request.wants_logprobs:
        body["logprobs"] = True
        body["top_logprobs"] = request.top_logprobs or 0
    if request.function_tools:
        body["tools"] = [
            {
                "type": "function",
                "function": {key: value for key, value in tool.items() if key != "type" and value is not None},
            }
            for tool in request.function_tools
        ]
    choice = request.tool_choice
    if isinstance(choice, dict):
        body["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    elif choice is not None and (request.function_tools or choice == "none"):
        body["tool_choice"] = choice
    return body


_RENAMES: tuple[tuple[str, str], ...] = (
    ("max_completion_tokens", "max_output_tokens"),
    ("max_tokens", "max_output_tokens"),
    ("response_format.json_schema", "text.format"),
    ("response_format", "text.format"),
    ("logprobs", "top_logprobs"),
    ("stream_options.include_usage", "stream"),
    ("stream_options", "stream"),
    ("tool_choice.function", "tool_choice"),
)
_TOOL_FIELD = re.compile(r"^tools\.(\d+)\.function(\.|$)")
_MESSAGE_FIELD = re.compile(r"^messages\.(\d+)(\.|$)")


def responses_param(chat_param: str | None, request: ResponsesRequest) -> str | None:
    """The field of ``request`` that a chat-path error's ``param`` names."""
    if chat_param is None:
        return None
    match = _MESSAGE_FIELD.match(chat_param)
    if match is not None:
        index = int(match.group(1))
        origin = request._origins[index] if index < len(request._origins) else "input"
        rest = chat_param[match.end(1) :]
        return origin if origin == "instructions" or rest.startswith(".tool_calls") else origin + rest
    if chat_param == "messages":
        return "input"
    tool = _TOOL_FIELD.match(chat_param)
    if tool is not None:
        return f"tools.{tool.group(1)}" + chat_param[tool.end(1) + len(".function") :]
    for old, new in _RENAMES:
        if chat_param == old or chat_param.startswith(old + "."):
            return new + chat_param[len(old) :]
    return chat_param


def responses_error(exc: RequestError, request: ResponsesRequest) -> RequestError:
    """``exc`` (from the chat path) naming the fields this client sent, with its class and code kept."""
    param = responses_param(exc.param, request)
    if param == exc.param:
        return exc
    renamed = copy.copy(exc)
    message = exc.message
    if exc.param:
        message = re.sub(rf"(?<![\w.]){re.escape(exc.param)}(?![\w])", param or "", message)
    base = (exc.param or "").split(".")[0]
    if base in ("max_tokens", "max_completion_tokens"):
        message = re.sub(r"\bmax_(completion_)?tokens\b", "max_output_tokens", message)
    renamed.message, renamed.param, renamed.args = message, param, (message,)
    return renamed
