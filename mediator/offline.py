"""Offline evaluation of a described request: the live pipeline stages, and no shared state touched.

`explain` and the policy tests (`openimis-mediator test`, mediator/policy_tests.py) share this one path.
The stages come from the same `build_stages` the server uses, with these substitutions:

* a described principal stands in for the authentication stage (there is no token to verify). No
  Identity is built, so no signing key is created and no replay store entry is written;
* an unconfigured RedisStore: rate limits count in this evaluation's own memory, never in the shared
  Redis (issue 13: explain used to charge the live counters);
* with assumed facts (policy tests, `explain --facts`): the facility directory is the facts' snapshot,
  and openIMIS is replaced by `OfflineUpstream`, which answers the owner lookups (`GET Claim/<id>`) from
  the facts and refuses anything else (each lookup is recorded and reported). Without facts (explain
  alone) the directory and owner lookups go to openIMIS as live: GET requests with the mediator's login.

Nothing is ever forwarded: the evaluation ends where the live mediator would route the request.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry
from pydantic import model_validator
from yarl import URL

from mediator.config import Config
from mediator.config.clients import FACILITY_PATTERN
from mediator.config.models import Strict, UpstreamConfig
from mediator.facilities import FacilitySnapshot, StaticFacilityDirectory
from mediator.fhir import PLAIN_JSON
from mediator.pipeline import Decision, Exchange, Pipeline, Principal
from mediator.redis_store import RedisStore
from mediator.stages import build_stages
from mediator.stages.authentication import unauthenticated
from mediator.upstream import OpenImisUpstream, UpstreamReply, UpstreamUnavailable
from mediator.write_profiles import WriteCheck


class AssumedFacility(Strict):
    """One health facility as the facility directory would know it."""

    keys: tuple[str, ...] = ()
    """Other values naming this facility in references and identifiers (its uuid, its Organization id).
    Its HF code always names it."""
    claim_admins: tuple[str, ...] = ()
    """Its claim administrators' codes: the openIMIS user names a trusted X-User-Name header carries, and
    what Claim.enterer may name them by."""
    claim_admin_keys: tuple[str, ...] = ()
    """Other values naming its claim administrators in Claim.enterer (their uuids)."""


class AssumedFacts(Strict):
    """What openIMIS would answer the mediator's own lookups, stated by the case instead of asked."""

    facilities: dict[str, AssumedFacility] = {}
    """HF code → facility. Absent: no facility is known (every facility check fails closed)."""
    claims: dict[str, str] = {}
    """Existing claims: id (uuid or code, as `ClaimResponse/<id>` names it) → owning HF code. A claim not
    listed does not exist (404 `authorization.owner_not_found`, as live)."""

    @model_validator(mode="after")
    def _codes(self) -> AssumedFacts:
        import re

        pattern = re.compile(FACILITY_PATTERN)
        for code in [*self.facilities, *self.claims.values()]:
            if not pattern.match(code):
                raise ValueError(f"{code!r} is not an HF code")
        seen: dict[str, str] = {}
        for code, facility in self.facilities.items():
            for key in (code, *facility.keys, *facility.claim_admins, *facility.claim_admin_keys):
                if seen.setdefault(key.lower(), code) != code:
                    raise ValueError(f"{key!r} names two facilities ({seen[key.lower()]} and {code})")
        return self

    def over(self, base: AssumedFacts) -> AssumedFacts:
        """These facts, completed by `base` (a case's own facts over its file's)."""
        return AssumedFacts(facilities={**base.facilities, **self.facilities},
                            claims={**base.claims, **self.claims})

    def snapshot(self) -> FacilitySnapshot:
        organizations: dict[str, str] = {}
        practitioners: dict[str, str] = {}
        claim_administrators: dict[str, str] = {}
        for code in self.claims.values():
            organizations[code.lower()] = code
        for code, facility in self.facilities.items():
            for key in (code, *facility.keys):
                organizations[key.lower()] = code
            for admin in (*facility.claim_admins, *facility.claim_admin_keys):
                practitioners[admin.lower()] = code
            for admin in facility.claim_admins:
                claim_administrators[admin] = code   # exact, as openIMIS user names are
        return FacilitySnapshot(organizations, practitioners, float("inf"), claim_administrators)

    def owner_claim(self, claim_id: str) -> dict[str, Any] | None:
        owner = self.claims.get(claim_id)
        if owner is None:
            return None
        return {"resourceType": "Claim", "id": claim_id, "provider": {"reference": f"Organization/{owner}"}}


