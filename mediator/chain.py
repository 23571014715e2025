"""The whole life of a FHIR request, declared once, in order (README "How a request flows").

    stages   (mediator.stages.ORDER)  client_ip → channel → ip → authentication → request → authorization
                                      → write → rate_limit: each returns a Decision; the first denial ends it
    route    (ROUTE)                  capabilities → async_claims → replica → local_answer → batch →
                                      idempotent_create → forward: the first step that answers ends the
                                      route; `forward` always answers
    response (RESPONSE)               link_rewrite → fhir_answers → response_filters: run on the routed
                                      answer only
    finish   (FINISH)                 response_headers: on every answer, denials and errors included

An error raised by any stage or step becomes a Decision through one mechanism: a `MediatorError` says
which (`MediatorError.decision`), anything else is `mediator.internal_error`; `RequestChain.run`
renders it like a stage's denial. The app records the outcome (metrics, access log, audit) afterwards.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web

from mediator.async_claims import AsyncClaims
from mediator.batch import BatchEntry, run_batch
from mediator.capabilities import CapabilityStatement
from mediator.decision import Decision
from mediator.errors import MediatorError
from mediator.fhir import operation_outcome_response
from mediator.fhir_answers import FhirAnswers
from mediator.link_rewrite import rewrite_links
from mediator.load_protection import LoadProtection
from mediator.logs import JsonEvent
from mediator.metrics import Metrics
from mediator.pipeline import Exchange, Pipeline
from mediator.replica.service import Replica
from mediator.upstream import OpenImisUpstream

log = logging.getLogger("mediator")


class RouteStep(Protocol):
    """One way of answering an admitted request. None: not this step's request, the next step's."""

    name: str
    sends_upstream: bool
    """True: its answer comes from openIMIS (timed as upstream time, recorded as `upstream.answered`)."""

    async def answer(self, exchange: Exchange) -> web.StreamResponse | None: ...


class ResponseStep(Protocol):
    """Looks at (and may replace) an answer before it leaves."""

    name: str

    async def apply(self, exchange: Exchange, response: web.StreamResponse) -> web.StreamResponse: ...


@dataclass(frozen=True, slots=True)
class Upstreams:
    """What the upstream-bound route steps share: the clients and their load protection."""

    clients: dict[str, OpenImisUpstream]
    protection: LoadProtection

    def of(self, exchange: Exchange) -> OpenImisUpstream:
        assert exchange.channel is not None   # the channel stage admitted the request
        return self.clients[exchange.channel.config.upstream]


class CapabilitiesStep:
    """GET /metadata: the mediator's own CapabilityStatement (openIMIS 1.10 has none)."""

    name = "capabilities"
    sends_upstream = False

    def __init__(self, statement: CapabilityStatement) -> None:
        self.statement = statement

    async def answer(self, exchange: Exchange) -> web.StreamResponse | None:
        if exchange.fhir is None or exchange.fhir.interaction != "capabilities":
            return None
        exchange.decisions.append(("capabilities", Decision.allowed("capabilities.answered")))
        return self.statement.response(exchange.request)


class AsyncClaimsStep:
    """Claims on a channel with `async_submission`: queued (Redis Streams) and answered 202 with a status
    URL; delivered to openIMIS later inside the upstream's guard (mediator.async_claims)."""

    name = "async_claims"
    sends_upstream = False

    def __init__(self, queue: AsyncClaims | None, upstreams: Upstreams) -> None:
        self.queue = queue
        self.upstreams = upstreams

    async def answer(self, exchange: Exchange) -> web.StreamResponse | None:
        if self.queue is None or not self.queue.wants(exchange):
            return None
        return await self.queue.accept(exchange, self.upstreams.protection.idempotency)


