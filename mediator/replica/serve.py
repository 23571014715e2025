"""Answering FHIR reads and searches from the replica, without touching openIMIS.

Runs after every pipeline stage allowed the request (it is a route target, like the upstream). Answers
`read` (by id, else by code) and `search-type` on replicated types; anything else returns None and the
channel's upstream answers. Responses carry a weak ETag (304 on If-None-Match), Last-Modified,
`X-Replica-Age` and, beyond the policy's max_lag_s, `Warning: 110 - "Response is Stale"`; bodies from
1 KiB are gzip-compressed when the client's Accept-Encoding names gzip.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate
from urllib.parse import urlencode

from aiohttp import web
from multidict import MultiMapping

from mediator.fhir import FHIR_JSON, PLAIN_JSON, FhirRequest, operation_outcome_response, wants_fhir_json
from mediator.metrics import Metrics
from mediator.pipeline import Decision
from mediator.replica.policy import ReplicaPolicy
from mediator.replica.records import SearchQuery, StoredResource, SyncState, parse_instant
from mediator.replica.store import ReplicaStore, ReplicaStoreError

SEARCH_PARAMETERS = frozenset({"_count", "page-offset", "identifier", "code", "name", "name:contains",
                               "_lastUpdated", "_format"})
COMPRESS_FROM_BYTES = 1024
STALE_WARNING = '110 - "Response is Stale"'  # RFC 7234 §5.5.1


class InvalidSearch(ValueError):
    """The search cannot be answered as asked; the message is safe to show the caller."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Answer:
    """The replica's response and the reason code logged and counted for it."""

    response: web.StreamResponse
    reason: str

    @property
    def decision(self) -> Decision:
        if self.response.status < 400:
            return Decision.allowed(self.reason)
        return Decision.denied(self.reason, self.response.status, "")


@dataclass(frozen=True, slots=True)
class ParsedSearch:
    query: SearchQuery
    page: int
    by_code: bool
    canonical: list[tuple[str, str]]
    """Filters as given, in a fixed order, for self/next links."""


def _single(query: MultiMapping[str], key: str) -> str | None:
    values = query.getall(key, [])
    if len(values) > 1:
        raise InvalidSearch("replica.invalid_parameter", f"{key} may be given only once")
    return values[0] if values else None


def parse_search(query: MultiMapping[str], policy: ReplicaPolicy) -> ParsedSearch:
    """`query`: the parameters the search stage kept (mediator.search_parameters applies the unknown-
    parameter rule first); anything else here is refused."""
    unknown = sorted(set(query) - SEARCH_PARAMETERS)
    if unknown:
        # openIMIS silently ignores unknown parameters and answers everything; we say so instead.
        raise InvalidSearch("replica.unsupported_parameter",
                            f"unsupported search parameter {unknown[0]!r}; supported: "
                            + ", ".join(sorted(SEARCH_PARAMETERS)))
    canonical: list[tuple[str, str]] = []
    try:
        count = int(_single(query, "_count") or policy.default_page_size)
        page = int(_single(query, "page-offset") or 1)
    except ValueError:
        raise InvalidSearch("replica.invalid_parameter", "_count and page-offset must be integers") from None
    if count < 0 or page < 1:
        raise InvalidSearch("replica.invalid_parameter", "_count must be >= 0 and page-offset >= 1")
    count = min(count, policy.max_page_size)
    identifier, code = _single(query, "identifier"), _single(query, "code")
    if identifier is not None and code is not None:
        raise InvalidSearch("replica.invalid_parameter", "give identifier or code, not both")
    key = identifier if identifier is not None else code
    if key is not None:
        canonical.append(("identifier" if identifier is not None else "code", key))
        key = key.rsplit("|", 1)[-1].lower()  # system|value: openIMIS codes are unique without the system
    names = [v for k in ("name", "name:contains") for v in query.getall(k, [])]
    if len(names) > 1:
        raise InvalidSearch("replica.invalid_parameter", "name may be given only once")
    name = names[0].lower() if names else None
    if names:
        canonical.append(("name", names[0]))
    bounds: dict[str, tuple[float, bool]] = {}
    for value in query.getall("_lastUpdated", []):
        prefix, instant = value[:2], parse_instant(value[2:])
        if prefix not in ("ge", "gt", "le", "lt") or instant is None:
            raise InvalidSearch("replica.invalid_parameter",
                                "_lastUpdated must be ge|gt|le|lt followed by a date or date-time, "
                                "e.g. ge2024-05-01T00:00:00Z")
        side = "since" if prefix in ("ge", "gt") else "until"
        if side in bounds:
            raise InvalidSearch("replica.invalid_parameter", "_lastUpdated has two lower or two upper bounds")
        bounds[side] = (instant, prefix in ("ge", "le"))
        canonical.append(("_lastUpdated", value))
    since, until = bounds.get("since"), bounds.get("until")
    query = SearchQuery(code=key, name=name,
                        since=since[0] if since else None, since_inclusive=since[1] if since else True,
                        until=until[0] if until else None, until_inclusive=until[1] if until else True,
                        offset=(page - 1) * count, count=count)
    return ParsedSearch(query, page, key is not None, canonical)


