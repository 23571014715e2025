"""The adaptive (gradient) concurrency limit, step by step on an injected clock, and inside the bulkhead."""

from __future__ import annotations

import asyncio
import json

import pytest

from mediator.bulkhead import Bulkhead, Slot, UpstreamGuard, UpstreamRefused
from mediator.concurrency_limit import (
    FLOOR_WINDOWS_BEFORE_PROBE,
    GradientLimit,
    IdleReference,
    StaticLimit,
    WindowedMinimum,
    build_limit,
)
from mediator.config.models import AdaptiveLimitConfig, BulkheadConfig, LatencyProbeConfig
from mediator.metrics import Metrics
from tests.conftest import channels_yaml, config_problems, write_config
from tests.load_helpers import minimum_rtt_measured


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def adaptive(latency_probe: LatencyProbeConfig | None = None, **overrides: object) -> BulkheadConfig:
    params = AdaptiveLimitConfig(window_s=1, percentile=0.9, tolerance=1.25, min_samples=3,
                                 probe_interval_s=60, probe_samples=4, latency_probe=latency_probe)
    return BulkheadConfig(**{"mode": "adaptive", "min_concurrent": 1, "max_concurrent": 8,
                             "adaptive": params, **overrides})  # type: ignore[arg-type]


def window(limit: GradientLimit, clock: Clock, rtt_s: float, count: int = 3, saturated: bool = True) -> None:
    """One sampling window: `count` answers of `rtt_s`, the last one after window_s."""
    for i in range(count):
        if saturated:
            limit.saturated()
        if i == count - 1:
            clock.now += 1.0
        limit.record(rtt_s)


def probe(limit: GradientLimit, rtt_s: float) -> None:
    assert limit.probing and limit.value == limit.measuring
    for _ in range(limit.params.probe_samples):
        limit.record(rtt_s)
    assert not limit.probing


def test_starts_by_measuring_the_unloaded_time_at_the_floor():
    clock = Clock()
    limit = GradientLimit(adaptive(initial_concurrent=4), clock)
    assert limit.probing and limit.current == 1 and limit.min_rtt_s is None
    for rtt in (0.050, 0.040, 0.060, 0.045):
        limit.record(rtt)
    assert not limit.probing and limit.current == 4
    assert limit.min_rtt_s == 0.060  # p90 of the probe by nearest rank: the highest of four


def test_grows_by_one_per_window_while_answers_stay_near_the_unloaded_time():
    clock = Clock()
    limit = GradientLimit(adaptive(), clock)
    probe(limit, 0.050)
    seen = []
    for _ in range(4):
        window(limit, clock, 0.055)  # within tolerance 1.25 × 50 ms
        seen.append(limit.current)
    assert seen == [2, 3, 4, 5]


def test_does_not_grow_when_the_limit_was_not_used():
    clock = Clock()
    limit = GradientLimit(adaptive(initial_concurrent=3), clock)
    probe(limit, 0.050)
    window(limit, clock, 0.050, saturated=False)
    assert limit.current == 3


def test_shrinks_in_proportion_to_the_queue_and_never_below_half_or_the_floor():
    clock = Clock()
    limit = GradientLimit(adaptive(initial_concurrent=8), clock)
    probe(limit, 0.100)
    window(limit, clock, 0.156)  # gradient 1.25 × 100 / 156 = 0.8 → 6.4
    assert limit.current == 6
    window(limit, clock, 10.0)  # far beyond: at most halved
    assert limit.current == 3
    for _ in range(3):
        window(limit, clock, 10.0)
    assert limit.current == 1  # the floor


def test_the_ceiling_holds():
    clock = Clock()
    limit = GradientLimit(adaptive(max_concurrent=3, initial_concurrent=3), clock)
    probe(limit, 0.050)
    for _ in range(5):
        window(limit, clock, 0.050)
    assert limit.current == 3


def test_a_window_waits_for_enough_answers():
    clock = Clock()
    limit = GradientLimit(adaptive(initial_concurrent=4), clock)
    probe(limit, 0.100)
    clock.now += 5
    limit.record(1.0)
    limit.record(1.0)  # two answers, min_samples is 3: no verdict yet, however long it took
    assert limit.current == 4
    limit.record(1.0)
    assert limit.current == 2