class ReplicaStep:
    """Replicated master-data reads and searches answered from the replica (channels with serve_from:
    replica); the replica falls back to openIMIS (None) when it cannot answer."""

    name = "replica"
    sends_upstream = False

    def __init__(self, replica: Replica | None) -> None:
        self.replica = replica

    async def answer(self, exchange: Exchange) -> web.StreamResponse | None:
        channel, fhir = exchange.channel, exchange.fhir
        assert channel is not None and fhir is not None
        if channel.config.serve_from != "replica" or self.replica is None:
            return None
        answered = await self.replica.reader.answer(
            exchange.request, fhir, exchange.search.query if exchange.search is not None else None)
        if answered is None:
            return None
        exchange.decisions.append(("replica", answered.decision))
        return answered.response


class LocalAnswerStep:
    """A request a stage chose to answer itself (facility-scoped searches, `Exchange.served_by`); each of
    its own openIMIS requests goes through the upstream's guard."""

    name = "local_answer"
    sends_upstream = True

    async def answer(self, exchange: Exchange) -> web.StreamResponse | None:
        if exchange.served_by is None:
            return None
        assert exchange.channel is not None
        config = exchange.channel.config
        return await exchange.served_by.run(exchange.request, str(exchange.client_ip), exchange.request_id,
                                            config.priority_value, config.timeout_s)


class BatchStep:
    """A batch Bundle: split into one create per entry (each idempotent and guarded), answered as a
    batch-response."""

    name = "batch"
    sends_upstream = True

    def __init__(self, upstreams: Upstreams, metrics: Metrics | None) -> None:
        self.upstreams = upstreams
        self.metrics = metrics

    async def answer(self, exchange: Exchange) -> web.StreamResponse | None:
        fhir, channel = exchange.fhir, exchange.channel
        assert fhir is not None and channel is not None
        if fhir.interaction != "batch-or-transaction":
            return None
        config = channel.config
        upstream = self.upstreams.of(exchange)
        protection = self.upstreams.protection
        guard = protection.guards[upstream.name]
        request, client_ip = exchange.request, str(exchange.client_ip)
        resource: dict[str, Any] = exchange.body.document if exchange.body is not None else {}

        async def create(entry: BatchEntry) -> web.Response:
            assert entry.fhir is not None and entry.resource is not None  # run_batch checked the entry
            entry_body = json.dumps(entry.resource, separators=(",", ":"), ensure_ascii=False).encode()
            rtype = entry.fhir.resource_type or ""

            async def send_entry() -> web.Response:
                return await guard.call(config.priority_value, lambda: upstream.forward(
                    request, rtype, entry_body, client_ip, exchange.request_id, config.timeout_s,
                    method="POST", raw_query=""), f"{channel.name}:create")

            answered = await protection.idempotency.create(exchange, config, rtype, entry.resource,
                                                           request.headers.get("Idempotency-Key"), send_entry,
                                                           key_suffix=f"#entry{entry.index}")
            # Each entry's answer (sent now or replayed) gets what link_rewrite gives a whole answer: the
            # batch-response Bundle built from them holds no URL of openIMIS's for that step to find.
            rewrite_links(upstream.rewriter, answered)   # in place
            return answered

        return await run_batch(exchange, config, resource, create, self.metrics)


class IdempotentCreateStep:
    """A create on a channel with idempotency: sent once per Idempotency-Key (or body), replayed after."""

    name = "idempotent_create"
    sends_upstream = True

    def __init__(self, upstreams: Upstreams) -> None:
        self.upstreams = upstreams

    async def answer(self, exchange: Exchange) -> web.StreamResponse | None:
        fhir, channel = exchange.fhir, exchange.channel
        assert fhir is not None and channel is not None
        if fhir.interaction != "create" or channel.config.idempotency is None or exchange.body is None:
            return None
        forward = ForwardStep(self.upstreams)
        return await self.upstreams.protection.idempotency.create(
            exchange, channel.config, fhir.resource_type or "", exchange.body.document,
            exchange.request.headers.get("Idempotency-Key"), lambda: forward.send(exchange))


