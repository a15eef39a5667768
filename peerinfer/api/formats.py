"""Chat completions and completions on the wire, streamed and whole: pure functions of the outcomes.

Log-probabilities: a token's ``token`` is its text when its bytes are whole UTF-8, else
``"bytes:\\xe0\\xa4"`` (its bytes written out, as OpenAI writes such tokens), so that the pieces of a
character split over several tokens stay apart (and legacy ``top_logprobs`` keys stay distinct);
``bytes`` always holds the exact bytes. A log-probability too small for a float (or not finite) is
written as -9999.0, as OpenAI writes the unlikeliest tokens: JSON has no ``-Infinity``.
"""

from __future__ import annotations

import codecs
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from peerinfer.api import sse
from peerinfer.api.choices import (
    AnswerFailed,
    AnswerUsage,
    ChoiceDelta,
    ChoiceEnd,
    Outcome,
    ToolCall,
)
from peerinfer.api.openai import error_body, new_id, now, usage
from peerinfer.engine.base import TokenLogprob

LOWEST_LOGPROB = -9999.0


def token_text(piece: bytes) -> str:
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{byte:02x}" for byte in piece)


def finite_logprob(value: float) -> float:
    """JSON has no -Infinity: the unlikeliest tokens get OpenAI's -9999.0."""
    return value if math.isfinite(value) and value > LOWEST_LOGPROB else LOWEST_LOGPROB


def logprob_entry(entry: TokenLogprob) -> dict[str, Any]:
    """One token's log-probability entry, as chat completions and the Responses API write it."""
    return {
        "token": token_text(entry.piece),
        "logprob": finite_logprob(entry.logprob),
        "bytes": list(entry.piece),
        "top_logprobs": [
            {"token": token_text(top.piece), "logprob": finite_logprob(top.logprob), "bytes": list(top.piece)}
            for top in entry.top
        ],
    }


