"""Schema of `policies/replica.yaml`: what is replicated, from where, how often, and how stale is too stale.

Absent file: no replica; a channel with `serve_from: replica` is then a configuration error.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator, model_validator

from mediator.config.models import Strict
from mediator.config.types import Name

# Master data an HMS downloads: services, items, locations, health facilities, products, claim admins.
REPLICABLE_TYPES = ("ActivityDefinition", "Medication", "Location", "Organization", "InsurancePlan",
                    "Practitioner", "PractitionerRole")
# openIMIS serves each code system / value set as one document at a fixed path (no paging, no _lastUpdated).
DOCUMENT_TYPES = ("CodeSystem", "ValueSet")
DOCUMENT_PATH = re.compile(r"^(CodeSystem|ValueSet)/[A-Za-z0-9\-.]{1,64}$")

LongSeconds = Annotated[float, Field(gt=0, le=30 * 86400)]


class ReplicaPolicy(Strict):
    version: Literal[1]
    upstream: Name
    """The channels.yaml upstream to sync from: the openIMIS FHIR API of the read replica, with its own
    login. Required."""
    store: Literal["memory", "redis"] = "memory"
    """memory (default): per process, lost on restart. redis: shared by every instance; needs server.redis."""
    resource_types: tuple[Literal[REPLICABLE_TYPES], ...] = REPLICABLE_TYPES  # type: ignore[valid-type]
    """Searchable types pulled page by page. Default: all seven. Empty: none (documents only)."""
    documents: tuple[str, ...] = ("CodeSystem/medical-item", "CodeSystem/medical-service")
    """Code systems and value sets fetched whole on every sync, as `CodeSystem/<id>` or `ValueSet/<id>`.
    Empty: none."""
    schedule: bool = True
    """true: the mediator syncs at start and then on the schedule below. false: it only serves what the
    store holds (store redis, filled by another instance or by `openimis-mediator sync`)."""
    page_size: int = Field(100, ge=1, le=1000)
    """`_count` asked of openIMIS per page."""
    incremental_every_s: LongSeconds = 300
    """Pull what changed (`_lastUpdated=ge<cursor>`) this often."""
    full_every_s: LongSeconds = 86400
    """Pull everything into a new generation this often; the only way deletions are seen for certain."""
    retry_after_failure_s: LongSeconds = 60
    """After a failed sync, try again this soon (the last good data keeps being served meanwhile)."""
    overlap_s: float = Field(300, ge=0, le=86400)
    """The incremental cursor is the previous sync's start minus this, to cover clock skew between us and
    openIMIS and transactions committed while we pulled."""
    upstream_time_zone: str | None = None
    """IANA zone openIMIS interprets `_lastUpdated` in (it takes a naive `%Y-%m-%dT%H:%M:%S`). Absent: the
    upstream's `time_zone` (channels.yaml), the zone openIMIS also writes its dateTimes in."""
    request_timeout_s: LongSeconds = 60
    """Per upstream page request."""
    max_resources_per_type: int = Field(500_000, ge=1)
    """A sync that sees more than this for one type fails (protects memory from a runaway upstream)."""
    max_lag_s: LongSeconds = 900
    """Answers older than this (since the last successful sync) carry `Warning: 110 - "Response is Stale"`."""
    never_synced: Literal["upstream", "unavailable"] = "upstream"
    """Before the first successful sync, or when the store cannot be read: upstream (forward to the channel's
    upstream, default) or unavailable (503 `replica.not_synced` / `replica.store_error`)."""
    inactive: Literal["keep", "drop"] = "keep"
    """Resources whose validity ended (status inactive/retired/entered-in-error, active false, or
    period/effectivePeriod end in the past): keep (served, tagged `replica-inactive` in meta.tag) or drop."""
    identifier_search: Literal["bare_resource", "bundle"] = "bundle"
    """`?identifier=`/`?code=`: bundle (default) answers a searchset Bundle (empty when none), as FHIR
    clients expect; bare_resource answers the resource itself like openIMIS does (404 if none), for HMS
    written against openIMIS's quirk."""
    default_page_size: int = Field(20, ge=1, le=1000)
    """Entries per page when the client gives no `_count`."""
    max_page_size: int = Field(200, ge=1, le=1000)
    """A larger `_count` is reduced to this."""

    @field_validator("documents")
    @classmethod
    def _documents(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for path in value:
            if not DOCUMENT_PATH.match(path):
                raise ValueError(f"{path!r} is not CodeSystem/<id> or ValueSet/<id>")
        if len(set(value)) != len(value):
            raise ValueError("documents are listed twice")
        return value

    @field_validator("resource_types")
    @classmethod
    def _unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError("resource types are listed twice")
        return value

    @field_validator("upstream_time_zone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value

    @model_validator(mode="after")
    def _pages(self) -> ReplicaPolicy:
        if self.default_page_size > self.max_page_size:
            raise ValueError("default_page_size is larger than max_page_size")
        if self.full_every_s < self.incremental_every_s:
            raise ValueError("full_every_s is shorter than incremental_every_s")
        return self

    @property
    def served_types(self) -> frozenset[str]:
        return frozenset(self.resource_types) | {p.split("/")[0] for p in self.documents}
