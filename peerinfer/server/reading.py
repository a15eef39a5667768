"""Prompts to tokens, bounded: what a hostile prompt can cost is checked before it costs much.

Limits are checked here, before anything is queued, so a bad request never takes a slot.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import anyio

from peerinfer.engine.base import Engine
from peerinfer.engine.prompt import ChatPrompt, ChatTurn, PromptPart
from peerinfer.errors import ContextLengthError, RequestError

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
# More messages than this are rendered off the loop (see PromptReader.render).
INLINE_RENDER_TURNS = 64


class PromptReader:
    """Tokenises prompts for the engine, refusing one that cannot fit as soon as a head of it shows that."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
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

    async def tokenize(self, prompt: str | Sequence[PromptPart], add_bos: bool, param: str) -> list[int]:
        """The prompt's tokens; ``ContextLengthError`` (naming ``param``) when they cannot fit with one more."""
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

    async def render(self, turns: Sequence[ChatTurn], render: Callable[[], ChatPrompt]) -> ChatPrompt:
        """``render()``, off the loop for a conversation that takes long to render."""
        # A body of 20,000 empty messages took 0.36 s to render (a Jinja template, more): not on the loop.
        many = len(turns) > INLINE_RENDER_TURNS or sum(len(turn.content) for turn in turns) > INLINE_TOKENIZE_CHARS
        return await anyio.to_thread.run_sync(render) if many else render()


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
