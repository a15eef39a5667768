"""Shaping decode batches for llama.cpp (which row counts to pad, with which slot) and choosing a slot."""

from __future__ import annotations

import pytest

from peerinfer.engine.batching import (
    MIN_REUSE,
    Fillers,
    choose_pad_slot,
    choose_slot,
    confirmed_pad_rows,
    fillers,
    outputs_in_batch_order,
    reusable_prefix,
    rows_to_pad,
    sequence_runs,
)


@pytest.mark.parametrize(
    ("slots", "runs"),
    [([], 0), ([0], 1), ([0, 1, 2, 3], 1), ([3, 1, 2, 0], 1), ([0, 2, 3], 2), ([0, 2, 4], 3), ([1, 1, 2], 1)],
)
def test_sequence_runs_counts_passes_over_the_weights(slots: list[int], runs: int) -> None:
    assert sequence_runs(slots) == runs


def test_rows_to_pad_picks_the_counts_one_more_row_makes_clearly_cheaper() -> None:
    # Measured here with 8 slots: 3 and 7 rows cost more than 4 and 8; 5 is only 5% over 6.
    measured = {1: 12.7, 2: 24.8, 3: 50.2, 4: 43.4, 5: 56.8, 6: 54.2, 7: 71.1, 8: 53.3}
    assert rows_to_pad(measured) == {3, 7}
    assert rows_to_pad({1: 14.0, 2: 26.0, 3: 38.0, 4: 50.0}) == set()  # costs that grow: never pad
    assert rows_to_pad({1: 14.0}) == set()


def test_a_count_to_pad_must_be_confirmed_by_the_medians_of_interleaved_steps() -> None:
    # An 8-slot load on this VM: the best of 3 made 4 rows (27.6 ms) look dearer than 5 (24.9);
    # timed again in turns, 4 rows took a median of 24.3 ms and 5 rows 27.7: padding would cost 14%.
    noisy = {3: [21.0, 19.8, 19.9], 4: [24.0, 24.3, 24.9, 23.8, 28.0], 5: [27.7, 27.1, 25.4, 28.3, 27.9]}
    assert confirmed_pad_rows({4}, noisy) == set()
    # llama.cpp's Q8_0 output product, 2 rows at a time: 3 rows cost more than 4 every time.
    stepped = {3: [50.2, 49.8, 51.0, 62.0, 50.5], 4: [43.4, 44.0, 51.0, 43.1, 43.9]}
    assert confirmed_pad_rows({3}, stepped) == {3}
    assert confirmed_pad_rows(set(), stepped) == set()  # only counts the first measurement picked
    assert confirmed_pad_rows({3}, {3: [50.0], 4: []}) == set()  # nothing to compare with


@pytest.mark.parametrize(
    ("rows", "free", "chosen"),
    [
        ([0, 1, 2], [3], 3),  # makes 0..3 one run
        ([1, 2, 3], [0], 0),
        ([0, 1, 3], [2], 2),  # fills the gap: two passes become one
        ([0, 2, 3], [1], 1),
        ([0, 1, 2], [3, 5], 3),  # 5 would add a pass
        ([0, 1, 2], [5], None),
        ([0, 1, 2], [], None),  # every slot busy (e.g. the 4th is reading its prompt)
        ([0, 1, 2], [0, 1], None),  # a row's own slot is never free for padding
        ([2, 3, 4], [1, 5], 1),  # equal choices: the lowest slot
    ],
)
def test_choose_pad_slot_never_adds_a_pass(rows: list[int], free: list[int], chosen: int | None) -> None:
    assert choose_pad_slot(rows, free) == chosen


@pytest.mark.parametrize(
    ("rows", "spare", "pad", "expected"),
    [
        ([0, 1, 2, 3], [], False, Fillers(None, ())),
        ([0, 2, 3], [1], False, Fillers(None, (1,))),  # a gap: one pass instead of two
        ([0, 3], [1, 2], False, Fillers(None, (1, 2))),
        ([0, 3], [1], False, Fillers(None, ())),  # slot 2 is not spare: filling 1 alone saves nothing
        ([0, 2, 3], [1], True, Fillers(1, ())),  # the filler also gives the cheaper row count
        ([0, 1, 2], [3], True, Fillers(3, ())),
        ([0, 1, 2], [], True, Fillers(None, ())),
        ([0, 1, 2], [5], True, Fillers(None, ())),  # 5 would add a pass
        ([0, 1], [2, 3], False, Fillers(None, ())),  # no gap, no padding: nothing to add
    ],
)
def test_fillers_join_runs_of_slots_and_pad_to_a_cheaper_count(
    rows: list[int], spare: list[int], pad: bool, expected: Fillers
) -> None:
    assert fillers(rows, spare, pad) == expected


