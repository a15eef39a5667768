"""Tool calls: reading them out of a model's text, and forcing one with a grammar. Pure, no I/O.

A model that was trained with tools writes a call as text in its chat format's syntax (Hermes and
Qwen: ``<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>``). Two things make reading that
from a stream wrong when done naively:

- the start marker may be split over several deltas (``<tool`` then ``_call>``): text that may be
  its beginning is held back until it is known not to be, as ``text.TextAssembler`` holds back a
  stop string's beginning;
- what the model wrote inside the markers may not be a call at all (bad JSON, an unknown function):
  it is then shown as the text it is, never dropped and never a crash.

The whitespace on the side of a call (the newline before ``<tool_call>``, between two calls) is
layout, not an answer: it is dropped. Without a marker the text comes out exactly as it went in,
however it is cut into deltas.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any

from peerinfer.engine.chat_types import ToolCall, ToolSyntax
from peerinfer.engine.text import held_back_suffix_length
from peerinfer.errors import RequestError

ToolChoice = str | Mapping[str, Any] | None
JsonGrammar = Callable[[Mapping[str, Any] | None], str]


def new_tool_call_id() -> str:
    """A fresh id in OpenAI's style: ``call_`` and 24 random hex digits."""
    return "call_" + secrets.token_hex(12)


class ToolCallParser:
    """Feeds an answer's text deltas in; gets the text to show and the complete tool calls out.

    ``names``: the functions the request offered; a call of any other is shown as text. ``feed`` and
    ``finish`` return ``(text, calls)``; ``finish`` flushes what was held back (an unfinished call
    is text). ``calls`` counts the calls made so far (finish reason ``tool_calls`` when above 0).
    """

    def __init__(
        self,
        syntax: ToolSyntax,
        names: Collection[str] | None = None,
        new_id: Callable[[], str] = new_tool_call_id,
    ) -> None:
        self._syntax = syntax
        self._names = None if names is None else frozenset(names)
        self._new_id = new_id
        self._outside = ""  # held back outside a call: a possible start marker, and trailing whitespace
        self._inside: str | None = None  # what a call holds so far; None outside a call
        self._space = ""  # the whitespace before the current call's marker, shown if it is no call
        self._after_call = False  # nothing but whitespace since the last call
        self.calls = 0

    def feed(self, delta: str) -> tuple[str, tuple[ToolCall, ...]]:
        start, end = self._syntax.start, self._syntax.end
        shown: list[str] = []
        calls: list[ToolCall] = []
        text = delta
        while True:
            if self._inside is None:
                buffer, self._outside = self._outside + text, ""
                at = buffer.find(start)
                if at < 0:
                    visible = buffer[: len(buffer) - held_back_suffix_length(buffer, (start,))]
                    before = visible.rstrip()
                    shown.append(self._show(before))
                    self._outside = buffer[len(before) :]
                    break
                before = buffer[:at].rstrip()
                shown.append(self._show(before))
                self._space = buffer[len(before) : at]
                self._inside, text = "", buffer[at + len(start) :]
            else:
                buffer = self._inside + text
                at = buffer.find(end)
                if at < 0:
                    self._inside = buffer
                    break
                body, text, self._inside = buffer[:at], buffer[at + len(end) :], None
                call = self._parse(body)
                if call is None:
                    shown.append(self._show(self._space + start + body + end))
                else:
                    calls.append(call)
                    self.calls += 1
                    self._after_call = True
                self._space = ""
        return "".join(shown), tuple(calls)

    def finish(self) -> tuple[str, tuple[ToolCall, ...]]:
        if self._inside is not None:
            text = self._show(self._space + self._syntax.start + self._inside)
        else:
            text = self._show(self._outside)
        self._inside, self._outside, self._space = None, "", ""
        return text, ()

    def _show(self, text: str) -> str:
        if self._after_call:
            text = text.lstrip()
            self._after_call = not text
        return text

    def _parse(self, body: str) -> ToolCall | None:
        try:
            call = json.loads(body)
        except (ValueError, RecursionError):
            return None
        if not isinstance(call, dict):
            return None
        name = call.get(self._syntax.name_key)
        arguments = call.get(self._syntax.arguments_key, {})
        if not isinstance(name, str) or (self._names is not None and name not in self._names):
            return None
        if isinstance(arguments, str):
            try:
                parsed = json.loads(arguments)
            except (ValueError, RecursionError):
                return None
            if not isinstance(parsed, dict):
                return None
            text = arguments
        elif isinstance(arguments, dict):
            text = json.dumps(arguments, ensure_ascii=False)
        else:
            return None
        return ToolCall(self._new_id(), name, text)


def function_names(tools: Sequence[Mapping[str, Any]]) -> list[str]:
    """The names of the offered functions; a 400 (``param="tools"``) for a tool that is not a named function."""
    names: list[str] = []
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(tool, Mapping) or tool.get("type") != "function" or not isinstance(name, str) or not name:
            raise RequestError(
                f'tools[{index}] must be {{"type": "function", "function": {{"name": ..., "parameters": {{...}}}}}}',
                param="tools",
            )
        if name in names:
            raise RequestError(f"tools[{index}]: a function named {name!r} is offered twice", param="tools")
        names.append(name)
    return names


