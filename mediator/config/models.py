"""Declared schema of `channels.yaml` and the policy files.

Every model forbids unknown keys and is frozen. Field docs state what absent and empty mean; the
README's configuration reference is written from these docstrings.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

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


class RedisConfig(Strict):
    """The Redis shared by every mediator instance (rate limits, idempotency, replay protection, caches).

    Absent (`server.redis` not given): every store is in process memory: the embedded default, right
    for one instance; with several instances each keeps its own counts.
    """

    url: str
    """redis:// or rediss:// URL with host, port and database, e.g. redis://127.0.0.1:6379/0.
    A password never goes here (it would sit in a file): use password_env."""
    password_env: str | None = None
    """Name of the environment variable holding the Redis password. Absent: no AUTH."""
    key_prefix: str = Field("mediator:", min_length=1, max_length=64)
    """Prefix of every key the mediator writes, so one Redis can serve several deployments."""
    connect_timeout_s: PositiveSeconds = 0.5
    timeout_s: PositiveSeconds = 0.5
    """Per command (and waiting for a pooled connection); beyond it the command counts as a store error
    (each feature declares what then)."""
    max_connections: int = Field(64, ge=1, le=10_000)
    """Connections per mediator process; requests beyond wait for one (up to timeout_s)."""

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("redis", "rediss") or not parts.hostname:
            raise ValueError("url must be redis://host[:port][/db] or rediss://...")
        if parts.password is not None:
            raise ValueError("url must not contain a password; name an environment variable in password_env")
        return value


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
    redis: RedisConfig | None = None
    """Absent: in-memory stores (one instance). See RedisConfig."""

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


_PROBE_PATH = re.compile(r"[A-Za-z]+(/[A-Za-z0-9._-]+)?")
_PROBE_QUERY = re.compile(r"[A-Za-z0-9_.:,|=&-]*")


class LatencyProbeConfig(Strict):
    """A cheap read the mediator sends to openIMIS every `interval_s`, outside the bulkhead, as its own
    user (README "Load protection"): its answer time over its learned baseline is how slow openIMIS is
    for everyone now, whatever the API requests themselves take; beyond `tolerance` it lowers the limit."""

    path: str = "Patient"
    """FHIR path under the upstream's base_url (a resource type, optionally /id): a read without side
    effects, of the kind openIMIS's web users do (an insuree search)."""
    query: str = "_count=1"
    """Its query string (one row: cheap, but through openIMIS's workers, its database and our login)."""
    interval_s: float = Field(0.5, ge=0.05, le=60)
    """One probe this often (one at a time: a probe still out when the next is due delays it)."""
    timeout_s: PositiveSeconds = 5
    """A probe unanswered this long counts as answered in timeout_s (the strongest sign of a queue)."""
    tolerance: float = Field(1.5, ge=1, le=10)
    """A window whose probes took (their `percentile`) up to this × the baseline leaves the limit as it is."""
    percentile: float = Field(0.5, gt=0, le=1)
    """Which of a window's probe times stands for the window, and which of the idle answers is the
    baseline (like for like)."""
    baseline_window_s: PositiveSeconds = 120
    """The baseline is the `percentile` of the probe's idle answers (answered while no API request of
    this instance was with openIMIS) of the last baseline_window_s, and of the 20 most recent whatever
    their age (a flood that keeps a request in flight leaves no new ones), each counted once 30 s old (a
    quarter of this at most: a sudden slowdown is judged against the answers from before it); until 10
    such answers, the fastest answer of the last baseline_window_s. What openIMIS gives its web users when the mediator
    sends nothing: the API traffic is judged by how much slower than that they are now."""

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not _PROBE_PATH.fullmatch(value):
            raise ValueError("a resource type, optionally /<id> (letters, digits, . _ -)")
        return value

    @field_validator("query")
    @classmethod
    def _query(cls, value: str) -> str:
        if not _PROBE_QUERY.fullmatch(value):
            raise ValueError("name=value pairs joined by & (letters, digits, _ . : , | -)")
        return value


