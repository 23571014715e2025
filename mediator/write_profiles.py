"""Evaluation of write profiles: may this body be written, element by element? Pure (no I/O).

`check_write(policy, resource_type, interaction, resource, caller, snapshot)` walks the body against
the type's profile (mediator.config.write_profiles) and returns a `WriteCheck`: allowed, or the first
element no rule allows, with a stable reason code and the element's path (`Claim.item[0].modifier`).

Why so strict (api_fhir_r4 1.10, read in its source): openIMIS acts on far more of a Claim than the
fields authorization inspects. `ClaimSerializer.create` first calls `_create_or_update_contained`, which
creates or updates, keyed by the contained resource's `id` and with no transaction around the claim,
every contained Patient, Group, Organization (health facility), Practitioner, PractitionerRole (claim
administrator), Medication and ActivityDefinition (ClaimContainedResources); a `#Type/id` reference then
makes the claim use that row. A body element nobody inspects is therefore a write nobody authorised.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mediator.config.write_profiles import ContainedRule, ElementRule, ReferenceRule, WriteProfilesPolicy
from mediator.facilities import FacilitySnapshot, identifier_values
from mediator.pipeline import Decision

REASON = "write"
"""Reason-code prefix and name of the stage (stages/write_firewall.py)."""
REFERENCE_KEYS = frozenset({"reference", "type", "identifier", "display"})
IDENTIFIER_KEYS = frozenset({"use", "type", "system", "value"})
FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
MAX_PATH = 200


@dataclass(frozen=True, slots=True)
class WriteCheck:
    """The firewall's verdict on one resource: the decision, the element it is about (None when the
    whole resource passed) and the rule of policies/write_profiles.yaml that decided."""

    decision: Decision
    element: str | None = None
    rule: str | None = None
    entry: int | None = None


class _Refused(Exception):
    def __init__(self, reason: str, status: int, element: str, message: str, rule: str) -> None:
        super().__init__(reason)
        self.reason, self.status, self.element, self.message, self.rule = reason, status, element, message, rule


def _shorten(path: str) -> str:
    # Element names come from the client: bounded before they reach messages and audit records.
    return path if len(path) <= MAX_PATH else path[:MAX_PATH] + "..."


class _Walk:
    def __init__(self, resource_type: str, caller: frozenset[str], snapshot: FacilitySnapshot | None,
                 contained: Mapping[str, Mapping[str, Any]]) -> None:
        self.resource_type = resource_type
        self.caller = caller
        self.snapshot = snapshot
        self.contained = contained

    def refuse(self, reason: str, status: int, element: str, message: str, rule: str) -> _Refused:
        element = _shorten(element)
        return _Refused(f"{REASON}.{reason}", status, element, f"{element}: {message}", rule)

    # --- elements --------------------------------------------------------------------------------

    def elements(self, path: str, value: Mapping[str, Any], allowed: Mapping[str, ElementRule], rule: str,
                 skip: frozenset[str] = frozenset()) -> None:
        for key, child in value.items():
            if key in skip:
                continue
            element_rule = allowed.get(key)
            if element_rule is None:
                raise self.refuse("element_not_allowed", 422, f"{path}.{key}",
                                  "this element is not accepted (not in the write profile)", rule)
            self.value(f"{path}.{key}", child, element_rule, f"{rule}.{key}")

    def value(self, path: str, value: Any, rule: ElementRule, rule_path: str) -> None:
        if rule.opaque:
            return
        if isinstance(value, list):
            for index, item in enumerate(value):
                self.value(f"{path}[{index}]", item, rule, rule_path)
            return
        if not isinstance(value, dict):
            raise self.refuse("element_not_allowed", 422, path, "an object is expected here", rule_path)
        if rule.reference is not None:
            self.reference(path, value, rule.reference, f"{rule_path}.reference")
        else:
            assert rule.elements is not None
            self.elements(path, value, rule.elements, f"{rule_path}.elements")

    # --- references ------------------------------------------------------------------------------

    def reference(self, path: str, ref: Mapping[str, Any], rule: ReferenceRule, rule_path: str) -> None:
        for key in ref:
            if key not in REFERENCE_KEYS:
                raise self.refuse("element_not_allowed", 422, f"{path}.{key}",
                                  "a reference may carry only reference, type, identifier, display", rule_path)
        kind = ref.get("type")
        if kind is not None and kind not in rule.types:
            raise self.refuse("reference_not_allowed", 422, f"{path}.type",
                              f"must be {' or '.join(rule.types)}", rule_path)
        literal, ident = ref.get("reference"), ref.get("identifier")
        if literal is None and ident is None:
            raise self.refuse("reference_not_allowed", 422, path, "a reference or an identifier is required",
                              rule_path)
        if literal is not None:
            self.literal(path, literal, kind, rule, rule_path)
        if ident is not None:
            self.identifier(path, ident, kind, rule, rule_path)

    def literal(self, path: str, literal: Any, kind: Any, rule: ReferenceRule, rule_path: str) -> None:
        where = f"{path}.reference"
        if not isinstance(literal, str):
            raise self.refuse("reference_not_allowed", 422, where, "must be a string", rule_path)
        if literal.startswith("#"):
            # openIMIS resolves "#Type/id" to the contained resource; only the contained rules (checked
            # before) can have let one in, and it must be of an allowed type.
            local = literal[1:]
            target = self.contained.get(local)
            if target is None and "/" in local:
                target = self.contained.get(local.split("/", 1)[1])
            if target is None or target.get("resourceType") not in rule.types:
                raise self.refuse("reference_not_allowed", 422, where,
                                  f"points to no contained {' or '.join(rule.types)}", rule_path)
            return
        if ":" in literal:
            raise self.refuse("reference_not_allowed", 422, where,
                              "absolute references (URLs, urn:) are not accepted; use Type/id", rule_path)
        parts = literal.split("/")
        if len(parts) != 2 or parts[0] not in rule.types or not FHIR_ID.match(parts[1]):
            raise self.refuse("reference_not_allowed", 422, where,
                              f"must be {' or '.join(t + '/<id>' for t in rule.types)}", rule_path)
        if kind is not None and kind != parts[0]:
            raise self.refuse("reference_not_allowed", 422, where, "disagrees with the reference's type",
                              rule_path)
        if rule.facility == "caller":
            self.bound(where, parts[0], parts[1], rule_path)

    def identifier(self, path: str, ident: Any, kind: Any, rule: ReferenceRule, rule_path: str) -> None:
        where = f"{path}.identifier"
        if not isinstance(ident, dict) or not isinstance(ident.get("value"), str):
            raise self.refuse("reference_not_allowed", 422, where, "must be an Identifier with a value", rule_path)
        for key in ident:
            if key not in IDENTIFIER_KEYS:
                raise self.refuse("element_not_allowed", 422, f"{where}.{key}",
                                  "an identifier may carry only use, type, system, value", rule_path)
        if rule.facility == "caller":
            types = [kind] if isinstance(kind, str) else list(rule.types)
            if len(types) != 1:
                raise self.refuse("reference_not_allowed", 422, f"{path}.type",
                                  "an identifier-only reference needs a type", rule_path)
            self.bound(where, types[0], ident["value"], rule_path)

    def facility_of(self, resource_type: str, key: str) -> str | None:
        if self.snapshot is None:
            return None
        if resource_type == "Practitioner":
            return self.snapshot.facility_of_practitioner(key)
        return self.snapshot.facility_of_organization(key)   # Organization, Location: same uuid and code

    def bound(self, where: str, resource_type: str, key: str, rule_path: str) -> None:
        hf = self.facility_of(resource_type, key)
        if hf is None:
            raise self.refuse("reference_unresolved", 403, where,
                              f"is not a known {resource_type} of a health facility", rule_path)
        if hf not in self.caller:
            raise self.refuse("reference_other_facility", 403, where,
                              "belongs to another health facility", rule_path)

    # --- contained -------------------------------------------------------------------------------

    def contained_resource(self, path: str, item: Mapping[str, Any], rule: ContainedRule, rule_path: str) -> None:
        kind = item["resourceType"]
        values = [v for _, v in identifier_values(item)]
        if not values or len(values) != len(item.get("identifier") or ()):
            raise self.refuse("contained_not_allowed", 403, f"{path}.identifier",
                              f"a contained {kind} must identify the caller's facility", rule_path)
        facilities = {self.facility_of(kind, v) for v in values}
        if None in facilities or len(facilities) != 1 or not facilities <= self.caller:
            raise self.refuse("contained_not_allowed", 403, f"{path}.identifier",
                              f"a contained {kind} must be the caller's own health facility", rule_path)
        local_id = item.get("id")
        if local_id is not None:
            # openIMIS updates the row whose uuid is this id: it must be the caller's own facility's uuid.
            if not isinstance(local_id, str) or not UUID.match(local_id) or \
                    {self.facility_of(kind, local_id)} != facilities:
                raise self.refuse("contained_not_allowed", 403, f"{path}.id",
                                  f"the id of a contained {kind} must be absent or the uuid of the caller's "
                                  "own facility (openIMIS updates the facility with that uuid)", rule_path)
        self.elements(path, item, rule.elements, f"{rule_path}.elements", skip=frozenset({"resourceType", "id"}))


def _contained_index(path: str, resource: Mapping[str, Any]) -> tuple[dict[str, Mapping[str, Any]],
                                                                      _Refused | None]:
    index: dict[str, Mapping[str, Any]] = {}
    for position, item in enumerate(resource.get("contained") or ()):
        if isinstance(item, dict) and isinstance(item.get("id"), str):
            if item["id"] in index:   # openIMIS silently takes the first of two equal ids
                element = _shorten(f"{path}.contained[{position}].id")
                return index, _Refused(f"{REASON}.contained_not_allowed", 403, element,
                                       f"{element}: contained ids must be unique", "contained")
            index[item["id"]] = item
    return index, None


def check_write(policy: WriteProfilesPolicy, resource_type: str, interaction: str, resource: Any,
                caller: frozenset[str], snapshot: FacilitySnapshot | None, *, where: str = "") -> WriteCheck:
    """Decide one resource a client wants written. `where` prefixes element paths (a Bundle entry)."""
    path = f"{where}{resource_type}"
    profile = policy.profiles.get(resource_type)
    if profile is None:
        return WriteCheck(Decision.denied(f"{REASON}.no_profile", 403,
                                          f"{path}: no write profile allows writing {resource_type}"),
                          _shorten(path), "profiles")
    rule = f"profiles.{resource_type}"
    if interaction not in profile.interactions:
        return WriteCheck(Decision.denied(f"{REASON}.interaction_not_allowed", 403,
                                          f"{path}: {interaction} is not allowed by the write profile"),
                          _shorten(path), f"{rule}.interactions")
    if not isinstance(resource, dict) or resource.get("resourceType") != resource_type:
        return WriteCheck(Decision.denied(f"{REASON}.not_a_resource", 422, f"{path}: not a {resource_type}"),
                          _shorten(path), rule)
    try:
        contained = resource.get("contained")
        index, refusal = _contained_index(path, resource)
        if refusal is not None:
            raise refusal
        walk = _Walk(resource_type, caller, snapshot, index)
        if contained is not None:
            if not isinstance(contained, list):
                raise walk.refuse("contained_not_allowed", 403, f"{path}.contained", "must be a list",
                                  f"{rule}.contained")
            for position, item in enumerate(contained):
                item_path = f"{path}.contained[{position}]"
                kind = item.get("resourceType") if isinstance(item, dict) else None
                contained_rule = profile.contained.get(kind) if isinstance(kind, str) else None
                if contained_rule is None:
                    raise walk.refuse("contained_not_allowed", 403, item_path,
                                      f"a contained {kind if isinstance(kind, str) else 'resource'} is not "
                                      "accepted: openIMIS would create or update it, keyed by its id",
                                      f"{rule}.contained")
                walk.contained_resource(item_path, item, contained_rule, f"{rule}.contained.{kind}")
        walk.elements(path, resource, profile.elements, f"{rule}.elements",
                      skip=frozenset({"resourceType", "contained"}))
    except _Refused as refused:
        return WriteCheck(Decision.denied(refused.reason, refused.status, refused.message), refused.element,
                          refused.rule)
    return WriteCheck(Decision.allowed(f"{REASON}.allowed"), None, rule)
