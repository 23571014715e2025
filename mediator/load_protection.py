"""Everything between the pipeline and openIMIS that keeps it responsive and claims single:
per-upstream guards (bulkhead + circuit breaker), idempotent creates and batch splitting.

`LoadProtection.forward` is what the app calls once the pipeline has admitted a request.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
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

    On a reload the Runtime hands over `kept_guards` (those of upstreams it reuses: their bulkhead and
    breaker settings are part of the unchanged upstream configuration) and `kept_idempotency` (when the
    Redis configuration is unchanged), so slots in use, an open breaker and in-process idempotency
    records survive it.
    """

    def __init__(self, config: Config, redis: RedisStore, metrics: Metrics | None = None,
                 entry_checks: Sequence[EntryCheck] = (), *,
                 kept_guards: Mapping[str, UpstreamGuard] | None = None,
                 kept_idempotency: Idempotency | None = None) -> None:
        kept = kept_guards or {}
        self.guards = {name: kept.get(name) or UpstreamGuard.build(name, u.bulkhead, u.circuit_breaker, metrics)
                       for name, u in config.channels.upstreams.items()}
        self.idempotency = kept_idempotency or Idempotency(redis, metrics)
        self.entry_checks = tuple(entry_checks)
        self._metrics = metrics

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

        async def send_as_is() -> web.Response:
            return await guard.call(config.priority_value, lambda: upstream.forward(
                request, path, body, client_ip, exchange.request_id, config.timeout_s, raw_query=raw_query))

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
                        method="POST", raw_query=""))

                return await self.idempotency.create(exchange, config, rtype, entry.resource,
                                                     request.headers.get("Idempotency-Key"), send_entry,
                                                     key_suffix=f"#entry{entry.index}")

            return await run_batch(exchange, config, resource, create, self.entry_checks, self._metrics)
        if fhir.interaction == "create" and config.idempotency is not None and resource is not None:
            return await self.idempotency.create(exchange, config, fhir.resource_type or "", resource,
                                                 request.headers.get("Idempotency-Key"), send_as_is)
        return await send_as_is()
