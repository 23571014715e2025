"""The over_limit stage: a caller the rate limit just refused is refused again, early, until its limit can
admit a request; never a request the exact limiter would admit (checked on random traffic, two instances
sharing one exact store), and over sockets: before its body is read, with the rate limit's answer."""

from __future__ import annotations

import asyncio
import json
import random

from mediator.app import METRICS
from mediator.gcra import GcraLimit, LocalGcraStore
from mediator.stages.rate_limit import RecentRefusals
from tests.conftest import channels_yaml, upstream_url

S = 1_000_000
NOW = 1_700_000_000 * S


def _limit(name, per, rate, period_s, burst=None) -> str:
    text = f"  - name: {name}\n    per: [{', '.join(per)}]\n    rate: {rate}\n    period_s: {period_s}\n" \
           "    on_store_error: local\n"
    return text + (f"    burst: {burst}\n" if burst else "")


def _decisions(client, stage: str, reason: str) -> float:
    value = client.server.app[METRICS].registry.get_sample_value(
        "mediator_stage_decisions_total", {"stage": stage, "outcome": "deny", "reason": reason})
    return value or 0.0


def test_it_never_refuses_what_the_exact_limiter_admits():
    """Two instances, each with its own refusal memory, share one exact GCRA store (what Redis is); random
    arrivals and costs. Whenever an instance's memory refuses, the exact store refuses the same request too;
    and the memory does refuse (the check would be empty otherwise)."""
    rng = random.Random(20261201)
    limits = [GcraLimit("fast", 10, 1, S // 10, S // 10 * 3, 3), GcraLimit("slow", 20, 60, 3 * S, 30 * S, 10)]
    shared = LocalGcraStore()
    memories = [RecentRefusals(), RecentRefusals()]
    now, early_refusals = NOW, 0
    for _ in range(20_000):
        now += rng.choice([0, 0, 1_000, 20_000, 150_000, 900_000])
        key = rng.choice(["a", "b"])
        limit = rng.choice(limits)
        cost = rng.choice([1, 1, 1, 2, 3])
        memory = memories[rng.randrange(2)]
        store_key = f"rl:{limit.name}:{key}"
        remembered = memory.refusing(store_key, now)
        decision, results = shared.apply([store_key], [limit], cost, now)
        if remembered is not None:
            early_refusals += 1
            assert not decision.allow, "the memory refused what the exact limiter admitted"
        elif not decision.allow and decision.reason == "rate_limit.exceeded":
            memory.record(store_key, limit, results[0], cost, now)
    assert early_refusals > 1_000


def test_the_memory_is_bounded_and_keeps_the_newest():
    limit = GcraLimit("one", 1, 60, 60 * S, 60 * S, 1)
    memory = RecentRefusals(max_keys=4)
    store = LocalGcraStore()
    for i in range(10):
        key = f"k{i}"
        store.apply([key], [limit], 1, NOW)
        decision, results = store.apply([key], [limit], 1, NOW)
        assert not decision.allow
        memory.record(key, limit, results[0], 1, NOW)
        assert len(memory) <= 4
    assert memory.refusing("k9", NOW) is not None and memory.refusing("k0", NOW) is None
    assert memory.refusing("k9", NOW + 61 * S) is None and len(memory) < 4   # expired: forgotten


def test_a_refusal_only_of_this_requests_cost_is_not_remembered():
    limit = GcraLimit("burst3", 3, 60, 20 * S, 60 * S, 3)
    store, memory = LocalGcraStore(), RecentRefusals()
    assert store.apply(["k"], [limit], 2, NOW)[0].allow          # one left
    decision, results = store.apply(["k"], [limit], 2, NOW)     # two asked: refused, but one would pass
    assert not decision.allow
    memory.record("k", limit, results[0], 2, NOW)
    assert memory.refusing("k", NOW) is None
    assert store.apply(["k"], [limit], 1, NOW)[0].allow


async def test_a_refused_caller_is_refused_again_before_its_body_is_read(sandbox, sandbox_server, make_mediator):
    policy = "version: 1\nlimits:\n" + _limit("per-client", ["client"], 5, 1, burst=1)   # one per 200 ms
    client = await make_mediator(channels_yaml(upstream_url(sandbox_server)),
                                 extra_policies={"rate_limits.yaml": policy})
    assert (await client.get("/fhir/Medication/")).status == 200
    first = await client.get("/fhir/Medication/")
    assert first.status == 429 and _decisions(client, "rate_limit", "rate_limit.exceeded") == 1
    # Over the limit: a malformed body would be 400 from the request stage; it is never read.
    again = await client.post("/fhir/Claim/", data=b"{not json", headers={"Content-Type": "application/fhir+json"})
    assert again.status == 429
    assert _decisions(client, "over_limit", "rate_limit.exceeded") == 1
    assert _decisions(client, "request", "request.malformed_json") == 0
    body = await again.json()
    assert body["issue"][0]["details"]["coding"][0]["code"] == "rate_limit.exceeded"
    assert again.headers["Retry-After"] == "1"
    assert again.headers["RateLimit-Policy"] == '"per-client";q=5;w=1'
    assert again.headers["RateLimit"].startswith('"per-client";r=0;t=')
    metrics = client.server.app[METRICS]
    assert metrics.registry.get_sample_value("mediator_rate_limit_rejections_total",
                                             {"limit": "per-client", "channel": "claims"}) == 1
    await asyncio.sleep(0.25)   # the limit admits one again: the memory lets it through to the exact limiter
    later = await client.post("/fhir/Claim/", data=b"{not json", headers={"Content-Type": "application/fhir+json"})
    assert later.status == 400
    assert json.loads(await later.read())["issue"][0]["details"]["coding"][0]["code"] == "request.malformed_json"
    assert len([r for r in sandbox.requests if "Medication" in r["path"]]) == 1
