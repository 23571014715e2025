"""openIMIS's claim index, read through its GraphQL API (`/api/graphql`) with the mediator's own login.

openIMIS's FHIR API cannot filter claims by health facility (api_fhir_r4 `ClaimViewSet.list` honours only
`identifier`, `patient`, `refDate`, `contained`; `ClaimResponseViewSet` only `_lastUpdated`), and its
`Claim/<code>` read crashes ("'Insuree' object has no attribute 'code'"). Its GraphQL `claims` connection
(claim/schema.py, filter fields of claim/gql_queries.py `ClaimGQLType`) can: `healthFacility_Uuid`,
`insuree_Uuid`, `uuid`, `code`, `orderBy`, `first` (at most 100: graphene RELAY_CONNECTION_MAX_LIMIT),
`offset`, and `totalCount`; it applies the same validity filter as the FHIR lists (`Claim.get_queryset`).

Two questions are asked of it, each in ONE request: who owns a claim (by uuid or code), and which of a
facility's claims are at positions [offset, offset+count) in openIMIS's list order (validity_from).
Every request goes through the upstream's guard (bulkhead + circuit breaker).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from yarl import URL

from mediator.bulkhead import UpstreamGuard
from mediator.facilities import LookupFailed
from mediator.upstream import OpenImisUpstream, UpstreamReply, UpstreamTimeout, UpstreamUnavailable

MAX_PAGE = 100
"""graphene-django's RELAY_CONNECTION_MAX_LIMIT: a larger `first` is an error."""

_NODE = "uuid code validityFrom healthFacility { uuid code }"
OWNER_QUERY = (
    "query MediatorClaimOwner($key: String!) {"
    f" byUuid: claims(uuid: $key, first: 2) {{ edges {{ node {{ {_NODE} }} }} }}"
    f" byCode: claims(code: $key, first: 2) {{ edges {{ node {{ {_NODE} }} }} }} }}"
)
PAGE_QUERY = (
    "query MediatorClaimPage($hf: String!, $patient: String, $code: String, $uuid: String, $first: Int!,"
    " $offset: Int!) { claims(healthFacility_Uuid: $hf, insuree_Uuid: $patient, code: $code, uuid: $uuid,"
    ' orderBy: ["validityFrom", "id"], first: $first, offset: $offset)'
    f" {{ totalCount edges {{ node {{ {_NODE} }} }} }} }}"
)
_ALIAS = re.compile(r"^[0-9a-fA-F-]{1,64}$")


@dataclass(frozen=True, slots=True)
class IndexedClaim:
    uuid: str
    code: str
    validity_from: str
    """openIMIS's naive ISO datetime, e.g. 2018-03-28T10:18:01.630000 (the FHIR lists' order)."""
    facility_uuid: str

    def owner_document(self) -> dict[str, Any]:
        """The claim's owner in the form `facility_scope.owner_facts` reads (a FHIR Claim's provider)."""
        return {"resourceType": "Claim", "id": self.uuid,
                "provider": {"reference": f"Organization/{self.facility_uuid}"}}


@dataclass(frozen=True, slots=True)
class IndexPage:
    total: int
    claims: tuple[IndexedClaim, ...]


def _node(node: Any) -> IndexedClaim:
    if not isinstance(node, dict):
        raise LookupFailed("claim index: a node is not an object")
    hf = node.get("healthFacility")
    values = (node.get("uuid"), node.get("code"), node.get("validityFrom"),
              hf.get("uuid") if isinstance(hf, dict) else None)
    if not all(isinstance(v, str) and v for v in values):
        raise LookupFailed("claim index: a node lacks uuid, code, validityFrom or healthFacility")
    uuid, code, validity_from, facility = (str(v) for v in values)
    return IndexedClaim(uuid, code, validity_from, facility)


def _connection(data: Mapping[str, Any], name: str) -> tuple[int | None, tuple[IndexedClaim, ...]]:
    connection = data.get(name)
    if not isinstance(connection, dict) or not isinstance(connection.get("edges"), list):
        raise LookupFailed(f"claim index: no {name} connection in the answer")
    total = connection.get("totalCount")
    nodes = tuple(_node(e.get("node") if isinstance(e, dict) else None) for e in connection["edges"])
    return (total if isinstance(total, int) else None), nodes


def parse_answer(status: int, body: bytes) -> Mapping[str, Any]:
    """The `data` of a GraphQL answer; LookupFailed for anything else (errors included: fail closed)."""
    if status != 200:
        raise LookupFailed(f"claim index answered {status}")
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise LookupFailed("claim index answer is not JSON") from exc
    if not isinstance(document, dict) or document.get("errors") or not isinstance(document.get("data"), dict):
        raise LookupFailed("claim index answered with errors")
    data: Mapping[str, Any] = document["data"]
    return data


