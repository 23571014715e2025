"""Authorization, the stage glue: who may do what (SMART v2 permissions per role), on which facility.

Split by job (STYLE rule 2):
* stages/authorization_policy.py: the pure decision (`evaluate`: rules, principal, access, token
  scopes, facility facts → Verdict);
* stages/authorization_facts.py: the facts that need I/O (facility directory, a claim's owner from
  openIMIS's claim index), per resource type as `facility_scope.FACILITY_BINDINGS` declares;
* stages/authorization_filter.py: the count-only check of a forwarded search answer;
* stages/authorization_search.py: facility-bound searches answered from the caller's own claims;
* here: the stage, Bundles, the rate-limit cost, audit facts and metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from prometheus_client import CollectorRegistry

from mediator.bulkhead import UpstreamGuard
from mediator.claim_index import ClaimIndex
from mediator.config import Config
from mediator.config.authorization import (
    AuthorizationPolicy,
)
from mediator.facilities import (
    DirectoryUnavailable,
    FacilityDirectory,
    FacilitySnapshot,
    FacilitySource,
    UpstreamFacilityDirectory,
)
from mediator.facility_scope import (
    OWNED_BY_CLAIM,
    FacilityFacts,
    owner_facts,
)
from mediator.fhir import MalformedRequest, parse_fhir_path
from mediator.logs import JsonEvent
from mediator.metrics import AuthorizationMetrics
from mediator.pipeline import AuthorizationFacts, Decision, Exchange, Principal
from mediator.stages.authorization_facts import FacilityFactFinder
from mediator.stages.authorization_filter import SearchResultFilter
from mediator.stages.authorization_policy import (
    FACILITY_BOUND_COST,
    NAME,
    Access,
    Verdict,
    access_for,
    access_of,
    evaluate,
    facility_check,
    needs_facts,
)
from mediator.stages.authorization_search import ScopedSearch, SearchRequest, parse_search
from mediator.upstream import OpenImisUpstream

log = logging.getLogger("mediator.authorization")


@dataclass(slots=True)
class _Outcome:
    verdict: Verdict
    shadow: Verdict | None
    facts: FacilityFacts | None
    access: Access | None = None
    entries: list[dict[str, Any]] = field(default_factory=list)
    owner_id: str | None = None
    """The uuid of the claim a read's owner lookup found (a read by code is forwarded by uuid)."""


