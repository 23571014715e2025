"""Queued submission (mediator/async_claims) below the HTTP layer: the Prefer parser, who may read a status
URL, the backoff, the configuration rules, the Redis queue operations (real Redis, own key prefix) and
the drain's fairness between vendors (against a recording openIMIS stand-in on a real socket: fairness is
the mediator's behaviour, not openIMIS's; delivery to the real openIMIS is tested in tests/e2e)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest
from aiohttp import web
from joserfc.jwk import ECKey
from multidict import CIMultiDict

import tests.e2e.conftest  # noqa: F401  (before the e2e kits, which import it: as pytest loads them)
from mediator.async_claims.delivery import backoff_s, code_of
from mediator.async_claims.drain import DrainChannel, Drainer
from mediator.async_claims.metrics import async_metrics
from mediator.async_claims.service import prefers_async, upstream_slot
from mediator.async_claims.status import may_see
from mediator.async_claims.store import GROUP, Job, QueuedEntry, QueueStore, Result, StreamRef
from mediator.config import load_config
from mediator.config.models import AsyncSubmissionConfig, ChannelConfig, RedisConfig
from mediator.load_protection import LoadProtection
from mediator.metrics import Metrics
from mediator.pipeline import Principal
from mediator.redis_store import RedisStore
from mediator.upstream import OpenImisUpstream
from tests.conftest import DEFAULT_IP_POLICY, channels_yaml, config_problems, write_config
from tests.e2e.async_kit import CHANNELS, POLICIES
from tests.e2e.vendors import Vendor, _reason

CLAIMS = """\
- name: claims
  path: ^/fhir/Claim/?$
  methods: [POST]
  upstream: openimis
  ip_allowlist: [local]
  async_submission: {mode: always}
