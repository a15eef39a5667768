"""The gateway's own admission: at most ``max_in_flight`` requests served, ``max_queue`` waiting, each for a time.

A request beyond both gets 503 at once, with a ``Retry-After`` from the mean time a request has held
its place lately (so a client backs off for about as long as the queue needs to move).
"""

from __future__ import annotations

import asyncio
import math
import time

from peerinfer.errors import OverloadedError

DURATION_WEIGHT = 0.2  # weight of the newest request in the mean time a place is held
MAX_RETRY_AFTER_S = 60


class Admission:
    """Places for requests on one event loop; ``enter`` waits for one (or raises), ``leave`` frees it.

    ``leave`` does not wait, so it can run where nothing may be awaited (a cancelled stream's clean-up).
    """

    def __init__(self, max_in_flight: int, max_queue: int, queue_timeout_s: float) -> None:
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.in_flight = 0
        self.waiting = 0
        self.mean_hold_s = 1.0
        self._places = asyncio.Semaphore(max_in_flight)

    def retry_after(self) -> int:
        """Seconds until the queue ahead has probably moved."""
        ahead = (self.waiting + 1) / max(1, self.max_in_flight)
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil(self.mean_hold_s * ahead)))

    async def enter(self) -> float:
        """Take a place; returns when it was taken (``time.monotonic``). Raises ``OverloadedError`` (503)."""
        if self._places.locked() and self.waiting >= self.max_queue:
            raise OverloadedError(
                f"the gateway is full: {self.in_flight} requests in flight and {self.waiting} waiting "
                "(PEERINFER_MAX_IN_FLIGHT, PEERINFER_MAX_QUEUE); retry later",
                retry_after=self.retry_after(),
            )
        self.waiting += 1
        try:
            await asyncio.wait_for(self._places.acquire(), self.queue_timeout_s)
        except TimeoutError:
            raise OverloadedError(
                f"no room in the gateway within {self.queue_timeout_s:g} s ({self.in_flight} requests in flight); "
                "retry later",
                retry_after=self.retry_after(),
            ) from None
        finally:
            self.waiting -= 1
        self.in_flight += 1
        return time.monotonic()

    def leave(self, entered_at: float) -> None:
        """Free the place taken at ``entered_at``."""
        held = time.monotonic() - entered_at
        self.mean_hold_s += DURATION_WEIGHT * (held - self.mean_hold_s)
        self.in_flight -= 1
        self._places.release()
