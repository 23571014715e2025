"""Rate limits: the GCRA arithmetic (pure, table-driven), the policy schema, the Lua script against real
Redis, and round trips over sockets, including two real mediator processes sharing one Redis."""

from __future__ import annotations

import asyncio
import ipaddress
import math
import time
from pathlib import Path

import aiohttp
import pytest

from mediator.app import METRICS
from mediator.config import load_config
from mediator.config.models import RedisConfig
from mediator.config.rate_limits import RateLimit, Reconcile
from mediator.gcra import GcraLimit, LocalGcraStore, decide, gcra, now_us
from mediator.pipeline import Exchange, Principal
from mediator.redis_store import RedisStore
from mediator.stages.rate_limit import ReconciledGcraStore, RedisGcraStore, key_for
from tests.conftest import DEFAULT_IP_POLICY, channels_yaml, config_problems, upstream_url, write_config
from tests.load_helpers import (
    SHARED_REDIS,
    free_port,
    mediator_process,
    private_redis,
    redis_prefix,
    redis_server_section,
)

__all__ = ["redis_prefix"]  # the fixture, re-exported for pytest

S = 1_000_000
NOW = 1_700_000_000 * S
TWENTY_PER_MIN = GcraLimit("per-client", 20, 60, 3 * S, 60 * S, 20)
ONE_PER_S = GcraLimit("one", 1, 1, S, S, 1)


