"""From a validated OpenAI request to engine events, and from events to SSE or JSON.

Limits are checked here, before anything is queued, so a bad request never takes a slot.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import anyio
from starlette.types import Receive

from peerinfer.api import openai as wire
from peerinfer.api import sse
from peerinfer.engine.base import Engine, Event, Finished, Generation, SamplingParams, TextDelta
from peerinfer.engine.prompt import ChatPrompt, ChatTurn, PromptPart, render_chat
from peerinfer.errors import ContextLengthError, EngineError, PeerInferError, RequestError
from peerinfer.server.metrics import WorkerMetrics
from peerinfer.settings import WorkerSettings

# Tokenising a few KB takes well under a millisecond: cheaper on the loop than a hop to a thread.
INLINE_TOKENIZE_CHARS = 8192
# llama.cpp's tokenizer is quadratic in the user-defined tokens a text holds ("a\n\n" * 60000, 180 KB,
# took 49 s of a core): a long prompt is first read in growing heads (8 KB, 32 KB, ...), and refused
# as soon as one alone holds more than the context, so a body that cannot fit costs milliseconds.
PROBE_FIRST_CHARS = 8192
PROBE_GROWTH = 4
# A cut changes the tokens next to it (a long token, up to 48 bytes in Gemma's vocabulary, may become
# its bytes): a head may hold a few more tokens than the same text inside the whole prompt. A head
# is refused only beyond the context by this margin, so that a prompt that fits is never refused.
PROBE_MARGIN_TOKENS = 64
# More messages than this are rendered off the loop (see prepare_chat).
INLINE_RENDER_TURNS = 64


@dataclass(frozen=True)
class PreparedRequest:
    kind: Literal["chat", "completion"]
    prompt_tokens: list[int]
    params: SamplingParams
    include_usage: bool
    strip_leading_space: bool


def _max_tokens(requested: int | None, default: int, cap: int) -> int:
    if requested is not None and requested > cap:
        raise RequestError(
            f"max_tokens is {requested} but this worker allows at most {cap}; lower it or raise "
            "PEERINFER_MAX_TOKENS_CAP on the worker",
            param="max_tokens",
        )
    return requested if requested is not None else min(default, cap)


class CompletionService:
    def __init__(self, engine: Engine, settings: WorkerSettings, metrics: WorkerMetrics) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self._tokenize_limiter: anyio.CapacityLimiter | None = None  # made on the loop, at first use

    async def _tokenize_once(self, prompt: str | Sequence[PromptPart], add_bos: bool) -> list[int]:
        if _chars(prompt) <= INLINE_TOKENIZE_CHARS:
            return self.engine.tokenize(prompt, add_bos=add_bos)
        # One long prompt at a time: 60 KB of spaces fits the context and still takes ~10 s to tokenise,
        # so concurrent ones would take every core from the decoding thread.
        if self._tokenize_limiter is None:
            self._tokenize_limiter = anyio.CapacityLimiter(1)
        return await anyio.to_thread.run_sync(
            lambda: self.engine.tokenize(prompt, add_bos=add_bos), limiter=self._tokenize_limiter
        )

    async def _tokenize(self, prompt: str | Sequence[PromptPart], add_bos: bool, param: str) -> list[int]:
        n_ctx = self.engine.info.n_ctx
        chars = _chars(prompt)
        head_chars = PROBE_FIRST_CHARS
        while head_chars < chars:
            counted = len(await self._tokenize_once(_head(prompt, head_chars), add_bos)) - PROBE_MARGIN_TOKENS
            if counted >= n_ctx:
                raise ContextLengthError(
                    f"the prompt has more than {counted} tokens but the context holds {n_ctx} (its first {head_chars} "
                    f"of {chars} characters alone hold that many); shorten it or raise PEERINFER_N_CTX on the worker",
                    param=param,
                )
            head_chars *= PROBE_GROWTH
        tokens = await self._tokenize_once(prompt, add_bos)
        if not tokens:
            raise RequestError("the prompt is empty; send some text", param=param)
        if len(tokens) >= n_ctx:
            raise ContextLengthError(
                f"the prompt has {len(tokens)} tokens but the context holds {n_ctx} (and at least one token "
                "must be generated); shorten it or raise PEERINFER_N_CTX on the worker",
                param=param,
            )
        return tokens

    def _sampling(self, request: wire.SamplingFields, max_tokens: int, stops: tuple[str, ...]) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=self.settings.top_k if request.top_k is None else request.top_k,
            seed=request.seed,
            stops=stops,
        )

    async def prepare_chat(self, request: wire.ChatCompletionRequest) -> PreparedRequest:
        info = self.engine.info
        turns = [ChatTurn(message.role, message.text) for message in request.messages]

        def render() -> ChatPrompt:
            return render_chat(
                turns,
                info.chat_template,
                bos_token=info.bos_token,
                eos_token=info.eos_token,
                continue_final=request.continue_final_message,
            )

        # A body of 20,000 empty messages took 0.36 s to render (a Jinja template, more): not on the loop.
        many = len(turns) > INLINE_RENDER_TURNS or sum(len(turn.content) for turn in turns) > INLINE_TOKENIZE_CHARS
        prompt = await anyio.to_thread.run_sync(render) if many else render()
        # Control tokens come from the template's markup only, never from a message's text.
        tokens = await self._tokenize(prompt.parts, prompt.add_bos, "messages")
        cap = self.settings.max_tokens_cap
        params = self._sampling(request, _max_tokens(request.token_limit, cap, cap), request.stops + prompt.stops)
        return PreparedRequest("chat", tokens, params, request.include_usage, not request.continue_final_message)

    async def prepare_completion(self, request: wire.CompletionRequest) -> PreparedRequest:
        text = request.prompt_text
        if request.parse_special:
            bos = self.engine.info.bos_token
            prompt: str | list[PromptPart] = [PromptPart(text, markup=True)]
            add_bos = not (bos and text.startswith(bos))  # a prompt that writes its own BOS gets one
        else:
            prompt, add_bos = text, True  # text only: see the README on raw prompts
        tokens = await self._tokenize(prompt, add_bos, "prompt")
        limit = _max_tokens(request.max_tokens, wire.COMPLETIONS_DEFAULT_MAX_TOKENS, self.settings.max_tokens_cap)
        params = self._sampling(request, limit, request.stops)
        return PreparedRequest("completion", tokens, params, request.include_usage, False)

    def start(self, prepared: PreparedRequest) -> Generation:
        generation = Generation(prepared.prompt_tokens, prepared.params, asyncio.get_running_loop())
        self.engine.submit(generation)
        return generation

    async def first_event(self, generation: Generation, receive: Receive) -> Event | None:
        """Wait up to ``keepalive_s`` for the first event, stopping the generation if the client leaves.

        Response headers go out together with the first token: nothing else (our event loop, the
        client reacting to headers) competes with llama.cpp for the CPU while the prompt is read.
        """
        try:
            async with _cancelling_on_disconnect(receive, generation), asyncio.timeout(self.settings.keepalive_s):
                return await generation.events.get()
        except TimeoutError:
            return None

    async def events(
        self, generation: Generation, started: float, pending: Event | None = None
    ) -> AsyncIterator[Event | None]:
        """The generation's events (``pending`` first); ``None`` whenever ``keepalive_s`` passes without one.

        Feeds the metrics, timing from ``started`` (a ``time.perf_counter()`` value).
        """
        first: float | None = None
        while True:
            if pending is not None:
                event, pending = pending, None
            else:
                try:
                    # asyncio.timeout, unlike wait_for, creates no task per token.
                    async with asyncio.timeout(self.settings.keepalive_s):
                        event = await generation.events.get()
                except TimeoutError:
                    yield None
                    continue
            if first is None and isinstance(event, TextDelta):
                first = time.perf_counter() - started
            if isinstance(event, Finished):
                total = time.perf_counter() - started
                self.metrics.observe_generation(
                    event.prompt_tokens, event.completion_tokens, first, total, event.cached_tokens
                )
            yield event
            if isinstance(event, Finished):
                return


def _chars(prompt: str | Sequence[PromptPart]) -> int:
    return len(prompt) if isinstance(prompt, str) else sum(len(part.text) for part in prompt)


def _head(prompt: str | Sequence[PromptPart], chars: int) -> str | list[PromptPart]:
    """The first ``chars`` characters of a prompt, its parts' kinds kept."""
    if isinstance(prompt, str):
        return prompt[:chars]
    head: list[PromptPart] = []
    for part in prompt:
        if chars <= 0:
            break
        head.append(part if len(part.text) <= chars else PromptPart(part.text[:chars], part.markup))
        chars -= len(part.text)
    return head


