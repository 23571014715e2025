"""Queued ("store-and-forward") claim submission: FHIR's asynchronous request pattern on Redis Streams.

`AsyncClaims` is one per runtime. The app asks `wants(exchange)` once the pipeline admitted a request;
if it does, `accept` runs the request's idempotency step and stores it (202 + Content-Location), and
`status` answers the status URL. `start`/`close` run the drain (mediator.async_claims.drain).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from mediator.async_claims import delivery
from mediator.async_claims.drain import DrainChannel, Drainer
from mediator.async_claims.metrics import AsyncMetrics, async_metrics
from mediator.async_claims.store import Job, QueuedEntry, QueueStore, Result, StreamRef, new_job_id
from mediator.audit import EXTENSION_BASE, AuditLog, outcome_code
from mediator.batch import BatchEntry, run_batch
from mediator.batch import _entry as batch_response_entry  # the synchronous batch-response's entry shape
from mediator.config import Config
from mediator.config.models import PRIORITY_NAMES, AsyncSubmissionConfig, ChannelConfig
from mediator.fhir import FHIR_JSON, PLAIN_JSON, operation_outcome, operation_outcome_response, wants_fhir_json
from mediator.idempotency import Idempotency
from mediator.load_protection import LoadProtection
from mediator.logs import JsonEvent
from mediator.metrics import Metrics
from mediator.pipeline import Decision, Exchange
from mediator.redis_store import STORE_ERRORS, RedisStore
from mediator.request_view import RequestView
from mediator.upstream import OpenImisUpstream

log = logging.getLogger("mediator.async_claims")

STATUS_SEGMENT = "_async"
ACCEPTED_MARK = 202


def prefers_async(headers: Any) -> bool:
    """RFC 7240: `Prefer: respond-async` among the (comma-separated, possibly repeated) preferences."""
    for value in headers.getall("Prefer", ()):
        for preference in value.split(","):
            if preference.split(";")[0].split("=")[0].strip().lower() == "respond-async":
                return True
    return False


def upstream_slot(protection: LoadProtection, upstream: str, priority: int) -> delivery.SlotCall:
    """The one place the queue takes an upstream slot (breaker check + bulkhead, as every request does).
    Kept to this function so a change of the load-protection API touches one line."""
    guard = protection.guards[upstream]

    async def call(send: Callable[[], Awaitable[web.Response]]) -> web.Response:
        # Its own kind: the adaptive limit compares queued creates with their own unloaded answer time.
        return await guard.call(priority, send, "async-queue:create")
    return call


@dataclass(frozen=True, slots=True)
class AsyncChannel:
    config: ChannelConfig
    settings: AsyncSubmissionConfig


class AsyncClaims:
    def __init__(self, config: Config, redis: RedisStore, upstreams: Mapping[str, OpenImisUpstream],
                 protection: LoadProtection, metrics: Metrics, audit: AuditLog | None) -> None:
        self.public_base_url = config.channels.server.public_base_url
        self.channels = {c.name: AsyncChannel(c, c.async_submission)
                         for c in config.channels.channels if c.async_submission is not None}
        self.store = QueueStore(redis)
        self.protection = protection
        self.metrics: AsyncMetrics = async_metrics(metrics)
        self.audit = audit
        drain_channels = {}
        for name, channel in self.channels.items():
            priority = channel.settings.priority
            value = PRIORITY_NAMES[priority] if isinstance(priority, str) else priority
            drain_channels[name] = DrainChannel(channel.config, channel.settings, upstreams[channel.config.upstream],
                                                upstream_slot(protection, channel.config.upstream, value))
        self.drainer = Drainer(self.store, drain_channels, self.metrics, self._settled)

    @classmethod
    def from_config(cls, config: Config, redis: RedisStore, upstreams: Mapping[str, OpenImisUpstream],
                    protection: LoadProtection, metrics: Metrics, audit: AuditLog | None) -> AsyncClaims | None:
        if not any(c.async_submission is not None for c in config.channels.channels):
            return None
        return cls(config, redis, upstreams, protection, metrics, audit)

    def start(self) -> None:
        self.drainer.start()

    async def close(self) -> None:
        await self.drainer.close()

    # -- accepting ---------------------------------------------------------------------------------

    def wants(self, exchange: Exchange) -> bool:
        """Queue this request? Only creates of the channel's batch/claims, and only if asked (or always)."""
        channel, fhir = exchange.channel, exchange.fhir
        if channel is None or fhir is None or channel.name not in self.channels:
            return False
        if fhir.interaction not in ("create", "batch-or-transaction"):
            return False
        if fhir.interaction == "create" and fhir.resource_type != "Claim":
            return False
        settings = self.channels[channel.name].settings
        return settings.mode == "always" or prefers_async(exchange.request.headers)

    def status_url(self, channel_name: str, job_id: str) -> str:
        """`<public_base_url>_async/<channel>/<id>`: the channel names the guards a poll passes before the
        job is read (mediator.async_claims.status)."""
        return f"{self.public_base_url}{STATUS_SEGMENT}/{channel_name}/{job_id}"

    def _accepted(self, channel_name: str, job_id: str, settings: AsyncSubmissionConfig) -> web.Response:
        body = operation_outcome(202, "async.accepted", "accepted for delivery to openIMIS; poll Content-Location "
                                 "for the outcome", severity="information")
        return web.Response(status=202, text=json.dumps(body, separators=(",", ":")), content_type=FHIR_JSON,
                            charset="utf-8", headers={"Content-Location": self.status_url(channel_name, job_id),
                                                      "Retry-After": str(settings.status_retry_after_s)})

    def _entry(self, exchange: Exchange, job_id: str, index: int, resource_type: str,
               resource: dict[str, Any], raw: bytes | None = None) -> QueuedEntry:
        """`raw`: the request's own bytes (a single claim: openIMIS gets exactly the document every stage
        judged, as synchronously); a batch entry is serialized from its parsed resource, as synchronously."""
        body = raw if raw is not None else json.dumps(resource, separators=(",", ":"), ensure_ascii=False).encode()
        return QueuedEntry(job_id, index, resource_type, body, delivery.code_of(resource), time.time(),
                           exchange.request_id, str(exchange.client_ip))

    async def _enqueue(self, exchange: Exchange, job_id: str, kind: str, entries: list[QueuedEntry],
                       presettled: dict[int, Result], total: int) -> web.Response | None:
        """None on success; else the 503 to answer (nothing was queued: Redis refused the write)."""
        channel, principal = exchange.channel, exchange.principal
        assert channel is not None and principal is not None  # admitted by the pipeline (authentication required)
        try:
            await self.store.enqueue(job_id, channel=channel.name, client=principal.client_id,
                                     facilities=principal.health_facilities, kind=kind, entries=entries,
                                     presettled=presettled, total=total, request_id=exchange.request_id)
        except STORE_ERRORS as exc:
            self.metrics.store_errors.labels("enqueue").inc()
            log.warning(JsonEvent.of("async_claims.store_failed", operation="accept", error=type(exc).__name__))
            return operation_outcome_response(503, "async.store_unavailable",
                                              "the queue cannot store this submission now; retry later",
                                              {"Retry-After": "1"})
        self.metrics.accepted.labels(channel.name, principal.client_id).inc()
        self.metrics.entries_accepted.labels(channel.name, principal.client_id).inc(len(entries))
        self.drainer.wake()
        return None

    async def accept(self, exchange: Exchange, idempotency: Idempotency) -> web.Response:
        """The pipeline admitted `exchange`: run its idempotency step and queue it. A repeat of an accepted
        submission (same key, same body) gets the first 202 again (the same status URL)."""
        channel, fhir = exchange.channel, exchange.fhir
        assert channel is not None and fhir is not None
        settings = self.channels[channel.name].settings
        resource: dict[str, Any] = (exchange.body.document if exchange.body is not None else None) or {}
        raw = exchange.body.raw if exchange.body is not None else None
        job_id = new_job_id()
        response: web.Response
        if fhir.interaction == "batch-or-transaction":
            async def queue_batch() -> web.Response:
                return await self._accept_batch(exchange, job_id, resource, settings)
            response = await idempotency.create(exchange, channel.config, "Bundle", resource,
                                                exchange.request.headers.get("Idempotency-Key"), queue_batch)
        else:
            async def queue_claim() -> web.Response:
                refused = await self._enqueue(exchange, job_id, "single",
                                              [self._entry(exchange, job_id, 0, "Claim", resource, raw)], {}, 1)
                return refused or self._accepted(channel.name, job_id, settings)
            response = await idempotency.create(exchange, channel.config, "Claim", resource,
                                                exchange.request.headers.get("Idempotency-Key"), queue_claim)
        if response.status == ACCEPTED_MARK:
            exchange.decisions.append(("async", Decision.allowed("async.accepted")))
        return response

    async def _accept_batch(self, exchange: Exchange, job_id: str, resource: dict[str, Any],
                            settings: AsyncSubmissionConfig) -> web.Response:
        """The batch's own checks and every entry's (authorization per claim) run now, as they would
        synchronously; entries refused now are settled at once and never queued."""
        channel = exchange.channel
        assert channel is not None
        queued: dict[int, BatchEntry] = {}

        async def collect(entry: BatchEntry) -> web.Response:
            queued[entry.index] = entry
            return web.Response(status=ACCEPTED_MARK)

        checked = await run_batch(exchange, channel.config, resource, collect)
        if checked.status != 200:
            return checked  # refused as a whole (not a batch, too many entries, ...): nothing queued
        bundle = json.loads(checked.body if isinstance(checked.body, bytes) else b"{}")
        presettled: dict[int, Result] = {}
        for index, answer in enumerate(bundle.get("entry") or ()):
            if index not in queued:
                outcome = answer["response"].get("outcome")
                status = int(str(answer["response"]["status"]).split()[0])
                presettled[index] = Result(status, json.dumps(outcome, separators=(",", ":")) if outcome else "",
                                           "async.refused_at_accept")
        if not queued:
            return checked  # every entry refused at once: the synchronous batch-response, nothing queued
        entries = [self._entry(exchange, job_id, index, entry.fhir.resource_type or "Claim", entry.resource or {})
                   for index, entry in sorted(queued.items()) if entry.fhir is not None]
        refused = await self._enqueue(exchange, job_id, "batch", entries, presettled, len(bundle["entry"]))
        return refused or self._accepted(channel.name, job_id, settings)

    # -- the status URL ------------------------------------------------------------------------------

    def status_channel(self, channel_name: str | None) -> ChannelConfig:
        """The channel whose network, authentication and rate-limit rules guard a status URL: the one the
        URL names; for a name that is no async channel (or none: a URL of the earlier form) the first async
        channel, so that a made-up URL is refused or counted like any other."""
        if channel_name in self.channels:
            return self.channels[channel_name].config
        return next(iter(self.channels.values())).config

    async def job_for(self, job_id: str) -> Job | None:
        """The job, read once more on a store error: a read is safe to repeat, and the first command on a
        pooled connection that Redis closed (a restart) fails even though Redis is back."""
        try:
            return await self.store.job(job_id)
        except STORE_ERRORS:
            return await self.store.job(job_id)

    def status_response(self, request: RequestView, job: Job) -> web.Response:
        """202 while unsettled; then the outcome as the synchronous request would have had it."""
        settings = self.channels[job.channel].settings if job.channel in self.channels else None
        content_type = FHIR_JSON if wants_fhir_json(request) else PLAIN_JSON
        if job.state != "done":
            state = "in_progress" if job.state == "in_progress" else "queued"
            body = operation_outcome(202, f"async.{state}", f"{job.settled} of {job.total} entries settled",
                                     severity="information")
            retry_after = settings.status_retry_after_s if settings is not None else 2
            return web.Response(status=202, text=json.dumps(body, separators=(",", ":")), content_type=content_type,
                                charset="utf-8", headers={"Retry-After": str(retry_after),
                                                          "X-Progress": f"{state}: {job.settled}/{job.total}"})
        if job.kind == "single":
            single = job.results.get(0) or delivery.refusal(500, "async.result_missing", "no outcome recorded")
            headers = {"Location": single.location} if single.location else {}
            return web.Response(status=single.status, text=single.body, content_type=content_type, charset="utf-8",
                                headers=headers)
        entries = []
        for index in range(job.total):
            result = job.results.get(index)
            if result is None:
                entries.append({"response": {"status": "500", "outcome": operation_outcome(
                    500, "async.result_missing", "no outcome recorded")}})
                continue
            entries.append(_bundle_entry(result))
        bundle = {"resourceType": "Bundle", "type": "batch-response", "entry": entries}
        return web.Response(status=200, text=json.dumps(bundle, separators=(",", ":"), ensure_ascii=False),
                            content_type=content_type, charset="utf-8")

    # -- final outcomes ------------------------------------------------------------------------------

    def _settled(self, ref: StreamRef, entry: QueuedEntry, result: Result, outcome: str, finished: bool) -> None:
        log.info(JsonEvent.of("async_claims.settled", job_id=entry.job_id, entry=entry.index, outcome=outcome,
                               status=result.status))
        if self.audit is not None:
            self.audit.record_event(final_audit_event(ref, entry, result, outcome, time.time()))


