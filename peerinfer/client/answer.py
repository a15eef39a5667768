"""One answer, whichever peers produce it: failover before the first token, resume after it.

``Router.answer`` makes a ``RoutedAnswer``; iterating it picks a peer (``Router.pick``), streams from
it, and on a failure picks another, asking it to continue from the text so far (``client.resume``).
The events say who serves (``PeerOpened``, with the ``Switch`` that led there) and carry each event of
the serving peer's stream (``PeerChunk``), so the SDK can print text and the gateway can relay whole
chunks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from peerinfer.client.resume import AnswerPlan, resumed_body
from peerinfer.client.routing import failure_action
from peerinfer.client.stream_events import StreamChunk
from peerinfer.client.transport import MAX_ANSWER_TOKENS, WorkerStream
from peerinfer.errors import ClientError, NoPeersError

if TYPE_CHECKING:
    from peerinfer.client.core import Router

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Switch:
    """The request left ``from_url`` for ``to_url``; ``resumed_chars`` of answer had streamed."""

    from_url: str
    to_url: str
    reason: str
    resumed_chars: int


@dataclass(frozen=True)
class StreamStats:
    """What one streamed answer cost. Token counts come from the workers' ``usage``."""

    ttft_s: float | None
    total_s: float
    prompt_tokens: int | None
    completion_tokens: int
    tokens_per_s: float
    finish_reason: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "ttft_s": self.ttft_s,
            "total_s": self.total_s,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "tokens_per_s": self.tokens_per_s,
            "finish_reason": self.finish_reason,
        }


def stream_stats(
    started: float, first: float | None, prompt_tokens: int | None, completion_tokens: int, finish: str | None
) -> StreamStats:
    """Stats of an answer that began (``time.perf_counter``) at ``started`` and ends now."""
    total = time.perf_counter() - started
    generating = total - (first - started) if first is not None else 0.0
    return StreamStats(
        ttft_s=None if first is None else first - started,
        total_s=total,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        tokens_per_s=(completion_tokens - 1) / generating if completion_tokens > 1 and generating > 0 else 0.0,
        finish_reason=finish,
    )


@dataclass(frozen=True)
class PeerOpened:
    """A peer accepted the request (HTTP 200); ``switch`` says why it is not the first one."""

    peer_id: str
    url: str
    switch: Switch | None


@dataclass(frozen=True)
class PeerChunk:
    """One event of the serving peer's stream."""

    peer_id: str
    chunk: StreamChunk


class RoutedAnswer:
    """One answer, whichever peers produce it. Iterate (``async for``) for ``PeerOpened``/``PeerChunk`` events.

    Once the iteration has ended: ``peers`` lists the URLs that served it, ``switches`` every move,
    ``prompt_tokens``/``completion_tokens`` the whole answer's usage and ``stats`` its timings.
    Raises ``ClientError`` for a worker's own refusal (a 4xx that any peer would give), and when a
    peer fails after text has streamed and the plan cannot be resumed; ``NoPeersError`` when no
    peer is left within ``max_attempts``.
    """

    def __init__(self, router: Router, plan: AnswerPlan, *, prefer: str | None = None) -> None:
        self.router = router
        self.plan = plan
        self.prefer = prefer
        self.peers: list[str] = []
        self.switches: list[Switch] = []
        self.attempts = 0
        self.prompt_tokens: int | None = None
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.partial = ""
        self.stats: StreamStats | None = None

    def __aiter__(self) -> AsyncIterator[PeerOpened | PeerChunk]:
        return self._events()

    async def _events(self) -> AsyncIterator[PeerOpened | PeerChunk]:
        router = self.router
        started = time.perf_counter()
        first: float | None = None
        deltas = 0
        tried: set[str] = set()
        reason = ""
        last_url: str | None = None
        while True:
            if self.attempts >= router.options.max_attempts:
                where = f" after {len(self.partial)} characters of the answer" if self.partial else ""
                raise NoPeersError(f"gave up after {self.attempts} attempts{where}; last failure: {reason}")
            record, probe = await router.pick(tried, self.prefer if last_url is None else None)
            switch = None
            if last_url is not None:
                switch = Switch(last_url, probe.url, reason, len(self.partial))
                self.switches.append(switch)
                log.info("peer %s failed (%s); continuing on %s", last_url, reason, probe.url)
            tried.add(record.peer_id)
            self.attempts += 1
            last_url = probe.url
            earlier = deltas
            body = self.plan.body if not self.partial else resumed_body(self.plan, self.partial, deltas)
            limit = None if self.plan.max_deltas is None else max(1, self.plan.max_deltas - deltas)
            stream: WorkerStream | None = None
            peer_first: float | None = None
            usage: tuple[int | None, int | None] = (None, None)
            router.serving(record.peer_id, +1)  # no await since the pick: the next request to choose sees it
            try:
                stream = await router.http.open_stream(probe.url, self.plan.path, body, max_tokens=limit)
                self.peers.append(probe.url)
                yield PeerOpened(record.peer_id, probe.url, switch)
                async for chunk in stream.chunks():
                    if chunk.text:
                        now = time.perf_counter()
                        first = first if first is not None else now
                        peer_first = peer_first if peer_first is not None else now
                        self.partial += chunk.text
                        deltas += 1
                    if chunk.completion_tokens is not None:
                        usage = (chunk.prompt_tokens, chunk.completion_tokens)
                    self.finish_reason = chunk.finish_reason or self.finish_reason
                    yield PeerChunk(record.peer_id, chunk)
            except ClientError as exc:
                if failure_action(exc.status, bool(self.partial)) == "fatal":
                    raise
                router.fail(record.peer_id, exc.message)
                reason = exc.message
                if self.partial and not self.plan.resumable:
                    raise ClientError(
                        f"the peer serving this answer failed after {len(self.partial)} characters ({exc.message}); "
                        "an answer with several choices, tools or structured output cannot be resumed elsewhere"
                    ) from exc
                continue
            finally:
                router.serving(record.peer_id, -1)
                if stream is not None:
                    await stream.aclose()
            if stream is not None and stream.overran:
                # More text than was asked for: the answer ends at the limit, the peer is not trusted again soon.
                router.fail(record.peer_id, "sent more text than max_tokens")
                log.warning("peer %s sent more text than max_tokens; the answer ends at the limit", probe.url)
                self.finish_reason = "length"
            else:
                router.succeed(record.peer_id)
            prompt_tokens, completion_tokens = usage
            if completion_tokens is None:
                completion_tokens = deltas - earlier
            # A peer's count is its claim: never more than it was allowed to write, nor fewer than it sent.
            completion_tokens = max(deltas - earlier, min(completion_tokens, limit or MAX_ANSWER_TOKENS))
            # Tokens of abandoned peers are counted as the deltas they sent; the resumed prompt held them.
            self.completion_tokens = earlier + completion_tokens
            self.prompt_tokens = None if prompt_tokens is None else max(0, prompt_tokens - earlier)
            self.stats = stream_stats(started, first, self.prompt_tokens, self.completion_tokens, self.finish_reason)
            if peer_first is not None and deltas - earlier > 1:
                router.observe_speed(
                    record.peer_id, (deltas - earlier - 1) / max(1e-6, time.perf_counter() - peer_first)
                )
            if self.plan.chat and isinstance(body.get("messages"), list):
                router.remember(resumed_body(self.plan, self.partial, 0)["messages"], record.peer_id)
            return
