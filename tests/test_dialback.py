"""The dial-back: a bootstrap tells a worker whether it can be reached, and the worker's record follows.

The decisions and wire formats are tables; the bootstrap's side runs a real uvicorn on 127.0.0.1
and dials real workers and hostile servers; the worker's side runs real workers against a real
dial-back service and against fake bootstraps that answer garbage, too much, or nothing.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import requests

from peerinfer.client.peer_http import HttpReply
from peerinfer.engine.fake import FakeEngine
from peerinfer.errors import RequestError
from peerinfer.network.dht import DhtNode
from peerinfer.network.dialback import (
    DIALBACK_PATH,
    MAX_ASK_BYTES,
    DialbackAsk,
    DialbackReport,
    DialbackResult,
    endpoints_for,
    reachability_line,
    read_ask,
    read_report,
    source_key,
)
from peerinfer.network.dialback_server import DialbackServer, DialbackService, SourceTable, create_dialback_app
from peerinfer.network.identity import PeerIdentity, b64
from peerinfer.network.records import DIRECTORY_KEY, PeerRecord, select_live
from tests.conftest import REPO
from tests.hostile_peer import HostilePeer
from tests.network_support import ThreadWorker, bootstrap_node, net_settings, network_id, story_responder, wait_until

FAKE_SHA = FakeEngine().info.sha256
PEER = "ab" * 20
ICE = f"ice://{PEER}"
GUESS = "http://10.0.0.5:8000"


def report(reachable: bool, observed: str = "198.51.100.2", port: int = 8000) -> DialbackReport:
    url = f"http://[{observed}]:{port}" if ":" in observed else f"http://{observed}:{port}"
    return DialbackReport(reachable, url, observed, "reason")


# --- the decision ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("explicit", "reports", "ice_on", "expected"),
    [
        # the operator's URL is listed whatever the bootstraps say
        ("https://w.example", [report(False)], True, ("https://w.example", ICE)),
        ("https://w.example", [None], False, ("https://w.example",)),
        # a bootstrap reached it: the address it saw, not the guess
        (None, [report(True)], True, ("http://198.51.100.2:8000", ICE)),
        (None, [report(True)], False, ("http://198.51.100.2:8000",)),
        (None, [report(False), report(True), None], True, ("http://198.51.100.2:8000", ICE)),
        # two bootstraps saw two addresses (IPv4 and IPv6): both, once each
        (
            None,
            [report(True), report(True, "2001:db8::2"), report(True)],
            True,
            ("http://198.51.100.2:8000", "http://[2001:db8::2]:8000", ICE),
        ),
        # every answer says no: only ice://, or with ICE off the guess (and an error in the log)
        (None, [report(False), report(False)], True, (ICE,)),
        (None, [report(False), None], True, (ICE,)),
        (None, [report(False)], False, (GUESS,)),
        # no answer at all, or nobody asked: the guess, as before the dial-back existed
        (None, [None, None], True, (GUESS, ICE)),
        (None, [], True, (GUESS, ICE)),
        (None, [], False, (GUESS,)),
    ],
)
def test_endpoints_follow_what_the_bootstraps_saw(
    explicit: str | None, reports: list[DialbackReport | None], ice_on: bool, expected: tuple[str, ...]
) -> None:
    assert endpoints_for(GUESS, explicit, reports, ice_on, PEER) == expected


def test_a_record_never_lists_more_than_four_endpoints() -> None:
    many = [report(True, f"198.51.100.{n}") for n in range(1, 9)]
    assert endpoints_for(GUESS, None, many, True, PEER) == (
        "http://198.51.100.1:8000",
        "http://198.51.100.2:8000",
        "http://198.51.100.3:8000",
        ICE,
    )


def results(*reports: DialbackReport | None) -> list[DialbackResult]:
    return [DialbackResult("198.51.100.1:4222", r, "" if r else "unreachable") for r in reports]


def test_the_log_line_says_what_was_found_and_what_is_listed() -> None:
    unreachable = DialbackReport(
        False, "http://198.51.100.11:8000", "198.51.100.11", "could not connect to 198.51.100.11:8000"
    )
    level, line = reachability_line(None, results(unreachable), (ICE,), True)
    assert level == logging.WARNING
    assert "not reachable from outside" in line and "could not connect to 198.51.100.11:8000" in line
    assert f"listing only {ICE}" in line and "forward" in line
    level, line = reachability_line(None, results(unreachable), (GUESS,), False)
    assert level == logging.ERROR and "PEERINFER_ICE=1" in line and "relay" in line
    level, line = reachability_line(None, results(report(True)), ("http://198.51.100.2:8000", ICE), True)
    assert level == logging.INFO and "reachable" in line and "listing http://198.51.100.2:8000" in line
    level, line = reachability_line(None, results(None), (GUESS, ICE), True)
    assert level == logging.WARNING and "no bootstrap answered" in line and GUESS in line
    level, line = reachability_line("http://w.example:8000", results(unreachable), ("http://w.example:8000",), True)
    assert level == logging.WARNING and "PEERINFER_ANNOUNCE_URL" in line


# --- the wire ----------------------------------------------------------------------------------

IDENTITY = PeerIdentity.generate()
ASK = {"port": 8000, "peer_id": IDENTITY.peer_id, "public_key": b64(IDENTITY.public_key)}


def test_a_well_formed_request_is_read() -> None:
    assert read_ask(json.dumps(ASK).encode()) == DialbackAsk(8000, IDENTITY.peer_id, IDENTITY.public_key)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[" * 5000,
        b"[]",
        json.dumps({**ASK, "host": "10.0.0.1"}).encode(),  # the caller may not name a host
        json.dumps({k: v for k, v in ASK.items() if k != "port"}).encode(),
        json.dumps({**ASK, "port": 0}).encode(),
        json.dumps({**ASK, "port": 65536}).encode(),
        json.dumps({**ASK, "port": "8000"}).encode(),
        json.dumps({**ASK, "port": True}).encode(),
        json.dumps({**ASK, "port": 10**400}).encode(),
        json.dumps({**ASK, "peer_id": "AB" * 20}).encode(),
        json.dumps({**ASK, "public_key": "!!"}).encode(),
        json.dumps({**ASK, "public_key": b64(b"short")}).encode(),
        json.dumps({**ASK, "peer_id": PeerIdentity.generate().peer_id}).encode(),  # an id not of that key
    ],
)
def test_a_bad_request_is_a_400_that_says_why(body: bytes) -> None:
    with pytest.raises(RequestError) as caught:
        read_ask(body)
    assert caught.value.status_code == 400 and caught.value.message


def reply(payload: object, status: int = 200) -> HttpReply:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return HttpReply(status, {}, body)


GOOD_REPORT = {"reachable": True, "url": "http://198.51.100.2:8000", "observed": "198.51.100.2", "reason": "ok"}


def test_a_well_formed_report_is_read() -> None:
    assert read_report(reply(GOOD_REPORT), 8000) == DialbackReport(True, GOOD_REPORT["url"], "198.51.100.2", "ok")
    v6 = {**GOOD_REPORT, "url": "http://[2001:db8::2]:8000", "observed": "2001:db8::2"}
    assert read_report(reply(v6), 8000) is not None


@pytest.mark.parametrize(
    "answer",
    [
        reply(GOOD_REPORT, status=500),
        reply(b"<html>old bootstrap</html>"),
        reply(b"[" * 10000),
        reply(b"x" * 10000),
        reply([GOOD_REPORT]),
        reply({**GOOD_REPORT, "extra": 1}),
        reply({**GOOD_REPORT, "reachable": "yes"}),
        reply({**GOOD_REPORT, "url": "http://evil.example:8000"}),  # another host than the observed one
        reply({**GOOD_REPORT, "url": "http://198.51.100.2:9999"}),  # another port than the one asked about
        reply({**GOOD_REPORT, "observed": "evil.example", "url": "http://evil.example:8000"}),
        reply({**GOOD_REPORT, "observed": "::ffff:198.51.100.2", "url": "http://[::ffff:198.51.100.2]:8000"}),
        reply({**GOOD_REPORT, "reason": "x" * 1000}),
        reply({**GOOD_REPORT, "reason": None}),
    ],
)
def test_anything_but_a_well_formed_report_is_no_answer(answer: HttpReply) -> None:
    assert read_report(answer, 8000) is None


def test_a_reason_with_control_characters_is_one_printable_line() -> None:
    answer = reply({**GOOD_REPORT, "reason": "a\nb\x1b[31mc"})
    parsed = read_report(answer, 8000)
    assert parsed is not None and parsed.reason.isprintable() and "\n" not in parsed.reason


def test_the_rate_limit_counts_a_source_and_forgets_it_after_the_interval() -> None:
    table = SourceTable(interval_s=5.0, max_sources=2)
    assert table.admit("a", 0.0) == "admitted"
    assert table.admit("a", 1.0) == "too_soon"
    assert table.admit("b", 1.0) == "admitted"
    assert table.admit("c", 2.0) == "full"  # two recent sources: a new one is refused, not one forgotten
    assert table.admit("c", 5.5) == "admitted"  # "a" has aged out
    assert table.admit("a", 5.6) == "full"
    assert table.admit("a", 6.5) == "admitted"  # and now "b" has
    assert len(table) == 2


def test_an_ipv6_home_is_one_source() -> None:
    assert source_key("2001:db8:1:2::10") == source_key("2001:db8:1:2:ffff::1")
    assert source_key("2001:db8:1:3::10") != source_key("2001:db8:1:2::10")
    assert source_key("198.51.100.2") == "198.51.100.2"


# --- the bootstrap's side, over real sockets -----------------------------------------------------


@contextlib.contextmanager
def dialback_service(**options: object) -> Iterator[tuple[str, DialbackService]]:
    service = DialbackService(**{"min_interval_s": 0.0, **options})  # type: ignore[arg-type]
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = DialbackServer(sock, create_dialback_app(service))
    url = f"http://127.0.0.1:{server.port}"
    wait_until(lambda: server.server.started, 10, "the dial-back service did not start")
    try:
        yield url, service
    finally:
        server.stop()


def ask(
    service_url: str, body: object, source: str = "127.0.0.1", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], object]:
    """POST a dial-back request from ``source`` (any of 127.0.0.0/8); status, headers and JSON answer."""
    host, port = service_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=20, source_address=(source, 0))
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        connection.request(
            "POST", DIALBACK_PATH, body=data, headers={"Content-Type": "application/json", **(headers or {})}
        )
        answer = connection.getresponse()
        payload = answer.read()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, json.loads(payload)
    finally:
        connection.close()


def ask_for(identity: PeerIdentity, port: int) -> dict[str, object]:
    return {"port": port, "peer_id": identity.peer_id, "public_key": b64(identity.public_key)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def service() -> Iterator[tuple[str, DialbackService]]:
    with dialback_service() as running:
        yield running


@pytest.fixture
def keyed_worker(tmp_path: Path) -> Iterator[ThreadWorker]:
    """A fake-engine worker with its own key and a DHT node of its own (no bootstrap: nothing to ask)."""
    engine = FakeEngine(story_responder, slots=2, max_queue=4)
    boot = DhtNode(host="127.0.0.1", port=0, network_id=network_id())
    worker = ThreadWorker(
        engine,
        lambda url: net_settings(
            tmp_path / "home", boot, network_id(), url, bootstrap="", dht=True, dht_host="127.0.0.1"
        ),
    )
    try:
        yield worker
    finally:
        worker.stop()
        boot.close()


def worker_port(worker: ThreadWorker) -> int:
    return int(worker.url.rsplit(":", 1)[1])


def test_a_reachable_worker_is_reported_reachable_at_its_source_address(
    service: tuple[str, DialbackService], keyed_worker: ThreadWorker
) -> None:
    identity = keyed_worker.app.state.network.identity
    status, _, answer = ask(service[0], ask_for(identity, worker_port(keyed_worker)))
    assert status == 200
    assert answer == {
        "reachable": True,
        "url": keyed_worker.url,
        "observed": "127.0.0.1",
        "reason": f"127.0.0.1:{worker_port(keyed_worker)} answered the challenge with the given key",
    }


def test_nothing_listening_is_not_reachable(service: tuple[str, DialbackService]) -> None:
    port = free_port()
    status, _, answer = ask(service[0], ask_for(PeerIdentity.generate(), port))
    assert status == 200 and isinstance(answer, dict)
    assert answer["reachable"] is False and answer["reason"] == f"could not connect to 127.0.0.1:{port}"


@pytest.mark.parametrize("mode", ["other_key", "bad_signature"])
def test_a_server_that_signs_with_another_key_is_not_reachable(service: tuple[str, DialbackService], mode: str) -> None:
    with HostilePeer(mode, FAKE_SHA) as hostile:
        port = int(hostile.url.rsplit(":", 1)[1])
        status, _, answer = ask(service[0], ask_for(hostile.identity, port))
    assert status == 200 and isinstance(answer, dict)
    assert answer["reachable"] is False and "not signed with the given key" in str(answer["reason"])


def test_claiming_another_workers_port_is_not_reachable(
    service: tuple[str, DialbackService], keyed_worker: ThreadWorker
) -> None:
    """A worker that is not reachable cannot borrow the answer of one that is, on its address."""
    status, _, answer = ask(service[0], ask_for(PeerIdentity.generate(), worker_port(keyed_worker)))
    assert status == 200 and isinstance(answer, dict)
    assert answer["reachable"] is False and "not from the peer id asked about" in str(answer["reason"])


@pytest.mark.parametrize("mode", ["drip", "silent"])
def test_a_slow_or_silent_server_is_not_reachable_and_the_answer_comes_by_the_deadline(
    service: tuple[str, DialbackService], mode: str
) -> None:
    with HostilePeer(mode, FAKE_SHA) as hostile:
        port = int(hostile.url.rsplit(":", 1)[1])
        status, _, answer = ask(service[0], ask_for(hostile.identity, port))  # the client's own limit is 20 s
    assert status == 200 and isinstance(answer, dict)
    assert answer["reachable"] is False and "within 3 s" in str(answer["reason"])


Served = TypeVar("Served")


class CannedServer:
    """A TCP server on 127.0.0.1 (on ``port`` if given) that answers every request with ``answer(...)`` bytes;
    ``None`` means: read the request and never answer."""

    def __init__(self, answer: Callable[[bytes], bytes | None], port: int = 0) -> None:
        self.answer = answer
        self.requests: list[bytes] = []
        self.sock = socket.socket()
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(("127.0.0.1", port))
            self.sock.listen(16)
        except OSError:
            self.sock.close()  # a taken port: no socket is left for the garbage collector to warn about
            raise
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.closing.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            data = b""
            with contextlib.suppress(OSError):
                while b"\r\n\r\n" not in data:
                    piece = conn.recv(4096)
                    if not piece:
                        return
                    data += piece
                self.requests.append(data)
                answer = self.answer(data)
                if answer is None:
                    self.closing.wait(30)
                    return
                conn.sendall(answer)

    def close(self) -> None:
        self.closing.set()
        self.sock.close()
        self.thread.join(5)


def http_answer(body: bytes, status: str = "200 OK") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body


def test_a_huge_answer_is_not_reachable(service: tuple[str, DialbackService]) -> None:
    server = CannedServer(lambda request: http_answer(b'{"peer_id": "' + b"a" * 1_000_000 + b'"}'))
    try:
        status, _, answer = ask(service[0], ask_for(PeerIdentity.generate(), server.port))
    finally:
        server.close()
    assert status == 200 and isinstance(answer, dict)
    assert answer["reachable"] is False and "more than 4096 bytes" in str(answer["reason"])


def test_an_oversized_body_is_413(service: tuple[str, DialbackService]) -> None:
    big = {**ask_for(PeerIdentity.generate(), 8000), "pad": "x" * MAX_ASK_BYTES}
    status, _, answer = ask(service[0], big)
    assert status == 413 and "4096" in json.dumps(answer)


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b"{not json", "application/json", 400),
        (b"[" * 3000, "application/json", 400),
        (json.dumps({"port": 8000, "url": "http://10.0.0.1:80/"}).encode(), "application/json", 400),
        (b'{"port": 8000}', "text/plain", 415),
    ],
)
def test_a_bad_request_gets_its_status_and_dials_nothing(
    service: tuple[str, DialbackService], body: bytes, content_type: str, status: int
) -> None:
    got, _, answer = ask(service[0], body, headers={"Content-Type": content_type})
    assert got == status and isinstance(answer, dict) and answer["error"]["message"]


def test_a_flood_from_one_address_gets_429_and_other_addresses_are_still_served() -> None:
    with dialback_service(min_interval_s=60.0) as (url, _):
        body = ask_for(PeerIdentity.generate(), free_port())
        assert ask(url, body)[0] == 200
        statuses = [ask(url, body) for _ in range(5)]
        assert {status for status, _, _ in statuses} == {429}
        assert statuses[0][1]["retry-after"].isdigit()
        assert ask(url, body, source="127.0.0.2")[0] == 200


def test_only_the_source_address_is_dialed(service: tuple[str, DialbackService], keyed_worker: ThreadWorker) -> None:
    """The worker listens on 127.0.0.1 only; a request from 127.0.0.2 naming its port is dialed at 127.0.0.2."""
    identity = keyed_worker.app.state.network.identity
    port = worker_port(keyed_worker)
    status, _, answer = ask(service[0], ask_for(identity, port), source="127.0.0.2")
    assert status == 200 and isinstance(answer, dict)
    assert (answer["observed"], answer["reachable"]) == ("127.0.0.2", False)
    # A forwarding header from loopback (a local proxy, or an attacker on this machine) names no one either.
    headers = {"X-Forwarded-For": "127.0.0.2", "Forwarded": "for=127.0.0.2", "X-Real-IP": "127.0.0.2"}
    status, _, answer = ask(service[0], ask_for(identity, port), headers=headers)
    assert status == 200 and isinstance(answer, dict)
    assert (answer["observed"], answer["reachable"]) == ("127.0.0.1", True)


def test_dial_backs_beyond_the_limit_at_once_get_503_and_the_service_recovers() -> None:
    with dialback_service(max_dials=2) as (url, service), HostilePeer("silent", FAKE_SHA) as silent:
        port = int(silent.url.rsplit(":", 1)[1])
        body = ask_for(silent.identity, port)
        answers: list[int] = []
        threads = [threading.Thread(target=lambda: answers.append(ask(url, body)[0])) for _ in range(2)]
        for thread in threads:
            thread.start()
        wait_until(lambda: service.dialing == 2, 10, "the two dial-backs did not start")
        status, headers, _ = ask(url, body)
        assert status == 503 and headers["retry-after"].isdigit()
        for thread in threads:
            thread.join(20)
        assert answers == [200, 200]
        assert ask(url, ask_for(PeerIdentity.generate(), free_port()))[0] == 200


def test_other_paths_and_methods_are_refused() -> None:
    with dialback_service() as (url, _):
        assert requests.get(url + DIALBACK_PATH, timeout=10).status_code == 405
        assert requests.post(url + "/peer/challenge", json={}, timeout=10).status_code == 404


# --- the worker's side -------------------------------------------------------------------------


class Captured(logging.Handler):
    """Records of the ``peerinfer`` logger (it does not propagate to the root, so caplog misses them)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def lines(self, level: int = logging.WARNING) -> list[str]:
        return [record.getMessage() for record in self.records if record.levelno >= level]


