"""The Responses API's answer, built from an answer's outcomes: the Response object and its stream. Pure.

``ResponseBuilder`` takes the outcomes of one answer (``peerinfer.api.choices``) in order and returns,
for each, the typed events OpenAI streams for it (``response.created`` ... ``response.completed``,
each with its ``sequence_number``); ``response()`` is the whole Response at any point. A non-streamed
answer feeds the same builder and sends ``response()`` alone, so the two cannot disagree.

Output items: the text is one ``message`` item with one ``output_text`` part, opened at its first
text; each tool call is a ``function_call`` item, after the message it follows. The terminal event
(``response.completed``, or ``response.incomplete`` at a length finish, or ``response.failed``)
waits for both the choice's end and the usage, whichever comes last.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

from peerinfer.api.choices import AnswerUsage, ChoiceDelta, ChoiceEnd, KeepAlive, Outcome, ToolCall
from peerinfer.api.formats import finite_logprob, logprob_entry, token_text
from peerinfer.api.responses import ResponsesRequest
from peerinfer.api.sse import KEEPALIVE
from peerinfer.engine.base import TokenLogprob

Status = Literal["in_progress", "completed", "incomplete", "failed"]


def new_id(prefix: str) -> str:
    """OpenAI's ids of the Responses API: ``resp_...``, ``msg_...``, ``fc_...``."""
    return f"{prefix}_{secrets.token_hex(24)}"


def sse_event(event: dict[str, Any]) -> bytes:
    """One event as OpenAI frames it: its type on an ``event:`` line, then its JSON on one ``data:`` line."""
    data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    return f"event: {event['type']}\ndata: {data}\n\n".encode()


def delta_logprob_entry(logprob: TokenLogprob) -> dict[str, Any]:
    """A token's entry in a ``response.output_text.delta`` event (OpenAI sends no ``bytes`` there)."""
    return {
        "token": token_text(logprob.piece),
        "logprob": finite_logprob(logprob.logprob),
        "top_logprobs": [
            {"token": token_text(top.piece), "logprob": finite_logprob(top.logprob)} for top in logprob.top
        ],
    }


