"""Continuous batching over N slots, independent of the decoding library.

One thread owns the decoder (a llama.cpp context is not thread-safe, so nothing else touches it).
Each step it:

1. admits waiting requests into free slots, first in first out, each into a free slot next to the
   busy ones (a gap between running streams costs every step a row), among those the one that still
   holds the longest part of its prompt (a prompt it read before: a shared system prompt or an
   earlier turn of a chat is not read again), or copies that part from another slot that holds more
   of it (``choose_slot``);
2. frees slots whose client went away (within one step, i.e. about one token);
3. decodes one fixed-size chunk of the oldest unread prompt in a call of its own, then one token
   for every generating slot (including one whose prompt that chunk finished) in one batch, so a
   long prompt never stalls the running streams for more than one chunk, and its chunks are the
   same whatever else runs. While streams generate, a prompt's later chunks take at most
   ``prompt_share`` of the time (``PromptShare``): the streams' time per token stays under x2 at 0.45;
4. samples per slot and turns token bytes into text deltas (with the log-probabilities of their tokens);
5. after a call that gave some stream its first text, pauses ``first_token_pause_s`` before the next one.

The choices of one request (``n`` > 1) are one leader and its followers (``Generation.follows``): a
follower waits in the queue, without holding up the requests behind it, until its leader has read
the prompt; it then copies the leader's cache, so that the prompt is read once. With a cut-invariant
backend the copy stops one token short (a slot must compute its own last prompt row's logits), and
that token joins the step's generation call instead of costing a call of its own.

The decoder is a ``DecodeBackend``: llama.cpp in production, a scripted fake in fast tests.

A failed decode call fails only the requests it must. A call of several slots (or with throw-away
rows) that fails is tried again slot by slot, without throw-away rows, and only a slot that fails
alone is failed; the free slots offered for throw-away rows forget what their cache held. While the
last call failed, ``stats`` says so (``/health`` answers degraded), and an idle scheduler probes
the decoder every ``probe_interval_s`` with a one-token call, so that it finds out when it works again.

The lock that ``submit`` and ``stats`` take on the event loop is never held while the backend works:
admission takes the waiting requests under it, then copies and cuts caches after letting go.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from peerinfer.engine.base import (
    EngineStats,
    Event,
    Finished,
    FinishReason,
    Generation,
    SamplingParams,
    TextDelta,
    TokenLogprob,
    TopLogprob,
    deliver,
)
from peerinfer.engine.batching import PromptShare, choose_slot, reusable_prefix
from peerinfer.engine.text import TextAssembler
from peerinfer.engine.throughput import Throughput, retry_after_s
from peerinfer.errors import OverloadedError, PeerInferError

log = logging.getLogger(__name__)
T = TypeVar("T")
_BUG = "internal error in the worker's scheduler"


@dataclass(frozen=True)
class SlotWork:
    """Tokens of one slot to decode in this step, starting at position ``start``."""

    slot: int
    tokens: Sequence[int]
    start: int
    want_output: bool


@dataclass(frozen=True)
class Sampled:
    """What a backend sampled for one slot: the token and, if the request asked, log-probabilities.

    ``logprob`` is the token's under the model's own distribution (before bias, penalties, temperature or
    grammar) and ``top`` the most likely (token, log-probability) pairs, most likely first. ``error``:
    this slot could not sample (its grammar allows no token); ``token`` is then meaningless and only
    this request fails.
    """

    token: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()
    error: str | None = None


class DecodeBackend(Protocol):
    n_ctx_per_slot: int

    def begin(self, slot: int, params: SamplingParams, keep: int) -> int:
        """Prepare a slot (its sampler) for a new request, keeping the first ``keep`` positions of its cache.

        Returns how many it kept (``keep``, or 0 if the cache could not be cut there).
        """

    def decode(self, work: Sequence[SlotWork], spare: Mapping[int, int]) -> dict[int, Sampled]:
        """Decode one batch; return what was sampled for every slot that asked for output.

        The backend samples with the slot's parameters from ``begin`` and takes the token as generated
        (penalties and grammar see it); the scheduler accepts every token it returns.

        ``spare``: slots not in the batch that may hold a throw-away row, and the position it would take
        (always below ``n_ctx_per_slot``; their cache must be as before once the call returns). On
        failure it raises ``PeerInferError`` and leaves every slot's cache as before the call.
        """

    def piece(self, token: int) -> bytes: ...

    def is_end(self, token: int) -> bool: ...

    def release(self, slot: int, keep: int) -> int:
        """Free a slot's sampler and its cache past the first ``keep`` positions; returns how many it kept."""

    def copy(self, source: int, target: int) -> None:
        """Make ``target``'s cache a copy of ``source``'s (``begin`` then cuts it)."""


