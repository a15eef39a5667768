"""The one module that imports ``zeroconf``: workers announced and found on a LAN with mDNS/DNS-SD.

A worker registers a ``_peerinfer._tcp.local.`` service named by its peer id. Its TXT record
carries the same signed record the worker puts on the DHT (``records.sign_record``'s bytes), cut
into strings ``r0``, ``r1``, ... of at most ``PIECE_BYTES`` bytes, beside ``v=1``, the peer id
(``id``) and the network id (``net``, hex). Clients trust nothing in the TXT: ``LanStore`` only
reassembles the record's bytes, and discovery checks them as it checks a DHT value (signature,
times, fields), then the router asks the peer to sign a nonce. The service's SRV and A records
are informational (for ``avahi-browse``); clients use the record's signed endpoint.

Choices and quirks:

- Sockets are opened on every IPv4 interface (``InterfaceChoice.All``) or on the given addresses,
  never on the routing table's default (``InterfaceChoice.Default``): a network namespace whose
  only interface is a veth has no route to 224.0.0.251, and sending there fails.
- mDNS TTLs follow the record lifetime, so a worker killed with -9 leaves caches about when its
  record expires. Liveness itself comes from the signed record's ``expires_at``.
- A graceful stop first publishes the signed withdrawal, then the goodbye; a browser keeps a
  withdrawal it read after the goodbye, so discovery, which remembers verified peers until their
  record expires, hears that the peer left.
- The sync ``Zeroconf`` runs its own event-loop thread; its blocking calls must not run on an
  asyncio loop (the worker calls them through ``asyncio.to_thread``).
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Sequence
from urllib.parse import urlsplit

import zeroconf
from zeroconf import (
    InterfaceChoice,
    IPVersion,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)

from peerinfer.errors import ConfigError
from peerinfer.network.records import PROTOCOL_VERSION, RecordRejected, verify_record

log = logging.getLogger(__name__)

SERVICE_TYPE = "_peerinfer._tcp.local."
PIECE_BYTES = 250
"""Record bytes per TXT string: with its key (``r12=``) a string stays under DNS's 255."""
MAX_PIECES = 16
MAX_RECORD_BYTES = 4096
"""A reassembled record longer than this is dropped (records.py refuses more than 2048 anyway)."""
MAX_SERVICES = 512
"""Services a browser remembers; when full, one whose TXT held no record of this network makes room
for a new one, else the new one is dropped and counted as ``over_limit``."""
FIRST_ANSWER_SETTLE_S = 0.25
_PIECE_KEY = re.compile(rb"r([0-9]{1,2})")
_HEX40 = re.compile(rb"[0-9a-f]{40}")


def _interfaces(addresses: Sequence[str]) -> list[str] | InterfaceChoice:
    return list(addresses) if addresses else InterfaceChoice.All


def _open_zeroconf(addresses: Sequence[str]) -> Zeroconf:
    try:
        return Zeroconf(interfaces=_interfaces(addresses), ip_version=IPVersion.V4Only)
    except OSError as exc:
        where = ", ".join(addresses) or "every IPv4 interface"
        raise ConfigError(
            f"cannot open mDNS (UDP 5353) on {where}: {exc}; check PEERINFER_LAN_INTERFACES or turn PEERINFER_LAN off"
        ) from exc


def guess_lan_address() -> str | None:
    """This machine's IPv4 address on the LAN, or None when it has only loopback.

    First the address the kernel would send mDNS from (a connected UDP socket sends nothing),
    then the first non-loopback address of any interface.
    """
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("224.0.0.251", 5353))
        address = str(probe.getsockname()[0])
        if not ipaddress.ip_address(address).is_loopback and address != "0.0.0.0":
            return address
    except OSError:
        pass  # no route to the mDNS group (a namespace with only a veth): look at the interfaces
    finally:
        probe.close()
    for address in zeroconf.get_all_addresses():  # type: ignore[attr-defined]  # exported, not in __all__
        if not ipaddress.ip_address(address).is_loopback:
            return str(address)
    return None


def encode_txt(signed: bytes, peer_id: str, network_id: int) -> bytes:
    """The TXT record's wire form (length-prefixed strings) for one signed record."""
    pieces = [signed[start : start + PIECE_BYTES] for start in range(0, len(signed), PIECE_BYTES)]
    if len(pieces) > MAX_PIECES:
        raise ValueError(f"a signed record of {len(signed)} bytes does not fit in {MAX_PIECES} TXT pieces")
    strings = [f"v={PROTOCOL_VERSION}".encode(), b"id=" + peer_id.encode(), f"net={network_id:x}".encode()]
    strings += [f"r{index}=".encode() + piece for index, piece in enumerate(pieces)]
    return b"".join(bytes([len(item)]) + item for item in strings)


