"""Schema of `policies/clients.yaml`: the registry of HMS applications and the mediator's token service.

Absent file: no client is registered and no token is issued, so every channel whose `authentication`
is `required` (the default) answers 401. Every field documents absent/empty/default; the default denies.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, field_validator, model_validator

from mediator.config.models import Strict
from mediator.config.types import Cidr, Name

# Asymmetric algorithms only (the `Algorithm` literal below). "none" and HS* are refused at load: an
# HMAC "key" would be the public key text, which is the HS/RS confusion attack (RFC 8725 §2.1, §3.1).
DEFAULT_ALGORITHMS = ("ES256", "ES384", "RS256", "RS384")
"""SMART Backend Services asks servers to support RS384 and ES384; the 256 variants are common."""

SCOPE_PATTERN = r"^system/(\*|[A-Z][A-Za-z]{1,63})\.(\*|read|write|[cruds]{1,5})$"
FACILITY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$"
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")


def _fingerprint(value: str) -> str:
    normalized = value.replace(":", "").strip().lower()
    if not SHA256_PATTERN.match(normalized):
        raise ValueError("sha256 must be 64 hex digits (colons allowed)")
    return normalized


def _https_or_loopback(value: str) -> str:
    parts = urlsplit(value)
    loopback = parts.hostname in ("localhost", "127.0.0.1", "::1")
    if not parts.netloc or not (parts.scheme == "https" or (parts.scheme == "http" and loopback)):
        raise ValueError("must be an https URL (http only for localhost)")
    return value


Algorithm = Literal["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]
Scope = Annotated[str, Field(pattern=SCOPE_PATTERN)]
FacilityCode = Annotated[str, Field(pattern=FACILITY_PATTERN)]
Fingerprint = Annotated[str, AfterValidator(_fingerprint)]
KeyUrl = Annotated[str, AfterValidator(_https_or_loopback)]
Seconds = Annotated[int, Field(ge=1, le=86400)]
Leeway = Annotated[int, Field(ge=0, le=300)]


class KeySource(Strict):
    """Where a signer's public keys come from: exactly one of the three."""

    public_key_file: str | None = None
    """PEM public key or X.509 certificate (its public key is used), relative to the config directory."""
    jwks_url: KeyUrl | None = None
    """A JWKS document, cached and refreshed in the background; last good keys kept when it is down."""
    jwks_file: str | None = None
    """A JWKS document on disk."""

    @model_validator(mode="after")
    def _exactly_one(self) -> KeySource:
        given = [v for v in (self.public_key_file, self.jwks_url, self.jwks_file) if v is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of public_key_file, jwks_url, jwks_file")
        return self


class CertificateMatch(Strict):
    """A client certificate (already verified against server.listen.tls.client_ca_file) that means
    this client. Every field given must match. Production should pin `sha256`; `subject_cn` alone
    trusts anything the CA issues with that name."""

    subject_cn: str | None = Field(None, min_length=1, max_length=64)
    sha256: Fingerprint | None = None

    @model_validator(mode="after")
    def _something(self) -> CertificateMatch:
        if self.subject_cn is None and self.sha256 is None:
            raise ValueError("give subject_cn, sha256 or both")
        return self


class ClaimNames(Strict):
    """Which claims of the user token carry what (configurable: every IdP names them differently)."""

    user_id: str = "sub"
    roles: str = "roles"
    """A string or list of strings, added to the client's default_roles (absent: just those)."""
    health_facility: str = "health_facility"
    """An HF code or a list of them. Absent in a token: the client's health_facilities."""


class UserTokenPolicy(Strict):
    """How this client's SSO user tokens (header X-User-Token) are verified."""

    required: bool = True
    """True: a request without X-User-Token is 401. False: without it, the client's defaults apply."""
    issuer: str = Field(min_length=1)
    """The exact `iss` value."""
    keys: KeySource
    algorithms: tuple[Algorithm, ...] = DEFAULT_ALGORITHMS
    """Pinned; the token's `alg` must be one of these. Empty: no token verifies."""
    audience: str | None = None
    """Expected `aud`. Absent: server.public_base_url (the mediator)."""
    leeway_s: Leeway = 30
    max_lifetime_s: Seconds = 3600
    """`exp - iat` (and `exp - now`) may not exceed this."""
    replay_check: bool = False
    """True: `jti` is required and each token is accepted once (for per-request tokens)."""
    claims: ClaimNames = ClaimNames()
    client_aliases: tuple[Annotated[str, Field(min_length=1, max_length=256)], ...] = ()
    """Other names the IdP gives this client in a token's `azp`/`client_id` (besides its client_id). A
    token carrying `azp` or `client_id` must name this client (else 401
    authentication.user_token_wrong_client): a token issued to another application is not accepted."""
    require_client_binding: bool = False
    """True: a token without `azp` and without `client_id` is refused (401
    authentication.user_token_client_unbound). False: such a token is accepted (IdPs that omit them)."""


AuthMethod = Literal["mtls", "private_key_jwt"]


class ClientEntry(Strict):
    """One HMS application (vendor deployment) allowed to call the mediator."""

    description: str = ""
    enabled: bool = True
    """False: the client is refused everywhere (kept for audit)."""
    auth_methods: tuple[AuthMethod, ...] = Field(min_length=1)
    """mtls: a client certificate matching `certificates`; private_key_jwt: tokens from /auth/token
    obtained with an assertion signed by `keys`."""
    certificates: tuple[CertificateMatch, ...] = ()
    keys: KeySource | None = None
    """Public keys of this client's client assertions (private_key_jwt)."""
    algorithms: tuple[Algorithm, ...] = DEFAULT_ALGORITHMS
    """Pinned algorithms for this client's assertions. Empty: no assertion verifies."""
    ip_allowlist: tuple[Name, ...] = ()
    """ip set names from policies/ip_allowlist.yaml. With `cidrs` empty too: the client is refused
    from everywhere (403 authentication.client_ip_denied). Deny by default."""
    cidrs: tuple[Cidr, ...] = ()
    health_facilities: tuple[FacilityCode, ...] = ()
    """openIMIS HF codes this client may speak for. Empty: none (user tokens naming one are 403)."""
    default_roles: tuple[str, ...] = ()
    scopes: tuple[Scope, ...] = ()
    """SMART system scopes the client may be granted. Empty: /auth/token answers invalid_scope."""
    trust_user_header: bool = False
    """True (mTLS clients only): X-User-Name is taken as the user id. Otherwise it is ignored."""
    user_token: UserTokenPolicy | None = None
    """Absent: X-User-Token is refused (401) rather than silently ignored."""

    @model_validator(mode="after")
    def _method_needs(self) -> ClientEntry:
        if "mtls" in self.auth_methods and not self.certificates:
            raise ValueError("auth method mtls needs certificates")
        if "private_key_jwt" in self.auth_methods and self.keys is None:
            raise ValueError("auth method private_key_jwt needs keys")
        if self.trust_user_header and "mtls" not in self.auth_methods:
            raise ValueError("trust_user_header is only allowed for mtls clients")
        return self


class ReplayStore(Strict):
    """Where seen `jti` values are kept until they expire."""

    redis_url_env: str | None = None
    """Environment variable holding a redis:// URL (shared across instances). Absent: in memory
    (one instance only)."""
    key_prefix: str = "mediator:jti:"


class TokenService(Strict):
    """The mediator's SMART Backend Services token endpoint (POST /auth/token)."""

    signing_key_file: str = "certs/mediator-signing.key"
    """EC P-256 private key signing access tokens; generated (mode 0600) if missing. All instances
    must share it."""
    issuer: KeyUrl | None = None
    """`iss` of access tokens. Absent: the origin of server.public_base_url."""
    token_url: KeyUrl | None = None
    """The token endpoint URL clients put in their assertion's `aud`. Absent: {origin}/auth/token."""
    access_token_lifetime_s: Annotated[int, Field(ge=30, le=3600)] = 300
    assertion_max_lifetime_s: Annotated[int, Field(ge=10, le=600)] = 300
    """A client assertion whose exp is further away than this is refused (RFC 7523 "short")."""
    leeway_s: Leeway = 30
    replay_store: ReplayStore = ReplayStore()
    jwks_refresh_s: Annotated[int, Field(ge=10, le=86400)] = 300
    """Background refresh interval of every jwks_url."""
    jwks_min_refetch_s: Annotated[int, Field(ge=1, le=3600)] = 30
    """An unknown kid triggers at most one refetch per this interval per URL."""
    requests_per_minute_per_address: Annotated[int, Field(ge=1, le=60_000)] = 60
    """POST /auth/token calls admitted per caller address and minute (GCRA, in this process), checked
    before any signature work; beyond: 429 slow_down with Retry-After. A client needs one token per
    access_token_lifetime_s, so 60 is generous."""
    request_burst: Annotated[int, Field(ge=1, le=10_000)] = 20


class ClientsPolicy(Strict):
    version: Literal[1]
    token_service: TokenService = TokenService()
    clients: dict[Name, ClientEntry] = {}
    """Empty: nobody can authenticate."""

    @field_validator("clients")
    @classmethod
    def _unique_certificates(cls, clients: dict[str, ClientEntry]) -> dict[str, ClientEntry]:
        seen: dict[tuple[str | None, str | None], str] = {}
        for name, client in clients.items():
            for match in client.certificates:
                key = (match.subject_cn, match.sha256)
                if key in seen:
                    raise ValueError(f"clients {seen[key]!r} and {name!r} claim the same certificate")
                seen[key] = name
        return clients
