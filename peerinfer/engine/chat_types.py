"""The plain data of a chat prompt: messages (with names and tool calls), prompt parts, control tokens.

Shared by ``prompt`` (the chat formats) and ``chat_template`` (rendering a Jinja template). Pure.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ToolCall:
    """A call of a function the request offered, made by the model now or by an assistant message earlier:
    ``arguments`` is JSON text, as OpenAI sends it."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ChatTurn:
    """One message. ``role``: system, developer, user, assistant or tool. ``name``: the participant's
    name; ``tool_calls``: an assistant message's calls; ``tool_call_id``: which call a tool message answers."""

    role: str
    content: str
    name: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None


@dataclass(frozen=True)
class PromptPart:
    """A piece of a prompt: the chat format's own ``markup``, or text that came from a message.

    The engine makes control tokens (``<start_of_turn>``, ``<eos>``) from markup only; a message's
    text is tokenised as text whatever it contains.
    """

    text: str
    markup: bool


@dataclass(frozen=True)
class ToolSyntax:
    """How a chat format writes a tool call: ``start``, a JSON object with the function's name under
    ``name_key`` and its arguments (an object) under ``arguments_key``, then ``end``. ``pad``: what the
    model is made to write between a marker and the JSON when a call is forced."""

    start: str
    end: str
    name_key: str = "name"
    arguments_key: str = "arguments"
    pad: str = "\n"


# Hermes 2 Pro's and Qwen 2.5's: <tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>
HERMES_TOOL_SYNTAX = ToolSyntax("<tool_call>", "</tool_call>")


@dataclass(frozen=True)
class ChatPrompt:
    """The prompt as parts, plus the extra stop strings and BOS handling its format needs.

    ``tool_syntax``: how the model writes tool calls, when tools were rendered into the prompt.
    """

    parts: tuple[PromptPart, ...]
    stops: tuple[str, ...]
    add_bos: bool
    tool_syntax: ToolSyntax | None = None

    @property
    def text(self) -> str:
        return "".join(part.text for part in self.parts)


@dataclass(frozen=True)
class ControlToken:
    """A control token the vocabulary's tokenizer found in markup; ``lstrip``/``rstrip``: it eats the
    whitespace before/after it, as llama.cpp reads such tokens."""

    token: int
    text: str
    lstrip: bool = False
    rstrip: bool = False