def decode_txt(text: bytes, network_id: int) -> bytes | None:
    """The signed record in a TXT record, None when it belongs to another network.

    Raises ``RecordRejected`` (reason ``bad_txt``, ``bad_version``, ``missing_piece`` or
    ``too_large``) for anything else that is not a well-formed peerinfer TXT, and nothing else.
    """
    if len(text) > MAX_RECORD_BYTES + 1024:
        raise RecordRejected("too_large", f"a TXT record of {len(text)} bytes")
    fields: dict[bytes, bytes] = {}
    offset = 0
    while offset < len(text):
        length = text[offset]
        item = text[offset + 1 : offset + 1 + length]
        if len(item) != length:
            raise RecordRejected("bad_txt", "a TXT string runs past the record's end")
        offset += 1 + length
        key, eq, value = item.partition(b"=")
        if not eq or key in fields:
            raise RecordRejected("bad_txt", f"TXT string {key[:20]!r} has no value or comes twice")
        fields[key] = value
    if fields.get(b"v") != str(PROTOCOL_VERSION).encode():
        raise RecordRejected("bad_version", f"TXT v={fields.get(b'v', b'')[:20]!r}, expected {PROTOCOL_VERSION}")
    if fields.get(b"net") != f"{network_id:x}".encode():
        return None
    if not _HEX40.fullmatch(fields.get(b"id", b"")):
        raise RecordRejected("bad_txt", "the TXT id is not a peer id (40 hex digits)")
    pieces: dict[int, bytes] = {}
    for key, value in fields.items():
        match = _PIECE_KEY.fullmatch(key)
        if match is not None:
            pieces[int(match.group(1))] = value
    if not pieces:
        raise RecordRejected("missing_piece", "the TXT carries no record")
    if sorted(pieces) != list(range(len(pieces))):
        raise RecordRejected("missing_piece", f"record pieces {sorted(pieces)[:20]} are not r0..r{len(pieces) - 1}")
    signed = b"".join(pieces[index] for index in range(len(pieces)))
    if len(signed) > MAX_RECORD_BYTES:
        raise RecordRejected("too_large", f"a reassembled record of {len(signed)} bytes, at most {MAX_RECORD_BYTES}")
    return signed


def _service_info(name: str, peer_id: str, url: str, text: bytes, ttl_s: int) -> ServiceInfo:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    addresses: list[str] = []
    try:
        if parts.hostname and ipaddress.ip_address(parts.hostname).version == 4:
            addresses = [parts.hostname]
    except ValueError:
        pass  # a host name: no A record; clients read the signed endpoint anyway
    return ServiceInfo(
        SERVICE_TYPE,
        name,
        port=port,
        properties=text,
        server=f"{peer_id}.local.",
        host_ttl=ttl_s,
        other_ttl=ttl_s,
        parsed_addresses=addresses,
    )


class LanAnnouncer:
    """Announces one worker on the LAN. Every method blocks (up to a few seconds); none is for a loop thread."""

    def __init__(
        self, *, peer_id: str, url: str, network_id: int, ttl_s: float, interfaces: Sequence[str] = ()
    ) -> None:
        self.peer_id = peer_id
        self.url = url
        self.network_id = network_id
        self.ttl_s = max(1, round(ttl_s))
        self.interfaces = tuple(interfaces)
        self._zc: Zeroconf | None = None
        self._info: ServiceInfo | None = None
        self._lock = threading.Lock()  # an announce still running when the worker stops ends before the goodbye
        self.updates = 0
        self._closed = False

    @property
    def service_name(self) -> str | None:
        """The registered service's name (``<peer id>._peerinfer._tcp.local.``); None before the first announce."""
        info = self._info
        return None if info is None else info.name

    def _info_for(self, signed: bytes, name: str) -> ServiceInfo:
        text = encode_txt(signed, self.peer_id, self.network_id)
        return _service_info(name, self.peer_id, self.url, text, self.ttl_s)

    def announce(self, signed: bytes) -> None:
        """Publish ``signed`` (a record from ``sign_record``): registers the service first, then updates it."""
        with self._lock:
            if self._closed:
                return
            self._announce(signed)

    def _announce(self, signed: bytes) -> None:
        if self._zc is None:
            self._zc = _open_zeroconf(self.interfaces)
        if self._info is None:
            info = self._info_for(signed, f"{self.peer_id}.{SERVICE_TYPE}")
            # Another live process with this identity holds the name: it gets a suffix (the DHT clash check logs it).
            self._zc.register_service(info, allow_name_change=True)
            log.info("LAN: announced %s as %s", self.url, info.name)
        else:
            info = self._info_for(signed, self._info.name)
            self._zc.update_service(info)
            self.updates += 1
        self._info = info

    def close(self, withdrawal: bytes | None = None, grace_s: float = 0.2) -> None:
        """Publish ``withdrawal`` (if given), send the goodbye and close the sockets. Idempotent."""
        with self._lock:
            self._closed = True
            zc, info = self._zc, self._info
            self._zc = self._info = None
            if zc is None:
                return
            try:
                if info is not None and withdrawal is not None:
                    info = self._info_for(withdrawal, info.name)
                    zc.update_service(info)
                    time.sleep(grace_s)  # browsers read the withdrawal before the goodbye drops the TXT
                if info is not None:
                    zc.unregister_service(info)
                    log.info("LAN: %s sent its goodbye%s", info.name, " after its withdrawal" if withdrawal else "")
            finally:
                zc.close()


