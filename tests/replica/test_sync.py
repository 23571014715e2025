"""Sync over a real socket from the openIMIS stand-in: full, incremental, failures, deletions, validity."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

from mediator.bulkhead import UpstreamGuard
from mediator.config import load_config
from mediator.config.models import AdaptiveLimitConfig, BulkheadConfig
from mediator.metrics import Metrics
from mediator.replica.records import INACTIVE_TAG, SearchQuery
from mediator.replica.service import Replica, store_for
from mediator.replica.sync import SyncFailed, upstream_time
from mediator.upstream import OpenImisUpstream
from tests.conftest import channels_yaml, upstream_url, write_config
from tests.replica.conftest import REDIS_URL

MED_ID = "generated-med"


def replica_yaml(store: str = "memory", extra: str = "") -> str:
    return f"version: 1\nupstream: openimis\nstore: {store}\nschedule: false\npage_size: 100\n{extra}"


@pytest.fixture
async def make_replica(tmp_path: Path, sandbox_server, redis_prefix):
    made: list[tuple[Replica, OpenImisUpstream]] = []

    async def factory(store: str = "memory", extra: str = "", time_zone: str | None = None,
                      guard: UpstreamGuard | None = None) -> Replica:
        server = f"redis:\n  url: \"{REDIS_URL}\"\n  key_prefix: \"{redis_prefix}\"\n"
        channels = channels_yaml(upstream_url(sandbox_server), extra_server=server)
        if time_zone is not None:   # the upstream's time_zone (channels.yaml)
            channels = channels.replace("    connect_timeout_s: 1\n",
                                        f"    connect_timeout_s: 1\n    time_zone: {time_zone}\n")
        root = write_config(tmp_path / f"config{len(made)}", channels,
                            extra_policies={"replica.yaml": replica_yaml(store, extra)})
        config = load_config(root)
        policy = config.policies["replica"]
        upstream = OpenImisUpstream("openimis", config.channels.upstreams["openimis"],
                                    config.channels.server.public_base_url)
        await upstream.start()
        replica = Replica(policy, store_for(config, policy), upstream, Metrics(),  # type: ignore[arg-type]
                          config.channels.server.public_base_url, guard=guard)
        await replica.start()
        made.append((replica, upstream))
        return replica

    yield factory
    for replica, upstream in made:
        await replica.close()
        await upstream.close()


def medication(sandbox, rid: str = MED_ID, name: str = "GENERATED PARACETAMOL 500MG", code: str = "GEN1") -> dict:
    item = copy.deepcopy(next(iter(sandbox.store["Medication"].values())))
    item["id"] = rid
    item["identifier"][0]["value"] = code
    item["code"] = {"text": name}
    return item


async def _body(replica: Replica, rtype: str, rid: str) -> dict | None:
    state = await replica.store.state()
    found = await replica.store.get(state.generation, rtype, rid)
    return json.loads(found.body) if found else None


def _sandbox_counts(sandbox) -> dict[str, int]:
    types = ("ActivityDefinition", "Medication", "Location", "Organization", "InsurancePlan", "Practitioner",
             "PractitionerRole")
    return {t: len(sandbox.store[t]) for t in types}


@pytest.mark.parametrize("store_kind", ["memory", "redis"])
async def test_full_sync_copies_every_type_and_the_code_systems(sandbox, make_replica, store_kind):
    sandbox.generate_medications(250)   # three pages of 100
    replica = await make_replica(store_kind)
    try:
        report = await replica.sync()
        assert report.kind == "full"
        assert report.counts == {**_sandbox_counts(sandbox), "CodeSystem": 2}
        pages = [r["query"] for r in sandbox.requests if r["path"].endswith("/Medication/")]
        assert pages[:3] == ["_count=100&page-offset=1", "_count=100&page-offset=2", "_count=100&page-offset=3"]
        body = await _body(replica, "Medication", next(iter(sandbox.store["Medication"])))
        assert body["meta"]["lastUpdated"].endswith("Z")
        codes = await _body(replica, "CodeSystem", "medical-item")
        assert codes["resourceType"] == "CodeSystem" and codes["count"] == 251
        assert codes["url"] == "https://mediator.example.org/fhir/CodeSystem/medical-item/"
        assert replica.metrics.replica_items.labels("Medication")._value.get() == 251
    finally:
        await replica.close()


@pytest.mark.parametrize("store_kind", ["memory", "redis"])
async def test_incremental_sync_asks_since_the_cursor_and_applies_changes(sandbox, make_replica, store_kind):
    replica = await make_replica(store_kind)
    try:
        await replica.sync()
        sandbox.upsert(medication(sandbox))
        report = await replica.sync()
        assert report.kind == "incremental" and not report.full_needed
        assert report.changed >= 1
        queries = [r["query"] for r in sandbox.requests if "_lastUpdated" in r["query"]]
        assert queries and all(re.search(r"_lastUpdated=ge\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(&|$)", q) for q in queries)
        body = await _body(replica, "Medication", MED_ID)
        assert body["code"]["text"] == "GENERATED PARACETAMOL 500MG"
        state = await replica.store.state()
        assert (await replica.store.search(state.generation, "Medication", SearchQuery(name="paracetamol"))).total == 1
    finally:
        await replica.close()


async def test_the_cursor_is_the_previous_start_minus_the_overlap_in_openimis_format(sandbox, make_replica):
    replica = await make_replica(extra="overlap_s: 60\nupstream_time_zone: Africa/Dar_es_Salaam\n")
    try:
        now = [1_700_000_000.0]
        replica.syncer.clock = lambda: now[0]
        await replica.sync()
        now[0] += 500
        await replica.sync()
        assert upstream_time(1_700_000_000.0 - 60, "Africa/Dar_es_Salaam") == "2023-11-15T01:12:20"
        assert any("_lastUpdated=ge2023-11-15T01:12:20" in r["query"] for r in sandbox.requests)
    finally:
        await replica.close()


async def test_the_upstream_time_zone_is_the_default_for_the_cursor_and_the_stored_datetimes(sandbox, make_replica):
    replica = await make_replica(extra="overlap_s: 60\n", time_zone="Africa/Dar_es_Salaam")
    try:
        now = [1_700_000_000.0]
        replica.syncer.clock = lambda: now[0]
        await replica.sync()
        now[0] += 500
        await replica.sync()
        assert any("_lastUpdated=ge2023-11-15T01:12:20" in r["query"] for r in sandbox.requests)
        state = await replica.store.state()
        assert state is not None
        page = await replica.store.search(state.generation, "ActivityDefinition", SearchQuery())
        dates = [json.loads(r.body)["date"] for r in page.items if b'"date"' in r.body]
        assert dates and all(d.endswith("+03:00") for d in dates)   # openIMIS's zone-less dates, zoned
    finally:
        await replica.close()


@pytest.mark.parametrize("store_kind", ["memory", "redis"])
async def test_a_failed_sync_keeps_the_last_good_data(sandbox, make_replica, store_kind):
    replica = await make_replica(store_kind)
    try:
        await replica.sync()
        before = await replica.store.state()
        sandbox.upsert(medication(sandbox, name="CHANGED WHILE OPENIMIS FAILS"))
        sandbox.failing_types = {"Practitioner"}   # after Medication in the pull order
        for full in (True, False):
            with pytest.raises(SyncFailed, match="Practitioner page 1: openIMIS answered 500"):
                await replica.sync(full=full)
            state = await replica.store.state()
            assert state.to_json() == before.to_json()
            assert await _body(replica, "Medication", MED_ID) is None
            assert await _body(replica, "Location", next(iter(sandbox.store["Location"]))) is not None
        assert replica.metrics.replica_sync_errors.labels("full")._value.get() == 1
        assert replica.metrics.replica_sync_errors.labels("incremental")._value.get() == 1
        sandbox.failing_types = set()
        await replica.sync()
        assert (await _body(replica, "Medication", MED_ID))["code"]["text"] == "CHANGED WHILE OPENIMIS FAILS"
    finally:
        await replica.close()


async def test_an_unreachable_openimis_is_a_failed_sync(make_replica, sandbox_server):
    replica = await make_replica()
    try:
        await sandbox_server.close()
        with pytest.raises(SyncFailed):
            await replica.sync()
        assert await replica.store.state() is None
    finally:
        await replica.close()


async def _until(condition, timeout_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


class CountingGuard(UpstreamGuard):
    """The real guard, counting the requests sent through it."""

    calls = 0

    async def call(self, priority, send, kind=""):  # type: ignore[no-untyped-def]
        self.calls += 1
        return await super().call(priority, send, kind)


async def test_a_sync_waits_for_a_slot_of_the_upstreams_bulkhead_after_claims(sandbox, make_replica):
    """openIMIS's one API slot is held by a claim: the sync's first page waits (nothing is sent), a claim
    that arrives later still goes first (the sync is bulk), every request of the sync went through the
    guard, and the pages' answer times do not feed the adaptive limit (its minimum-RTT measurement of 3
    samples gets only the two claims)."""
    limit = AdaptiveLimitConfig(probe_samples=3)
    built = UpstreamGuard.build("openimis", BulkheadConfig(mode="adaptive", min_concurrent=1, max_concurrent=1,
                                                           adaptive=limit, max_queue=8), None)
    guard = CountingGuard(built.name, built.bulkhead, built.breaker)
    replica = await make_replica(guard=guard)
    order: list[str] = []

    async def claim() -> None:
        async with guard.slot(50, "claims:create"):
            order.append("second claim")

    async with guard.slot(50, "claims:create"):
        sync = asyncio.create_task(replica.sync())
        await _until(lambda: guard.bulkhead.queued == 1)
        second = asyncio.create_task(claim())
        await _until(lambda: guard.bulkhead.queued == 2)
        await asyncio.sleep(0.1)
        assert not sync.done() and sandbox.requests == []   # not one page sent yet
        order.append("first claim done")
    await second
    report = await sync
    assert order == ["first claim done", "second claim"]
    assert report.kind == "full" and await replica.store.state() is not None
    reads = [r for r in sandbox.requests if r["method"] == "GET"]
    assert len(reads) >= 9 and guard.calls == len(reads)   # 7 types and 2 code systems, each guarded
    assert guard.bulkhead.in_flight == 0
    assert guard.bulkhead.limit.probes == 0   # type: ignore[attr-defined]  # 2 of 3 samples: the claims


@pytest.mark.parametrize("store_kind", ["memory", "redis"])
async def test_deletions_are_noticed_by_the_count_check_and_dropped_by_a_full_sync(sandbox, make_replica,
                                                                                  store_kind):
    sandbox.upsert(medication(sandbox))
    replica = await make_replica(store_kind)
    try:
        await replica.sync()
        sandbox.remove("Medication", MED_ID)
        report = await replica.sync()
        assert report.kind == "incremental" and report.full_needed
        assert await _body(replica, "Medication", MED_ID) is not None   # incremental cannot see deletions
        report = await replica.sync(full=True)
        assert report.removed == 1
        assert await _body(replica, "Medication", MED_ID) is None
        state = await replica.store.state()
        assert await replica.store.get_by_code(state.generation, "Medication", "GEN1") is None
    finally:
        await replica.close()


async def test_resources_whose_validity_ended_are_kept_and_tagged_by_default(sandbox, make_replica):
    location = copy.deepcopy(next(iter(sandbox.store["Location"].values())))
    location.update(id="closed-location", status="inactive")
    sandbox.upsert(location)
    replica = await make_replica()
    try:
        await replica.sync()
        body = await _body(replica, "Location", "closed-location")
        assert INACTIVE_TAG in body["meta"]["tag"]
        active = await _body(replica, "Location", next(iter(sandbox.store["Location"])))
        assert "tag" not in active["meta"]
    finally:
        await replica.close()


async def test_inactive_drop_removes_resources_that_became_inactive(sandbox, make_replica):
    location = copy.deepcopy(next(iter(sandbox.store["Location"].values())))
    location.update(id="closing-location")
    sandbox.upsert(location)
    replica = await make_replica(extra="inactive: drop\n")
    try:
        await replica.sync()
        assert await _body(replica, "Location", "closing-location") is not None
        sandbox.upsert({**location, "status": "inactive"})
        report = await replica.sync()
        assert report.kind == "incremental" and report.removed == 1
        assert await _body(replica, "Location", "closing-location") is None
    finally:
        await replica.close()


async def test_unchanged_resources_keep_their_last_updated_when_openimis_sends_none(sandbox, make_replica):
    replica = await make_replica()
    try:
        sandbox.updated.clear()   # like openIMIS's Medication: no meta.lastUpdated at all
        now = [1_000.0]
        replica.syncer.clock = lambda: now[0]
        rid = next(iter(sandbox.store["Medication"]))
        await replica.sync()
        now[0] = 2_000.0
        await replica.sync(full=True)
        assert (await _body(replica, "Medication", rid))["meta"]["lastUpdated"] == "1970-01-01T00:16:40.000Z"
        sandbox.store["Medication"][rid]["code"] = {"text": "RENAMED"}
        now[0] = 3_000.0
        await replica.sync(full=True)
        assert (await _body(replica, "Medication", rid))["meta"]["lastUpdated"] == "1970-01-01T00:50:00.000Z"
    finally:
        await replica.close()


async def test_sync_command_shows_progress_and_fills_the_shared_store(sandbox_server, tmp_path, redis_prefix):
    server = f"redis:\n  url: \"{REDIS_URL}\"\n  key_prefix: \"{redis_prefix}\"\n"
    root = write_config(tmp_path / "config", channels_yaml(upstream_url(sandbox_server), extra_server=server),
                        extra_policies={"replica.yaml": replica_yaml("redis")})
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mediator", "sync", "--config", str(root),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONWARNINGS": ""})
    out, err = await asyncio.wait_for(process.communicate(), 60)
    text = err.decode()
    assert process.returncode == 0, text
    assert re.search(r"Medication\s+\[#{30}\] 1/1", text)
    assert "full sync done" in text and "Medication 1" in text
    from mediator.replica.store import RedisReplicaStore

    store = RedisReplicaStore(REDIS_URL, redis_prefix)
    await store.start()
    try:
        state = await store.state()
        assert state is not None and state.counts["Practitioner"] == 3
        assert time.time() - state.last_success < 120
    finally:
        await store.close()


async def test_the_stand_in_filters_last_updated_like_openimis(sandbox, sandbox_server):
    from aiohttp.test_utils import TestClient

    sandbox.upsert(medication(sandbox), when=1_700_000_000.0)   # 2023-11-14T22:13:20Z
    client = TestClient(sandbox_server)
    await client.start_server()
    try:
        login = await client.post("/api/api_fhir_r4/login/", json={"username": "Admin", "password": "admin123"})
        auth = {"Authorization": f"Bearer {(await login.json())['token']}"}
        base = "/api/api_fhir_r4/Medication/?_lastUpdated="
        older = await (await client.get(base + "le2023-11-14T22:13:20", headers=auth)).json()
        assert [e["resource"]["id"] for e in older["entry"]] == [MED_ID]
        assert older["entry"][0]["resource"]["meta"]["lastUpdated"] == "2023-11-14T22:13:20+00:00"
        newer = await (await client.get(base + "gt2023-11-14T22:13:20", headers=auth)).json()
        assert MED_ID not in [e["resource"]["id"] for e in newer["entry"]] and newer["total"] == 1
        assert (await client.get(base + "ge2023-11-14T22:13:20Z", headers=auth)).status == 500
    finally:
        await client.close()


async def test_closing_never_hangs_on_a_sync_task_that_swallows_its_cancellation(monkeypatch):
    """redis-py can turn a cancellation into a connection error; close must still return."""
    import asyncio

    from mediator.replica import service
    from mediator.replica.service import Replica
    from mediator.replica.store import MemoryReplicaStore

    monkeypatch.setattr(service, "CLOSE_TIMEOUT_S", 0.2)
    replica = Replica.__new__(Replica)  # only close() is exercised: its task and its store
    replica.store = MemoryReplicaStore()

    released = False

    async def stubborn() -> None:
        while not released:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue  # what a misbehaving client library does

    replica._task = asyncio.create_task(stubborn())
    stuck = replica._task
    await asyncio.sleep(0)
    await asyncio.wait_for(replica.close(), 2)  # bounded: returns after CLOSE_TIMEOUT_S
    assert replica._task is None
    assert not stuck.done()
    released = True  # let the test's own stubborn task end
    stuck.cancel()
    await asyncio.wait_for(stuck, 2)
