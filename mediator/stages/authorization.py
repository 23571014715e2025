"""Authorization: who may do what (SMART v2 permissions per role), on which health facility's data.

Two parts, kept apart (STYLE rule 2):
* `evaluate` is pure: (rules, principal, access, token scopes, facility facts) → Verdict.
* `AuthorizationStage` gathers the facts that need I/O (the request body, the facility directory, the
  owner of a claim from openIMIS's claim index) and then calls `evaluate`. Searches of facility-bound
  resources are answered by the mediator from the caller's own claims (stages/authorization_search.py).
  Every openIMIS request made here waits for a slot of the upstream's bulkhead, like forwarded ones.

Rules are tried in file order: the first matching `deny` rule denies; the first `allow` rule whose
permission, token scope and facility check all pass allows; a failed check is remembered and the next
rule is tried; nothing allowed → deny with the most specific reason met (default deny).
"""

from __future__ import annotations

import json
import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from mediator.bulkhead import UpstreamGuard
from mediator.claim_index import ClaimIndex, IndexedClaim
from mediator.config import Config
from mediator.config.authorization import (
    ANONYMOUS,
    AuthorizationPolicy,
    AuthorizationRule,
    Permission,
    parse_token_scope,
)
from mediator.facilities import (
    DirectoryUnavailable,
    FacilityDirectory,
    FacilitySnapshot,
    LookupFailed,
    UpstreamFacilityDirectory,
)
from mediator.facility_scope import (
    FACILITY_BOUND,
    OWNED_BY_CLAIM,
    FacilityFacts,
    claim_facts,
    eligibility_facts,
    is_unresolved,
    merge,
    owner_facts,
)
from mediator.fhir import MalformedRequest, parse_fhir_path
from mediator.pipeline import RESPONSE_FILTERS, Decision, Exchange, Principal
from mediator.stages.authorization_search import ScopedSearch, SearchRequest, parse_search
from mediator.upstream import OpenImisUpstream

log = logging.getLogger("mediator.authorization")

NAME = "authorization"
LETTER_BY_INTERACTION = {
    "read": "r", "vread": "r", "history-instance": "r",
    "search-type": "s", "history-type": "s", "search-system": "s",
    "create": "c", "update": "u", "patch": "u", "delete": "d",
    "capabilities": "r",
}
FACILITY_BOUND_COST = 2
"""What a facility-checked read or search of a facility-bound type costs in the rate limit: the openIMIS
requests it may cause (an ownership or index lookup, then the read). Decided by the rule, not by the owner
cache, so the cost says nothing of whether someone polled that claim recently."""


@dataclass(frozen=True, slots=True)
class Access:
    """What a request (or a Bundle entry) asks for, in SMART terms."""

    resource_type: str
    """A FHIR type; "*" for a system-wide search; "CapabilityStatement" for /metadata."""
    letter: str
    query: tuple[tuple[str, str], ...] | None
    """Search parameters; None when unknowable (POST _search), so constrained permissions grant nothing."""
    resource_id: str | None = None

    @property
    def facility_bound(self) -> bool:
        return self.resource_type in FACILITY_BOUND


def access_for(interaction: str, resource_type: str | None, resource_id: str | None,
               query: tuple[tuple[str, str], ...] | None) -> Access | Decision:
    letter = LETTER_BY_INTERACTION.get(interaction)
    if letter is None:
        return Decision.denied(f"{NAME}.operation_not_granted", 403,
                               f"the {interaction} interaction is not granted by any permission")
    if interaction == "capabilities":
        resource_type = "CapabilityStatement"
    return Access(resource_type or "*", letter, query, resource_id)


@dataclass(frozen=True, slots=True)
class Verdict:
    decision: Decision
    rule: AuthorizationRule | None = None
    filter_search: bool = False
    """Allowed, but the answer must be filtered to the caller's facilities."""


def _roles(principal: Principal | None) -> frozenset[str]:
    if principal is None:
        return frozenset({ANONYMOUS})
    return principal.roles - {ANONYMOUS}


