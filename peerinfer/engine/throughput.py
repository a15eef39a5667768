"""How fast the worker finishes requests, and how long a client it turns away should wait. Pure.

The wait is the time for the requests ahead of the client to finish at the rate measured over the
worker's recent busy time: requests finished (in any slot) per second during which some slot was in
use. Mean request duration times the queue over the slots got it wrong both ways: a step of four
rows is not four times as slow as a step of one, so per-request durations measured in a full batch
say little about how fast the queue drains (Retry-After said 42 to 49 s when the queue drained in
19.5 s).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Measurements older than about this much busy time count for little (a new mix of requests shows soon).
THROUGHPUT_TAU_S = 30.0
# Before any request has finished: each slot is assumed to finish one request in this time.
FALLBACK_REQUEST_S = 5.0
MAX_RETRY_AFTER_S = 120


@dataclass(frozen=True)
class Throughput:
    """Requests finished per second of busy time, exponentially weighted over ``THROUGHPUT_TAU_S`` of it.

    ``finished`` and ``busy_s`` decay together as busy time passes, so their ratio is the recent rate;
    idle time neither counts nor ages what was measured.
    """

    finished: float = 0.0
    busy_s: float = 0.0

    def after(self, busy_s: float, finished: int, tau_s: float = THROUGHPUT_TAU_S) -> Throughput:
        """This measurement after ``busy_s`` more seconds of busy time in which ``finished`` requests ended."""
        busy_s = max(0.0, busy_s)
        keep = math.exp(-busy_s / tau_s)
        return Throughput(self.finished * keep + finished, self.busy_s * keep + busy_s)

    @property
    def per_s(self) -> float | None:
        """Requests finished per busy second; None before the first one finished."""
        if self.finished <= 0 or self.busy_s <= 0:
            return None
        return self.finished / self.busy_s


def retry_after_s(ahead: int, finished_per_s: float | None, slots: int) -> int:
    """Seconds until ``ahead`` more requests have finished (whole seconds, 1 to ``MAX_RETRY_AFTER_S``).

    ``finished_per_s`` is the measured rate (``Throughput.per_s``); None falls back to one request
    per slot every ``FALLBACK_REQUEST_S``.
    """
    rate = finished_per_s if finished_per_s is not None else max(1, slots) / FALLBACK_REQUEST_S
    return max(1, min(MAX_RETRY_AFTER_S, math.ceil(max(0, ahead) / rate)))
