"""Offline evaluation of a described request: the live pipeline stages, and no shared state touched.

`explain` and the policy tests (`openimis-mediator test`, mediator/policy_tests.py) share this one path.
The stages come from the same `build_stages` the server uses, with these substitutions:

* a described principal stands in for the authentication stage (there is no token to verify). No
  Identity is built, so no signing key is created and no replay store entry is written;
* an unconfigured RedisStore: rate limits count in this evaluation's own memory, never in the shared
  Redis (issue 13: explain used to charge the live counters);
* fresh upstream guards (bulkhead + breaker): this evaluation's own, in memory;
* with assumed facts (policy tests, `explain --facts`): the facility directory is the facts' snapshot,
  and openIMIS is replaced by `OfflineUpstream`, which answers the claim index's owner lookup (the
  `MediatorClaimOwner` GraphQL query of mediator/claim_index.py, by uuid or claim code) from the facts
  and refuses anything else (each lookup is recorded and reported). The live `ClaimIndex` code asks it,
  so the answer is parsed and guarded as live. Without facts (explain alone) the directory and the owner
  lookups go to openIMIS as live: read-only requests with the mediator's login.

Nothing is ever forwarded: the evaluation ends where the live mediator would route the request. A search
of a facility-bound type (Claim, ClaimResponse, ...) that authorization allows is answered live by the
mediator itself from the caller's facility's claims (mediator/stages/authorization_search.py): offline,
the decision and the facility it is scoped to are evaluated, which claims the page would hold is not
(`Explanation.scoped_search`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry
from pydantic import model_validator
from yarl import URL

from mediator.claim_index import OWNER_QUERY
from mediator.config import Config
from mediator.config.clients import FACILITY_PATTERN
from mediator.config.models import Strict, UpstreamConfig
from mediator.facilities import FacilitySnapshot, StaticFacilityDirectory
from mediator.fhir import PLAIN_JSON
from mediator.pipeline import Decision, Exchange, Pipeline, Principal
from mediator.redis_store import RedisStore
from mediator.replica.policy import ReplicaPolicy
from mediator.request_view import RequestView
from mediator.stages import build_stages
from mediator.stages.authentication import unauthenticated
from mediator.stages.authorization_search import ScopedSearch
from mediator.upstream import OpenImisUpstream, UpstreamReply, UpstreamUnavailable
from mediator.write_profiles import WriteCheck

_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


class AssumedFacility(Strict):
    """One health facility as the facility directory would know it."""

    keys: tuple[str, ...] = ()
    """Other values naming this facility in references and identifiers (its uuid, its Organization id).
    Its HF code always names it. The first key shaped like a uuid is its openIMIS uuid (what the claim
    index names the owning facility by); none: its HF code stands in for it."""
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
    """Existing claims: id (uuid or claim code, as `ClaimResponse/<id>` names it) → owning HF code: what
    the claim index answers the owner lookup by that uuid or code. A claim named both ways is listed under
    each name. A claim not listed does not exist (404 `authorization.owner_not_found`, as live)."""

    @model_validator(mode="after")
    def _codes(self) -> AssumedFacts:
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

    def facility_uuid(self, code: str) -> str:
        """The facility's openIMIS uuid as the claim index names it (its HF code when none is assumed)."""
        facility = self.facilities.get(code)
        keys = facility.keys if facility is not None else ()
        return next((key for key in keys if _UUID.match(key)), code)

    def snapshot(self) -> FacilitySnapshot:
        organizations: dict[str, str] = {}
        practitioners: dict[str, str] = {}
        claim_administrators: dict[str, str] = {}
        facility_uuids: dict[str, str] = {}
        for code in self.claims.values():
            organizations[code.lower()] = code
            facility_uuids[code] = code
        for code, facility in self.facilities.items():
            for key in (code, *facility.keys):
                organizations[key.lower()] = code
            facility_uuids[code] = self.facility_uuid(code)
            for admin in (*facility.claim_admins, *facility.claim_admin_keys):
                practitioners[admin.lower()] = code
            for admin in facility.claim_admins:
                claim_administrators[admin] = code   # exact, as openIMIS user names are
        return FacilitySnapshot(organizations, practitioners, float("inf"), claim_administrators, facility_uuids)

    def owner_answer(self, key: str) -> tuple[dict[str, Any], str | None]:
        """The claim index's answer to its owner query (`OWNER_QUERY`) for `key`, as openIMIS's GraphQL
        API would give it, and the owning HF code (None: no such claim). A uuid-shaped key is found by
        uuid, any other by code, as openIMIS's retrievers try them."""
        owner = self.claims.get(key)
        edges: list[dict[str, Any]] = []
        if owner is not None:
            edges.append({"node": {"uuid": key, "code": key, "validityFrom": "2000-01-01T00:00:00",
                                   "healthFacility": {"uuid": self.facility_uuid(owner), "code": owner}}})
        by_uuid = bool(_UUID.match(key))
        return {"data": {"byUuid": {"edges": edges if by_uuid else []},
                         "byCode": {"edges": [] if by_uuid else edges}}}, owner