@pytest.fixture
def captured() -> Iterator[Captured]:
    handler = Captured()
    logger = logging.getLogger("peerinfer")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def the_record(boot: DhtNode, peer_id: str) -> PeerRecord | None:
    found = select_live(boot.get(DIRECTORY_KEY, 2.0), time.time())
    return next((record for record in found.records if record.peer_id == peer_id), None)


def wait_for_endpoints(boot: DhtNode, worker: ThreadWorker, expected: tuple[str, ...]) -> None:
    def listed() -> bool:
        record = the_record(boot, worker.peer_id)
        return record is not None and record.endpoints == expected

    wait_until(listed, 30, f"the record never listed {expected}: {the_record(boot, worker.peer_id)}")


@contextlib.contextmanager
def guessing_worker(
    tmp_path: Path,
    boot: DhtNode,
    net: int,
    monkeypatch: pytest.MonkeyPatch,
    *,
    port_offset: int = 0,
    **overrides: object,
) -> Iterator[ThreadWorker]:
    """A worker with no PEERINFER_ANNOUNCE_URL: its URL is guessed from uvicorn's argv, as on a real start.

    With ``port_offset`` the guess names a port where nothing listens (a worker behind a firewall).
    """

    def settings(url: str) -> object:
        port = int(url.rsplit(":", 1)[1]) + port_offset
        monkeypatch.setattr(sys, "argv", ["uvicorn", "worker:app", "--host", "127.0.0.1", "--port", str(port)])
        return net_settings(tmp_path / "home", boot, net, url, announce_url=None, **overrides)

    engine = FakeEngine(story_responder, slots=2, max_queue=4)
    worker = ThreadWorker(engine, settings)  # type: ignore[arg-type]
    try:
        yield worker
    finally:
        worker.stop()


