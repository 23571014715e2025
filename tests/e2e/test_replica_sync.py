"""The master-data replica synced from a REAL openIMIS: whole, then incrementally."""

from __future__ import annotations

import pytest

from mediator.bulkhead import UpstreamGuard
from mediator.config import load_config
from mediator.metrics import Metrics
from mediator.replica.service import Replica, store_for
from mediator.upstream import OpenImisUpstream
from tests.conftest import DEFAULT_IP_POLICY, write_config
from tests.e2e.conftest import e2e_channels
from tests.e2e.vendors import CHANNELS

# The first e2e test may install and start openIMIS (pip ~2 min on an empty machine): a longer bound.
pytestmark = [pytest.mark.openimis, pytest.mark.timeout(1800)]

REPLICA = """\
version: 1
upstream: openimis
store: memory
resource_types: [ActivityDefinition, Medication, Location, Organization, InsurancePlan, Practitioner,
                 PractitionerRole]
documents: [CodeSystem/medical-item, CodeSystem/medical-service]
page_size: 100
schedule: false
"""


async def _totals(upstream: OpenImisUpstream, types: list[str]) -> dict[str, int]:
    totals = {}
    for rtype in types:
        async with upstream.session.get(upstream.upstream_url(rtype, "_count=1"),
                                        headers={"Authorization": f"Bearer {await upstream.token()}"}) as r:
            totals[rtype] = (await r.json())["total"]
    return totals


async def test_full_then_incremental_sync_from_openimis(openimis, tmp_path):
    root = write_config(tmp_path, e2e_channels(openimis["fhir_base_url"], channels=CHANNELS), DEFAULT_IP_POLICY,
                        {"replica.yaml": REPLICA})
    config = load_config(root)
    policy = config.policies["replica"]
    server = config.channels.server
    upstream_config = config.channels.upstreams["openimis"]
    upstream = OpenImisUpstream("openimis", upstream_config, server.public_base_url)
    # As a server runs it: every request of the sync inside the upstream's bulkhead and breaker.
    guard = UpstreamGuard.build("openimis", upstream_config.bulkhead, upstream_config.circuit_breaker)
    replica = Replica(policy, store_for(config, policy), upstream, Metrics(), server.public_base_url, guard=guard)
    await upstream.start()
    await replica.start()
    try:
        types = list(policy.resource_types)
        totals = await _totals(upstream, types)
        full = await replica.sync(full=True)
        # Every type whole, including Practitioner/PractitionerRole, which openIMIS pages short at _count=100.
        assert {t: full.counts[t] for t in types} == totals
        assert full.counts["CodeSystem"] == 2
        incremental = await replica.sync(full=False)
        assert incremental.kind == "incremental"
        assert {t: incremental.counts.get(t, full.counts[t]) for t in types} == totals
        # openIMIS's 500 to Organization?_lastUpdated (read whole instead) is no failure for the breaker.
        assert guard.breaker is not None and guard.breaker.state == "closed" and guard.breaker.failures == 0
        assert guard.bulkhead.in_flight == 0
    finally:
        await replica.close()
        await upstream.close()
