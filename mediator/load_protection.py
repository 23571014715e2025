"""What keeps openIMIS responsive and claims single, per runtime: the per-upstream guards (bulkhead +
circuit breaker) and the idempotency records. The route steps that use them are in mediator.chain.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager

from aiohttp import web

from mediator.bulkhead import UpstreamGuard
from mediator.config import Config
from mediator.idempotency import Idempotency
from mediator.metrics import Metrics
from mediator.redis_store import RedisStore


class LoadProtection:
    """One per runtime. Guards are per upstream and per instance; idempotency records are shared via Redis.

    The Runtime builds the `guards` (`build_guards`; on a reload reusing those of unchanged upstreams:
    their bulkhead and breaker settings are part of the unchanged upstream configuration) and shares them
    with the stages' own lookups; it hands over `kept_idempotency` when the Redis configuration is
    unchanged, so slots in use, an open breaker and in-process idempotency records survive a reload.
    """

    def __init__(self, config: Config, redis: RedisStore, metrics: Metrics | None = None,
                 *,
                 guards: Mapping[str, UpstreamGuard] | None = None,
                 kept_idempotency: Idempotency | None = None) -> None:
        self.guards = dict(guards) if guards is not None else self.build_guards(config, redis, metrics)
        self.idempotency = kept_idempotency or Idempotency(redis, metrics)
        self._metrics = metrics

    @staticmethod
    def build_guards(config: Config, redis: RedisStore, metrics: Metrics | None = None,
                     kept_guards: Mapping[str, UpstreamGuard] | None = None) -> dict[str, UpstreamGuard]:
        """One guard per upstream; those in `kept_guards` (a reload's unchanged upstreams) are reused."""
        kept = kept_guards or {}
        return {name: kept.get(name) or UpstreamGuard.build(name, u.bulkhead, u.circuit_breaker, metrics, redis)
                for name, u in config.channels.upstreams.items()}

    async def call_upstream(self, upstream: str, priority: int, send: Callable[[], Awaitable[web.Response]],
                            kind: str = "") -> web.Response:
        """Send one request to `upstream` inside its concurrency limit, at `priority` (higher first; the
        channels' interactive = 50, bulk = 10): the API for senders outside the request path (a durable
        queue draining toward openIMIS). Raises UpstreamRefused when the request may not be sent (queue
        full, waited max_wait_s, breaker open, shared budget unreachable with on_store_error deny).
        `kind` names the sort of request (e.g. "claims:create": the same kinds as the request path's
        `<channel>:<interaction>` share their unloaded-time baseline)."""
        return await self.guards[upstream].call(priority, send, kind)

    def slot(self, upstream: str, priority: int, kind: str = "") -> AbstractAsyncContextManager[None]:
        """`async with protection.slot("openimis", 50, "claims:create"):` one place with `upstream`
        inside its limit, for senders that report the outcome to the breaker themselves (see
        `UpstreamGuard.slot`). Raises UpstreamRefused on entry when nothing may be sent."""
        return self.guards[upstream].slot(priority, kind)

    async def close_retired(self, next_protection: LoadProtection | None) -> None:
        """Stop the background work (cluster pump and lease renewal) of guards `next_protection` does
        not keep (None: all, at shutdown)."""
        kept = set(map(id, next_protection.guards.values())) if next_protection is not None else set()
        for guard in self.guards.values():
            if id(guard) not in kept:
                await guard.bulkhead.close()
