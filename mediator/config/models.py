"""Declared schema of `channels.yaml` and the policy files.

Every model forbids unknown keys and is frozen. Field docs state what absent and empty mean; the
README's configuration reference is written from these docstrings.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mediator.config.operations import AuditConfig, MetricsListenerConfig, ReloadConfig, ShutdownConfig
from mediator.config.types import Cidr, HttpMethod, Name, PositiveSeconds, Regex, ResourceType


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_base_url(value: str, what: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{what} must be an absolute http(s) URL")
    if not parts.path.endswith("/"):
        raise ValueError(f"{what} must end with '/'")
    if parts.query or parts.fragment:
        raise ValueError(f"{what} must not have a query or fragment")
    return value


class TlsConfig(Strict):
    """TLS termination. Absent: plain HTTP (only for a loopback listener behind a TLS proxy)."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None
    """CA bundle that client certificates must chain to. Absent: no client certificates requested."""
    require_client_cert: bool = False
    """True: the TLS handshake fails without a valid client certificate."""

    @model_validator(mode="after")
    def _ca_needed(self) -> TlsConfig:
        if self.require_client_cert and not self.client_ca_file:
            raise ValueError("require_client_cert needs client_ca_file")
        return self


class ListenConfig(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    tls: TlsConfig | None = None


class LimitsConfig(Strict):
    """Request limits, enforced before anything is buffered or forwarded."""

    max_body_bytes: int = Field(1_048_576, ge=1024, le=256 * 1_048_576)
    max_header_field_bytes: int = Field(8190, ge=256, le=65536)
    max_request_line_bytes: int = Field(8190, ge=256, le=65536)
    max_headers: int = Field(100, ge=8, le=1000)
    body_read_timeout_s: PositiveSeconds = 30
    """The whole request body must arrive within this, else 408 `request.body_timeout` (a slow-body client
    would otherwise hold a connection and a buffer for as long as it likes)."""
    idle_timeout_s: PositiveSeconds = 60
    """A connection that completes no request for this long is closed: bounds idle keep-alive connections
    and clients that send their headers slowly (slowloris)."""
    max_json_depth: int = Field(32, ge=4, le=256)
    """Request bodies nested deeper (objects/arrays) are refused: 400 `request.json_too_deep`. FHIR
    resources openIMIS accepts nest fewer than 12 levels."""
    max_bundle_entries: int = Field(1000, ge=1, le=100_000)
    """A request Bundle with more entries is refused: 413 `request.too_many_entries`."""


DEFAULT_PROTECTED_RESOURCES = ("CoverageEligibilityRequest", "Coverage", "Contract")


class ServerConfig(Strict):
    listen: ListenConfig = ListenConfig()
    public_base_url: str = "http://127.0.0.1:8080/fhir/"
    """The FHIR base URL clients use; its path is the prefix every channel path starts with."""
    limits: LimitsConfig = LimitsConfig()
    protected_resources: tuple[ResourceType, ...] = DEFAULT_PROTECTED_RESOURCES
    """PUT/PATCH/DELETE on these never reach openIMIS unless a channel sets allow_protected_writes.
    openIMIS deletes an insuree on DELETE CoverageEligibilityRequest."""
    # Operations (README "Operations"); schemas and absent/default semantics in config/operations.py.
    metrics: MetricsListenerConfig | None = None
    audit: AuditConfig | None = None
    reload: ReloadConfig = ReloadConfig()
    shutdown: ShutdownConfig = ShutdownConfig()

    @field_validator("public_base_url")
    @classmethod
    def _base(cls, value: str) -> str:
        return _check_base_url(value, "public_base_url")


class UpstreamLogin(Strict):
    """How the mediator logs in to openIMIS (`POST {base}login/`). Secrets come from the environment."""

    username: str | None = None
    username_env: str | None = None
    password_env: str
    """Name of the environment variable holding the password; never the password itself."""

    @model_validator(mode="after")
    def _one_username(self) -> UpstreamLogin:
        if (self.username is None) == (self.username_env is None):
            raise ValueError("give exactly one of username or username_env")
        return self


class UpstreamConfig(Strict):
    base_url: str
    """openIMIS FHIR base, e.g. http://openimis:8000/api/api_fhir_r4/ (trailing slash required)."""
    login: UpstreamLogin | None = None
    """Absent: requests are sent without Authorization (only for a stand-in upstream)."""
    connect_timeout_s: PositiveSeconds = 5
    pool_size: int = Field(32, ge=1, le=1024)
    token_refresh_margin_s: PositiveSeconds = 300
    """Log in again this long before the openIMIS token expires."""

    @field_validator("base_url")
    @classmethod
    def _base(cls, value: str) -> str:
        return _check_base_url(value, "base_url")


class ChannelConfig(Strict):
    """An OpenHIM-style channel: which requests it matches, where they go and which policies apply."""

    name: Name
    path: Regex
    """Regular expression matched (fullmatch) against the request path, e.g. ^/fhir/Claim(/[^/]+)?/?$"""
    methods: tuple[HttpMethod, ...] = Field(min_length=1)
    upstream: Name
    timeout_s: PositiveSeconds = 30
    ip_allowlist: tuple[Name, ...] | None = None
    """Names of ip_sets in policies/ip_allowlist.yaml; the caller must be allowed by one of them.
    Absent: policies/ip_allowlist.yaml `unlisted_channels` decides (default deny). Empty: deny all."""
    allow_protected_writes: bool = False
    """Let PUT/PATCH/DELETE on server.protected_resources through this channel."""
    authentication: Literal["required", "none"] = "required"
    """required (default): a registered client must prove itself (policies/clients.yaml).
    none: anyone the ip_allowlist admits, for explicitly open channels such as metadata."""


class ChannelsFile(Strict):
    version: Literal[1]
    server: ServerConfig = ServerConfig()
    upstreams: dict[Name, UpstreamConfig] = Field(min_length=1)
    channels: tuple[ChannelConfig, ...]
    """Tried in order; the first whose path and method match wins. No match: 404, never forwarded."""

    @model_validator(mode="after")
    def _references(self) -> ChannelsFile:
        seen: set[str] = set()
        for channel in self.channels:
            if channel.name in seen:
                raise ValueError(f"duplicate channel name {channel.name!r}")
            seen.add(channel.name)
            if channel.upstream not in self.upstreams:
                raise ValueError(f"channel {channel.name!r}: unknown upstream {channel.upstream!r}")
        return self


class IpSet(Strict):
    """A named set of networks. A caller is in the set if some allow entry matches and no deny does."""

    description: str = ""
    allow: tuple[Cidr, ...] = ()
    """Empty: nobody is in this set."""
    deny: tuple[Cidr, ...] = ()
    """Deny wins over allow."""


class IpAllowlistPolicy(Strict):
    version: Literal[1]
    trusted_proxies: tuple[Cidr, ...] = ()
    """Peers whose X-Forwarded-For is read. Empty: X-Forwarded-For is never read."""
    max_forwarded_hops: int = Field(10, ge=1, le=64)
    """More X-Forwarded-For entries than this: 400."""
    unlisted_channels: Literal["deny", "unrestricted"] = "deny"
    """What a channel without an ip_allowlist key gets. deny (default) or unrestricted."""
    ip_sets: dict[Name, IpSet] = {}