@dataclass
class _Slot:
    index: int
    generation: Generation
    assembler: TextAssembler
    admitted_at: float
    prefilled: int
    position: int
    cached: int  # prompt tokens found in the slot's cache, not read again
    next_token: int | None = None
    generated: int = 0
    sent_text: bool = False
    decoded: list[int] = field(default_factory=list)  # generated tokens now in the slot's cache
    chunks: int = 0  # prompt chunks read for this request
    # Log-probabilities of tokens whose text is not out yet, each with the character its text starts at.
    pending: list[tuple[int, TokenLogprob]] = field(default_factory=list)

    @property
    def prompt_left(self) -> int:
        return len(self.generation.prompt_tokens) - self.prefilled


@dataclass
class BatchScheduler:
    """Runs generations on a ``DecodeBackend`` in one background thread."""

    backend: DecodeBackend
    slots: int
    max_queue: int
    prefill_chunk: int
    # Keep what a finished request leaves in its slot, for a later prompt that starts alike.
    reuse_prompts: bool = True
    # The backend gives the same numbers however tokens are cut into calls, and for tokens decoded one
    # per call (llama.cpp with batch invariance): reuse may then end on any token and take in the
    # generated tokens too (a chat's earlier answers). Otherwise it keeps whole prompt chunks only.
    cut_invariant: bool = False
    # llama.cpp's threads take every core while they decode, so without a pause the server's event loop
    # (and a client on this machine) wait for the next step to be preempted before the first token goes out.
    first_token_pause_s: float = 0.0
    # The most of the decoding thread's time that reading a long prompt takes while other streams
    # generate (``PromptShare``); 1.0: chunks go every step, whatever they cost the running streams.
    prompt_share: float = 1.0
    _waiting: deque[Generation] = field(default_factory=deque)
    _active: dict[int, _Slot] = field(default_factory=dict)
    # Events not yet handed to the event loop: flushed after each decode call and each iteration.
    _outbox: list[tuple[Generation, Event]] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    # While the last decode call failed and nothing runs: seconds between one-token probe calls.
    probe_interval_s: float = 1.0
    # Injected by tests, so that they observe pauses and measure rates without timing anything.
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    _running: bool = False
    _thread: threading.Thread | None = None
    _first_text_out: bool = False
    # The tokens each free slot still holds in its cache, in a form that a fresh read would give.
    _kept: dict[int, list[int]] = field(default_factory=dict)
    _admitting: int = 0  # taken from the queue, not yet in a slot (the backend is preparing them)
    _throughput: Throughput = field(default_factory=Throughput)
    _finished_now: int = 0  # requests finished in the current iteration of the decoding thread
    _decode_failures: int = 0  # decode calls failed in a row
    _last_error: str | None = None
    _probe_token: int | None = None  # a token some prompt held: what a probe call decodes
    _share: PromptShare = field(init=False)  # from ``prompt_share``, in __post_init__

    def __post_init__(self) -> None:
        self._share = PromptShare(self.prompt_share)

    def start(self, prepare: Callable[[], T] | None = None) -> T | None:
        """Start the decoding thread; ``prepare`` runs on it first, and ``start`` returns its result.

        Everything that decodes runs on that one thread: llama.cpp's OpenMP worker threads belong to
        the thread that calls it, and a warm-up decoded on the loading thread (which stays alive,
        idle, in a pool) made every later 4-row step ~25% slower here.
        """
        outcome: list[T | BaseException] = []
        ready = threading.Event()

        def run() -> None:
            try:
                if prepare is not None:
                    outcome.append(prepare())
            except BaseException as exc:  # handed to the caller of start()
                outcome.append(exc)
                ready.set()
                return
            ready.set()
            self._run()

        self._running = True
        self._thread = threading.Thread(target=run, name="peerinfer-scheduler", daemon=True)
        self._thread.start()
        ready.wait()
        result = outcome[0] if outcome else None
        if isinstance(result, BaseException):
            self._running = False
            raise result
        return result

    def close(self) -> None:
        with self._cond:
            self._running = False
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for generation in list(self._waiting):
            generation.push(Finished("error", len(generation.prompt_tokens), 0, "the worker is shutting down"))
        self._waiting.clear()

    def submit(self, generation: Generation) -> None:
        with self._cond:
            if len(self._waiting) + len(self._active) + self._admitting >= self.slots + self.max_queue:
                raise OverloadedError(
                    f"all {self.slots} slots are busy and {len(self._waiting)} requests are already waiting "
                    f"(queue limit {self.max_queue}); retry later or raise PEERINFER_MAX_QUEUE",
                    retry_after=self.retry_after(),
                )
            self._waiting.append(generation)
            self._cond.notify_all()

    def submit_all(self, generations: Sequence[Generation]) -> None:
        """Queue all of ``generations`` or none (``OverloadedError``): the choices of one request."""
        with self._cond:
            if (
                len(self._waiting) + len(self._active) + self._admitting + len(generations)
                > self.slots + self.max_queue
            ):
                raise OverloadedError(
                    f"{len(generations)} choices need {len(generations)} places but all {self.slots} slots are "
                    f"busy or {len(self._waiting)} requests are already waiting (queue limit {self.max_queue}); "
                    "retry later, ask for fewer choices or raise PEERINFER_MAX_QUEUE",
                    retry_after=self.retry_after(),
                )
            self._waiting.extend(generations)
            self._cond.notify_all()

    def retry_after(self) -> int:
        """Seconds a rejected client should wait: until the queue ahead of it and itself got a slot."""
        return retry_after_s(len(self._waiting) + 1, self._throughput.per_s, self.slots)

    def stats(self) -> EngineStats:
        with self._cond:
            return EngineStats(
                slots_total=self.slots,
                slots_busy=len(self._active) + self._admitting,
                queued=len(self._waiting),
                decode_failures=self._decode_failures,
                last_error=self._last_error if self._decode_failures else None,
            )

    # The scheduler thread

    def _run(self) -> None:
        while True:
            probe = False
            with self._cond:
                while self._running and not self._waiting and not self._active:
                    if not self._decode_failures:
                        self._cond.wait()
                    elif not self._cond.wait(timeout=self.probe_interval_s):
                        probe = True
                        break
                if not self._running:
                    break
                taken = self._take_waiting()
            started = self.clock()
            busy = bool(taken or self._active)
            try:
                self._admit(taken)
                self._reap_cancelled()
                if self._active:
                    self._step()
                elif probe:
                    self._probe()
            except Exception:
                # A bug must fail the requests in flight, not stop the only decoding thread.
                log.exception("scheduler step failed; failing the requests in flight")
                self._after_bug()
            self._flush()
            if busy:
                self._throughput = self._throughput.after(self.clock() - started, self._finished_now)
            self._finished_now = 0
        for slot in list(self._active.values()):
            self._finish(slot, "error", "the worker is shutting down")
        self._flush()

    def _after_bug(self) -> None:
        """After an unexpected error: fail what runs and forget every kept cache (it may not be what we think)."""
        self._note_failure(_BUG)
        with self._cond:
            self._admitting = 0
        for slot in list(self._active.values()):
            try:
                self._finish(slot, "error", _BUG)
            except Exception:
                log.exception("could not release slot %d", slot.index)
                with self._cond:
                    self._active.pop(slot.index, None)
        for index in list(self._kept):
            try:
                self._forget(index)
            except Exception:
                log.exception("could not clear slot %d", index)

    def _emit(self, generation: Generation, event: Event) -> None:
        self._outbox.append((generation, event))

    def _flush(self) -> None:
        if self._outbox:
            batch, self._outbox = self._outbox, []
            deliver(batch)

    def _take_waiting(self) -> list[Generation]:
        """Under the lock: the waiting requests that the free slots take now (first in, first out).

        Only list work here: ``submit`` and ``stats`` wait on this lock from the event loop, so the
        backend's part of admission (a KV copy of ~38 MB, a cut) runs after it is let go, in ``_admit``.
        """
        taken: list[Generation] = []
        passed: list[Generation] = []  # followers whose leader has not read the prompt yet: they stay
        room = self.slots - len(self._active)
        while len(taken) < room and self._waiting:
            generation = self._waiting.popleft()
            if generation.cancelled.is_set():
                self._emit(generation, Finished("cancelled", len(generation.prompt_tokens), 0))
            elif self._leader_reading(generation, taken):
                passed.append(generation)
            else:
                taken.append(generation)
        self._waiting.extendleft(reversed(passed))
        self._admitting = len(taken)
        return taken

    def _leader_reading(self, generation: Generation, taken: Sequence[Generation]) -> bool:
        """Whether ``generation`` follows one that is still to read its prompt (waiting, or reading it).

        A leader that finished, failed or was cancelled is not waited for: the follower reads the
        prompt itself, or copies what the leader left.
        """
        leader = generation.follows
        if leader is None:
            return False
        if any(other is leader for other in taken) or any(other is leader for other in self._waiting):
            return True
        return any(slot.generation is leader and slot.prompt_left > 0 for slot in self._active.values())

    def _admit(self, taken: list[Generation]) -> None:
        free = [index for index in range(self.slots) if index not in self._active]
        for generation in taken:
            try:
                slot = self._prepare(generation, free)
            except Exception:
                log.exception("admitting a request failed")
                self._emit(generation, Finished("error", len(generation.prompt_tokens), 0, _BUG))
                slot = None
            with self._cond:
                self._admitting -= 1
                if slot is not None:
                    self._active[slot.index] = slot

    def _prepare(self, generation: Generation, free: list[int]) -> _Slot | None:
        """Put ``generation`` in one of the ``free`` slots (removed from the list); None if it failed there."""
        prompt = generation.prompt_tokens
        if not 0 < len(prompt) <= self.backend.n_ctx_per_slot:
            message = (
                f"the prompt has {len(prompt)} tokens but a slot holds 1 to {self.backend.n_ctx_per_slot}; "
                "shorten it or raise PEERINFER_N_CTX"
            )
            self._emit(generation, Finished("error", len(prompt), 0, message))
            return None
        self._probe_token = prompt[0]
        offered = self._kept if self.reuse_prompts else {}
        index = choose_slot(free, self._active, offered, prompt, self._reuse_unit)
        free.remove(index)
        kept = self._kept.pop(index, [])
        reuse = reusable_prefix(kept, prompt, self._reuse_unit) if self.reuse_prompts else 0
        try:
            donor, more = self._donor(prompt, index) if self.reuse_prompts else (None, 0)
            if donor is not None and more > reuse:
                self.backend.copy(donor, index)
                reuse = more
            reuse = self.backend.begin(index, generation.params, reuse)
        except Exception as exc:
            if not isinstance(exc, PeerInferError):
                log.exception("preparing slot %d failed", index)
            self.backend.release(index, 0)
            message = exc.message if isinstance(exc, PeerInferError) else _BUG
            self._emit(generation, Finished("error", len(prompt), 0, message))
            return None
        slot = _Slot(
            index=index,
            generation=generation,
            assembler=TextAssembler(generation.params.stops),
            admitted_at=self.clock(),
            prefilled=reuse,
            position=reuse,
            cached=reuse,
        )
        if self.cut_invariant and 0 < reuse == len(prompt) - 1:
            # Only the last prompt token is left (a follower's copy, or a repeated prompt): it joins the
            # step's generation call, where its row has the numbers a prompt call would give it.
            slot.next_token = prompt[-1]
        return slot

    def _donor(self, prompt: Sequence[int], target: int) -> tuple[int | None, int]:
        """The other slot, busy or free, whose cache holds the most of ``prompt``, and how much."""
        best: tuple[int | None, int] = (None, 0)
        for index in range(self.slots):
            if index == target:
                continue
            slot = self._active.get(index)
            held = self._held(slot) if slot is not None else self._kept.get(index, [])
            reuse = reusable_prefix(held, prompt, self._reuse_unit)
            if reuse > best[1]:
                best = (index, reuse)
        return best

    @property
    def _reuse_unit(self) -> int:
        return 1 if self.cut_invariant else self.prefill_chunk

    def _held(self, slot: _Slot) -> list[int]:
        """The start of what ``slot``'s cache holds that a fresh read of the same tokens would give.

        Everything when the backend is cut-invariant; else the prompt's whole chunks, read as a fresh
        read cuts them (generated tokens, decoded one per call, have other numbers there).
        """
        prompt = slot.generation.prompt_tokens
        if self.cut_invariant:
            return [*prompt[: slot.prefilled], *slot.decoded]
        return list(prompt[: slot.prefilled - slot.prefilled % self.prefill_chunk])

    def _reap_cancelled(self) -> None:
        for slot in list(self._active.values()):
            if slot.generation.cancelled.is_set():
                self._finish(slot, "cancelled")

    def _prompt_chunk(self, generating: bool) -> list[SlotWork]:
        """One fixed-size chunk of the oldest unread prompt, for a call of its own (empty: none left).

        A prompt is read alone in its calls, ``prefill_chunk`` tokens from where its read stands, so its
        numbers do not depend on what else the worker is doing. It goes before the step's generation
        call: a short prompt's first token then leaves a whole decode step earlier.
        """
        share = self._share
        reading = [
            slot
            for slot in self._active.values()
            if slot.next_token is None
            and slot.prompt_left > 0
            and share.may_read(generating, first_chunk=slot.chunks == 0)
        ]
        if not reading:
            return []
        slot = min(reading, key=lambda s: s.admitted_at)
        size = min(self.prefill_chunk, slot.prompt_left)
        tokens = slot.generation.prompt_tokens[slot.prefilled : slot.prefilled + size]
        return [SlotWork(slot.index, tokens, slot.position, size == slot.prompt_left)]

    def _next_tokens(self) -> list[SlotWork]:
        """Every generating slot's next token, for one call, planned after the step's prompt chunk.

        A prompt finished by that chunk joins at once: the batch stays full and in one run of slots
        (0, 1, 2, 3 rather than 0, 2, 3, which llama.cpp decodes as two passes over the weights). In slot
        order for the same reason: slots 1, 2, 3, 0 cost two passes (61 ms against 37 ms for 0, 1, 2, 3).
        """
        return [
            SlotWork(slot.index, [slot.next_token], slot.position, True)
            for slot in sorted(self._active.values(), key=lambda slot: slot.index)
            if slot.next_token is not None
        ]

    def _step(self) -> None:
        generating = any(slot.next_token is not None for slot in self._active.values())
        chunk = self._prompt_chunk(generating)
        if chunk:
            self._active[chunk[0].slot].chunks += 1
            started = self.clock()
            self._decode(chunk)
            self._share = self._share.after_chunk(self.clock() - started, generating)
        work = self._next_tokens()
        if work:
            started = self.clock()
            self._decode(work)
            self._share = self._share.after_generation(self.clock() - started)

    def _decode(self, work: list[SlotWork]) -> None:
        spare = self._spare(work)
        try:
            sampled = self.backend.decode(work, spare)
        except PeerInferError as exc:
            self._after_failed_call(work, spare, exc.message)
        else:
            self._note_success()
            self._apply(work, sampled)
        self._flush()  # this call's tokens go out now, not after the step's other call
        if self._first_text_out:
            self._first_text_out = False
            if self.first_token_pause_s > 0:
                self.sleep(self.first_token_pause_s)

    def _after_failed_call(self, work: list[SlotWork], spare: Mapping[int, int], message: str) -> None:
        """Fail only the slots whose own call fails: another slot's state must not fail a request."""
        log.error("decode failed for slots %s (spare %s): %s", [item.slot for item in work], dict(spare), message)
        self._note_failure(message)
        for index in spare:
            if index not in self._active:
                self._forget(index)  # its throw-away row may be what failed; its cache may not be as recorded
        if len(work) == 1 and not spare:
            self._finish(self._active[work[0].slot], "error", message)
            return
        for item in work:  # alone and without throw-away rows (the backend left every cache as before)
            try:
                sampled = self.backend.decode([item], {})
            except PeerInferError as exc:
                log.error("decode failed for slot %d alone: %s", item.slot, exc.message)
                self._note_failure(exc.message)
                self._finish(self._active[item.slot], "error", exc.message)
            else:
                self._note_success()
                self._apply([item], sampled)

    def _apply(self, work: list[SlotWork], sampled: Mapping[int, Sampled]) -> None:
        for item in work:
            slot = self._active[item.slot]
            slot.position += len(item.tokens)
            if slot.prompt_left > 0:
                slot.prefilled += len(item.tokens)
            else:
                slot.decoded.extend(item.tokens)
            if item.slot in sampled:
                self._accept(slot, sampled[item.slot])

    def _note_failure(self, message: str) -> None:
        with self._cond:
            self._decode_failures += 1
            self._last_error = message

    def _note_success(self) -> None:
        if self._decode_failures:
            log.warning("decoding works again after %d failed calls", self._decode_failures)
            with self._cond:
                self._decode_failures = 0
                self._last_error = None

    def _forget(self, index: int) -> None:
        """Clear a free slot's cache and the record of what it held."""
        self._kept.pop(index, None)
        self.backend.release(index, 0)

    def _probe(self) -> None:
        """Idle after a failed call: one token in the free slot that holds least, to see whether decoding works."""
        if self._probe_token is None:
            return
        index = min(range(self.slots), key=lambda slot: (len(self._kept.get(slot, ())), slot))
        self._kept.pop(index, None)
        try:
            self.backend.begin(index, SamplingParams(max_tokens=1, temperature=0.0), 0)
            self.backend.decode([SlotWork(index, [self._probe_token], 0, False)], {})
        except PeerInferError as exc:
            # Once per new error, not once a second while it lasts.
            (log.debug if exc.message == self._last_error else log.error)("probe decode failed: %s", exc.message)
            self._note_failure(exc.message)
        else:
            self._note_success()
        finally:
            self.backend.release(index, 0)

    def _spare(self, work: list[SlotWork]) -> dict[int, int]:
        """Slots outside ``work`` that may take a throw-away row, and where: after what their cache holds.

        Not a slot whose cache is full: the row would go one past its last cell, and the call fail.
        """
        busy = {item.slot for item in work}
        spare: dict[int, int] = {}
        for index in range(self.slots):
            if index in busy:
                continue
            slot = self._active.get(index)
            position = slot.position if slot is not None else len(self._kept.get(index, ()))
            if position < self.backend.n_ctx_per_slot:
                spare[index] = position
        return spare

    def _accept(self, slot: _Slot, sampled: Sampled) -> None:
        params = slot.generation.params
        if sampled.error is not None:
            self._finish(slot, "error", sampled.error)
            return
        token = sampled.token
        if self.backend.is_end(token):
            self._finish(slot, "stop")
            return
        slot.generated += 1
        piece = self.backend.piece(token)
        if params.logprobs is not None and sampled.logprob is not None:
            slot.pending.append((slot.assembler.read, self._token_logprob(piece, sampled)))
        delta, stopped = slot.assembler.feed(piece)
        if delta:
            self._emit(slot.generation, TextDelta(delta, self._shown_logprobs(slot)))
            if not slot.sent_text:
                slot.sent_text = self._first_text_out = True
        if stopped:
            self._finish(slot, "stop")
        elif slot.generated >= params.max_tokens or slot.position >= self.backend.n_ctx_per_slot:
            self._finish(slot, "length")
        else:
            slot.next_token = token

    def _token_logprob(self, piece: bytes, sampled: Sampled) -> TokenLogprob:
        top = tuple(TopLogprob(self.backend.piece(token), logprob) for token, logprob in sampled.top)
        return TokenLogprob(piece, sampled.logprob if sampled.logprob is not None else 0.0, top)

    def _shown_logprobs(self, slot: _Slot) -> tuple[TokenLogprob, ...]:
        """The pending entries whose text is now out (it starts before ``sent``); the rest stay pending.

        A token whose text was all held back (a character split over tokens, the start of what might
        be a stop string) goes out with the delta that first shows its text.
        """
        shown = [entry for start, entry in slot.pending if start < slot.assembler.sent]
        slot.pending = [(start, entry) for start, entry in slot.pending if start >= slot.assembler.sent]
        return tuple(shown)

    def _finish(self, slot: _Slot, reason: FinishReason, error: str | None = None) -> None:
        tail = slot.assembler.finish(drop_partial_stop=reason == "length") if reason in ("stop", "length") else ""
        # Entries of tokens never shown (swallowed by a stop string, or a dropped partial one) are dropped.
        logprobs = self._shown_logprobs(slot) if error is None else ()
        if tail or logprobs:
            self._emit(slot.generation, TextDelta(tail, logprobs))
        prompt = slot.generation.prompt_tokens
        self._emit(slot.generation, Finished(reason, len(prompt), slot.generated, error, cached_tokens=slot.cached))
        # What a fresh read would give (see _held); after an error, nothing.
        held = self._held(slot) if self.reuse_prompts and error is None else []
        keep = self.backend.release(slot.index, len(held))
        with self._cond:
            del self._active[slot.index]
        if keep:
            self._kept[slot.index] = held[:keep]
        self._finished_now += 1
