"""FHIR R4 REST knowledge: URL parsing into (type, id, interaction), OperationOutcome, Bundle URLs.

Everything FHIR-specific lives here so that stages speak in interactions, not in paths.
See https://hl7.org/fhir/R4/http.html for the interaction table this parser follows.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from aiohttp import web

from mediator.errors import MediatorError
from mediator.request_view import RequestView

RESOURCE_TYPE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
# https://hl7.org/fhir/R4/datatypes.html#id ; openIMIS ids are UUIDs or codes, both fit.
RESOURCE_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
OPERATION = re.compile(r"^\$[A-Za-z][A-Za-z0-9\-]{0,63}$")

FHIR_JSON = "application/fhir+json"
PLAIN_JSON = "application/json"
ACCEPTED_BODY_TYPES = frozenset({FHIR_JSON, PLAIN_JSON})


class MalformedRequest(MediatorError, ValueError):
    """The request path or body is not valid FHIR REST; the message is safe to show the caller."""


@dataclass(frozen=True, slots=True)
class FhirRequest:
    """A FHIR REST call, as far as the URL and method tell."""

    interaction: str
    """read, vread, update, patch, delete, history-instance, history-type, create, search-type,
    search-system, capabilities, batch-or-transaction, operation-type, operation-instance"""
    resource_type: str | None
    resource_id: str | None
    path: str
    """Path relative to the FHIR base, e.g. "Claim/abc" (no leading slash, no trailing slash)."""
    operation: str | None = None


def check_raw_path(raw_path: str) -> None:
    """Refuse path encodings that let two parties read one path differently (CWE-22, CWE-177)."""
    path = raw_path.split("?", 1)[0]
    lowered = path.lower()
    # SECURITY: encoded '/', '\', '.', '%' and NUL are how "Claim%2F..%2Fother" or double encoding sneak past
    # a path rule while the upstream (Django) decodes them; FHIR ids never need them.
    for token in ("%2f", "%5c", "%2e", "%25", "%00"):
        if token in lowered:
            raise MalformedRequest(f"encoded character {token.upper()} is not allowed in the path")
    if "\\" in path or "\x00" in path:
        raise MalformedRequest("backslash or NUL in path")
    segments = path.split("/")
    if any(s in (".", "..") for s in segments):
        raise MalformedRequest("dot segments are not allowed in the path")
    if "//" in path:
        raise MalformedRequest("empty path segment")


def parse_fhir_path(method: str, relative: str) -> FhirRequest:
    """Parse a path relative to the FHIR base (`Claim/123`, `metadata`, `` for the system)."""
    rel = relative.strip("/")
    parts = rel.split("/") if rel else []
    if not parts:
        if method == "POST":
            return FhirRequest("batch-or-transaction", None, None, rel)
        if method in ("GET", "HEAD"):
            return FhirRequest("search-system", None, None, rel)
        raise MalformedRequest(f"{method} is not defined on the FHIR base")
    if parts == ["metadata"] and method in ("GET", "HEAD"):
        return FhirRequest("capabilities", None, None, rel)
    rtype = parts[0]
    if parts[0] == "_search" and len(parts) == 1 and method == "POST":
        return FhirRequest("search-system", None, None, rel)
    if OPERATION.match(parts[0]) and len(parts) == 1:
        return FhirRequest("operation-system", None, None, rel, parts[0])
    if not RESOURCE_TYPE.match(rtype):
        raise MalformedRequest(f"not a FHIR resource type: {rtype[:64]!r}")
    rest = parts[1:]
    if not rest:
        interaction = {"GET": "search-type", "HEAD": "search-type", "POST": "create"}.get(method)
        if interaction is None:
            raise MalformedRequest(f"{method} on a resource type is not a FHIR interaction "
                                   "(conditional update/delete is not supported)")
        return FhirRequest(interaction, rtype, None, rel)
    if rest == ["_search"] and method == "POST":
        return FhirRequest("search-type", rtype, None, rel)
    if rest == ["_history"] and method in ("GET", "HEAD"):
        return FhirRequest("history-type", rtype, None, rel)
    if OPERATION.match(rest[0]) and len(rest) == 1:
        return FhirRequest("operation-type", rtype, None, rel, rest[0])
    rid = rest[0]
    if not RESOURCE_ID.match(rid):
        raise MalformedRequest("not a valid FHIR resource id")
    if len(rest) == 1:
        interaction = {"GET": "read", "HEAD": "read", "PUT": "update", "PATCH": "patch",
                       "DELETE": "delete"}.get(method)
        if interaction is None:
            raise MalformedRequest(f"{method} on a resource instance is not a FHIR interaction")
        return FhirRequest(interaction, rtype, rid, rel)
    if rest[1] == "_history" and method in ("GET", "HEAD"):
        if len(rest) == 2:
            return FhirRequest("history-instance", rtype, rid, rel)
        if len(rest) == 3 and RESOURCE_ID.match(rest[2]):
            return FhirRequest("vread", rtype, rid, rel)
    if len(rest) == 2 and OPERATION.match(rest[1]):
        return FhirRequest("operation-instance", rtype, rid, rel, rest[1])
    raise MalformedRequest("unsupported FHIR path")


# https://hl7.org/fhir/R4/valueset-issue-type.html
_ISSUE_CODE_BY_STATUS = {
    400: "invalid", 401: "login", 403: "forbidden", 404: "not-found", 405: "not-supported",
    406: "not-supported", 409: "conflict", 410: "deleted", 412: "conflict", 413: "too-costly",
    415: "not-supported", 422: "processing", 429: "throttled", 500: "exception", 502: "transient",
    503: "transient", 504: "timeout",
}

REASON_SYSTEM = "https://openimis-mediator.org/fhir/CodeSystem/reason"


def operation_outcome(status: int, reason: str, message: str, severity: str = "error") -> dict[str, Any]:
    code = _ISSUE_CODE_BY_STATUS.get(status, "processing" if status < 500 else "exception")
    return {
        "resourceType": "OperationOutcome",
        "issue": [{
            "severity": severity,
            "code": code,
            "details": {"coding": [{"system": REASON_SYSTEM, "code": reason}], "text": message},
            "diagnostics": reason,
        }],
    }


def wants_fhir_json(request: RequestView) -> bool:
    fmt = request.query.get("_format", "")
    return FHIR_JSON in request.headers.get("Accept", "") or fmt in ("json", FHIR_JSON) or \
        request.headers.get("Content-Type", "").startswith(FHIR_JSON)


def created_id(resource_type: str, document: Any) -> str | None:
    """The id of the resource a create of `resource_type` made, as its answer names it (None: the answer does
    not name it). openIMIS answers a created Claim with its ClaimResponse, which carries the Claim's id."""
    if not isinstance(document, dict) or not isinstance(document.get("id"), str):
        return None
    answered = document.get("resourceType")
    if answered != resource_type and not (resource_type == "Claim" and answered == "ClaimResponse"):
        return None
    rid: str = document["id"]
    return rid


