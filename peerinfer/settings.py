"""The worker's one settings object, read from ``PEERINFER_*`` environment variables."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_threads() -> int:
    return max(1, os.cpu_count() or 1)


class WorkerSettings(BaseSettings):
    """Everything a worker can be told. Every field has a working default."""

    model_config = SettingsConfigDict(env_prefix="PEERINFER_", extra="ignore")

    model: Path | None = Field(
        default=None,
        description="Path to a .gguf file. Unset: ./model.gguf if it exists, else the bundled Gemma 3 270M.",
    )
    cache_dir: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "peerinfer",
        description="Where the bundled model is assembled and checksums are cached.",
    )
    n_ctx: int = Field(default=2048, ge=128, le=131072, description="Context size per slot, in tokens.")
    slots: int = Field(default=4, ge=1, le=64, description="Requests decoded together in one batch.")
    n_threads: int = Field(default_factory=_default_threads, ge=1, le=512, description="CPU threads.")
    prefill_chunk: int = Field(
        default=64,
        ge=8,
        le=8192,
        description="Prompt tokens decoded per step, in a call of their own between generation steps.",
    )
    batch_invariant: bool = Field(
        default=True,
        description="Same text for a request whether it runs alone or batched (turns off repacked weights).",
    )
    max_queue: int = Field(default=16, ge=0, le=10000, description="Requests that may wait for a slot.")
    max_tokens_cap: int = Field(default=4096, ge=1, le=131072, description="Largest max_tokens accepted.")
    max_body_bytes: int = Field(default=1_048_576, ge=1024, le=64 * 1_048_576, description="Largest request body.")
    api_key: SecretStr | None = Field(default=None, description="If set, requests need 'Authorization: Bearer KEY'.")
    keepalive_s: float = Field(default=5.0, gt=0, le=300, description="Seconds between SSE keep-alive comments.")
    log_level: str = Field(default="INFO", description="Python logging level for peerinfer.")
    exit_on_load_failure: bool = Field(
        default=True, description="Exit the process (code 3) when the model cannot be loaded."
    )


class ClientSettings(BaseSettings):
    """Defaults for ``client.py``; command-line flags override them."""

    model_config = SettingsConfigDict(env_prefix="PEERINFER_", extra="ignore")

    url: str = Field(default="http://127.0.0.1:8000", description="Worker base URL.")
    api_key: SecretStr | None = Field(default=None, description="Sent as 'Authorization: Bearer KEY'.")
