"""What the replica stores: one record per resource, the sync state, and search queries.

Records are built once, at sync time, so that serving is lookups and byte concatenation: the stored body
is the JSON the client receives (meta.lastUpdated set, inactive resources tagged).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeGuard

from mediator.fhir import RESOURCE_ID

INACTIVE_TAG = {"system": "https://openimis-mediator.org/fhir/CodeSystem/replica", "code": "replica-inactive",
                "display": "validity ended in openIMIS"}
_INACTIVE_STATUS = frozenset({"inactive", "retired", "entered-in-error"})


@dataclass(frozen=True, slots=True)
class StoredResource:
    rtype: str
    rid: str
    body: bytes
    """The JSON served to clients."""
    last_updated: float
    """Epoch seconds; meta.lastUpdated in the body says the same."""
    digest: str
    """sha256 of body (first 32 hex digits): the ETag, and how a sync tells an unchanged resource."""
    codes: tuple[str, ...] = ()
    """Lower-cased identifier values and code.coding codes (read and search by code)."""
    name: str = ""
    """Lower-cased text searched by `name` (contains)."""

    def index_row(self) -> str:
        return json.dumps([self.last_updated, self.digest, self.name, list(self.codes)], separators=(",", ":"))

    @classmethod
    def from_index_row(cls, rtype: str, rid: str, row: str | bytes, body: bytes = b"") -> StoredResource:
        last_updated, digest, name, codes = json.loads(row)
        return cls(rtype, rid, body, last_updated, digest, tuple(codes), name)


@dataclass(slots=True)
class SyncState:
    """The replica's bookkeeping, stored next to the data and swapped with it."""

    generation: str
    last_success: float
    """End of the last successful sync (full or incremental): what staleness is measured from."""
    last_full: float
    cursor: float
    """Epoch seconds the next incremental asks from (`_lastUpdated=ge`)."""
    counts: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"generation": self.generation, "last_success": self.last_success,
                           "last_full": self.last_full, "cursor": self.cursor, "counts": self.counts})

    @classmethod
    def from_json(cls, text: str | bytes) -> SyncState:
        data = json.loads(text)
        return cls(data["generation"], data["last_success"], data["last_full"], data["cursor"],
                   dict(data.get("counts") or {}))


@dataclass(frozen=True, slots=True)
class SearchQuery:
    """A search the stores answer identically. Order: (last_updated, id) ascending."""

    code: str | None = None
    """Lower-cased; matches any of a record's codes."""
    name: str | None = None
    """Lower-cased substring of the record's name text."""
    since: float | None = None
    since_inclusive: bool = True
    until: float | None = None
    until_inclusive: bool = True
    offset: int = 0
    count: int = 20


@dataclass(frozen=True, slots=True)
class SearchPage:
    total: int
    items: list[StoredResource]


def matches(row: StoredResource, query: SearchQuery) -> bool:
    if query.code is not None and query.code not in row.codes:
        return False
    if query.name is not None and query.name not in row.name:
        return False
    if query.since is not None and (row.last_updated < query.since or
                                    (row.last_updated == query.since and not query.since_inclusive)):
        return False
    if query.until is not None and (row.last_updated > query.until or
                                    (row.last_updated == query.until and not query.until_inclusive)):
        return False
    return True


def parse_instant(value: str) -> float | None:
    """An ISO 8601 / FHIR instant as epoch seconds; a value without a zone is taken as UTC."""
    try:
        moment = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def format_instant(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def codes_of(resource: dict[str, Any]) -> tuple[str, ...]:
    values: set[str] = set()
    for ident in resource.get("identifier") or ():
        if isinstance(ident, dict) and isinstance(ident.get("value"), str):
            values.add(ident["value"].lower())
    code = resource.get("code")
    if isinstance(code, dict):
        for coding in code.get("coding") or ():
            if isinstance(coding, dict) and isinstance(coding.get("code"), str):
                values.add(coding["code"].lower())
    return tuple(sorted(values))


def name_of(resource: dict[str, Any]) -> str:
    """Text `name` searches: name/title, Medication code.text, Practitioner HumanName parts."""
    parts: list[str] = []
    for key in ("name", "title"):
        value = resource.get(key)
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, list):
            for human in value:
                if isinstance(human, dict):
                    parts += [p for p in [human.get("text"), human.get("family"), *(human.get("given") or ())]
                              if isinstance(p, str)]
    code = resource.get("code")
    if isinstance(code, dict) and isinstance(code.get("text"), str):
        parts.append(code["text"])
    return " ".join(parts).lower()


def is_inactive(resource: dict[str, Any], now: float) -> bool:
    """Validity ended in openIMIS (README "Master-data replica", rule for inactive resources)."""
    if resource.get("status") in _INACTIVE_STATUS or resource.get("active") is False:
        return True
    for key in ("period", "effectivePeriod"):
        period = resource.get(key)
        if isinstance(period, dict) and isinstance(period.get("end"), str):
            end = parse_instant(period["end"])
            if end is not None and end < now:
                return True
    return False


def valid_upstream_resource(resource: Any, rtype: str) -> TypeGuard[dict[str, Any]]:
    return (isinstance(resource, dict) and resource.get("resourceType") == rtype
            and isinstance(resource.get("id"), str) and RESOURCE_ID.match(resource["id"]) is not None)


def build_record(resource: dict[str, Any], now: float, previous: StoredResource | None,
                 inactive: bool) -> StoredResource:
    """The record served for an upstream resource.

    meta.lastUpdated: openIMIS's own when it sends one; else the previous record's when nothing else
    changed; else `now` (the sync's start), so HMS syncing from us incrementally see the change.
    """
    rtype, rid = resource["resourceType"], resource["id"]
    given_meta = resource.get("meta")
    meta: dict[str, Any] = given_meta if isinstance(given_meta, dict) else {}
    given_updated = meta.get("lastUpdated")
    upstream_updated = parse_instant(given_updated) if isinstance(given_updated, str) else None

    def render(last_updated: float) -> tuple[bytes, str]:
        new_meta = dict(meta)
        new_meta["lastUpdated"] = format_instant(last_updated)
        if inactive:
            tags = [t for t in new_meta.get("tag") or () if t != INACTIVE_TAG]
            new_meta["tag"] = [*tags, INACTIVE_TAG]
        body = json.dumps({**resource, "meta": new_meta}, ensure_ascii=False, separators=(",", ":")).encode()
        return body, hashlib.sha256(body).hexdigest()[:32]

    if upstream_updated is not None:
        last_updated = upstream_updated
        body, digest = render(last_updated)
    else:
        body, digest = render(previous.last_updated) if previous is not None else (b"", "")
        if previous is not None and digest == previous.digest:
            last_updated = previous.last_updated
        else:
            last_updated = now
            body, digest = render(now)
    return StoredResource(rtype, rid, body, last_updated, digest, codes_of(resource), name_of(resource))