def _chosen(tools: Sequence[Mapping[str, Any]], tool_choice: ToolChoice) -> list[str] | None:
    """The functions one of which must be called; None: the model may answer in text."""
    names = function_names(tools)
    if tool_choice is None or tool_choice in ("auto", "none"):
        return None
    if not tools:
        raise RequestError(f"tool_choice {tool_choice!r} needs tools; offer some, or drop it", param="tool_choice")
    if tool_choice == "required":
        return names
    function = tool_choice.get("function") if isinstance(tool_choice, Mapping) else None
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(tool_choice, Mapping) or tool_choice.get("type") != "function" or not isinstance(name, str):
        raise RequestError(
            'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}',
            param="tool_choice",
        )
    if name not in names:
        raise RequestError(
            f"tool_choice names the function {name!r}, which tools do not offer (they offer {', '.join(names)})",
            param="tool_choice",
        )
    return [name]


def tools_to_render(
    tools: Sequence[Mapping[str, Any]] | None, tool_choice: ToolChoice
) -> list[Mapping[str, Any]] | None:
    """The tools to give the chat template (``render_chat(tools=...)``): none for ``tool_choice: "none"``.

    Checks ``tools`` and ``tool_choice`` (a 400 naming the field), so call it before rendering.
    """
    if not tools:
        _chosen((), tool_choice)
        return None
    _chosen(tools, tool_choice)
    return None if tool_choice == "none" else list(tools)


def tool_call_grammar(
    syntax: ToolSyntax,
    tools: Sequence[Mapping[str, Any]],
    tool_choice: ToolChoice,
    json_grammar: JsonGrammar,
) -> str | None:
    """GBNF (rule ``root``) that forces one call of a function ``tool_choice`` allows, or None.

    ``"required"``: any offered function; ``{"type": "function", "function": {"name": n}}``: ``n``;
    ``"auto"``, ``"none"`` or None: no grammar. The call is ``start``, ``pad``, a JSON object with
    the function's name and arguments that match its ``parameters`` schema, ``pad``, ``end``.
    ``json_grammar``: the engine's ``Engine.json_grammar`` (a 400 for a schema it cannot express).
    """
    chosen = _chosen(tools, tool_choice)
    if chosen is None:
        return None
    by_name = {tool["function"]["name"]: tool["function"] for tool in tools}
    alternatives = [_call_schema(syntax, name, by_name[name].get("parameters")) for name in chosen]
    schema = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
    try:
        grammar = json_grammar(schema)
    except RequestError as exc:
        raise RequestError(
            f"tools: a function's parameters cannot constrain the call: {exc.message}", param="tools"
        ) from exc
    call = _fresh_name(grammar, "tool-call")
    wrapper = f"root ::= {_literal(syntax.start + syntax.pad)} {call} {_literal(syntax.pad + syntax.end)}\n"
    return wrapper + rename_rule(grammar, "root", call)


def _call_schema(syntax: ToolSyntax, name: str, parameters: Any) -> dict[str, Any]:
    if parameters is None:
        parameters = {"type": "object", "properties": {}}  # OpenAI: no parameters, a function of none
    elif not isinstance(parameters, Mapping):
        raise RequestError(f"the parameters of the function {name!r} must be a JSON Schema object", param="tools")
    return {
        "type": "object",
        "properties": {syntax.name_key: {"const": name}, syntax.arguments_key: dict(parameters)},
        "required": [syntax.name_key, syntax.arguments_key],
    }


def _literal(text: str) -> str:
    """``text`` as a GBNF string literal."""
    escapes = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
    return '"' + "".join(escapes.get(char, char) for char in text) + '"'


def _is_word(char: str) -> bool:
    return char.isascii() and (char.isalnum() or char in "-_")


def _tokens(grammar: str) -> Iterator[tuple[str, bool]]:
    """GBNF text cut into (piece, is_rule_name): string literals, character classes and comments
    are never names, whatever words they hold."""
    at, size = 0, len(grammar)
    while at < size:
        char = grammar[at]
        end = at + 1
        if char in '"[':
            close = '"' if char == '"' else "]"
            while end < size and grammar[end] != close:
                end += 2 if grammar[end] == "\\" else 1
            end = min(end + 1, size)
        elif char == "#":
            while end < size and grammar[end] not in "\r\n":
                end += 1
        elif _is_word(char):
            while end < size and _is_word(grammar[end]):
                end += 1
            yield grammar[at:end], True
            at = end
            continue
        yield grammar[at:end], False
        at = end


def rename_rule(grammar: str, old: str, new: str) -> str:
    """``grammar`` with the rule ``old`` (its definition and every reference) called ``new``."""
    return "".join(new if is_name and piece == old else piece for piece, is_name in _tokens(grammar))


def _fresh_name(grammar: str, base: str) -> str:
    names = {piece for piece, is_name in _tokens(grammar) if is_name}
    name, suffix = base, 0
    while name in names:
        suffix += 1
        name = f"{base}-{suffix}"
    return name
