"""What a routed answer asks each peer, and how it asks the next one to continue. Pure.

The first peer is sent the client's request as it is, streamed, with usage always on (the router
adds up the whole answer's tokens). When that peer fails after text has streamed, the next one is
asked to continue the text so far: a chat as an assistant message to continue
(``continue_final_message``), a completion as the prompt followed by the text, with the token limit
lowered by what has streamed.

Some answers cannot be continued that way, so they are not resumable: several choices at once
(``n``), tools and structured output (the constraint would restart mid-answer), a completion with
log-probabilities (their ``text_offset`` would restart) or a prompt that is not one string. Those
fail over before the first token only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from peerinfer.api.openai import COMPLETIONS_DEFAULT_MAX_TOKENS
from peerinfer.client.routing import remaining_tokens, resume_messages

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"


@dataclass(frozen=True)
class AnswerPlan:
    path: str
    body: dict[str, Any]
    """What each peer is sent first: the client's body, streamed, with usage."""
    resumable: bool
    client_wants_usage: bool
    max_deltas: int | None
    """The most text deltas an honest peer can send (token limit times choices); None: no limit asked."""

    @property
    def chat(self) -> bool:
        return self.path == CHAT_PATH


def _streamed(body: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    options = body.get("stream_options")
    wants_usage = bool(body.get("stream")) and isinstance(options, dict) and options.get("include_usage") is True
    sent = dict(body)
    sent["stream"] = True
    sent["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return sent, wants_usage


def _choices(body: Mapping[str, Any]) -> int:
    n = body.get("n")
    return n if type(n) is int and n > 0 else 1


def _limit(value: Any, choices: int) -> int | None:
    return value * choices if type(value) is int and value > 0 else None


def chat_plan(body: Mapping[str, Any]) -> AnswerPlan:
    """The plan of a chat request (its body already checked by ``api.openai``)."""
    sent, wants_usage = _streamed(body)
    messages = body.get("messages")
    text_history = isinstance(messages, list) and all(
        isinstance(message, dict) and isinstance(message.get("content", ""), str) for message in messages
    )
    response_format = body.get("response_format")
    resumable = (
        _choices(body) == 1
        and text_history
        and not body.get("tools")
        and not body.get("functions")
        and (response_format is None or (isinstance(response_format, dict) and response_format.get("type") == "text"))
    )
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    return AnswerPlan(CHAT_PATH, sent, resumable, wants_usage, _limit(limit, _choices(body)))


def completion_plan(body: Mapping[str, Any]) -> AnswerPlan:
    """The plan of a completion request; its token limit is made explicit, so a resumed one cannot reset it."""
    sent, wants_usage = _streamed(body)
    if body.get("max_tokens") is None:
        sent["max_tokens"] = COMPLETIONS_DEFAULT_MAX_TOKENS
    resumable = (
        _choices(body) == 1
        and isinstance(body.get("prompt"), str)
        and body.get("logprobs") is None
        and body.get("response_format") is None
    )
    return AnswerPlan(COMPLETIONS_PATH, sent, resumable, wants_usage, _limit(sent["max_tokens"], _choices(body)))


def resumed_body(plan: AnswerPlan, partial: str, deltas: int) -> dict[str, Any]:
    """What the next peer is asked, once ``partial`` (``deltas`` text deltas) has streamed; ``plan.resumable``."""
    body = remaining_tokens(plan.body, deltas)
    if plan.chat:
        continuing = bool(body.get("continue_final_message"))
        body["messages"] = resume_messages(body["messages"], partial, continuing)
        body["continue_final_message"] = True
        return body
    body["prompt"] = body["prompt"] + partial
    body["echo"] = False  # the echoed prompt has been sent already
    return body
