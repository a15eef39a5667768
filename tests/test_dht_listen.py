"""``DhtNode.listen`` with real OpenDHT nodes on 127.0.0.1: what a listener gets, and what it must not.

ICE signalling rests on it: a worker listens under its key for offers, a client for answers, and
each client listen is cancelled when its path opens or fails, so listens come and go all the time.
The binding keeps every listen's callbacks in one shared slot (see ``DhtNode.listen``); the churn
test starts and cancels many listens in any order while values arrive, and pytest's
``filterwarnings = error`` turns an "Exception ignored" from a freed callback into a failure.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from peerinfer.errors import NetworkError
from peerinfer.network.dht import MAX_VALUE_BYTES, DhtNode, Listening
from tests.network_support import bootstrap_node, network_id, wait_until

ARRIVAL_S = 30.0  # a safety limit for a value to reach a listener; on loopback it takes milliseconds
QUIET_S = 2.0  # how long a listener that must not get a value is watched after others got it


class Inbox:
    """The values one listener was called with, in order; safe to fill from OpenDHT's thread."""

    def __init__(self) -> None:
        self._values: list[bytes] = []
        self._changed = threading.Condition()

    def __call__(self, data: bytes) -> None:
        with self._changed:
            self._values.append(data)
            self._changed.notify_all()

    @property
    def values(self) -> list[bytes]:
        with self._changed:
            return list(self._values)

    def wait_for(self, value: bytes, timeout_s: float = ARRIVAL_S) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: value in self._values, timeout_s)


@pytest.fixture
def net() -> int:
    return network_id()


@pytest.fixture
def nodes(net: int) -> Iterator[Callable[..., DhtNode]]:
    """Makes nodes of one fresh network, all bootstrapped to its first node, and closes them afterwards."""
    with contextlib.ExitStack() as stack:
        boots: list[DhtNode] = []

        def make(lifetime_s: float = 60.0) -> DhtNode:
            if not boots:
                boots.append(stack.enter_context(bootstrap_node(net, lifetime_s)))
            node = DhtNode(
                host="127.0.0.1",
                port=0,
                network_id=net,
                bootstrap=[("127.0.0.1", boots[0].port)],
                value_lifetime_s=lifetime_s,
            )
            stack.callback(node.close)
            return node

        yield make


def test_a_listener_gets_values_stored_before_it_and_put_after_it(nodes: Callable[..., DhtNode]) -> None:
    writer, reader = nodes(), nodes()
    writer.put("ice/worker-1", b"stored before")
    wait_until(lambda: b"stored before" in reader.get("ice/worker-1", 5), ARRIVAL_S, "the first value was not stored")
    inbox = Inbox()
    listening = reader.listen("ice/worker-1", inbox)
    try:
        assert inbox.wait_for(b"stored before")
        writer.put("ice/worker-1", b"put after")
        assert inbox.wait_for(b"put after")
        reader.put("ice/worker-1", b"the listener's own")
        writer.put("ice/worker-2", b"another key")
        writer.put("ice/worker-1", b"last")
        assert inbox.wait_for(b"the listener's own") and inbox.wait_for(b"last")
        assert b"another key" not in inbox.values
        assert all(isinstance(value, bytes) for value in inbox.values)
    finally:
        listening.cancel()


def test_expiries_are_not_reported(nodes: Callable[..., DhtNode]) -> None:
    writer, reader = nodes(lifetime_s=2.0), nodes(lifetime_s=2.0)
    inbox = Inbox()
    listening = reader.listen("ice/short", inbox)
    try:
        writer.put("ice/short", b"short-lived")
        assert inbox.wait_for(b"short-lived")
        # Only the writer is polled: polled on the listener's own node, OpenDHT dropped the value from that
        # node's cache and fetched it again, and the listener got it twice before it expired.
        wait_until(lambda: not writer.get("ice/short", 2), ARRIVAL_S, "the value did not expire")
        time.sleep(1.0)  # OpenDHT tells its listeners of the expiry (measured: as the value expires); ours must not.
        writer.put("ice/short", b"after the expiry")
        assert inbox.wait_for(b"after the expiry")
        time.sleep(1.0)
        assert inbox.values == [b"short-lived", b"after the expiry"]
    finally:
        listening.cancel()


def test_values_longer_than_the_limit_arrive_cut_one_byte_past_it(nodes: Callable[..., DhtNode]) -> None:
    writer, reader = nodes(), nodes()
    small, default = Inbox(), Inbox()
    listens = [reader.listen("ice/big", small, max_value_bytes=100), reader.listen("ice/big", default)]
    try:
        exact, over = b"e" * 100, b"o" * 100 + b"x" * 400
        huge = bytes(range(256)) * 20
        for value in (exact, over, huge):
            writer.put("ice/big", value)
        assert small.wait_for(exact) and small.wait_for(over[:101]) and small.wait_for(huge[:101])
        assert default.wait_for(huge[: MAX_VALUE_BYTES + 1]) and default.wait_for(over) and default.wait_for(exact)
        assert set(small.values) == {exact, over[:101], huge[:101]}
        assert set(default.values) == {exact, over, huge[: MAX_VALUE_BYTES + 1]}
    finally:
        for listening in listens:
            listening.cancel()


