"""The quantile every bench prints: nearest rank, no interpolation, so each cell is a measured value."""

from __future__ import annotations

from collections.abc import Sequence


def quantile(values: Sequence[float], q: float) -> float:
    """The value at rank ``round(q * (n - 1))`` of ``values`` sorted (``q`` in 0..1); nan when there are none."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]