"""


def test_prefer_respond_async_is_found_among_other_preferences():
    assert prefers_async(CIMultiDict(Prefer="respond-async"))
    assert prefers_async(CIMultiDict(Prefer="return=representation, Respond-Async"))
    assert prefers_async(CIMultiDict([("Prefer", "return=minimal"), ("Prefer", "respond-async; wait=10")]))
    assert not prefers_async(CIMultiDict(Prefer="return=representation"))
    assert not prefers_async(CIMultiDict(Prefer="respond-asynchronously"))
    assert not prefers_async(CIMultiDict())


def _job(client: str, facilities: frozenset[str]) -> Job:
    return Job("0" * 32, "claims", client, facilities, "single", "queued", 1, 0, time.time())


def test_only_the_submitting_client_and_its_facilitys_users_may_see_a_submission():
    job = _job("vendor-a", frozenset({"JMHOS001"}))
    assert may_see(Principal("vendor-a", "access_token", health_facilities=frozenset({"JMHOS001"})), job)
    assert may_see(Principal("vendor-a", "access_token", health_facilities=frozenset({"JMHOS001", "X"})), job)
    assert not may_see(Principal("vendor-b", "access_token", health_facilities=frozenset({"JMHOS001"})), job)
    assert not may_see(Principal("vendor-a", "access_token", health_facilities=frozenset({"RAHOS001"})), job)
    assert not may_see(Principal("vendor-a", "access_token"), job)
    assert not may_see(None, job)
    facility_less = _job("vendor-a", frozenset())
    assert may_see(Principal("vendor-a", "mtls"), facility_less)
    assert not may_see(Principal("vendor-a", "mtls", health_facilities=frozenset({"JMHOS001"})), facility_less)


def test_backoff_grows_to_its_ceiling_with_full_jitter():
    assert backoff_s(0, 1, 30, lambda: 1.0) == 1
    assert backoff_s(3, 1, 30, lambda: 1.0) == 8
    assert backoff_s(10, 1, 30, lambda: 1.0) == 30
    assert backoff_s(10, 1, 30, lambda: 0.5) == 15
    assert backoff_s(5, 1, 30, lambda: 0.0) == 0.1  # never zero: retries cannot spin


def test_the_claim_code_is_the_first_identifier_value():
    assert code_of({"identifier": [{"value": ""}, {"system": "x", "value": "C1"}]}) == "C1"
    assert code_of({}) == ""


def test_async_submission_needs_redis_and_authentication(tmp_path):
    root = write_config(tmp_path / "a", channels_yaml("http://127.0.0.1:1/api/", channels=CLAIMS))
    assert any("async_submission needs server.redis" in p for p in config_problems(root))
    with_redis = channels_yaml("http://127.0.0.1:1/api/", channels=CLAIMS.replace("ip_allowlist: [local]\n",
                               "ip_allowlist: [local]\n  authentication: none\n"),
                               extra_server="redis: {url: \"redis://127.0.0.1:6379/0\"}\n")
    root = write_config(tmp_path / "b", with_redis)
    problems = config_problems(root)
    assert any("async_submission needs authentication: required" in p for p in problems)
    assert all(p.startswith("channels.yaml:") for p in problems)


def test_unknown_async_settings_are_refused_with_their_position(tmp_path):
    text = channels_yaml("http://127.0.0.1:1/api/", channels=CLAIMS.replace("{mode: always}", "{mode: sometimes}"),
                         extra_server="redis: {url: \"redis://127.0.0.1:6379/0\"}\n")
    problems = config_problems(write_config(tmp_path, text))
    assert problems and problems[0].startswith("channels.yaml:") and "mode" in problems[0]


def _entry(job_id: str, index: int = 0, code: str = "C") -> QueuedEntry:
    body = json.dumps({"resourceType": "Claim", "identifier": [{"value": code}]}).encode()
    return QueuedEntry(job_id, index, "Claim", body, code, time.time(), "rid", "127.0.0.1")


@pytest.fixture
async def store():
    prefix = f"test-async-{uuid.uuid4().hex[:8]}:"
    redis = RedisStore(RedisConfig(url="redis://127.0.0.1:6379/0", key_prefix=prefix, timeout_s=2))
    yield QueueStore(redis)
    keys = [k async for k in redis.client.scan_iter(f"{prefix}*")]
    if keys:
        await redis.client.delete(*keys)
    await redis.close()


async def test_enqueue_stores_the_job_and_its_entries_together(store):
    await store.enqueue("a" * 32, channel="claims", client="vendor-a", facilities=frozenset({"HF1"}), kind="batch",
                        entries=[_entry("a" * 32, 0), _entry("a" * 32, 2)],
                        presettled={1: Result(403, "{}", "authorization.x")}, total=3, request_id="r")
    job = await store.job("a" * 32)
    assert job is not None and (job.state, job.total, job.settled, job.kind) == ("queued", 3, 1, "batch")
    assert job.facilities == frozenset({"HF1"}) and job.results[1].status == 403
    (ref,) = await store.streams()
    assert (ref.channel, ref.client) == ("claims", "vendor-a")
    read = await store.read_new("c1", [ref])
    assert [(e.job_id, e.index) for _, _, e in read] == [("a" * 32, 0)]  # one per stream per round
    assert await store.depth(ref) == (2, pytest.approx(time.time(), abs=5))


async def test_settling_is_recorded_once_and_finishes_the_job(store):
    job_id = "b" * 32
    await store.enqueue(job_id, channel="claims", client="v", facilities=frozenset(), kind="single",
                        entries=[_entry(job_id)], presettled={}, total=1, request_id="r")
    (ref,) = await store.streams()
    ((_, entry_id, entry),) = await store.read_new("c1", [ref])
    assert await store.mark_sending(job_id, 0)
    job = await store.job(job_id)
    assert job is not None and job.state == "in_progress" and job.attempts == {0: 1} and 0 in job.sent_at
    assert await store.settle(ref, entry_id, entry, Result(201, "{}", "async.delivered"), 60)
    # The same entry settled again (a reclaim raced the first instance's acknowledgement): nothing changes.
    assert not await store.settle(ref, entry_id, entry, Result(500, "{}", "async.refused"), 60)
    job = await store.job(job_id)
    assert job is not None and job.state == "done" and job.settled == 1 and job.results[0].status == 201
    assert 0 < await store.redis.client.pttl(store.job_key(job_id)) <= 60_000
    assert await store.depth(ref) == (0, None)


async def test_a_dead_consumers_entries_are_reclaimed_after_their_idle_time(store):
    job_id = "c" * 32
    await store.enqueue(job_id, channel="claims", client="v", facilities=frozenset(), kind="single",
                        entries=[_entry(job_id)], presettled={}, total=1, request_id="r")
    (ref,) = await store.streams()
    assert len(await store.read_new("dead", [ref])) == 1
    assert await store.reclaim("alive", ref, 0.3, 10) == []  # not idle long enough yet
    await store.heartbeat("dead", {ref.key: []})
    await asyncio.sleep(0.4)
    (got,) = await store.reclaim("alive", ref, 0.3, 10)
    assert got[2].job_id == job_id
    pending = await store.redis.client.xpending_range(ref.key, GROUP, "-", "+", 10)
    assert [p["consumer"] for p in pending] == [b"alive"]


class RecordingOpenImis:
    """Stand-in that records the claim codes in arrival order and answers 201."""

    def __init__(self) -> None:
        self.codes: list[str] = []

    async def login(self, request: web.Request) -> web.Response:
        return web.json_response({"token": "t", "exp": int(time.time()) + 3600})

    async def claim(self, request: web.Request) -> web.Response:
        self.codes.append((await request.json())["identifier"][0]["value"])
        await asyncio.sleep(0.01)
        return web.json_response({"resourceType": "ClaimResponse", "id": self.codes[-1]}, status=201)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/api_fhir_r4/login/", self.login)
        app.router.add_post("/api/api_fhir_r4/Claim/", self.claim)
        return app


async def test_one_vendors_backlog_does_not_starve_another(store, aiohttp_server, tmp_path):
    recording = RecordingOpenImis()
    server = await aiohttp_server(recording.app())
    config = load_config(write_config(tmp_path, channels_yaml(
        f"http://127.0.0.1:{server.port}/api/api_fhir_r4/", channels=CLAIMS,
        extra_server="redis: {url: \"redis://127.0.0.1:6379/0\"}\n")))
    upstream = OpenImisUpstream("openimis", config.channels.upstreams["openimis"], "https://m.example/fhir/")
    await upstream.start()
    metrics = Metrics()
    protection = LoadProtection(config, store.redis, metrics)
    channel: ChannelConfig = config.channels.channels[0]
    settings = AsyncSubmissionConfig(drain_concurrency=1, poll_interval_s=0.05)
    for n in range(12):  # vendor-a's month of claims first, then vendor-b's two
        job_id = f"{n:032x}"
        await store.enqueue(job_id, channel="claims", client="vendor-a", facilities=frozenset(), kind="single",
                            entries=[_entry(job_id, code=f"A{n}")], presettled={}, total=1, request_id="r")
    for n in range(2):
        job_id = f"{100 + n:032x}"
        await store.enqueue(job_id, channel="claims", client="vendor-b", facilities=frozenset(), kind="single",
                            entries=[_entry(job_id, code=f"B{n}")], presettled={}, total=1, request_id="r")
    settled: list[tuple[StreamRef, str]] = []
    drainer = Drainer(store, {"claims": DrainChannel(channel, settings, upstream,
                                                     upstream_slot(protection, "openimis", 10))},
                      async_metrics(metrics), lambda ref, entry, result, outcome, done: settled.append((ref, outcome)))
    drainer.start()
    try:
        deadline = time.monotonic() + 20
        while len(settled) < 14:
            assert time.monotonic() < deadline, recording.codes
            await asyncio.sleep(0.05)
    finally:
        await drainer.close()
        await upstream.close()
    assert {outcome for _, outcome in settled} == {"delivered"}
    assert sorted(recording.codes) == sorted([f"A{n}" for n in range(12)] + ["B0", "B1"])  # each once
    assert max(recording.codes.index("B0"), recording.codes.index("B1")) <= 4, recording.codes


def test_the_final_outcome_audit_event_is_valid_fhir_and_carries_no_claim():
    from fhir.resources.R4B.auditevent import AuditEvent

    from mediator.async_claims.service import final_audit_event

    entry = _entry("d" * 32, 1, code="SECRETCODE")
    result = Result(201, '{"resourceType":"ClaimResponse"}', "async.delivered")
    event = final_audit_event(StreamRef("k", "claims", "vendor-a"), entry, result, "delivered", time.time())
    AuditEvent.model_validate(event)
    text = json.dumps(event)
    assert "SECRETCODE" not in text and "ClaimResponse" not in text
    assert event["outcome"] == "0" and event["outcomeDesc"] == "201 async.delivered (delivered)"
    assert {"system": "https://openimis-mediator.org/fhir/StructureDefinition/async-job",
            "value": f"{'d' * 32}#1"} in [e["what"].get("identifier") for e in event["entity"]]


def _exchange(method: str, path: str, headers: dict[str, str], channel_config: ChannelConfig):  # type: ignore[no-untyped-def]
    import re

    from aiohttp.test_utils import make_mocked_request

    from mediator.fhir import parse_fhir_path
    from mediator.pipeline import Exchange
    from mediator.stages.channel_match import Channel

    exchange = Exchange(make_mocked_request(method, path, headers=headers), "rid")
    exchange.channel = Channel(channel_config, re.compile(channel_config.path))
    exchange.fhir = parse_fhir_path(method, path.removeprefix("/fhir/"))
    return exchange


def test_which_requests_are_queued(tmp_path):
    from mediator.async_claims.service import AsyncClaims

    text = channels_yaml("http://127.0.0.1:1/api/", channels=CLAIMS.replace("{mode: always}", "{}") + """\