def token_permissions(principal: Principal | None) -> tuple[Permission, ...] | None:
    """The token's granted scopes as permissions; None when the principal carries no scope limit.

    Scopes limit a request when the principal has any, and always for auth_method access_token (a
    token that grants nothing grants nothing).
    """
    if principal is None or (not principal.scopes and principal.auth_method != "access_token"):
        return None
    return tuple(p for p in (parse_token_scope(s) for s in sorted(principal.scopes)) if p is not None)


def facility_check(facts: FacilityFacts | None, principal: Principal | None) -> Decision | None:
    """None when every facility the target is bound to is one of the caller's."""
    if facts is None:
        return Decision.denied(f"{NAME}.facility_unverifiable", 403,
                               "the facility of this resource cannot be established")
    if facts.problem is not None:
        return Decision.denied(f"{NAME}.{facts.problem}", facts.status, facts.message)
    caller = principal.health_facilities if principal is not None else frozenset()
    if not caller:
        return Decision.denied(f"{NAME}.no_facility", 403, "the caller is bound to no health facility")
    for field_name, hf in facts.bindings:
        if hf not in caller:
            return Decision.denied(f"{NAME}.{field_name}_other_facility", 403,
                                   f"{field_name} belongs to another health facility")
    return None


def evaluate(rules: tuple[AuthorizationRule, ...], principal: Principal | None, access: Access,
             facts: FacilityFacts | None, *, include_shadow: bool = False) -> Verdict:
    """The pure decision. `facts` are the target's facility facts (None if not gathered)."""
    roles = _roles(principal)
    has_user = principal is not None and principal.user_id is not None
    scopes = token_permissions(principal)
    token_allows = scopes is None or any(
        p.grants(access.resource_type, access.letter, access.query, has_user) for p in scopes)
    pending: Verdict | None = None
    for rule in rules:
        if rule.mode == "shadow" and not include_shadow:
            continue
        if roles.isdisjoint(rule.roles):
            continue
        if not any(p.grants(access.resource_type, access.letter, access.query, has_user)
                   for p in rule.permissions):
            continue
        if rule.effect == "deny":
            return Verdict(Decision.denied(f"{NAME}.denied_by_rule", 403, f"denied by rule {rule.name}"), rule)
        if not token_allows:
            pending = pending or Verdict(Decision.denied(
                f"{NAME}.scope_not_granted", 403, "the access token's scopes do not cover this request"), rule)
            continue
        if rule.checks_facility and access.facility_bound:
            if access.letter == "s":
                return Verdict(Decision.allowed(f"{NAME}.allowed"), rule, filter_search=True)
            refusal = facility_check(facts, principal)
            if refusal is not None:
                pending = pending or Verdict(refusal, rule)
                continue
        return Verdict(Decision.allowed(f"{NAME}.allowed"), rule)
    if pending is not None:
        return pending
    return Verdict(Decision.denied(f"{NAME}.no_matching_rule", 403, "no rule grants this request"))


def needs_facts(rules: tuple[AuthorizationRule, ...], principal: Principal | None, access: Access) -> bool:
    if not access.facility_bound or access.letter == "s":
        return False
    roles = _roles(principal)
    has_user = principal is not None and principal.user_id is not None
    return any(rule.checks_facility and not roles.isdisjoint(rule.roles) and
               any(p.grants(access.resource_type, access.letter, access.query, has_user)
                   for p in rule.permissions) for rule in rules)


class AuthorizationMetrics:
    """The stage's counter table (STYLE rule 11). One per registry: reloads reuse it."""

    _by_registry: weakref.WeakKeyDictionary[CollectorRegistry, AuthorizationMetrics] = \
        weakref.WeakKeyDictionary()

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.shadow = Counter("mediator_authorization_shadow", "Shadow rules that decided a request "
                              "(evaluated and logged, not enforced)", ["rule", "outcome", "enforced"],
                              registry=registry)
        self.dropped = Counter("mediator_authorization_dropped_entries", "Search result entries "
                               "removed because they belong to another health facility",
                               ["resource_type", "shadow"], registry=registry)
        self.lookups = Counter("mediator_authorization_index_requests", "Claim-index (openIMIS GraphQL) "
                               "requests: owner lookups, page indexes, shadow owner batches",
                               ["kind", "outcome"], registry=registry)
        self.search_pages = Counter("mediator_authorization_search_pages", "Facility-scoped search pages "
                                    "served by the mediator", ["resource_type", "outcome"], registry=registry)

    @classmethod
    def for_registry(cls, registry: CollectorRegistry | None) -> AuthorizationMetrics:
        if registry is None:
            return cls(None)
        if registry not in cls._by_registry:
            cls._by_registry[registry] = cls(registry)
        return cls._by_registry[registry]


