"""Facility-scoped searches: the mediator answers searches of facility-bound types itself, from the
caller's own claims only, in at most two openIMIS requests per page.

openIMIS's FHIR lists cannot be narrowed to a health facility (see mediator.claim_index), so filtering its
answer afterwards leaks: the scheme-wide `total`, pages emptied of foreign entries, their positions, and one
owner lookup per entry. Instead, per page:

1. the claim index (GraphQL, one request) names the caller's facility's claims at positions
   [offset, offset + count) in openIMIS's list order (validity_from), and how many the facility has;
2. one FHIR list read (the *window*) starting at the first of them brings their content: ClaimResponse
   `_lastUpdated=ge<its second>` with `_count` = twice the page's claims (at least 10, at most
   `search_results.window_entries`: openIMIS spends ~50 ms per ClaimResponse it serialises, measured on the
   demo backend, so the window follows the page, not the maximum); Claim `refDate=<its date>` (a whole day
   earlier claims included) with `_count` = `window_entries`. Only entries the index named are served, in
   index order; everything else in the window is discarded unseen.

A page of one claim reads it directly (`<Type>/<uuid>`) instead of a window: exact and cheaper.
If the window holds fewer of the named claims than asked (other facilities' claims crowd it, or openIMIS's
hour-long list-count cache cuts the list short), the page is the longest run of named claims the window did
hold and the `next` link continues from there: pages may be shorter than `_count`, never foreign, never
empty. If it holds none of them, a third request reads the first named claim directly (the only case
above two requests per page; counted as `fallback` in mediator_authorization_search_pages_total).
The answer's `total` is the caller's own count; links carry `_count` and `_offset` (positions among the
caller's own claims only).

`parse_search` and `assemble_page` are pure; `ScopedSearch.run` does the I/O, inside the upstream's guard.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from mediator.bulkhead import UpstreamGuard
from mediator.claim_index import ClaimIndex, IndexedClaim, IndexPage
from mediator.errors import MediatorError
from mediator.facilities import LookupFailed
from mediator.fhir import operation_outcome_response
from mediator.logs import JsonEvent
from mediator.pipeline import Decision
from mediator.request_view import RequestView
from mediator.upstream import OpenImisUpstream, ParsedResponse, response_document

log = logging.getLogger("mediator.authorization")

NAME = "authorization"
SCOPED_TYPES = frozenset({"Claim", "ClaimResponse"})
"""Facility-bound types whose searches can be scoped (both are Claims in openIMIS). CommunicationRequest
and CoverageEligibilityRequest searches cannot: openIMIS's index has no filter for their selection."""
COMMON_PARAMS = frozenset({"_count", "_offset", "page-offset"})
PARAMS = {"Claim": COMMON_PARAMS | {"patient", "identifier", "contained"},
          "ClaimResponse": COMMON_PARAMS | {"identifier"}}
DEFAULT_COUNT = 10
"""openIMIS's default page size (api_fhir_r4 GeneralConfiguration)."""
UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
MAX_OFFSET = 10_000_000
WINDOW_MIN = 10


@dataclass(frozen=True, slots=True)
class SearchRequest:
    """A facility-scoped search, as understood (only parameters we know what openIMIS does with)."""

    resource_type: str
    count: int
    offset: int
    patient: str | None = None
    identifier: str | None = None
    contained: bool = False

    def link(self, public_base_url: str, offset: int) -> str:
        params: list[tuple[str, str]] = []
        if self.patient is not None:
            params.append(("patient", self.patient))
        if self.identifier is not None:
            params.append(("identifier", self.identifier))
        if self.contained:
            params.append(("contained", "true"))
        params += [("_count", str(self.count)), ("_offset", str(offset))]
        return f"{public_base_url.rstrip('/')}/{self.resource_type}?{urlencode(params)}"

    def window_size(self, named: int, window_entries: int) -> int:
        if self.resource_type == "ClaimResponse":
            return min(window_entries, max(2 * named, WINDOW_MIN))
        return window_entries   # refDate starts at midnight: the day's earlier claims come first

    def window_query(self, first: IndexedClaim, named: int, window_entries: int) -> str:
        """The FHIR list read whose first entries are `first` and the claims after it, in list order."""
        params: list[tuple[str, str]] = [("_count", str(self.window_size(named, window_entries)))]
        if self.resource_type == "ClaimResponse":
            # openIMIS parses %Y-%m-%dT%H:%M:%S (seconds): ge the claim's second includes the claim itself.
            params.append(("_lastUpdated", "ge" + first.validity_from[:19]))
        else:
            params.append(("refDate", first.validity_from[:10]))   # validity_from >= that date
            if self.patient is not None:
                params.append(("patient", self.patient))
            if self.contained:
                params.append(("contained", "true"))
        return urlencode(params)


def _refuse(reason: str, message: str, status: int = 400) -> Decision:
    return Decision.denied(f"{NAME}.{reason}", status, message)