- name: always
  path: ^/fhir/?$
  methods: [POST]
  upstream: openimis
  ip_allowlist: [local]
  batch: {}
  async_submission: {mode: always}
- name: eligibility
  path: ^/fhir/CoverageEligibilityRequest/?$
  methods: [POST]
  upstream: openimis
  ip_allowlist: [local]
""", extra_server="redis: {url: \"redis://127.0.0.1:6379/0\"}\n")
    config = load_config(write_config(tmp_path, text))
    metrics = Metrics()
    redis = RedisStore(config.channels.server.redis)
    upstreams = {"openimis": OpenImisUpstream("openimis", config.channels.upstreams["openimis"], "https://m/fhir/")}
    service = AsyncClaims(config, redis, upstreams, LoadProtection(config, redis, metrics), metrics, None)
    claims, always, eligibility = config.channels.channels
    prefer = {"Prefer": "respond-async"}
    assert service.wants(_exchange("POST", "/fhir/Claim", prefer, claims))
    assert not service.wants(_exchange("POST", "/fhir/Claim", {}, claims))  # on_request: synchronous
    assert service.wants(_exchange("POST", "/fhir/", {}, always))  # mode: always
    assert not service.wants(_exchange("POST", "/fhir/CoverageEligibilityRequest", prefer, eligibility))
    assert service.status_url("claims", "ab" * 16) == "https://mediator.example.org/fhir/_async/claims/" + "ab" * 16


class AnsweringOpenImis:
    """Stand-in answering every POST Claim with a fixed status (JSON), counting the POSTs it got."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.posts = 0

    async def login(self, request: web.Request) -> web.Response:
        return web.json_response({"token": "t", "exp": int(time.time()) + 3600})

    async def claim(self, request: web.Request) -> web.Response:
        self.posts += 1
        return web.json_response({"resourceType": "OperationOutcome", "issue": []}, status=self.status)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/api_fhir_r4/login/", self.login)
        app.router.add_post("/api/api_fhir_r4/Claim/", self.claim)
        return app


