"""The worker's one settings object, read from ``PEERINFER_*`` environment variables."""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path
from typing import Annotated, Literal

from jinja2 import TemplateError, TemplateSyntaxError
from pydantic import Field, PrivateAttr, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from peerinfer.engine.chat_template import compile_template
from peerinfer.errors import ConfigError
from peerinfer.network.ice_config import IceServer, parse_ice_servers

LogLevel = Literal["CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"]
NameList = Annotated[tuple[str, ...], NoDecode]
IceServerList = Annotated[tuple[IceServer, ...], NoDecode]
MAX_CHAT_TEMPLATE_BYTES = 1_048_576


def _default_threads() -> int:
    return max(1, os.cpu_count() or 1)


class NetworkSettings(BaseSettings):
    """How a process joins the peer-to-peer network; shared by workers and clients."""

    model_config = SettingsConfigDict(env_prefix="PEERINFER_", extra="ignore")

    bootstrap: str = Field(
        default="",
        max_length=4096,
        description="DHT nodes to join through: host:port[,host:port...]. Empty: start a network of one.",
    )
    dht_host: str | None = Field(
        default=None,
        description="Address the DHT node binds (UDP). Unset: 127.0.0.1 when every bootstrap node is loopback, "
        "else 0.0.0.0.",
    )
    network_id: int = Field(
        default=0x50494E46,
        ge=1,
        le=2**32 - 1,
        description="Private DHT network id; nodes of other networks (such as the public Jami DHT) are ignored. "
        "On the LAN it is the 'net' of the mDNS TXT record: services of other networks are ignored.",
    )
    lan: bool = Field(
        default=False,
        description="Zero-config discovery on this LAN (mDNS/DNS-SD, _peerinfer._tcp): a worker announces its "
        "signed record there (also with no bootstrap); a client's default for --lan. Off: nothing is sent on the LAN.",
    )
    lan_interfaces: NameList = Field(
        default=(),
        max_length=64,
        description="IPv4 addresses (comma-separated) of the interfaces mDNS uses. Empty: every IPv4 interface.",
    )

    ice: bool = Field(
        default=True,
        description="Reach and be reached through ICE (peerinfer/network/ice.py): a worker with a DHT announces an "
        "ice:// endpoint that clients open with hole punching, or through a TURN relay when nothing else works.",
    )
    ice_servers: IceServerList = Field(
        default=(),
        description="STUN and TURN servers ICE may use, a JSON list in WebRTC's iceServers shape, e.g. "
        '[{"urls": "turn:203.0.113.10:3478", "username": "u", "credential": "p"}]. Empty: none is contacted.',
    )
    ice_direct_timeout_s: float = Field(
        default=3.0,
        gt=0,
        le=60,
        description="Seconds of connectivity checks (once the worker answered) an ICE path without a relay, direct or "
        "hole-punched, may take before the relay is tried.",
    )
    ice_timeout_s: float = Field(
        default=10.0, gt=0, le=120, description="Seconds to set up one ICE path, relay included."
    )

    @field_validator("ice_servers", mode="before")
    @classmethod
    def _parse_ice_servers(cls, value: object) -> object:
        if isinstance(value, str):
            return parse_ice_servers(value)
        return value

    @field_validator("lan_interfaces", mode="before")
    @classmethod
    def _split_interfaces(cls, value: object) -> object:
        if isinstance(value, str):
            value = tuple(part.strip() for part in value.split(",") if part.strip())
        if isinstance(value, list | tuple):
            for address in value:
                try:
                    ipaddress.IPv4Address(address)
                except ValueError as exc:
                    raise ValueError(f"{str(address)[:60]!r} is not an IPv4 address such as 192.168.1.20") from exc
        return value