class AuthorizationStage:
    """Pipeline stage "authorization". Built once per runtime; safe for concurrent requests."""

    name = NAME

    def __init__(self, policy: AuthorizationPolicy, directory: FacilityDirectory,
                 upstreams: Mapping[str, OpenImisUpstream], max_body_bytes: int,
                 metrics: AuthorizationMetrics, guards: Mapping[str, UpstreamGuard]) -> None:
        self.policy = policy
        self.rules = policy.rules
        self.directory = directory
        self.upstreams = upstreams
        self.guards = guards
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        spec = policy.facility_directory
        self.indexes = {name: ClaimIndex(upstream, guards[name], spec.graphql_path, spec.timeout_s,
                                         lambda kind, outcome: metrics.lookups.labels(kind, outcome).inc())
                        for name, upstream in upstreams.items()}
        self.facts = FacilityFactFinder(directory, self.indexes, spec.ttl_s, spec.refresh_on_miss_after_s)

    @classmethod
    def from_config(cls, config: Config, upstreams: Mapping[str, OpenImisUpstream],
                    registry: CollectorRegistry | None = None,
                    guards: Mapping[str, UpstreamGuard] | None = None, *,
                    directory: FacilityDirectory | None = None,
                    source: FacilitySource | None = None) -> AuthorizationStage:
        """`guards`: the runtime's per-upstream bulkhead + breaker (absent: fresh ones). `directory`:
        absent, the facility directory is read from openIMIS (facility_directory), inside the guard."""
        policy = config.policy("authorization", AuthorizationPolicy)
        spec = policy.facility_directory
        if guards is None:
            guards = {name: UpstreamGuard.build(name, u.bulkhead, u.circuit_breaker)
                      for name, u in config.channels.upstreams.items()}
        if directory is None:
            directory = UpstreamFacilityDirectory(upstreams[spec.upstream], spec.ttl_s, spec.max_stale_s,
                                                  spec.page_size, spec.timeout_s, guards[spec.upstream], source)
        return cls(policy, directory, upstreams, config.channels.server.limits.max_body_bytes,
                   AuthorizationMetrics.for_registry(registry), guards)

    # --- facts (the I/O edge: stages/authorization_facts.py) -------------------------------------

    async def _snapshot(self, max_age_s: float | None = None) -> FacilitySnapshot:
        return await self.facts.snapshot(max_age_s)

    async def gather_facts(self, access: Access, resource: Mapping[str, Any] | None,
                           upstream: OpenImisUpstream, request_id: str, priority: int = 0) -> FacilityFacts:
        """Facility facts for a non-search access to a facility-bound type (fail closed)."""
        return (await self.facts.gather(access, resource, upstream, request_id, priority))[0]

    # --- deciding ----------------------------------------------------------------------------------

    async def _decide(self, principal: Principal | None, access: Access, resource: Mapping[str, Any] | None,
                      upstream: OpenImisUpstream, request_id: str, priority: int = 0) -> _Outcome:
        facts: FacilityFacts | None = None
        owner_id: str | None = None
        if needs_facts(self.rules, principal, access):
            facts, owner_id = await self.facts.gather(access, resource, upstream, request_id, priority)
        verdict = evaluate(self.rules, principal, access, facts)
        shadow: Verdict | None = None
        if any(r.mode == "shadow" for r in self.rules):
            candidate = evaluate(self.rules, principal, access, facts, include_shadow=True)
            if candidate.rule is not None and candidate.rule.mode == "shadow":
                shadow = candidate
                self._count_shadow(shadow, verdict, request_id)
        return _Outcome(verdict, shadow, facts, access, owner_id=owner_id)

    def _count_shadow(self, shadow: Verdict, enforced: Verdict, request_id: str) -> None:
        assert shadow.rule is not None
        outcome = "allow" if shadow.decision.allow else "deny"
        actual = "allow" if enforced.decision.allow else "deny"
        self.metrics.shadow.labels(shadow.rule.name, outcome, actual).inc()
        log.info(JsonEvent.of("authorization.shadow", request_id=request_id, rule=shadow.rule.name, would=outcome,
                              reason=shadow.decision.reason, enforced=actual))

    async def check_entry(self, principal: Principal | None, method: str, url: str,
                          resource: Mapping[str, Any] | None, *, request_id: str = "entry",
                          upstream: str | None = None) -> Decision:
        """Decide one Bundle entry (or one request split out of a bulk submission), as the live stage
        would decide the same request on its own. A coroutine; safe to call concurrently."""
        return (await self._check_entry(principal, method, url, resource, request_id, upstream)).verdict.decision

    async def _check_entry(self, principal: Principal | None, method: str, url: str,
                           resource: Mapping[str, Any] | None, request_id: str,
                           upstream_name: str | None) -> _Outcome:
        parts = urlsplit(url)
        if parts.scheme or parts.netloc or parts.fragment:
            return _Outcome(Verdict(Decision.denied(f"{NAME}.bundle_entry_malformed", 400,
                                                    "entry.request.url must be a relative FHIR URL")), None, None)
        try:
            fhir = parse_fhir_path(method.upper(), parts.path)
        except MalformedRequest as exc:
            return _Outcome(Verdict(Decision.denied(f"{NAME}.bundle_entry_malformed", 400, str(exc))), None, None)
        if fhir.interaction == "batch-or-transaction":
            return _Outcome(Verdict(Decision.denied(f"{NAME}.bundle_entry_malformed", 400,
                                                    "a Bundle entry cannot be another batch")), None, None)
        query = tuple(parse_qsl(parts.query, keep_blank_values=True))
        access = access_for(fhir.interaction, fhir.resource_type, fhir.resource_id, query)
        if isinstance(access, Decision):
            return _Outcome(Verdict(access), None, None)
        if resource is not None and access.letter in "cu" and resource.get("resourceType") != access.resource_type:
            return _Outcome(Verdict(Decision.denied(f"{NAME}.bundle_entry_malformed", 400,
                                                    "entry.resource does not match entry.request.url")), None, None)
        upstream = self.upstreams[upstream_name or self.policy.facility_directory.upstream]
        outcome = await self._decide(principal, access, resource, upstream, request_id)
        if outcome.verdict.filter_search or (outcome.shadow is not None and outcome.shadow.filter_search):
            # SECURITY: the answers to searches inside a batch are not filtered; refuse them instead.
            outcome.verdict = Verdict(Decision.denied(f"{NAME}.search_in_bundle", 403,
                                                      "searches of facility-bound resources cannot be batched"),
                                      outcome.verdict.rule)
        return outcome

    async def run(self, exchange: Exchange) -> Decision:
        fhir = exchange.fhir
        channel = exchange.channel
        assert fhir is not None and channel is not None   # the channel stage ran and allowed
        principal = exchange.principal
        upstream = self.upstreams[channel.config.upstream]
        if fhir.interaction == "batch-or-transaction":
            outcome = await self._run_bundle(exchange, principal, channel.config.upstream)
        else:
            outcome = await self._run_single(exchange, principal, upstream)
            if outcome.verdict.decision.allow and outcome.verdict.filter_search:
                outcome.verdict = await self._scope_search(exchange, principal, outcome, upstream)
        self._annotate(exchange, principal, outcome)
        verdict = outcome.verdict
        access = outcome.access
        owner_checked = outcome.facts is not None and access is not None and \
            access.resource_type in OWNED_BY_CLAIM and access.letter in "rud"
        if verdict.decision.allow and (verdict.filter_search or owner_checked):
            exchange.upstream_cost = FACILITY_BOUND_COST   # the facility check's lookup + the request itself
        if verdict.decision.allow and access is not None and access.resource_type == "Claim" and \
                access.letter == "r" and outcome.owner_id is not None and outcome.owner_id != access.resource_id:
            exchange.upstream_path = f"Claim/{outcome.owner_id}"   # openIMIS's Claim/<code> read crashes
        filter_shadow = outcome.shadow is not None and outcome.shadow.filter_search and not verdict.filter_search
        if verdict.decision.allow and filter_shadow:
            exchange.response_filters.append(SearchResultFilter(self.facts, self.metrics, outcome.access, principal,
                                                                upstream, shadow=True))
        return verdict.decision

    async def _scope_search(self, exchange: Exchange, principal: Principal | None, outcome: _Outcome,
                            upstream: OpenImisUpstream) -> Verdict:
        """An allowed search of a facility-bound type: answered by the mediator from the caller's claims."""
        access = outcome.access
        assert access is not None and exchange.channel is not None
        rule = outcome.verdict.rule
        if exchange.fhir is None or exchange.fhir.interaction != "search-type":
            return Verdict(Decision.denied(f"{NAME}.search_not_scopable", 403,
                                           "only searches of facility-bound types can be limited to the caller's "
                                           "health facility, not their history"), rule)
        parsed = parse_search(access.resource_type, access.query, self.policy.search_results.max_page_size)
        if not isinstance(parsed, SearchRequest):
            return Verdict(parsed, rule)
        facilities = sorted(principal.health_facilities) if principal is not None else []
        if len(facilities) != 1:
            return Verdict(Decision.denied(f"{NAME}.search_facility_ambiguous", 403,
                                           "a facility-bound search needs a caller bound to exactly one "
                                           "health facility"), rule)
        try:
            snapshot = await self._snapshot()
        except DirectoryUnavailable:
            return Verdict(Decision.denied(f"{NAME}.directory_unavailable", 503,
                                           "the facility directory is unavailable"), rule)
        facility_uuid = snapshot.uuid_of_facility(facilities[0])
        if facility_uuid is None:
            return Verdict(Decision.denied(f"{NAME}.facility_unverifiable", 403,
                                           "the caller's health facility is not in the directory"), rule)

        def entry_ok(resource: Mapping[str, Any]) -> bool:
            # The index chose the entries; a Claim also carries its provider, checked once more.
            if resource.get("resourceType") != "Claim":
                return True
            return facility_check(owner_facts(resource, snapshot), principal) is None

        guard = self.guards[upstream.name]
        exchange.served_by = ScopedSearch(parsed, facility_uuid, self.indexes[upstream.name], upstream, guard,
                                          self.policy.search_results.window_entries, entry_ok,
                                          lambda rtype, result: self.metrics.search_pages.labels(rtype, result).inc())
        return outcome.verdict

    async def _resource_of(self, exchange: Exchange) -> tuple[dict[str, Any] | None, Decision | None]:
        # The request stage (before this one) parsed the body once; no body here means it was not sent.
        if exchange.body is None:
            return None, Decision.denied(f"{NAME}.unreadable_body", 400, "the request has no JSON body")
        return exchange.body.document, None

    async def _run_single(self, exchange: Exchange, principal: Principal | None,
                          upstream: OpenImisUpstream) -> _Outcome:
        fhir = exchange.fhir
        assert fhir is not None
        request = exchange.request
        access = access_of(exchange)
        if isinstance(access, Decision):
            return _Outcome(Verdict(access), None, None)
        resource = None
        if request.method in ("POST", "PUT", "PATCH") and access.letter in "cu" and access.facility_bound and \
                needs_facts(self.rules, principal, access):
            if request.method == "PATCH":
                return _Outcome(Verdict(Decision.denied(f"{NAME}.facility_unverifiable", 403,
                                                        "a patch of a facility-bound resource cannot be checked")),
                                None, None, access)
            resource, refusal = await self._resource_of(exchange)
            if refusal is not None:
                return _Outcome(Verdict(refusal), None, None, access)
        assert exchange.channel is not None
        return await self._decide(principal, access, resource, upstream, exchange.request_id,
                                  exchange.channel.config.priority_value)

    async def _run_bundle(self, exchange: Exchange, principal: Principal | None,
                          upstream_name: str) -> _Outcome:
        bundle, refusal = await self._resource_of(exchange)
        if refusal is not None:
            return _Outcome(Verdict(refusal), None, None)
        assert bundle is not None
        entries = bundle.get("entry") or []
        if bundle.get("resourceType") != "Bundle" or bundle.get("type") not in ("batch", "transaction") or \
                not isinstance(entries, list):
            return _Outcome(Verdict(Decision.denied(f"{NAME}.bundle_malformed", 400,
                                                    "POST to the base must be a batch or transaction Bundle")),
                            None, None)
        records: list[dict[str, Any]] = []
        first_denial: tuple[int, _Outcome] | None = None
        last: _Outcome | None = None
        for index, entry in enumerate(entries):
            request = entry.get("request") if isinstance(entry, dict) else None
            if not isinstance(request, dict) or not isinstance(request.get("method"), str) or \
                    not isinstance(request.get("url"), str):
                return _Outcome(Verdict(Decision.denied(f"{NAME}.bundle_entry_malformed", 400,
                                                        f"entry {index} has no request.method and request.url")),
                                None, None)
            resource = entry.get("resource")
            outcome = await self._check_entry(principal, request["method"], request["url"],
                                              resource if isinstance(resource, dict) else None,
                                              exchange.request_id, upstream_name)
            last = outcome
            records.append({"index": index, "reason": outcome.verdict.decision.reason,
                            "rule": outcome.verdict.rule.name if outcome.verdict.rule else None,
                            "facilities": sorted(outcome.facts.facilities) if outcome.facts else []})
            if not outcome.verdict.decision.allow and first_denial is None:
                first_denial = (index, outcome)
        if first_denial is not None:
            index, outcome = first_denial
            denial = outcome.verdict.decision
            # Any denied entry denies the whole Bundle: a transaction is atomic, and a batch forwarded
            # with a refused entry removed would answer for entries the client did not send that way.
            verdict = Verdict(Decision.denied(denial.reason, denial.status, f"entry {index}: {denial.message}"),
                              outcome.verdict.rule)
            return _Outcome(verdict, None, outcome.facts, entries=records)
        if last is None:
            return _Outcome(Verdict(Decision.denied(f"{NAME}.bundle_malformed", 400, "the Bundle has no entries")),
                            None, None)
        return _Outcome(Verdict(Decision.allowed(f"{NAME}.allowed"), None), None, None, entries=records)

    @staticmethod
    def _annotate(exchange: Exchange, principal: Principal | None, outcome: _Outcome) -> None:
        """Authorization facts for the audit record. Never tokens, claims or bodies."""
        fhir = exchange.fhir
        verdict = outcome.verdict
        record = AuthorizationFacts(
            decision="allow" if verdict.decision.allow else "deny",
            reason=verdict.decision.reason,
            rule=verdict.rule.name if verdict.rule else None,
            client=principal.client_id if principal else None,
            user=principal.user_key if principal else None,  # namespaced by its voucher
            caller_facilities=sorted(principal.health_facilities) if principal else [],
            resource_type=fhir.resource_type if fhir else None,
            resource_id=fhir.resource_id if fhir else None,
            target_facilities=sorted(outcome.facts.facilities) if outcome.facts else [],
            filtered=verdict.filter_search,
            entries=outcome.entries)
        if outcome.shadow is not None and outcome.shadow.rule is not None:
            record.shadow = {"rule": outcome.shadow.rule.name,
                             "decision": "allow" if outcome.shadow.decision.allow else "deny",
                             "reason": outcome.shadow.decision.reason}
        exchange.authorization_facts = record
        if outcome.facts is not None and len(outcome.facts.facilities) == 1:
            (exchange.facility,) = outcome.facts.facilities