class AdaptiveLimitConfig(Strict):
    """The gradient controller of `mode: adaptive` (README "Load protection"): every `window_s` the
    `percentile` of openIMIS's answer times is compared with its unloaded time (minimum RTT, measured in
    probe windows at `min_concurrent`): within `tolerance` × minimum RTT the limit grows by one (if it
    was used), beyond it the limit shrinks in proportion (never below half per window)."""

    window_s: PositiveSeconds = 1.0
    """Length of one sampling window."""
    percentile: float = Field(0.5, gt=0, le=1)
    """Which answer time of a window stands for the window (0.5: its median; higher percentiles react
    to the noise of a shared host as if it were a queue)."""
    tolerance: float = Field(1.25, ge=1, le=10)
    """Answer times up to this × minimum RTT count as unloaded (no queue at openIMIS)."""
    min_samples: int = Field(5, ge=1, le=10_000)
    """A window with fewer answers is extended until it has them."""
    probe_interval_s: PositiveSeconds = 60
    """The minimum RTT is measured again this often (and after 5 windows in a row at the floor)."""
    probe_samples: int = Field(10, ge=1, le=10_000)
    """Answers, at `min_concurrent` in flight, that make one minimum-RTT measurement."""
    latency_probe: LatencyProbeConfig | None = None
    """Absent: the limit follows the API requests' own answer times only. Set: also a probe's (above)."""


class ClusterBudgetConfig(Strict):
    """`scope: cluster`: the in-flight budget is held in `server.redis` as leases, one per request."""

    lease_ttl_s: PositiveSeconds = 10
    """A lease not renewed for this long is dropped (its instance died). Live instances renew theirs every
    third of it."""
    poll_interval_s: PositiveSeconds = 0.02
    """How often a waiting request looks again for a slot freed by another instance."""
    on_store_error: Literal["local", "deny"] = "local"
    """Redis unreachable: local (default: this instance keeps its own limit, so N instances may send up to
    N × the budget) or deny (503 upstream.budget_unavailable: nothing goes to openIMIS)."""


class BulkheadConfig(Strict):
    """Requests in flight to this upstream are limited; up to `max_queue` more wait, highest channel
    priority first; beyond that (or after waiting `max_wait_s`): 503 upstream.overloaded."""

    mode: Literal["static", "adaptive"] = "static"
    """static (default): the limit is `max_concurrent`. adaptive: a gradient controller moves the limit
    between `min_concurrent` and `max_concurrent` to keep openIMIS's answer time near its unloaded time."""
    max_concurrent: int = Field(16, ge=1, le=1024)
    """static: the limit. adaptive: its ceiling."""
    min_concurrent: float = Field(1, ge=0.05, le=1024)
    """adaptive: the floor (and the concurrency of minimum-RTT probes). Below 1 the limit is a duty
    cycle: one request at a time, and after an answer that took t the next waits t × (1/limit − 1), so
    openIMIS works on API requests that fraction of the time (0.5: busy half the time)."""
    initial_concurrent: float | None = Field(None, ge=0.05, le=1024)
    """adaptive: the limit at start. Absent: min_concurrent."""
    adaptive: AdaptiveLimitConfig = AdaptiveLimitConfig()
    scope: Literal["instance", "cluster"] = "instance"
    """instance (default): each mediator process has its own budget. cluster: one budget shared by every
    instance through server.redis (required)."""
    cluster: ClusterBudgetConfig = ClusterBudgetConfig()
    max_queue: int = Field(64, ge=0, le=100_000)
    """0: no waiting; a request that finds every slot busy is refused at once."""
    max_wait_s: PositiveSeconds = 10
    retry_after_s: int = Field(2, ge=1, le=3600)
    """Retry-After sent with the 503."""

    @model_validator(mode="after")
    def _bounds(self) -> BulkheadConfig:
        if self.min_concurrent > self.max_concurrent:
            raise ValueError("min_concurrent must not exceed max_concurrent")
        initial = self.initial_concurrent
        if initial is not None and not self.min_concurrent <= initial <= self.max_concurrent:
            raise ValueError("initial_concurrent must lie between min_concurrent and max_concurrent")
        if self.mode == "static" and self.adaptive.latency_probe is not None:
            raise ValueError("adaptive.latency_probe needs mode: adaptive (a static limit follows no signal)")
        return self