def test_measures_again_after_the_probe_interval_and_takes_the_new_unloaded_time():
    clock = Clock()
    limit = GradientLimit(adaptive(initial_concurrent=2), clock)
    probe(limit, 0.050)
    clock.now += 61
    window(limit, clock, 0.055)
    assert limit.probing and limit.current == 1
    probe(limit, 0.200)  # openIMIS got slower for good: the baseline follows
    assert limit.min_rtt_s == 0.200 and limit.probes == 2
    window(limit, clock, 0.210)
    assert limit.current == 4  # 3 before the probe (grew in the window that started it), now 4


def test_measures_again_after_windows_in_a_row_at_the_floor():
    clock = Clock()
    limit = GradientLimit(adaptive(initial_concurrent=1), clock)
    probe(limit, 0.010)
    for _ in range(FLOOR_WINDOWS_BEFORE_PROBE):
        assert not limit.probing
        window(limit, clock, 0.100)
    assert limit.probing


def test_static_mode_is_max_concurrent():
    static = build_limit(BulkheadConfig(max_concurrent=7))
    assert isinstance(static, StaticLimit) and static.current == 7
    static.record(99.0)
    assert static.current == 7 and static.min_rtt_s is None


@pytest.mark.parametrize("bulkhead, problem", [
    ({"mode": "adaptive", "min_concurrent": 5, "max_concurrent": 4}, "min_concurrent must not exceed"),
    ({"mode": "adaptive", "initial_concurrent": 20, "max_concurrent": 4}, "initial_concurrent must lie"),
    ({"mode": "gradient"}, "mode"),
    ({"scope": "region"}, "scope"),
    ({"adaptive": {"tolerance": 0.5}}, "tolerance"),
    ({"cluster": {"on_store_error": "ignore"}}, "on_store_error"),
    ({"adaptive": {"window": 1}}, "window"),
])
def test_schema_refuses(tmp_path, bulkhead, problem):
    assert any(problem in line and "channels.yaml:" in line for line in _problems(tmp_path, bulkhead))


def test_cluster_scope_needs_redis(tmp_path):
    assert any("scope cluster needs server.redis" in line for line in _problems(tmp_path, {"scope": "cluster"}))


def _problems(root, bulkhead: dict[str, object]) -> list[str]:
    channels = channels_yaml("http://127.0.0.1:9/api/api_fhir_r4/").replace(
        "    connect_timeout_s: 1\n", f"    connect_timeout_s: 1\n    bulkhead: {json.dumps(bulkhead)}\n")
    write_config(root, channels)
    return config_problems(root)


async def test_the_bulkhead_follows_the_limit_down_and_up():
    clock = Clock()
    metrics = Metrics()
    bulkhead = Bulkhead("openimis", adaptive(initial_concurrent=3, max_queue=10), metrics, clock=clock)
    limit = bulkhead.limit
    assert isinstance(limit, GradientLimit)
    for _ in range(4):
        bulkhead.record(0.050)  # the probe
    assert limit.current == 3
    slots = [await bulkhead.acquire(50) for _ in range(3)]
    waiters = [asyncio.create_task(bulkhead.acquire(50)) for _ in range(2)]
    await asyncio.sleep(0)
    assert bulkhead.queued == 2
    for _ in range(2):
        bulkhead.record(0.500)
    clock.now += 1
    bulkhead.record(0.500)  # a slow window: 3 × max(0.5, 1.25 × 50/500) = 1.5
    assert limit.current == 1
    await bulkhead.release(slots.pop())
    await bulkhead.release(slots.pop())
    await asyncio.sleep(0)
    assert bulkhead.in_flight == 1 and bulkhead.queued == 2  # above the new limit: nobody let in
    for _ in range(2):
        bulkhead.record(0.050)
    clock.now += 1
    bulkhead.record(0.050)  # fast again, and the limit was used: 2
    await asyncio.sleep(0)
    assert limit.current == 2 and bulkhead.in_flight == 2 and bulkhead.queued == 1
    assert metrics.registry.get_sample_value("mediator_concurrency_limit", {"upstream": "openimis"}) == 2.5
    assert metrics.registry.get_sample_value("mediator_upstream_min_rtt_seconds", {"upstream": "openimis"}) == 0.05
    await bulkhead.release(slots.pop())
    await asyncio.sleep(0)
    assert bulkhead.queued == 0
    for task in waiters:
        await bulkhead.release(await task)
    assert bulkhead.in_flight == 0 and isinstance(Slot(), Slot)