@contextlib.contextmanager
def bootstrap_with_tcp(net: int, listen: Callable[[int], Served]) -> Iterator[tuple[DhtNode, Served]]:
    """A DHT node on UDP and ``listen(its port)`` on TCP, one port number.

    The OS picks the UDP port; that number can be taken on TCP (another test's connection): a new node then.
    """
    for attempt in range(5):
        with bootstrap_node(net) as boot:
            try:
                served = listen(boot.port)
            except OSError:
                if attempt == 4:
                    raise
                continue
            yield boot, served
            return


@contextlib.contextmanager
def bootstrap_with_dialback(net: int) -> Iterator[DhtNode]:
    """What ``python -m peerinfer bootstrap`` runs: a DHT node on UDP and the dial-back on TCP, one port number."""
    with bootstrap_with_tcp(net, lambda port: DialbackServer.listen("127.0.0.1", port)) as (boot, server):
        wait_until(lambda: server.server.started, 10, "the dial-back service did not start")
        try:
            yield boot
        finally:
            server.stop()


def test_a_reachable_worker_lists_the_url_it_was_reached_at_then_ice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, captured: Captured
) -> None:
    net = network_id()
    with bootstrap_with_dialback(net) as boot, guessing_worker(tmp_path, boot, net, monkeypatch) as worker:
        wait_for_endpoints(boot, worker, (worker.url, f"ice://{worker.peer_id}"))
        results = worker.app.state.network.dialback
        assert [r.report.reachable for r in results if r.report] == [True]


