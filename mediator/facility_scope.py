"""Facility facts: which health facilities a FHIR resource is bound to, read the way openIMIS reads it.

Pure functions over a FacilitySnapshot (no I/O). openIMIS (api_fhir_r4 converterUtils,
ReferenceConverterMixin) resolves `Claim.provider` / `Claim.enterer` from `reference` first ("Type/id",
id = uuid or code), from `identifier` only when there is no reference, and from a `contained` resource
when the reference is "#Type/id" (the first contained match wins; a contained Organization can create
or update a facility). We are stricter: every form that is present must resolve, all to the same
facility, and contained ids must be unique. Anything we cannot resolve is a problem (fail closed).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from mediator.facilities import FacilitySnapshot, identifier_values, reference_id


@dataclass(frozen=True, slots=True)
class FacilityFacts:
    """Either a problem (reason suffix, HTTP status, message) or the (field, HF code) bindings found."""

    bindings: tuple[tuple[str, str], ...] = ()
    problem: str | None = None
    status: int = 403
    message: str = ""

    @property
    def facilities(self) -> frozenset[str]:
        return frozenset(hf for _, hf in self.bindings)

    @classmethod
    def failed(cls, problem: str, message: str, status: int = 403) -> FacilityFacts:
        return cls((), problem, status, message)


def merge(*facts: FacilityFacts) -> FacilityFacts:
    for fact in facts:
        if fact.problem is not None:
            return fact
    return FacilityFacts(tuple(b for f in facts for b in f.bindings))


def _contained_index(resource: Mapping[str, Any]) -> tuple[dict[str, dict[str, Any]], str | None]:
    index: dict[str, dict[str, Any]] = {}
    contained = resource.get("contained")
    if contained is None:
        return index, None
    if not isinstance(contained, list):
        return index, "contained is not a list"
    for item in contained:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            return index, "a contained resource has no id"
        # SECURITY: FHIR requires unique contained ids; openIMIS silently takes the first duplicate.
        if item["id"] in index:
            return index, f"contained id {item['id']!r} appears more than once"
        index[item["id"]] = item
    return index, None


def _resolve(field: str, ref: Any, resource_type: str, contained: Mapping[str, dict[str, Any]],
             lookup: Callable[[str], str | None]) -> FacilityFacts:
    """The one facility a Reference points to, or a problem named after `field`."""
    if not isinstance(ref, dict):
        return FacilityFacts.failed(f"{field}_unresolved", f"{field} is missing")
    found: set[str] = set()
    literal = ref.get("reference")
    ident = ref.get("identifier")
    if literal is None and ident is None:
        return FacilityFacts.failed(f"{field}_unresolved", f"{field} has neither reference nor identifier")
    if literal is not None:
        if isinstance(literal, str) and literal.startswith("#"):
            local = literal[1:]
            target = contained.get(local)
            if target is None and local.startswith(resource_type + "/"):
                target = contained.get(local[len(resource_type) + 1:])   # openIMIS writes "#Type/id"
            if target is None or target.get("resourceType") != resource_type:
                return FacilityFacts.failed(f"{field}_unresolved",
                                            f"{field} points to no contained {resource_type}")
            values = [v for _, v in identifier_values(target)]
            if not values:
                return FacilityFacts.failed(f"{field}_unresolved",
                                            f"the contained {resource_type} of {field} has no identifier")
            for value in values:
                hf = lookup(value)
                if hf is None:
                    return FacilityFacts.failed(f"{field}_unresolved",
                                                f"{field} (contained) is not a known {resource_type}")
                found.add(hf)
        else:
            rid = reference_id(literal, resource_type)
            if rid is None:
                return FacilityFacts.failed(f"{field}_unresolved",
                                            f"{field}.reference must be {resource_type}/<uuid or code>")
            hf = lookup(rid)
            if hf is None:
                return FacilityFacts.failed(f"{field}_unresolved", f"{field} is not a known {resource_type}")
            found.add(hf)
    if ident is not None:
        given = ident.get("value") if isinstance(ident, dict) else None
        hf = lookup(given) if isinstance(given, str) else None
        if hf is None:
            return FacilityFacts.failed(f"{field}_unresolved",
                                        f"{field}.identifier is not a known {resource_type}")
        found.add(hf)
    if len(found) != 1:
        return FacilityFacts.failed(f"{field}_mismatch",
                                    f"{field} reference, identifier and contained resource disagree")
    return FacilityFacts(((field, found.pop()),))


def claim_facts(claim: Mapping[str, Any], snapshot: FacilitySnapshot) -> FacilityFacts:
    """A Claim being written: provider, enterer (claim admin) and every contained Organization."""
    contained, problem = _contained_index(claim)
    if problem is not None:
        return FacilityFacts.failed("duplicate_contained_id" if "more than once" in problem
                                    else "contained_unresolved", problem)
    facts = [
        _resolve("provider", claim.get("provider"), "Organization", contained,
                 snapshot.facility_of_organization),
        _resolve("enterer", claim.get("enterer"), "Practitioner", contained,
                 snapshot.facility_of_practitioner),
    ]
    # A contained Organization can create or update a facility in openIMIS even if nothing refers to it.
    for item in contained.values():
        if item.get("resourceType") == "Organization":
            values = [v for _, v in identifier_values(item)]
            hfs = {snapshot.facility_of_organization(v) for v in values}
            if not values or None in hfs:
                facts.append(FacilityFacts.failed("contained_unresolved",
                                                  "a contained Organization is not a known health facility"))
            elif len(hfs) != 1:
                facts.append(FacilityFacts.failed("contained_mismatch",
                                                  "a contained Organization's identifiers name different facilities"))
            else:
                facts.append(FacilityFacts((("contained", str(hfs.pop())),)))
    return merge(*facts)


def owner_facts(claim: Mapping[str, Any] | None, snapshot: FacilitySnapshot) -> FacilityFacts:
    """The facility that owns an existing Claim, as openIMIS returned it (its provider)."""
    if claim is None:
        return FacilityFacts.failed("owner_not_found", "no such claim", 404)
    contained, problem = _contained_index(claim)
    if problem is not None:
        return FacilityFacts.failed("owner_unresolved", problem)
    return _resolve("owner", claim.get("provider"), "Organization", contained,
                    snapshot.facility_of_organization)


def eligibility_facts(request: Mapping[str, Any], snapshot: FacilitySnapshot) -> FacilityFacts:
    """CoverageEligibilityRequest: `provider` (Organization) and `facility` (Location), when present,
    must be the caller's. openIMIS ignores both, so absent is accepted and nothing is filled in."""
    contained, problem = _contained_index(request)
    if problem is not None:
        return FacilityFacts.failed("duplicate_contained_id" if "more than once" in problem
                                    else "contained_unresolved", problem)
    facts = []
    if request.get("provider") is not None:
        facts.append(_resolve("provider", request["provider"], "Organization", contained,
                              snapshot.facility_of_organization))
    if request.get("facility") is not None:
        # openIMIS health facilities share uuid and code between their Organization and Location forms.
        facts.append(_resolve("location", request["facility"], "Location", contained,
                              snapshot.facility_of_organization))
    return merge(*facts)