async def test_below_one_the_limit_is_a_duty_cycle():
    bulkhead = Bulkhead("openimis", adaptive(min_concurrent=0.5, initial_concurrent=0.5))
    minimum_rtt_measured(bulkhead, 0.1)
    assert bulkhead.limit.value == 0.5 and bulkhead.limit.current == 1
    first = await bulkhead.acquire(50)
    second = asyncio.create_task(bulkhead.acquire(50))
    await asyncio.sleep(0)
    await bulkhead.release(first, busy_s=0.3)  # busy 0.3 s at 0.5: the next starts 0.3 s later
    await asyncio.sleep(0.15)
    assert not second.done() and bulkhead.in_flight == 0
    slot = await asyncio.wait_for(second, 1)
    assert bulkhead.in_flight == 1
    await bulkhead.release(slot, busy_s=0.3)
    await bulkhead.close()
    with pytest.raises(UpstreamRefused):  # paced, and no queue: refused at once, never let in early
        await _paced_without_queue()


async def _paced_without_queue() -> None:
    bulkhead = Bulkhead("openimis", adaptive(min_concurrent=0.5, max_queue=0))
    minimum_rtt_measured(bulkhead, 0.1)
    await bulkhead.release(await bulkhead.acquire(50), busy_s=5)
    try:
        await bulkhead.acquire(50)
    finally:
        await bulkhead.close()


async def test_the_slot_api_for_other_senders_shares_the_limit_and_feeds_it():
    guard = UpstreamGuard.build("openimis", BulkheadConfig(max_concurrent=1, max_queue=0), None)
    async with guard.slot(50):
        assert guard.bulkhead.in_flight == 1
        with pytest.raises(UpstreamRefused) as refused:  # the request path finds the slot taken
            await guard.call(50, lambda: asyncio.sleep(0))  # type: ignore[arg-type, return-value]
        assert refused.value.reason == "upstream.overloaded"
    assert guard.bulkhead.in_flight == 0
    adaptive_guard = UpstreamGuard.build("openimis", adaptive(), None)
    for _ in range(4):
        async with adaptive_guard.slot(10):
            await asyncio.sleep(0.001)
    assert isinstance(adaptive_guard.bulkhead.limit, GradientLimit)
    assert adaptive_guard.bulkhead.limit.min_rtt_s is not None  # the probe was fed by the slots


def test_each_kind_of_request_is_compared_with_its_own_unloaded_time():
    clock = Clock()
    limit = GradientLimit(adaptive(initial_concurrent=2), clock)
    for _ in range(4):
        limit.record(0.050, "eligibility:search-type")
    assert limit.baselines == {"eligibility:search-type": 0.050}
    for i in range(3):  # a flood of claims begins: a kind no probe measured gives no verdict ...
        limit.saturated()
        if i == 2:
            clock.now += 1
        limit.record(0.400, "claims:create")
    assert limit.probing and limit.current == 1  # ... but calls for a probe, instead of a cut
    for _ in range(4):
        limit.record(0.200, "claims:create")
    assert limit.baselines["claims:create"] == 0.200 and limit.value == 2
    for i, (rtt, kind) in enumerate([(0.055, "eligibility:search-type"), (0.210, "claims:create"),
                                     (0.230, "claims:create")]):
        limit.saturated()
        if i == 2:
            clock.now += 1
        limit.record(rtt, kind)
    assert limit.value == 3  # 1.1, 1.05 and 1.15 times their own unloaded times: no queue, grows
    window(limit, clock, 0.400)  # 400 ms Patient searches (kind "") are unknown: another probe
    assert limit.probing


