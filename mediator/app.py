"""Application assembly: the runtime (compiled config + pipeline + upstreams) and the one FHIR handler.

`build_app(config)` returns an aiohttp Application whose runtime resources (upstream pools, Redis
client, JWKS refresh, replica sync) are started and closed by its cleanup context through
`Runtime.start_new` / `Runtime.close_retired`. `RuntimeHolder.current` is swapped whole on reload
(`mediator.reload`), which uses the same two methods; a request keeps the runtime it started with.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from mediator.addresses import ClientIpPolicy
from mediator.async_claims import AsyncClaims, make_status_handler
from mediator.audit import AuditLog
from mediator.capabilities import CapabilityStatement
from mediator.chain import RequestChain, Upstreams
from mediator.config import Config
from mediator.fhir_answers import FhirAnswers
from mediator.identity import Identity
from mediator.identity.token_service import make_handlers as identity_handlers
from mediator.load_protection import LoadProtection
from mediator.logs import JsonEvent, bind_request_id, unbind_request_id
from mediator.metrics import Metrics
from mediator.pipeline import Exchange, Pipeline, request_id_for
from mediator.readiness import Readiness
from mediator.redis_store import RedisStore
from mediator.replica.service import Replica
from mediator.request_view import RequestView
from mediator.stages import build_stages
from mediator.upstream import OpenImisUpstream

log = logging.getLogger("mediator")
access_log = logging.getLogger("mediator.access")

@dataclass(slots=True)
class Runtime:
    """Compiled configuration and the live resources it serves with.

    Lifetime: built by `build` (no I/O), then `start_new`, serving, then `close_retired`. On a reload the
    next runtime is built with `previous=` the running one and takes over every resource whose settings
    are unchanged; each resource belongs to every runtime that holds it, and is started by the first
    (`start_new`) and closed by the last (`close_retired` with the runtime that no longer holds it).
    """

    config: Config
    chain: RequestChain
    upstreams: dict[str, OpenImisUpstream]
    identity: Identity
    client_ip_policy: ClientIpPolicy
    redis: RedisStore
    protection: LoadProtection
    replica: Replica | None = None
    async_claims: AsyncClaims | None = None
    """Queued claim submission (mediator/async_claims); None when no channel has async_submission."""
    audit: AuditLog | None = None
    """The app's audit trail, for events without a request (the queue's final outcomes); kept on reload."""
    in_flight: int = 0
    """Requests using this runtime now; a reload closes retired resources once it is 0."""

    @property
    def pipeline(self) -> Pipeline:
        """The chain's stages."""
        return self.chain.pipeline

    @classmethod
    def build(cls, config: Config, metrics: Metrics, previous: Runtime | None = None,
              audit: AuditLog | None = None) -> Runtime:
        """Compile `config`. `previous` (on a reload): the running runtime, whose resources are reused
        where their settings are unchanged. Reuse is decided first, and the stages, load protection and
        replica are built with these final objects, so nothing here points at an unstarted one."""
        server = config.channels.server
        upstreams: dict[str, OpenImisUpstream] = {}
        for name, upstream_config in config.channels.upstreams.items():
            running = previous.upstreams.get(name) if previous is not None else None
            if running is not None and running.config == upstream_config \
                    and running.public_base_url == server.public_base_url:
                upstreams[name] = running  # same pool, same login
            else:
                upstreams[name] = OpenImisUpstream(name, upstream_config, server.public_base_url)
        redis = previous.redis if previous is not None and previous.redis.config == server.redis \
            else RedisStore(server.redis)
        identity = Identity.from_config(config, previous.identity if previous is not None else None)
        kept_guards = {} if previous is None else {
            name: guard for name, guard in previous.protection.guards.items()
            if name in upstreams and upstreams[name] is previous.upstreams.get(name)
            and (guard.bulkhead.budget is None or previous.redis is redis)}
        # One guard per upstream for everything sent to it: forwarded requests and the stages' own lookups.
        guards = LoadProtection.build_guards(config, redis, metrics, kept_guards)
        replica = previous.replica if previous is not None and _replica_unchanged(previous, config, upstreams) \
            else Replica.from_config(config, upstreams, metrics)
        if replica is not None:   # new or kept: its syncs wait in this runtime's bulkhead
            replica.syncer.guard = guards.get(replica.policy.upstream)
        stages = build_stages(config, upstreams, metrics.registry, identity, redis=redis, metrics=metrics,
                              guards=guards,
                              facility_source=replica.facilities if replica is not None else None)
        protection = LoadProtection(
            config, redis, metrics, guards=guards,
            kept_idempotency=previous.protection.idempotency if previous is not None and previous.redis is redis
            else None, upstreams=upstreams, previous=previous.protection if previous is not None else None)
        audit = audit if audit is not None else previous.audit if previous is not None else None
        async_claims = AsyncClaims.from_config(config, redis, upstreams, protection, metrics, audit)
        chain = RequestChain.build(Pipeline(stages, metrics), Upstreams(upstreams, protection), replica,
                                   CapabilityStatement.from_config(config, identity.token_url),
                                   FhirAnswers(server.public_base_url, upstreams), async_claims, metrics)
        return cls(config, chain, upstreams, identity, ClientIpPolicy.from_config(config), redis, protection,
                   replica, async_claims=async_claims, audit=audit)

    async def start_new(self, previous: Runtime | None) -> None:
        """Start the resources this runtime did not take over from `previous` (None: all of them). If one
        fails to start, those started here are closed again and the error is raised."""
        try:
            kept = set(map(id, previous.upstreams.values())) if previous is not None else set()
            for upstream in self.upstreams.values():
                if id(upstream) not in kept:
                    await upstream.start()
            await self.identity.start_new(previous.identity if previous is not None else None)
            self.protection.start_probes()
            if self.replica is not None and (previous is None or previous.replica is not self.replica):
                await self.replica.start()
                self.replica.start_schedule()
            if self.async_claims is not None and (previous is None or previous.async_claims is not self.async_claims):
                self.async_claims.start()
        except BaseException:
            await self.close_retired(previous)
            raise

    async def close_retired(self, next_runtime: Runtime | None) -> None:
        """Close the resources `next_runtime` does not use (None: all of them, at shutdown). The caller
        first lets the requests on this runtime finish (see mediator.reload). A close that fails is
        logged and the others still run."""
        closes: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        queue = self.async_claims
        if queue is not None and (next_runtime is None or next_runtime.async_claims is not queue):
            closes.append(("async claims", queue.close))  # first: its deliveries use an upstream
        if self.replica is not None and (next_runtime is None or next_runtime.replica is not self.replica):
            closes.append(("replica", self.replica.close))  # first: its sync task uses an upstream
        closes.append(("identity", lambda: self.identity.close_retired(
            next_runtime.identity if next_runtime is not None else None)))
        closes.append(("load protection", lambda: self.protection.close_retired(
            next_runtime.protection if next_runtime is not None else None)))
        if next_runtime is None or next_runtime.redis is not self.redis:
            closes.append(("redis", self.redis.close))
        closes += [(f"upstream {u.name}", u.close) for u in self.retired_upstreams(next_runtime)]
        for what, close in closes:
            try:
                await close()
            except Exception:
                log.exception(JsonEvent.of("runtime.close_failed", part=what))

    def retired_upstreams(self, next_runtime: Runtime | None) -> list[OpenImisUpstream]:
        kept = set(map(id, next_runtime.upstreams.values())) if next_runtime is not None else set()
        return [u for u in self.upstreams.values() if id(u) not in kept]


