"""Authorization, the pure part: who may do what (SMART v2 permissions per role), on which facility.

`evaluate` is pure: (rules, principal, access, token scopes, facility facts) → Verdict. Rules are tried
in file order: the first matching `deny` rule denies; the first `allow` rule whose permission, token
scope and facility check all pass allows; a failed check is remembered and the next rule is tried;
nothing allowed → deny with the most specific reason met (default deny).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from mediator.config.authorization import ANONYMOUS, AuthorizationRule, Permission, parse_token_scope
from mediator.facility_scope import FACILITY_BINDINGS, FACILITY_BOUND, FacilityFacts
from mediator.pipeline import Decision, Exchange, Principal

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


def access_of(exchange: Exchange) -> Access | Decision:
    """The access a (non-batch) request asks for. A search is judged on the parameters the search stage kept
    (the ones that are used); a POST _search's parameters are unknowable here (None)."""
    fhir, request = exchange.fhir, exchange.request
    assert fhir is not None   # the channel stage ran and allowed
    query = None if request.method == "POST" and fhir.interaction == "search-type" else \
        exchange.search.used if exchange.search is not None else tuple(request.query.items())
    return access_for(fhir.interaction, fhir.resource_type, fhir.resource_id, query)


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
    return _scope_permissions(principal.scopes)


@functools.lru_cache(maxsize=1024)
def _scope_permissions(scopes: frozenset[str]) -> tuple[Permission, ...]:
    """Parsed once per set of scopes (a client's tokens all carry the same few): pure, and Permission is
    immutable, so one tuple serves every request with those scopes."""
    return tuple(p for p in (parse_token_scope(s) for s in sorted(scopes)) if p is not None)


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


def looks_up_owner(rules: tuple[AuthorizationRule, ...], principal: Principal | None, access: Access) -> bool:
    """Authorization will ask openIMIS which claim owns the target (a claim-index lookup) to check its
    facility: a read, update or delete of a type bound through its claim, or a ClaimResponse create (its
    claim is named in the body), when a rule that may allow it checks the facility. Pure: by the rules,
    not by the owner cache (stages/authorization_facts.py decides the same per request)."""
    binding = FACILITY_BINDINGS.get(access.resource_type)
    if binding is None or not binding.through_claim:
        return False
    if access.letter not in "rud" and not (access.resource_type == "ClaimResponse" and access.letter == "c"):
        return False
    return needs_facts(rules, principal, access)