def chat_logprobs(entries: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    """OpenAI's ``logprobs.content`` entries of chat completions."""
    return [logprob_entry(entry) for entry in entries]


@dataclass
class LegacyLogprobs:
    """The legacy completions shape, built token by token; ``text_offset`` counts characters of the
    choice's whole text (its echoed prompt included), so a split character's first token and its
    last one share the character's offset."""

    position: int = 0
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[str, float]] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)
    _decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace")
    )

    def add(self, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
        """Adds ``entries``; returns their own part (what a streamed chunk carries)."""
        part = LegacyLogprobs(self.position)
        for entry in entries:
            token = token_text(entry.piece)
            top = {token_text(alternative.piece): finite_logprob(alternative.logprob) for alternative in entry.top}
            top.setdefault(token, finite_logprob(entry.logprob))  # OpenAI's: the chosen token is always there
            for target in (self, part):
                target.tokens.append(token)
                target.token_logprobs.append(finite_logprob(entry.logprob))
                target.top_logprobs.append(top)
                target.text_offset.append(self.position)
            self.position += len(self._decoder.decode(entry.piece))
        return part.body()

    def body(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        }


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str = "stop"


def _collect(outcomes: Sequence[Outcome], choices: int) -> tuple[list[_Choice], AnswerUsage]:
    collected = [_Choice() for _ in range(choices)]
    counts = AnswerUsage(0, 0)
    for outcome in outcomes:
        if isinstance(outcome, ChoiceDelta):
            choice = collected[outcome.index]
            choice.text.append(outcome.text)
            choice.logprobs.extend(outcome.logprobs)
            choice.tool_calls.extend(outcome.tool_calls)
        elif isinstance(outcome, ChoiceEnd):
            collected[outcome.index].finish_reason = outcome.finish_reason
        elif isinstance(outcome, AnswerUsage):
            counts = outcome
    return collected, counts


def _tool_call(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def _failure(outcome: AnswerFailed) -> bytes:
    return sse.event(error_body(f"generation failed: {outcome.message}", "server_error", code="generation_failed"))


@dataclass
class _Envelope:
    """What every object and chunk of one answer shares."""

    object_name: str
    model: str
    fingerprint: str
    id_prefix: str
    request_id: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        self.request_id = self.request_id or new_id(self.id_prefix)
        self.created = self.created or now()

    def body(self, choices: list[dict[str, Any]], counts: AnswerUsage | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.request_id,
            "object": self.object_name,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": choices,
        }
        if counts is not None:
            body["usage"] = usage(counts.prompt_tokens, counts.completion_tokens, counts.cached_tokens)
        return body


class ChatFormat:
    """``/v1/chat/completions``: ``chat.completion`` whole, ``chat.completion.chunk`` events streamed."""

    def __init__(
        self, *, model: str, fingerprint: str, choices: int = 1, include_usage: bool = False, logprobs: bool = False
    ) -> None:
        self.choices = choices
        self.include_usage = include_usage
        self.logprobs = logprobs
        self._chunks = _Envelope("chat.completion.chunk", model, fingerprint, "chatcmpl")
        self._calls = [0] * choices  # tool calls streamed so far, per choice (each call's index)

    def _chunk(
        self, index: int, delta: dict[str, Any], finish_reason: str | None = None, logprobs: Any = None
    ) -> bytes:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return sse.event(self._chunks.body([choice]))

    def opening(self) -> list[bytes]:
        return [self._chunk(index, {"role": "assistant", "content": ""}) for index in range(self.choices)]

    def frames(self, outcome: Outcome) -> list[bytes]:
        if isinstance(outcome, ChoiceDelta):
            delta: dict[str, Any] = {"content": outcome.text} if outcome.text else {}
            if outcome.tool_calls:
                first = self._calls[outcome.index]
                self._calls[outcome.index] += len(outcome.tool_calls)
                delta["tool_calls"] = [
                    {"index": first + number, **_tool_call(call)} for number, call in enumerate(outcome.tool_calls)
                ]
            if not delta and not (self.logprobs and outcome.logprobs):
                return []
            logprobs = {"content": chat_logprobs(outcome.logprobs), "refusal": None} if self.logprobs else None
            return [self._chunk(outcome.index, delta or {"content": ""}, logprobs=logprobs)]
        if isinstance(outcome, ChoiceEnd):
            return [self._chunk(outcome.index, {}, outcome.finish_reason)]
        if isinstance(outcome, AnswerUsage):
            return [sse.event(self._chunks.body([], outcome))] if self.include_usage else []
        if isinstance(outcome, AnswerFailed):
            return [_failure(outcome)]
        return [sse.KEEPALIVE]

    def closing(self) -> list[bytes]:
        return [sse.DONE]

    def whole(self, outcomes: Sequence[Outcome]) -> dict[str, Any]:
        collected, counts = _collect(outcomes, self.choices)
        envelope = _Envelope("chat.completion", self._chunks.model, self._chunks.fingerprint, "chatcmpl")
        choices = []
        for index, choice in enumerate(collected):
            text = "".join(choice.text)
            message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
            if choice.tool_calls:
                message["content"] = text or None
                message["tool_calls"] = [_tool_call(call) for call in choice.tool_calls]
            logprobs = {"content": chat_logprobs(choice.logprobs), "refusal": None} if self.logprobs else None
            choices.append(
                {"index": index, "message": message, "logprobs": logprobs, "finish_reason": choice.finish_reason}
            )
        return envelope.body(choices, counts)


class CompletionFormat:
    """``/v1/completions``: ``text_completion`` objects, whole and streamed; ``echo`` puts the prompt first."""

    def __init__(
        self,
        *,
        model: str,
        fingerprint: str,
        choices: int = 1,
        include_usage: bool = False,
        logprobs: bool = False,
        echo: str = "",
    ) -> None:
        self.choices = choices
        self.include_usage = include_usage
        self.echo = echo
        self._envelope = _Envelope("text_completion", model, fingerprint, "cmpl")
        self._logprobs = [LegacyLogprobs(len(echo)) for _ in range(choices)] if logprobs else None

    def _chunk(self, index: int, text: str, finish_reason: str | None = None, logprobs: Any = None) -> bytes:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        return sse.event(self._envelope.body([choice]))

    def opening(self) -> list[bytes]:
        return [self._chunk(index, self.echo) for index in range(self.choices)] if self.echo else []

    def frames(self, outcome: Outcome) -> list[bytes]:
        if isinstance(outcome, ChoiceDelta):
            if self._logprobs is None:
                return [self._chunk(outcome.index, outcome.text)] if outcome.text else []
            if not outcome.text and not outcome.logprobs:
                return []
            return [
                self._chunk(outcome.index, outcome.text, logprobs=self._logprobs[outcome.index].add(outcome.logprobs))
            ]
        if isinstance(outcome, ChoiceEnd):
            return [self._chunk(outcome.index, "", outcome.finish_reason)]
        if isinstance(outcome, AnswerUsage):
            return [sse.event(self._envelope.body([], outcome))] if self.include_usage else []
        if isinstance(outcome, AnswerFailed):
            return [_failure(outcome)]
        return [sse.KEEPALIVE]

    def closing(self) -> list[bytes]:
        return [sse.DONE]

    def whole(self, outcomes: Sequence[Outcome]) -> dict[str, Any]:
        collected, counts = _collect(outcomes, self.choices)
        choices = []
        for index, choice in enumerate(collected):
            logprobs = None
            if self._logprobs is not None:
                legacy = LegacyLogprobs(len(self.echo))
                legacy.add(choice.logprobs)
                logprobs = legacy.body()
            text = self.echo + "".join(choice.text)
            choices.append({"index": index, "text": text, "logprobs": logprobs, "finish_reason": choice.finish_reason})
        return self._envelope.body(choices, counts)