def test_the_minimum_rtt_metric_is_absent_until_measured():
    metrics = Metrics()
    bulkhead = Bulkhead("openimis", adaptive(), metrics)
    labels = {"upstream": "openimis"}
    assert metrics.registry.get_sample_value("mediator_upstream_min_rtt_seconds", labels) is None
    assert metrics.registry.get_sample_value("mediator_concurrency_limit", labels) == 1
    for _ in range(4):
        bulkhead.record(0.040)
    assert metrics.registry.get_sample_value("mediator_upstream_min_rtt_seconds", labels) == 0.040


async def test_load_protection_offers_the_same_slots_by_upstream_name(tmp_path):
    from mediator.load_protection import LoadProtection
    from mediator.redis_store import RedisStore
    channels = channels_yaml("http://127.0.0.1:9/api/api_fhir_r4/").replace(
        "    connect_timeout_s: 1\n", "    connect_timeout_s: 1\n    bulkhead: {max_concurrent: 1, max_queue: 0}\n")
    write_config(tmp_path, channels)
    from mediator.config import load_config
    protection = LoadProtection(load_config(tmp_path), RedisStore(None))
    async with protection.slot("openimis", 50, "claims:create"):
        with pytest.raises(UpstreamRefused):
            await protection.call_upstream("openimis", 50, lambda: asyncio.sleep(0))  # type: ignore[arg-type]
    assert protection.guards["openimis"].bulkhead.in_flight == 0


PROBED = LatencyProbeConfig(tolerance=1.5, percentile=0.5, baseline_window_s=30)


def probed_window(limit: GradientLimit, clock: Clock, probe_s: float, api_s: float | None = None,
                  probes: int = 2) -> None:
    """One window of `probes` latency-probe answers of `probe_s` (the last after window_s), and, with
    `api_s`, enough API answers of that time before them."""
    if api_s is not None:
        for _ in range(limit.params.min_samples - 1):
            limit.saturated()
            limit.record(api_s)
    for i in range(probes):
        limit.saturated()
        if i == probes - 1:
            clock.now += 1.0
        limit.record_latency_probe(probe_s)


def test_slow_probes_lower_the_limit_though_the_api_answers_look_unloaded():
    clock = Clock()
    limit = GradientLimit(adaptive(PROBED, initial_concurrent=4), clock)
    probe(limit, 0.200)  # claims: 200 ms unloaded
    limit.record_latency_probe(0.050)  # the probe's baseline: its fastest answer, 50 ms
    probed_window(limit, clock, 0.050, api_s=0.210)
    assert limit.current == 5  # both signals unloaded: grows
    probed_window(limit, clock, 0.150, api_s=0.210)  # the claims look fine, the probe is 3 × slower
    assert limit.value == pytest.approx(2.5)  # 5 × max(0.5, 1.5 / 3)
    assert limit.probe_verdicts == 2 and limit.latency_baseline_s == 0.050


def test_the_probe_judges_windows_without_api_answers_and_leads_below_one():
    clock = Clock()
    limit = GradientLimit(adaptive(PROBED, min_concurrent=0.2, initial_concurrent=1), clock)
    for _ in range(limit.params.probe_samples):
        limit.record(0.300)  # the minimum RTT, measured one request at a time
    assert not limit.probing and limit.value == 1
    limit.record_latency_probe(0.050)
    values = []
    for _ in range(3):  # slow claims at a duty cycle answer too rarely for min_samples; the probe decides
        probed_window(limit, clock, 0.200)
        values.append(limit.value)
    assert values == [0.5, 0.25, 0.2]  # halved per window, never below the floor
    probed_window(limit, clock, 0.060)  # openIMIS is quick again and the limit was used: doubles below 1
    assert limit.value == 0.4


def test_the_minimum_rtt_is_measured_one_request_at_a_time_below_a_floor_of_one() -> None:
    """A duty cycle's pauses change nothing in an answer's own time: the measurement runs at 1, not at a
    fractional floor (which made it last 1/floor times longer); a floor of 1 or more is used as it is."""
    clock = Clock()
    fractional = GradientLimit(adaptive(min_concurrent=0.1, initial_concurrent=1, max_concurrent=4), clock)
    assert fractional.probing and fractional.value == 1.0 and fractional.current == 1
    for _ in range(fractional.params.probe_samples):
        fractional.record(0.150)
    assert not fractional.probing and fractional.min_rtt_s == 0.150
    values = []
    while not fractional.probing and len(values) < 20:
        window(fractional, clock, 0.600)  # 4 x the unloaded time: halved every window, down to the floor
        values.append(fractional.value)
    assert values[:4] == [0.5, 0.25, 0.125, 0.1]
    assert fractional.probing and fractional.value == 1.0  # at the floor for long: measured again, at 1
    whole = GradientLimit(adaptive(min_concurrent=2, initial_concurrent=4), clock)
    assert whole.probing and whole.value == 2.0