def test_an_unreachable_worker_lists_only_ice_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, captured: Captured
) -> None:
    net = network_id()
    with (
        bootstrap_with_dialback(net) as boot,
        guessing_worker(tmp_path, boot, net, monkeypatch, port_offset=1) as worker,
    ):
        wait_until(lambda: the_record(boot, worker.peer_id), 30, "the worker announced nothing")
        first = the_record(boot, worker.peer_id)
        assert first is not None and first.endpoints == (f"ice://{worker.peer_id}",)  # the first record already
        port = int(worker.url.rsplit(":", 1)[1]) + 1
        wait_until(lambda: captured.lines(), 10, "nothing was logged")
        [line] = [line for line in captured.lines() if "not reachable from outside" in line]
        assert f"could not connect to 127.0.0.1:{port}" in line and "listing only ice://" in line


def test_an_unreachable_worker_without_ice_keeps_its_url_and_logs_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, captured: Captured
) -> None:
    net = network_id()
    with (
        bootstrap_with_dialback(net) as boot,
        guessing_worker(tmp_path, boot, net, monkeypatch, port_offset=1, ice=False) as worker,
    ):
        guessed = worker.app.state.network.guessed_url
        wait_for_endpoints(boot, worker, (guessed,))
        wait_until(lambda: captured.lines(logging.ERROR), 10, "no error was logged")
        assert "PEERINFER_ICE=1" in captured.lines(logging.ERROR)[0]


