"""Authorization: who may do what (SMART v2 permissions per role), on which health facility's data.

Two parts, kept apart (STYLE rule 2):
* `evaluate` is pure: (rules, principal, access, token scopes, facility facts) → Verdict.
* `AuthorizationStage` gathers the facts that need I/O (the request body, the facility directory, the
  Claim that owns a ClaimResponse) and then calls `evaluate`. Searches of facility-bound resources are
  allowed here and filtered after openIMIS answers (openIMIS has no facility search parameter).

Rules are tried in file order: the first matching `deny` rule denies; the first `allow` rule whose
permission, token scope and facility check all pass allows; a failed check is remembered and the next
rule is tried; nothing allowed → deny with the most specific reason met (default deny).
"""

from __future__ import annotations

import asyncio
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
    fetch_json,
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
from mediator.fhir import MalformedRequest, operation_outcome_response, parse_fhir_path
from mediator.pipeline import RESPONSE_FILTERS, Decision, Exchange, Principal
from mediator.upstream import OpenImisUpstream

log = logging.getLogger("mediator.authorization")

NAME = "authorization"
LETTER_BY_INTERACTION = {
    "read": "r", "vread": "r", "history-instance": "r",
    "search-type": "s", "history-type": "s", "search-system": "s",
    "create": "c", "update": "u", "patch": "u", "delete": "d",
    "capabilities": "r",
}
OWNER_LOOKUP_CONCURRENCY = 8


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


def _is_not_found_outcome(document: Any) -> bool:
    """openIMIS answers an unknown claim id with 500 "failed to retrieve Claim ..." (tests/openimis README)."""
    if not isinstance(document, dict) or document.get("resourceType") != "OperationOutcome":
        return False
    texts = [str((issue.get("details") or {}).get("text", "")) for issue in document.get("issue") or ()
             if isinstance(issue, dict)]
    return any("failed to retrieve" in text or "does not exist" in text for text in texts)


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


OWNER_CACHE_SIZE = 10_000