def parse_search(resource_type: str, query: Sequence[tuple[str, str]] | None,
                 max_page_size: int) -> SearchRequest | Decision:
    """The search, or a refusal naming what cannot be served (unknown parameters are refused, not
    ignored as openIMIS ignores them: an ignored filter would widen the answer silently)."""
    if resource_type not in SCOPED_TYPES:
        return _refuse("search_not_scopable", f"searches of {resource_type} cannot be limited to the "
                       "caller's health facility", 403)
    if query is None:
        return _refuse("search_param_unsupported", "POST _search of a facility-bound type is not supported")
    allowed = PARAMS[resource_type]
    seen: dict[str, str] = {}
    for name, value in query:
        if name not in allowed:
            return _refuse("search_param_unsupported", f"search parameter {name!r} is not supported for "
                           f"{resource_type}; supported: {', '.join(sorted(allowed))}")
        if name in seen:
            return _refuse("search_param_unsupported", f"search parameter {name!r} is repeated")
        seen[name] = value
    try:
        count = int(seen.get("_count", DEFAULT_COUNT))
        page = int(seen["page-offset"]) if "page-offset" in seen else None
        offset = int(seen["_offset"]) if "_offset" in seen else None
    except ValueError:
        return _refuse("search_param_invalid", "_count, _offset and page-offset must be integers")
    if not 0 <= count <= max_page_size:
        return _refuse("search_param_invalid", f"_count must be between 0 and {max_page_size}")
    if page is not None and offset is not None:
        return _refuse("search_param_invalid", "give _offset or page-offset, not both")
    if page is not None:
        if page < 1:
            return _refuse("search_param_invalid", "page-offset counts pages from 1")
        offset = (page - 1) * count
    offset = offset or 0
    if not 0 <= offset <= MAX_OFFSET:
        return _refuse("search_param_invalid", f"_offset must be between 0 and {MAX_OFFSET}")
    patient = seen.get("patient")
    if patient is not None and not UUID.match(patient):
        return _refuse("search_param_invalid", "patient must be the insuree's uuid")
    identifier = seen.get("identifier")
    if identifier is not None:
        identifier = identifier.rsplit("|", 1)[-1]
        if not identifier or len(identifier) > 64:
            return _refuse("search_param_invalid", "identifier must be a claim code or uuid")
    contained = seen.get("contained")
    if contained not in (None, "true", "false"):
        return _refuse("search_param_invalid", "contained must be true or false")
    return SearchRequest(resource_type, count, offset, patient, identifier, contained == "true")


@dataclass(frozen=True, slots=True)
class PageResult:
    bundle: dict[str, Any]
    served: int


class WindowCrowded(MediatorError):
    """The window held none of the named claims (more foreign claims at that time than the window holds)."""


def assemble_page(search: SearchRequest, index: IndexPage, window: Mapping[str, Any] | None,
                  public_base_url: str, entry_ok: Callable[[Mapping[str, Any]], bool]) -> PageResult:
    """The client's page: the named claims the window holds, in index order, as far as the first missing.

    `window` is openIMIS's list answer (None when no window was read: an empty page or `_count=0`);
    `entry_ok` is a last check of each served resource (Claim: its provider is the caller's).
    """
    entries: list[dict[str, Any]] = []
    if window is not None:
        by_id: dict[str, dict[str, Any]] = {}
        for entry in window.get("entry") or ():
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if isinstance(resource, dict) and resource.get("resourceType") == search.resource_type and \
                    isinstance(resource.get("id"), str):
                by_id.setdefault(resource["id"], entry)
        for claim in index.claims:
            found = by_id.get(claim.uuid) or by_id.get(claim.code)
            if found is None:
                break
            if not entry_ok(found["resource"]):
                raise LookupFailed("a window entry named by the index is not the caller's")
            entries.append({k: v for k, v in found.items() if k in ("fullUrl", "resource")})
        if index.claims and not entries:
            raise WindowCrowded()
    served = len(entries)
    links = [{"relation": "self", "url": search.link(public_base_url, search.offset)}]
    if search.count and served and search.offset + served < index.total:
        links.append({"relation": "next", "url": search.link(public_base_url, search.offset + served)})
    if search.offset > 0:
        links.append({"relation": "previous",
                      "url": search.link(public_base_url, max(0, search.offset - search.count))})
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "total": index.total,
                              "link": links}
    if entries:
        bundle["entry"] = entries
    return PageResult(bundle, served)