class OfflineUpstream(OpenImisUpstream):
    """openIMIS as the assumed facts describe it: answers `GET Claim/<id>` (the owner lookup of
    authorization) and refuses every other request with UpstreamUnavailable. Opens no connection."""

    def __init__(self, name: str, config: UpstreamConfig, public_base_url: str, facts: AssumedFacts) -> None:
        super().__init__(name, config, public_base_url, environ={})
        self.facts = facts
        self.lookups: list[str] = []
        """What the stages asked openIMIS, with the assumed answer: reported with a failing case."""

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def token(self, *, force: bool = False) -> str | None:
        return None

    async def send(self, method: str, url: URL, headers: dict[str, str], body: bytes | None,
                   timeout_s: float) -> UpstreamReply:
        relative = url.path[len(self.base.path):].strip("/")
        parts = relative.split("/")
        if method == "GET" and len(parts) == 2 and parts[0] == "Claim" and not url.raw_query_string:
            claim = self.facts.owner_claim(parts[1])
            if claim is None:
                self.lookups.append(f"GET Claim/{parts[1]}: no such claim in the assumed facts")
                return UpstreamReply(404, {}, json.dumps({"resourceType": "OperationOutcome", "issue": [
                    {"severity": "error", "code": "not-found"}]}).encode(), PLAIN_JSON)
            self.lookups.append(f"GET Claim/{parts[1]}: owned by {claim['provider']['reference'][13:]}")
            return UpstreamReply(200, {}, json.dumps(claim).encode(), PLAIN_JSON)
        self.lookups.append(f"{method} {relative}: not answerable offline")
        raise UpstreamUnavailable("offline evaluation: no assumed fact answers this lookup")


class DescribedPrincipal:
    """Stands in for the authentication stage: sets the principal it was given (or refuses as the
    authentication stage would have, when the described caller could not authenticate)."""

    name = "authentication"

    def __init__(self, principal: Principal | Decision | None) -> None:
        self.principal = principal

    async def run(self, exchange: Exchange) -> Decision:
        channel = exchange.channel
        if channel is not None and channel.config.authentication == "none":
            return Decision.allowed("authentication.not_required")
        if isinstance(self.principal, Decision):
            return self.principal
        if self.principal is None:   # as live: a channel requiring authentication refuses no credentials
            return unauthenticated("missing_credentials", "send a bearer access token or a client certificate",
                                   error=None)
        exchange.principal = self.principal
        return Decision.allowed("authentication.described", "the described principal, not verified")


@dataclass(frozen=True, slots=True)
class DescribedRequest:
    method: str
    path: str
    """As the client sends it, with the query: /fhir/Patient?identifier=070707070"""
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | None = None
    client_ip: str = "127.0.0.1"


class _Peer:
    """The transport of the offline request, reporting the described client address."""

    def __init__(self, ip: str) -> None:
        self._ip = ip

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return (self._ip, 50000)
        return default

    def is_closing(self) -> bool:
        return False