@dataclass(slots=True)
class _Outcome:
    verdict: Verdict
    shadow: Verdict | None
    facts: FacilityFacts | None
    access: Access | None = None
    entries: list[dict[str, Any]] = field(default_factory=list)
    owner_id: str | None = None
    """The uuid of the claim a read's owner lookup found (a read by code is forwarded by uuid)."""


OWNER_CACHE_SIZE = 10_000


class OwnerCache:
    """Who owns a claim: its `provider` and contained Organizations, per (upstream, claim uuid or code).

    An HMS polls GET ClaimResponse/<id> again and again, and each poll would otherwise cost one more
    openIMIS lookup. The provider of a submitted claim does not change through the
    FHIR API (no channel lets PUT Claim through by default), so the owner is remembered for the facility
    directory's ttl_s; unknown claims are never remembered. Bounded (LRU); per runtime; event-loop only.
    """

    def __init__(self, size: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._entries: OrderedDict[tuple[str, str], tuple[float, Mapping[str, Any]]] = OrderedDict()
        self._size, self._ttl_s, self._clock = size, ttl_s, clock

    def get(self, upstream: str, claim_id: str) -> Mapping[str, Any] | None:
        key = (upstream, claim_id)
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._clock() >= entry[0]:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, upstream: str, claim_id: str, claim: Mapping[str, Any]) -> Mapping[str, Any]:
        # Only what owner_facts reads: the whole claim (items, diagnoses, patient) is not kept in memory.
        owner = {"resourceType": "Claim", "id": claim.get("id"), "provider": claim.get("provider"),
                 "contained": [c for c in claim.get("contained") or () if isinstance(c, dict)
                               and c.get("resourceType") == "Organization"]}
        self._entries[(upstream, claim_id)] = (self._clock() + self._ttl_s, owner)
        self._entries.move_to_end((upstream, claim_id))
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return owner

    def __len__(self) -> int:
        return len(self._entries)


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
        self.owners = OwnerCache(OWNER_CACHE_SIZE, policy.facility_directory.ttl_s)
        spec = policy.facility_directory
        self.indexes = {name: ClaimIndex(upstream, guards[name], spec.graphql_path, spec.timeout_s,
                                         lambda kind, outcome: metrics.lookups.labels(kind, outcome).inc())
                        for name, upstream in upstreams.items()}

    @classmethod
    def from_config(cls, config: Config, upstreams: Mapping[str, OpenImisUpstream],
                    registry: CollectorRegistry | None = None,
                    guards: Mapping[str, UpstreamGuard] | None = None, *,
                    directory: FacilityDirectory | None = None) -> AuthorizationStage:
        """`guards`: the runtime's per-upstream bulkhead + breaker (absent: fresh ones). `directory`:
        absent, the facility directory is read from openIMIS (facility_directory), inside the guard."""
        policy = config.policy("authorization", AuthorizationPolicy)
        spec = policy.facility_directory
        if guards is None:
            guards = {name: UpstreamGuard.build(name, u.bulkhead, u.circuit_breaker)
                      for name, u in config.channels.upstreams.items()}
        if directory is None:
            directory = UpstreamFacilityDirectory(upstreams[spec.upstream], spec.ttl_s, spec.max_stale_s,
                                                  spec.page_size, spec.timeout_s, guards[spec.upstream])
        return cls(policy, directory, upstreams, config.channels.server.limits.max_body_bytes,
                   AuthorizationMetrics.for_registry(registry), guards)

    # --- facts (the I/O edge) -------------------------------------------------------------------

    async def _snapshot(self, max_age_s: float | None = None) -> FacilitySnapshot:
        return await self.directory.snapshot(max_age_s=max_age_s)

    async def _owner_claim(self, upstream: OpenImisUpstream, claim_key: str, request_id: str,
                           priority: int) -> Mapping[str, Any] | None:
        """The owner of the claim whose uuid (else code) is `claim_key`, from openIMIS's claim index:
        one GraphQL request (openIMIS's FHIR `Claim/<code>` read crashes; the index answers both)."""
        cached = self.owners.get(upstream.name, claim_key)
        if cached is not None:
            return cached
        found: IndexedClaim | None = await self.indexes[upstream.name].owner(claim_key, priority, request_id)
        if found is None:
            return None
        return self.owners.put(upstream.name, claim_key, found.owner_document())

    async def gather_facts(self, access: Access, resource: Mapping[str, Any] | None,
                           upstream: OpenImisUpstream, request_id: str, priority: int = 0) -> FacilityFacts:
        """Facility facts for a non-search access to a facility-bound type. Never raises for
        directory or lookup failures: they become problems (fail closed)."""
        return (await self._gather(access, resource, upstream, request_id, priority))[0]

    async def _gather(self, access: Access, resource: Mapping[str, Any] | None, upstream: OpenImisUpstream,
                      request_id: str, priority: int) -> tuple[FacilityFacts, str | None]:
        owner_id: str | None = None
        try:
            owner: Mapping[str, Any] | None = None
            owner_needed = access.resource_type in OWNED_BY_CLAIM and access.letter in "rud"
            claim_id = access.resource_id
            if access.resource_type == "ClaimResponse" and claim_id is None and resource is not None:
                claim_id = resource.get("id") if isinstance(resource.get("id"), str) else None
                owner_needed = True
            if owner_needed:
                if claim_id is None:
                    return FacilityFacts.failed("owner_unresolved", "no claim id to check"), None
                owner = await self._owner_claim(upstream, claim_id, request_id, priority)
                owner_id = owner.get("id") if owner is not None and isinstance(owner.get("id"), str) else None
            snapshot = await self._snapshot()
            facts = self._facts_from(access, resource, owner, owner_needed, snapshot)
            refresh_after = self.policy.facility_directory.refresh_on_miss_after_s
            if is_unresolved(facts):
                fresher = await self._snapshot(max_age_s=refresh_after)
                if fresher is not snapshot:
                    facts = self._facts_from(access, resource, owner, owner_needed, fresher)
            return facts, owner_id
        except DirectoryUnavailable:
            return FacilityFacts.failed("directory_unavailable", "the facility directory is unavailable", 503), None
        except LookupFailed as exc:
            log.warning("ownership lookup failed, request %s: %s", request_id, exc)
            return FacilityFacts.failed("lookup_failed", "openIMIS did not answer the ownership lookup", 502), None

    @staticmethod
    def _facts_from(access: Access, resource: Mapping[str, Any] | None, owner: Mapping[str, Any] | None,
                    owner_needed: bool, snapshot: FacilitySnapshot) -> FacilityFacts:
        parts: list[FacilityFacts] = []
        if owner_needed:
            parts.append(owner_facts(owner, snapshot))
        if access.letter in "cu" and access.resource_type == "Claim":
            if resource is None:
                return FacilityFacts.failed("facility_unverifiable", "the claim body cannot be read")
            parts.append(claim_facts(resource, snapshot))
        elif access.letter == "c" and access.resource_type == "CoverageEligibilityRequest":
            if resource is None:
                return FacilityFacts.failed("facility_unverifiable", "the request body cannot be read")
            parts.append(eligibility_facts(resource, snapshot))
        if not parts:
            return FacilityFacts.failed("facility_unverifiable",
                                        f"{access.resource_type} {access.letter} cannot be tied to a facility")
        return merge(*parts)

    # --- deciding ----------------------------------------------------------------------------------

    async def _decide(self, principal: Principal | None, access: Access, resource: Mapping[str, Any] | None,
                      upstream: OpenImisUpstream, request_id: str, priority: int = 0) -> _Outcome:
        facts: FacilityFacts | None = None
        owner_id: str | None = None
        if needs_facts(self.rules, principal, access):
            facts, owner_id = await self._gather(access, resource, upstream, request_id, priority)
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
        log.info(json.dumps({"event": "authorization.shadow", "request_id": request_id,
                             "rule": shadow.rule.name, "would": outcome, "reason": shadow.decision.reason,
                             "enforced": actual}, separators=(",", ":")))

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
            exchange.attributes.setdefault(RESPONSE_FILTERS, []).append(
                SearchResultFilter(self, outcome.access, principal, upstream, shadow=True))
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
        # A search is judged (and scoped) on the parameters the search stage kept: the ones that are used.
        query = None if request.method == "POST" and fhir.interaction == "search-type" else \
            exchange.search.used if exchange.search is not None else tuple(request.query.items())
        access = access_for(fhir.interaction, fhir.resource_type, fhir.resource_id, query)
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
        record: dict[str, Any] = {
            "decision": "allow" if verdict.decision.allow else "deny",
            "reason": verdict.decision.reason,
            "rule": verdict.rule.name if verdict.rule else None,
            "client": principal.client_id if principal else None,
            "user": principal.user_key if principal else None,  # namespaced by its voucher
            "caller_facilities": sorted(principal.health_facilities) if principal else [],
            "resource_type": fhir.resource_type if fhir else None,
            "resource_id": fhir.resource_id if fhir else None,
            "target_facilities": sorted(outcome.facts.facilities) if outcome.facts else [],
            "filtered": verdict.filter_search,
        }
        if outcome.shadow is not None and outcome.shadow.rule is not None:
            record["shadow"] = {"rule": outcome.shadow.rule.name,
                                "decision": "allow" if outcome.shadow.decision.allow else "deny",
                                "reason": outcome.shadow.decision.reason}
        if outcome.entries:
            record["entries"] = outcome.entries
        exchange.attributes["authz"] = record