def _replica_unchanged(previous: Runtime, config: Config, upstreams: Mapping[str, OpenImisUpstream]) -> bool:
    """The running replica serves the new configuration as is: same policy, same upstream object, same
    Redis settings (its store's) and public base URL (its links). Then its data and sync task carry on."""
    running, policy = previous.replica, config.policies.get("replica")
    if running is None or running.policy != policy:
        return False
    old_server, server = previous.config.channels.server, config.channels.server
    return upstreams.get(running.policy.upstream) is previous.upstreams.get(running.policy.upstream) \
        and old_server.redis == server.redis and old_server.public_base_url == server.public_base_url


@dataclass(slots=True)
class RuntimeHolder:
    current: Runtime


RUNTIME = web.AppKey("runtime", RuntimeHolder)
METRICS = web.AppKey("metrics", Metrics)
AUDIT = web.AppKey("audit", AuditLog)
READINESS = web.AppKey("readiness", Readiness)


def _final_reason(exchange: Exchange) -> str:
    return exchange.decisions[-1][1].reason if exchange.decisions else "none"


async def handle_fhir(request: web.Request) -> web.StreamResponse:
    runtime = request.app[RUNTIME].current
    # Counted for the reload drain: a request cancelled mid-way (client gone) must not hold a retired
    # runtime's resources open until the drain bound.
    runtime.in_flight += 1
    try:
        return await _handle_fhir(request, runtime)
    finally:
        runtime.in_flight -= 1


async def _handle_fhir(request: web.Request, runtime: Runtime) -> web.StreamResponse:
    """The request chain (mediator.chain), then the record of its outcome: metrics, access log, audit."""
    metrics = request.app[METRICS]
    started = time.perf_counter()
    exchange = Exchange(RequestView.from_aiohttp(request), request_id_for(request))
    exchange.body_read_timeout_s = runtime.config.channels.server.limits.body_read_timeout_s
    log_context = bind_request_id(exchange.request_id)
    response = await runtime.chain.run(exchange)
    channel = exchange.channel.name if exchange.channel is not None else "none"
    reason = _final_reason(exchange)
    elapsed = time.perf_counter() - started
    metrics.request_children.labels(channel, str(response.status), reason).inc()
    metrics.request_seconds_children.labels(channel).observe(elapsed)
    # One record per request (audit event + access line), written by the audit writer thread.
    request.app[AUDIT].record(exchange, response.status, reason,
                              _access_fields(exchange, channel, response.status, reason, elapsed))
    unbind_request_id(log_context)
    return response


