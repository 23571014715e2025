"""Store contract: the memory store and the Redis store (real Redis) answer every question identically."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from mediator.replica.records import SearchQuery, StoredResource, SyncState, build_record
from mediator.replica.store import RedisReplicaStore
from tests.replica.conftest import REDIS_URL

T0 = 1_700_000_000.0


def med(rid: str, code: str, name: str, updated: float) -> StoredResource:
    resource = {"resourceType": "Medication", "id": rid, "identifier": [{"value": code}], "code": {"text": name},
                "meta": {"lastUpdated": datetime.fromtimestamp(updated, UTC).isoformat()}}
    return build_record(resource, T0, None, False)


ITEMS = [med("m1", "AMOX", "Amoxicillin 500mg", T0 + 10), med("m2", "PARA", "Paracetamol 1g", T0 + 20),
         med("m3", "IBU", "Ibuprofen 400mg", T0 + 20), med("m4", "AMOXCLAV", "Amoxicillin + clavulanate", T0 + 30)]


async def _committed(store, records=ITEMS) -> SyncState:
    generation = await store.new_generation()
    await store.put(generation, records)
    state = SyncState(generation, T0 + 100, T0 + 50, T0 - 300, {"Medication": len(records)})
    await store.commit(state)
    return state


async def test_an_empty_store_has_no_state(store):
    assert await store.state() is None
    page = await store.search("nothing", "Medication", SearchQuery())
    assert (page.total, page.items) == (0, [])


async def test_committed_data_reads_by_id_and_code(store):
    state = await _committed(store)
    assert (await store.state()).to_json() == state.to_json()
    found = await store.get(state.generation, "Medication", "m2")
    assert found is not None and json.loads(found.body)["code"]["text"] == "Paracetamol 1g"
    assert found.digest == ITEMS[1].digest and found.last_updated == T0 + 20
    by_code = await store.get_by_code(state.generation, "Medication", "para")
    assert by_code is not None and by_code.rid == "m2"
    assert await store.get(state.generation, "Medication", "nope") is None
    assert await store.get_by_code(state.generation, "Location", "para") is None
    assert await store.count(state.generation, "Medication") == 4


@pytest.mark.parametrize(
    ("query", "total", "ids"),
    [
        (SearchQuery(), 4, ["m1", "m2", "m3", "m4"]),                       # order: last_updated, then id
        (SearchQuery(offset=1, count=2), 4, ["m2", "m3"]),
        (SearchQuery(offset=4, count=2), 4, []),
        (SearchQuery(count=0), 4, []),
        (SearchQuery(name="amoxi"), 2, ["m1", "m4"]),
        (SearchQuery(name="amoxi", offset=1), 2, ["m4"]),
        (SearchQuery(code="ibu"), 1, ["m3"]),
        (SearchQuery(code="ibu", name="para"), 0, []),
        (SearchQuery(since=T0 + 20), 3, ["m2", "m3", "m4"]),
        (SearchQuery(since=T0 + 20, since_inclusive=False), 1, ["m4"]),
        (SearchQuery(until=T0 + 20), 3, ["m1", "m2", "m3"]),
        (SearchQuery(until=T0 + 20, until_inclusive=False), 1, ["m1"]),
        (SearchQuery(since=T0 + 15, until=T0 + 25, name="o"), 2, ["m2", "m3"]),
    ],
)
async def test_searches_filter_order_and_page_alike(store, query, total, ids):
    state = await _committed(store)
    page = await store.search(state.generation, "Medication", query)
    assert page.total == total
    assert [r.rid for r in page.items] == ids
    assert all(r.body for r in page.items)


async def test_a_new_generation_is_invisible_until_commit_and_discard_leaves_the_current(store):
    state = await _committed(store)
    generation = await store.new_generation()
    await store.put(generation, [med("x1", "NEW", "New item", T0 + 40)])
    assert (await store.state()).generation == state.generation
    await store.discard(generation)
    assert await store.get(generation, "Medication", "x1") is None
    assert await store.get(state.generation, "Medication", "m1") is not None


async def test_commit_keeps_the_previous_generation_and_drops_older_ones(store):
    first = await _committed(store)
    second = await _committed(store, ITEMS[:1])
    assert await store.get(first.generation, "Medication", "m2") is not None  # readers mid-request finish
    await _committed(store, ITEMS[:2])
    assert await store.get(first.generation, "Medication", "m2") is None
    assert await store.get(second.generation, "Medication", "m1") is not None


async def test_apply_upserts_and_removes_with_the_new_state_in_one_step(store):
    state = await _committed(store)
    renamed = build_record({"resourceType": "Medication", "id": "m1", "identifier": [{"value": "AMOX2"}],
                            "code": {"text": "Amoxicillin 250mg"}}, T0 + 60, None, False)
    new_state = SyncState(state.generation, T0 + 200, state.last_full, T0 + 100, {"Medication": 3})
    await store.apply(new_state, [renamed], [("Medication", "m3"), ("Medication", "absent")])
    assert (await store.state()).last_success == T0 + 200
    assert await store.get(state.generation, "Medication", "m3") is None
    assert await store.get_by_code(state.generation, "Medication", "ibu") is None
    assert await store.get_by_code(state.generation, "Medication", "amox") is None  # the old code is gone
    assert (await store.get_by_code(state.generation, "Medication", "AMOX2")).rid == "m1"
    page = await store.search(state.generation, "Medication", SearchQuery())
    assert [r.rid for r in page.items] == ["m2", "m4", "m1"]  # m1 moved to its new last_updated
    assert await store.count(state.generation, "Medication") == 3


async def test_index_gives_digests_without_bodies(store):
    state = await _committed(store)
    index = await store.index(state.generation, "Medication")
    assert sorted(index) == ["m1", "m2", "m3", "m4"]
    assert index["m4"].digest == ITEMS[3].digest and index["m4"].codes == ("amoxclav",)
    assert index["m4"].name == "amoxicillin + clavulanate"


async def test_only_one_instance_holds_the_redis_sync_lock(redis_prefix):
    first, second = RedisReplicaStore(REDIS_URL, redis_prefix), RedisReplicaStore(REDIS_URL, redis_prefix)
    await first.start()
    await second.start()
    try:
        assert await first.try_lock(30)
        assert not await second.try_lock(30)
        await first.refresh_lock()
        await first.unlock()
        assert await second.try_lock(30)
        await second.unlock()
    finally:
        await first.close()
        await second.close()
