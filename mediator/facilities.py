"""Which openIMIS health facility (HF code, e.g. "JMHOS001") a FHIR reference belongs to.

`FacilityDirectory` is the small interface the authorization stage depends on: `snapshot()` returns an
immutable `FacilitySnapshot` with pure lookups. `UpstreamFacilityDirectory` loads it from openIMIS
(Organization?type=prov and PractitionerRole?resourceType=ca, paged) and keeps it for a TTL; a
master-data replica can implement the same interface by calling `FacilitySnapshot.from_resources`.

openIMIS facts this relies on (api_fhir_r4): a health facility is an Organization of type `prov` whose
identifiers carry type code `Code` (the HF code) and `UUID`; a claim administrator is a PractitionerRole
(code `CA`) whose `practitioner` is the claim admin and whose `organization` is the HF.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

from mediator.bulkhead import UpstreamGuard, UpstreamRefused
from mediator.config.models import PRIORITY_NAMES
from mediator.errors import MediatorError
from mediator.logs import JsonEvent
from mediator.upstream import OpenImisUpstream, UpstreamTimeout, UpstreamUnavailable

log = logging.getLogger("mediator.facilities")

_AMBIGUOUS = "\x00ambiguous"
_EMPTY: Mapping[str, str] = MappingProxyType({})


class DirectoryUnavailable(MediatorError):
    """The directory could not be loaded and no usable copy exists: requests needing it are refused."""


class LookupFailed(MediatorError):
    """openIMIS did not answer a lookup properly (not a 200/404 JSON answer)."""


def identifier_values(resource: Mapping[str, Any]) -> list[tuple[str | None, str]]:
    """(type code or None, value) for each identifier of a resource."""
    found: list[tuple[str | None, str]] = []
    for identifier in resource.get("identifier") or ():
        if not isinstance(identifier, dict) or not isinstance(identifier.get("value"), str):
            continue
        codes = [c.get("code") for c in ((identifier.get("type") or {}).get("coding") or ())
                 if isinstance(c, dict)]
        found.append((codes[0] if codes and isinstance(codes[0], str) else None, identifier["value"]))
    return found


def reference_id(reference: Any, resource_type: str) -> str | None:
    """The id in a literal reference "Type/id"; None for anything else (absolute URLs included)."""
    if not isinstance(reference, str):
        return None
    parts = reference.split("/")
    if len(parts) == 2 and parts[0] == resource_type and parts[1]:
        return parts[1]
    return None


def _has_code(resource: Mapping[str, Any], key: str, code: str) -> bool:
    for concept in resource.get(key) or ():
        for coding in (concept.get("coding") or ()) if isinstance(concept, dict) else ():
            if isinstance(coding, dict) and str(coding.get("code", "")).lower() == code:
                return True
    return False


@dataclass(frozen=True, slots=True)
class FacilitySnapshot:
    """An immutable directory: lower-cased keys (uuid, code, resource id) → HF code. Safe to share."""

    organizations: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    practitioners: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    loaded_at: float = 0.0
    claim_administrators: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    """Claim administrator code (exactly as openIMIS spells it, the user name they log in with) → HF code."""
    facility_uuids: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    """HF code → the facility's openIMIS uuid (what the claim index filters by)."""

    @staticmethod
    def _put(table: dict[str, str], key: str, code: str) -> None:
        key = key.lower()
        if table.get(key, code) != code:
            table[key] = _AMBIGUOUS   # one key, two facilities: never resolve it
        else:
            table[key] = code

    @classmethod
    def from_resources(cls, organizations: Iterable[Mapping[str, Any]],
                       practitioner_roles: Iterable[Mapping[str, Any]], loaded_at: float) -> FacilitySnapshot:
        orgs: dict[str, str] = {}
        uuids: dict[str, str] = {}
        for org in organizations:
            if not _has_code(org, "type", "prov"):
                continue   # policy holders (bus) and insurers (ins) are not health facilities
            ids = identifier_values(org)
            codes = [v for t, v in ids if t == "Code"]
            if len(codes) != 1:
                continue
            hf = codes[0]
            for kind, value in ids:
                cls._put(orgs, value, hf)
                if kind == "UUID":
                    uuids[hf] = value if uuids.get(hf, value) == value else _AMBIGUOUS
            if isinstance(org.get("id"), str):
                cls._put(orgs, org["id"], hf)
        practitioners: dict[str, str] = {}
        claim_admins: dict[str, str] = {}
        for role in practitioner_roles:
            if role.get("code") and not _has_code(role, "code", "ca"):
                continue   # enrolment officers are not claim administrators
            org_ref = role.get("organization") or {}
            keys = [reference_id(org_ref.get("reference"), "Organization")]
            ident = org_ref.get("identifier")
            if isinstance(ident, dict):
                keys.append(ident.get("value"))
            hfs = {orgs.get(k.lower()) for k in keys if isinstance(k, str)} - {None}
            if len(hfs) != 1 or _AMBIGUOUS in hfs:
                continue
            only = hfs.pop()
            assert only is not None
            hf = only
            prac_ref = role.get("practitioner") or {}
            names = [reference_id(prac_ref.get("reference"), "Practitioner"), role.get("id")]
            if isinstance(prac_ref.get("identifier"), dict):
                names.append(prac_ref["identifier"].get("value"))
            names += [v for _, v in identifier_values(role)]
            for name in names:
                if isinstance(name, str) and name:
                    cls._put(practitioners, name, hf)
            for kind, value in identifier_values(role):
                if kind == "Code":   # exact: a user name differing in case is another (unknown) user
                    claim_admins[value] = hf if claim_admins.get(value, hf) == hf else _AMBIGUOUS
        return cls(MappingProxyType(orgs), MappingProxyType(practitioners), loaded_at,
                   claim_administrators=MappingProxyType(claim_admins),
                   facility_uuids=MappingProxyType({hf: u for hf, u in uuids.items() if u != _AMBIGUOUS}))

    def facility_of_organization(self, key: str) -> str | None:
        code = self.organizations.get(key.lower())
        return None if code in (None, _AMBIGUOUS) else code

    def uuid_of_facility(self, hf_code: str) -> str | None:
        """The uuid of a health facility, if it resolves back to that facility (never an ambiguous one)."""
        found = self.facility_uuids.get(hf_code)
        return found if found is not None and self.facility_of_organization(found) == hf_code else None

    def facility_of_claim_administrator(self, code: str) -> str | None:
        """The HF of the claim administrator whose openIMIS code is exactly `code` (None: unknown)."""
        hf = self.claim_administrators.get(code)
        return None if hf in (None, _AMBIGUOUS) else hf

    def facility_of_practitioner(self, key: str) -> str | None:
        code = self.practitioners.get(key.lower())
        return None if code in (None, _AMBIGUOUS) else code