def _bundle_entry(result: Result) -> dict[str, Any]:
    resource = None
    if result.body:
        try:
            resource = json.loads(result.body)
        except ValueError:
            resource = None
    if isinstance(resource, dict) and resource.get("resourceType") == "OperationOutcome" and result.status >= 400:
        return batch_response_entry(result.status, resource=resource, location=result.location or None)
    return batch_response_entry(result.status, resource=resource if isinstance(resource, dict) else None,
                                location=result.location or None)


def final_audit_event(ref: StreamRef, entry: QueuedEntry, result: Result, outcome: str,
                      recorded: float) -> dict[str, Any]:
    """The AuditEvent of a queued claim's final outcome (the accept is audited as its request: 202).
    Built from allowlisted fields only: never the claim body."""
    from datetime import UTC, datetime

    return {
        "resourceType": "AuditEvent",
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest",
                 "display": "RESTful Operation"},
        "subtype": [{"system": "http://hl7.org/fhir/restful-interaction", "code": "create"}],
        "action": "C",
        "recorded": datetime.fromtimestamp(recorded, UTC).isoformat(timespec="milliseconds"),
        "outcome": outcome_code(result.status),
        "outcomeDesc": f"{result.status} {result.reason} ({outcome})",
        "agent": [{"requestor": True, "who": {"identifier": {"system": EXTENSION_BASE + "client-id",
                                                             "value": ref.client}},
                   "network": {"address": entry.client_ip, "type": "2"}},
                  {"requestor": False, "who": {"display": "openimis-mediator queue"}}],
        "source": {"observer": {"display": "openimis-mediator"}},
        "entity": [
            {"what": {"identifier": {"value": entry.request_id}},
             "type": {"system": "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType",
                      "code": "XrequestId"}},
            {"what": {"identifier": {"system": EXTENSION_BASE + "async-job", "value": f"{entry.job_id}#{entry.index}"}},
             "type": {"system": "http://hl7.org/fhir/resource-types", "code": entry.resource_type}},
        ],
        "extension": [{"url": EXTENSION_BASE + "channel", "valueString": ref.channel}],
    }


def status_error(exc: BaseException) -> web.Response:
    log.warning(JsonEvent.of("async_claims.store_failed", operation="status_read", error=type(exc).__name__))
    return operation_outcome_response(503, "async.store_unavailable", "the queue cannot be read now; retry later",
                                      {"Retry-After": "1"})
