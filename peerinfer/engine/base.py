"""The narrow interface every engine offers, and the plain data that crosses it.

An engine takes a tokenised prompt with sampling parameters and yields events: text deltas
(already safe to display: whole UTF-8 characters, never part of a stop string) and one final
``Finished``. The server never touches llama.cpp directly.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from peerinfer.engine.prompt import PromptPart

FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stops: tuple[str, ...] = ()
    # (token id, bias added to its logit): OpenAI's logit_bias, -100 bans a token and 100 all but forces it.
    logit_bias: tuple[tuple[int, float], ...] = ()
    # OpenAI's semantics: each token's logit is lowered by presence_penalty once it was generated, and by
    # frequency_penalty times the number of times it was generated (generated tokens only, not the prompt).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # GBNF text with a rule "root": only tokens that keep the output inside the grammar are sampled.
    grammar: str | None = None
    # None: no log-probabilities. k >= 0: each generated token's, and its k most likely alternatives'.
    logprobs: int | None = None


@dataclass(frozen=True)
class TopLogprob:
    piece: bytes
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's bytes and log-probability under the model's own distribution (its logits row
    before any bias, penalty, temperature or grammar), with its ``top`` alternatives, most likely first."""

    piece: bytes
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class ModelInfo:
    """What the loaded model is; the API and the network describe it from this."""

    model_id: str
    path: str
    sha256: str
    size_bytes: int
    n_ctx: int
    slots: int
    n_threads: int
    chat_template: str | None
    bos_token: str
    eos_token: str
    n_vocab: int = 0
    build: str = ""  # the engine's build (e.g. "llama.cpp 0.3.36"): with sha256, the system_fingerprint


@dataclass(frozen=True)
class TextDelta:
    text: str
    # Log-probabilities of the tokens whose text this delta carries (a character held back over several
    # tokens carries all of theirs); empty unless the request asked for them.
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens found in the slot's cache (not read again)


Event = TextDelta | Finished


@dataclass(frozen=True)
class EngineStats:
    slots_total: int
    slots_busy: int
    queued: int
    # Decode calls that failed in a row, up to now (0: the last one worked), and the last one's error.
    decode_failures: int = 0
    last_error: str | None = None

    @property
    def failing(self) -> bool:
        """The engine's last decode call failed: it may not be able to serve (``/health`` says degraded)."""
        return self.decode_failures > 0


@dataclass
class Generation:
    """One request inside an engine. The engine's thread pushes events; the server awaits them."""

    prompt_tokens: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # n > 1: the other choices of one request follow the first. A follower is not admitted until the
    # generation it follows has read the prompt; it then copies that slot's cache, so the prompt is read once.
    follows: Generation | None = None

    def push(self, event: Event) -> None:
        """Thread-safe: deliver an event to the awaiting coroutine."""
        deliver([(self, event)])

    def cancel(self) -> None:
        self.cancelled.set()

    async def stream(self) -> AsyncIterator[Event]:
        while True:
            event = await self.events.get()
            yield event
            if isinstance(event, Finished):
                return


def deliver(batch: Sequence[tuple[Generation, Event]]) -> None:
    """Thread-safe: deliver many events with one wake-up of each event loop they go to.

    The engine's thread hands over a whole step's tokens at once: one wake-up instead of one per
    stream, and fewer hand-offs of the GIL between it and the event loop.
    """
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Generation, Event]]] = {}
    for generation, event in batch:
        by_loop.setdefault(generation.loop, []).append((generation, event))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:
            # The event loop is closed: nobody is listening any more.
            for generation, _ in items:
                generation.cancelled.set()


def _put_all(items: list[tuple[Generation, Event]]) -> None:
    for generation, event in items:
        generation.events.put_nowait(event)


class Engine(Protocol):
    """What the server needs from an engine."""

    @property
    def info(self) -> ModelInfo: ...

    def load(self) -> None:
        """Blocking: load weights. Called once, off the event loop."""

    def tokenize(self, prompt: str | Sequence[PromptPart], *, add_bos: bool) -> list[int]:
        """Token ids. A ``str`` is text: ``<eos>`` in it is five characters, never the control token.
        Parts make control tokens from their markup only (see ``prompt.split_at_controls``)."""

    def submit(self, generation: Generation) -> None:
        """Queue a generation; raises ``OverloadedError`` when the queue is full."""

    def submit_all(self, generations: Sequence[Generation]) -> None:
        """Queue the choices of one request, all or none: ``OverloadedError`` if they do not all fit."""

    def json_grammar(self, schema: Mapping[str, Any] | None) -> str:
        """GBNF (rule ``root``) for JSON text: any object when ``schema`` is None, else one that matches it.

        Raises ``RequestError`` naming the part of the schema it cannot express, or that is too big.
        """

    def stats(self) -> EngineStats: ...

    def close(self) -> None: ...
