"""Chat messages to prompt parts: the chat format's own markup, and what clients wrote. Pure, no I/O.

A GGUF that carries a chat template (or the one ``PEERINFER_CHAT_TEMPLATE`` names) is rendered
with it (``chat_template``: only its markup may become control tokens). A base model without one
(the bundled Gemma 3 270M) gets a plain question/answer transcript with a stop at the next turn
marker: measured on Gemma 3 270M at temperature 0, Gemma's own turn markers make the base model
echo the question, while the transcript gives sensible answers. The transcript has no tools.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from peerinfer.engine.chat_template import (
    render_template,
    template_stops,
    template_supports_tools,
    template_tool_syntax,
)
from peerinfer.engine.chat_types import (
    HERMES_TOOL_SYNTAX,
    ChatPrompt,
    ChatTurn,
    ControlToken,
    PromptPart,
    ToolCall,
    ToolSyntax,
)
from peerinfer.errors import RequestError

__all__ = [
    "HERMES_TOOL_SYNTAX",
    "ChatPrompt",
    "ChatTurn",
    "ControlToken",
    "PromptPart",
    "ToolCall",
    "ToolSyntax",
    "markup_of",
    "render_chat",
    "split_at_controls",
]

QUESTION = "Question:"
ANSWER = "Answer:"
SYSTEM = "System"
TRANSCRIPT_STOPS = ("\nQuestion:", "\n\nQuestion")
_C_SPACE = " \t\n\v\f\r"  # what llama.cpp's isspace() strips next to an lstrip/rstrip token


def _merged(parts: Sequence[PromptPart]) -> tuple[PromptPart, ...]:
    """Drops empty parts and joins neighbours of the same kind."""
    out: list[PromptPart] = []
    for part in parts:
        if not part.text:
            continue
        if out and out[-1].markup == part.markup:
            out[-1] = PromptPart(out[-1].text + part.text, part.markup)
        else:
            out.append(part)
    return tuple(out)


def _no_tools_in_transcript(turns: Sequence[ChatTurn]) -> None:
    for index, turn in enumerate(turns):
        if turn.role == "tool" or turn.tool_calls:
            raise RequestError(
                f"this model's chat format has no tool role and no tool calls (messages[{index}] is a "
                f"{'tool message' if turn.role == 'tool' else 'tool call'}): the model has no chat template, so "
                "it gets a plain question/answer transcript; send tool results as user messages, or set "
                "PEERINFER_CHAT_TEMPLATE on the worker to a template that writes tools",
                param="messages",
            )


def _render_transcript(turns: Sequence[ChatTurn], continue_final: bool) -> list[PromptPart]:
    """The plain transcript. A message's ``name`` is text in parentheses after its label:
    ``Question (alice): ...``, ``Answer (bot): ...``; a named system message is ``System (ops): ...``.
    An empty name is no name, here and in templates."""

    def markup(text: str) -> PromptPart:
        return PromptPart(text, markup=True)

    def content(text: str) -> PromptPart:
        return PromptPart(text, markup=False)

    def label(word: str, name: str | None) -> list[PromptPart]:
        if not name:
            return [markup(word)]
        return [markup(f"{word.removesuffix(':')} ("), content(name), markup("):")]

    lines: list[list[PromptPart]] = []
    systems = [turn for turn in turns if turn.role in ("system", "developer")]
    if "\n".join(turn.content for turn in systems) or any(turn.name for turn in systems):
        system: list[PromptPart] = []
        for index, turn in enumerate(systems):
            line = (
                [*label(SYSTEM, turn.name), markup(" "), content(turn.content)]
                if turn.name
                else [content(turn.content)]
            )
            system += [markup("\n"), *line] if index else line
        lines.append([*system, markup("\n")])
    dialogue = [turn for turn in turns if turn.role not in ("system", "developer")]
    for index, turn in enumerate(dialogue):
        last = index == len(dialogue) - 1
        if turn.role == "user":
            lines.append([*label(QUESTION, turn.name), markup(" "), content(turn.content)])
        elif last and continue_final:
            answer = label(ANSWER, turn.name)
            lines.append([*answer, markup(" "), content(turn.content)] if turn.content else answer)
        else:
            lines.append([*label(ANSWER, turn.name), markup(" "), content(turn.content), markup("\n")])
    if not continue_final:
        lines.append([markup(ANSWER)])
    parts: list[PromptPart] = []
    for index, line in enumerate(lines):
        parts += [markup("\n"), *line] if index else line
    return parts


def _check_roles(turns: Sequence[ChatTurn], continue_final: bool) -> None:
    if not turns:
        raise RequestError("messages must hold at least one message", param="messages")
    if continue_final and turns[-1].role != "assistant":
        raise RequestError(
            f"continue_final_message needs the last message to be from the assistant, got '{turns[-1].role}'",
            param="messages",
        )
    if not continue_final and len(turns) >= 2 and turns[-1].role == turns[-2].role == "assistant":
        raise RequestError(
            "the conversation ends with two assistant messages; to continue the last one, set "
            "continue_final_message to true, else join them or end with a user message",
            param="messages",
        )


def render_chat(
    turns: Sequence[ChatTurn],
    template: str | None,
    *,
    bos_token: str = "",
    eos_token: str = "",
    continue_final: bool = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> ChatPrompt:
    """Render chat turns for the model. ``continue_final`` continues the last assistant message.

    ``tools``: OpenAI's tool definitions (``{"type": "function", "function": {...}}``), given to the
    template as its ``tools`` variable, as Hugging Face's templates take them; None or empty: no
    tools (pass None for ``tool_choice: "none"``). A 400 (``param="tools"``) when the format cannot
    express tools, or when peerinfer cannot read the calls its model writes.
    """
    _check_roles(turns, continue_final)
    if template is None:
        if tools:
            raise RequestError(
                "this model's chat template cannot express tools: the model has no chat template (it gets a "
                "plain question/answer transcript); drop tools, or set PEERINFER_CHAT_TEMPLATE on the worker to "
                "a template that writes them",
                param="tools",
            )
        _no_tools_in_transcript(turns)
        return ChatPrompt(_merged(_render_transcript(turns, continue_final)), stops=TRANSCRIPT_STOPS, add_bos=True)
    syntax: ToolSyntax | None = None
    if tools:
        if not template_supports_tools(template):
            raise RequestError(
                "this model's chat template cannot express tools (it does not write the tools variable); drop "
                "tools, or set PEERINFER_CHAT_TEMPLATE on the worker to a template that writes them",
                param="tools",
            )
        syntax = template_tool_syntax(template)
        if syntax is None:
            raise RequestError(
                "this model's chat template writes tools, but in a style of tool call that peerinfer cannot "
                "read (it knows <tool_call>{...}</tool_call>, as in Hermes and Qwen templates); drop tools",
                param="tools",
            )
    rendered = render_template(
        turns, template, bos_token=bos_token, eos_token=eos_token, tools=tools or None, continue_final=continue_final
    )
    parts = _merged(rendered)
    text = "".join(part.text for part in parts)
    starts_with_bos = bool(bos_token) and text.startswith(bos_token)
    stops = template_stops(template, bos_token, eos_token)
    return ChatPrompt(parts, stops=stops, add_bos=not starts_with_bos, tool_syntax=syntax)


def markup_of(parts: Sequence[PromptPart]) -> str:
    """All the markup, each part apart from the others (no control token holds a NUL): what to ask
    the tokenizer for the control tokens ``split_at_controls`` needs, in one call."""
    return "\0".join(part.text for part in parts if part.markup)


def split_at_controls(parts: Sequence[PromptPart], found: Sequence[ControlToken]) -> tuple[list[str], list[int]]:
    """Text runs and the control tokens between them: ``runs[0], controls[0], runs[1], ...``.

    ``found``: the control tokens the vocabulary's tokenizer finds in ``markup_of(parts)``. A
    message's text joins the runs whatever it says. Cuts markup as llama.cpp does (longest control
    token first), so that tokenising each run as text gives the tokens llama.cpp gives for the
    whole prompt with special tokens parsed, wherever the messages hold none.
    """
    by_length = sorted(found, key=lambda control: -len(control.text))
    runs: list[list[str]] = [[]]
    controls: list[int] = []
    eat_space = False
    for part in parts:
        pieces: list[str | ControlToken] = [part.text]
        if part.markup:
            for control in by_length:
                pieces = [cut for piece in pieces for cut in _cut(piece, control)]
        for piece in pieces:
            if isinstance(piece, ControlToken):
                if piece.lstrip:
                    _strip_end(runs[-1])
                controls.append(piece.token)
                runs.append([])
                eat_space = piece.rstrip
            elif piece:
                if eat_space:
                    piece = piece.lstrip(_C_SPACE)
                    eat_space = not piece
                runs[-1].append(piece)
    return ["".join(run) for run in runs], controls


def _cut(piece: str | ControlToken, control: ControlToken) -> list[str | ControlToken]:
    if isinstance(piece, ControlToken) or not control.text or control.text not in piece:
        return [piece]
    out: list[str | ControlToken] = []
    for index, text in enumerate(piece.split(control.text)):
        out += [control, text] if index else [text]
    return out


def _strip_end(run: list[str]) -> None:
    while run:
        run[-1] = run[-1].rstrip(_C_SPACE)
        if run[-1]:
            return
        run.pop()
