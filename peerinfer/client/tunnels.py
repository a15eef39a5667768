"""``ice://`` endpoints for ``WorkerHttp``: each one an ICE path (``network.ice``) seen as a loopback origin.

    tunnels = ice_tunnels(opened.signalling, IceOptions.from_settings(settings))  # None: no DHT node, or ICE off
    http = WorkerHttp(tunnels=tunnels)

Failures to open a path are ``PeerRejected("unreachable")``: the router bans the peer and moves on,
as it does for an http:// endpoint that refuses connections.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from peerinfer.client.peer_http import PeerRejected
from peerinfer.network.ice_config import IceServer
from peerinfer.network.records import ICE_SCHEME, is_ice_endpoint
from peerinfer.settings import NetworkSettings

if TYPE_CHECKING:
    from peerinfer.network.ice import IceDialer, Signalling


class IceEndpoints:
    """Opens ``ice://<peer id>`` endpoints through one ``IceDialer`` (one path per peer, shared)."""

    def __init__(
        self,
        signalling: Signalling,
        servers: Sequence[IceServer] = (),
        *,
        direct_timeout_s: float = 3.0,
        timeout_s: float = 10.0,
    ) -> None:
        self.signalling = signalling
        self.servers = tuple(servers)
        self.direct_timeout_s = direct_timeout_s
        self.timeout_s = timeout_s
        self.dialer: IceDialer | None = None  # made at the first ice:// endpoint: aiortc takes 0.6 s to import

    @staticmethod
    def _peer(endpoint: str) -> str:
        return endpoint[len(ICE_SCHEME) :]

    async def origin(self, endpoint: str) -> str:
        from peerinfer.network.ice import IceDialer, IceFailed

        if not is_ice_endpoint(endpoint):
            raise PeerRejected("malformed", f"{endpoint[:60]!r} is not an ice:// endpoint")
        if self.dialer is None:
            self.dialer = IceDialer(
                self.signalling, self.servers, direct_timeout_s=self.direct_timeout_s, timeout_s=self.timeout_s
            )
        try:
            tunnel = await self.dialer.tunnel(self._peer(endpoint))
        except IceFailed as exc:
            raise PeerRejected("busy" if exc.refused else "unreachable", str(exc)) from exc
        except Exception as exc:  # aiortc failing in a way we did not foresee is still this peer's failure
            raise PeerRejected("unreachable", f"the ICE path failed: {type(exc).__name__}: {exc}") from exc
        return tunnel.base_url

    def is_open(self, endpoint: str) -> bool:
        return self.dialer is not None and self.dialer.tunnel_of(self._peer(endpoint)) is not None

    def path(self, endpoint: str) -> str | None:
        tunnel = self.dialer.tunnel_of(self._peer(endpoint)) if self.dialer is not None else None
        return tunnel.path if tunnel is not None else None

    async def aclose(self) -> None:
        if self.dialer is not None:
            await self.dialer.aclose()


@dataclass(frozen=True)
class IceOptions:
    """Whether and how a client opens ``ice://`` endpoints (``PEERINFER_ICE*`` in ``from_settings``)."""

    enabled: bool = True
    servers: tuple[IceServer, ...] = ()
    direct_timeout_s: float = 3.0
    timeout_s: float = 10.0

    @classmethod
    def from_settings(cls, settings: NetworkSettings) -> IceOptions:
        return cls(settings.ice, settings.ice_servers, settings.ice_direct_timeout_s, settings.ice_timeout_s)


def ice_tunnels(signalling: Signalling | None, options: IceOptions) -> IceEndpoints | None:
    """The ``ice://`` opener of a client with a DHT node and ICE on; None otherwise."""
    if signalling is None or not options.enabled:
        return None
    return IceEndpoints(
        signalling, options.servers, direct_timeout_s=options.direct_timeout_s, timeout_s=options.timeout_s
    )