@pytest.mark.parametrize(
    ("tat", "limit", "cost", "allowed", "new_tat", "remaining", "retry_after", "reset"),
    [
        (None, TWENTY_PER_MIN, 1, True, NOW + 3 * S, 19, 0, 3 * S),
        (NOW - 5 * S, TWENTY_PER_MIN, 1, True, NOW + 3 * S, 19, 0, 3 * S),        # a past TAT is no debt
        (NOW + 57 * S, TWENTY_PER_MIN, 1, True, NOW + 60 * S, 0, 0, 60 * S),      # the 20th of a burst
        (NOW + 60 * S, TWENTY_PER_MIN, 1, False, NOW + 60 * S, 0, 3 * S, 60 * S),  # the 21st waits T
        (None, TWENTY_PER_MIN, 5, True, NOW + 15 * S, 15, 0, 15 * S),
        (NOW + 48 * S, TWENTY_PER_MIN, 5, False, NOW + 48 * S, 4, 3 * S, 48 * S),  # 4 left, 5 asked
        (None, ONE_PER_S, 1, True, NOW + S, 0, 0, S),
        (NOW + S, ONE_PER_S, 1, False, NOW + S, 0, S, S),
        (NOW + S // 2, ONE_PER_S, 1, False, NOW + S // 2, 0, S // 2, S // 2),
    ],
)
def test_gcra_arithmetic(tat, limit, cost, allowed, new_tat, remaining, retry_after, reset):
    result = gcra(tat, limit, NOW, cost)
    assert (result.allowed, result.tat, result.remaining, result.retry_after_us, result.reset_us) == \
        (allowed, new_tat, remaining, retry_after, reset)


def test_a_burst_then_one_per_emission_interval():
    store = LocalGcraStore()
    admitted = [store.apply(["k"], [TWENTY_PER_MIN], 1, NOW)[0].allow for _ in range(25)]
    assert admitted == [True] * 20 + [False] * 5
    later = [store.apply(["k"], [TWENTY_PER_MIN], 1, NOW + 3 * S)[0].allow for _ in range(3)]
    assert later == [True, False, False]


def test_a_request_is_charged_to_every_limit_or_to_none():
    exhausted = NOW + 60 * S
    decision, states, _ = decide([None, exhausted], [ONE_PER_S, TWENTY_PER_MIN], NOW)
    assert not decision.allow and decision.reason == "rate_limit.exceeded"
    assert states == [None, exhausted]  # the admitting limit was not charged
    assert decision.headers["Retry-After"] == "3"
    assert decision.message == "rate limit exceeded: per-client"
    decision, states, _ = decide([None, None], [ONE_PER_S, TWENTY_PER_MIN], NOW)
    assert decision.allow and states == [NOW + S, NOW + 3 * S]


def test_headers_follow_the_ietf_structured_field_form():
    decision, _, _ = decide([None, None], [ONE_PER_S, TWENTY_PER_MIN], NOW)
    assert decision.headers == {
        "RateLimit-Policy": '"one";q=1;w=1, "per-client";q=20;w=60',
        "RateLimit": '"one";r=0;t=1, "per-client";r=19;t=3',
    }


def test_a_batch_larger_than_the_burst_is_refused_for_good():
    decision, states, _ = decide([None], [TWENTY_PER_MIN], NOW, cost=21)
    assert decision.reason == "rate_limit.cost_exceeds_burst" and "Retry-After" not in decision.headers
    assert states == [None]


def _exchange(principal, channel_name="claims", facility=None):
    class _Channel:
        name = channel_name
    exchange = Exchange(request=None, request_id="r", client_ip=ipaddress.ip_address("192.0.2.7"),  # type: ignore
                        channel=_Channel(), principal=principal, facility=facility)  # type: ignore[arg-type]
    return exchange


VENDOR = Principal("vendor-a", "mtls", user_id="u1", health_facilities=frozenset({"HF2", "HF1"}))
MACHINE = Principal("vendor-b", "private_key_jwt")
SSO_USER = Principal("vendor-a", "access_token", user_id="u1", vouched_by="iss=https://sso.a.example")
HEADER_USER = Principal("vendor-b", "trusted_header", user_id="u1", vouched_by="client=vendor-b")


@pytest.mark.parametrize(
    ("principal", "per", "facility", "key"),
    [
        (None, ("client",), None, ["ip=192.0.2.7"]),            # no authentication: the address
        (None, ("user", "channel"), None, ["ip=192.0.2.7", "channel=claims"]),
        (None, ("health_facility",), None, ["ip=192.0.2.7"]),
        (VENDOR, ("client",), None, ["client=vendor-a"]),
        (VENDOR, ("user",), None, ["client=vendor-a/user=u1"]),
        (SSO_USER, ("user",), None, ["iss=https%3A%2F%2Fsso.a.example/user=u1"]),
        (HEADER_USER, ("user",), None, ["client=vendor-b/user=u1"]),
        (MACHINE, ("user",), None, ["client=vendor-b"]),        # no user: the client
        (VENDOR, ("health_facility",), None, ["hf=HF1,HF2"]),
        (VENDOR, ("health_facility",), "HF2", ["hf=HF2"]),  # authorization resolved it
        (MACHINE, ("health_facility",), None, ["client=vendor-b"]),
        (VENDOR, ("ip", "client"), None, ["ip=192.0.2.7", "client=vendor-a"]),
    ],
)
def test_counting_keys(principal, per, facility, key):
    assert key_for(per, _exchange(principal, facility=facility)) == key


def test_one_user_id_vouched_for_by_two_parties_is_two_keys():
    """Vendor B's trusted header naming vendor A's user must not count against A's user (issue 13)."""
    keys = {key_for(("user",), _exchange(p))[0] for p in (VENDOR, SSO_USER, HEADER_USER)}
    assert len(keys) == 3
    # A user id cannot forge another namespace with separators of its own.
    forged = Principal("vendor-b", "trusted_header", user_id="u1/user=x", vouched_by="client=vendor-b")
    plain = Principal("vendor-b", "trusted_header", user_id="u1", vouched_by="client=vendor-b/user=x")
    assert key_for(("user",), _exchange(forged)) != key_for(("user",), _exchange(plain))


# --- schema -------------------------------------------------------------------------------------------

GOOD_CHANNELS = channels_yaml("http://127.0.0.1:8000/api/api_fhir_r4/")


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("version: 1\nlimits:\n  - name: a\n    per: [client]\n    rate: 5\n    period_s: 60\n",
         "policies/rate_limits.yaml:3:5: limits[0].on_store_error: Field required"),
        ("version: 1\nlimits:\n  - name: a\n    per: [client, vendor]\n    rate: 5\n    period_s: 60\n"
         "    on_store_error: deny\n",
         "policies/rate_limits.yaml:4:19: limits[0].per[1]: Input should be 'ip', 'client', 'user', "
         "'health_facility' or 'channel'"),
        ("version: 1\nlimits:\n  - name: a\n    per: [client]\n    rate: 5\n    period_s: 60\n"
         "    on_store_error: ignore\n",
         "policies/rate_limits.yaml:7:5: limits[0].on_store_error: Input should be 'deny' or 'local'"),
        ("version: 1\nlimits:\n  - name: a\n    per: [client, client]\n    rate: 5\n    period_s: 60\n"
         "    on_store_error: deny\n",
         "policies/rate_limits.yaml:3:5: limits[0]: per: each key part may appear once"),
        ("version: 1\nlimits:\n  - name: a\n    per: [client]\n    rate: 5\n    period_s: 60\n"
         "    channels: []\n    on_store_error: deny\n",
         "policies/rate_limits.yaml:7:5: limits[0].channels: Tuple should have at least 1 item after "
         "validation, not 0"),
        ("version: 1\nlimits:\n  - name: a\n    per: [client]\n    rate: 5\n    period_s: 60\n"
         "    channels: [claims, billing]\n    on_store_error: deny\n",
         "policies/rate_limits.yaml:7:24: limits[0].channels[1]: unknown channel 'billing' (not in channels.yaml)"),
        ("version: 1\nlimits:\n  - name: a\n    per: [ip]\n    rate: 5\n    period_s: 60\n"
         "    on_store_error: deny\n  - name: a\n    per: [ip]\n    rate: 5\n    period_s: 60\n"
         "    on_store_error: deny\n",
         "policies/rate_limits.yaml:1:1: duplicate limit names: a"),
        ("version: 1\nlimits:\n  - name: a\n    per: [ip]\n    rate: 5000\n    period_s: 1\n"
         "    on_store_error: deny\n",
         "policies/rate_limits.yaml:3:5: limits[0]: rate/period_s finer than 1000 requests per second per key "
         "is not supported"),
    ],
)
def test_policy_errors_name_file_line_and_message(tmp_path, policy, expected):
    root = write_config(tmp_path, GOOD_CHANNELS, DEFAULT_IP_POLICY, {"rate_limits.yaml": policy})
    assert config_problems(root) == [expected]


