"""``GET /health``: one typed model, written by the worker and read by every client. Pure.

The worker builds a ``HealthReport`` and sends ``report.wire()``; a client reads a peer's reply with
``read_health``, which is as strict as a signed record: a ``"slots_total": "four"`` is a lie, not a
default. Fields a newer worker adds are ignored, so old clients keep working.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MAX_SLOTS = 4096
MAX_QUEUE = 1_000_000

HealthStatus = Literal["ok", "degraded", "loading", "failed"]


class HealthReport(BaseModel):
    """What a worker says about itself. Only ``status`` is there while the model loads or after it failed."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)

    status: HealthStatus
    error: str | None = Field(default=None, max_length=2000)
    decode_failures: int | None = Field(default=None, ge=0)
    model: str | None = Field(default=None, max_length=256)
    sha256: str | None = Field(default=None, max_length=64)
    n_ctx: int | None = Field(default=None, ge=1, le=1 << 24)
    slots_total: int | None = Field(default=None, ge=1, le=MAX_SLOTS)
    slots_busy: int | None = Field(default=None, ge=0, le=MAX_SLOTS)
    slots_free: int | None = Field(default=None, ge=0, le=MAX_SLOTS)
    requests_running: int | None = Field(default=None, ge=0, le=MAX_SLOTS)
    requests_waiting: int | None = Field(default=None, ge=0, le=MAX_QUEUE)

    @model_validator(mode="after")
    def _consistent(self) -> HealthReport:
        if self.slots_total is not None:
            for name in ("slots_busy", "slots_free"):
                value = getattr(self, name)
                if value is not None and value > self.slots_total:
                    raise ValueError(f"{name}={value} is more than slots_total={self.slots_total}")
        return self

    @property
    def serving(self) -> bool:
        """Whether the worker takes requests: loaded, its last decode worked, and it reports its slots."""
        return (
            self.status == "ok"
            and self.slots_total is not None
            and self.slots_free is not None
            and self.requests_waiting is not None
        )

    def wire(self) -> dict[str, Any]:
        """The JSON object the worker sends: the fields it knows, none of the unknowns."""
        return self.model_dump(exclude_none=True)

    def http_status(self) -> int:
        return 200 if self.status == "ok" else 503


class HealthRejected(ValueError):
    """A ``/health`` body that is not a health report; ``reason`` is "malformed" or "bad_field"."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def read_health(body: bytes) -> HealthReport:
    """The report in a ``/health`` body; raises ``HealthRejected``, never anything else."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise HealthRejected("malformed", "the body is not JSON") from exc
    if not isinstance(value, dict):
        raise HealthRejected("malformed", "the body is not a JSON object")
    try:
        return HealthReport.model_validate(value, strict=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())) or "the report"
        raise HealthRejected("bad_field", f"{where}: {first.get('msg', 'invalid')}"[:200]) from exc
