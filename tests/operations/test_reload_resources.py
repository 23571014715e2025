"""Hot reload and the runtime's live resources, on real sockets (real Redis where Redis is involved).

A reload builds the next Runtime from the running one: what is unchanged is taken over (and keeps
working: stages are built with the taken-over objects), what is new is started before the swap, and
what is retired is closed once the requests on the old runtime have finished. Nothing outlives the app.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from aiohttp import web
from joserfc.jwk import ECKey

import mediator
from mediator.app import METRICS, RUNTIME, Runtime, build_app
from mediator.config import load_config
from mediator.reload import attach_reloader
from tests.conftest import DEFAULT_IP_POLICY, channels_yaml, upstream_url, write_config
from tests.identity.kit import IDP_ISSUER, KEYS_FOR_JWKS, form, good_assertion, sign, user_claims, write_keys
from tests.operations.support import SlowOpenImis, eventually
from tests.replica.conftest import REDIS_URL, delete_prefix
from tests.replica.test_serve import MASTER_DATA
from tests.stages.test_authorization import JM_CLAIM, RA_CLAIM, credentials, write_authz_config

NO_POLL = "reload:\n  poll_interval_s: 0\n"
# An unrelated policy change: one more IP set nobody uses.
EDITED_IP_POLICY = DEFAULT_IP_POLICY + "  partners:\n    allow: [\"10.0.0.0/8\"]\n"

CLAIM_STATUS_CHANNEL = """\
  - name: claims
    path: ^/fhir/(Claim|ClaimResponse)(/[^/]+)?/?$
    methods: [GET]
    upstream: openimis
    ip_allowlist: [local]
"""

CLAIM_STATUS_POLICY = """\
version: 1
facility_directory:
  upstream: openimis
rules:
  - name: claim-status
    roles: [claim-admin]
    permissions: [system/ClaimResponse.rs]
"""


def clients_with_jwks(jwks_url: str, refresh_s: int = 3600) -> str:
    return f"""\
version: 1
token_service:
  signing_key_file: keys/mediator-signing.key
  jwks_refresh_s: {refresh_s}