async def _upstream_for(server, tmp_path):  # type: ignore[no-untyped-def]
    config = load_config(write_config(tmp_path, channels_yaml(
        f"http://127.0.0.1:{server.port}/api/api_fhir_r4/", channels=CLAIMS,
        extra_server="redis: {url: \"redis://127.0.0.1:6379/0\"}\n")))
    upstream = OpenImisUpstream("openimis", config.channels.upstreams["openimis"], "https://m.example/fhir/")
    await upstream.start()
    return config, upstream


@pytest.mark.parametrize(("status", "kind"), [
    (201, "delivered"), (400, "refused"), (500, "refused"), (422, "refused"),
    (503, "retry"), (429, "retry"), (408, "retry"), (502, "unknown"), (504, "unknown")])
async def test_what_openimis_answers_decides_retry_or_final(status, kind, aiohttp_server, tmp_path):
    from mediator.async_claims.delivery import attempt

    stand_in = AnsweringOpenImis(status)
    server = await aiohttp_server(stand_in.app())
    config, upstream = await _upstream_for(server, tmp_path)
    try:
        metrics = Metrics()
        slot = upstream_slot(LoadProtection(config, RedisStore(None), metrics), "openimis", 10)
        outcome = await attempt(upstream, slot, _entry("e" * 32), 5)
    finally:
        await upstream.close()
    assert outcome.kind == kind
    assert stand_in.posts == 1  # one attempt is one POST (the 401 re-login aside)
    assert (outcome.result is not None) == (kind in ("delivered", "refused"))