class LanStore:
    """The signed records of the peerinfer services on the LAN, as discovery's ``ValueStore``.

    It browses ``_peerinfer._tcp.local.`` from construction on. ``get`` returns the records of
    every service of this network, for any peerinfer key (discovery filters by model and checks
    everything). It never raises; what it drops is counted in ``rejected`` by reason.
    """

    def __init__(self, *, network_id: int, interfaces: Sequence[str] = (), max_services: int = MAX_SERVICES) -> None:
        self.network_id = network_id
        self.max_services = max_services
        self.rejected: Counter[str] = Counter()
        self._lock = threading.Condition()
        self._names: set[str] = set()
        self._last: dict[str, bytes | None] = {}  # name -> the record its last announcement carried
        self._departed: dict[str, tuple[bytes, float]] = {}  # name -> a withdrawal read before its goodbye
        self._events = 0
        self._first_get = True
        self._closed = False
        self._zc = _open_zeroconf(interfaces)
        try:
            self._browser = ServiceBrowser(self._zc, SERVICE_TYPE, handlers=[self._on_change])
        except Exception:
            self._zc.close()
            raise

    def _on_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:  # runs on the browser's thread: a raise there would end the browsing
        try:
            with self._lock:
                if state_change is ServiceStateChange.Removed:
                    self._remember_withdrawal(self._last.pop(name, None), name)
                    self._names.discard(name)
                else:
                    if name not in self._names:
                        if len(self._names) >= self.max_services and not self._evict_unreadable():
                            self.rejected["over_limit"] += 1
                            return
                        self._names.add(name)
                        self._departed.pop(name, None)
                    # Read now: by the time a goodbye arrives the cache may no longer hold the TXT.
                    self._last[name] = self._read(name, count=False)
                self._events += 1
                self._lock.notify_all()
        except Exception as exc:
            log.warning("LAN: dropped an mDNS event for %.80r (%s: %s)", name, type(exc).__name__, exc)

    def _evict_unreadable(self) -> bool:
        """Forget one service whose TXT carried no record of this network, to make room; False if none."""
        for name in self._names:
            if self._last.get(name) is None:
                self._names.discard(name)
                self._last.pop(name, None)
                return True
        return False

    def _remember_withdrawal(self, signed: bytes | None, name: str) -> None:
        if signed is None:
            return
        try:
            record = verify_record(signed, time.time())
        except RecordRejected:
            return
        if record.withdrawn and len(self._departed) < self.max_services:
            self._departed[name] = (signed, record.expires_at)

    def _read(self, name: str, count: bool = True) -> bytes | None:
        try:
            info = ServiceInfo(SERVICE_TYPE, name)
            info.load_from_cache(self._zc)
            text = info.text or b""
        except Exception as exc:  # a name zeroconf cannot hold; the peer's failure, not ours
            if count:
                self.rejected["bad_txt"] += 1
            log.debug("LAN: cannot read %.80r: %s", name, exc)
            return None
        if not text:
            return None  # not (yet) in the cache: the next get reads it
        try:
            return decode_txt(text, self.network_id)
        except RecordRejected as exc:
            if count:
                self.rejected[exc.reason] += 1
            log.debug("LAN: dropped the TXT of %.80r: %s", name, exc)
            return None

    def get(self, key: str, timeout_s: float) -> list[bytes]:
        """Every record seen on the LAN for ``key`` (any ``peerinfer/`` key); the first call waits for answers."""
        if not key.startswith(f"peerinfer/v{PROTOCOL_VERSION}/"):
            return []
        with self._lock:
            if self._first_get:
                self._first_get = False
                self._wait_first_answers(time.monotonic() + max(0.0, timeout_s))
            if self._closed:
                return []
            names = sorted(self._names)
            now = time.time()
            for name, (_, expires_at) in list(self._departed.items()):
                if expires_at <= now:
                    del self._departed[name]
            values = [signed for signed in map(self._read, names) if signed is not None]
            return values + [signed for signed, _ in self._departed.values()]

    def _wait_first_answers(self, deadline: float) -> None:
        """Until the first service answers (or the deadline), then until none more for a moment."""
        while not self._names and not self._closed:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._lock.wait(left)
        while not self._closed:
            seen = self._events
            left = min(FIRST_ANSWER_SETTLE_S, deadline - time.monotonic())
            if left <= 0:
                return
            self._lock.wait(left)
            if self._events == seen:
                return

    @property
    def services(self) -> int:
        """Services of any peerinfer network this browser remembers now."""
        with self._lock:
            return len(self._names)

    def __enter__(self) -> LanStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop browsing and close the sockets. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._lock.notify_all()
        try:
            self._browser.cancel()
        finally:
            self._zc.close()
