"""The serving core every endpoint shares: a prepared job in, one HTTP response out.

An endpoint (``chat.py``, ``completions.py``, the Responses API) turns its request into a ``Job``
(the prompt's tokens once, and each choice's sampling) and picks its wire format (an
``AnswerFormat``); ``Serving.respond`` does the rest, once: submit the choices (``n`` > 1 through
``Engine.submit_all``, the followers sharing the first one's prompt), merge their engine events into
``Outcome``s, feed the metrics, and stream or collect. Headers go out with the first outcome (the
first token, or a ``KeepAlive`` after ``keepalive_s``): nothing competes with llama.cpp for the CPU
while the prompt is read. A client that leaves cancels every choice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Protocol

import anyio
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive

from peerinfer.api import openai as wire
from peerinfer.api import sse
from peerinfer.api.choices import (
    AnswerFailed,
    AnswerFormat,
    AnswerUsage,
    ChoiceDelta,
    ChoiceEnd,
    FinishReason,
    KeepAlive,
    Outcome,
    ToolCall,
)
from peerinfer.engine.base import Engine, Event, Finished, Generation, SamplingParams, TextDelta
from peerinfer.errors import EngineError, RequestError
from peerinfer.server.metrics import WorkerMetrics
from peerinfer.server.reading import PromptReader
from peerinfer.settings import WorkerSettings

NO_CALLS: tuple[ToolCall, ...] = ()


class ToolCallReader(Protocol):
    """Reads tool calls out of a choice's text (``peerinfer.engine.tool_calls.ToolCallParser``)."""

    calls: int

    def feed(self, delta: str) -> tuple[str, tuple[ToolCall, ...]]: ...

    def finish(self) -> tuple[str, tuple[ToolCall, ...]]: ...


@dataclass(frozen=True)
class Job:
    """One request, ready for the engine: its prompt's tokens, read once, and each choice's sampling."""

    prompt_tokens: list[int]
    choices: tuple[SamplingParams, ...]
    # Chat answers start at their first visible character, as OpenAI's do.
    strip_leading_space: bool = False
    # Tools were rendered into the prompt: each choice's text goes through one of these.
    tool_calls: Callable[[], ToolCallReader] | None = None


def max_tokens(requested: int | None, default: int, cap: int, param: str = "max_tokens") -> int:
    if requested is not None and requested > cap:
        raise RequestError(
            f"{param} is {requested} but this worker allows at most {cap}; lower it or raise "
            "PEERINFER_MAX_TOKENS_CAP on the worker",
            param=param,
        )
    return requested if requested is not None else min(default, cap)


