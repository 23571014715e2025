"""Schema of `policies/rate_limits.yaml` (optional file; absent: no rate limits, the stage is not built)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from mediator.config.models import Strict
from mediator.config.types import Name
from mediator.errors import ConfigProblem

if TYPE_CHECKING:
    from mediator.config import Config
    from mediator.config.yaml_source import SourcedDocument

KeyPart = Literal["ip", "client", "user", "health_facility", "channel"]


class RateLimit(Strict):
    """One limit: `rate` requests per `period_s`, at most `burst` at once, counted per key.

    The key is built from `per`: ip (resolved client IP), client (principal.client_id), user
    (principal.user_key: the user id namespaced by the issuer or client vouching for it), health_facility
    (principal.health_facilities, sorted), channel (channel name).
    Without a principal (a channel without authentication) client, user and health_facility fall back
    to the client IP; a principal without a user falls back to the client id, without facilities too.
    """

    name: Name
    """Shown in RateLimit-Policy and in metrics; unique."""
    per: tuple[KeyPart, ...] = Field(min_length=1)
    """Key dimensions, combined: [client, channel] counts each client separately on each channel."""
    rate: int = Field(ge=1, le=1_000_000)
    period_s: int = Field(ge=1, le=86400)
    burst: int | None = Field(None, ge=1, le=1_000_000)
    """Requests allowed at once after a quiet period. Absent: equal to rate."""
    channels: tuple[Name, ...] | None = Field(None, min_length=1)
    """Channels this limit applies to. Absent: every channel. Empty is refused (a limit on nothing)."""
    on_store_error: Literal["deny", "local"]
    """Required. Redis unreachable: deny (503 rate_limit.store_unavailable) or local (count in this
    instance's memory, so N instances admit up to N times the limit). Either way counted in
    mediator_store_errors_total{feature="rate_limit"} and logged."""

    @model_validator(mode="after")
    def _check(self) -> RateLimit:
        if len(set(self.per)) != len(self.per):
            raise ValueError("per: each key part may appear once")
        if self.period_s * 1_000_000 // self.rate < 1000:
            raise ValueError("rate/period_s finer than 1000 requests per second per key is not supported")
        return self

    @property
    def effective_burst(self) -> int:
        return self.burst if self.burst is not None else self.rate


class Reconcile(Strict):
    """Decide every request in this instance's memory and reconcile with Redis in the background (README
    "Rate limits": the declared bound on over-admission across instances)."""

    interval_ms: int = Field(50, ge=10, le=5000)
    """At most this long between two reconciliations of an instance that keeps admitting requests."""
    max_stale_s: float = Field(2.0, gt=0, le=60)
    """When reconciliations have been failing for longer than this (Redis unreachable), each limit's
    on_store_error applies: deny refuses with 503 rate_limit.store_unavailable, local keeps counting here."""


class RateLimitsPolicy(Strict):
    version: Literal[1]
    limits: tuple[RateLimit, ...] = ()
    reconcile: Reconcile | None = None
    """Absent: every decision is one Redis round trip (exact across instances). Present (and
    server.redis configured): decided locally, reconciled with Redis every interval_ms, off the request path."""
    """Every limit whose channels include the request's channel applies; all must admit the request.
    Empty: no limits."""

    @model_validator(mode="after")
    def _unique(self) -> RateLimitsPolicy:
        names = [limit.name for limit in self.limits]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate limit names: {', '.join(duplicates)}")
        return self


def check_limit_channels(config: Config, docs: dict[str, SourcedDocument]) -> list[ConfigProblem]:
    """Every channel a limit names must exist in channels.yaml."""
    policy = config.policies.get("rate_limits")
    if not isinstance(policy, RateLimitsPolicy):
        return []
    known = {c.name for c in config.channels.channels}
    problems = []
    for i, limit in enumerate(policy.limits):
        for j, name in enumerate(limit.channels or ()):
            if name not in known:
                problems.append(docs["rate_limits"].problem(
                    ("limits", i, "channels", j), f"unknown channel {name!r} (not in channels.yaml)"))
    return problems
