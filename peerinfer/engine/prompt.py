"""Chat messages to prompt text. Pure, no I/O.

A GGUF that carries a chat template is rendered with that template (Jinja2, sandboxed). A base
model without one (the bundled Gemma 3 270M) gets a plain question/answer transcript with a stop
at the next turn marker: measured on Gemma 3 270M at temperature 0, Gemma's own turn markers make
the base model echo the question, while the transcript gives sensible answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from peerinfer.errors import RequestError

QUESTION = "Question:"
ANSWER = "Answer:"
TRANSCRIPT_STOPS = ("\nQuestion:", "\n\nQuestion")


@dataclass(frozen=True)
class ChatTurn:
    role: str
    content: str


@dataclass(frozen=True)
class ChatPrompt:
    """Prompt text plus the extra stop strings and BOS handling its format needs."""

    text: str
    stops: tuple[str, ...]
    add_bos: bool


def _render_transcript(turns: Sequence[ChatTurn], continue_final: bool) -> str:
    system = "\n".join(turn.content for turn in turns if turn.role in ("system", "developer"))
    lines: list[str] = [system + "\n"] if system else []
    dialogue = [turn for turn in turns if turn.role not in ("system", "developer")]
    for index, turn in enumerate(dialogue):
        last = index == len(dialogue) - 1
        if turn.role == "user":
            lines.append(f"{QUESTION} {turn.content}")
        elif last and continue_final:
            lines.append(f"{ANSWER} {turn.content}" if turn.content else ANSWER)
        else:
            lines.append(f"{ANSWER} {turn.content}\n")
    if not continue_final:
        lines.append(ANSWER)
    return "\n".join(lines)


def _raise_from_template(message: str) -> None:
    raise RequestError(f"the model's chat template rejected the messages: {message}", param="messages")


def _render_template(
    turns: Sequence[ChatTurn], template: str, bos_token: str, eos_token: str, continue_final: bool
) -> str:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_from_template
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    messages = [{"role": turn.role, "content": turn.content} for turn in turns]
    try:
        text = env.from_string(template).render(
            messages=messages,
            bos_token=bos_token,
            eos_token=eos_token,
            add_generation_prompt=not continue_final,
        )
    except TemplateError as exc:
        raise RequestError(f"the model's chat template failed: {exc}", param="messages") from exc
    if continue_final:
        final = turns[-1].content
        cut = text.rfind(final) if final else -1
        if cut < 0:
            raise RequestError(
                "continue_final_message: the chat template does not keep the final assistant message "
                "verbatim, so it cannot be continued",
                param="messages",
            )
        text = text[: cut + len(final)]
    return text


def render_chat(
    turns: Sequence[ChatTurn],
    template: str | None,
    *,
    bos_token: str = "",
    eos_token: str = "",
    continue_final: bool = False,
) -> ChatPrompt:
    """Render chat turns for the model. ``continue_final`` continues the last assistant message."""
    if not turns:
        raise RequestError("messages must hold at least one message", param="messages")
    if continue_final and turns[-1].role != "assistant":
        raise RequestError(
            f"continue_final_message needs the last message to be from the assistant, got '{turns[-1].role}'",
            param="messages",
        )
    if template is None:
        return ChatPrompt(text=_render_transcript(turns, continue_final), stops=TRANSCRIPT_STOPS, add_bos=True)
    text = _render_template(turns, template, bos_token, eos_token, continue_final)
    starts_with_bos = bool(bos_token) and text.startswith(bos_token)
    return ChatPrompt(text=text, stops=(), add_bos=not starts_with_bos)