@dataclass(slots=True)
class Explanation:
    """Every stage's decision for one described request, the authorization record, the final denial."""

    decisions: list[tuple[str, Decision]]
    authz: dict[str, Any] = field(default_factory=dict)
    final: Decision | None = None
    lookups: list[str] = field(default_factory=list)
    """Owner lookups answered from assumed facts (offline only)."""
    write_check: WriteCheck | None = None
    """What the write firewall decided, by which rule, about which element (None: it did not run)."""

    @property
    def reasons(self) -> list[tuple[str, str]]:
        return [(stage, d.reason) for stage, d in self.decisions]

    @property
    def deciding_stage(self) -> str | None:
        """The stage whose denial ended the request; None when every stage allowed it."""
        return self.decisions[-1][0] if self.final is not None and self.decisions else None

    def lines(self) -> list[str]:
        out = []
        for stage, decision in self.decisions:
            verdict = "allow" if decision.allow else f"deny {decision.status}"
            line = f"{stage:<15} {verdict:<9} {decision.reason}"
            if stage == "authorization":
                line += f"  rule={self.authz.get('rule') or '-'}"
                if self.authz.get("target_facilities"):
                    line += f"  facilities={','.join(self.authz['target_facilities'])}"
                if self.authz.get("filtered"):
                    line += "  (search results filtered to the caller's facilities)"
                if "shadow" in self.authz:
                    shadow = self.authz["shadow"]
                    line += f"  shadow: rule={shadow['rule']} would {shadow['decision']} ({shadow['reason']})"
            if stage == "write" and self.write_check is not None:
                line += f"  rule={self.write_check.rule or '-'}"
                if self.write_check.element is not None:
                    line += f"  element={self.write_check.element}"
            if decision.message:
                line += f"  -- {decision.message}"
            out.append(line)
            for entry in self.authz.get("entries", []) if stage == "authorization" else ():
                out.append(f"{'':<15} entry {entry['index']}: {entry['reason']} rule={entry['rule'] or '-'}")
        for lookup in self.lookups:
            out.append(f"{'':<15} assumed: {lookup}")
        if self.final is None:
            out.append("result: allowed; the live mediator would forward this request to openIMIS")
        else:
            out.append(f"result: {self.final.status} {self.final.reason}")
        return out


def offline_request(request: DescribedRequest) -> Any:
    headers = CIMultiDict(request.headers)
    if request.body is not None and "Content-Type" not in headers:
        headers["Content-Type"] = "application/fhir+json"
    return make_mocked_request(request.method.upper(), request.path, headers=headers,
                               transport=_Peer(request.client_ip))


async def evaluate(config: Config, request: DescribedRequest, principal: Principal | Decision | None,
                   facts: AssumedFacts | None = None) -> Explanation:
    """Run the stages on `request` as `principal`. `facts`: answer lookups from them (offline); None:
    the facility directory and owner lookups go to openIMIS (read-only GETs, the mediator's login)."""
    server = config.channels.server
    upstreams: dict[str, OpenImisUpstream]
    directory = None
    if facts is None:
        upstreams = {name: OpenImisUpstream(name, u, server.public_base_url)
                     for name, u in config.channels.upstreams.items()}
    else:
        upstreams = {name: OfflineUpstream(name, u, server.public_base_url, facts)
                     for name, u in config.channels.upstreams.items()}
        directory = StaticFacilityDirectory(facts.snapshot())
    for upstream in upstreams.values():
        await upstream.start()
    try:
        stages = build_stages(config, upstreams, CollectorRegistry(), redis=RedisStore(None),
                              authentication=DescribedPrincipal(principal), facility_directory=directory)
        exchange = Exchange(offline_request(request), "explain",
                            _body=request.body if request.body is not None else b"")
        final = await Pipeline(stages).run(exchange)
        lookups = [lookup for u in upstreams.values() if isinstance(u, OfflineUpstream) for lookup in u.lookups]
        return Explanation(exchange.decisions, dict(exchange.attributes.get("authz", {})), final, lookups,
                           exchange.write_check)
    finally:
        for upstream in upstreams.values():
            await upstream.close()


__all__ = ["AssumedFacility", "AssumedFacts", "DescribedPrincipal", "DescribedRequest", "Explanation",
           "OfflineUpstream", "evaluate"]
