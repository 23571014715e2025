"""Charge to the rate limit, before authorization, the requests for which authorization itself sends
requests to openIMIS.

The rate-limit stage runs last: a request's cost and its `health_facility` key follow what authorization
resolved (the facility a claim is submitted for). But to check a read, update or delete of a claim-bound
resource (Claim, ClaimResponse, CommunicationRequest) authorization first asks openIMIS's claim index which
claim owns it, and a batch Bundle's entries are checked one by one, lookups included; charged only after
authorization, such requests would be free whenever authorization refuses them (a read of an unknown claim
is 404 `authorization.owner_not_found`): a flood of them would reach openIMIS uncounted. So they are
charged here, at their declared cost (2 for a lookup read: the lookup and the read; one per entry for a
batch), with the keys known before authorization (`health_facility`: the principal's facilities, as one
key); a refusal is the rate limit's 429 `rate_limit.exceeded`, and no lookup is sent. Which requests: by the
rules (`authorization_policy.looks_up_owner`), never by the owner cache, so the charge does not tell
whether someone polled that claim recently. Everything else is charged by the rate-limit stage.
"""

from __future__ import annotations

from mediator.config.authorization import AuthorizationRule
from mediator.pipeline import Decision, Exchange
from mediator.stages.authorization_policy import FACILITY_BOUND_COST, access_of, looks_up_owner
from mediator.stages.rate_limit import RateLimitStage

LATER = Decision.allowed("lookup_charge.charged_later")


class LookupChargeStage:
    name = "lookup_charge"

    def __init__(self, rate_limit: RateLimitStage, rules: tuple[AuthorizationRule, ...]) -> None:
        self.rate_limit = rate_limit
        self.rules = rules

    async def run(self, exchange: Exchange) -> Decision:
        fhir = exchange.fhir
        if fhir is None:
            return LATER
        if fhir.interaction != "batch-or-transaction":
            access = access_of(exchange)
            if isinstance(access, Decision) or not looks_up_owner(self.rules, exchange.principal, access):
                return LATER
            exchange.upstream_cost = FACILITY_BOUND_COST
        exchange.charged_before_lookup = True
        return await self.rate_limit.charge(exchange)
