"""``/v1/responses`` through the gateway: served as the chat completion it means, routed and resumed like one.

The request is checked as a worker checks it, written as its chat body (``api.responses.to_chat_body``),
and routed as a streamed chat. The peers' chunks (their keys checked by ``api.relay``) become the
outcomes the worker's own Responses writer takes (``api.responses_output.ResponseBuilder``), so the
events and the Response object are the worker's, and a text answer whose peer dies is resumed on
another like any chat. An answer with tools, structured output or log-probabilities cannot be
resumed (``client.resume``): it fails over before its first text only. A worker's 400 names the
field this client sent (``max_output_tokens``, not ``max_completion_tokens``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi.responses import JSONResponse, Response

from peerinfer.api import openai as wire
from peerinfer.api.choices import AnswerUsage, ChoiceDelta, ChoiceEnd, FinishReason, ToolCall
from peerinfer.api.relay import SwitchFacts, stream_choice
from peerinfer.api.responses import ResponsesRequest, responses_error, responses_param, to_chat_body
from peerinfer.api.responses_output import ResponseBuilder, sse_event
from peerinfer.client.answer import PeerChunk, PeerOpened, RoutedAnswer
from peerinfer.client.resume import chat_plan
from peerinfer.client.stream_events import StreamChunk
from peerinfer.engine.base import TokenLogprob, TopLogprob
from peerinfer.errors import ClientError, RequestError
from peerinfer.gateway.serving import PEERS_HEADER, relay_stream

if TYPE_CHECKING:
    from peerinfer.gateway.app import GatewayState

FINISHES: dict[str, FinishReason] = {"stop": "stop", "length": "length", "tool_calls": "tool_calls"}


def _piece(entry: dict[str, Any]) -> bytes:
    raw = entry.get("bytes")
    return bytes(raw) if isinstance(raw, list) else str(entry["token"]).encode()


def _logprobs(checked: dict[str, Any] | None) -> tuple[TokenLogprob, ...]:
    """A chunk's chat log-probabilities (already checked by ``api.relay``) as the engine's entries."""
    if checked is None or not checked.get("content"):
        return ()
    return tuple(
        TokenLogprob(
            _piece(entry),
            entry["logprob"],
            tuple(TopLogprob(_piece(top), top["logprob"]) for top in entry["top_logprobs"]),
        )
        for entry in checked["content"]
    )


def _tool_calls(delta: dict[str, Any]) -> tuple[ToolCall, ...]:
    """Whole tool calls (a worker streams each in one delta); pieces of one are not a call."""
    calls = []
    for call in delta.get("tool_calls", ()):
        function = call.get("function", {})
        if isinstance(call.get("id"), str) and isinstance(function.get("name"), str):
            calls.append(ToolCall(call["id"], function["name"], function.get("arguments", "")))
    return tuple(calls)


class ResponsesRelay:
    """Writes a routed chat answer as the Responses API's events (see the module)."""

    def __init__(self, builder: ResponseBuilder) -> None:
        self.builder = builder
        self.peers: list[str] = []

    def _frames(self, events: list[dict[str, Any]]) -> list[bytes]:
        return [sse_event(event) for event in events]

    def opened(self, peer_id: str, url: str, switch: SwitchFacts | None) -> list[bytes]:
        self.peers.append(peer_id)
        return self._frames(self.builder.start()) if len(self.peers) == 1 else []

    def chunk(self, chunk: StreamChunk) -> list[bytes]:
        raw = chunk.payload.get("choices")
        events: list[dict[str, Any]] = []
        for value in raw if isinstance(raw, list) else ():
            choice = stream_choice(value, "chat")
            if choice is None or choice["index"] != 0:
                continue
            delta = choice["delta"]
            outcome = ChoiceDelta(0, delta.get("content") or "", _logprobs(choice["logprobs"]), _tool_calls(delta))
            if outcome.text or outcome.logprobs or outcome.tool_calls:
                events += self.builder.feed(outcome)
        return self._frames(events)

    def finish(self, answer: RoutedAnswer) -> list[bytes]:
        finish = FINISHES.get(answer.finish_reason or "stop", "stop")
        events = self.builder.feed(ChoiceEnd(0, finish, answer.completion_tokens))
        events += self.builder.feed(AnswerUsage(answer.prompt_tokens or 0, answer.completion_tokens))
        return self._frames(events + self.builder.finish())

    def failed(self, message: str, code: str) -> list[bytes]:
        return self._frames(self.builder.fail(message))


def _renamed(exc: ClientError, request: ResponsesRequest) -> ClientError:
    """A worker's refusal of the chat body, naming the field of the Responses request instead."""
    if exc.error is not None and isinstance(exc.error.get("param"), str):
        exc.error = {**exc.error, "param": responses_param(exc.error["param"], request)}
    return exc


async def serve(state: GatewayState, request: ResponsesRequest) -> Response:
    """One Responses request, streamed or whole, from the network."""
    router = state.routing()
    body = to_chat_body(request)
    try:
        wire.parse_request(wire.ChatCompletionRequest, wire.dumps(body).encode("utf-8"))
    except RequestError as exc:
        raise responses_error(exc, request) from exc
    plan = chat_plan(body)
    model = request.model or state.settings.model or "peerinfer"
    relay = ResponsesRelay(ResponseBuilder(request, model=model))
    entered = await state.admission.enter()
    handed_over = False
    try:
        if request.stream:
            handed_over = True  # from here the stream frees the place when it ends
            return await relay_stream(
                router.answer(plan),
                relay,
                state.metrics,
                keepalive_s=state.settings.keepalive_s,
                stall_s=state.settings.read_timeout_s,
                on_end=lambda: state.admission.leave(entered),
            )
        answer = router.answer(plan)
        async for event in answer:
            if isinstance(event, PeerOpened):
                relay.opened(event.peer_id, event.url, event.switch)
            elif isinstance(event, PeerChunk):
                relay.chunk(event.chunk)
        relay.finish(answer)
        return JSONResponse(relay.builder.response(), headers={PEERS_HEADER: ",".join(relay.peers)})
    except ClientError as exc:
        raise _renamed(exc, request)  # noqa: B904 -- the same error, its param renamed
    finally:
        if not handed_over:
            state.admission.leave(entered)