class OfflineUpstream(OpenImisUpstream):
    """openIMIS as the assumed facts describe it: answers the claim index's owner lookup (`POST` of
    `OWNER_QUERY` to the GraphQL API, by uuid or claim code) and refuses every other request with
    UpstreamUnavailable (the stages turn that into their fail-closed denial). Opens no connection."""

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

    @staticmethod
    def _owner_key(method: str, body: bytes | None) -> str | None:
        if method != "POST" or body is None:
            return None
        try:
            document = json.loads(body)
        except ValueError:
            return None
        if not isinstance(document, dict) or document.get("query") != OWNER_QUERY:
            return None
        key = (document.get("variables") or {}).get("key")
        return key if isinstance(key, str) else None

    async def send(self, method: str, url: URL, headers: dict[str, str], body: bytes | None,
                   timeout_s: float) -> UpstreamReply:
        key = self._owner_key(method, body)
        if key is not None:
            answer, owner = self.facts.owner_answer(key)
            self.lookups.append(f"claim index owner of {key}: "
                                + (f"owned by {owner}" if owner else "no such claim in the assumed facts"))
            return UpstreamReply(200, {}, json.dumps(answer).encode(), PLAIN_JSON)
        relative = url.path[len(self.base.path):].strip("/") if url.path.startswith(self.base.path) else url.path
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


@dataclass(slots=True)
class Explanation:
    """Every stage's decision for one described request, the authorization record, the final denial."""

    decisions: list[tuple[str, Decision]]
    authz: dict[str, Any] = field(default_factory=dict)
    final: Decision | None = None
    lookups: list[str] = field(default_factory=list)
    """Claim-index owner lookups answered from assumed facts (offline only)."""
    write_check: WriteCheck | None = None
    """What the write firewall decided, by which rule, about which element (None: it did not run)."""
    scoped_search: str | None = None
    """An allowed search of a facility-bound type: the HF code of the facility whose claims the mediator
    answers it from, live (openIMIS's claim index). Which claims that page would hold is not evaluated
    offline."""
    answered_by: str | None = None
    """An allowed request the live mediator answers without openIMIS: what answers it (the mediator's
    CapabilityStatement; the master-data replica of a `serve_from: replica` channel)."""

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
        if self.final is None and self.scoped_search is not None:
            out.append("result: allowed; the live mediator would answer this search itself from the claims of "
                       f"facility {self.scoped_search} (openIMIS's claim index); the page's entries are not "
                       "evaluated offline")
        elif self.final is None and self.answered_by is not None:
            out.append(f"result: allowed; the live mediator would answer this request itself ({self.answered_by})")
        elif self.final is None:
            out.append("result: allowed; the live mediator would forward this request to openIMIS")
        else:
            out.append(f"result: {self.final.status} {self.final.reason}")
        return out


def offline_request(request: DescribedRequest) -> RequestView:
    headers = dict(request.headers)
    if request.body is not None and not any(k.lower() == "content-type" for k in headers):
        headers["Content-Type"] = "application/fhir+json"
    return RequestView.described(request.method, request.path, headers, request.client_ip)


def _answered_by(config: Config, exchange: Exchange) -> str | None:
    """What the route steps before `forward` would answer this request with (chain.py: capabilities,
    replica), so explain does not say openIMIS gets a request it never sees."""
    fhir, channel = exchange.fhir, exchange.channel
    if fhir is None or channel is None:
        return None
    if fhir.interaction == "capabilities":
        return "its own CapabilityStatement"
    replica = config.policies.get("replica")
    if (channel.config.serve_from == "replica" and isinstance(replica, ReplicaPolicy)
            and fhir.interaction in ("read", "search-type") and fhir.resource_type in replica.served_types):
        return "from the master-data replica"
    return None


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
        scoped = None
        if isinstance(exchange.served_by, ScopedSearch) and exchange.principal is not None:
            # Scoped searches need a caller of exactly one facility (authorization.search_facility_ambiguous).
            scoped = ",".join(sorted(exchange.principal.health_facilities))
        authz = exchange.authorization_facts.as_dict() if exchange.authorization_facts is not None else {}
        return Explanation(exchange.decisions, authz, final, lookups, exchange.write_check, scoped,
                           _answered_by(config, exchange))
    finally:
        for upstream in upstreams.values():
            await upstream.close()


__all__ = ["AssumedFacility", "AssumedFacts", "DescribedPrincipal", "DescribedRequest", "Explanation",
           "OfflineUpstream", "evaluate"]