class ForwardStep:
    """The request as it is, through the upstream's guard (circuit breaker, bulkhead) to openIMIS: our own
    login (again once on a 401), allowlisted headers both ways, Location rewritten to the public base,
    openIMIS's error texts replaced by a generic OperationOutcome (mediator.upstream); its Bundle links are
    the link_rewrite response step's."""

    name = "forward"
    sends_upstream = True

    def __init__(self, upstreams: Upstreams) -> None:
        self.upstreams = upstreams

    async def answer(self, exchange: Exchange) -> web.StreamResponse | None:
        return await self.send(exchange)

    async def send(self, exchange: Exchange) -> web.Response:
        fhir, channel = exchange.fhir, exchange.channel
        assert fhir is not None and channel is not None
        config = channel.config
        upstream = self.upstreams.of(exchange)
        guard = self.upstreams.protection.guards[upstream.name]
        path = exchange.upstream_path or fhir.path
        # The request stage parsed the body; these are the bytes that document was parsed from.
        body = exchange.body.raw if exchange.body is not None else None
        # A search goes with only the parameters the search stage kept (mediator.search_parameters).
        raw_query = exchange.search.upstream_query if exchange.search is not None else None
        kind = f"{channel.name}:{fhir.interaction}"  # bounded: channels × FHIR interactions
        return await guard.call(config.priority_value, lambda: upstream.forward(
            exchange.request, path, body, str(exchange.client_ip), exchange.request_id, config.timeout_s,
            raw_query=raw_query), kind)


class LinkRewriteStep:
    """openIMIS's URLs in a Bundle it answered (`link[].url`, `entry[].fullUrl`) on the public base
    (mediator.link_rewrite), in the document parsed on receipt. Only for answers that came from openIMIS;
    first, so fhir_answers and the facility filter see the answer as the client will."""

    name = "link_rewrite"

    def __init__(self, upstreams: Upstreams) -> None:
        self.upstreams = upstreams

    async def apply(self, exchange: Exchange, response: web.StreamResponse) -> web.StreamResponse:
        if exchange.answered_by not in UPSTREAM_ROUTES:
            return response
        return rewrite_links(self.upstreams.of(exchange).rewriter, response)


class FhirAnswersStep:
    """openIMIS's answers shaped for FHIR clients (mediator.fhir_answers: a bare resource or "not found"
    answered to a search becomes a searchset, a create answers with the created resource, naive datetimes
    get the upstream's zone). Only for answers that came from openIMIS; before the response filters, so
    the facility filter always sees a searchset Bundle."""

    name = "fhir_answers"

    def __init__(self, answers: FhirAnswers, upstreams: Upstreams) -> None:
        self.answers = answers
        self.upstreams = upstreams

    async def apply(self, exchange: Exchange, response: web.StreamResponse) -> web.StreamResponse:
        if exchange.answered_by not in UPSTREAM_ROUTES:
            return response
        upstream = self.upstreams.of(exchange)
        return await self.answers.shape(exchange, upstream, response, self.upstreams.protection.guards[upstream.name])


class ResponseFiltersStep:
    """The checks stages registered on openIMIS's answer (`Exchange.response_filters`: authorization's
    count-only search result check)."""

    name = "response_filters"

    async def apply(self, exchange: Exchange, response: web.StreamResponse) -> web.StreamResponse:
        for response_filter in exchange.response_filters:
            response = await response_filter(exchange, response)
        return response


class ResponseHeadersStep:
    """X-Request-ID and the headers stages asked for (`Exchange.response_headers`: RateLimit)."""

    name = "response_headers"

    async def apply(self, exchange: Exchange, response: web.StreamResponse) -> web.StreamResponse:
        response.headers["X-Request-ID"] = exchange.request_id
        response.headers.update(exchange.response_headers)
        return response


ROUTE = ("capabilities", "async_claims", "replica", "local_answer", "batch", "idempotent_create", "forward")
UPSTREAM_ROUTES = frozenset({"local_answer", "batch", "idempotent_create", "forward"})
"""The route steps whose answers come from openIMIS."""
RESPONSE = ("link_rewrite", "fhir_answers", "response_filters")
FINISH = ("response_headers",)


