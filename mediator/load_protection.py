"""Everything between the pipeline and openIMIS that keeps it responsive and claims single:
per-upstream guards (bulkhead + circuit breaker), idempotent creates and batch splitting.

`LoadProtection.forward` is what the app calls once the pipeline has admitted a request.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from aiohttp import web

from mediator.batch import BatchEntry, EntryCheck, run_batch
from mediator.bulkhead import UpstreamGuard
from mediator.config import Config
from mediator.idempotency import Idempotency
from mediator.metrics import Metrics
from mediator.pipeline import Exchange
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
                 entry_checks: Sequence[EntryCheck] = (), *,
                 guards: Mapping[str, UpstreamGuard] | None = None,
                 kept_idempotency: Idempotency | None = None) -> None:
        self.guards = dict(guards) if guards is not None else self.build_guards(config, redis, metrics)
        self.idempotency = kept_idempotency or Idempotency(redis, metrics)
        self.entry_checks = tuple(entry_checks)
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

    async def forward(self, exchange: Exchange, upstream: OpenImisUpstream, body: bytes | None) -> web.Response:
        channel, fhir = exchange.channel, exchange.fhir
        assert channel is not None and fhir is not None  # the channel stage admitted the request
        config = channel.config
        request = exchange.request
        guard = self.guards[upstream.name]
        client_ip = str(exchange.client_ip)

        if exchange.served_by is not None:   # a facility-scoped search: its requests go through the guard
            return await exchange.served_by.run(request, client_ip, exchange.request_id, config.priority_value,
                                                config.timeout_s)
        path = exchange.upstream_path or fhir.path
        # A search goes with only the parameters the search stage kept (mediator.search_parameters).
        raw_query = exchange.search.upstream_query if exchange.search is not None else None
        kind = f"{channel.name}:{fhir.interaction}"  # bounded: channels × FHIR interactions

        async def send_as_is() -> web.Response:
            return await guard.call(config.priority_value, lambda: upstream.forward(
                request, path, body, client_ip, exchange.request_id, config.timeout_s, raw_query=raw_query),
                kind)

        resource: dict[str, Any] | None = exchange.body.document if exchange.body is not None else None
        if fhir.interaction == "batch-or-transaction":
            if resource is None:
                resource = {}

            async def create(entry: BatchEntry) -> web.Response:
                assert entry.fhir is not None and entry.resource is not None  # run_batch checked the entry
                entry_body = json.dumps(entry.resource, separators=(",", ":"), ensure_ascii=False).encode()
                rtype = entry.fhir.resource_type or ""

                async def send_entry() -> web.Response:
                    return await guard.call(config.priority_value, lambda: upstream.forward(
                        request, rtype, entry_body, client_ip, exchange.request_id, config.timeout_s,
                        method="POST", raw_query=""), f"{channel.name}:create")

                return await self.idempotency.create(exchange, config, rtype, entry.resource,
                                                     request.headers.get("Idempotency-Key"), send_entry,
                                                     key_suffix=f"#entry{entry.index}")

            return await run_batch(exchange, config, resource, create, self.entry_checks, self._metrics)
        if fhir.interaction == "create" and config.idempotency is not None and resource is not None:
            return await self.idempotency.create(exchange, config, fhir.resource_type or "", resource,
                                                 request.headers.get("Idempotency-Key"), send_as_is)
        return await send_as_is()
