"""The write firewall: a body is forwarded only if its type's write profile allows every element of it.

Runs after authorization (README "Write firewall" says why) and before rate limiting and openIMIS.
The evaluation is pure (mediator.write_profiles.check_write); this stage gathers its facts: the parsed
body (the request stage), the caller's facilities (authentication) and, when a profile binds references
to the caller's facility, a snapshot of the same facility directory authorization uses.
"""

from __future__ import annotations

import logging
from typing import Any

from mediator.config import Config
from mediator.config.write_profiles import WriteProfilesPolicy
from mediator.facilities import DirectoryUnavailable, FacilityDirectory, FacilitySnapshot
from mediator.logs import JsonEvent
from mediator.pipeline import Decision, Exchange
from mediator.write_profiles import REASON, WriteCheck, check_write

log = logging.getLogger("mediator.write_firewall")

NAME = "write"
INTERACTION_BY_METHOD = {"POST": "create", "PUT": "update", "PATCH": "patch"}


class WriteFirewallStage:
    """Pipeline stage "write" (reason codes write.*). Built per runtime; stateless per request."""

    name = NAME

    def __init__(self, policy: WriteProfilesPolicy, directory: FacilityDirectory | None) -> None:
        self.policy = policy
        self.directory = directory
        self.needs_directory = policy.needs_directory()

    @classmethod
    def from_config(cls, config: Config, directory: FacilityDirectory | None) -> WriteFirewallStage:
        """Absent policies/write_profiles.yaml: no type has a profile, so every write is refused (fail
        closed, like an absent authorization policy); a WARNING at start and on every reload says why."""
        if "write_profiles" not in config.policies:
            log.warning(JsonEvent.of("write.no_profile", file="policies/write_profiles.yaml",
                                      effect="every write is refused"))
            return cls(WriteProfilesPolicy(version=1), directory)
        return cls(config.policy("write_profiles", WriteProfilesPolicy), directory)

    async def _snapshot(self) -> FacilitySnapshot | None:
        if not self.needs_directory or self.directory is None:
            return None
        return await self.directory.snapshot()

    async def run(self, exchange: Exchange) -> Decision:
        fhir = exchange.fhir
        if exchange.body is None or fhir is None:
            return Decision.allowed(f"{REASON}.no_body")
        caller = exchange.principal.health_facilities if exchange.principal is not None else frozenset()
        try:
            snapshot = await self._snapshot()
        except DirectoryUnavailable:
            exchange.write_check = WriteCheck(Decision.denied(f"{REASON}.directory_unavailable", 503,
                                                              "the facility directory is unavailable"))
            return exchange.write_check.decision
        document = exchange.body.document
        if fhir.interaction == "batch-or-transaction":
            check = self.check_bundle(document, caller, snapshot)
        elif fhir.interaction in ("create", "update"):
            check = check_write(self.policy, exchange.body.resource_type, fhir.interaction, document,
                                caller, snapshot)
        else:
            # PATCH bodies (JSON Patch, FHIRPath Patch), POST _search and $operations cannot be profiled.
            check = WriteCheck(Decision.denied(f"{REASON}.interaction_not_allowed", 403,
                                               f"a {exchange.request.method} {fhir.interaction} body cannot be "
                                               "checked by a write profile"), None, "profiles")
        exchange.write_check = check
        return check.decision

    def check_bundle(self, bundle: dict[str, Any], caller: frozenset[str],
                     snapshot: FacilitySnapshot | None) -> WriteCheck:
        """Every entry that carries a resource is checked against its type's profile; the first refusal
        refuses the whole Bundle (as authorization does: nothing of a refused Bundle is forwarded)."""
        entries = bundle.get("entry") or []
        if not isinstance(entries, list):
            return WriteCheck(Decision.denied(f"{REASON}.element_not_allowed", 422, "Bundle.entry: must be a list"),
                              "Bundle.entry", "bundle")
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict) or entry.get("resource") is None:
                continue   # nothing to write; the batch splitter answers malformed entries itself
            resource = entry["resource"]
            request = entry.get("request")
            method = request.get("method") if isinstance(request, dict) else None
            interaction = INTERACTION_BY_METHOD.get(method.upper()) if isinstance(method, str) else None
            kind = resource.get("resourceType") if isinstance(resource, dict) else None
            where = f"Bundle.entry[{index}].resource."
            if not isinstance(kind, str):
                return WriteCheck(Decision.denied(f"{REASON}.not_a_resource", 422,
                                                  f"entry {index}: {where[:-1]}: not a FHIR resource"),
                                  where[:-1], "bundle", index)
            if interaction not in ("create", "update"):
                return WriteCheck(Decision.denied(f"{REASON}.interaction_not_allowed", 403,
                                                  f"entry {index}: only POST and PUT entries may carry a resource"),
                                  f"Bundle.entry[{index}].request.method", "bundle", index)
            check = check_write(self.policy, kind, interaction, resource, caller, snapshot, where=where)
            if not check.decision.allow:
                denial = check.decision
                return WriteCheck(Decision.denied(denial.reason, denial.status, f"entry {index}: {denial.message}"),
                                  check.element, check.rule, index)
        return WriteCheck(Decision.allowed(f"{REASON}.allowed"), None, "bundle")
