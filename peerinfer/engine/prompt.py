"""Chat messages to prompt parts: the template's own markup, and the messages' text. Pure, no I/O.

A GGUF that carries a chat template is rendered with that template (Jinja2, sandboxed). A base
model without one (the bundled Gemma 3 270M) gets a plain question/answer transcript with a stop
at the next turn marker: measured on Gemma 3 270M at temperature 0, Gemma's own turn markers make
the base model echo the question, while the transcript gives sensible answers.

Only markup may become control tokens. A message that says ``<end_of_turn>`` or ``<eos>`` must
reach the model as those characters, never as the control token: otherwise whoever writes a
message can end its turn and write the model's or the system's turns (a forged turn). So a
template is rendered twice: once with the messages, and once with a random placeholder in place
of each message's text. The placeholder render holds nothing a user wrote; where the real render
is that markup with each message's text (verbatim, or with its ends' whitespace trimmed, as many
templates do) in the placeholders' places, those ranges are the messages' text and the rest is
markup. A template that changes a message's text in any other way (upper-casing it, cutting it
up) is refused with a 400 rather than guessed at.
"""

from __future__ import annotations

import functools
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from jinja2 import Template, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from peerinfer.errors import RequestError

QUESTION = "Question:"
ANSWER = "Answer:"
TRANSCRIPT_STOPS = ("\nQuestion:", "\n\nQuestion")
_C_SPACE = " \t\n\v\f\r"  # what llama.cpp's isspace() strips next to an lstrip/rstrip token


@dataclass(frozen=True)
class ChatTurn:
    role: str
    content: str


@dataclass(frozen=True)
class PromptPart:
    """A piece of a prompt: the chat format's own ``markup``, or text that came from a message.

    The engine makes control tokens (``<start_of_turn>``, ``<eos>``) from markup only; a message's
    text is tokenised as text whatever it contains.
    """

    text: str
    markup: bool


@dataclass(frozen=True)
class ChatPrompt:
    """The prompt as parts, plus the extra stop strings and BOS handling its format needs."""

    parts: tuple[PromptPart, ...]
    stops: tuple[str, ...]
    add_bos: bool

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


def _render_transcript(turns: Sequence[ChatTurn], continue_final: bool) -> list[PromptPart]:
    def markup(text: str) -> PromptPart:
        return PromptPart(text, markup=True)

    def content(text: str) -> PromptPart:
        return PromptPart(text, markup=False)

    lines: list[list[PromptPart]] = []
    systems = [turn.content for turn in turns if turn.role in ("system", "developer")]
    if "\n".join(systems):
        system: list[PromptPart] = []
        for index, text in enumerate(systems):
            system += [markup("\n"), content(text)] if index else [content(text)]
        lines.append([*system, markup("\n")])
    dialogue = [turn for turn in turns if turn.role not in ("system", "developer")]
    for index, turn in enumerate(dialogue):
        last = index == len(dialogue) - 1
        if turn.role == "user":
            lines.append([markup(f"{QUESTION} "), content(turn.content)])
        elif last and continue_final:
            lines.append([markup(f"{ANSWER} "), content(turn.content)] if turn.content else [markup(ANSWER)])
        else:
            lines.append([markup(f"{ANSWER} "), content(turn.content), markup("\n")])
    if not continue_final:
        lines.append([markup(ANSWER)])
    parts: list[PromptPart] = []
    for index, line in enumerate(lines):
        parts += [markup("\n"), *line] if index else line
    return parts


@functools.lru_cache(maxsize=4)
def _compile(template: str) -> Template:
    """A model's template, compiled once (~13 ms for Gemma's) rather than on every request."""
    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)


def _raise_from_template(message: str) -> None:
    raise RequestError(f"the model's chat template rejected the messages: {message}", param="messages")


def _variants(text: str) -> list[str]:
    """How a template may write a message's text: as it is, or with the whitespace at its ends trimmed."""
    forms = [text, text.strip(), text.lstrip(), text.rstrip(), text.strip("\n"), text.lstrip("\n"), text.rstrip("\n")]
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


def _placeholders(turns: Sequence[ChatTurn], template: str) -> tuple[str, list[str]]:
    """A fresh random tag, and each message's stand-in (a whitespace-only text stands for itself)."""
    while True:
        tag = f"{secrets.randbelow(10**18):018d}"  # digits: a template that changes letters' case keeps it
        if tag not in template and not any(tag in turn.content for turn in turns):
            break
    return tag, [f"[[{tag}:{index}]]" if turn.content.strip() else turn.content for index, turn in enumerate(turns)]


def _render_template(
    turns: Sequence[ChatTurn], template: str, bos_token: str, eos_token: str, continue_final: bool
) -> list[PromptPart]:
    now = datetime.now()  # one clock for both renders

    def render(compiled: Template, contents: Sequence[str]) -> str:
        return compiled.render(
            messages=[{"role": turn.role, "content": text} for turn, text in zip(turns, contents, strict=True)],
            bos_token=bos_token,
            eos_token=eos_token,
            add_generation_prompt=not continue_final,
            raise_exception=_raise_from_template,
            strftime_now=now.strftime,
        )

    tag, stand_ins = _placeholders(turns, template)
    try:
        compiled = _compile(template)
        text = render(compiled, [turn.content for turn in turns])
        marked = render(compiled, stand_ins)
    except TemplateError as exc:
        raise RequestError(f"the model's chat template failed: {exc}", param="messages") from exc
    pieces = re.split(rf"\[\[{tag}:(\d+)\]\]", marked)
    markups, owners = pieces[0::2], [int(owner) for owner in pieces[1::2]]
    written = _trace(markups, owners, [turn.content for turn in turns], text)
    if written is None:
        raise RequestError(
            "the model's chat template changes the text of a message in a way other than trimming the "
            "whitespace at its ends, so peerinfer cannot keep the message's text apart from the template's "
            "markup (and will not risk reading a message's text as control tokens); change the message's "
            "text, or use a model whose template writes messages as they are",
            param="messages",
        )
    if continue_final:
        final = len(turns) - 1
        places = [index for index, owner in enumerate(owners) if owner == final]
        if not turns[final].content or not places or written[places[-1]] != turns[final].content:
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
        return ChatPrompt(_merged(_render_transcript(turns, continue_final)), stops=TRANSCRIPT_STOPS, add_bos=True)
    parts = _merged(_render_template(turns, template, bos_token, eos_token, continue_final))
    text = "".join(part.text for part in parts)
    starts_with_bos = bool(bos_token) and text.startswith(bos_token)
    return ChatPrompt(parts, stops=(), add_bos=not starts_with_bos)


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
