"""Authorization, the result filter: a check of openIMIS's answer to a search (a response step)."""

from __future__ import annotations

import logging

from aiohttp import web

from mediator.facility_scope import OWNED_BY_CLAIM, owner_facts
from mediator.logs import JsonEvent
from mediator.metrics import AuthorizationMetrics
from mediator.pipeline import Exchange, Principal
from mediator.stages.authorization_facts import FacilityFactFinder
from mediator.stages.authorization_policy import Access, facility_check
from mediator.upstream import OpenImisUpstream, response_document

log = logging.getLogger("mediator.authorization")


class SearchResultFilter:
    """Count-only check of a forwarded search answer (a shadow facility rule ahead of an enforced
    `facility_scope: any` rule): counts and logs the entries the facility rule would remove, returns the
    answer unchanged. The owners of a page's ClaimResponse / CommunicationRequest entries come from one
    claim-index request (inside the bulkhead), not one lookup per entry. Enforced facility-bound
    searches never come here: they are answered from the caller's own claims (authorization_search).
    """

    def __init__(self, facts: FacilityFactFinder, metrics: AuthorizationMetrics, access: Access | None,
                 principal: Principal | None, upstream: OpenImisUpstream, *, shadow: bool) -> None:
        self.facts = facts
        self.metrics = metrics
        self.access = access
        self.principal = principal
        self.upstream = upstream
        self.shadow = shadow

    async def __call__(self, exchange: Exchange, response: web.StreamResponse) -> web.StreamResponse:
        if response.status != 200:
            return response   # errors carry no resources
        try:
            await self._count(exchange, response)
        except Exception:   # count-only: a check that cannot run is logged; the enforced rule decided
            log.exception(JsonEvent.of("authorization.shadow_filter_failed", request_id=exchange.request_id))
        return response

    async def _count(self, exchange: Exchange, response: web.StreamResponse) -> None:
        assert self.access is not None
        document = response_document(response)   # parsed once, on receipt (mediator.upstream)
        if not isinstance(document, dict):
            raise TypeError("unexpected answer to a search")
        if document.get("resourceType") == "Bundle":
            resources = [e.get("resource") if isinstance(e, dict) else None for e in document.get("entry") or ()]
        elif document.get("resourceType") == self.access.resource_type:
            resources = [document]   # openIMIS answers ?identifier= with the bare resource
        else:
            return
        snapshot = await self.facts.snapshot()
        wanted = [r["id"] for r in resources if isinstance(r, dict) and r.get("resourceType") in OWNED_BY_CLAIM
                  and r.get("resourceType") != "Claim" and isinstance(r.get("id"), str)]
        assert exchange.channel is not None
        owners = await self.facts.indexes[self.upstream.name].owners(
            wanted, exchange.channel.config.priority_value, exchange.request_id) if wanted else {}
        foreign = 0
        for resource in resources:
            if not isinstance(resource, dict) or resource.get("resourceType") != self.access.resource_type:
                foreign += 1
                continue
            if resource.get("resourceType") == "Claim":
                facts = owner_facts(resource, snapshot)
            else:
                found = owners.get(str(resource.get("id")))
                facts = owner_facts(found.owner_document() if found is not None else None, snapshot)
            if facility_check(facts, self.principal) is not None:
                foreign += 1
        if foreign:
            self.metrics.dropped.labels(self.access.resource_type, "true").inc(foreign)
            if exchange.authorization_facts is not None:
                exchange.authorization_facts.foreign_entries = foreign
            log.info(JsonEvent.of("authorization.shadow_filter", request_id=exchange.request_id, would_drop=foreign))