async def test_an_unreachable_openimis_is_retried_then_given_up_as_not_submitted(store, tmp_path):
    from mediator.async_claims.delivery import attempt

    config = load_config(write_config(tmp_path, channels_yaml(
        "http://127.0.0.1:9/api/api_fhir_r4/", channels=CLAIMS,  # port 9 (discard): connection refused
        extra_server="redis: {url: \"redis://127.0.0.1:6379/0\"}\n")))
    upstream = OpenImisUpstream("openimis", config.channels.upstreams["openimis"], "https://m.example/fhir/")
    await upstream.start()
    metrics = Metrics()
    protection = LoadProtection(config, store.redis, metrics)
    slot = upstream_slot(protection, "openimis", 10)
    assert (await attempt(upstream, slot, _entry("f" * 32), 5)).kind == "retry"  # nothing can have been sent
    job_id = "f" * 32
    old = QueuedEntry(job_id, 0, "Claim", b"{}", "C", time.time() - 9.0, "rid", "127.0.0.1")
    await store.enqueue(job_id, channel="claims", client="v", facilities=frozenset(), kind="single",
                        entries=[old], presettled={}, total=1, request_id="r")
    # Accepted 9 s ago with give_up_after_s 10: retried with backoff for about a second, then given up.
    settings = AsyncSubmissionConfig(give_up_after_s=10, retry_initial_s=0.1, retry_max_s=0.3, poll_interval_s=0.05)
    settled: list[tuple[Result, str]] = []
    drainer = Drainer(store, {"claims": DrainChannel(config.channels.channels[0], settings, upstream, slot)},
                      async_metrics(metrics), lambda ref, entry, result, outcome, _: settled.append((result, outcome)))
    drainer.start()
    try:
        deadline = time.monotonic() + 15
        while not settled:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    finally:
        await drainer.close()
        await upstream.close()
    ((result, outcome),) = settled
    assert outcome == "failed" and result.status == 503 and result.reason == "async.delivery_failed"
    job = await store.job(job_id)
    assert job is not None and job.state == "done" and job.attempts[0] >= 2
    # The login is the first thing that fails (upstream.login_failed), then the open breaker refuses.
    retries = {s.labels["reason"]: s.value for family in metrics.registry.collect()
               if family.name == "mediator_async_retries" for s in family.samples if s.name.endswith("_total")}
    assert sum(retries.values()) >= 2 and set(retries) <= {"upstream.login_failed", "upstream.circuit_open"}


STORE_DOWN = "redis: {url: \"redis://127.0.0.1:1/0\", timeout_s: 0.5}\n"   # nothing listens there


async def _status_mediator(tmp_path, make_mediator, ip_policy: str):  # type: ignore[no-untyped-def]


    key = ECKey.generate_key("P-256")
    (tmp_path / "config" / "keys").mkdir(parents=True)
    for name in ("vendor-jm", "vendor-ra"):
        (tmp_path / "config" / "keys" / f"{name}.pem").write_bytes(key.as_pem(private=False))
    client = await make_mediator(channels_yaml("http://127.0.0.1:1/api/api_fhir_r4/", channels=CHANNELS,
                                               extra_server=STORE_DOWN), ip_policy, POLICIES)
    return Vendor(client, "vendor-jm", key)


async def test_a_status_url_is_guarded_before_the_job_is_read(tmp_path, make_mediator):
    """Redis is down, so a poll that reaches the job read answers 503 async.store_unavailable: only a
    caller the channel admits gets that far. Anyone else is refused as on any request of the channel,
    without a Redis read, and cannot tell whether the store is up."""
    jm = await _status_mediator(tmp_path, make_mediator, DEFAULT_IP_POLICY)
    await jm.login()
    for path in (f"/fhir/_async/claims/{uuid.uuid4().hex}", f"/fhir/_async/{uuid.uuid4().hex}",
                 f"/fhir/_async/no-such-channel/{uuid.uuid4().hex}"):
        anonymous = await jm.client.get(path)
        assert anonymous.status == 401, path
        assert _reason(await anonymous.json()).startswith("authentication."), path
        admitted = await jm.request("GET", path)
        assert admitted.status == 503, path
        assert _reason(await admitted.json()) == "async.store_unavailable"
    malformed = await jm.request("GET", "/fhir/_async/claims/not-an-id")
    assert malformed.status == 404   # no read for an id that cannot exist
    cancel = await jm.request("DELETE", f"/fhir/_async/claims/{uuid.uuid4().hex}")   # not offered
    assert (cancel.status, _reason(await cancel.json())) == (400, "channel.malformed_path")


