"""An event loop on a thread of its own, so the synchronous SDK can drive the async core.

Only the SDK uses it: the gateway and the worker are async already. Each call hands one coroutine
to the loop and waits for its result; an async iterator is walked one item per call, and closed
on the loop when the caller stops early.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


async def _next(iterator: AsyncIterator[T]) -> T:
    return await iterator.__anext__()


class BackgroundLoop:
    def __init__(self, name: str = "peerinfer-loop") -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()
        self._closed = False

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the loop and return its result (or raise its exception) here."""
        if self._closed:
            coroutine.close()
            raise RuntimeError("this client is closed")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def iterate(self, iterator: AsyncIterator[T]) -> Iterator[T]:
        """The items of ``iterator``, each fetched on the loop."""
        finished = False
        try:
            while True:
                try:
                    item = self.run(_next(iterator))
                except StopAsyncIteration:
                    finished = True
                    return
                yield item
        finally:
            close = getattr(iterator, "aclose", None)
            if not finished and close is not None and not self._closed:
                self.run(close())

    def close(self, final: Coroutine[Any, Any, Any] | None = None) -> None:
        """Run ``final`` (closing what lives on the loop), then stop the loop and its thread."""
        if self._closed:
            if final is not None:
                final.close()
            return
        try:
            if final is not None:
                self.run(final)
            # Async generators left unfinished are closed here, on the loop, not as tasks it never runs.
            self.run(self._loop.shutdown_asyncgens())
        finally:
            self._closed = True
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            if not self._thread.is_alive():
                self._loop.close()