@pytest.mark.parametrize(
    ("redis_section", "expected"),
    [
        ("redis:\n  url: redis://:secret@127.0.0.1:6379/0\n",
         "channels.yaml:7:5: server.redis.url: url must not contain a password; name an environment "
         "variable in password_env"),
        ("redis:\n  url: http://127.0.0.1:6379/\n",
         "channels.yaml:7:5: server.redis.url: url must be redis://host[:port][/db] or rediss://..."),
        ("redis:\n  url: redis://127.0.0.1:6379/0\n  key_prefix: \"\"\n",
         "channels.yaml:8:5: server.redis.key_prefix: String should have at least 1 character"),
    ],
)
def test_redis_setting_errors(tmp_path, redis_section, expected):
    root = write_config(tmp_path, channels_yaml("http://127.0.0.1:8000/api/api_fhir_r4/", extra_server=redis_section))
    assert config_problems(root) == [expected]


def test_no_policy_file_means_no_rate_limit_stage(tmp_path):
    from mediator.stages import build_stages
    root = write_config(tmp_path, GOOD_CHANNELS)
    assert "rate_limit" not in [s.name for s in build_stages(load_config(root))]


# --- the Lua script against real Redis ----------------------------------------------------------------

STEPS = [  # (seconds after NOW, keys used, cost)
    (0, ("a", "b"), 1), (0, ("a", "b"), 1), (0, ("a",), 1), (0.5, ("a", "b"), 1), (1, ("a", "b"), 1),
    (1, ("b",), 3), (2, ("a", "b"), 1), (2.1, ("a", "b"), 2), (30, ("a", "b"), 25), (30, ("a",), 1),
    (61, ("a", "b"), 1),
]
LIMIT_FOR = {"a": GcraLimit("a", 2, 1, S // 2, S, 2), "b": TWENTY_PER_MIN}


async def test_lua_script_computes_what_the_pure_function_computes(redis_prefix):
    redis = RedisStore(RedisConfig(url=SHARED_REDIS, key_prefix=redis_prefix))
    shared, local = RedisGcraStore(redis), LocalGcraStore()
    try:
        for offset, names, cost in STEPS:
            now = NOW + int(offset * S)
            limits = [LIMIT_FOR[n] for n in names]
            expected = local.apply(list(names), limits, cost, now)
            actual = await shared.apply(list(names), limits, cost, now)
            assert actual == expected, (offset, names, cost)
        # Redis's own clock (what production uses): a fresh key admits.
        decision, _ = await shared.apply(["fresh"], [TWENTY_PER_MIN], 1)
        assert decision.allow
        stored = await redis.client.get(redis.key("rl", "fresh"))
        assert 0 < await redis.client.pttl(redis.key("rl", "fresh")) <= 3001
        assert int(stored) > NOW
    finally:
        await redis.close()


# --- round trips ----------------------------------------------------------------------------------------

def _policy(*limits: str) -> str:
    return "version: 1\nlimits:\n" + "".join(limits)


def _limit(name, per, rate, period_s, on_store_error="deny", channels=None, burst=None) -> str:
    text = f"  - name: {name}\n    per: [{', '.join(per)}]\n    rate: {rate}\n    period_s: {period_s}\n" \
           f"    on_store_error: {on_store_error}\n"
    if channels:
        text += f"    channels: [{', '.join(channels)}]\n"
    if burst:
        text += f"    burst: {burst}\n"
    return text


async def test_over_the_limit_is_429_with_retry_after_and_ratelimit_headers(sandbox, sandbox_server, make_mediator):
    client = await make_mediator(channels_yaml(upstream_url(sandbox_server)),
                                 extra_policies={"rate_limits.yaml": _policy(_limit("per-client", ["client"], 3, 60))})
    remaining = []
    for _ in range(3):
        ok = await client.get("/fhir/Medication/")
        assert ok.status == 200
        remaining.append(ok.headers["RateLimit"])
    assert remaining == ['"per-client";r=2;t=20', '"per-client";r=1;t=40', '"per-client";r=0;t=60']
    refused = await client.get("/fhir/Medication/")
    assert refused.status == 429
    assert refused.headers["Retry-After"] == "20"
    assert refused.headers["RateLimit-Policy"] == '"per-client";q=3;w=60'
    assert refused.headers["RateLimit"] == '"per-client";r=0;t=60'
    outcome = await refused.json()
    assert outcome["issue"][0]["code"] == "throttled"
    assert outcome["issue"][0]["details"]["coding"][0]["code"] == "rate_limit.exceeded"
    assert len([r for r in sandbox.requests if "Medication" in r["path"]]) == 3
    metrics = client.server.app[METRICS]
    assert metrics.registry.get_sample_value("mediator_rate_limit_rejections_total",
                                             {"limit": "per-client", "channel": "master-data"}) == 1


async def test_a_limit_applies_only_to_its_channels(sandbox_server, make_mediator):
    policy = _policy(_limit("claims-only", ["channel"], 1, 60, channels=["claims"]))
    client = await make_mediator(channels_yaml(upstream_url(sandbox_server)),
                                 extra_policies={"rate_limits.yaml": policy})
    assert (await client.get("/fhir/Claim/")).status == 200
    assert (await client.get("/fhir/Claim/")).status == 429
    for _ in range(3):
        master = await client.get("/fhir/Medication/")
        assert master.status == 200 and "RateLimit" not in master.headers


def _shared_config(tmp_path: Path, upstream: str, redis_url: str, prefix: str, policy: str) -> Path:
    return write_config(tmp_path, channels_yaml(upstream, extra_server=redis_server_section(redis_url, prefix)),
                        DEFAULT_IP_POLICY, {"rate_limits.yaml": policy})


async def test_limits_are_exact_across_two_mediator_processes(sandbox, sandbox_server, tmp_path, redis_prefix):
    root = _shared_config(tmp_path, upstream_url(sandbox_server), SHARED_REDIS, redis_prefix,
                          _policy(_limit("per-client", ["client"], 20, 60)))
    ports = [free_port(), free_port()]
    with mediator_process(root, ports[0]), mediator_process(root, ports[1]):
        async with aiohttp.ClientSession() as session:
            async def get(i: int) -> int:
                async with session.get(f"http://127.0.0.1:{ports[i % 2]}/fhir/Medication/") as response:
                    await response.read()
                    return response.status
            statuses = await asyncio.gather(*(get(i) for i in range(50)))
    assert sorted(statuses) == [200] * 20 + [429] * 30
    assert len([r for r in sandbox.requests if "Medication" in r["path"]]) == 20


async def test_redis_dying_applies_each_limits_declared_fail_mode(sandbox_server, tmp_path, aiohttp_client):
    from mediator.app import build_app
    policy = _policy(_limit("strict", ["client"], 100, 60, "deny", ["master-data"]),
                     _limit("lenient", ["client"], 2, 60, "local", ["claims"]))
    with private_redis() as (url, redis_process):
        root = _shared_config(tmp_path, upstream_url(sandbox_server), url, "t:", policy)
        client = await aiohttp_client(build_app(load_config(root)))
        assert (await client.get("/fhir/Medication/")).status == 200
        assert (await client.get("/fhir/Claim/")).status == 200
        redis_process.kill()
        redis_process.wait(timeout=10)
        strict = await client.get("/fhir/Medication/")
        assert strict.status == 503
        assert (await strict.json())["issue"][0]["details"]["coding"][0]["code"] == "rate_limit.store_unavailable"
        # local: counted in this process from now on (2 per minute), never silently unlimited
        assert [(await client.get("/fhir/Claim/")).status for _ in range(3)] == [200, 200, 429]
        metrics = client.server.app[METRICS]
        assert metrics.registry.get_sample_value("mediator_store_errors_total",
                                                 {"feature": "rate_limit", "on_store_error": "deny"}) == 1
        assert metrics.registry.get_sample_value("mediator_store_errors_total",
                                                 {"feature": "rate_limit", "on_store_error": "local"}) == 3


# --- reconciled mode: local decisions, Redis in the background ------------------------------------------

RECONCILE = Reconcile(interval_ms=50, max_stale_s=5)
FIVE_BURST = GcraLimit.from_policy(RateLimit(name="l", per=("client",), rate=20, period_s=1, burst=5,
                                             on_store_error="deny"))


async def test_reconciled_instances_learn_each_others_charges(redis_prefix):
    redis = RedisStore(RedisConfig(url=SHARED_REDIS, key_prefix=redis_prefix))
    errors: list[BaseException] = []
    a, b = (ReconciledGcraStore(redis, RECONCILE, errors.append) for _ in range(2))
    limit = GcraLimit.from_policy(RateLimit(name="l", per=("client",), rate=10, period_s=1, burst=5,
                                            on_store_error="deny"))  # one request per 100 ms
    try:
        started = time.monotonic()
        # Neither has heard of the other yet: each admits a full burst (the bound's burst term).
        assert [a.apply(["k"], [limit], 1)[0].allow for _ in range(6)] == [True] * 5 + [False]
        assert [b.apply(["k"], [limit], 1)[0].allow for _ in range(6)] == [True] * 5 + [False]
        await asyncio.sleep(0.06)  # both report in the background; the first to report did not see the other
        assert not a.apply(["k"], [limit], 1)[0].allow and not b.apply(["k"], [limit], 1)[0].allow
        await a.reconcile()
        await b.reconcile()
        shared = int(await redis.client.get(redis.key("rl", "k")))
        assert shared - now_us() > 8 * limit.emission_us  # 10 charged
        # At +0.3 s each instance's own 5 would admit again (+0.1 s); the shared 10 do not (+0.6 s).
        await asyncio.sleep(max(0.0, 0.3 - (time.monotonic() - started)))
        assert not a.apply(["k"], [limit], 1)[0].allow
        assert not b.apply(["k"], [limit], 1)[0].allow
        assert not errors
    finally:
        await redis.close()


@pytest.mark.parametrize("instances", [2, 3])
async def test_reconciled_over_admission_stays_within_the_declared_bound(redis_prefix, instances):
    redis = RedisStore(RedisConfig(url=SHARED_REDIS, key_prefix=redis_prefix))
    errors: list[BaseException] = []
    stores = [ReconciledGcraStore(redis, RECONCILE, errors.append) for _ in range(instances)]
    admitted = 0
    started = time.monotonic()
    last_sync = [s.last_success for s in stores]
    longest_gap = RECONCILE.interval_ms / 1000  # a starved event loop reconciles later: the bound follows
    try:
        while time.monotonic() - started < 1.5:
            for i, store in enumerate(stores):
                admitted += store.apply(["k"], [FIVE_BURST], 1)[0].allow
                if store.last_success != last_sync[i]:
                    longest_gap = max(longest_gap, store.last_success - last_sync[i])
                    last_sync[i] = store.last_success
            await asyncio.sleep(0.002)
        elapsed = time.monotonic() - started
        exact = FIVE_BURST.burst + math.floor(FIVE_BURST.quota * elapsed / FIVE_BURST.window_s)
        bound = exact + (instances - 1) * (FIVE_BURST.burst + math.ceil(FIVE_BURST.quota * longest_gap) + 1)
        assert admitted <= bound, (admitted, exact, bound, longest_gap)
        # Nor does it starve: at most one interval's worth per instance below what one exact limiter admits.
        assert admitted >= exact - instances * (math.ceil(FIVE_BURST.quota * longest_gap) + 1), (admitted, exact)
        assert not errors
    finally:
        await redis.close()


async def test_reconciled_mode_applies_on_store_error_once_its_view_is_stale(sandbox_server, tmp_path,
                                                                             aiohttp_client):
    from mediator.app import build_app
    policy = _policy(_limit("strict", ["client"], 100, 60, "deny", ["master-data"]),
                     _limit("lenient", ["client"], 100, 60, "local", ["claims"])) \
        + "reconcile:\n  interval_ms: 10\n  max_stale_s: 1\n"
    with private_redis() as (url, redis_process):
        root = _shared_config(tmp_path, upstream_url(sandbox_server), url, "t:", policy)
        client = await aiohttp_client(build_app(load_config(root)))
        assert (await client.get("/fhir/Medication/")).status == 200
        assert (await client.get("/fhir/Claim/")).status == 200
        await asyncio.sleep(0.1)  # reconciled
        redis_process.kill()
        redis_process.wait(timeout=10)
        # Within max_stale_s the decision is still local (no request waits for Redis).
        assert (await client.get("/fhir/Medication/")).status == 200
        await asyncio.sleep(1.3)
        strict = await client.get("/fhir/Medication/")
        assert strict.status == 503
        assert (await strict.json())["issue"][0]["details"]["coding"][0]["code"] == "rate_limit.store_unavailable"
        assert (await client.get("/fhir/Claim/")).status == 200  # local: counted here
        metrics = client.server.app[METRICS]
        assert metrics.registry.get_sample_value("mediator_store_errors_total",
                                                 {"feature": "rate_limit", "on_store_error": "reconcile"}) >= 1
        assert metrics.registry.get_sample_value("mediator_store_errors_total",
                                                 {"feature": "rate_limit", "on_store_error": "deny"}) == 1