def test_probes_alone_do_not_close_a_window_early():
    clock = Clock()
    limit = GradientLimit(adaptive(PROBED, initial_concurrent=4), clock)
    probe(limit, 0.100)
    limit.record_latency_probe(0.050)
    limit.record_latency_probe(0.500)  # within window_s of the measurement's end: no verdict yet
    assert limit.value == 4 and limit.probe_verdicts == 0
    clock.now += 1
    limit.record_latency_probe(0.500)
    assert limit.value == 2 and limit.probe_verdicts == 1


def test_while_the_minimum_rtt_is_measured_the_probe_still_judges_and_slows_the_measurement_down():
    """The measurement holds one request in flight all the time (one after the other, to be quick). When
    the web users' probe finds openIMIS slow meanwhile, the limit comes down as in any window and the
    measurement goes on at the limit's duty cycle, keeping the samples it has."""
    clock = Clock()
    limit = GradientLimit(adaptive(PROBED, min_concurrent=0.1, initial_concurrent=1, max_concurrent=4), clock)
    assert limit.probing and limit.value == 1.0
    limit.record(0.300)
    limit.record_latency_probe(0.050)
    clock.now += 1.0
    limit.record_latency_probe(0.050)  # a window while measuring, the probe at its baseline: no objection
    assert limit.probing and limit.value == 1.0 and limit.probe_verdicts == 1
    for _ in range(2):
        limit.record_latency_probe(0.200)  # 4 × its baseline: openIMIS is slow for its web users
        clock.now += 1.0
        limit.record_latency_probe(0.200)
    assert limit.probing and limit.probe_verdicts == 3
    assert limit.value == pytest.approx(0.25)  # halved twice, and the measurement at that duty cycle
    for _ in range(limit.params.probe_samples - 1):
        limit.record(0.300)
    assert not limit.probing and limit.min_rtt_s == 0.300  # the samples from before the objection count
    assert limit.value == pytest.approx(0.25)


def test_a_measurement_that_starts_while_the_probe_objects_runs_at_the_limit_from_its_start():
    clock = Clock()
    limit = GradientLimit(adaptive(PROBED, min_concurrent=0.1, initial_concurrent=1, max_concurrent=4), clock)
    probe(limit, 0.300)
    values = []
    while not limit.probing:  # until probe_interval_s calls for measuring again
        limit.record_latency_probe(0.050)  # one fast answer a window keeps the baseline where it was
        probed_window(limit, clock, 0.200)  # the window's median probe 4 × its baseline
        values.append(limit.value)
        assert len(values) < 100
    assert values[:4] == [0.5, 0.25, 0.125, 0.1]
    assert limit.value == 0.1  # the measurement runs at the floor the probe holds
    probed_window(limit, clock, 0.050)  # openIMIS is quick again: the measurement speeds up to one at a time
    assert limit.probing and limit.value == 1.0


def test_the_probe_baseline_is_the_fastest_answer_of_its_window_and_follows_a_lasting_change():
    minimum = WindowedMinimum(30)
    assert minimum.value is None
    for t, rtt in [(0, 0.050), (10, 0.080), (20, 0.060)]:
        minimum.add(t, rtt)
    assert minimum.value == 0.050
    minimum.add(35, 0.090)  # the 50 ms answer is older than 30 s now
    assert minimum.value == 0.060
    minimum.add(55, 0.090)
    assert minimum.value == 0.090  # slower for good: followed after baseline_window_s
    assert StaticLimit(3).latency_baseline_s is None