class Serving:
    """What the endpoints share: the engine, the prompt reader, the sampling defaults and the metrics."""

    def __init__(self, engine: Engine, settings: WorkerSettings, metrics: WorkerMetrics) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.reader = PromptReader(engine)

    @property
    def model(self) -> str:
        return self.engine.info.model_id

    @property
    def fingerprint(self) -> str:
        return wire.system_fingerprint(self.engine.info)

    def sampling(
        self,
        request: wire.SamplingFields,
        *,
        limit: int,
        stops: tuple[str, ...],
        grammar: str | None = None,
        logprobs: int | None = None,
    ) -> tuple[SamplingParams, ...]:
        """Each choice's sampling: the same, but for the seed (``seed``, ``seed + 1``, ... when one is given)."""
        info = self.engine.info
        if request.choices > info.slots:
            raise RequestError(
                f"n is {request.choices} but this worker decodes at most {info.slots} answers at once "
                "(PEERINFER_SLOTS); lower n",
                param="n",
            )
        biases = request.biases
        if info.n_vocab:
            for token, _ in biases:
                if token >= info.n_vocab:
                    raise RequestError(
                        f"logit_bias names token {token} but the vocabulary has tokens 0 to {info.n_vocab - 1}",
                        param="logit_bias",
                    )
        first = SamplingParams(
            max_tokens=limit,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            top_k=self.settings.top_k if request.top_k is None else request.top_k,
            seed=request.seed,
            stops=stops,
            logit_bias=biases,
            presence_penalty=request.presence_penalty or 0.0,
            frequency_penalty=request.frequency_penalty or 0.0,
            grammar=grammar,
            logprobs=logprobs,
        )
        seeds = [None if request.seed is None else request.seed + index for index in range(request.choices)]
        return tuple(replace(first, seed=seed) for seed in seeds)

    async def grammar(self, response_format: wire.ResponseFormat | None) -> str | None:
        """The GBNF a ``response_format`` asks for; a schema the converter cannot express is a 400."""
        if response_format is None or response_format.type == "text":
            return None
        if response_format.type == "json_object" or response_format.json_schema is None:
            return self.engine.json_grammar(None)
        schema = response_format.json_schema.schema_ or {}
        try:
            # A big schema takes a while to convert: not on the loop.
            return await anyio.to_thread.run_sync(self.engine.json_grammar, schema)
        except RequestError as exc:
            raise RequestError(exc.message, param="response_format.json_schema.schema") from exc

    def start(self, job: Job) -> Answer:
        """Submits the job's choices (all or none: ``OverloadedError`` when they do not all fit)."""
        loop = asyncio.get_running_loop()
        lead = Generation(job.prompt_tokens, job.choices[0], loop)
        generations = [lead] + [Generation(job.prompt_tokens, params, loop, follows=lead) for params in job.choices[1:]]
        if len(generations) == 1:
            self.engine.submit(lead)
        else:
            self.engine.submit_all(generations)
        return Answer(generations, self.metrics, self.settings.keepalive_s, job.strip_leading_space, job.tool_calls)

    async def respond(self, job: Job, receive: Receive, stream: bool, answer_format: AnswerFormat) -> Response:
        """The whole serving of one request: submit, then stream SSE or answer one JSON object."""
        answer = self.start(job)
        if stream:
            outcomes = answer.outcomes()
            try:
                async with cancelling_on_disconnect(receive, answer):
                    first = await anext(outcomes)
            except BaseException:
                answer.cancel()
                await outcomes.aclose()
                raise
            body = _stream(answer, answer_format, first, outcomes)
            return StreamingResponse(body, media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)
        try:
            async with cancelling_on_disconnect(receive, answer):
                collected = [outcome async for outcome in answer.outcomes() if not isinstance(outcome, KeepAlive)]
        finally:
            answer.cancel()
        failed = next((outcome for outcome in collected if isinstance(outcome, AnswerFailed)), None)
        if failed is not None:
            raise EngineError(f"generation failed: {failed.message}")
        if not any(isinstance(outcome, AnswerUsage) for outcome in collected):
            return JSONResponse({})  # the client is gone; nobody reads this
        return JSONResponse(answer_format.whole(collected))


async def _stream(
    answer: Answer, answer_format: AnswerFormat, first: Outcome, rest: AsyncGenerator[Outcome]
) -> AsyncIterator[bytes]:
    try:
        for frame in answer_format.opening():
            yield frame
        for frame in answer_format.frames(first):
            yield frame
        async for outcome in rest:
            for frame in answer_format.frames(outcome):
                yield frame
        for frame in answer_format.closing():
            yield frame
    finally:
        answer.cancel()
        await rest.aclose()


class _LeadingSpace:
    def __init__(self, active: bool) -> None:
        self.active = active

    def __call__(self, text: str) -> str:
        if not self.active:
            return text
        text = text.lstrip()
        self.active = not text
        return text