def test_the_operators_url_is_listed_as_set(tmp_path: Path, captured: Captured) -> None:
    net = network_id()
    with bootstrap_with_dialback(net) as boot:
        engine = FakeEngine(story_responder, slots=2, max_queue=4)
        worker = ThreadWorker(engine, lambda url: net_settings(tmp_path / "home", boot, net, url))
        try:
            wait_for_endpoints(boot, worker, (worker.url, f"ice://{worker.peer_id}"))
            network = worker.app.state.network
            wait_until(lambda: network.dialback, 20, "the dial-back was not asked")  # and logged, at INFO
            assert [r.report.reachable for r in network.dialback if r.report] == [True]
        finally:
            worker.stop()


@contextlib.contextmanager
def bootstrap_with_fake_dialback(
    net: int, answer: Callable[[bytes], bytes | None]
) -> Iterator[tuple[DhtNode, CannedServer]]:
    """A DHT node on UDP and a canned server on TCP, one port number."""
    with bootstrap_with_tcp(net, lambda port: CannedServer(answer, port=port)) as (boot, fake):
        try:
            yield boot, fake
        finally:
            fake.close()


FAKE_BOOTSTRAPS: dict[str, Callable[[bytes], bytes | None]] = {
    "garbage": lambda request: http_answer(b"\x00\xff not json at all"),
    "lies": lambda request: http_answer(json.dumps({**GOOD_REPORT, "url": "http://evil.example:80"}).encode()),
    "huge": lambda request: http_answer(b'{"reason": "' + b"x" * 2_000_000 + b'"}'),
    "not_http": lambda request: b"SSH-2.0-OpenSSH_9.6\r\n" * 100,
    "rate_limited": lambda request: http_answer(b'{"error": {}}', "429 Too Many Requests"),
    "never": lambda request: None,
}