def usage_object(usage: AnswerUsage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


def _tool_choice_echo(request: ResponsesRequest) -> str | dict[str, Any]:
    choice = request.tool_choice
    if isinstance(choice, dict):
        return {"type": "function", "name": choice["name"]}
    return choice if choice is not None else "auto"


class ResponseBuilder:
    """The Response of one answer, and its stream events, built outcome by outcome (see the module)."""

    def __init__(
        self,
        request: ResponsesRequest,
        *,
        model: str,
        response_id: str | None = None,
        created_at: int | None = None,
        ids: Callable[[str], str] = new_id,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.request = request
        self.model = model
        self.response_id = response_id or ids("resp")
        self.created_at = created_at if created_at is not None else int(clock())
        self._ids = ids
        self._clock = clock
        self._sequence = 0
        self._output: list[dict[str, Any]] = []
        self._message: dict[str, Any] | None = None  # the open message item, while its text grows
        self._text: list[str] = []
        self._logprobs: list[dict[str, Any]] = []
        self._finish: str | None = None
        self._usage: AnswerUsage | None = None
        self._error: str | None = None
        self._completed_at: int | None = None
        self.done = False  # the terminal event is out

    # The whole Response.

    @property
    def status(self) -> Status:
        if self._error is not None:
            return "failed"
        if not self.done:
            return "in_progress"
        return "incomplete" if self._finish == "length" else "completed"

    def response(self) -> dict[str, Any]:
        request, status = self.request, self.status
        open_status = "incomplete" if status == "failed" else "in_progress"
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "completed_at": self._completed_at,
            "background": False,
            "error": None if self._error is None else {"code": "server_error", "message": self._error},
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": request.instructions,
            "max_output_tokens": request.max_output_tokens,
            "max_tool_calls": request.max_tool_calls,
            "model": self.model,
            "output": [*self._output, *([] if self._message is None else [self._message_item(open_status)])],
            "parallel_tool_calls": request.parallel_tool_calls is not False,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "service_tier": "default",
            "store": False,
            "temperature": 1.0 if request.temperature is None else request.temperature,
            "text": {"format": request.text_format, "verbosity": None},
            "tool_choice": _tool_choice_echo(request),
            "tools": request.function_tools,
            "top_logprobs": request.top_logprobs or 0,
            "top_p": 1.0 if request.top_p is None else request.top_p,
            "truncation": "disabled",
            "usage": None if self._usage is None else usage_object(self._usage),
            "user": request.user,
            "metadata": request.metadata or {},
        }

    # Events.

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event

    def start(self) -> list[dict[str, Any]]:
        """``response.created`` and ``response.in_progress``: the stream's first two events."""
        return [
            self._event("response.created", response=self.response()),
            self._event("response.in_progress", response=self.response()),
        ]

    def feed(self, outcome: Outcome) -> list[dict[str, Any]]:
        """The events ``outcome`` makes (none for a keep-alive, or once the answer is over)."""
        if self.done or isinstance(outcome, KeepAlive):
            return []
        if isinstance(outcome, ChoiceDelta):
            if outcome.index != 0:
                return []  # the Responses API has one answer (no ``n``)
            events = self._add_text(outcome.text, outcome.logprobs) if outcome.text or outcome.logprobs else []
            for call in outcome.tool_calls:
                events += self._add_tool_call(call)
            return events
        if isinstance(outcome, ChoiceEnd):
            if outcome.index != 0 or self._finish is not None:
                return []
            self._finish = outcome.finish_reason
            status = "incomplete" if outcome.finish_reason == "length" else "completed"
            events = [] if self._output or self._message is not None else self._open_message()
            return events + self._close_message(status) + self._end_if_complete()
        if isinstance(outcome, AnswerUsage):
            self._usage = outcome
            return self._end_if_complete()
        return self.fail(outcome.message)

    def fail(self, message: str) -> list[dict[str, Any]]:
        """``response.failed``: the answer cannot go on."""
        if self.done:
            return []
        self._error = message
        self.done = True
        return [self._event("response.failed", response=self.response())]

    def finish(self) -> list[dict[str, Any]]:
        """At the end of the outcomes: the terminal event if it is not out yet (the usage never came)."""
        if self.done:
            return []
        if self._finish is None:
            return self.fail("the answer ended without a result")
        return self._end()

    def _end_if_complete(self) -> list[dict[str, Any]]:
        return self._end() if self._finish is not None and self._usage is not None else []

    def _end(self) -> list[dict[str, Any]]:
        self.done = True
        self._completed_at = int(self._clock())
        kind = "response.incomplete" if self._finish == "length" else "response.completed"
        return [self._event(kind, response=self.response())]

    def _message_item(self, status: str) -> dict[str, Any]:
        assert self._message is not None
        return {**self._message, "status": status, "content": [self._text_part()]}

    def _text_part(self) -> dict[str, Any]:
        return {"type": "output_text", "text": "".join(self._text), "annotations": [], "logprobs": list(self._logprobs)}

    def _open_message(self) -> list[dict[str, Any]]:
        self._message = {"id": self._ids("msg"), "type": "message", "status": "in_progress", "role": "assistant"}
        self._text, self._logprobs = [], []
        index = len(self._output)
        empty = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [
            self._event("response.output_item.added", output_index=index, item={**self._message, "content": []}),
            self._event(
                "response.content_part.added",
                item_id=self._message["id"],
                output_index=index,
                content_index=0,
                part=empty,
            ),
        ]

    def _close_message(self, status: str) -> list[dict[str, Any]]:
        if self._message is None:
            return []
        item, index = self._message_item(status), len(self._output)
        part = item["content"][0]
        self._output.append(item)
        self._message = None
        where = {"item_id": item["id"], "output_index": index}
        return [
            self._event(
                "response.output_text.done", **where, content_index=0, text=part["text"], logprobs=part["logprobs"]
            ),
            self._event("response.content_part.done", **where, content_index=0, part=part),
            self._event("response.output_item.done", output_index=index, item=item),
        ]

    def _add_text(self, text: str, logprobs: tuple[TokenLogprob, ...]) -> list[dict[str, Any]]:
        events = self._open_message() if self._message is None else []
        assert self._message is not None
        self._text.append(text)
        self._logprobs += [logprob_entry(entry) for entry in logprobs]
        events.append(
            self._event(
                "response.output_text.delta",
                item_id=self._message["id"],
                output_index=len(self._output),
                content_index=0,
                delta=text,
                logprobs=[delta_logprob_entry(entry) for entry in logprobs],
            )
        )
        return events

    def _add_tool_call(self, call: ToolCall) -> list[dict[str, Any]]:
        events = self._close_message("completed")
        item = {
            "id": self._ids("fc"),
            "type": "function_call",
            "status": "in_progress",
            "call_id": call.id,
            "name": call.name,
        }
        index = len(self._output)
        done = {**item, "arguments": call.arguments, "status": "completed"}
        self._output.append(done)
        where = {"item_id": item["id"], "output_index": index}
        return [
            *events,
            self._event("response.output_item.added", output_index=index, item={**item, "arguments": ""}),
            self._event("response.function_call_arguments.delta", **where, delta=call.arguments),
            self._event("response.function_call_arguments.done", **where, arguments=call.arguments),
            self._event("response.output_item.done", output_index=index, item=done),
        ]


def collect_response(
    request: ResponsesRequest, outcomes: Sequence[Outcome], *, model: str, builder: ResponseBuilder | None = None
) -> dict[str, Any]:
    """The whole Response of a finished answer's outcomes (the non-streamed answer)."""
    builder = builder or ResponseBuilder(request, model=model)
    for outcome in outcomes:
        builder.feed(outcome)
    builder.finish()
    return builder.response()


class ResponsesFormat:
    """The Responses API as an ``AnswerFormat`` (``peerinfer.api.choices``) for the serving core."""

    def __init__(self, request: ResponsesRequest, *, model: str, builder: ResponseBuilder | None = None) -> None:
        self.builder = builder or ResponseBuilder(request, model=model)

    def opening(self) -> list[bytes]:
        return [sse_event(event) for event in self.builder.start()]

    def frames(self, outcome: Outcome) -> list[bytes]:
        if isinstance(outcome, KeepAlive):
            return [KEEPALIVE]
        return [sse_event(event) for event in self.builder.feed(outcome)]

    def closing(self) -> list[bytes]:
        return [sse_event(event) for event in self.builder.finish()]

    def whole(self, outcomes: Sequence[Outcome]) -> dict[str, Any]:
        return collect_response(self.builder.request, outcomes, model=self.builder.model, builder=self.builder)