def _finish_error(finished: Finished) -> PeerInferError:
    return EngineError(f"generation failed: {finished.error or finished.reason}")


class _LeadingSpace:
    """Chat answers start at their first visible character, as OpenAI's do."""

    def __init__(self, active: bool) -> None:
        self.active = active

    def __call__(self, text: str) -> str:
        if not self.active:
            return text
        text = text.lstrip()
        self.active = not text
        return text


async def stream_sse(
    service: CompletionService,
    prepared: PreparedRequest,
    generation: Generation,
    model: str,
    started: float,
    pending: Event | None,
) -> AsyncIterator[bytes]:
    """SSE body: a role chunk, one chunk per text delta, a finish chunk, optional usage, [DONE]."""
    chat = prepared.kind == "chat"
    request_id = wire.new_id("chatcmpl" if chat else "cmpl")
    created = wire.now()
    strip = _LeadingSpace(prepared.strip_leading_space)

    def chunk(text: str, finish_reason: str | None = None) -> bytes:
        if chat:
            delta = {"content": text} if finish_reason is None else {}
            return sse.event(wire.chat_chunk(request_id, created, model, delta, finish_reason))
        return sse.event(wire.completion_chunk(request_id, created, model, text, finish_reason))

    try:
        if chat:
            yield sse.event(wire.chat_chunk(request_id, created, model, {"role": "assistant", "content": ""}))
        async for event in service.events(generation, started, pending):
            if event is None:
                yield sse.KEEPALIVE
            elif isinstance(event, TextDelta):
                text = strip(event.text)
                if text:
                    yield chunk(text)
            elif event.reason in ("stop", "length"):
                yield chunk("", event.reason)
                if prepared.include_usage:
                    counts = wire.usage(event.prompt_tokens, event.completion_tokens, event.cached_tokens)
                    name = "chat.completion.chunk" if chat else "text_completion"
                    yield sse.event(wire.usage_chunk(name, request_id, created, model, counts))
            else:
                error = _finish_error(event)
                yield sse.event(wire.error_body(error.message, error.error_type, code="generation_failed"))
        yield sse.DONE
    finally:
        generation.cancel()


