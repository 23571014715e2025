"""Shaping openIMIS's answers into what FHIR clients expect (README "HMS developers").

One response step, run on every openIMIS answer before the response filters (the authorization
stage's facility filter) see it, so that filter always gets a Bundle for a search:

* searches: openIMIS's bare resource (its answer to `?identifier=` / `?code=`) becomes a searchset
  Bundle; its "not found" answers (404, or the 500 "failed to retrieve": `upstream.is_not_found`, marked
  on the sanitised error answer as OPENIMIS_NOT_FOUND) become an empty one;
* creates: `Location` of the created resource and the body chosen by `Prefer: return=`;
* every answer: dateTimes without a zone get the upstream's `time_zone` offset.

Per channel, `fhir_answers` (mediator.config.models.FhirAnswersConfig) can keep openIMIS's shapes.
The pure helpers (`searchset`, `with_zone`, `zone_datetimes`) carry the rules; `FhirAnswers` does I/O.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from aiohttp import web

from mediator.bulkhead import UpstreamRefused
from mediator.facility_scope import FACILITY_BOUND
from mediator.fhir import FHIR_JSON, PLAIN_JSON, REASON_SYSTEM, created_id, prefer_tokens
from mediator.logs import JsonEvent
from mediator.pipeline import Exchange
from mediator.upstream import OPENIMIS_NOT_FOUND, Guard, OpenImisUpstream, UpstreamTimeout, UpstreamUnavailable

log = logging.getLogger("mediator.fhir_answers")

NAME = "fhir_answers"
CREATE_RETURNS = ("representation", "minimal", "OperationOutcome", "upstream")
# A JSON string that is a date-time without a zone: invalid as FHIR dateTime/instant.
_NAIVE = re.compile(r"\A\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?\Z", re.ASCII)
_NAIVE_IN_BODY = re.compile(rb'"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?"')
_DROPPED_HEADERS = frozenset({"content-length", "content-type", "content-encoding"})


def with_zone(value: str, zone: ZoneInfo) -> str:
    """`2020-01-01T18:50:00` → `2020-01-01T18:50:00+03:00` (the offset `zone` had then)."""
    if value.count(":") == 1:
        value += ":00"   # FHIR needs seconds once a time is given
    offset = datetime.fromisoformat(value).replace(tzinfo=zone).utcoffset()
    assert offset is not None
    minutes = int(offset.total_seconds()) // 60
    sign = "+" if minutes >= 0 else "-"
    return f"{value}{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def _zoned(value: str, zone: ZoneInfo) -> str:
    try:
        return with_zone(value, zone)
    except ValueError:   # e.g. month 13 or year 0: not ours to repair
        return value


def add_zones(document: Any, zone: ZoneInfo) -> Any:
    """Gives every zone-less date-time string in `document` `zone`'s offset, in place (answers are
    parsed copies the mediator owns; copying a 200 KB Bundle again cost more than the walk)."""
    stack = [document]
    while stack:
        node = stack.pop()
        items: Any = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            if isinstance(value, str):
                if len(value) >= 16 and value[10] == "T" and _NAIVE.match(value):
                    node[key] = _zoned(value, zone)
            elif isinstance(value, dict | list):
                stack.append(value)
    if isinstance(document, str) and _NAIVE.match(document):
        return _zoned(document, zone)
    return document


def may_hold_naive_datetimes(body: bytes) -> bool:
    return _NAIVE_IN_BODY.search(body) is not None


def zone_datetimes(body: bytes, zone: ZoneInfo) -> bytes:
    """`add_zones` on serialized JSON, without parsing it: in valid JSON a `"` directly followed by a digit
    opens a string, and a naive date-time string has no escapes, so each match is exactly one such string.
    Returns `body` itself when nothing matched."""
    def zoned(match: re.Match[bytes]) -> bytes:
        return b'"' + _zoned(match.group(0)[1:-1].decode(), zone).encode() + b'"'

    if _NAIVE_IN_BODY.search(body) is None:
        return body
    return _NAIVE_IN_BODY.sub(zoned, body)


def searchset(public_base_url: str, resource_type: str, self_query: str,
              resources: list[dict[str, Any]]) -> dict[str, Any]:
    """A searchset Bundle of `resources`. `total` only for types that are not facility-bound: for those the
    facility filter decides what is shown, and a "none found" answer must look exactly like "found, but
    another facility's" (the filter drops the entry and the total)."""
    self_url = f"{public_base_url}{resource_type}" + (f"?{self_query}" if self_query else "")
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
    if resource_type not in FACILITY_BOUND:
        bundle["total"] = len(resources)
    bundle["link"] = [{"relation": "self", "url": self_url}]
    bundle["entry"] = [{"fullUrl": f"{public_base_url}{resource_type}/{r.get('id')}", "resource": r,
                        "search": {"mode": "match"}} for r in resources]
    return bundle


def created_outcome(resource_type: str, resource_id: str, public_base_url: str, extra: str = "") -> dict[str, Any]:
    text = f"created {resource_type}/{resource_id}" + (f"; {extra}" if extra else "")
    return {"resourceType": "OperationOutcome", "issue": [{
        "severity": "information", "code": "informational",
        "details": {"coding": [{"system": REASON_SYSTEM, "code": f"{NAME}.created"}], "text": text},
        "diagnostics": f"{public_base_url}{resource_type}/{resource_id}"}]}


