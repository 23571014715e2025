"""The mediator's own CapabilityStatement (`GET /fhir/metadata`), generated from its configuration.

openIMIS 1.10 has no `/metadata`, and its own statement would not say what the mediator lets through.
This one is built once per runtime from what the mediator really does: a type is readable, searchable
or creatable when a channel routes that request (the same `channel_match.decide` the pipeline uses)
AND some allow rule of policies/authorization.yaml grants it (and, for a create, the write firewall has
a profile allowing it: policies/write_profiles.yaml); its search parameters are the ones the
search stage accepts on that channel (mediator.search_parameters). `rest.security` carries the SMART
`oauth-uris` extension pointing at the token endpoint, the one /.well-known/smart-configuration names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from mediator import __version__
from mediator.config import Config
from mediator.config.authorization import AuthorizationPolicy
from mediator.config.models import ChannelConfig
from mediator.config.write_profiles import WriteProfilesPolicy
from mediator.fhir import FHIR_JSON, PLAIN_JSON, wants_fhir_json
from mediator.replica.policy import ReplicaPolicy
from mediator.search_parameters import (
    OPENIMIS_SEARCH_PARAMETERS,
    REPLICA_SEARCH_PARAMETERS,
    RESULT_PARAMETERS,
    SCOPED_SEARCH_PARAMETERS,
    supported_parameters,
)
from mediator.stages.channel_match import ChannelTable, decide

OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
SECURITY_SERVICE = "http://terminology.hl7.org/CodeSystem/restful-security-service"
# Types openIMIS 1.10 serves (api_fhir_r4/urls.py); only those routed and granted are listed.
CANDIDATE_TYPES = tuple(sorted(set(OPENIMIS_SEARCH_PARAMETERS) | {
    "CodeSystem", "ValueSet", "CoverageEligibilityRequest", "Coverage", "Contract", "Group", "Communication",
    "CommunicationRequest", "Invoice", "PaymentNotice", "Subscription"}))
SEARCH_PARAMETER_TYPES = {
    "_lastUpdated": "date", "identifier": "token", "code": "token", "name": "string", "patient": "reference",
    "refDate": "date", "claimDateFrom": "date", "physicalType": "token", "type": "token", "resourceType": "token",
    "contained": "token",
}
_PROBE_ID = "capability-probe"
_INTERACTIONS = (("read", "GET", True, "r"), ("search-type", "GET", False, "s"), ("create", "POST", False, "c"))


@dataclass(frozen=True, slots=True)
class _Grant:
    allowed: bool
    required_params: frozenset[str] = frozenset()
    """Every granting permission is constrained (`?param=*`): the search must give one of these."""


def _granted(policy: AuthorizationPolicy | None, resource_type: str, letter: str) -> _Grant:
    if policy is None:   # no policy: the authorization stage denies everything (authorization_absent)
        return _Grant(False)
    permissions = [p for rule in policy.rules if rule.effect == "allow" and rule.mode == "enforce"
                   for p in rule.permissions
                   if p.resource_type in ("*", resource_type) and letter in p.letters]
    if not permissions:
        return _Grant(False)
    if any(p.param is None for p in permissions):
        return _Grant(True)
    return _Grant(True, frozenset(p.param for p in permissions if p.param is not None))


def _max_count(rtype: str, channel: ChannelConfig, replica: ReplicaPolicy | None,
               policy: AuthorizationPolicy | None) -> int:
    """What the search stage caps `_count` at (SearchParameterStage.run)."""
    scoped = rtype in SCOPED_SEARCH_PARAMETERS and supported_parameters(rtype, channel, replica) is not \
        REPLICA_SEARCH_PARAMETERS
    if scoped and policy is not None:
        return min(channel.fhir_answers.max_count, policy.search_results.max_page_size)
    return channel.fhir_answers.max_count


def build_statement(config: Config, token_url: str, generated_at: datetime | None = None) -> dict[str, Any]:
    server = config.channels.server
    table = ChannelTable.from_config(config)
    prefix = urlsplit(server.public_base_url).path
    policy = config.policies.get("authorization")
    policy = policy if isinstance(policy, AuthorizationPolicy) else None
    replica = config.policies.get("replica")
    replica = replica if isinstance(replica, ReplicaPolicy) else None
    writes = config.policies.get("write_profiles")
    writable = {rtype for rtype, profile in writes.profiles.items() if "create" in profile.interactions} \
        if isinstance(writes, WriteProfilesPolicy) else set()   # absent: the write firewall refuses every write
    resources: list[dict[str, Any]] = []
    for rtype in CANDIDATE_TYPES:
        interactions: list[dict[str, str]] = []
        params: list[dict[str, Any]] = []
        notes: list[str] = []
        for code, method, by_id, letter in _INTERACTIONS:
            path = f"{prefix}{rtype}/{_PROBE_ID}" if by_id else f"{prefix}{rtype}"
            match = decide(method, path, path, table)
            grant = _granted(policy, rtype, letter)
            if not match.decision.allow or match.channel is None or not grant.allowed or \
                    (code == "create" and rtype not in writable):
                continue
            interactions.append({"code": code})
            if code == "search-type":
                supported = supported_parameters(rtype, match.channel.config, replica) - RESULT_PARAMETERS
                params = [{"name": name, "type": SEARCH_PARAMETER_TYPES.get(name, "string")}
                          for name in sorted(supported) if ":" not in name]
                if grant.required_params:
                    notes.append("A search must give " + " or ".join(sorted(grant.required_params)) + ".")
                notes.append(f"_count is reduced to {_max_count(rtype, match.channel.config, replica, policy)}.")
        if not interactions:
            continue
        entry: dict[str, Any] = {"type": rtype, "interaction": interactions, "versioning": "no-version",
                                 "readHistory": False, "updateCreate": False, "conditionalCreate": False}
        if params:
            entry["searchParam"] = params
        if notes:
            entry["documentation"] = " ".join(notes)
        resources.append(entry)
    rest: dict[str, Any] = {
        "mode": "server",
        "documentation": "openIMIS Mediator in front of openIMIS's FHIR R4 API. Unsupported search "
                         "parameters are ignored (Prefer: handling=lenient, the default; the self link lists "
                         "those used) or refused with 400 (Prefer: handling=strict).",
        "security": {
            "cors": False,
            "service": [{"coding": [{"system": SECURITY_SERVICE, "code": "SMART-on-FHIR"}]}],
            "description": "SMART Backend Services (private_key_jwt client assertion at the token endpoint) "
                           "or mutual TLS; users of an HMS are identified by an X-User-Token.",
            "extension": [{"url": OAUTH_URIS, "extension": [{"url": "token", "valueUri": token_url}]}],
        },
        "resource": resources,
    }
    batch_path = prefix
    batch = decide("POST", batch_path, batch_path, table)
    if batch.decision.allow and batch.channel is not None and batch.channel.config.batch is not None and \
            set(batch.channel.config.batch.resource_types) & writable:
        rest["interaction"] = [{"code": "batch"}]
    when = (generated_at or datetime.now(UTC)).replace(microsecond=0)
    return {
        "resourceType": "CapabilityStatement",
        "id": "openimis-mediator",
        "status": "active",
        "date": when.isoformat().replace("+00:00", "Z"),
        "publisher": "openIMIS Mediator",
        "kind": "instance",
        "software": {"name": "openIMIS Mediator", "version": __version__},
        "implementation": {"description": "openIMIS Mediator", "url": server.public_base_url},
        "fhirVersion": "4.0.1",
        "format": [FHIR_JSON, "json"],
        "rest": [rest],
    }


class CapabilityStatement:
    """The compiled statement of one runtime and its response."""

    def __init__(self, statement: dict[str, Any]) -> None:
        self.statement = statement
        self._body = json.dumps(statement, separators=(",", ":")).encode()

    @classmethod
    def from_config(cls, config: Config, token_url: str) -> CapabilityStatement:
        return cls(build_statement(config, token_url))

    def response(self, request: web.Request) -> web.Response:
        content_type = FHIR_JSON if wants_fhir_json(request) or "json" not in request.headers.get("Accept", "") \
            else PLAIN_JSON
        return web.Response(body=self._body, content_type=content_type, charset="utf-8",
                            headers={"Cache-Control": "public, max-age=300"})