def _access_fields(exchange: Exchange, channel: str, status: int, reason: str,
                   elapsed: float) -> dict[str, Any] | None:
    """The access line's fields (logger `mediator.access`), or None when that logger is off."""
    if not access_log.isEnabledFor(logging.INFO):
        return None
    fhir = exchange.fhir
    record: dict[str, Any] = {
        "request_id": exchange.request_id, "client_ip": str(exchange.client_ip),
        "method": exchange.request.method, "channel": channel,
        "interaction": fhir.interaction if fhir else None,
        "resource_type": fhir.resource_type if fhir else None,
        "status": status, "reason": reason, "ms": round(elapsed * 1000, 2),
    }
    # Query strings and bodies carry personal data (insuree numbers); they are never logged.
    return record


async def handle_healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "up"})


async def handle_readyz(request: web.Request) -> web.Response:
    """Served on the ops listener only (mediator.server): it names the upstreams and whether Redis is up,
    which is nothing to tell the public FHIR port's callers."""
    ready, body = await request.app[READINESS].report(request.app[RUNTIME].current)
    return web.json_response(body, status=200 if ready else 503, headers={"Cache-Control": "no-store"})


async def drop_server_header(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: no `Server: Python/… aiohttp/…` (it tells a scanner which versions to try)."""
    response.headers.popall("Server", None)


def build_app(config: Config, metrics: Metrics | None = None) -> web.Application:
    metrics = metrics or Metrics()
    limits = config.channels.server.limits
    app = web.Application(client_max_size=limits.max_body_bytes)
    app[METRICS] = metrics
    app[AUDIT] = AuditLog.from_config(config.channels.server.audit, config.root,
                                      on_drop=metrics.audit_records_dropped.inc)
    app[RUNTIME] = RuntimeHolder(Runtime.build(config, metrics, audit=app[AUDIT]))
    app[READINESS] = Readiness()
    metrics.watch_upstreams(lambda: app[RUNTIME].current.upstreams)

    async def runtime_resources(app: web.Application):  # type: ignore[no-untyped-def]
        await app[RUNTIME].current.start_new(None)
        yield
        # Reloads have already closed what earlier runtimes retired (mediator.reload stops first).
        await app[RUNTIME].current.close_retired(None)
        app[AUDIT].close()

    app.cleanup_ctx.append(runtime_resources)
    app.on_response_prepare.append(drop_server_header)
    # Liveness only on the public port ({"status": "up"} tells nobody anything); /readyz is on the ops
    # listener (mediator.server.build_metrics_app), so on this port it is just another unknown path.
    app.router.add_get("/healthz", handle_healthz)
    auth = identity_handlers(lambda r: r.app[RUNTIME].current.identity,
                             lambda r: r.app[RUNTIME].current.client_ip_policy, lambda r: r.app[METRICS].record)
    prefix = urlsplit(config.channels.server.public_base_url).path
    app.router.add_post("/auth/token", auth["token"])
    app.router.add_get("/.well-known/jwks.json", auth["jwks"])
    app.router.add_get("/.well-known/smart-configuration", auth["smart_configuration"])
    app.router.add_get(f"{prefix}.well-known/smart-configuration", auth["smart_configuration"])
    status = make_status_handler(lambda r: (r.app[RUNTIME].current.async_claims,
                                            r.app[RUNTIME].current.pipeline.stages))
    app.router.add_get(f"{prefix}_async/{{channel}}/{{job_id}}", status)
    app.router.add_get(f"{prefix}_async/{{job_id}}", status)   # the URL form issued before the channel was in it
    app.router.add_route("*", "/{tail:.*}", handle_fhir)
    return app


def handler_args(config: Config) -> dict[str, Any]:
    """Keyword arguments of aiohttp's request handler (web.AppRunner, aiohttp_server): header limits for
    its HTTP parser (it answers 400 beyond them, before any handler runs)."""
    limits = config.channels.server.limits
    return {"max_line_size": limits.max_request_line_bytes, "max_field_size": limits.max_header_field_bytes,
            "max_headers": limits.max_headers,
            # aiohttp arms this when a connection opens and closes it if no request completes in time:
            # it bounds idle keep-alive connections and slow-header (slowloris) clients alike.
            "keepalive_timeout": limits.idle_timeout_s}