def prefer_tokens(request: RequestView) -> dict[str, str]:
    """The `Prefer` header's preferences (RFC 7240), lower-cased: {"return": "minimal", "handling": ...}.
    The first occurrence of a preference wins; values without `=` map to ""."""
    tokens: dict[str, str] = {}
    for header in request.headers.getall("Prefer", []):
        for part in header.replace(";", ",").split(","):
            key, _, value = part.strip().partition("=")
            if key:
                tokens.setdefault(key.strip().lower(), value.strip().strip('"'))
    return tokens


def operation_outcome_response(status: int, reason: str, message: str,
                               headers: Mapping[str, str] | None = None) -> web.Response:
    body = json.dumps(operation_outcome(status, reason, message), separators=(",", ":"))
    return web.Response(status=status, text=body, content_type=FHIR_JSON, charset="utf-8",
                        headers=headers)


class BaseUrlRewriter:
    """Rewrites openIMIS absolute URLs in Bundle.link[].url and Bundle.entry[].fullUrl to the mediator's.

    openIMIS builds them from its own host (or X-Forwarded-Host), so any scheme://host in front of the
    upstream base *path* is replaced; some openIMIS versions percent-encode the whole URL in links.
    """

    def __init__(self, upstream_base_path: str, public_base_url: str) -> None:
        self._public = public_base_url
        self._raw = re.compile(r"^https?://[^/?#\s]+" + re.escape(upstream_base_path))
        encoded_path = quote(upstream_base_path, safe="")
        self._encoded = re.compile(r"https?%3A%2F%2F[^%/?#\s&]+(?:%3A\d+)?" + re.escape(encoded_path),
                                   re.IGNORECASE)
        self._public_encoded = quote(public_base_url, safe="")
        # Every URL either pattern rewrites contains one of these (raw path, or its encoding in any case).
        self._markers = (upstream_base_path.encode(), encoded_path.lower().encode())

    def may_need_rewriting(self, body: bytes) -> bool:
        """False when no URL in this answer can contain the upstream base: the Bundle walk is skipped.
        Any JSON escape (`\\/`, `\\u…`) may hide the base in the bytes, so then the walk runs; percent-encoded
        URLs are matched case-insensitively, hence the lower-cased copy."""
        raw, encoded = self._markers
        return raw in body or b"\\" in body or (b"%2" in body and encoded in body.lower())

    def rewrite_url(self, url: str) -> str:
        new = self._raw.sub(self._public, url, count=1)
        return self._encoded.sub(self._public_encoded, new)

    def rewrite_bundle(self, resource: dict[str, Any]) -> bool:
        """Rewrite in place; True if anything changed."""
        if resource.get("resourceType") != "Bundle":
            return False
        changed = False
        for link in resource.get("link") or ():
            if isinstance(link, dict) and isinstance(link.get("url"), str):
                new = self.rewrite_url(link["url"])
                changed |= new != link["url"]
                link["url"] = new
        for entry in resource.get("entry") or ():
            if isinstance(entry, dict) and isinstance(entry.get("fullUrl"), str):
                new = self.rewrite_url(entry["fullUrl"])
                changed |= new != entry["fullUrl"]
                entry["fullUrl"] = new
        return changed