def read_chat_template(path: Path) -> str:
    """A chat template file's text, checked to compile; ``ValueError`` saying why not (one line)."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_CHAT_TEMPLATE_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"cannot read the chat template file: {exc.strerror or exc}") from exc
    if len(data) > MAX_CHAT_TEMPLATE_BYTES:
        raise ValueError(f"the chat template file is larger than {MAX_CHAT_TEMPLATE_BYTES} bytes; is it a template?")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"the chat template file is not UTF-8 text (byte {exc.start})") from exc
    if not text.strip():
        raise ValueError("the chat template file is empty")
    try:
        compile_template(text)
    except TemplateError as exc:
        line = f" (line {exc.lineno})" if isinstance(exc, TemplateSyntaxError) else ""
        raise ValueError(f"the chat template does not compile{line}: {exc.message or exc}") from exc
    return text


def _name_list(value: object) -> object:
    """A comma-separated string (as in the environment) or a JSON list."""
    if not isinstance(value, str):
        return value
    if value.lstrip().startswith("["):
        return json.loads(value)
    return tuple(part.strip() for part in value.split(",") if part.strip())


class ServerSettings(NetworkSettings):
    """What an HTTP server of ours (a worker, the gateway) reads alike: its log level and name lists."""

    @field_validator("log_level", mode="before", check_fields=False)
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("allowed_hosts", "cors_origins", mode="before", check_fields=False)
    @classmethod
    def _split_names(cls, value: object) -> object:
        return _name_list(value)


class WorkerSettings(ServerSettings):
    """Everything a worker can be told. Every field has a working default."""

    model_config = SettingsConfigDict(env_prefix="PEERINFER_", extra="ignore")
    _chat_template_text: str | None = PrivateAttr(default=None)

    model: Path | None = Field(
        default=None,
        description="Path to a .gguf file. Unset: ./model.gguf if it exists, else the bundled Gemma 3 270M.",
    )
    chat_template: Path | None = Field(
        default=None,
        description="A Jinja chat template file that replaces the model's own (as llama-server's "
        "--chat-template-file): for a GGUF without a template, or with a broken one. Read and compiled once, at start.",
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
    prompt_share: float = Field(
        default=0.45,
        ge=0.05,
        le=1.0,
        description=(
            "While other streams generate, the most of the decoding time that reading a long prompt may take "
            "(after its first chunk): their time per token grows by at most 1 / (1 - share), x1.8 at 0.45 (a step "
            "that follows a chunk is slower than one alone, so 0.5 measured x2.15). "
            "1.0 reads a chunk every step, whatever it costs them."
        ),
    )
    prefix_cache: bool = Field(
        default=True,
        description=(
            "Keep what a finished request leaves in its slot (its prompt, and with batch invariance its answer) "
            "and send a later prompt that starts the same way to that slot, or copy it from there: only the rest "
            "is read. The text is the same as with a fresh read."
        ),
    )
    output_head: bool = Field(
        default=True,
        description=(
            "Compute the model's output product (hidden state -> logits) with peerinfer's own kernel when the "
            "output weights are q8_0 and the CPU has AVX2: one pass over the weights for all rows of a step. "
            "Checked at load to give llama.cpp's logits bit for bit; llama.cpp's is used otherwise."
        ),
    )
    batch_invariant: bool = Field(
        default=True,
        description=(
            "Same text for a request whether it runs alone or batched, and however its prompt is cut into calls: "
            "turns off repacked weights and ggml's tiled K-quant matmul (GGML_CPU_TILED_MM=0, process-wide) "
            "and sends every attention row through one kernel (peerinfer's patch to ggml, GGML_CPU_FA_ROW_EXACT=1; "
            "without the patch the KV cache is kept in bf16 and long prompts read 1.3-1.5x slower)."
        ),
    )
    top_k: int = Field(
        default=40,
        ge=0,
        le=1000,
        description="Sample from the k most likely tokens when temperature > 0 (0 = all); a request's top_k wins.",
    )
    first_token_pause_ms: float = Field(
        default=2.0,
        ge=0,
        le=50,
        description=(
            "After a stream's first text is handed to the server, the decoding thread waits this long before the "
            "next step, so that the server (and a client on this machine) get a core to send and read it."
        ),
    )
    max_queue: int = Field(default=16, ge=0, le=10000, description="Requests that may wait for a slot.")
    max_tokens_cap: int = Field(default=4096, ge=1, le=131072, description="Largest max_tokens accepted.")
    max_body_bytes: int = Field(default=1_048_576, ge=1024, le=64 * 1_048_576, description="Largest request body.")
    api_key: SecretStr | None = Field(default=None, description="If set, requests need 'Authorization: Bearer KEY'.")
    keepalive_s: float = Field(default=5.0, gt=0, le=300, description="Seconds between SSE keep-alive comments.")
    log_level: LogLevel = Field(
        default="INFO", description="Python logging level for peerinfer: CRITICAL, ERROR, WARNING, INFO or DEBUG."
    )
    max_header_bytes: int = Field(
        default=65_536,
        ge=1024,
        le=16 * 1_048_576,
        description="Largest request head (request line and headers); a larger one gets 431 and the connection closes.",
    )
    head_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=600,
        description="Seconds a client may take to send a request head, from its first byte (or from connecting); "
        "then 408 (or, if nothing came, a plain close).",
    )
    body_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="Seconds a client may take to send a request body after its head; then 408 and a close.",
    )
    max_connections: int = Field(
        default=256,
        ge=1,
        le=65_535,
        description="Open HTTP connections a worker accepts; one more gets 503 and is closed at once.",
    )
    allowed_hosts: NameList = Field(
        default=(),
        description="Host names (comma-separated) this worker answers besides loopback, the announce URL's host "
        "and the address it was reached on; '.example.com' also allows its subdomains, '*' allows any. Other "
        "Host headers get 400 (DNS rebinding).",
    )
    cors_origins: NameList = Field(
        default=(),
        description="Browser origins (comma-separated, e.g. https://app.example) that may call this worker "
        "cross-origin; '*' allows any. Empty: no CORS headers at all.",
    )
    exit_on_load_failure: bool = Field(
        default=True, description="Exit the process (code 3) when the model cannot be loaded."
    )
    home: Path = Field(
        default_factory=lambda: Path.home() / ".peerinfer",
        description="The peerinfer home folder; holds the peer's Ed25519 key (peer_key.pem, mode 0600).",
    )
    dht: bool | None = Field(
        default=None,
        description="Run a DHT node and announce this worker. Unset: on when PEERINFER_BOOTSTRAP or "
        "PEERINFER_DHT_PORT is set.",
    )
    dht_port: int | None = Field(
        default=None, ge=0, le=65535, description="UDP port of the DHT node; 0: any free port."
    )
    announce_url: str | None = Field(
        default=None,
        max_length=256,
        pattern=r"^https?://",
        description="The URL clients use to reach this worker. Unset: guessed from uvicorn's --host/--port.",
    )
    record_lifetime_s: float = Field(
        default=60.0, ge=2.0, le=600.0, description="Lifetime of an announced record; a dead worker vanishes after it."
    )
    record_refresh_s: float | None = Field(
        default=None, gt=0.0, le=600.0, description="Seconds between announcements. Unset: a third of the lifetime."
    )
    ice_max_sessions: int = Field(
        default=32, ge=0, le=1024, description="ICE paths this worker holds open at once; further offers are refused."
    )
    ice_target: str | None = Field(
        default=None,
        max_length=300,
        description="host:port where ICE paths reach this worker's own HTTP server. Unset: uvicorn's --host/--port "
        "(127.0.0.1 for a wildcard host).",
    )
    reachability_check: bool = Field(
        default=True,
        description="Ask the bootstrap nodes to dial this worker back; the record lists its http:// URL only when one "
        "of them could reach it (otherwise only its ice:// endpoint). Off: the URL is listed as it is.",
    )
    withdraw_grace_s: float = Field(
        default=0.3, ge=0.0, le=10.0, description="Time given to the withdrawal to leave before the DHT node stops."
    )

    @model_validator(mode="after")
    def _read_chat_template(self) -> WorkerSettings:
        if self.chat_template is not None:
            try:
                self._chat_template_text = read_chat_template(self.chat_template)
            except ValueError as exc:
                raise ValueError(f"PEERINFER_CHAT_TEMPLATE={str(self.chat_template)!r}: {exc}") from exc
        return self

    @property
    def chat_template_text(self) -> str | None:
        """The text of ``PEERINFER_CHAT_TEMPLATE``, read and compiled when the settings were made; None if unset."""
        return self._chat_template_text

    @property
    def dht_enabled(self) -> bool:
        if self.dht is not None:
            return self.dht
        return bool(self.bootstrap.strip()) or self.dht_port is not None


def load_worker_settings() -> WorkerSettings:
    """Settings from the environment; a bad value becomes one ``ConfigError`` that names the variable."""
    try:
        return WorkerSettings()
    except ValidationError as exc:
        raise settings_error(exc) from exc


def settings_error(exc: ValidationError) -> ConfigError:
    """One ``ConfigError`` naming each ``PEERINFER_*`` variable that failed its check, and its value."""
    problems = []
    for error in exc.errors(include_url=False):
        if not error["loc"]:  # a check of several fields, or of a file: its message names the variable
            problems.append(str(error["msg"]).removeprefix("Value error, "))
            continue
        name = "PEERINFER_" + "_".join(str(part) for part in error["loc"][:1]).upper()
        value = repr(error.get("input"))
        if len(value) > 60:
            value = value[:57] + "..."
        problems.append(f"{name}={value}: {error['msg']}")
    return ConfigError("invalid setting " + "; ".join(problems))


class ClientSettings(NetworkSettings):
    """Defaults for ``client.py``; command-line flags override them."""

    model_config = SettingsConfigDict(env_prefix="PEERINFER_", extra="ignore")

    url: str = Field(default="http://127.0.0.1:8000", description="Worker base URL.")
    api_key: SecretStr | None = Field(default=None, description="Sent as 'Authorization: Bearer KEY'.")


class GatewaySettings(ServerSettings):
    """The gateway (``python -m peerinfer gateway``): one OpenAI-compatible door into the network.

    ``bootstrap`` and ``lan`` (from ``NetworkSettings``) say where it finds peers; it serves nothing itself.
    """

    model_config = SettingsConfigDict(env_prefix="PEERINFER_", extra="ignore")

    host: str = Field(default="127.0.0.1", max_length=256, description="Address the gateway's HTTP server binds.")
    port: int = Field(default=8080, ge=0, le=65535, description="TCP port of the gateway; 0: any free port.")
    api_key: SecretStr | None = Field(
        default=None, description="If set, the gateway's own clients need 'Authorization: Bearer KEY'."
    )
    worker_api_key: SecretStr | None = Field(
        default=None, description="Sent to workers as 'Authorization: Bearer KEY' (for workers that require one)."
    )
    model: str | None = Field(
        default=None,
        max_length=256,
        description="Route only to peers serving a model of this name. Unset: the model most peers serve.",
    )
    sha256: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="Route only to peers serving the model file with this sha256 (64 lower-case hex digits).",
    )
    max_in_flight: int = Field(
        default=256, ge=1, le=100_000, description="Requests the gateway serves at once; more wait in its queue."
    )
    max_queue: int = Field(
        default=256, ge=0, le=100_000, description="Requests that may wait for room; one more gets 503."
    )
    queue_timeout_s: float = Field(
        default=30.0, gt=0, le=600, description="Seconds a request may wait in the queue; then 503 with Retry-After."
    )
    choose_timeout_s: float = Field(
        default=5.0, gt=0, le=120, description="Seconds to find a peer that answers its probe and proves its key."
    )
    max_attempts: int = Field(default=3, ge=1, le=20, description="Peers one request may try (failover and resume).")
    probe_count: int = Field(default=3, ge=1, le=64, description="Peers probed at once when choosing one.")
    probe_timeout_s: float = Field(default=2.0, gt=0, le=60, description="Seconds for one probe of a peer.")
    lookup_ttl_s: float = Field(
        default=5.0, ge=0, le=600, description="Seconds a lookup of the peers is reused before the next one."
    )
    discovery_timeout_s: float = Field(
        default=5.0, gt=0, le=120, description="Seconds one lookup keeps trying while it finds nobody."
    )
    connect_timeout_s: float = Field(default=3.0, gt=0, le=120, description="Seconds to connect to a worker.")
    read_timeout_s: float = Field(
        default=60.0, gt=0, le=3600, description="Seconds a worker may send no text mid-answer before it is left."
    )
    answer_timeout_s: float = Field(
        default=600.0, gt=0, le=7200, description="Seconds a worker may take for a whole non-streamed answer."
    )
    max_body_bytes: int = Field(default=1_048_576, ge=1024, le=64 * 1_048_576, description="Largest request body.")
    max_answer_bytes: int = Field(
        default=8 * 1_048_576,
        ge=65_536,
        le=256 * 1_048_576,
        description="Largest non-streamed answer read from a worker; a larger one is that worker's failure.",
    )
    keepalive_s: float = Field(
        default=3.0, gt=0, le=300, description="Seconds between SSE keep-alive comments while a new peer is chosen."
    )
    log_level: LogLevel = Field(
        default="INFO", description="Python logging level for peerinfer: CRITICAL, ERROR, WARNING, INFO or DEBUG."
    )
    max_header_bytes: int = Field(
        default=65_536, ge=1024, le=16 * 1_048_576, description="Largest request head; larger: 431 and close."
    )
    head_timeout_s: float = Field(default=10.0, gt=0, le=600, description="Seconds to send a request head.")
    body_timeout_s: float = Field(default=30.0, gt=0, le=3600, description="Seconds to send a request body.")
    max_connections: int = Field(
        default=1024, ge=1, le=65_535, description="Open HTTP connections accepted; one more gets 503 and a close."
    )
    allowed_hosts: NameList = Field(
        default=(),
        description="Host names (comma-separated) the gateway answers besides loopback and the address it was "
        "reached on; '.example.com' also allows its subdomains, '*' any. Others get 400 (DNS rebinding).",
    )
    cors_origins: NameList = Field(
        default=(),
        description="Browser origins (comma-separated) that may call the gateway cross-origin; '*' any. Empty: none.",
    )


def load_gateway_settings(**overrides: object) -> GatewaySettings:
    """Settings from the environment, ``overrides`` (command-line flags) winning; ``ConfigError`` naming a bad one."""
    try:
        return GatewaySettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise settings_error(exc) from exc