@pytest.mark.parametrize(
    ("kept", "prompt", "unit", "reused"),
    [
        (list(range(40)), list(range(60)), 16, 32),  # whole chunks only
        (list(range(32)), list(range(32)), 16, 16),  # never the last prompt token: its logits are needed
        (list(range(32)), list(range(33)), 16, 32),
        (list(range(40)), [*range(20), 99, *range(21, 60)], 16, 16),  # they part at token 20
        ([5, *range(1, 40)], list(range(40)), 16, 0),
        ([], list(range(20)), 16, 0),
        (list(range(20)), [0], 16, 0),
        (list(range(40)), [*range(20), 99, *range(21, 60)], 1, 20),  # a cut-invariant backend: to the token
        (list(range(40)), list(range(40)), 1, 39),
        (list(range(40)), [*range(15), 99], 1, 0),  # 15 shared tokens: below MIN_REUSE, not worth it
    ],
)
def test_reusable_prefix_is_whole_units_of_what_the_prompts_share(
    kept: list[int], prompt: list[int], unit: int, reused: int
) -> None:
    assert MIN_REUSE == 16
    assert reusable_prefix(kept, prompt, unit) == reused


def test_with_no_slot_busy_choose_slot_prefers_the_longest_reuse_then_the_least_kept_then_the_lowest() -> None:
    system = list(range(100, 140))
    kept = {0: [*system, 1, 2, 3], 1: [*system[:16], 7, 7, 7, 7], 3: list(range(500, 600))}
    assert choose_slot([0, 1, 2, 3], [], kept, [*system, 9, 9], unit=8) == 0
    assert choose_slot([1, 2, 3], [], kept, [*system, 9, 9], unit=8) == 1
    # Nothing to reuse: the empty slot 2, so that what slots 0, 1 and 3 hold stays for later.
    assert choose_slot([0, 1, 2, 3], [], kept, [1, 2, 3], unit=8) == 2
    assert choose_slot([2, 4], [], {}, [1, 2, 3], unit=8) == 2


@pytest.mark.parametrize(
    ("free", "busy", "chosen"),
    [
        ([2, 3, 4, 5, 6, 7], [0, 1], 2),  # next to the running streams, not slot 7 where the prefix is
        ([0, 3, 4, 5, 6, 7], [1, 2], 0),  # either side keeps one run: the lower
        ([1, 3, 4, 5, 6, 7], [0, 2], 1),  # the gap is filled before anything else
        ([0, 1, 2, 3, 4, 6], [5, 7], 6),
        ([4, 5, 6, 7], [0, 1, 2, 3], 4),
        ([0, 1, 2, 3, 4, 5, 6], [7], 6),
        ([7], [0, 1], 7),  # the only free slot, whatever it costs
    ],
)
def test_choose_slot_keeps_busy_slots_together_before_it_saves_reading(
    free: list[int], busy: list[int], chosen: int
) -> None:
    system = list(range(100, 140))
    kept = {7: [*system, 1], 4: [*system[:24]]}  # the prompt's longest prefix is in slot 7
    assert choose_slot(free, busy, kept, [*system, 9], unit=8) == chosen


def test_among_slots_that_keep_the_streams_together_the_one_with_the_prefix_wins() -> None:
    system = list(range(100, 140))
    kept = {3: [*system, 1], 0: list(range(500, 540))}
    assert choose_slot([0, 3, 4, 5], [1, 2], kept, [*system, 9], unit=8) == 3


@pytest.mark.parametrize(
    ("tokens_per_sequence", "in_order"),
    [([64], True), ([1, 1, 1, 1], True), ([1], True), ([1, 1, 1], True), ([2, 2], False), ([1, 3], False)],
)
def test_outputs_are_in_batch_order_for_one_sequence_or_one_token_each(
    tokens_per_sequence: list[int], in_order: bool
) -> None:
    assert outputs_in_batch_order(tokens_per_sequence) is in_order
