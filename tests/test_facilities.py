"""The facility directory's reload from openIMIS inside the upstream's bulkhead (over a real socket, from the
openIMIS stand-in: the queueing is the mediator's behaviour): at the interactive priority, and a reload
the bulkhead refuses falls back on the copy still held, as any failed reload does."""

from __future__ import annotations

import asyncio
import time

import pytest

from mediator.bulkhead import UpstreamGuard
from mediator.config.models import BulkheadConfig, UpstreamConfig
from mediator.facilities import DirectoryUnavailable, UpstreamFacilityDirectory
from mediator.upstream import OpenImisUpstream
from tests.conftest import upstream_url


@pytest.fixture
async def upstream(sandbox_server):  # type: ignore[no-untyped-def]
    config = UpstreamConfig.model_validate({"base_url": upstream_url(sandbox_server),
                                            "login": {"username": "Admin", "password_env": "OPENIMIS_PASSWORD"}})
    made = OpenImisUpstream("openimis", config, "https://mediator.example.org/fhir/",
                            environ={"OPENIMIS_PASSWORD": "admin123"})
    await made.start()
    yield made
    await made.close()


def _guard(max_queue: int) -> UpstreamGuard:
    return UpstreamGuard.build("openimis", BulkheadConfig(max_concurrent=1, max_queue=max_queue, max_wait_s=5), None)


async def test_a_reload_the_bulkhead_refuses_serves_the_copy_still_held(upstream):
    guard = _guard(max_queue=0)   # a request that finds the slot taken is refused at once
    directory = UpstreamFacilityDirectory(upstream, ttl_s=0.05, max_stale_s=600, page_size=50, timeout_s=5,
                                          guard=guard)
    first = await directory.snapshot()
    assert first.facility_of_organization("JMHOS001") == "JMHOS001"
    await asyncio.sleep(0.1)   # past the TTL: the next snapshot reloads
    async with guard.slot(50):   # openIMIS's one API slot is taken
        assert await directory.snapshot() is first   # the stale copy, not 503 upstream.overloaded
        empty = UpstreamFacilityDirectory(upstream, ttl_s=300, max_stale_s=600, page_size=50, timeout_s=5,
                                          guard=guard)
        with pytest.raises(DirectoryUnavailable):   # no copy to fall back on: refused as a directory failure
            await empty.snapshot()
    assert directory.loads == 1
    assert (await directory.snapshot()).loaded_at > first.loaded_at   # the slot is free again: reloaded


async def test_a_reload_waits_ahead_of_bulk_requests(sandbox, upstream):
    guard = _guard(max_queue=4)
    directory = UpstreamFacilityDirectory(upstream, ttl_s=300, max_stale_s=600, page_size=50, timeout_s=5,
                                          guard=guard)
    directory_pages_before_bulk: list[int] = []

    async def bulk_pull() -> None:
        async with guard.slot(10):
            directory_pages_before_bulk.append(sum("/Organization/" in r["path"] for r in sandbox.requests))

    async with guard.slot(50):
        bulk = asyncio.create_task(bulk_pull())   # waits first
        await asyncio.sleep(0.05)
        reload = asyncio.create_task(directory.snapshot())
        deadline = time.monotonic() + 5
        while guard.bulkhead.queued < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
    snapshot = await reload
    await bulk
    assert snapshot.facility_of_organization("JMHOS001") == "JMHOS001"
    assert directory_pages_before_bulk == [1]   # the directory's first page went before the earlier bulk pull
