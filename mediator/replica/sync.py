"""Pulling master data from openIMIS into a replica store: full (new generation, swapped in) or incremental.

Full: every type page by page (`_count`, `page-offset` from 1) until a page without a `next` link, an
empty page, or openIMIS's 404 for a page past the end; written into a new generation that `commit`
makes current. Anything that vanished upstream is gone after the swap.
Incremental: `_lastUpdated=ge<cursor>` (openIMIS parses only `%Y-%m-%dT%H:%M:%S`, naive, in its own zone)
for every type, all changes applied in one step. openIMIS lists only current rows (validity_to is null),
so deletions are invisible here: after applying, each type's count is compared with openIMIS's `total`
and a mismatch asks for a full sync at once.
Either way, a failure anywhere leaves the last good data untouched.

Every page waits for a slot of the upstream's bulkhead (`guard`, at `bulk` priority, as an HMS's master-data
pull): a sync is API load on openIMIS like any other, so it never takes the worker the limit leaves to
openIMIS's web users, it is paced by a duty cycle, and claims and eligibility go before it. A page
refused there (queue full, waited max_wait_s, breaker open) fails the sync, which is retried after
`retry_after_failure_s`; its answer times are not samples of the adaptive limit (a page of 100 Medications
and one of 3 InsurancePlans differ a hundredfold).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from mediator.bulkhead import UpstreamRefused
from mediator.config.models import PRIORITY_NAMES
from mediator.errors import MediatorError
from mediator.fhir_answers import add_zones
from mediator.logs import JsonEvent
from mediator.replica.policy import ReplicaPolicy
from mediator.replica.records import StoredResource, SyncState, build_record, is_inactive, valid_upstream_resource
from mediator.replica.store import ReplicaStore, ReplicaStoreError
from mediator.upstream import Guard, OpenImisUpstream, UpstreamInvalidAnswer, UpstreamTimeout, UpstreamUnavailable

SHORT_PAGE_FALLBACK = 10
"""Page size of the second pass when openIMIS's pages add up to less than the total it announced."""

log = logging.getLogger("mediator.replica")

Progress = Callable[[str, int, int | None], None]
"""(resource type or document path, resources received so far, total announced by openIMIS or None)."""


class SyncFailed(MediatorError):
    """A sync did not complete; the store still holds the last good data. The message is safe to log."""


class FilterUnsupported(SyncFailed):
    """openIMIS answered 500 to a `_lastUpdated` search of one type (it cannot filter that type)."""


class SyncBusy(MediatorError):
    """Another instance holds the sync lock of the shared store; nothing was done."""


@dataclass(slots=True)
class SyncReport:
    kind: str
    """full | incremental"""
    counts: dict[str, int] = field(default_factory=dict)
    """Resources per type in the replica after the sync."""
    changed: int = 0
    removed: int = 0
    seconds: float = 0.0
    full_needed: bool = False
    """An incremental found a count mismatch: a full sync should follow."""


def upstream_time(epoch: float, zone: str) -> str:
    """The one `_lastUpdated` format openIMIS accepts (its filter does strptime('%Y-%m-%dT%H:%M:%S'))."""
    return datetime.fromtimestamp(epoch, ZoneInfo(zone)).strftime("%Y-%m-%dT%H:%M:%S")


def _failed(what: str, exc: UpstreamRefused | UpstreamTimeout | UpstreamUnavailable) -> SyncFailed:
    """The sync's failure for a request about `what` that openIMIS did not answer (or was not sent)."""
    if isinstance(exc, UpstreamRefused):
        return SyncFailed(f"{what}: not sent, openIMIS busy ({exc.reason})")
    if isinstance(exc, UpstreamTimeout):
        return SyncFailed(f"{what}: openIMIS did not answer in time")
    return SyncFailed(f"{what}: openIMIS unavailable ({exc})")