def test_cancel_stops_delivery_while_other_listeners_of_the_key_keep_getting_values(
    nodes: Callable[..., DhtNode],
) -> None:
    writer, reader, other = nodes(), nodes(), nodes()
    cancelled, same_node, other_node = Inbox(), Inbox(), Inbox()
    to_cancel = reader.listen("ice/key", cancelled)
    kept = [reader.listen("ice/key", same_node), other.listen("ice/key", other_node)]
    try:
        writer.put("ice/key", b"one")
        assert cancelled.wait_for(b"one") and same_node.wait_for(b"one") and other_node.wait_for(b"one")
        to_cancel.cancel()
        writer.put("ice/key", b"two")
        assert same_node.wait_for(b"two") and other_node.wait_for(b"two")
        assert not cancelled.wait_for(b"two", QUIET_S)
        to_cancel.cancel()
        writer.put("ice/key", b"three")
        assert same_node.wait_for(b"three")
        assert not cancelled.wait_for(b"three", QUIET_S)
    finally:
        for listening in kept:
            listening.cancel()


def test_many_listens_cancelled_in_any_order_while_values_arrive(nodes: Callable[..., DhtNode]) -> None:
    writer, reader = nodes(), nodes()
    keys = [f"ice/churn-{n}" for n in range(5)]
    keepers = {key: Inbox() for key in keys}
    kept = [reader.listen(key, inbox) for key, inbox in keepers.items()]
    stop = threading.Event()
    put_count = 0

    def keep_putting() -> None:
        nonlocal put_count
        while not stop.is_set():
            writer.put(keys[put_count % len(keys)], b"churn %d" % put_count)
            put_count += 1
            stop.wait(0.01)

    putter = threading.Thread(target=keep_putting, daemon=True)
    putter.start()
    chooser = random.Random(12)
    churned: list[tuple[Inbox, Listening]] = []
    try:
        for round_ in range(2):
            started: list[tuple[Inbox, Listening]] = []
            for n in range(50):
                inbox = Inbox()
                started.append((inbox, reader.listen(keys[chooser.randrange(len(keys))], inbox)))
                if n % 10 == 9:  # some die young, before the later ones are started
                    young = started.pop(chooser.randrange(len(started)))
                    young[1].cancel()
                    churned.append(young)
            chooser.shuffle(started)
            for n, (_, listening) in enumerate(started):
                listening.cancel()
                if n % 7 == 0:
                    chooser.choice(started[: n + 1])[1].cancel()  # again, on one already cancelled
                if n % 10 == 0:
                    gc.collect()
            churned += started
            wait_until_each_keeper_gets_more(keepers, round_)
    finally:
        stop.set()
        putter.join(timeout=10)
    assert put_count > 0
    for key in keys:
        writer.put(key, b"final " + key.encode())
    try:
        for key, inbox in keepers.items():
            assert inbox.wait_for(b"final " + key.encode()), f"the listener of {key} stopped getting values"
        time.sleep(QUIET_S)
        assert not any(value.startswith(b"final") for inbox, _ in churned for value in inbox.values)
    finally:
        for listening in kept:
            listening.cancel()
    gc.collect()


def wait_until_each_keeper_gets_more(keepers: dict[str, Inbox], round_: int) -> None:
    """Waits until every still-active listener has got a value put after this round's cancels."""
    seen = {key: len(inbox.values) for key, inbox in keepers.items()}
    wait_until(
        lambda: all(len(inbox.values) > seen[key] for key, inbox in keepers.items()),
        ARRIVAL_S,
        f"after round {round_} of cancels a listener that was never cancelled got no more values",
    )


def test_a_listener_whose_callback_raises_keeps_listening(
    nodes: Callable[..., DhtNode], caplog: pytest.LogCaptureFixture
) -> None:
    writer, reader = nodes(), nodes()
    inbox = Inbox()

    def clumsy(data: bytes) -> None:
        inbox(data)
        if data == b"first":
            raise RuntimeError("the callback's own bug")

    listening = reader.listen("ice/clumsy", clumsy)
    try:
        with caplog.at_level(logging.ERROR, logger="peerinfer.network.dht"):
            writer.put("ice/clumsy", b"first")
            assert inbox.wait_for(b"first")
            writer.put("ice/clumsy", b"second")
            assert inbox.wait_for(b"second")
        assert "a DHT listener of ice/clumsy raised; it keeps listening" in caplog.text
        assert "the callback's own bug" in caplog.text
    finally:
        listening.cancel()


def test_cancel_after_the_node_is_closed_is_a_no_op(nodes: Callable[..., DhtNode]) -> None:
    node = nodes()
    first, second = node.listen("ice/closing", Inbox()), node.listen("ice/closing", Inbox())
    second.cancel()
    node.close()
    first.cancel()
    first.cancel()
    second.cancel()
    node.close()
    with pytest.raises(NetworkError, match="stopped"):
        node.listen("ice/closing", Inbox())
