"""A scripted engine for fast tests: byte-level tokens, replies chosen by a function.

Token ids: 0 is end-of-generation, ``b + 1`` is the byte ``b``. A reply is emitted one byte per
token, so multi-byte characters are split across tokens exactly as a real tokenizer can split them.
The scheduling (slots, queue, cancellation, stops, limits, ``n`` followers) is the real ``BatchScheduler``.

What the fake does not model: grammars, ``logit_bias`` and penalties are accepted and ignored (the
reply is the responder's whatever they say), and its log-probabilities are made up: each token gets
``CHOSEN_LOGPROB``, and its alternatives are other bytes, less likely (see ``fake_top``).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from peerinfer.engine.base import EngineStats, Generation, ModelInfo, SamplingParams
from peerinfer.engine.json_schema import check_schema
from peerinfer.engine.prompt import PromptPart
from peerinfer.engine.scheduler import BatchScheduler, Sampled, SlotWork

END_TOKEN = 0
N_VOCAB = 257
CHOSEN_LOGPROB = -0.25
FAKE_JSON_GBNF = 'root ::= "{" [^}]* "}"'  # what json_grammar answers; the fake backend ignores grammars
Responder = Callable[[str], str]


def fake_top(token: int, k: int) -> tuple[tuple[int, float], ...]:
    """The made-up alternatives of ``token``: itself first, then the next byte tokens, each less likely."""
    others = [(token + step) % (N_VOCAB - 1) + 1 for step in range(1, k)]
    return ((token, CHOSEN_LOGPROB), *((other, -2.0 - rank) for rank, other in enumerate(others)))[:k]


def echo_responder(prompt: str) -> str:
    return f"You said: {prompt.strip().splitlines()[-1] if prompt.strip() else ''}"


class FakeBackend:
    def __init__(self, responder: Responder, n_ctx: int, token_delay_s: float) -> None:
        self.n_ctx_per_slot = n_ctx
        self._responder = responder
        self._delay = token_delay_s
        self._prompt: dict[int, list[int]] = {}
        self._reply: dict[int, list[int]] = {}
        self._logprobs: dict[int, int | None] = {}
        # Every decode call: (slot, start, tokens) of each row, and whether that slot was reading its
        # prompt (no reply yet). Tests count the prompt rows that were read.
        self.calls: list[list[tuple[int, int, int, bool]]] = []

    def begin(self, slot: int, params: SamplingParams, keep: int) -> int:
        self._prompt[slot] = self._prompt.get(slot, [])[:keep]
        self._reply.pop(slot, None)
        self._logprobs[slot] = params.logprobs
        return keep

    def decode(self, work: Sequence[SlotWork], spare: Mapping[int, int]) -> dict[int, Sampled]:
        if self._delay:
            time.sleep(self._delay)
        self.calls.append([(item.slot, item.start, len(item.tokens), item.slot not in self._reply) for item in work])
        sampled: dict[int, Sampled] = {}
        for item in work:
            reply = self._reply.get(item.slot)
            self._prompt[item.slot].extend(item.tokens)  # what the slot's cache holds, answers included
            if reply is None:
                if not item.want_output:
                    continue
                prompt = bytes(token - 1 for token in self._prompt[item.slot]).decode("utf-8", "replace")
                reply = [byte + 1 for byte in self._responder(prompt).encode()] + [END_TOKEN]
                self._reply[item.slot] = reply
            token = reply.pop(0) if reply else END_TOKEN
            k = self._logprobs.get(item.slot)
            if k is None:
                sampled[item.slot] = Sampled(token)
            else:
                sampled[item.slot] = Sampled(token, CHOSEN_LOGPROB, fake_top(token, k))
        return sampled

    def prompt_rows(self) -> int:
        """Rows decoded so far for slots that were reading a prompt."""
        return sum(size for call in self.calls for _, _, size, reading in call if reading)

    def piece(self, token: int) -> bytes:
        return bytes([token - 1])

    def is_end(self, token: int) -> bool:
        return token == END_TOKEN

    def release(self, slot: int, keep: int) -> int:
        self._prompt[slot] = self._prompt.get(slot, [])[:keep]
        self._reply.pop(slot, None)
        self._logprobs.pop(slot, None)
        return keep

    def copy(self, source: int, target: int) -> None:
        self._prompt[target] = list(self._prompt.get(source, []))


class FakeEngine:
    """An ``Engine`` whose replies come from ``responder``; ``token_delay_s`` paces each step."""

    def __init__(
        self,
        responder: Responder = echo_responder,
        *,
        token_delay_s: float = 0.0,
        load_delay_s: float = 0.0,
        n_ctx: int = 4096,
        slots: int = 2,
        max_queue: int = 4,
        chat_template: str | None = None,
    ) -> None:
        self._info = ModelInfo(
            model_id="fake-model",
            path="fake.gguf",
            sha256=hashlib.sha256(b"fake-model").hexdigest(),
            size_bytes=0,
            n_ctx=n_ctx,
            slots=slots,
            n_threads=1,
            chat_template=chat_template,
            bos_token="",
            eos_token="",
            n_vocab=N_VOCAB,
            build="peerinfer fake engine",
        )
        self._load_delay = load_delay_s
        self._loaded = False
        self.backend = FakeBackend(responder, n_ctx, token_delay_s)
        self._scheduler = BatchScheduler(
            backend=self.backend,
            slots=slots,
            max_queue=max_queue,
            prefill_chunk=n_ctx,
        )

    @property
    def info(self) -> ModelInfo:
        return self._info

    def load(self) -> None:
        if self._loaded:
            return
        time.sleep(self._load_delay)
        self._scheduler.start()
        self._loaded = True

    def tokenize(self, prompt: str | Sequence[PromptPart], *, add_bos: bool) -> list[int]:
        text = prompt if isinstance(prompt, str) else "".join(part.text for part in prompt)
        return [byte + 1 for byte in text.encode()]  # bytes only: this vocabulary has no control tokens

    def submit(self, generation: Generation) -> None:
        self._scheduler.submit(generation)

    def submit_all(self, generations: Sequence[Generation]) -> None:
        self._scheduler.submit_all(generations)

    def json_grammar(self, schema: Mapping[str, Any] | None) -> str:
        """The real engine's checks of ``schema``; the grammar is always "any JSON object" (the fake ignores it)."""
        if schema is not None:
            check_schema(schema)
        return FAKE_JSON_GBNF

    def stats(self) -> EngineStats:
        return self._scheduler.stats()

    def close(self) -> None:
        self._scheduler.close()