class CircuitBreakerConfig(Strict):
    """closed → open after `failure_threshold` consecutive failures; open → half-open after `open_s`;
    half-open lets `half_open_max_calls` trial requests through: a success closes, a failure re-opens."""

    failure_threshold: int = Field(5, ge=1, le=1000)
    open_s: PositiveSeconds = 30
    half_open_max_calls: int = Field(1, ge=1, le=100)
    failure_statuses: tuple[int, ...] = (502, 503, 504)
    """openIMIS answers that count as failures besides timeouts and connection errors. Not 500: openIMIS
    answers 500 to many client mistakes, and one vendor's bad claims must not cut everyone off."""


class UpstreamConfig(Strict):
    base_url: str
    """openIMIS FHIR base, e.g. http://openimis:8000/api/api_fhir_r4/ (trailing slash required)."""
    login: UpstreamLogin | None = None
    """Absent: requests are sent without Authorization (only for a stand-in upstream)."""
    connect_timeout_s: PositiveSeconds = 5
    pool_size: int = Field(32, ge=1, le=1024)
    token_refresh_margin_s: PositiveSeconds = 300
    """Log in again this long before the openIMIS token expires."""
    bulkhead: BulkheadConfig = BulkheadConfig()
    """Absent: the defaults above (static, 16 concurrent, 64 queued). The bulkhead is always on."""
    circuit_breaker: CircuitBreakerConfig | None = CircuitBreakerConfig()
    """Absent: the defaults above. null: no breaker (every request tries openIMIS)."""
    time_zone: str = "UTC"
    """IANA zone openIMIS writes its local date-times in (its Django TIME_ZONE). openIMIS sends
    dateTimes without an offset (`2020-01-01T18:50:00`, not valid FHIR); the mediator adds this zone's
    offset to every such value in its answers (mediator.fhir_answers)."""

    @field_validator("base_url")
    @classmethod
    def _base(cls, value: str) -> str:
        return _check_base_url(value, "base_url")

    @field_validator("time_zone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value


class IdempotencyConfig(Strict):
    """Replay the first answer to a repeated create (POST) instead of submitting twice.

    The key is the `Idempotency-Key` header or, without it, the resource's identifiers; it is scoped to
    the calling client (or the client IP when no authentication ran), the channel and the resource type.
    """

    window_s: int = Field(86400, ge=60, le=30 * 86400)
    """How long a first answer is kept and replayed."""
    in_flight: Literal["reject", "wait"] = "reject"
    """A duplicate arriving while the first is still with openIMIS: reject (409 idempotency.in_flight,
    default) or wait for the first answer (up to the channel timeout, then 409)."""
    require_key: bool = False
    """True: a create without Idempotency-Key and without identifier is refused (400 idempotency.key_missing).
    False: it is forwarded without protection."""
    on_store_error: Literal["deny", "forward"] = "deny"
    """Redis unreachable: deny (503 idempotency.store_unavailable, default) or forward unprotected."""


class BatchConfig(Strict):
    """A FHIR batch Bundle POSTed to the base is split into one upstream create per entry."""

    max_entries: int = Field(50, ge=1, le=1000)
    """More entries: 413 batch.too_many_entries."""
    resource_types: tuple[ResourceType, ...] = ("Claim",)
    """Entry resource types that may be created (POST <type>). Others: per-entry 400."""
    parallel: int = Field(4, ge=1, le=64)
    """Entries of one batch in flight at once (all still inside the upstream bulkhead)."""


class AsyncSubmissionConfig(Strict):
    """Store-and-forward submission (mediator/async_claims): a POST Claim or batch Bundle that the whole
    pipeline admitted is stored in a Redis stream and answered 202 + Content-Location of a status URL;
    every instance drains the queue toward openIMIS inside the upstream bulkhead. Needs server.redis."""

    mode: Literal["on_request", "always"] = "on_request"
    """on_request (default): only requests sending `Prefer: respond-async` are queued; the others stay
    synchronous. always: every POST Claim / batch on this channel is queued."""
    drain_concurrency: int = Field(2, ge=1, le=256)
    """Entries this instance delivers at once (each still takes an upstream bulkhead slot)."""
    priority: Literal["interactive", "bulk"] | Annotated[int, Field(ge=0, le=100)] = "bulk"
    """Bulkhead queue order of deliveries: bulk (10, default) lets interactive requests go first."""
    retry_initial_s: PositiveSeconds = 1
    """First backoff after a transient failure; doubled per attempt, with full jitter."""
    retry_max_s: PositiveSeconds = 30
    """Backoff ceiling."""
    give_up_after_s: int = Field(86400, ge=10, le=30 * 86400)
    """An entry still undelivered this long after it was accepted: final outcome 503 async.delivery_failed."""
    result_retention_s: int = Field(7 * 86400, ge=60, le=90 * 86400)
    """How long a final outcome stays readable at the status URL (then 404)."""
    reclaim_idle_s: PositiveSeconds = 60
    """An entry a consumer holds without a heartbeat this long (its instance died) is taken over by another."""
    poll_interval_s: PositiveSeconds = 0.5
    """Idle drain: how often an instance looks for new entries (it also wakes up on its own accepts)."""
    status_retry_after_s: int = Field(2, ge=1, le=3600)
    """Retry-After on the status URL while the submission is queued or in progress."""


PRIORITY_NAMES = {"interactive": 50, "bulk": 10}


class FhirAnswersConfig(Strict):
    """How a channel's answers follow FHIR's REST rules (README "HMS developers"). Absent: these defaults."""

    searchset: Literal["bundle", "as_upstream"] = "bundle"
    """bundle (default): every search is answered with a searchset Bundle; openIMIS's bare resource
    (its answer to `?identifier=` / `?code=`) is wrapped, and its not-found answers become an empty
    Bundle. as_upstream: openIMIS's shape is passed on (bare resource, its 404/500 when none)."""
    create_return: Literal["representation", "minimal", "OperationOutcome", "upstream"] = "representation"
    """Body of a 201 create when the client sends no `Prefer: return=`: representation (default: the
    created resource, read back), minimal (no body), OperationOutcome, or upstream (openIMIS's own
    answer, the ClaimResponse of a created Claim). `Prefer: return=` always wins."""
    handling: Literal["lenient", "strict"] = "lenient"
    """Search parameters the channel does not support, when the client sends no `Prefer: handling=`:
    lenient (default) ignores them (never forwarded; the self link lists only the parameters used),
    strict refuses the search (400 `search.unsupported_parameter`)."""
    max_count: int = Field(200, ge=1, le=1000)
    """A larger `_count` is reduced to this (the self link states the count used)."""


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
    priority: Literal["interactive", "bulk"] | Annotated[int, Field(ge=0, le=100)] = "interactive"
    """Order in the upstream bulkhead queue: higher first. interactive = 50 (default), bulk = 10."""
    idempotency: IdempotencyConfig | None = None
    """Absent: creates on this channel are forwarded as they come (a retried POST submits again)."""
    batch: BatchConfig | None = None
    """Absent: a POST to the FHIR base on this channel is refused (400 batch.not_enabled)."""
    fhir_answers: FhirAnswersConfig = FhirAnswersConfig()
    """Searchset wrapping, create answers and the search-parameter rule (FhirAnswersConfig)."""
    async_submission: AsyncSubmissionConfig | None = None
    """Absent: claims are submitted synchronously (Prefer: respond-async is ignored). README "Queued claims"."""

    @property
    def priority_value(self) -> int:
        return PRIORITY_NAMES[self.priority] if isinstance(self.priority, str) else self.priority
    serve_from: Literal["upstream", "replica"] = "upstream"
    """replica: reads and searches of replicated master data are answered from the replica
    (policies/replica.yaml), after every pipeline stage allowed them; everything else still goes upstream."""


class ChannelsFile(Strict):
    version: Literal[1]
    server: ServerConfig = ServerConfig()
    upstreams: dict[Name, UpstreamConfig] = Field(min_length=1)
    channels: tuple[ChannelConfig, ...]
    """Tried in order; the first whose path and method match wins. No match: 404, never forwarded.
    Names are unique and each upstream must exist (checked by the loader, at the channel's line)."""

    @model_validator(mode="after")
    def _cluster_needs_redis(self) -> ChannelsFile:
        for name, upstream in self.upstreams.items():
            if upstream.bulkhead.scope == "cluster" and self.server.redis is None:
                raise ValueError(f"upstream {name!r}: bulkhead scope cluster needs server.redis")
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
