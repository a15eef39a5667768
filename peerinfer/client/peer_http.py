"""What an exchange with a peer ends in: its reply, or ``PeerRejected`` with a countable reason. Pure.

The exchanges themselves are ``client.transport.WorkerHttp``'s.
"""

from __future__ import annotations

from dataclasses import dataclass


class PeerRejected(ValueError):
    """A peer's answer that the client must not use; ``reason`` is a short, countable word."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class HttpReply:
    status: int
    headers: dict[str, str]
    body: bytes
