"""Rendering a model's Jinja chat template with what clients wrote kept apart from its markup. Pure.

Only markup may become control tokens. A message that says ``<end_of_turn>`` or ``<eos>`` must
reach the model as those characters, never as the control token: otherwise whoever writes a
message can end its turn and write the model's or the system's turns (a forged turn). So a
template is rendered twice: once with what clients wrote, and once with a random placeholder in
place of each string a client wrote: messages' text, names, tool calls' ids, names and arguments,
and every string of the ``tools`` definitions (descriptions, property names, enum values). The
placeholder render holds nothing a client wrote (but JSON Schema's and OpenAI's own key words,
kept so that templates can read ``tool.function.parameters``); where the real render is that
markup with each string (verbatim, with its ends' whitespace trimmed, or escaped as JSON) in the
placeholders' places, those ranges are text and the rest is markup. A template that changes a
string in any other way (upper-casing it, cutting it up) is refused with a 400 rather than guessed
at; so is one that leaves out a message's text or name, which would be silently ignored.

The environment is Hugging Face's for chat templates: sandboxed, ``trim_blocks`` and
``lstrip_blocks``, loop controls, its ``tojson``, ``raise_exception`` and ``strftime_now``.
"""

from __future__ import annotations

import functools
import json
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from jinja2 import Template, TemplateError, TemplateRuntimeError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from peerinfer.engine.chat_types import HERMES_TOOL_SYNTAX, ChatTurn, PromptPart, ToolSyntax
from peerinfer.errors import RequestError

# Deeper tools or arguments are refused: a few levels are all a real schema needs, and each renders recursively.
MAX_JSON_DEPTH = 32
# A template's own end-of-turn markup, as a stop: at most this many, each at most this long.
_MAX_TEMPLATE_STOPS = 2
_MAX_TEMPLATE_STOP_CHARS = 64


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """Hugging Face's ``tojson`` for chat templates (Jinja's own escapes ``<`` and sorts keys):
    models were trained on this one's output."""
    try:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    except (TypeError, ValueError) as exc:
        raise TemplateRuntimeError(f"tojson: {exc}") from exc


@functools.lru_cache(maxsize=4)
def compile_template(template: str) -> Template:
    """A chat template, compiled once (~13 ms for Gemma's) rather than on every request.

    Raises ``jinja2.TemplateError`` (a ``TemplateSyntaxError``) for a template that does not compile.
    """
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    environment.filters["tojson"] = _tojson
    return environment.from_string(template)


def _variables(bos_token: str, eos_token: str) -> dict[str, Any]:
    """What templates read besides messages and tools; one clock for both renders."""
    return {"bos_token": bos_token, "eos_token": eos_token, "strftime_now": datetime.now().strftime}


def _raise_from_template(message: str) -> None:
    raise RequestError(f"the model's chat template rejected the messages: {message}", param="messages")


def _variants(text: str) -> list[str]:
    """How a template may write a client's string: as it is, with the whitespace at its ends trimmed,
    or escaped inside a JSON (or Python) string literal."""
    forms = [text, text.strip(), text.lstrip(), text.rstrip(), text.strip("\n"), text.lstrip("\n"), text.rstrip("\n")]
    forms += [json.dumps(text, ensure_ascii=False)[1:-1], json.dumps(text)[1:-1], repr(text)[1:-1]]
    return list(dict.fromkeys(forms))


@dataclass(frozen=True)
class _Step:
    """One message's text placed in the real render, linked to the steps before it."""

    text: str
    before: _Step | None


def _trace(markups: Sequence[str], owners: Sequence[int], contents: Sequence[str], text: str) -> list[str] | None:
    """The messages' texts as written in ``text`` = markups[0] + written[0] + markups[1] + ... + markups[-1].

    Each ``written[k]`` is a variant of ``contents[owners[k]]``; None if no choice gives ``text``.
    A depth-first search over (placeholder, position), each state tried once: linear in the messages.
    """
    stack: list[tuple[int, int, _Step | None]] = [(0, 0, None)]
    seen: set[tuple[int, int]] = set()
    while stack:
        index, position, step = stack.pop()
        if not text.startswith(markups[index], position):
            continue
        position += len(markups[index])
        if index == len(owners):
            if position != len(text):
                continue
            written: list[str] = []
            while step is not None:
                written.append(step.text)
                step = step.before
            return written[::-1]
        for variant in reversed(_variants(contents[owners[index]])):
            state = (index + 1, position + len(variant))
            if state not in seen and text.startswith(variant, position):
                seen.add(state)
                stack.append((*state, _Step(variant, step)))
    return None