async def test_the_bulkhead_lets_waiters_in_when_the_probe_raises_the_limit():
    clock = Clock()
    metrics = Metrics()
    bulkhead = Bulkhead("openimis", adaptive(PROBED, initial_concurrent=1, max_queue=10), metrics, clock=clock)
    limit = bulkhead.limit
    assert isinstance(limit, GradientLimit)
    for _ in range(4):
        bulkhead.record(0.050)
    held = await bulkhead.acquire(50)
    waiting = asyncio.create_task(bulkhead.acquire(50))
    await asyncio.sleep(0)
    assert bulkhead.queued == 1
    bulkhead.record_latency_probe(0.040)
    clock.now += 1
    bulkhead.record_latency_probe(0.040)
    await asyncio.sleep(0)
    assert limit.current == 2 and waiting.done() and bulkhead.in_flight == 2
    assert metrics.registry.get_sample_value("mediator_concurrency_limit", {"upstream": "openimis"}) == 2
    await bulkhead.release(held)
    await bulkhead.release(await waiting)
    await bulkhead.close()


def test_a_latency_probe_needs_the_adaptive_mode(tmp_path):
    problems = _problems(tmp_path, {"mode": "static", "adaptive": {"latency_probe": {}}})
    assert any("latency_probe needs mode: adaptive" in p for p in problems)
    channels = channels_yaml("http://127.0.0.1:9/api/api_fhir_r4/").replace(
        "    connect_timeout_s: 1\n", "    connect_timeout_s: 1\n    bulkhead: {mode: adaptive, adaptive: "
        "{latency_probe: {path: Location, query: _count=1, interval_s: 2}}}\n")
    from mediator.config import load_config
    probe = load_config(write_config(tmp_path / "ok", channels)).channels.upstreams["openimis"].bulkhead.adaptive
    assert probe.latency_probe is not None and probe.latency_probe.path == "Location"
    assert probe.latency_probe.interval_s == 2 and probe.latency_probe.tolerance == 1.5


@pytest.mark.parametrize("probe", [{"path": "http://elsewhere/Patient"}, {"path": "../admin"},
                                   {"query": "a=b#c"}, {"interval_s": 0}, {"tolerance": 0.9}])
def test_the_latency_probe_schema_refuses(tmp_path, probe):
    assert _problems(tmp_path, {"mode": "adaptive", "adaptive": {"latency_probe": probe}}) != []


def test_a_floor_the_probe_holds_does_not_call_for_measuring_the_minimum_rtt_again():
    clock = Clock()
    limit = GradientLimit(adaptive(PROBED, initial_concurrent=1), clock)
    probe(limit, 0.100)
    limit.record_latency_probe(0.050)
    for _ in range(FLOOR_WINDOWS_BEFORE_PROBE + 2):
        probed_window(limit, clock, 0.200, api_s=0.100)  # claims unloaded, the probe 4 × its baseline
    assert limit.current == 1 and not limit.probing


SPREAD_MS = (43, 55, 60, 70, 90)
"""A probe's answers with nothing in flight, as on the benchmark box of runs 18–25 (43–90 ms)."""
def test_below_one_only_a_probe_that_met_api_load_lets_the_limit_grow_back():
    """At a duty cycle most probes fall into its pauses, with nothing of ours at openIMIS: their quick
    answers say nothing of what the API load does, and used to double the limit back within a few windows
    of every objection. A window grows only when one of its probes was out while an API request was."""
    clock = Clock()
    limit = GradientLimit(adaptive(PROBED, min_concurrent=0.1, initial_concurrent=1), clock)
    for _ in range(limit.params.probe_samples):
        limit.record(0.300)
    limit.record_latency_probe(0.050)
    probed_window(limit, clock, 0.200)  # the probe objects: halved
    assert limit.value == 0.5
    for _ in range(5):  # the whole limit used, every probe quick but in a pause: no evidence, no growth
        limit.saturated()
        limit.record_latency_probe(0.050, idle=True)
        clock.now += 1.0
        limit.record_latency_probe(0.050, idle=True)
    assert limit.value == 0.5
    limit.saturated()
    limit.record_latency_probe(0.050, idle=True)
    clock.now += 1.0
    limit.record_latency_probe(0.060, idle=False)  # one probe met a claim at openIMIS and was quick
    assert limit.value == 1.0
    for _ in range(3):  # idle probes still object when openIMIS is slow for other reasons (a report)
        limit.record_latency_probe(0.200, idle=True)
        clock.now += 1.0
        limit.record_latency_probe(0.200, idle=True)
    assert limit.value == pytest.approx(0.125)