def error_decision(exc: BaseException, request_id: str) -> Decision:
    """The one mapping of an exception raised while serving a request to the Decision it ends with."""
    if isinstance(exc, MediatorError) and exc.reason != MediatorError.reason:
        exc.log(log)
        return exc.decision()
    # Not meant to end a request (a bug, or an error a stage should have turned into a decision).
    log.error(JsonEvent.of("request.unhandled_error", request_id=request_id, error=type(exc).__name__),
              exc_info=exc)
    return Decision.denied("mediator.internal_error", 500, f"internal error; quote request id {request_id}")


class RequestChain:
    """Stages, then route steps, then response steps, then finishing steps, in their declared order."""

    def __init__(self, pipeline: Pipeline, route: Sequence[RouteStep], response: Sequence[ResponseStep],
                 finish: Sequence[ResponseStep], metrics: Metrics | None = None) -> None:
        for names, declared in (([s.name for s in route], ROUTE), ([s.name for s in response], RESPONSE),
                                ([s.name for s in finish], FINISH)):
            if tuple(names) != declared:
                raise RuntimeError(f"steps {names} are not the declared {declared}")
        self.pipeline = pipeline
        self.route = tuple(route)
        self.response = tuple(response)
        self.finish = tuple(finish)
        self._metrics = metrics

    @classmethod
    def build(cls, pipeline: Pipeline, upstreams: Upstreams, replica: Replica | None,
              capabilities: CapabilityStatement, answers: FhirAnswers, async_claims: AsyncClaims | None = None,
              metrics: Metrics | None = None) -> RequestChain:
        return cls(pipeline,
                   [CapabilitiesStep(capabilities), AsyncClaimsStep(async_claims, upstreams), ReplicaStep(replica),
                    LocalAnswerStep(), BatchStep(upstreams, metrics), IdempotentCreateStep(upstreams),
                    ForwardStep(upstreams)],
                   [LinkRewriteStep(upstreams), FhirAnswersStep(answers, upstreams), ResponseFiltersStep()],
                   [ResponseHeadersStep()], metrics)

    @property
    def order(self) -> tuple[tuple[str, str], ...]:
        """(phase, step) for every step a request may pass, in order."""
        return (tuple(("stage", s.name) for s in self.pipeline.stages)
                + tuple(("route", s.name) for s in self.route)
                + tuple(("response", s.name) for s in self.response)
                + tuple(("finish", s.name) for s in self.finish))

    async def run(self, exchange: Exchange) -> web.StreamResponse:
        try:
            response = await self._admit_and_route(exchange)
        except Exception as exc:   # nothing a request does may take the process down
            refusal = error_decision(exc, exchange.request_id)
            exchange.decisions.append((refusal.stage, refusal))
            response = operation_outcome_response(refusal.status, refusal.reason, refusal.message,
                                                  refusal.headers)
            if isinstance(exc, MediatorError) and exc.close_connection:
                response.force_close()
        for step in self.finish:
            response = await step.apply(exchange, response)
        return response

    async def _admit_and_route(self, exchange: Exchange) -> web.StreamResponse:
        denial = await self.pipeline.run(exchange)
        if denial is not None:
            return operation_outcome_response(denial.status, denial.reason, denial.message, denial.headers)
        response = await self._route(exchange)
        for step in self.response:
            response = await step.apply(exchange, response)
        return response

    async def _route(self, exchange: Exchange) -> web.StreamResponse:
        for step in self.route:
            started = time.perf_counter()
            # Upstream time: of the step that answered (or failed), never of the steps that passed.
            try:
                answered = await step.answer(exchange)
            except BaseException:
                if step.sends_upstream:
                    self._observe_upstream(exchange, time.perf_counter() - started)
                raise
            if answered is not None:
                exchange.answered_by = step.name
                if step.sends_upstream:
                    self._observe_upstream(exchange, time.perf_counter() - started)
                    exchange.decisions.append(("upstream", Decision.allowed("upstream.answered")))
                return answered
        raise RuntimeError("no route step answered")   # `forward` always answers

    def _observe_upstream(self, exchange: Exchange, seconds: float) -> None:
        if self._metrics is not None and exchange.channel is not None:
            self._metrics.upstream_seconds_children.labels(exchange.channel.config.upstream).observe(seconds)
