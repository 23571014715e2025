"""The facility directory reads facilities and claim administrators from the replica when it holds them."""

import time

from mediator.config.models import UpstreamConfig
from mediator.facilities import UpstreamFacilityDirectory
from mediator.replica.facilities import ReplicaFacilitySource
from mediator.replica.policy import ReplicaPolicy
from mediator.replica.records import SyncState, build_record
from mediator.replica.store import MemoryReplicaStore
from mediator.sandbox import load_fixtures
from mediator.upstream import OpenImisUpstream
from tests.conftest import upstream_url


async def _replica(synced_at: float, resource_types=("Organization", "PractitionerRole")) -> ReplicaFacilitySource:
    store = MemoryReplicaStore()
    generation = await store.new_generation()
    fixtures = load_fixtures()
    records = [build_record(r, synced_at, None, False) for t in ("Organization", "PractitionerRole")
               for r in fixtures[t].values()]
    await store.put(generation, records)
    await store.commit(SyncState(generation, synced_at, synced_at, synced_at))
    policy = ReplicaPolicy.model_validate({"version": 1, "upstream": "openimis",
                                           "resource_types": list(resource_types)})
    return ReplicaFacilitySource(policy, store)


def _directory(server, replica) -> tuple[UpstreamFacilityDirectory, OpenImisUpstream]:
    config = UpstreamConfig.model_validate({"base_url": upstream_url(server),
                                            "login": {"username": "Admin", "password_env": "OPENIMIS_PASSWORD"}})
    upstream = OpenImisUpstream("openimis", config, "https://mediator.example.org/fhir/",
                                environ={"OPENIMIS_PASSWORD": "admin123"})
    return UpstreamFacilityDirectory(upstream, ttl_s=300, max_stale_s=600, page_size=50, timeout_s=5,
                                     replica=replica), upstream


def _directory_requests(sandbox) -> list[str]:
    return [r["path"] for r in sandbox.requests if "/Organization/" in r["path"] or "/PractitionerRole/" in r["path"]]


async def test_a_fresh_replica_is_read_and_openimis_is_not(sandbox, sandbox_server):
    directory, upstream = _directory(sandbox_server, await _replica(time.time()))
    await upstream.start()
    try:
        from_replica = await directory.snapshot()
        assert _directory_requests(sandbox) == []
        # The same directory as openIMIS's own lists give.
        plain, plain_upstream = _directory(sandbox_server, None)
        await plain_upstream.start()
        try:
            from_openimis = await plain.snapshot()
        finally:
            await plain_upstream.close()
        assert from_replica.organizations == from_openimis.organizations
        assert from_replica.claim_administrators == from_openimis.claim_administrators
        assert from_replica.facility_of_organization("JMHOS001") == "JMHOS001"
    finally:
        await upstream.close()


async def test_a_miss_refresh_and_a_stale_or_partial_replica_read_openimis(sandbox, sandbox_server):
    directory, upstream = _directory(sandbox_server, await _replica(time.time()))
    await upstream.start()
    try:
        await directory.snapshot()
        await directory.snapshot(max_age_s=0)   # a miss: the facility may be newer than the replica
        assert _directory_requests(sandbox) != []
    finally:
        await upstream.close()
    for replica in (await _replica(time.time() - 3600), await _replica(time.time(), ("Organization",))):
        sandbox.requests.clear()
        directory, upstream = _directory(sandbox_server, replica)
        await upstream.start()
        try:
            assert (await directory.snapshot()).facility_of_organization("JMHOS001") == "JMHOS001"
            assert _directory_requests(sandbox) != []
        finally:
            await upstream.close()