class ScopedSearch:
    """Serves one facility-scoped search page: at most one index request and one window read."""

    def __init__(self, search: SearchRequest, facility_uuid: str, index: ClaimIndex,
                 upstream: OpenImisUpstream, guard: UpstreamGuard, window_entries: int,
                 entry_ok: Callable[[Mapping[str, Any]], bool],
                 observe: Callable[[str, str], None] | None = None) -> None:
        self.search = search
        self.facility_uuid = facility_uuid
        self.index = index
        self.upstream = upstream
        self.guard = guard
        self.window_entries = window_entries
        self.entry_ok = entry_ok
        self.observe = observe
        """Called with (resource type, outcome) per page: full | short | empty | fallback | failed."""

    def _count(self, outcome: str) -> None:
        if self.observe is not None:
            self.observe(self.search.resource_type, outcome)

    async def run(self, request: RequestView, client_ip: str, request_id: str, priority: int,
                  timeout_s: float) -> web.Response:
        try:
            return await self._run(request, client_ip, request_id, priority, timeout_s)
        except LookupFailed as exc:
            self._count("failed")
            log.warning(JsonEvent.of("authorization.scoped_search_failed", request_id=request_id, detail=str(exc)))
            return operation_outcome_response(502, f"{NAME}.lookup_failed",
                                              f"openIMIS did not answer the search properly; quote request id "
                                              f"{request_id}")

    async def _run(self, request: RequestView, client_ip: str, request_id: str, priority: int,
                   timeout_s: float) -> web.Response:
        search = self.search
        code = uuid = None
        if search.identifier is not None:
            uuid, code = (search.identifier, None) if UUID.match(search.identifier) else (None, search.identifier)
        page = await self.index.page(self.facility_uuid, search.offset, max(search.count, 1), priority,
                                     request_id, patient=search.patient, code=code, uuid=uuid)
        if search.count == 0:
            page = replace(page, claims=())
        window: Mapping[str, Any] | None = None
        outcome = "empty"
        if len(page.claims) == 1:
            # One claim: its own read is exact and cheaper than any list (openIMIS serialises each entry).
            window = await self._read(request, page.claims[0], client_ip, request_id, priority, timeout_s)
        elif page.claims:
            window = await self._window(request, page.claims, client_ip, request_id, priority, timeout_s)
        try:
            result = assemble_page(search, page, window, self.upstream.public_base_url, self.entry_ok)
        except WindowCrowded:
            # The window holds none of the page's claims: foreign claims crowd it, or openIMIS's count cache
            # (api_fhir_r4 paginations.CachedCountQueryset: a list's count is kept an hour and the list is cut
            # to it) hides claims created since. A third request reads the first claim itself.
            outcome = "fallback"
            window = await self._read(request, page.claims[0], client_ip, request_id, priority, timeout_s)
            try:
                result = assemble_page(search, page, window, self.upstream.public_base_url, self.entry_ok)
            except WindowCrowded:
                raise LookupFailed("the page's first claim cannot be read") from None
        if result.served and outcome != "fallback":
            outcome = "full" if result.served == len(page.claims) else "short"
        self._count(outcome)
        body = json.dumps(result.bundle, ensure_ascii=False, separators=(",", ":")).encode()
        # Parsed form along: link_rewrite puts the window's fullUrls (openIMIS's) on the public base.
        return ParsedResponse(result.bundle, status=200, body=body, content_type="application/fhir+json"
                              if "fhir+json" in request.headers.get("Accept", "") else "application/json",
                              charset="utf-8")

    async def _window(self, request: RequestView, named: tuple[IndexedClaim, ...], client_ip: str,
                      request_id: str, priority: int, timeout_s: float) -> Mapping[str, Any]:
        query = self.search.window_query(named[0], len(named), self.window_entries)
        document = await self._get(request, self.search.resource_type, query, client_ip, request_id, priority,
                                   timeout_s)
        if document.get("resourceType") != "Bundle":
            raise LookupFailed("search window is not a Bundle")
        return document

    async def _read(self, request: RequestView, claim: IndexedClaim, client_ip: str, request_id: str,
                    priority: int, timeout_s: float) -> Mapping[str, Any]:
        """One named claim read by uuid, as a one-entry window."""
        rtype = self.search.resource_type
        query = "contained=true" if self.search.contained else ""
        document = await self._get(request, f"{rtype}/{claim.uuid}", query, client_ip, request_id, priority,
                                   timeout_s)
        return {"resourceType": "Bundle", "entry": [
            {"fullUrl": f"{self.upstream.public_base_url.rstrip('/')}/{rtype}/{claim.uuid}", "resource": document}]}

    async def _get(self, request: RequestView, path: str, query: str, client_ip: str, request_id: str,
                   priority: int, timeout_s: float) -> dict[str, Any]:
        response = await self.guard.call(priority, lambda: self.upstream.forward(
            request, path, None, client_ip, request_id, timeout_s, method="GET", raw_query=query),
            f"search-read:{self.search.resource_type}")
        if response.status != 200:
            # SECURITY: openIMIS's error texts can name other facilities' claims ("malformed entry …/Claim/<uuid>"):
            # not here (`upstream.error`, logged where the answer was received, keeps what openIMIS said).
            log.warning(JsonEvent.of("authorization.scoped_search_read_refused", request_id=request_id,
                                     status=response.status))
            raise LookupFailed(f"search read answered {response.status}")
        document = response_document(response)   # parsed once, on receipt
        if document is None:
            raise LookupFailed("search read is not JSON")
        if not isinstance(document, dict):
            raise LookupFailed("search read is not a resource")
        return document