clients:
  vendor-a:
    auth_methods: [private_key_jwt]
    keys:
      public_key_file: keys/vendor-a.pem
    ip_allowlist: [local]
    health_facilities: [JMHOS001]
    default_roles: [hms]
    scopes: [system/*.read]
    user_token:
      required: true
      issuer: {IDP_ISSUER}
      keys:
        jwks_url: {jwks_url}
      algorithms: [ES256]
      max_lifetime_s: 600
      replay_check: true
      claims:
        user_id: preferred_username
        roles: roles
        health_facility: hf
"""


class Idp:
    """A stand-in IdP publishing a JWKS on a real socket; `hits` counts fetches."""

    def __init__(self) -> None:
        self.keys: list[ECKey] = []
        self.hits = 0
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        return web.json_response({"keys": [dict(k.as_dict(private=False), kid=k.kid) for k in self.keys]})


@pytest.fixture
async def idp(aiohttp_server):
    provider = Idp()
    app = web.Application()
    app.router.add_get("/jwks", provider.handle)
    provider.url = str((await aiohttp_server(app)).make_url("/jwks"))
    return provider


@pytest.fixture
async def redis_prefix():
    prefix = f"test-reload-{uuid.uuid4().hex[:12]}:"
    yield prefix
    await delete_prefix(prefix)


def _key(kid: str) -> ECKey:
    return ECKey.generate_key("P-256", parameters={"kid": kid})


def _user_token(key: ECKey) -> str:
    claims = user_claims(roles=["claim-admin"], hf="JMHOS001")
    return sign({"alg": "ES256", "kid": key.kid}, claims, key)


def _reason(document: dict) -> str:
    return document["issue"][0]["details"]["coding"][0]["code"] if "issue" in document else "ok"


async def _reloadable(tmp_path, aiohttp_client, channels: str, policies: dict[str, str] | None = None):
    root = write_config(tmp_path / "config", channels, DEFAULT_IP_POLICY, policies)
    app = build_app(load_config(root))
    reloader = attach_reloader(app, root)
    return root, app, reloader, await aiohttp_client(app)


async def _edit_and_reload(root, reloader, path: str, old: str, new: str) -> None:
    file = root / path
    text = file.read_text()
    assert old in text, f"{old!r} not in {path}"
    file.write_text(text.replace(old, new))
    assert await reloader.reload("test")


def _mediator_tasks() -> list[asyncio.Task]:
    """Unfinished tasks running the mediator's own code (JWKS refresh, replica sync, reload, polling)."""
    package = str(Path(mediator.__file__).parent)
    return [t for t in asyncio.all_tasks() if not t.done()
            and getattr(getattr(t.get_coro(), "cr_code", None), "co_filename", "").startswith(package)]


def _redis_connected(client: aioredis.Redis) -> bool:
    pool = client.connection_pool
    return any(c.is_connected for c in [*pool._available_connections, *pool._in_use_connections])


async def test_authorization_owner_lookups_use_the_started_upstream_after_a_reload(
        tmp_path, sandbox_server, aiohttp_client):
    root = write_authz_config(tmp_path / "config", sandbox_server, extra_server=NO_POLL)
    app = build_app(load_config(root))
    reloader = attach_reloader(app, root)
    client = await aiohttp_client(app)
    before = app[RUNTIME].current
    (root / "policies" / "ip_allowlist.yaml").write_text(EDITED_IP_POLICY)
    assert await reloader.reload("test")
    after = app[RUNTIME].current
    upstream = after.upstreams["openimis"]
    assert upstream is before.upstreams["openimis"] and upstream._session is not None

    # The facility directory and the owning Claim are read through the started upstream (not a 500),
    # for a caller proven by a real access token and SSO user token.
    headers = await credentials(client, "jm-clerk")
    own = await client.get(f"/fhir/ClaimResponse/{JM_CLAIM}", headers=headers)
    assert own.status == 200, await own.text()
    headers = await credentials(client, "jm-clerk")  # a fresh user token: its jti is single use
    other = await client.get(f"/fhir/ClaimResponse/{RA_CLAIM}", headers=headers)
    assert (other.status, _reason(await other.json())) == (403, "authorization.owner_other_facility")
    [stage] = [s for s in after.pipeline.stages if s.name == "authorization"]
    assert stage.directory.upstream is upstream and stage.upstreams["openimis"] is upstream  # type: ignore[attr-defined]
    # Bulkhead/breaker state and idempotency records of the kept upstream and store carry on.
    assert after.protection.guards["openimis"] is before.protection.guards["openimis"]
    assert after.protection.idempotency is before.protection.idempotency


async def test_authorization_lookups_and_jwks_user_tokens_keep_working_after_an_unrelated_reload(
        tmp_path, idp, sandbox_server, aiohttp_client):
    signer = _key("2024")
    idp.keys = [signer]
    write_keys(tmp_path / "config", KEYS_FOR_JWKS)
    root, app, reloader, client = await _reloadable(
        tmp_path, aiohttp_client,
        channels_yaml(upstream_url(sandbox_server), extra_server=NO_POLL, channels=CLAIM_STATUS_CHANNEL),
        {"clients.yaml": clients_with_jwks(idp.url), "authorization.yaml": CLAIM_STATUS_POLICY})
    token = (await (await client.post("/auth/token", data=form(good_assertion(KEYS_FOR_JWKS)))).json())["access_token"]

    async def claim_status(claim_id: str, user: str) -> tuple[int, str]:
        response = await client.get(f"/fhir/ClaimResponse/{claim_id}",
                                    headers={"Authorization": f"Bearer {token}", "X-User-Token": user})
        return response.status, _reason(await response.json())

    used_before = _user_token(signer)
    assert await claim_status(JM_CLAIM, used_before) == (200, "ok")
    before = app[RUNTIME].current
    cache = before.identity.jwks[idp.url]
    fetches = idp.hits

    (root / "policies" / "ip_allowlist.yaml").write_text(EDITED_IP_POLICY)
    assert await reloader.reload("test")
    after = app[RUNTIME].current
    assert after is not before

    # The owning Claim and the facility directory are read through the (taken-over, started) upstream.
    assert await claim_status(JM_CLAIM, _user_token(signer)) == (200, "ok")
    assert await claim_status(RA_CLAIM, _user_token(signer)) == (403, "authorization.owner_other_facility")
    # The JWKS cache was taken over with its keys and refresh task: no refetch at the reload...
    assert after.identity.jwks[idp.url] is cache and idp.hits == fetches
    assert cache._task is not None and not cache._task.done()
    # ...and it can still fetch: a key the IdP rotates in after the reload is found on first sight.
    rotated = _key("2025")
    idp.keys = [signer, rotated]
    assert await claim_status(JM_CLAIM, _user_token(rotated)) == (200, "ok")
    # The replay store was taken over: a user token used before the reload stays used.
    assert await claim_status(JM_CLAIM, used_before) == (401, "authentication.user_token_replayed")


async def test_the_replica_keeps_its_data_and_its_sync_task_across_a_reload(
        tmp_path, sandbox, sandbox_server, aiohttp_client):
    replica_policy = "version: 1\nupstream: openimis\nincremental_every_s: 3600\nnever_synced: unavailable\n"
    root, app, reloader, client = await _reloadable(
        tmp_path, aiohttp_client,
        channels_yaml(upstream_url(sandbox_server), extra_server=NO_POLL, channels=MASTER_DATA),
        {"replica.yaml": replica_policy})
    replica = app[RUNTIME].current.replica
    assert replica is not None
    # Its syncs wait in the runtime's bulkhead for the upstream, before and after the reload.
    assert replica.syncer.guard is app[RUNTIME].current.protection.guards["openimis"]
    await eventually(lambda: replica.reader.last_success is not None, what="the scheduled first sync")
    schedule = replica._task
    sandbox.requests.clear()

    (root / "policies" / "ip_allowlist.yaml").write_text(EDITED_IP_POLICY)
    assert await reloader.reload("test")

    assert app[RUNTIME].current.replica is replica
    assert replica.syncer.guard is app[RUNTIME].current.protection.guards["openimis"]
    assert replica._task is schedule and not schedule.done()
    rid = next(iter(sandbox.store["Medication"]))
    response = await client.get(f"/fhir/Medication/{rid}")
    assert response.status == 200 and (await response.json())["id"] == rid
    hits = app[METRICS].registry.get_sample_value(
        "mediator_requests_total", {"channel": "master-data", "status": "200", "reason": "replica.hit"})
    assert hits == 1
    assert sandbox.requests == []  # neither re-synced nor answered from openIMIS


async def test_a_changed_redis_and_upstream_are_closed_after_the_drain_and_their_successors_work(
        tmp_path, aiohttp_server, aiohttp_client, redis_prefix):
    slow = SlowOpenImis()
    upstream = upstream_url(await aiohttp_server(slow.app()))
    second_prefix = f"{redis_prefix}second:"
    # Generous command timeouts: on a loaded machine 0.5 s can pass, and a store error would refuse the
    # request (on_store_error: deny) before it reaches the held upstream.
    redis_section = f"{NO_POLL}redis:\n  url: {REDIS_URL}\n  key_prefix: \"{redis_prefix}\"\n  timeout_s: 5\n"
    rate_limits = "version: 1\nlimits:\n  - name: per-ip\n    per: [ip]\n    rate: 1000\n    period_s: 60\n" \
                  "    on_store_error: deny\n"
    root, app, reloader, client = await _reloadable(
        tmp_path, aiohttp_client, channels_yaml(upstream, extra_server=redis_section),
        {"rate_limits.yaml": rate_limits})
    assert (await client.get("/fhir/Medication/")).status == 200
    old = app[RUNTIME].current
    old_redis = old.redis._client
    old_upstream = old.upstreams["openimis"]
    assert old_redis is not None and _redis_connected(old_redis)

    in_flight = asyncio.create_task(client.get("/fhir/Claim/"))
    await asyncio.wait_for(slow.arrived.wait(), 10)
    await _edit_and_reload(root, reloader, "channels.yaml", f'key_prefix: "{redis_prefix}"\n',
                           f'key_prefix: "{second_prefix}"\n')
    channels = root / "channels.yaml"
    channels.write_text(channels.read_text().replace("connect_timeout_s: 1\n", "connect_timeout_s: 2\n"))
    assert await reloader.reload("test")
    new = app[RUNTIME].current
    assert new.redis is not old.redis and new.upstreams["openimis"] is not old_upstream

    # The request that started on the old runtime holds it open...
    assert old.redis._client is old_redis and _redis_connected(old_redis)
    assert old_upstream._session is not None
    assert (await in_flight).status == 200
    # ...and once it is done, what only the old runtime used is closed.
    await eventually(lambda: old.redis._client is None and old_upstream._session is None,
                     what="the retired Redis client and upstream pool to close")
    assert not _redis_connected(old_redis)

    assert (await client.get("/fhir/Medication/")).status == 200
    checker = aioredis.from_url(REDIS_URL)
    try:
        assert [k async for k in checker.scan_iter(match=f"{second_prefix}rl:*")]
    finally:
        await checker.aclose()


async def test_a_reload_whose_new_resources_cannot_start_is_refused_and_closes_what_it_started(
        tmp_path, sandbox_server, aiohttp_client, monkeypatch):
    root, app, reloader, client = await _reloadable(
        tmp_path, aiohttp_client, channels_yaml(upstream_url(sandbox_server), extra_server=NO_POLL))
    running = app[RUNTIME].current
    started: list[Runtime] = []
    original = Runtime.start_new

    async def record(self: Runtime, previous: Runtime | None) -> None:
        started.append(self)
        await original(self, previous)

    # Nothing listens on port 1: the new Redis-backed replica's first read of its store fails.
    channels = root / "channels.yaml"
    channels.write_text(channels.read_text().replace(
        "connect_timeout_s: 1\n", "connect_timeout_s: 2\n").replace(
        "  limits:\n", "  redis:\n    url: redis://127.0.0.1:1/0\n  limits:\n"))
    (root / "policies" / "replica.yaml").write_text("version: 1\nupstream: openimis\nstore: redis\n")
    monkeypatch.setattr(Runtime, "start_new", record)  # a spy: it only notes which runtime starts
    assert not await reloader.reload("test")

    assert app[RUNTIME].current is running
    [refused] = started
    assert refused.upstreams["openimis"]._session is None  # started for it, closed again
    assert refused.replica is not None and refused.replica.store._client is None  # type: ignore[attr-defined]
    assert (await client.get("/fhir/Medication/")).status == 200


async def test_nothing_outlives_the_app_after_several_reloads(
        tmp_path, idp, sandbox_server, aiohttp_client, redis_prefix):
    idp.keys = [_key("2024")]
    write_keys(tmp_path / "config", KEYS_FOR_JWKS)
    # Generous command timeouts: on a loaded machine 0.5 s can pass, and a store error would refuse the
    # request (on_store_error: deny) before it reaches the held upstream.
    redis_section = f"{NO_POLL}redis:\n  url: {REDIS_URL}\n  key_prefix: \"{redis_prefix}\"\n  timeout_s: 5\n"
    root, app, reloader, client = await _reloadable(
        tmp_path, aiohttp_client,
        channels_yaml(upstream_url(sandbox_server), extra_server=redis_section, channels=MASTER_DATA),
        {"clients.yaml": clients_with_jwks(idp.url),
         "replica.yaml": "version: 1\nupstream: openimis\nstore: redis\nincremental_every_s: 3600\n"})
    runtimes = [app[RUNTIME].current]
    edits = [
        ("policies/ip_allowlist.yaml", "::1/128", "::1/128\", \"192.0.2.0/24"),
        ("policies/clients.yaml", "jwks_refresh_s: 3600", "jwks_refresh_s: 1800"),      # a new JWKS cache
        ("policies/replica.yaml", "incremental_every_s: 3600", "incremental_every_s: 1800"),  # a new replica
        ("channels.yaml", f'key_prefix: "{redis_prefix}"', f'key_prefix: "{redis_prefix}b:"'),  # new Redis
        ("channels.yaml", "connect_timeout_s: 1\n", "connect_timeout_s: 2\n"),  # new upstream, new replica
    ]
    for path, old, new in edits:
        await _edit_and_reload(root, reloader, path, old, new)
        runtimes.append(app[RUNTIME].current)
        assert (await client.get("/fhir/Medication/")).status == 200
    assert len({id(r.identity.jwks[idp.url]) for r in runtimes}) == 2
    assert len({id(r.replica) for r in runtimes}) == 4
    assert len({id(r.redis) for r in runtimes}) == 2
    assert len({id(r.upstreams["openimis"]) for r in runtimes}) == 2
    last = runtimes[-1]
    assert not last.identity.jwks[idp.url]._task.done() and not last.replica._task.done()  # running till the end

    assert {t.get_name() for t in _mediator_tasks()} >= {f"jwks refresh {idp.url}", "replica-sync"}

    await client.close()  # the app's cleanup: the reloader first, then the runtime's resources

    for runtime in runtimes:
        assert runtime.upstreams["openimis"]._session is None
        assert runtime.redis._client is None
        assert runtime.identity._session is None
        assert all(cache._task is None for cache in runtime.identity.jwks.values())
        assert runtime.replica is not None and runtime.replica._task is None
        assert runtime.replica.store._client is None  # type: ignore[attr-defined]
    assert _mediator_tasks() == []