def parse_owner(data: Mapping[str, Any]) -> IndexedClaim | None:
    """openIMIS's retrievers try the uuid first, then the code (api_fhir_r4 ClaimViewSet.retrievers)."""
    for name in ("byUuid", "byCode"):
        _, nodes = _connection(data, name)
        if len(nodes) > 1:
            raise LookupFailed(f"claim index: {name} names more than one claim")
        if nodes:
            return nodes[0]
    return None


def parse_page(data: Mapping[str, Any]) -> IndexPage:
    total, nodes = _connection(data, "claims")
    if total is None:
        raise LookupFailed("claim index: no totalCount")
    return IndexPage(total, nodes)


def owners_query(ids: list[str]) -> str:
    """One request for the owners of many claims: one aliased `claims(uuid:)` connection per id."""
    parts = [f' c{n}: claims(uuid: "{cid}", first: 2) {{ edges {{ node {{ {_NODE} }} }} }}'
             for n, cid in enumerate(ids)]
    return "query MediatorClaimOwners {" + "".join(parts) + " }"


class ClaimIndex:
    """Asks openIMIS's GraphQL API; every request inside `guard` (bulkhead slot + breaker)."""

    def __init__(self, upstream: OpenImisUpstream, guard: UpstreamGuard, graphql_path: str,
                 timeout_s: float, observe: Callable[[str, str], None] | None = None) -> None:
        self.upstream = upstream
        self.observe = observe
        """Called with (kind, outcome) per query: kind owner | owners | page, outcome ok | failed."""
        self.guard = guard
        self.url = URL(str(upstream.base)).with_path(graphql_path).with_query(None)
        self.timeout_s = timeout_s
        self.requests = 0
        """Requests sent (tests and the benchmark read it)."""

    async def _post(self, kind: str, query: str, variables: Mapping[str, Any], priority: int,
                    request_id: str) -> Mapping[str, Any]:
        try:
            data = await self._send(query, variables, priority, request_id)
        except LookupFailed:
            if self.observe is not None:
                self.observe(kind, "failed")
            raise
        if self.observe is not None:
            self.observe(kind, "ok")
        return data

    async def _send(self, query: str, variables: Mapping[str, Any], priority: int,
                    request_id: str) -> Mapping[str, Any]:
        body = json.dumps({"query": query, "variables": dict(variables)}).encode()

        async def send() -> UpstreamReply:
            headers = {"Accept": "application/json", "Content-Type": "application/json",
                       "X-Request-ID": request_id}
            reply: UpstreamReply | None = None
            for attempt in (0, 1):
                token = await self.upstream.token(force=attempt == 1)
                if token:
                    headers["Authorization"] = f"Bearer {token}"
                self.requests += 1
                reply = await self.upstream.send("POST", self.url, headers, body, self.timeout_s)
                if reply.status != 401 or self.upstream.config.login is None:
                    break
            assert reply is not None
            return reply

        try:
            reply = await self.guard.call(priority, send, "lookup:graphql")
        except (UpstreamUnavailable, UpstreamTimeout) as exc:
            raise LookupFailed(f"claim index: {type(exc).__name__}") from exc
        return parse_answer(reply.status, reply.body)

    async def owner(self, key: str, priority: int, request_id: str) -> IndexedClaim | None:
        """The claim whose uuid (else code) is `key`; None if there is none."""
        return parse_owner(await self._post("owner", OWNER_QUERY, {"key": key}, priority, request_id))

    async def owners(self, ids: list[str], priority: int, request_id: str) -> dict[str, IndexedClaim]:
        """Owners of many claims by uuid, in one request; ids that are not plain uuids are left out."""
        wanted = [i for i in ids if _ALIAS.match(i)]
        if not wanted:
            return {}
        data = await self._post("owners", owners_query(wanted), {}, priority, request_id)
        found: dict[str, IndexedClaim] = {}
        for n, cid in enumerate(wanted):
            _, nodes = _connection(data, f"c{n}")
            if len(nodes) == 1:
                found[cid] = nodes[0]
        return found

    async def page(self, facility_uuid: str, offset: int, count: int, priority: int, request_id: str, *,
                   patient: str | None = None, code: str | None = None, uuid: str | None = None) -> IndexPage:
        """The facility's claims at [offset, offset+count) in list order, and how many it has."""
        variables = {"hf": facility_uuid, "patient": patient, "code": code, "uuid": uuid,
                     "first": max(1, min(count, MAX_PAGE)), "offset": offset}
        return parse_page(await self._post("page", PAGE_QUERY, variables, priority, request_id))
