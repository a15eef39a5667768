"""What one answer is made of, whatever endpoint serves it: plain data, no I/O.

The serving code turns engine events into these; each endpoint's wire format (chat completions,
completions, the Responses API; streamed or whole) is a pure function of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from peerinfer.engine.base import TokenLogprob

# One type for a call, whichever side wrote it (the model now, or an assistant message earlier).
from peerinfer.engine.chat_types import ToolCall as ToolCall

FinishReason = Literal["stop", "length", "tool_calls"]


@dataclass(frozen=True)
class ChoiceDelta:
    """More of choice ``index``: text, the log-probabilities of its tokens, and finished tool calls."""

    index: int
    text: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True)
class ChoiceEnd:
    """Choice ``index`` is complete."""

    index: int
    finish_reason: FinishReason
    completion_tokens: int


@dataclass(frozen=True)
class AnswerUsage:
    """Token counts of the whole answer: the prompt once, however many choices read it."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


@dataclass(frozen=True)
class AnswerFailed:
    """The answer cannot go on (the engine failed); ``message`` says why."""

    message: str


@dataclass(frozen=True)
class KeepAlive:
    """Nothing new for ``keepalive_s``: a streamed answer sends a comment so that proxies keep it open."""


Outcome = ChoiceDelta | ChoiceEnd | AnswerUsage | AnswerFailed | KeepAlive


class AnswerFormat(Protocol):
    """One endpoint's wire format, as a pure function of the outcomes (``peerinfer.server.serving`` drives it).

    Streamed: ``opening()`` goes out with the first outcome (so the headers leave with the first token),
    then ``frames(outcome)`` for each one (a ``KeepAlive`` too), then ``closing()``. Whole:
    ``whole(outcomes)`` gets every outcome of an answer that completed (no ``KeepAlive``, no
    ``AnswerFailed``: the serving code answers a failure with a 500 itself).
    """

    def opening(self) -> list[bytes]: ...

    def frames(self, outcome: Outcome) -> list[bytes]: ...

    def closing(self) -> list[bytes]: ...

    def whole(self, outcomes: Sequence[Outcome]) -> dict[str, Any]: ...