def is_unresolved(facts: FacilityFacts) -> bool:
    """True for problems a fresher directory might fix (a facility or claim admin added recently)."""
    return facts.problem is not None and facts.problem.endswith("_unresolved")


BodyFacts = Callable[[Mapping[str, Any], FacilitySnapshot], FacilityFacts]


@dataclass(frozen=True, slots=True)
class FacilityBinding:
    """How one resource type is tied to a health facility (one entry of FACILITY_BINDINGS)."""

    through_claim: bool
    """Its facility is that of its Claim: reads, updates and deletes look the claim's owner up (openIMIS
    serves ClaimResponse and CommunicationRequest from the Claim, with the Claim's id)."""
    body_facts: BodyFacts | None = None
    """The facilities a body of this type names (creates/updates in `body_letters`)."""
    body_letters: str = ""
    body_name: str = "request"
    """How a refusal names the body that cannot be read ("the claim body cannot be read")."""


FACILITY_BINDINGS: Mapping[str, FacilityBinding] = MappingProxyType({
    "Claim": FacilityBinding(through_claim=True, body_facts=claim_facts, body_letters="cu", body_name="claim"),
    "ClaimResponse": FacilityBinding(through_claim=True),
    "CommunicationRequest": FacilityBinding(through_claim=True),
    "CoverageEligibilityRequest": FacilityBinding(through_claim=False, body_facts=eligibility_facts,
                                                  body_letters="c"),
})
"""Every facility-bound resource type, in one place: adding one is one entry here (plus its test)."""

FACILITY_BOUND = frozenset(FACILITY_BINDINGS)
"""Resource types whose access is checked against the caller's health facilities."""
OWNED_BY_CLAIM = frozenset(name for name, binding in FACILITY_BINDINGS.items() if binding.through_claim)
