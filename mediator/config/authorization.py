"""Schema of `policies/authorization.yaml` and the SMART v2 permission grammar it uses.

A permission reads `<context>/<Type>.<letters>[?param=value]` (SMART App Launch v2, §Scopes):
context `system` (any caller) or `user` (the principal carries a user id); Type a FHIR resource type or
`*`; letters a subset of `cruds` in that order; an optional `?param=value` constraint (value `*`: any
non-empty value) that is only meaningful for searches, so it is only accepted with `.s`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, model_validator

from mediator.config.models import Strict
from mediator.config.types import Name, PositiveSeconds

LETTERS = "cruds"
_PERMISSION = re.compile(
    r"^(?P<context>system|user)/(?P<type>\*|[A-Z][A-Za-z]{1,63})\.(?P<letters>[cruds]{1,5})"
    r"(?:\?(?P<param>[a-z_][A-Za-z0-9_\-]{0,63})=(?P<value>[^&=\s]{1,128}))?$")
ANONYMOUS = "anonymous"
"""Reserved role name: matches requests that carry no principal (authentication let them through)."""


@dataclass(frozen=True, slots=True)
class Permission:
    """One compiled SMART v2 permission. `grants` is pure and allocation-free."""

    text: str
    context: str
    resource_type: str
    letters: frozenset[str]
    param: str | None = None
    value: str | None = None

    @classmethod
    def parse(cls, text: str) -> Permission:
        match = _PERMISSION.match(text)
        if match is None:
            raise ValueError(f"not a SMART v2 permission: {text!r} (expected e.g. user/Claim.cr, "
                             "system/Medication.rs or user/Patient.s?identifier=*)")
        letters = match["letters"]
        if "".join(c for c in LETTERS if c in letters) != letters:
            raise ValueError(f"{text!r}: letters must be a subset of 'cruds' in that order, each once")
        if match["param"] is not None and letters != "s":
            raise ValueError(f"{text!r}: a ?param=value constraint is only supported on search (.s)")
        return cls(text, match["context"], match["type"], frozenset(letters), match["param"], match["value"])

    def grants(self, resource_type: str, letter: str, query: tuple[tuple[str, str], ...] | None,
               has_user: bool) -> bool:
        """True if this permission covers `letter` on `resource_type` for this request.

        `query` is the request's search parameters (None when they cannot be known, e.g. POST _search):
        a constrained permission then grants nothing.
        """
        if self.context == "user" and not has_user:
            return False
        if self.resource_type != "*" and self.resource_type != resource_type:
            return False
        if letter not in self.letters:
            return False
        if self.param is None:
            return True
        if query is None:
            return False
        values = [v for k, v in query if k == self.param]
        # SECURITY: exactly one occurrence; a repeated parameter is read differently by different servers.
        if len(values) != 1 or not values[0]:
            return False
        return self.value == "*" or values[0] == self.value


_SMART_V1 = re.compile(r"^(?P<context>patient|user|system)/(?P<type>\*|[A-Z][A-Za-z]{1,63})\."
                       r"(?P<what>read|write|\*)$")


def parse_token_scope(scope: str) -> Permission | None:
    """A granted token scope as a Permission, or None if it grants no resource access.

    SMART v1 scopes are mapped (read → rs, write → cud, * → cruds). `patient/` scopes and
    non-resource scopes (openid, fhirUser, launch, offline_access) grant nothing here: the mediator has
    no patient compartment to enforce them against.
    """
    v1 = _SMART_V1.match(scope)
    if v1 is not None:
        if v1["context"] == "patient":
            return None
        letters = {"read": "rs", "write": "cud", "*": "cruds"}[v1["what"]]
        return Permission(scope, v1["context"], v1["type"], frozenset(letters))
    try:
        return Permission.parse(scope)
    except ValueError:
        return None


def _to_permission(value: object) -> Permission:
    if isinstance(value, Permission):
        return value
    if not isinstance(value, str):
        raise ValueError(f"a permission is a string like user/Claim.cr, not {type(value).__name__}")
    return Permission.parse(value.strip())


PermissionText = Annotated[Permission, BeforeValidator(_to_permission)]
RoleName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}$")]


class AuthorizationRule(Strict):
    """One rule. Rules are tried in file order (see README "policies/authorization.yaml")."""

    name: Name
    roles: tuple[RoleName, ...]
    """Principal roles this rule applies to (any of them). `anonymous`: requests without a principal."""
    permissions: tuple[PermissionText, ...]
    effect: Literal["allow", "deny"] = "allow"
    facility_scope: Literal["caller", "any"] | None = None
    """allow rules only. caller (default): facility-bound resources must belong to one of the caller's
    health facilities. any: no facility check (scheme-wide roles)."""
    mode: Literal["enforce", "shadow"] = "enforce"
    """shadow: evaluated, logged and counted as if enforced, never enforced."""

    @model_validator(mode="after")
    def _facility_scope_on_allow_only(self) -> AuthorizationRule:
        if not self.roles:
            raise ValueError("roles must not be empty (a rule for nobody is a mistake)")
        if not self.permissions:
            raise ValueError("permissions must not be empty")
        if self.effect == "deny" and self.facility_scope is not None:
            raise ValueError("facility_scope applies to allow rules only")
        return self

    @property
    def checks_facility(self) -> bool:
        return self.effect == "allow" and self.facility_scope != "any"


class FacilityDirectoryConfig(Strict):
    """Where the health-facility directory (HF codes, uuids, claim administrators) comes from."""

    upstream: Name
    """The upstream (channels.yaml `upstreams`) whose Organization and PractitionerRole lists are read."""
    ttl_s: Annotated[float, Field(gt=0, le=86400)] = 300
    """A loaded directory is used this long, then reloaded on the next request that needs it."""
    refresh_on_miss_after_s: Annotated[float, Field(ge=0, le=86400)] = 30
    """An unknown facility or claim administrator reloads the directory once if it is older than this."""
    max_stale_s: Annotated[float, Field(ge=0, le=7 * 86400)] = 3600
    """If a reload fails, the last good directory is used for this long after its ttl; beyond: 503."""
    page_size: int = Field(100, ge=1, le=1000)
    timeout_s: PositiveSeconds = 30
    """Each directory page and each owning-Claim lookup; beyond: the request is refused (fail closed)."""
    graphql_path: Annotated[str, Field(pattern=r"^/[A-Za-z0-9_./-]*$")] = "/api/graphql"
    """openIMIS's GraphQL endpoint on the upstream's host: the claim index (owners, facility-scoped searches)."""


class SearchResultsConfig(Strict):
    foreign_entries: Literal["drop", "deny"] = "drop"
    """Accepted so that older policy files load; no effect: facility-scoped searches never hold another
    facility's entries (mediator.stages.authorization_search), and the shadow count never changes an answer."""
    max_page_size: int = Field(100, ge=1, le=100)
    """Largest `_count` of a facility-scoped search (the claim index serves at most 100 per request)."""
    window_entries: int = Field(100, ge=1, le=1000)
    """`_count` of the one openIMIS list read per page (the window the page's claims are taken from)."""


class AuthorizationPolicy(Strict):
    version: Literal[1]
    facility_directory: FacilityDirectoryConfig
    search_results: SearchResultsConfig = SearchResultsConfig()
    rules: tuple[AuthorizationRule, ...] = ()
    """Empty: every request is denied (deny by default)."""

    @model_validator(mode="after")
    def _unique_rule_names(self) -> AuthorizationPolicy:
        seen: set[str] = set()
        for rule in self.rules:
            if rule.name in seen:
                raise ValueError(f"duplicate rule name {rule.name!r}")
            seen.add(rule.name)
        return self
