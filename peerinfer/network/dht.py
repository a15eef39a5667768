"""The one module that imports ``opendht``: a DHT node that can put and get small values.

OpenDHT runs its own threads; this wrapper is thread-safe and blocking with time limits, so a
synchronous client and an asyncio worker (through ``asyncio.to_thread``) can both use it.

Choices and quirks:

- Nodes use a private network id (``DhtConfig.setNetwork``), so they never mix with the public
  Jami DHT: a node of another network drops our packets and we drop theirs.
- Values carry our own value type whose expiration is the record lifetime, so storage nodes drop a
  dead worker's records by themselves. Every node registers the type (after ``run``: registering
  before it crashes the process).
- The done callback of a put can come late (it waits for every storage node to acknowledge) while
  the value is already readable, so puts are fire-and-forget.
- ``str()`` of a received unsigned value raises; only ``.data`` is read. ``opendht.aio``'s futures
  raise ``InvalidStateError`` when a callback arrives after a time-out, hence the core API here.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import opendht

from peerinfer.errors import ConfigError, NetworkError

log = logging.getLogger(__name__)

VALUE_TYPE_ID = 0x5049  # "PI"
DEFAULT_NETWORK_ID = 0x50494E46  # "PINF"
MAX_VALUES_PER_GET = 4096
MAX_VALUE_BYTES = 4096


class FoundValues(list[bytes]):
    """The values of one get; ``skipped`` counts those that arrived after the cap and were not kept."""

    skipped: int = 0


class DhtNode:
    """A running OpenDHT node bound to UDP ``host:port`` (port 0: any free port)."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        network_id: int,
        bootstrap: Sequence[tuple[str, int]] = (),
        value_lifetime_s: float = 60.0,
    ) -> None:
        config = opendht.DhtConfig()
        config.setNetwork(network_id)
        self._runner = opendht.DhtRunner()
        try:
            self._runner.run(port=port, ipv4=host, ipv6=_ipv6_bind(host), config=config)
        except Exception as exc:  # the binding raises plain RuntimeErrors
            if _ipv6_bind(host):  # a machine with IPv6 turned off: IPv4 alone
                self._runner = opendht.DhtRunner()
                try:
                    self._runner.run(port=port, ipv4=host, config=config)
                except Exception as retry:
                    raise ConfigError(
                        f"cannot start a DHT node on UDP {host}:{port}: {retry}; choose another PEERINFER_DHT_PORT"
                    ) from retry
            else:
                raise ConfigError(
                    f"cannot start a DHT node on UDP {host}:{port}: {exc}; choose another PEERINFER_DHT_PORT"
                ) from exc
        self._runner.registerType(
            opendht.ValueType(VALUE_TYPE_ID, "peerinfer-record", timedelta(seconds=value_lifetime_s))
        )
        self._closed = False
        # Read once: getBound() waits for the node's thread, which can be busy for seconds sending puts.
        self._port = int(self._runner.getBound().getPort())
        self.bootstrap(bootstrap)

    @property
    def port(self) -> int:
        return self._port

    def bootstrap(self, nodes: Sequence[tuple[str, int]]) -> None:
        for host, port in nodes:
            self._runner.bootstrap(host, str(port))

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` with a fresh value id; returns at once."""
        value = opendht.Value(data, VALUE_TYPE_ID)
        value.id = random.getrandbits(63) + 1
        self._runner.put(opendht.InfoHash.get(key), value, _ignore_done)

    def listen(
        self, key: str, on_value: Callable[[bytes], None], *, max_value_bytes: int = MAX_VALUE_BYTES
    ) -> Listening:
        """Call ``on_value`` (on OpenDHT's thread) with each value put under ``key`` from now on, and
        with those already stored; ``Listening.cancel()`` stops it. A value longer than
        ``max_value_bytes`` is cut to ``max_value_bytes + 1`` bytes (readers refuse it). Expiries are
        not reported. ``on_value`` must return quickly and must not raise (what it raises is logged).
        """
        if self._closed:
            raise NetworkError("the DHT node is stopped")
        listening = Listening(self)

        def on_change(value: Any, expired: bool) -> bool:
            if listening.cancelled:
                return False  # OpenDHT drops a listener whose callback says False
            if not expired:
                try:
                    on_value(bytes(value.data)[: max_value_bytes + 1])
                except Exception:
                    log.exception("a DHT listener of %s raised; it keeps listening", key)
            return True

        with _LISTEN_LOCK:
            listening.token = self._runner.listen(opendht.InfoHash.get(key), on_change)
            # The binding keeps each listen's callbacks in one dict shared by every token (a class
            # attribute), and cancelListen releases whatever that dict holds last: another listen's
            # callbacks, freed while in use. So each listen's own entry is taken now and put back
            # before its cancel, under one lock.
            listening.callbacks = opendht.ListenToken._cb.get("cb")
        return listening

    def _cancel(self, listening: Listening) -> None:
        if self._closed or listening.token is None:
            return
        with _LISTEN_LOCK:
            opendht.ListenToken._cb["cb"] = listening.callbacks
            self._runner.cancelListen(listening.token)
        # A value already on its way may still reach the callbacks: they stay alive a while.
        _CANCELLED.append(listening.callbacks)

    def get(
        self,
        key: str,
        timeout_s: float,
        settle_s: float = 0.25,
        *,
        max_values: int = MAX_VALUES_PER_GET,
        max_value_bytes: int = MAX_VALUE_BYTES,
    ) -> FoundValues:
        """The values found under ``key``; raises ``NetworkError`` if the node is stopped.

        Returns when the search is done, after ``timeout_s``, or once values have arrived and none
        more for ``settle_s``: a search waits for every close node to answer or time out, and nodes
        that left recently (closed clients) would otherwise add seconds to every lookup. A flooded
        key's answer comes in bursts up to a second apart, so such a get may read only part of it;
        waiting out the bursts made every flooded lookup take ``timeout_s`` and still not read all
        (measured), so discovery instead remembers the peers it verified until their records expire.

        Anyone can put values under any key, so reading is bounded: a value longer than
        ``max_value_bytes`` is kept as its first ``max_value_bytes + 1`` bytes (readers count it as
        too large), and after ``max_values`` values the search stops; ``skipped`` counts the values
        that arrived past the cap.
        """
        if self._closed:
            raise NetworkError("the DHT node is stopped")
        found = FoundValues()
        lock = threading.Lock()
        done = threading.Event()
        arrived = threading.Event()

        def on_value(value: Any) -> bool:
            with lock:
                if len(found) >= max_values:
                    found.skipped += 1
                    done.set()
                    return False
                found.append(bytes(value.data)[: max_value_bytes + 1])
            arrived.set()
            return not done.is_set()

        def on_done(ok: bool, nodes: Any) -> None:
            done.set()

        self._runner.get(opendht.InfoHash.get(key), on_value, on_done)
        deadline = time.monotonic() + timeout_s
        while not done.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                log.debug("DHT get %s timed out after %.1f s with %d values", key, timeout_s, len(found))
                break
            if arrived.is_set():
                arrived.clear()
                if not arrived.wait(min(settle_s, left)) and not done.is_set():
                    break  # values came, then a quiet spell: the rest are stragglers
            else:
                done.wait(min(0.05, left))
        done.set()
        with lock:
            result = FoundValues(found)
            result.skipped = found.skipped
        if result.skipped:
            log.warning("DHT get %s: read %d values and skipped %d more (the cap)", key, len(result), result.skipped)
        return result

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        stopped = threading.Event()
        self._runner.shutdown(stopped.set)
        stopped.wait(5)
        self._runner.join()


def _ipv6_bind(host: str) -> str:
    """A node on every IPv4 address listens on every IPv6 address too: many mobile users have IPv6."""
    return "::" if host == "0.0.0.0" else ""


_LISTEN_LOCK = threading.Lock()
_CANCELLED: deque[Any] = deque(maxlen=4096)


class Listening:
    """A listen in progress; ``cancel()`` is idempotent and safe after the node stopped."""

    def __init__(self, node: DhtNode) -> None:
        self._node = node
        self.token: Any = None
        self.callbacks: Any = None
        self.cancelled = False

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self._node._cancel(self)


def _ignore_done(ok: bool, nodes: Any) -> None:
    return None