class FacilityDirectory(Protocol):
    """Source of FacilitySnapshots. Implementations are safe for concurrent use."""

    async def snapshot(self, *, max_age_s: float | None = None) -> FacilitySnapshot:
        """A snapshot no older than the implementation's TTL (or max_age_s, if given and smaller).

        Raises DirectoryUnavailable when none can be produced.
        """
        ...


class FacilitySource(Protocol):
    """Facilities and claim administrators held elsewhere (mediator.replica.facilities)."""

    async def resources(self, max_age_s: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None: ...


class UpstreamFacilityDirectory:
    """A FacilityDirectory read from openIMIS, cached for `ttl_s`; one load at a time.

    Lifetime: one per runtime; uses the runtime's started upstream. If a reload fails, the previous
    snapshot is served until `ttl_s + max_stale_s` after it was loaded; then DirectoryUnavailable.
    """

    MAX_PAGES = 1000
    PRIORITY = PRIORITY_NAMES["interactive"]
    """A reload holds up every facility-checked request (claims, eligibility): it waits for the bulkhead at
    their priority, ahead of master-data pulls."""

    def __init__(self, upstream: OpenImisUpstream, ttl_s: float, max_stale_s: float,
                 page_size: int, timeout_s: float, guard: UpstreamGuard | None = None,
                 replica: FacilitySource | None = None) -> None:
        self.upstream = upstream
        self.replica = replica
        """Where the directory's data is read first when it holds it (the master-data replica)."""
        self.guard = guard
        self.ttl_s = ttl_s
        self.max_stale_s = max_stale_s
        self.page_size = page_size
        self.timeout_s = timeout_s
        self._snapshot: FacilitySnapshot | None = None
        self._lock = asyncio.Lock()
        self.loads = 0

    async def snapshot(self, *, max_age_s: float | None = None) -> FacilitySnapshot:
        limit = self.ttl_s if max_age_s is None else min(self.ttl_s, max_age_s)
        current = self._snapshot
        if current is not None and time.time() - current.loaded_at < limit:
            return current
        async with self._lock:
            current = self._snapshot
            if current is not None and time.time() - current.loaded_at < limit:
                return current   # another request reloaded while we waited
            try:
                # A refresh after a miss (max_age_s) reads openIMIS itself: the replica may not have the
                # facility or claim administrator added a moment ago either.
                self._snapshot = await self._load(from_replica=max_age_s is None)
                return self._snapshot
            except LookupFailed as exc:
                log.warning(JsonEvent.of("facilities.reload_failed", detail=str(exc)))
                if current is not None and time.time() - current.loaded_at < self.ttl_s + self.max_stale_s:
                    return current
                raise DirectoryUnavailable(str(exc)) from exc

    async def _load(self, from_replica: bool) -> FacilitySnapshot:
        held = await self.replica.resources(self.ttl_s) if self.replica is not None and from_replica else None
        if held is not None:
            organizations, roles = held
            source = "replica"
        else:
            organizations = await self._all("Organization", {"type": "prov"})
            roles = await self._all("PractitionerRole", {"resourceType": "ca"})
            source = "openimis"
        self.loads += 1
        snapshot = FacilitySnapshot.from_resources(organizations, roles, time.time())
        log.info(JsonEvent.of("facilities.loaded", source=source, organization_keys=len(snapshot.organizations),
                               claim_administrator_keys=len(snapshot.practitioners)))
        return snapshot

    async def _all(self, resource_type: str, params: dict[str, str]) -> list[dict[str, Any]]:
        """Every page (OpenImisUpstream.pages), each inside the upstream's guard."""
        found: list[dict[str, Any]] = []
        try:
            async for page in self.upstream.pages(resource_type, params, self.page_size, self.timeout_s,
                                                  "facility-directory", self.MAX_PAGES, self.guard,
                                                  self.PRIORITY, f"lookup:{resource_type}"):
                if page.bundle is None:
                    raise LookupFailed(f"{resource_type} list answered {page.status}")
                found += page.resources(resource_type)
        except (UpstreamUnavailable, UpstreamTimeout) as exc:   # UpstreamInvalidAnswer: too many pages
            raise LookupFailed(f"{resource_type} list: {exc or type(exc).__name__}") from exc
        except UpstreamRefused as exc:   # openIMIS busy (queue full, waited too long): the copy still held serves
            raise LookupFailed(f"{resource_type} list not sent: {exc.reason}") from exc
        return found


class StaticFacilityDirectory:
    """A fixed snapshot (tests of the pure parts, explain with a described directory)."""

    def __init__(self, snapshot: FacilitySnapshot) -> None:
        self._snapshot = snapshot

    async def snapshot(self, *, max_age_s: float | None = None) -> FacilitySnapshot:
        return self._snapshot