async def collect_json(
    service: CompletionService,
    prepared: PreparedRequest,
    generation: Generation,
    model: str,
    started: float,
    receive: Receive,
) -> dict[str, Any]:
    """Whole answer as one JSON object; stops generating as soon as the client goes away."""
    strip = _LeadingSpace(prepared.strip_leading_space)
    parts: list[str] = []
    try:
        async with _cancelling_on_disconnect(receive, generation):
            async for event in service.events(generation, started):
                if event is None:
                    continue
                if isinstance(event, TextDelta):
                    parts.append(strip(event.text))
                    continue
                if event.reason == "cancelled":
                    return {}  # the client is gone; nobody reads this
                if event.reason not in ("stop", "length"):
                    raise _finish_error(event)
                counts = wire.usage(event.prompt_tokens, event.completion_tokens, event.cached_tokens)
                text = "".join(parts)
                if prepared.kind == "chat":
                    return wire.chat_completion(wire.new_id("chatcmpl"), wire.now(), model, text, event.reason, counts)
                return wire.completion(wire.new_id("cmpl"), wire.now(), model, text, event.reason, counts)
    finally:
        generation.cancel()
    raise EngineError("generation ended without a result")


@asynccontextmanager
async def _cancelling_on_disconnect(receive: Receive, generation: Generation) -> AsyncIterator[None]:
    """While inside, a client that goes away cancels the generation.

    The body is read already, so the next ASGI message is the client's disconnect.
    """

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        generation.cancel()

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()