class FhirAnswers:
    """The response step. One per runtime; stateless apart from its configuration."""

    def __init__(self, public_base_url: str, upstreams: Mapping[str, OpenImisUpstream]) -> None:
        self.public_base_url = public_base_url
        self.zones = {name: ZoneInfo(u.config.time_zone) for name, u in upstreams.items()}

    async def shape(self, exchange: Exchange, upstream: OpenImisUpstream, response: web.StreamResponse,
                    guard: Guard | None = None) -> web.StreamResponse:
        """`guard`: the upstream's bulkhead + breaker, for the one request this step may send (the read-back
        of a created resource, `Prefer: return=representation`)."""
        fhir, channel = exchange.fhir, exchange.channel
        if fhir is None or channel is None or not isinstance(response, web.Response) or \
                response.content_type not in (PLAIN_JSON, FHIR_JSON):
            return response
        body = response.body
        if not isinstance(body, bytes | bytearray):
            return response
        body = bytes(body)
        settings = channel.config.fhir_answers
        zone = self.zones[upstream.name]
        search = fhir.interaction == "search-type" and exchange.request.method in ("GET", "HEAD") and \
            settings.searchset == "bundle" and fhir.resource_type is not None
        create = fhir.interaction == "create" and response.status == 201 and fhir.resource_type is not None
        # openIMIS's own searchset is not parsed again: only a bare resource or an error can need wrapping.
        if search and response.status == 200 and body.startswith(b'{"resourceType":"Bundle"'):
            search = False
        status, headers = response.status, {k: v for k, v in response.headers.items()
                                            if k.lower() not in _DROPPED_HEADERS}
        out = body
        if search or create:
            try:
                document = json.loads(body) if body else None
            except ValueError:
                return response
            assert fhir.resource_type is not None
            if search:
                query = exchange.search.upstream_query if exchange.search is not None else \
                    exchange.request.raw_query_string
                if status == 200 and isinstance(document, dict) and \
                        document.get("resourceType") == fhir.resource_type:
                    document = searchset(self.public_base_url, fhir.resource_type, query, [document])
                elif response.get(OPENIMIS_NOT_FOUND, False):
                    status, document = 200, searchset(self.public_base_url, fhir.resource_type, query, [])
                else:
                    search = False   # an error or an unexpected answer: passed on as it is
            else:
                document = await self._created(exchange, upstream, document, headers, guard)
                if document is None:
                    return web.Response(status=201, headers=headers)
            if search or create:
                out = json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
        out = zone_datetimes(out, zone)
        if out is body and status == response.status and not create:
            return response
        return web.Response(status=status, headers=headers, content_type=response.content_type, charset="utf-8",
                            body=out)

    async def _created(self, exchange: Exchange, upstream: OpenImisUpstream, document: Any,
                       headers: dict[str, str], guard: Guard | None) -> Any:
        """The body of a 201 (None: no body); sets Location / Content-Location in `headers`."""
        fhir, channel = exchange.fhir, exchange.channel
        assert fhir is not None and fhir.resource_type is not None and channel is not None
        rtype = fhir.resource_type
        rid = created_id(rtype, document)
        if rid is None:
            return document
        answered_type = document["resourceType"]   # rtype, or ClaimResponse for a created Claim
        headers.setdefault("Location", f"{self.public_base_url}{rtype}/{rid}")   # openIMIS's own, rewritten, wins
        wanted = prefer_tokens(exchange.request).get("return")
        choice = wanted if wanted in CREATE_RETURNS[:3] else channel.config.fhir_answers.create_return
        related = f"{self.public_base_url}ClaimResponse/{rid}" if answered_type == "ClaimResponse" else ""
        if choice == "minimal":
            return None
        if choice == "upstream":
            if related:
                headers["Content-Location"] = related
            return document
        if choice == "representation":
            if answered_type == rtype:
                return document
            created = await self._read_back(exchange, upstream, rtype, rid, guard)
            if created is not None:
                version = (created.get("meta") or {}).get("versionId") if isinstance(created.get("meta"), dict) \
                    else None
                if isinstance(version, str) and version and "ETag" not in headers:
                    headers["ETag"] = f'W/"{version}"'
                return created
        return created_outcome(rtype, rid, self.public_base_url,
                               f"its adjudication is {related}" if related else "")

    async def _read_back(self, exchange: Exchange, upstream: OpenImisUpstream, rtype: str,
                         rid: str, guard: Guard | None) -> dict[str, Any] | None:
        """The created resource as openIMIS now serves it (None if it cannot be read: then the create is
        answered with an OperationOutcome naming it). Inside the upstream's guard like every request the
        mediator sends, at the channel's priority; a refusal there (openIMIS busy) is not the create's failure."""
        assert exchange.channel is not None
        config = exchange.channel.config
        try:
            status, created = await upstream.get_document(f"{rtype}/{rid}", "", config.timeout_s, exchange.request_id,
                                                          guard, config.priority_value, f"{rtype}:read_back")
        except UpstreamRefused as exc:
            log.info(JsonEvent.of("fhir_answers.read_back_not_sent", resource_type=rtype, reason=exc.reason))
            return None
        except (UpstreamUnavailable, UpstreamTimeout) as exc:
            log.warning(JsonEvent.of("fhir_answers.read_back_failed", resource_type=rtype, error=type(exc).__name__,
                                     detail=str(exc)))
            return None
        if status == 200 and isinstance(created, dict) and created.get("resourceType") == rtype \
                and created.get("id") == rid:
            return created
        log.warning(JsonEvent.of("fhir_answers.read_back_refused", resource_type=rtype, status=status))
        return None