class OwnerCache:
    """Who owns a claim: its `provider` and contained Organizations, per (upstream, claim id).

    An HMS polls GET ClaimResponse/<id> again and again, and each poll would otherwise cost one more
    openIMIS Claim read (~40 ms measured). The provider of a submitted claim does not change through the
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
                 metrics: AuthorizationMetrics) -> None:
        self.policy = policy
        self.rules = policy.rules
        self.directory = directory
        self.upstreams = upstreams
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.owners = OwnerCache(OWNER_CACHE_SIZE, policy.facility_directory.ttl_s)

    @classmethod
    def from_config(cls, config: Config, upstreams: Mapping[str, OpenImisUpstream],
                    registry: CollectorRegistry | None = None) -> AuthorizationStage:
        policy = config.policy("authorization", AuthorizationPolicy)
        spec = policy.facility_directory
        directory = UpstreamFacilityDirectory(upstreams[spec.upstream], spec.ttl_s, spec.max_stale_s,
                                              spec.page_size, spec.timeout_s)
        return cls(policy, directory, upstreams, config.channels.server.limits.max_body_bytes,
                   AuthorizationMetrics.for_registry(registry))

    # --- facts (the I/O edge) -------------------------------------------------------------------

    async def _snapshot(self, max_age_s: float | None = None) -> FacilitySnapshot:
        return await self.directory.snapshot(max_age_s=max_age_s)

    async def _owner_claim(self, upstream: OpenImisUpstream, claim_id: str,
                           request_id: str) -> Mapping[str, Any] | None:
        cached = self.owners.get(upstream.name, claim_id)
        if cached is not None:
            return cached
        status, claim = await fetch_json(upstream, f"Claim/{claim_id}", "",
                                         self.policy.facility_directory.timeout_s, request_id)
        if status == 404 or (status == 500 and _is_not_found_outcome(claim)):
            return None
        if status != 200 or not isinstance(claim, dict) or claim.get("resourceType") != "Claim":
            raise LookupFailed(f"Claim lookup answered {status}")
        return self.owners.put(upstream.name, claim_id, claim)

    async def gather_facts(self, access: Access, resource: Mapping[str, Any] | None,
                           upstream: OpenImisUpstream, request_id: str) -> FacilityFacts:
        """Facility facts for a non-search access to a facility-bound type. Never raises for
        directory or lookup failures: they become problems (fail closed)."""
        try:
            owner: Mapping[str, Any] | None = None
            owner_needed = access.resource_type in OWNED_BY_CLAIM and access.letter in "rud"
            claim_id = access.resource_id
            if access.resource_type == "ClaimResponse" and claim_id is None and resource is not None:
                claim_id = resource.get("id") if isinstance(resource.get("id"), str) else None
                owner_needed = True
            if owner_needed:
                if claim_id is None:
                    return FacilityFacts.failed("owner_unresolved", "no claim id to check")
                owner = await self._owner_claim(upstream, claim_id, request_id)
            snapshot = await self._snapshot()
            facts = self._facts_from(access, resource, owner, owner_needed, snapshot)
            refresh_after = self.policy.facility_directory.refresh_on_miss_after_s
            if is_unresolved(facts):
                fresher = await self._snapshot(max_age_s=refresh_after)
                if fresher is not snapshot:
                    facts = self._facts_from(access, resource, owner, owner_needed, fresher)
            return facts
        except DirectoryUnavailable:
            return FacilityFacts.failed("directory_unavailable", "the facility directory is unavailable", 503)
        except LookupFailed:
            return FacilityFacts.failed("lookup_failed", "openIMIS did not answer the ownership lookup", 502)

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
                      upstream: OpenImisUpstream, request_id: str) -> _Outcome:
        facts: FacilityFacts | None = None
        if needs_facts(self.rules, principal, access):
            facts = await self.gather_facts(access, resource, upstream, request_id)
        verdict = evaluate(self.rules, principal, access, facts)
        shadow: Verdict | None = None
        if any(r.mode == "shadow" for r in self.rules):
            candidate = evaluate(self.rules, principal, access, facts, include_shadow=True)
            if candidate.rule is not None and candidate.rule.mode == "shadow":
                shadow = candidate
                self._count_shadow(shadow, verdict, request_id)
        return _Outcome(verdict, shadow, facts, access)

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
        self._annotate(exchange, principal, outcome)
        verdict = outcome.verdict
        filter_shadow = outcome.shadow is not None and outcome.shadow.filter_search and not verdict.filter_search
        if verdict.decision.allow and (verdict.filter_search or filter_shadow):
            exchange.attributes.setdefault(RESPONSE_FILTERS, []).append(
                SearchResultFilter(self, outcome.access, principal, upstream, shadow=filter_shadow))
        return verdict.decision

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
        query = None if request.method == "POST" and fhir.interaction == "search-type" else \
            tuple(request.query.items())
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
        return await self._decide(principal, access, resource, upstream, exchange.request_id)

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
    """Removes (or refuses) search results of facility-bound types that are not the caller's.

    Runs on openIMIS's answer before it reaches the client. Fails closed: an answer it cannot check
    becomes a 500 OperationOutcome, never a pass-through.
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
            return await self._filter(exchange, response)
        except Exception:   # SECURITY: a filter that cannot run must not let the answer through
            log.exception("search result filter failed, request %s", exchange.request_id)
            if self.shadow:
                return response
            exchange.decisions.append((NAME, Decision.denied(f"{NAME}.filter_failed", 500, "")))
            return operation_outcome_response(500, f"{NAME}.filter_failed",
                                              f"the answer could not be checked; quote request id "
                                              f"{exchange.request_id}")

    async def _allowed(self, resource: Any, snapshot: FacilitySnapshot, request_id: str,
                       limiter: asyncio.Semaphore) -> bool:
        assert self.access is not None
        if not isinstance(resource, dict) or resource.get("resourceType") != self.access.resource_type:
            return False   # only the searched type may come back from a facility-bound search
        if resource.get("resourceType") == "Claim":
            facts = owner_facts(resource, snapshot)
        elif resource.get("resourceType") in OWNED_BY_CLAIM and isinstance(resource.get("id"), str):
            async with limiter:
                owner = await self.stage._owner_claim(self.upstream, resource["id"], request_id)
            facts = owner_facts(owner, snapshot)
        else:
            return False
        return facility_check(facts, self.principal) is None

    async def _filter(self, exchange: Exchange, response: web.StreamResponse) -> web.StreamResponse:
        assert isinstance(response, web.Response) and self.access is not None
        body = response.body
        if not isinstance(body, bytes | bytearray):
            raise TypeError("answer body is not buffered")
        document = json.loads(body)
        snapshot = await self.stage._snapshot()
        limiter = asyncio.Semaphore(OWNER_LOOKUP_CONCURRENCY)
        foreign_mode = self.stage.policy.search_results.foreign_entries
        if isinstance(document, dict) and document.get("resourceType") == "Bundle":
            entries = document.get("entry") or []
            if not isinstance(entries, list):
                raise TypeError("Bundle.entry is not a list")
            verdicts = await asyncio.gather(*(
                self._allowed(e.get("resource") if isinstance(e, dict) else None, snapshot,
                              exchange.request_id, limiter) for e in entries))
            foreign = verdicts.count(False)
            if foreign == 0:
                return response
            self.stage.metrics.dropped.labels(self.access.resource_type, str(self.shadow).lower()).inc(foreign)
            exchange.attributes.setdefault("authz", {})["foreign_entries"] = foreign
            if self.shadow:
                log.info(json.dumps({"event": "authorization.shadow_filter", "request_id": exchange.request_id,
                                     "would_drop": foreign}, separators=(",", ":")))
                return response
            if foreign_mode == "deny":
                return self._deny(exchange, "the answer holds resources of other health facilities")
            document["entry"] = [e for e, ok in zip(entries, verdicts, strict=True) if ok]
            document.pop("total", None)   # the unfiltered count would leak other facilities' volume
        elif isinstance(document, dict) and document.get("resourceType") == self.access.resource_type:
            # openIMIS answers ?identifier= with the bare resource, not a Bundle.
            if await self._allowed(document, snapshot, exchange.request_id, limiter):
                return response
            self.stage.metrics.dropped.labels(self.access.resource_type, str(self.shadow).lower()).inc()
            if self.shadow:
                return response
            return self._deny(exchange, "the resource belongs to another health facility")
        elif isinstance(document, dict) and document.get("resourceType") == "OperationOutcome":
            return response
        else:
            raise TypeError("unexpected answer to a search")
        new = web.Response(status=response.status, content_type=response.content_type,
                           charset=response.charset,
                           body=json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode())
        for key, value in response.headers.items():
            if key.lower() not in ("content-length", "content-type", "etag"):
                new.headers[key] = value
        return new

    @staticmethod
    def _deny(exchange: Exchange, message: str) -> web.Response:
        exchange.decisions.append((NAME, Decision.denied(f"{NAME}.search_entry_denied", 403, message)))
        return operation_outcome_response(403, f"{NAME}.search_entry_denied", message)
