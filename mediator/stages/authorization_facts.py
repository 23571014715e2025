"""Authorization, the facts that need I/O: the facility directory and who owns a claim.

`FacilityFactFinder.gather` turns an access (and its body) into FacilityFacts, the input of the pure
decision (authorization_policy.evaluate). Which resource types are bound to a facility, and how, is
`facility_scope.FACILITY_BINDINGS`. Every openIMIS request made here waits for a slot of the upstream's
bulkhead, like forwarded ones. Directory and lookup failures become problems (fail closed), never errors.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from mediator.claim_index import ClaimIndex, IndexedClaim
from mediator.facilities import DirectoryUnavailable, FacilityDirectory, FacilitySnapshot, LookupFailed
from mediator.facility_scope import FACILITY_BINDINGS, FacilityFacts, is_unresolved, merge, owner_facts
from mediator.logs import JsonEvent
from mediator.stages.authorization_policy import Access
from mediator.upstream import OpenImisUpstream

log = logging.getLogger("mediator.authorization")


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


class FacilityFactFinder:
    """Facility facts of one runtime: its facility directory, its claim indexes (one per upstream) and the
    owner cache. Safe for concurrent requests."""

    def __init__(self, directory: FacilityDirectory, indexes: Mapping[str, ClaimIndex], owner_ttl_s: float,
                 refresh_on_miss_after_s: float) -> None:
        self.directory = directory
        self.indexes = indexes
        self.owners = OwnerCache(OWNER_CACHE_SIZE, owner_ttl_s)
        self.refresh_on_miss_after_s = refresh_on_miss_after_s

    async def snapshot(self, max_age_s: float | None = None) -> FacilitySnapshot:
        return await self.directory.snapshot(max_age_s=max_age_s)

    async def owner_claim(self, upstream: OpenImisUpstream, claim_key: str, request_id: str,
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

    async def gather(self, access: Access, resource: Mapping[str, Any] | None, upstream: OpenImisUpstream,
                     request_id: str, priority: int) -> tuple[FacilityFacts, str | None]:
        """(facts, the uuid of the claim an owner lookup found) for a non-search access to a facility-bound
        type. Never raises for directory or lookup failures: they become problems (fail closed)."""
        owner_id: str | None = None
        binding = FACILITY_BINDINGS.get(access.resource_type)
        try:
            owner: Mapping[str, Any] | None = None
            owner_needed = binding is not None and binding.through_claim and access.letter in "rud"
            claim_id = access.resource_id
            if access.resource_type == "ClaimResponse" and claim_id is None and resource is not None:
                claim_id = resource.get("id") if isinstance(resource.get("id"), str) else None
                owner_needed = True
            if owner_needed:
                if claim_id is None:
                    return FacilityFacts.failed("owner_unresolved", "no claim id to check"), None
                owner = await self.owner_claim(upstream, claim_id, request_id, priority)
                owner_id = owner.get("id") if owner is not None and isinstance(owner.get("id"), str) else None
            snapshot = await self.snapshot()
            facts = facts_from(access, resource, owner, owner_needed, snapshot)
            if is_unresolved(facts):
                fresher = await self.snapshot(max_age_s=self.refresh_on_miss_after_s)
                if fresher is not snapshot:
                    facts = facts_from(access, resource, owner, owner_needed, fresher)
            return facts, owner_id
        except DirectoryUnavailable:
            return FacilityFacts.failed("directory_unavailable", "the facility directory is unavailable", 503), None
        except LookupFailed as exc:
            log.warning(JsonEvent.of("authorization.ownership_lookup_failed", request_id=request_id, detail=str(exc)))
            return FacilityFacts.failed("lookup_failed", "openIMIS did not answer the ownership lookup", 502), None


def facts_from(access: Access, resource: Mapping[str, Any] | None, owner: Mapping[str, Any] | None,
               owner_needed: bool, snapshot: FacilitySnapshot) -> FacilityFacts:
    """The pure part of `gather`: the owner's facts and the body's, per FACILITY_BINDINGS."""
    parts: list[FacilityFacts] = []
    if owner_needed:
        parts.append(owner_facts(owner, snapshot))
    binding = FACILITY_BINDINGS.get(access.resource_type)
    if binding is not None and binding.body_facts is not None and access.letter in binding.body_letters:
        if resource is None:
            return FacilityFacts.failed("facility_unverifiable", f"the {binding.body_name} body cannot be read")
        parts.append(binding.body_facts(resource, snapshot))
    if not parts:
        return FacilityFacts.failed("facility_unverifiable",
                                    f"{access.resource_type} {access.letter} cannot be tied to a facility")
    return merge(*parts)