async def test_a_status_url_refuses_a_caller_outside_the_channels_networks_without_reading(tmp_path, make_mediator):
    elsewhere = "version: 1\ntrusted_proxies: []\nunlisted_channels: deny\nip_sets:\n  local:\n" \
                "    allow: [\"10.9.9.0/24\"]\n"
    jm = await _status_mediator(tmp_path, make_mediator, elsewhere)
    refused = await jm.client.get(f"/fhir/_async/claims/{uuid.uuid4().hex}")
    assert refused.status == 403
    assert _reason(await refused.json()).startswith("ip.")


SPLIT_NETWORKS = CHANNELS.replace("""- name: claim-batch
  path: ^/fhir/?$
  methods: [POST]
  upstream: openimis
  timeout_s: 30
  ip_allowlist: [local]""", """- name: claim-batch
  path: ^/fhir/?$
  methods: [POST]
  upstream: openimis
  timeout_s: 30
  ip_allowlist: [elsewhere]""")
TWO_SETS = DEFAULT_IP_POLICY + "  elsewhere:\n    allow: [\"10.9.9.0/24\"]\n"


async def test_each_status_url_form_is_guarded_by_the_channel_its_job_came_through(store, tmp_path, make_mediator):
    """Batch submissions are only for callers in `elsewhere`, claims for `local`. A batch job polled from
    127.0.0.1 is refused by its channel's allowlist under its own URL (before the read), is not the job of
    the claims channel's URL, and under the earlier URL form (guarded first by the claims channel) still
    has to pass the batch channel's allowlist."""
    assert "ip_allowlist: [elsewhere]" in SPLIT_NETWORKS
    key = ECKey.generate_key("P-256")
    (tmp_path / "config" / "keys").mkdir(parents=True)
    (tmp_path / "config" / "keys" / "vendor-jm.pem").write_bytes(key.as_pem(private=False))
    (tmp_path / "config" / "keys" / "vendor-ra.pem").write_bytes(key.as_pem(private=False))
    redis = f"redis: {{url: \"redis://127.0.0.1:6379/0\", key_prefix: \"{store.redis.config.key_prefix}\"}}\n"
    client = await make_mediator(channels_yaml("http://127.0.0.1:1/api/api_fhir_r4/", channels=SPLIT_NETWORKS,
                                               extra_server=redis), TWO_SETS, POLICIES)
    jm = Vendor(client, "vendor-jm", key)
    await jm.login()
    batch_job, claim_job = uuid.uuid4().hex, uuid.uuid4().hex
    for job_id, channel in ((batch_job, "claim-batch"), (claim_job, "claims")):
        await store.enqueue(job_id, channel=channel, client="vendor-jm", facilities=frozenset({"JMHOS001"}),
                            kind="single", entries=[_entry(job_id)], presettled={}, total=1, request_id="r")
    own_url = await jm.request("GET", f"/fhir/_async/claim-batch/{batch_job}")
    assert (own_url.status, _reason(await own_url.json())) == (403, "ip.denied")
    other_channel = await jm.request("GET", f"/fhir/_async/claims/{batch_job}")
    assert (other_channel.status, _reason(await other_channel.json())) == (404, "async.not_found")
    earlier_form = await jm.request("GET", f"/fhir/_async/{batch_job}")
    assert (earlier_form.status, _reason(await earlier_form.json())) == (403, "ip.denied")
    # The claims job is seen under both forms (queued or being delivered: 202), not under a made-up name
    # (guarded like the first async channel, which the job came through, but not its URL).
    for path in (f"/fhir/_async/claims/{claim_job}", f"/fhir/_async/{claim_job}"):
        assert (await jm.request("GET", path)).status == 202, path
    made_up = await jm.request("GET", f"/fhir/_async/no-such-channel/{claim_job}")
    assert (made_up.status, _reason(await made_up.json())) == (404, "async.not_found")
