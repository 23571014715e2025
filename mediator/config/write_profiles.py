"""Schema of `policies/write_profiles.yaml`: what a client may send in a body (README "Write firewall").

A positive model: per writable resource type a profile lists the elements that may appear, for nested
content the elements that may appear inside, for each reference the target types and the facility it
must resolve to, and what `contained` may hold. Everything not listed is refused.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ELEMENT_NAME = r"^[a-z][A-Za-z0-9]*$"
TYPE_NAME = r"^[A-Z][A-Za-z]+$"
FACILITY_TYPES = frozenset({"Organization", "Practitioner", "Location"})
"""Types the facility directory resolves to a health facility (Location: a facility's uuid/code)."""
CONTAINED_TIES = {"Organization": "caller_facility"}
"""Contained types a rule can tie to the caller. openIMIS creates or updates every contained resource
of a Claim (Patient, Group, Organization, Practitioner, PractitionerRole, Medication,
ActivityDefinition) keyed by its id; only a health facility can be tied to the caller here."""
INTERACTIONS = ("create", "update")

_STRICT = ConfigDict(extra="forbid", frozen=True)


class ReferenceRule(BaseModel):
    """A Reference element: which types it may point to and which facility it must resolve to."""

    model_config = _STRICT
    types: tuple[str, ...] = Field(min_length=1)
    facility: Literal["caller", "any"]
    """caller: every form present (reference id, identifier) must resolve, through the facility
    directory, to one of the caller's health facilities; any: master data or insurees (no facility)."""

    @field_validator("types")
    @classmethod
    def _type_names(cls, types: tuple[str, ...]) -> tuple[str, ...]:
        for name in types:
            if not re.match(TYPE_NAME, name):
                raise ValueError(f"{name!r} is not a FHIR resource type name")
        if len(set(types)) != len(types):
            raise ValueError("a type is listed twice")
        return types

    @model_validator(mode="after")
    def _resolvable(self) -> ReferenceRule:
        if self.facility == "caller" and not set(self.types) <= FACILITY_TYPES:
            other = sorted(set(self.types) - FACILITY_TYPES)
            raise ValueError(f"facility: caller cannot be checked for {', '.join(other)} (the facility directory "
                             f"resolves only {', '.join(sorted(FACILITY_TYPES))})")
        return self


class ElementRule(BaseModel):
    """An allowed element. `any` (or `{}`): its content is not inspected — only for elements openIMIS
    reads as plain data. `elements`: an object (or array of objects) whose keys must be listed.
    `reference`: a Reference (or array of them) checked by the rule."""

    model_config = _STRICT
    elements: dict[str, ElementRule] | None = None
    reference: ReferenceRule | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if value is None or value == "any":
            return {}
        if isinstance(value, str):
            raise ValueError(f"{value!r}: an element is `any` or a mapping with elements or reference")
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> ElementRule:
        if self.elements is not None and self.reference is not None:
            raise ValueError("an element has either elements or reference, not both")
        return self

    @field_validator("elements")
    @classmethod
    def _element_names(cls, elements: dict[str, ElementRule] | None) -> dict[str, ElementRule] | None:
        return _check_names(elements) if elements is not None else None

    @property
    def opaque(self) -> bool:
        return self.elements is None and self.reference is None


def _check_names(elements: dict[str, ElementRule]) -> dict[str, ElementRule]:
    for name in elements:
        if name in ("resourceType", "contained"):
            raise ValueError(f"{name} is not listed: resourceType is always checked, contained has its own key")
        if not re.match(ELEMENT_NAME, name):
            raise ValueError(f"{name!r} is not a FHIR element name")
    return elements


class ContainedRule(BaseModel):
    """A contained resource type that may be sent, tied to the caller."""

    model_config = _STRICT
    tie: Literal["caller_facility"]
    """caller_facility (Organization): its `id` is absent or the caller's own facility uuid, and every
    identifier resolves to that same facility of the caller."""
    elements: dict[str, ElementRule]

    @field_validator("elements")
    @classmethod
    def _element_names(cls, elements: dict[str, ElementRule]) -> dict[str, ElementRule]:
        return _check_names(elements)


class WriteProfile(BaseModel):
    model_config = _STRICT
    interactions: tuple[Literal["create", "update"], ...] = ("create",)
    elements: dict[str, ElementRule]
    contained: dict[str, ContainedRule] = Field(default_factory=dict)
    """Absent or empty: a body with `contained` is refused (write.contained_not_allowed)."""

    @field_validator("elements")
    @classmethod
    def _element_names(cls, elements: dict[str, ElementRule]) -> dict[str, ElementRule]:
        return _check_names(elements)

    @field_validator("contained")
    @classmethod
    def _tieable(cls, contained: dict[str, ContainedRule]) -> dict[str, ContainedRule]:
        for name, rule in contained.items():
            if CONTAINED_TIES.get(name) != rule.tie:
                raise ValueError(f"a contained {name} cannot be tied to the caller (openIMIS creates or updates "
                                 f"it from the claim; only Organization with tie: caller_facility is possible)")
        return contained


class WriteProfilesPolicy(BaseModel):
    model_config = _STRICT
    version: Literal[1]
    profiles: dict[str, WriteProfile] = Field(default_factory=dict)
    """Empty: every write is refused (write.no_profile)."""

    @field_validator("profiles")
    @classmethod
    def _type_names(cls, profiles: dict[str, WriteProfile]) -> dict[str, WriteProfile]:
        for name in profiles:
            if not re.match(TYPE_NAME, name) or name == "Bundle":
                raise ValueError(f"{name!r} is not a writable FHIR resource type (Bundle entries are checked "
                                 "against the profile of their own type)")
        return profiles

    def needs_directory(self) -> bool:
        """True if some rule resolves facilities (then policies/authorization.yaml must exist)."""
        def walk(elements: dict[str, ElementRule]) -> bool:
            return any((rule.reference is not None and rule.reference.facility == "caller")
                       or (rule.elements is not None and walk(rule.elements)) for rule in elements.values())
        return any(walk(p.elements) or p.contained for p in self.profiles.values())
