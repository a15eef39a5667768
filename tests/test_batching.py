"""Shaping decode batches for llama.cpp: which row counts to pad, and with which free slot."""

from __future__ import annotations

import pytest

from peerinfer.engine.batching import choose_pad_slot, rows_to_pad, sequence_runs


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