class SearchResultFilter:
    """Count-only check of a forwarded search answer (a shadow facility rule ahead of an enforced
    `facility_scope: any` rule): counts and logs the entries the facility rule would remove, returns the
    answer unchanged. The owners of a page's ClaimResponse / CommunicationRequest entries come from one
    claim-index request (inside the bulkhead), not one lookup per entry. Enforced facility-bound
    searches never come here: they are answered from the caller's own claims (authorization_search).
    """

    def __init__(self, stage: AuthorizationStage, access: Access | None, principal: Principal | None,
                 upstream: OpenImisUpstream, *, shadow: bool) -> None:
        self.stage = stage
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
            log.exception("shadow search result check failed, request %s", exchange.request_id)
        return response

    async def _count(self, exchange: Exchange, response: web.StreamResponse) -> None:
        assert isinstance(response, web.Response) and self.access is not None
        body = response.body
        if not isinstance(body, bytes | bytearray):
            raise TypeError("answer body is not buffered")
        document = json.loads(body)
        if not isinstance(document, dict):
            raise TypeError("unexpected answer to a search")
        if document.get("resourceType") == "Bundle":
            resources = [e.get("resource") if isinstance(e, dict) else None for e in document.get("entry") or ()]
        elif document.get("resourceType") == self.access.resource_type:
            resources = [document]   # openIMIS answers ?identifier= with the bare resource
        else:
            return
        snapshot = await self.stage._snapshot()
        wanted = [r["id"] for r in resources if isinstance(r, dict) and r.get("resourceType") in OWNED_BY_CLAIM
                  and r.get("resourceType") != "Claim" and isinstance(r.get("id"), str)]
        assert exchange.channel is not None
        owners = await self.stage.indexes[self.upstream.name].owners(
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
            self.stage.metrics.dropped.labels(self.access.resource_type, "true").inc(foreign)
            exchange.attributes.setdefault("authz", {})["foreign_entries"] = foreign
            log.info(json.dumps({"event": "authorization.shadow_filter", "request_id": exchange.request_id,
                                 "would_drop": foreign}, separators=(",", ":")))