@pytest.mark.parametrize("kind", list(FAKE_BOOTSTRAPS))
def test_a_bootstrap_that_answers_badly_counts_as_no_answer_and_the_worker_keeps_announcing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, captured: Captured, kind: str
) -> None:
    net = network_id()
    with (
        bootstrap_with_fake_dialback(net, FAKE_BOOTSTRAPS[kind]) as (boot, fake),
        guessing_worker(tmp_path, boot, net, monkeypatch) as worker,
    ):
        wait_for_endpoints(boot, worker, (worker.url, f"ice://{worker.peer_id}"))
        assert fake.requests and fake.requests[0].startswith(b"POST /peer/dialback ")
        [line] = [line for line in captured.lines() if "no bootstrap answered" in line]
        assert f"127.0.0.1:{boot.port}: no answer" in line
        network = worker.app.state.network
        rounds = network.announce_rounds
        wait_until(lambda: network.announce_rounds >= rounds + 3, 20, "the worker stopped announcing")


# --- the bootstrap command ---------------------------------------------------------------------


def run_bootstrap_command(*args: str) -> tuple[int, str]:
    """``python -m peerinfer bootstrap ARGS`` until it says it runs, then SIGTERM; exit code and stderr."""
    command = [sys.executable, "-m", "peerinfer", "bootstrap", "--host", "127.0.0.1", *args]
    process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    lines = []
    try:
        for line in process.stderr:  # the command prints its lines, then waits; the pipe stays open
            lines.append(line)
            if "Ctrl-C stops it" in line:
                break
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        process.stderr.close()
    return code, "".join(lines)


def test_the_bootstrap_command_serves_the_dial_back_unless_told_not_to() -> None:
    port = free_port()
    code, said = run_bootstrap_command("--port", str(port))
    assert code == 0 and f"dial-back service on tcp 127.0.0.1:{port}" in said
    code, said = run_bootstrap_command("--port", str(port), "--no-dialback")
    assert code == 0 and "dial-back" not in said and f"bootstrap node on udp 127.0.0.1:{port}" in said


def test_a_taken_tcp_port_leaves_the_bootstrap_a_dht_node_that_says_so() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code, said = run_bootstrap_command("--port", str(port))
    assert code == 0 and f"bootstrap node on udp 127.0.0.1:{port}" in said
    assert f"cannot serve the dial-back on tcp 127.0.0.1:{port}" in said and "--no-dialback" in said