P90 = LatencyProbeConfig(tolerance=1.5, percentile=0.9, baseline_window_s=120)


def _after_idle_probes(idle_ms: tuple[int, ...], idle: bool = True) -> tuple[GradientLimit, Clock]:
    """A limit whose minimum RTT is measured, after 100 s of probes every 0.5 s cycling through `idle_ms`
    with nothing in flight (`idle` as the probe reports it), set back to 1 (whatever its first 30 s did
    by the old rule, until idle answers have settled)."""
    clock = Clock()
    limit = GradientLimit(adaptive(P90, min_concurrent=0.1, initial_concurrent=1, max_concurrent=1), clock)
    for _ in range(limit.params.probe_samples):
        limit.record(0.300)
    for i in range(200):
        clock.now += 0.5
        limit.record_latency_probe(idle_ms[i % len(idle_ms)] / 1000, idle=idle)
    limit.limit = 1.0
    return limit, clock


def _idle_then_windows(idle: bool, window_ms: tuple[int, int], windows: int = 8) -> GradientLimit:
    """The spread's idle probes, then `windows` windows of two probes each of `window_ms` answered while
    an API request was with openIMIS."""
    limit, clock = _after_idle_probes(SPREAD_MS, idle)
    for _ in range(windows):
        for ms in window_ms:
            clock.now += 0.5
            limit.record_latency_probe(ms / 1000, idle=False)
    return limit


def test_the_probe_is_judged_against_its_idle_answers_not_its_fastest():
    # The probe's own spread against its fastest answer (43 ms): "the slower of two over 1.5 x" objects
    # whenever it is at the slow end, with nothing in flight too, and walks the limit to its floor ...
    fastest = _idle_then_windows(idle=False, window_ms=(60, 90))
    assert fastest.latency_baseline_s == 0.043 and fastest.value == pytest.approx(0.1)
    # ... whereas against the answers with nothing in flight (their p90: 90 ms), windows as slow as that
    # leave the limit alone.
    reference = _idle_then_windows(idle=True, window_ms=(60, 90))
    assert reference.latency_baseline_s == 0.090 and reference.value == 1.0
    # Twice the idle p90 while API requests are in flight (a queue, or CPU they take) objects.
    loaded = _idle_then_windows(idle=True, window_ms=(120, 180), windows=1)
    assert loaded.value == pytest.approx(1.5 / 2)


def test_a_sudden_slowdown_is_judged_against_the_idle_answers_from_before_it():
    """openIMIS ten times slower with nothing of ours in flight (a report): the reference counts answers
    only once they are 30 s old, so the slow ones are judged against the fast ones for that long and the
    limit goes to its floor; then the reference has followed and the verdicts stop."""
    limit, clock = _after_idle_probes((50,))
    for _ in range(20):   # 10 s of a slow openIMIS
        clock.now += 0.5
        limit.record_latency_probe(0.500, idle=True)
    assert limit.latency_baseline_s == 0.050 and limit.value == pytest.approx(0.1)
    for _ in range(120):   # a minute more: the slow answers have settled into the reference's p90
        clock.now += 0.5
        limit.record_latency_probe(0.500, idle=True)
    assert limit.latency_baseline_s == 0.500


def test_the_idle_reference_outlasts_a_long_flood():
    """A flood that keeps a request in flight leaves no idle answers: the reference keeps the most recent
    ones past baseline_window_s, so the probe keeps judging; answers count once lag_s old."""
    reference = IdleReference(span_s=120, lag_s=30, keep=20)
    for i in range(50):
        reference.add(float(i), 0.050 + i / 1000)
    assert len(reference.settled(50.0)) == 21   # 0..20 s are at least 30 s old at 50 s
    reference.add(10_000.0, 0.200)   # much later: one new idle answer, not settled yet
    assert len(reference) == 20 and min(reference.settled(10_000.0)) == pytest.approx(0.081)
