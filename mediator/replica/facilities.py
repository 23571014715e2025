"""The facility directory's data from the replica: health facilities (Organization) and claim
administrators (PractitionerRole) as the last successful sync stored them, so the directory need not
download from openIMIS what the replica already holds (README "Per-facility enforcement").

Used only when the replica syncs both types and its last successful sync is recent enough (the
directory's ttl_s); otherwise, and whenever the store cannot be read, the directory reads openIMIS.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from mediator.logs import JsonEvent
from mediator.replica.policy import ReplicaPolicy
from mediator.replica.records import SearchQuery
from mediator.replica.store import ReplicaStore

log = logging.getLogger("mediator.facilities")

FACILITY_TYPES = ("Organization", "PractitionerRole")
_PAGE = 500


class ReplicaFacilitySource:
    def __init__(self, policy: ReplicaPolicy, store: ReplicaStore, clock: Callable[[], float] = time.time) -> None:
        self.policy = policy
        self.store = store
        self.clock = clock

    @property
    def holds_facilities(self) -> bool:
        return all(t in self.policy.resource_types for t in FACILITY_TYPES)

    async def resources(self, max_age_s: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
        """(Organizations, PractitionerRoles) of the replica's current generation, or None when it does not
        hold both, has not synced within `max_age_s`, or cannot be read (the directory then reads openIMIS)."""
        if not self.holds_facilities:
            return None
        try:
            state = await self.store.state()
            if state is None or self.clock() - state.last_success > max_age_s:
                return None
            organizations = await self._all(state.generation, "Organization")
            roles = await self._all(state.generation, "PractitionerRole")
        except Exception as exc:   # a store failure is not the directory's: openIMIS is asked instead
            log.warning(JsonEvent.of("facilities.replica_unreadable", error=type(exc).__name__,
                                     effect="reading openIMIS"))
            return None
        return organizations, roles

    async def _all(self, generation: str, rtype: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        offset = 0
        while True:
            page = await self.store.search(generation, rtype, SearchQuery(offset=offset, count=_PAGE))
            for record in page.items:
                document = json.loads(record.body)
                if isinstance(document, dict):
                    found.append(document)
            offset += len(page.items)
            if not page.items or offset >= page.total:
                return found