class ReplicaSyncer:
    """Runs syncs for one replica. Not reentrant: the service runs one sync at a time per process, and the
    store's lock keeps other instances (sharing Redis) from syncing at the same moment."""

    PRIORITY = PRIORITY_NAMES["bulk"]
    """A sync page waits for the bulkhead as an HMS's master-data pull does: behind claims and eligibility."""

    def __init__(self, policy: ReplicaPolicy, store: ReplicaStore, upstream: OpenImisUpstream,
                 clock: Callable[[], float] = time.time, guard: Guard | None = None) -> None:
        self.policy = policy
        self.store = store
        self.upstream = upstream
        self.clock = clock
        self.guard = guard
        """The upstream's bulkhead + breaker, set by the Runtime that uses this replica (a new one, or the
        next runtime keeping it across a reload); None: unguarded (`openimis-mediator sync`, run by an
        operator)."""
        self._zone = ZoneInfo(upstream.config.time_zone)

    async def _get(self, path: str, query: dict[str, str]) -> tuple[int, Any]:
        """GET from openIMIS as the mediator's service user (OpenImisUpstream.get_document); (status, JSON or
        None). Only paths and queries we build."""
        raw_query = "&".join(f"{k}={v}" for k, v in query.items())
        try:
            return await self.upstream.get_document(path, raw_query, self.policy.request_timeout_s,
                                                    self._request_id(), self.guard, self.PRIORITY, None)
        except (UpstreamRefused, UpstreamTimeout, UpstreamUnavailable) as exc:
            raise _failed(path, exc) from exc

    @staticmethod
    def _request_id() -> str:
        return f"replica-{uuid.uuid4().hex[:16]}"

    async def _pages(self, rtype: str, extra: dict[str, str], progress: Progress | None,
                     page_size: int | None = None,
                     totals: dict[str, int] | None = None) -> AsyncIterator[list[dict[str, Any]]]:
        """Page by page (OpenImisUpstream.pages), so a full sync holds one page of parsed JSON at a time, not
        the whole type. `totals` (optional) receives the `total` openIMIS announced for `rtype`."""
        received = 0
        announced: int | None = None
        size = page_size or self.policy.page_size
        max_pages = self.policy.max_resources_per_type // size + 2   # beyond it max_resources_per_type failed
        pages = self.upstream.pages(rtype, extra, size, self.policy.request_timeout_s, self._request_id(),
                                    max_pages, self.guard, self.PRIORITY, None)
        try:
            async for page in pages:
                if page.status == 404 and page.number > 1:
                    break  # Django REST framework's "Invalid page." past the last page
                bundle = page.bundle
                if bundle is None:
                    if page.number == 1 and page.status == 500 and "_lastUpdated" in extra:
                        raise FilterUnsupported(f"{rtype}: openIMIS answered 500 to _lastUpdated")
                    raise SyncFailed(f"{rtype} page {page.number}: openIMIS answered {page.status}")
                if announced is None and isinstance(bundle.get("total"), int):
                    announced = bundle["total"]
                    if totals is not None:
                        totals[rtype] = announced
                entries = bundle.get("entry") or []
                resources: list[dict[str, Any]] = []
                for entry in entries:
                    resource = entry.get("resource") if isinstance(entry, dict) else None
                    if valid_upstream_resource(resource, rtype):
                        resources.append(resource)
                    else:
                        log.warning(JsonEvent.of("replica.malformed_entry_skipped", resource_type=rtype,
                                                 page=page.number))
                received += len(resources)
                if received > self.policy.max_resources_per_type:
                    raise SyncFailed(f"{rtype}: more than max_resources_per_type "
                                     f"({self.policy.max_resources_per_type})")
                if progress is not None:
                    progress(rtype, received, announced)
                yield resources
                if not entries:
                    break
                if page.has_next:
                    await self.store.refresh_lock()
        except UpstreamInvalidAnswer as exc:
            raise SyncFailed(f"{rtype}: {exc}") from exc
        except (UpstreamRefused, UpstreamTimeout, UpstreamUnavailable) as exc:
            raise _failed(rtype, exc) from exc
        finally:
            await pages.aclose()

    async def _whole_type(self, rtype: str, progress: Progress | None) -> list[dict[str, Any]]:
        """Every resource of `rtype`, re-read in small pages if openIMIS's pages come out short."""
        totals: dict[str, int] = {}
        found: dict[str, dict[str, Any]] = {}
        for page_size in (None, SHORT_PAGE_FALLBACK):
            async for resources in self._pages(rtype, {}, progress, page_size, totals):
                found.update((r["id"], r) for r in resources)
            if rtype not in totals or len(found) >= totals[rtype] or self.policy.page_size <= SHORT_PAGE_FALLBACK:
                break
        return list(found.values())

    async def _document(self, path: str, progress: Progress | None) -> dict[str, Any]:
        rtype, rid = path.split("/")
        status, document = await self._get(path, {})
        if status != 200 or not isinstance(document, dict) or document.get("resourceType") != rtype:
            raise SyncFailed(f"{path}: openIMIS answered {status}")
        # openIMIS builds these on the fly; some versions give no id. The configured one is how clients read it.
        document = {**document, "id": rid}
        if isinstance(document.get("url"), str):  # openIMIS makes it from the request URL: its own host
            document["url"] = self.upstream.rewriter.rewrite_url(document["url"])
        if progress is not None:
            progress(path, 1, 1)
        return document

    async def _upstream_total(self, rtype: str) -> int | None:
        status, bundle = await self._get(rtype, {"_count": "1", "page-offset": "1"})
        if status == 200 and isinstance(bundle, dict) and isinstance(bundle.get("total"), int):
            return int(bundle["total"])
        return None

    def _record(self, resource: dict[str, Any], now: float, previous: StoredResource | None) -> StoredResource | None:
        inactive = is_inactive(resource, now)
        if inactive and self.policy.inactive == "drop":
            return None
        # Served as stored: zone-less dateTimes get the upstream's time_zone here (mediator.fhir_answers).
        return build_record(add_zones(resource, self._zone), now, previous, inactive)

    async def run(self, full: bool | None = None, progress: Progress | None = None) -> SyncReport:
        """One sync. full=None: full if the replica is empty or the last full one is older than full_every_s."""
        if not await self.store.try_lock(max(600.0, self.policy.request_timeout_s * 4)):
            raise SyncBusy("another instance is syncing")
        try:
            state = await self.store.state()
            if full is None:
                full = state is None or self.clock() - state.last_full >= self.policy.full_every_s
            if full or state is None:
                return await self._full(state, progress)
            return await self._incremental(state, progress)
        except ReplicaStoreError as exc:
            raise SyncFailed(f"replica store: {exc}") from exc
        finally:
            await self.store.unlock()

    async def _full(self, old: SyncState | None, progress: Progress | None) -> SyncReport:
        started = self.clock()
        generation = await self.store.new_generation()
        report = SyncReport("full")
        try:
            for rtype in self.policy.resource_types:
                previous = await self.store.index(old.generation, rtype) if old is not None else {}
                kept: set[str] = set()
                totals: dict[str, int] = {}
                for page_size in (None, SHORT_PAGE_FALLBACK):
                    async for resources in self._pages(rtype, {}, progress, page_size, totals):
                        records = [r for r in (self._record(res, started, previous.get(res["id"]))
                                               for res in resources) if r is not None]
                        await self.store.put(generation, records)
                        report.changed += sum(1 for r in records if r.rid not in kept and (
                            (p := previous.get(r.rid)) is None or p.digest != r.digest))
                        kept.update(r.rid for r in records)
                    count = await self.store.count(generation, rtype)
                    if rtype not in totals or count >= totals[rtype] or self.policy.page_size <= SHORT_PAGE_FALLBACK:
                        break
                    # openIMIS 1.10 pages Practitioner/PractitionerRole wrongly for some _count values (measured:
                    # _count=15 gives 0 entries, _count>=29 gives 15 of 29); small pages come out whole.
                    log.warning(JsonEvent.of("replica.short_listing", resource_type=rtype, listed=count,
                                              total=totals[rtype], page_size=self.policy.page_size,
                                              retry_page_size=SHORT_PAGE_FALLBACK))
                report.counts[rtype] = await self.store.count(generation, rtype)
                report.removed += sum(1 for rid in previous if rid not in kept)
            for path in self.policy.documents:
                rtype, rid = path.split("/")
                before = await self.store.get(old.generation, rtype, rid) if old is not None else None
                document = await self._document(path, progress)
                record = build_record(add_zones(document, self._zone), started, before, False)
                await self.store.put(generation, [record])
                report.counts[rtype] = report.counts.get(rtype, 0) + 1
            finished = self.clock()
            state = SyncState(generation, finished, started, started - self.policy.overlap_s, report.counts)
            await self.store.commit(state)
        except BaseException:
            await self.store.discard(generation)
            raise
        report.seconds = finished - started
        log.info(JsonEvent.of("replica.full_sync_done", seconds=round(report.seconds, 3), counts=report.counts))
        return report

    async def _incremental(self, state: SyncState, progress: Progress | None) -> SyncReport:
        started = self.clock()
        report = SyncReport("incremental")
        zone = self.policy.upstream_time_zone or self.upstream.config.time_zone
        since = {"_lastUpdated": "ge" + upstream_time(state.cursor, zone)}
        upserts: list[StoredResource] = []
        removals: list[tuple[str, str]] = []
        expected: dict[str, int] = {}
        for rtype in self.policy.resource_types:
            known = await self.store.index(state.generation, rtype)
            added = 0
            try:
                resources = [r async for page in self._pages(rtype, since, progress) for r in page]
            except FilterUnsupported:
                # openIMIS 1.10 cannot filter some types by _lastUpdated (Organization: "Cannot resolve keyword
                # 'date_updated'"): read the whole type and diff it against the replica instead.
                resources = await self._whole_type(rtype, progress)
                listed = {r["id"] for r in resources}
                gone = [rid for rid in known if rid not in listed]
                removals.extend((rtype, rid) for rid in gone)
                added -= len(gone)
            for resource in resources:
                previous = known.get(resource["id"])
                record = self._record(resource, started, previous)
                if record is None:
                    if previous is not None:
                        removals.append((rtype, resource["id"]))
                        added -= 1
                elif previous is None or previous.digest != record.digest:
                    upserts.append(record)
                    added += previous is None
            expected[rtype] = len(known) + added
        for path in self.policy.documents:
            rtype, rid = path.split("/")
            before = await self.store.get(state.generation, rtype, rid)
            record = build_record(add_zones(await self._document(path, progress), self._zone), started, before,
                                  False)
            if before is None or before.digest != record.digest:
                upserts.append(record)
        for rtype in self.policy.resource_types:
            upstream_total = await self._upstream_total(rtype)
            # With inactive: drop, openIMIS counts resources we deliberately left out; only full syncs then.
            if upstream_total is not None and upstream_total != expected[rtype] and self.policy.inactive == "keep":
                log.info(JsonEvent.of("replica.count_differs", resource_type=rtype, openimis=upstream_total,
                                       replica=expected[rtype], effect="full sync needed"))
                report.full_needed = True
        counts = dict(state.counts)
        counts.update(expected)
        finished = self.clock()
        new_state = SyncState(state.generation, finished, state.last_full, started - self.policy.overlap_s, counts)
        await self.store.apply(new_state, upserts, removals)
        report.counts, report.changed, report.removed = counts, len(upserts), len(removals)
        report.seconds = finished - started
        log.info(JsonEvent.of("replica.incremental_sync_done", seconds=round(report.seconds, 3), changed=report.changed,
                               removed=report.removed))
        return report
