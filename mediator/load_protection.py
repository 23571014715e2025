"""What keeps openIMIS responsive and claims single, per runtime: the per-upstream guards (bulkhead +
circuit breaker) and the idempotency records. The route steps that use them are in mediator.chain.
"""

from __future__ import annotations

from collections.abc import Mapping

from mediator.bulkhead import UpstreamGuard
from mediator.config import Config
from mediator.idempotency import Idempotency
from mediator.metrics import Metrics
from mediator.redis_store import RedisStore


class LoadProtection:
    """One per runtime. Guards are per upstream and per instance; idempotency records are shared via Redis.

    On a reload the Runtime hands over `kept_guards` (those of upstreams it reuses: their bulkhead and
    breaker settings are part of the unchanged upstream configuration) and `kept_idempotency` (when the
    Redis configuration is unchanged), so slots in use, an open breaker and in-process idempotency
    records survive it.
    """

    def __init__(self, config: Config, redis: RedisStore, metrics: Metrics | None = None,
                 *,
                 kept_guards: Mapping[str, UpstreamGuard] | None = None,
                 kept_idempotency: Idempotency | None = None) -> None:
        kept = kept_guards or {}
        self.guards = {name: kept.get(name) or UpstreamGuard.build(name, u.bulkhead, u.circuit_breaker, metrics)
                       for name, u in config.channels.upstreams.items()}
        self.idempotency = kept_idempotency or Idempotency(redis, metrics)
        self._metrics = metrics