class Answer:
    """The choices of one request inside the engine, read as one stream of ``Outcome``s."""

    def __init__(
        self,
        generations: Sequence[Generation],
        metrics: WorkerMetrics,
        keepalive_s: float,
        strip: bool = False,
        tool_calls: Callable[[], ToolCallReader] | None = None,
    ) -> None:
        self.generations = list(generations)
        self.metrics = metrics
        self.keepalive_s = keepalive_s
        self.started = time.perf_counter()
        self._strips = [_LeadingSpace(strip) for _ in generations]
        self._readers = [tool_calls() for _ in generations] if tool_calls is not None else None
        self._first: list[float | None] = [None] * len(generations)

    def cancel(self) -> None:
        for generation in self.generations:
            generation.cancel()

    async def outcomes(self) -> AsyncGenerator[Outcome]:
        """``ChoiceDelta``s and a ``ChoiceEnd`` per choice, then one ``AnswerUsage``; or an ``AnswerFailed``.

        ``KeepAlive`` whenever ``keepalive_s`` passes without news. Ends early, without usage, when the
        choices were cancelled (the client left).
        """
        ended = 0
        prompt_tokens = completion_tokens = cached_tokens = 0
        events = self._single() if len(self.generations) == 1 else self._merged()
        try:
            async for item in events:
                if item is None:
                    yield KeepAlive()
                    continue
                index, event = item
                if isinstance(event, TextDelta):
                    if self._first[index] is None:
                        self._first[index] = time.perf_counter() - self.started
                    text, calls = event.text, NO_CALLS
                    if self._readers is not None:
                        text, calls = self._readers[index].feed(text)
                    text = self._strips[index](text)
                    if text or event.logprobs or calls:
                        yield ChoiceDelta(index, text, event.logprobs, calls)
                    continue
                self._observe(index, event)
                if event.reason == "cancelled":
                    return
                if event.reason not in ("stop", "length"):
                    self.cancel()
                    yield AnswerFailed(event.error or event.reason)
                    return
                if index == 0:
                    prompt_tokens, cached_tokens = event.prompt_tokens, event.cached_tokens
                completion_tokens += event.completion_tokens
                reason: FinishReason = event.reason
                if self._readers is not None:
                    reader = self._readers[index]
                    text, calls = reader.finish()
                    text = self._strips[index](text)
                    if text or calls:
                        yield ChoiceDelta(index, text, (), calls)
                    reason = "tool_calls" if reader.calls else reason
                yield ChoiceEnd(index, reason, event.completion_tokens)
                ended += 1
                if ended == len(self.generations):
                    yield AnswerUsage(prompt_tokens, completion_tokens, cached_tokens)
                    return
        finally:
            await events.aclose()

    def _observe(self, index: int, event: Finished) -> None:
        # The prompt is read once, by the first choice; the others copy its cache.
        lead = index == 0
        self.metrics.observe_generation(
            event.prompt_tokens if lead else 0,
            event.completion_tokens,
            self._first[index],
            time.perf_counter() - self.started,
            event.cached_tokens if lead else 0,
        )

    async def _single(self) -> AsyncGenerator[tuple[int, Event] | None]:
        queue = self.generations[0].events
        while True:
            try:
                # asyncio.timeout, unlike wait_for, creates no task per token.
                async with asyncio.timeout(self.keepalive_s):
                    event = await queue.get()
            except TimeoutError:
                yield None
                continue
            yield 0, event
            if isinstance(event, Finished):
                return

    async def _merged(self) -> AsyncGenerator[tuple[int, Event] | None]:
        """Events of several generations in the order they arrive (one waiting task per open choice)."""
        waiting: dict[asyncio.Task[Event], int] = {}

        def wait(index: int) -> None:
            waiting[asyncio.ensure_future(self.generations[index].events.get())] = index

        for index in range(len(self.generations)):
            wait(index)
        try:
            while waiting:
                done, _ = await asyncio.wait(waiting, timeout=self.keepalive_s, return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    yield None
                    continue
                for task in sorted(done, key=lambda task: waiting[task]):
                    index = waiting.pop(task)
                    event = task.result()
                    if not isinstance(event, Finished):
                        wait(index)
                    yield index, event
        finally:
            for task in waiting:
                task.cancel()


@asynccontextmanager
async def cancelling_on_disconnect(receive: Receive, answer: Answer) -> AsyncIterator[None]:
    """While inside, a client that goes away cancels the answer's choices.

    The body is read already, so the next ASGI message is the client's disconnect.
    """

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        answer.cancel()

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()