# Kept as they are in the placeholder render, so that a template can read them: the keys of OpenAI's tool
# definitions and of JSON Schema, and JSON Schema's type names. Everything else a client wrote is a placeholder.
_KEY_WORDS = frozenset(
    [
        "type",
        "function",
        "name",
        "description",
        "parameters",
        "strict",
        "properties",
        "required",
        "items",
        "enum",
        "const",
        "default",
        "title",
        "anyOf",
        "oneOf",
        "allOf",
        "not",
        "$ref",
        "$defs",
        "definitions",
        "additionalProperties",
        "patternProperties",
        "prefixItems",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        "minLength",
        "maxLength",
        "pattern",
        "format",
        "minItems",
        "maxItems",
        "uniqueItems",
        "minProperties",
        "maxProperties",
        "nullable",
        "examples",
    ]
)
_VALUE_WORDS = frozenset(["function", "object", "string", "integer", "number", "boolean", "array", "null"])

Write = Callable[[str], str]


class _ClientStrings:
    """Every distinct string a client wrote, numbered in order of first use (equal strings, one number:
    so that a template comparing two of them, a property's name with ``required``, sees them equal
    in both renders)."""

    def __init__(self) -> None:
        self.numbers: dict[str, int] = {}

    def number(self, text: str) -> int:
        return self.numbers.setdefault(text, len(self.numbers))

    @property
    def texts(self) -> list[str]:
        return list(self.numbers)


def _json_value(value: Any, write: Write, param: str, depth: int = 0) -> Any:
    """``value`` (parsed JSON) with each string a client chose passed through ``write``."""
    if depth > MAX_JSON_DEPTH:
        raise RequestError(f"{param} nests deeper than {MAX_JSON_DEPTH} levels; flatten it", param=param)
    if isinstance(value, str):
        return value if value in _VALUE_WORDS else write(value)
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise RequestError(f"{param} has a key that is not a string: {key!r}", param=param)
            out[key if key in _KEY_WORDS else write(key)] = _json_value(item, write, param, depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [_json_value(item, write, param, depth + 1) for item in value]
    if value is None or isinstance(value, (bool, int, float)):
        return value
    raise RequestError(f"{param} holds a value that is not JSON: {type(value).__name__}", param=param)


def _arguments(arguments: str, write: Write) -> Any:
    """A tool call's arguments as Hugging Face templates take them: a dict when the text is a JSON
    object (Qwen's and Hermes' templates write ``arguments | tojson``), else the text itself."""
    try:
        parsed = json.loads(arguments)
    except (ValueError, RecursionError):
        return write(arguments)
    if not isinstance(parsed, dict):
        return write(arguments)
    return _json_value(parsed, write, "messages")


def _messages(turns: Sequence[ChatTurn], write: Write) -> list[dict[str, Any]]:
    """The turns as OpenAI-shaped message dicts, as chat templates read them."""
    messages: list[dict[str, Any]] = []
    for turn in turns:
        message: dict[str, Any] = {"role": turn.role, "content": write(turn.content)}
        if turn.name:  # an empty name is no name
            message["name"] = write(turn.name)
        if turn.tool_calls:
            message["tool_calls"] = [
                {
                    "id": write(call.id),
                    "type": "function",
                    "function": {"name": write(call.name), "arguments": _arguments(call.arguments, write)},
                }
                for call in turn.tool_calls
            ]
        if turn.tool_call_id is not None:
            message["tool_call_id"] = write(turn.tool_call_id)
        messages.append(message)
    return messages


def _stand_ins(strings: Sequence[str], template: str) -> tuple[str, list[str]]:
    """A fresh random tag, and each string's stand-in (a whitespace-only string stands for itself)."""
    while True:
        tag = f"{secrets.randbelow(10**18):018d}"  # digits: a template that changes letters' case keeps it
        if tag not in template and not any(tag in text for text in strings):
            break
    return tag, [f"[[{tag}:{index}]]" if text.strip() else text for index, text in enumerate(strings)]


@dataclass(frozen=True)
class _Rendered:
    markups: list[str]  # markups[0], then the markup after each placed string
    owners: list[int]  # which client string each place holds
    written: list[str]  # how it is written there
    strings: list[str]  # the client strings, by number


def _render_both(
    turns: Sequence[ChatTurn],
    template: str,
    tools: Sequence[Mapping[str, Any]] | None,
    variables: Mapping[str, Any],
    add_generation_prompt: bool,
) -> _Rendered:
    """Renders the template with the clients' strings and with their stand-ins, and traces one in the other."""
    strings = _ClientStrings()

    def real(text: str) -> str:
        strings.number(text)
        return text

    def render(compiled: Template, write: Write) -> str:
        return compiled.render(
            messages=_messages(turns, write),
            tools=None if tools is None else _json_value(list(tools), write, "tools"),
            add_generation_prompt=add_generation_prompt,
            raise_exception=_raise_from_template,
            **variables,
        )

    try:
        compiled = compile_template(template)
        text = render(compiled, real)
        tag, stand_ins = _stand_ins(strings.texts, template)
        marked = render(compiled, lambda text: stand_ins[strings.numbers[text]])
    except RequestError:
        raise
    except Exception as exc:  # a template is foreign code: whatever it raises is this request's 400
        why = str(exc) if isinstance(exc, TemplateError) else f"{type(exc).__name__}: {exc}"
        raise RequestError(f"the model's chat template failed: {why}", param="messages") from exc
    pieces = re.split(rf"\[\[{tag}:(\d+)\]\]", marked)
    markups, owners = pieces[0::2], [int(owner) for owner in pieces[1::2]]
    written = _trace(markups, owners, strings.texts, text)
    if written is None:
        raise RequestError(
            "the model's chat template changes the text of a message (or of a tool definition) in a way other "
            "than trimming the whitespace at its ends or escaping it as JSON, so peerinfer cannot keep what the "
            "client wrote apart from the template's markup (and will not risk reading it as control tokens); "
            "change the text, or use a model whose template writes messages as they are",
            param="messages",
        )
    return _Rendered(markups, owners, written, strings.texts)


def _check_written(turns: Sequence[ChatTurn], rendered: _Rendered) -> None:
    """Refuses a message whose text or name the template leaves out: it would be silently ignored."""
    placed = {rendered.strings[owner] for owner in rendered.owners}
    for index, turn in enumerate(turns):
        fields = [("text", turn.content), ("name", turn.name)]
        fields += [("tool call", call.name) for call in turn.tool_calls]
        for what, value in fields:
            if value is not None and value.strip() and value not in placed:
                raise RequestError(
                    f"the model's chat template leaves out the {what} of messages[{index}] (a {turn.role} "
                    f"message), so it would be silently ignored; drop it, or set PEERINFER_CHAT_TEMPLATE on the "
                    "worker to a template that writes it",
                    param="messages",
                )


def render_template(
    turns: Sequence[ChatTurn],
    template: str,
    *,
    bos_token: str,
    eos_token: str,
    tools: Sequence[Mapping[str, Any]] | None,
    continue_final: bool,
) -> list[PromptPart]:
    """The template's render as parts: markup, and the clients' strings as written (text).

    ``continue_final``: no generation prompt, and the render ends with the final message's text.
    """
    variables = _variables(bos_token, eos_token)
    rendered = _render_both(turns, template, tools, variables, not continue_final)
    _check_written(turns, rendered)
    markups, written = rendered.markups, rendered.written
    if continue_final:
        final = turns[-1].content
        places = [index for index, owner in enumerate(rendered.owners) if rendered.strings[owner] == final]
        if not final or not places or written[places[-1]] != final:
            raise RequestError(
                "continue_final_message: the chat template does not keep the final assistant message "
                "verbatim, so it cannot be continued",
                param="messages",
            )
        markups, written = [*markups[: places[-1] + 1], ""], written[: places[-1] + 1]
    parts = [PromptPart(markups[0], markup=True)]
    for message_text, markup in zip(written, markups[1:], strict=True):
        parts += [PromptPart(message_text, markup=False), PromptPart(markup, markup=True)]
    return parts


_PROBE_TOOL = {
    "type": "function",
    "function": {
        "name": "peerinfer_probe",
        "description": "probe",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string", "description": "probe"}},
            "required": ["query"],
        },
    },
}


