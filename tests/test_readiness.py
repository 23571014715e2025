"""/readyz: on the ops listener only, and a real recent probe of openIMIS and Redis (mediator/readiness.py).

"Down" is a refused port: a local port bound and released again, so nothing listens there.
"""

from __future__ import annotations

import socket

import pytest

from mediator.app import READINESS
from mediator.config import load_config
from mediator.readiness import Readiness
from mediator.server import mediator_sites
from tests.conftest import channels_yaml, upstream_url, write_config
from tests.identity.kit import clients_yaml, make_keys, write_keys

METRICS_ON = "metrics:\n  host: 127.0.0.1\n  port: 0\n"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _serve_both(root, aiohttp_client):
    fhir_site, ops_site = mediator_sites(load_config(root))
    fhir, ops = await aiohttp_client(fhir_site.app), await aiohttp_client(ops_site.app)
    fhir_site.app[READINESS].interval_s = 0   # every /readyz probes afresh (the default reuses 5 s)
    return fhir, ops


async def test_readyz_is_not_served_on_the_public_port(tmp_path, sandbox_server, aiohttp_client):
    root = write_config(tmp_path, channels_yaml(upstream_url(sandbox_server), extra_server=METRICS_ON))
    fhir, ops = await _serve_both(root, aiohttp_client)
    public = await fhir.get("/readyz")
    assert public.status == 404
    assert "upstreams" not in await public.text()
    assert (await fhir.get("/healthz")).status == 200   # liveness tells nobody anything
    ready = await ops.get("/readyz")
    assert ready.status == 200
    assert await ready.json() == {"status": "ready", "config": "loaded", "upstreams": {"openimis": True}}


async def test_openimis_going_down_makes_readyz_503_although_the_login_token_is_cached(
        tmp_path, sandbox, sandbox_server, aiohttp_client):
    root = write_config(tmp_path, channels_yaml(upstream_url(sandbox_server), extra_server=METRICS_ON))
    fhir, ops = await _serve_both(root, aiohttp_client)
    assert (await fhir.get("/fhir/Medication/")).status == 200   # logged in: the token is cached now
    assert (await ops.get("/readyz")).status == 200
    await sandbox_server.close()                                  # openIMIS stops listening
    not_ready = await ops.get("/readyz")
    assert not_ready.status == 503
    assert (await not_ready.json())["upstreams"] == {"openimis": False}
    assert (await ops.get("/healthz")).status == 200


async def test_an_unreachable_upstream_is_not_ready(tmp_path, aiohttp_client):
    root = write_config(tmp_path, channels_yaml(f"http://127.0.0.1:{closed_port()}/api/api_fhir_r4/",
                                                extra_server=METRICS_ON))
    _, ops = await _serve_both(root, aiohttp_client)
    response = await ops.get("/readyz")
    assert response.status == 503
    assert (await response.json())["upstreams"] == {"openimis": False}


@pytest.mark.redis
async def test_redis_is_probed_when_configured(tmp_path, sandbox_server, aiohttp_client):
    up = "redis:\n  url: redis://127.0.0.1:6379/0\n  key_prefix: \"readyz-test:\"\n"
    root = write_config(tmp_path / "up", channels_yaml(upstream_url(sandbox_server), extra_server=METRICS_ON + up))
    _, ops = await _serve_both(root, aiohttp_client)
    response = await ops.get("/readyz")
    assert response.status == 200 and (await response.json())["redis"] == "up"

    down = f"redis:\n  url: redis://127.0.0.1:{closed_port()}/0\n"
    root = write_config(tmp_path / "down", channels_yaml(upstream_url(sandbox_server),
                                                         extra_server=METRICS_ON + down))
    _, ops = await _serve_both(root, aiohttp_client)
    response = await ops.get("/readyz")
    assert response.status == 503
    body = await response.json()
    assert (body["redis"], body["upstreams"]) == ("down", {"openimis": True})


async def test_a_redis_replay_store_is_probed(tmp_path, sandbox_server, aiohttp_client, monkeypatch):
    monkeypatch.setenv("MEDIATOR_TEST_REDIS", f"redis://127.0.0.1:{closed_port()}/0")
    root = write_config(tmp_path, channels_yaml(upstream_url(sandbox_server), extra_server=METRICS_ON),
                        extra_policies={"clients.yaml": clients_yaml(
                            replay="  replay_store:\n    redis_url_env: MEDIATOR_TEST_REDIS\n")})
    write_keys(root, make_keys())
    _, ops = await _serve_both(root, aiohttp_client)
    response = await ops.get("/readyz")
    assert response.status == 503
    assert (await response.json())["replay_store"] == "down"


async def test_a_probe_result_is_reused_for_the_interval_then_probed_again():
    now = [0.0]
    calls = []

    async def probe() -> bool:
        calls.append(now[0])
        return len(calls) == 1

    readiness = Readiness(interval_s=5, clock=lambda: now[0])
    target = Readiness()   # any object: probes are kept per target
    assert await readiness._recent(target, probe) is True
    now[0] = 4.9
    assert await readiness._recent(target, probe) is True   # reused, no second probe
    now[0] = 5.0
    assert await readiness._recent(target, probe) is False  # probed again
    assert calls == [0.0, 5.0]
