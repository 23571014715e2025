"""What keeps openIMIS responsive and claims single, per runtime: the per-upstream guards (bulkhead +
circuit breaker), their latency probes, and the idempotency records. The route steps that use them are
in mediator.chain.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager

from aiohttp import web

from mediator.bulkhead import UpstreamGuard
from mediator.config import Config
from mediator.idempotency import Idempotency
from mediator.latency_probe import LatencyProbe
from mediator.metrics import Metrics
from mediator.redis_store import RedisStore
from mediator.upstream import OpenImisUpstream


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
                 kept_idempotency: Idempotency | None = None,
                 upstreams: Mapping[str, OpenImisUpstream] | None = None,
                 previous: LoadProtection | None = None) -> None:
        self.guards = dict(guards) if guards is not None else self.build_guards(config, redis, metrics)
        self.idempotency = kept_idempotency or Idempotency(redis, metrics)
        self._metrics = metrics
        self.probes: dict[str, LatencyProbe] = {}
        """Per upstream with `bulkhead.adaptive.latency_probe` (and `upstreams` given): a kept guard keeps
        its running probe (same upstream object, same settings)."""
        kept_probes = {id(p.bulkhead): p for p in previous.probes.values()} if previous is not None else {}
        for name, upstream in (upstreams or {}).items():
            guard = self.guards.get(name)
            bulkhead_config = upstream.config.bulkhead
            probe_config = bulkhead_config.adaptive.latency_probe
            if guard is None or bulkhead_config.mode != "adaptive" or probe_config is None:
                continue
            kept = kept_probes.get(id(guard.bulkhead))
            self.probes[name] = kept if kept is not None and kept.upstream is upstream \
                else LatencyProbe(upstream, probe_config, guard.bulkhead, metrics)

    def start_probes(self) -> None:
        """Start the latency probes not yet running (those kept from the previous runtime run on). Once the
        upstreams are started."""
        for probe in self.probes.values():
            probe.start()

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
        """Stop the background work (latency probe, cluster pump and lease renewal) of guards
        `next_protection` does not keep (None: all, at shutdown)."""
        kept_probes = set(map(id, next_protection.probes.values())) if next_protection is not None else set()
        for probe in self.probes.values():
            if id(probe) not in kept_probes:
                await probe.close()
        kept = set(map(id, next_protection.guards.values())) if next_protection is not None else set()
        for guard in self.guards.values():
            if id(guard) not in kept:
                await guard.bulkhead.close()
