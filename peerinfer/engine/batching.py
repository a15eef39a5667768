"""How to shape a decode batch for llama.cpp's CPU kernels, and which slot a request goes to.

Pure decisions, no llama.cpp here.

Two facts measured on this project's portable x86 build (Gemma 3 270M, whose 262k-row output
matrix is Q8_0) shape these rules:

- llama.cpp cuts a batch into one pass over the weights per run of consecutive sequence ids
  (slots 0, 2, 3 make two passes), so rows go in slot order and gaps are worth filling.
- The output matrix's kernel covers 2 rows at a time with 16 vector registers (AVX2); with 3 rows it
  makes a second pass over all 262k rows for the odd one. 3 rows took 46 ms and 4 rows 38 ms, so a
  step with 3 streams is cheaper with a 4th, throw-away row in a free slot.

Whether padding pays depends on the CPU and the model (a Q6_K output matrix, or AVX-512 or ARM
kernels, have no such step), so the engine measures it once at load; ``rows_to_pad`` decides from
those measurements. peerinfer's own output head (``output_head.c``) has no such step either, yet a
best of 3 at load found one often enough on a busy VM: 3 of 12 calibrations of an 8-slot worker
padded 3 or 4 rows, and a padded step of 4 rows took 14% longer (5 rows, median 27.7 ms against
24.3; 3 rows padded, 22%). So a
count that the first measurement would pad is timed again, interleaved with the count above it,
and padded only if the medians agree (``confirmed_pad_rows``).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

# Pad only when one more row is clearly cheaper: a wrong choice costs a row's compute each step.
PAD_MARGIN = 0.05
MIN_REUSE = 16  # tokens


def sequence_runs(slots: Iterable[int]) -> int:
    """Runs of consecutive slot numbers: llama.cpp makes one pass over the weights per run."""
    ordered = sorted(set(slots))
    return sum(1 for index, slot in enumerate(ordered) if index == 0 or slot != ordered[index - 1] + 1)


def rows_to_pad(step_ms: Mapping[int, float], margin: float = PAD_MARGIN) -> frozenset[int]:
    """Row counts n whose step is cheaper with one extra row, from measured step times by rows."""
    return frozenset(
        rows for rows, cost in step_ms.items() if rows + 1 in step_ms and step_ms[rows + 1] < cost * (1 - margin)
    )


def confirmed_pad_rows(
    candidates: Iterable[int], samples: Mapping[int, Sequence[float]], margin: float = PAD_MARGIN
) -> frozenset[int]:
    """The ``candidates`` that ``rows_to_pad`` still picks from the medians of ``samples`` (step times by rows).

    The samples of a count and of the count above it are taken in turns, so a burst of noise on a
    shared machine slows both instead of making one look cheaper.
    """
    medians = {rows: statistics.median(times) for rows, times in samples.items() if times}
    return rows_to_pad(medians, margin) & frozenset(candidates)


@dataclass(frozen=True)
class Fillers:
    """Throw-away rows for one decode call, by slot."""

    with_logits: int | None  # one extra row that computes logits, to reach a cheaper row count
    without_logits: tuple[int, ...]  # rows that only join runs of slots (no logits: about 1.5 ms each here)


def fillers(rows: Sequence[int], spare: Iterable[int], pad: bool) -> Fillers:
    """Which ``spare`` slots get a throw-away row so that a call over ``rows`` makes one pass.

    Spare slots between the call's slots fill the gaps (slots 0, 2, 3 become 0, 1, 2, 3), but only if
    that removes a pass. With ``pad``, one extra row also asks for logits: a filler if there is one,
    else the spare slot that adds no pass (see ``choose_pad_slot``).
    """
    spare = sorted(set(spare) - set(rows))
    gaps: list[int] = []
    if rows:
        low, high = min(rows), max(rows)
        gaps = [slot for slot in spare if low < slot < high]
        if sequence_runs([*rows, *gaps]) >= sequence_runs(rows):
            gaps = []
    if not pad:
        return Fillers(None, tuple(gaps))
    if gaps:
        return Fillers(gaps[0], tuple(gaps[1:]))
    return Fillers(choose_pad_slot(rows, spare), ())


def reusable_prefix(kept: Sequence[int], prompt: Sequence[int], unit: int) -> int:
    """How many leading tokens of ``prompt`` a slot still holding ``kept`` need not read again.

    A multiple of ``unit``, and never the last prompt token (its logits are needed). With a backend
    whose numbers depend on how a prompt is cut into calls, ``unit`` is the prompt chunk: a reuse that
    ends on a chunk boundary reads the rest in the very chunks of a fresh read, so the numbers, and
    the text, are the same. A cut-invariant backend reuses to the token (``unit`` 1). Below
    ``MIN_REUSE`` tokens (a BOS and a role marker that every prompt shares) it is not worth a report.
    """
    limit = min(len(kept), len(prompt) - 1)
    same = 0
    while same < limit and kept[same] == prompt[same]:
        same += 1
    same -= same % unit
    return same if same >= MIN_REUSE else 0


def step_span(slots: Iterable[int]) -> int:
    """Rows a generation step over ``slots`` decodes once throw-away rows fill its gaps: lowest to highest."""
    ordered = sorted(set(slots))
    return ordered[-1] - ordered[0] + 1 if ordered else 0


def choose_slot(
    free: Iterable[int],
    busy: Iterable[int],
    kept: Mapping[int, Sequence[int]],
    prompt: Sequence[int],
    unit: int,
) -> int:
    """The free slot for ``prompt``, next to the ``busy`` ones where it can be.

    First the slot that keeps the busy slots closest together: every step decodes a row for each gap
    between them (or makes one more pass over the weights), for as long as they run; with 8 slots, 4
    streams in slots 0, 2, 5, 7 took 20.9 ms a step against 14.3 ms in slots 0 to 3. A prefix kept in
    another slot is not lost: the scheduler copies it from there (one copy per request). Then the slot
    that saves the most reading; then the one that holds the least, so that longer kept prompts stay
    for later requests; then the lowest. ``free`` must not be empty.
    """
    busy = set(busy)
    return min(
        free,
        key=lambda slot: (
            step_span([*busy, slot]),
            sequence_runs([*busy, slot]),
            -reusable_prefix(kept.get(slot, ()), prompt, unit),
            len(kept.get(slot, ())),
            slot,
        ),
    )


def choose_pad_slot(rows: Sequence[int], free: Iterable[int]) -> int | None:
    """The free slot whose throw-away row leaves the fewest runs of consecutive slots (lowest first).

    ``None`` when no slot is free, or when every choice would add a pass over the weights.
    """
    candidates = sorted(set(free) - set(rows))
    if not candidates:
        return None
    before = sequence_runs(rows)
    best = min(candidates, key=lambda slot: (sequence_runs([*rows, slot]), slot))
    return best if sequence_runs([*rows, best]) <= before else None


def outputs_in_batch_order(tokens_per_sequence: Sequence[int]) -> bool:
    """Whether llama.cpp computes a call's output rows in the batch's own order.

    It cuts a call into parts with the same number of tokens per sequence: with one sequence, or one
    token per sequence (slots in order), the parts follow the batch. Two sequences of 2 tokens each
    are computed token by token across them, out of batch order. peerinfer's output head writes
    logits in computed order, so it takes only calls for which the two agree.
    """
    return len(tokens_per_sequence) == 1 or all(count == 1 for count in tokens_per_sequence)


@dataclass(frozen=True)
class PromptShare:
    """How much of the decoding thread's time reading prompts may take while other streams generate.

    ``debt_s``: prompt-reading time, done while some stream was generating, that generation time has
    not yet paid for. A prompt's later chunks wait until it is paid, so over a long read the running
    streams' time per token grows by at most 1 / (1 - ``share``): x2 at 0.5. A prompt's first chunk
    never waits (a short prompt's first token is not held up behind a long one), and with nothing
    generating prompts read back to back. ``share`` 1 turns the limit off.
    """

    share: float = 1.0
    debt_s: float = 0.0

    def may_read(self, generating: bool, first_chunk: bool) -> bool:
        return first_chunk or not generating or self.share >= 1.0 or self.debt_s <= 0.0

    def after_chunk(self, seconds: float, generating: bool) -> PromptShare:
        if not generating or self.share >= 1.0:
            return self
        return PromptShare(self.share, self.debt_s + max(0.0, seconds))

    def after_generation(self, seconds: float) -> PromptShare:
        if self.share >= 1.0 or self.debt_s <= 0.0:
            return self
        paid = max(0.0, seconds) * self.share / (1.0 - self.share)
        return PromptShare(self.share, max(0.0, self.debt_s - paid))
