"""Bootstrap lists, DHT bind hosts and the guess of a worker's own URL. Pure."""

from __future__ import annotations

from collections.abc import Sequence

from peerinfer.errors import ConfigError

LOOPBACK_NAMES = ("127.", "localhost", "::1")


def parse_bootstrap(text: str) -> list[tuple[str, int]]:
    """``host:port[,host:port…]`` to pairs; an empty string is an empty list."""
    nodes: list[tuple[str, int]] = []
    for part in (piece.strip() for piece in text.split(",")):
        if not part:
            continue
        host, sep, port = part.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(
                f"invalid bootstrap address {part!r}: expected host:port with a port from 1 to 65535, "
                "for example 127.0.0.1:4222; check PEERINFER_BOOTSTRAP or --bootstrap"
            )
        nodes.append((host, int(port)))
    return nodes


def is_loopback(host: str) -> bool:
    return host.startswith(LOOPBACK_NAMES)


def dht_bind_host(configured: str | None, bootstrap: Sequence[tuple[str, int]]) -> str:
    """Where the DHT node listens: as configured; else loopback when every bootstrap node is on it."""
    if configured:
        return configured
    if bootstrap and all(is_loopback(host) for host, _ in bootstrap):
        return "127.0.0.1"
    return "0.0.0.0"


def guess_announce_url(argv: Sequence[str], fallback_host: str) -> str:
    """The worker's URL from uvicorn's ``--host``/``--port`` (``--host=x`` too); uvicorn's defaults otherwise.

    A wildcard host is replaced by ``fallback_host`` (this machine's address), since a client cannot
    connect to 0.0.0.0. Set ``PEERINFER_ANNOUNCE_URL`` when this guess is wrong (proxies, NAT, TLS).
    """
    values = {"--host": "127.0.0.1", "--port": "8000"}
    for index, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name in values:
            if eq:
                values[name] = value
            elif index + 1 < len(argv):
                values[name] = argv[index + 1]
    host = values["--host"]
    if host in ("0.0.0.0", "::", ""):
        host = fallback_host
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{values['--port']}"