def _etag_matches(header: str, etag: str) -> bool:
    wanted = {t.strip().removeprefix("W/") for t in header.split(",")}
    return "*" in wanted or etag.removeprefix("W/") in wanted


class ReplicaReader:
    """Answers requests from a store. Stateless apart from its collaborators; safe for concurrent use."""

    def __init__(self, policy: ReplicaPolicy, store: ReplicaStore, metrics: Metrics, public_base_url: str,
                 clock: Callable[[], float] = time.time) -> None:
        self.policy = policy
        self.store = store
        self.metrics = metrics
        self.public_base_url = public_base_url
        self.clock = clock
        self.served_types = policy.served_types
        self.last_success: float | None = None
        """The newest last_success seen in the store, for the lag gauge."""

    def serves(self, fhir: FhirRequest) -> bool:
        return fhir.interaction in ("read", "search-type") and fhir.resource_type in self.served_types

    async def answer(self, request: web.Request, fhir: FhirRequest,
                     query: MultiMapping[str] | None = None) -> Answer | None:
        """The replica's response, or None when the channel's upstream should answer instead.
        `query`: the search parameters to use (default: the request's)."""
        if not self.serves(fhir):
            return None
        rtype = fhir.resource_type
        assert rtype is not None
        try:
            state = await self.store.state()
            if state is None:
                return self._unavailable(rtype, "replica.not_synced", "the master-data replica has not synced yet")
            self.last_success = state.last_success
            if fhir.interaction == "read":
                assert fhir.resource_id is not None
                return await self._read(request, state, rtype, fhir.resource_id)
            return await self._search(request, state, rtype, request.query if query is None else query)
        except ReplicaStoreError:
            return self._unavailable(rtype, "replica.store_error", "the master-data replica cannot be read")

    def _unavailable(self, rtype: str, reason: str, message: str) -> Answer | None:
        if self.policy.never_synced == "upstream":
            self.metrics.replica_requests.labels(rtype, "fallback").inc()
            return None
        self.metrics.replica_requests.labels(rtype, "unavailable").inc()
        return Answer(operation_outcome_response(503, reason, message, {"Retry-After": "60"}), reason)

    def _refuse(self, rtype: str, outcome: str, status: int, reason: str, message: str) -> Answer:
        self.metrics.replica_requests.labels(rtype, outcome).inc()
        return Answer(operation_outcome_response(status, reason, message), reason)

    async def _read(self, request: web.Request, state: SyncState, rtype: str, key: str) -> Answer:
        record = await self.store.get(state.generation, rtype, key)
        if record is None:
            record = await self.store.get_by_code(state.generation, rtype, key)
        if record is None:
            return self._refuse(rtype, "not_found", 404, "replica.not_found", f"{rtype}/{key} is not in the replica")
        return self._respond(request, state, rtype, record.body, f'W/"{record.digest}"', record.last_updated)

    async def _search(self, request: web.Request, state: SyncState, rtype: str,
                      query: MultiMapping[str]) -> Answer:
        try:
            search = parse_search(query, self.policy)
        except InvalidSearch as exc:
            return self._refuse(rtype, "invalid", 400, exc.reason, str(exc))
        page = await self.store.search(state.generation, rtype, search.query)
        if search.by_code and self.policy.identifier_search == "bare_resource":
            # openIMIS answers ?identifier= and ?code= with the resource itself (README "openIMIS facts").
            if not page.items:
                return self._refuse(rtype, "not_found", 404, "replica.not_found", f"no {rtype} with that identifier")
            record = page.items[0]
            return self._respond(request, state, rtype, record.body, f'W/"{record.digest}"', record.last_updated)
        body = self._bundle(rtype, search, page.total, page.items)
        newest = max((r.last_updated for r in page.items), default=state.last_success)
        return self._respond(request, state, rtype, body, f'W/"{hashlib.sha256(body).hexdigest()[:32]}"', newest)

    def _page_url(self, rtype: str, search: ParsedSearch, page: int) -> str:
        query = [*search.canonical, ("_count", str(search.query.count)), ("page-offset", str(page))]
        return f"{self.public_base_url}{rtype}?{urlencode(query)}"

    def _bundle(self, rtype: str, search: ParsedSearch, total: int, items: list[StoredResource]) -> bytes:
        links = [{"relation": "self", "url": self._page_url(rtype, search, search.page)}]
        if search.query.count and search.query.offset + search.query.count < total:
            links.append({"relation": "next", "url": self._page_url(rtype, search, search.page + 1)})
        if search.page > 1:
            links.append({"relation": "previous", "url": self._page_url(rtype, search, search.page - 1)})
        head = json.dumps({"resourceType": "Bundle", "type": "searchset", "total": total, "link": links},
                          separators=(",", ":"))[:-1].encode()
        # Stored bodies are already the JSON we serve: splice them in rather than parse and re-encode.
        entries = b",".join(
            b'{"fullUrl":' + json.dumps(f"{self.public_base_url}{rtype}/{r.rid}").encode()
            + b',"resource":' + r.body + b',"search":{"mode":"match"}}' for r in items)
        return head + b',"entry":[' + entries + b"]}"

    def _respond(self, request: web.Request, state: SyncState, rtype: str, body: bytes, etag: str,
                 last_modified: float) -> Answer:
        age = max(0.0, self.clock() - state.last_success)
        headers = {"ETag": etag, "Last-Modified": formatdate(last_modified, usegmt=True),
                   "X-Replica-Age": str(int(age)), "Vary": "Accept-Encoding"}
        if age > self.policy.max_lag_s:
            headers["Warning"] = STALE_WARNING
        if_none_match = request.headers.get("If-None-Match")
        if if_none_match and _etag_matches(if_none_match, etag):
            self.metrics.replica_requests.labels(rtype, "not_modified").inc()
            return Answer(web.Response(status=304, headers=headers), "replica.not_modified")
        self.metrics.replica_requests.labels(rtype, "hit").inc()
        content_type = FHIR_JSON if wants_fhir_json(request) else PLAIN_JSON
        response = web.Response(body=body, headers=headers, content_type=content_type, charset="utf-8")
        accepted = request.headers.get("Accept-Encoding", "").lower()
        if len(body) >= COMPRESS_FROM_BYTES and "gzip" in accepted:
            # Forced: left to itself aiohttp prefers deflate, which some HMS HTTP stacks mishandle (RFC 9110 §8.4.1.2).
            response.enable_compression(web.ContentCoding.gzip)
        return Answer(response, "replica.hit")