@functools.lru_cache(maxsize=8)
def template_supports_tools(template: str) -> bool:
    """Whether a chat template writes ``tools``: it names them, and a tool changes what it renders."""
    if "tools" not in template:
        return False
    try:
        compiled = compile_template(template)
    except TemplateError:
        return False

    def render(tools: list[dict[str, Any]] | None) -> str | None:
        try:
            return compiled.render(
                messages=[{"role": "user", "content": "x"}],
                tools=tools,
                add_generation_prompt=True,
                raise_exception=_raise_from_template,
                **_variables("", ""),
            )
        except Exception:  # a template is foreign code: one that fails here writes no tools
            return None

    with_tools = render([_PROBE_TOOL])
    return with_tools is not None and with_tools != render(None)


def template_tool_syntax(template: str) -> ToolSyntax | None:
    """How the model of this template writes tool calls, when peerinfer knows the template's style."""
    if HERMES_TOOL_SYNTAX.start in template and HERMES_TOOL_SYNTAX.end in template:
        return HERMES_TOOL_SYNTAX
    return None


@functools.lru_cache(maxsize=8)
def template_stops(template: str, bos_token: str, eos_token: str) -> tuple[str, ...]:
    """The template's own end of an assistant turn, as stop strings: each line of the markup between an
    assistant message and the next user message (zephyr's ``</s>`` and ``<|user|>``, ChatML's
    ``<|im_end|>``). A control token there ends the answer as a token anyway; these catch a model
    that writes the markup as plain text (a turn marker that is not a control token in its vocabulary)."""
    turns = [ChatTurn("user", "Hi."), ChatTurn("assistant", "Hello."), ChatTurn("user", "Bye.")]
    try:
        rendered = _render_both(turns, template, None, _variables(bos_token, eos_token), True)
    except RequestError:
        return ()
    places = [rendered.strings[owner] for owner in rendered.owners]
    if places != ["Hi.", "Hello.", "Bye."]:
        return ()
    lines = (line.strip() for line in rendered.markups[2].splitlines())
    stops = [line for line in lines if len(line) >= 2 and len(line) <= _MAX_TEMPLATE_STOP_CHARS]
    return tuple(dict.fromkeys(stops))[:_MAX_TEMPLATE_STOPS]
