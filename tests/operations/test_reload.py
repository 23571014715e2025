"""Hot reload on a real server: policy edits take effect, broken files are refused, pools are handed over."""

from __future__ import annotations

import asyncio
import logging

from mediator.app import METRICS, RUNTIME, build_app
from mediator.config import load_config
from mediator.reload import attach_reloader
from tests.conftest import DEFAULT_IP_POLICY, channels_yaml, upstream_url, write_config
from tests.operations.support import SlowOpenImis, eventually

FAST_POLL = "reload:\n  poll_interval_s: 0.05\n"
DENY_POLICY = DEFAULT_IP_POLICY.replace('["127.0.0.0/8", "::1/128"]', '["10.0.0.0/8"]')
BROKEN_POLICY = DENY_POLICY + "  other:\n    allow: [\"300.1.2.3/32\"]\n"


def _reloads(app, outcome: str, trigger: str) -> float:
    value = app[METRICS].registry.get_sample_value("mediator_config_reloads_total",
                                                   {"outcome": outcome, "trigger": trigger})
    return value or 0.0


async def _mediator(tmp_path, upstream: str, aiohttp_client, extra_server: str = FAST_POLL):
    root = write_config(tmp_path / "config", channels_yaml(upstream, extra_server=extra_server))
    app = build_app(load_config(root))
    reloader = attach_reloader(app, root)
    return root, app, reloader, await aiohttp_client(app)


async def test_an_edited_policy_applies_and_a_broken_one_is_refused_while_the_old_keeps_serving(
        tmp_path, sandbox_server, aiohttp_client, caplog):
    root, app, _, client = await _mediator(tmp_path, upstream_url(sandbox_server), aiohttp_client)
    policy = root / "policies" / "ip_allowlist.yaml"
    assert (await client.get("/fhir/Medication/")).status == 200

    policy.write_text(DENY_POLICY)
    await eventually(lambda: _reloads(app, "success", "file") == 1, what="the edited policy to load")
    denied = await client.get("/fhir/Medication/")
    assert denied.status == 403
    assert (await denied.json())["issue"][0]["details"]["coding"][0]["code"] == "ip.denied"

    with caplog.at_level(logging.ERROR, logger="mediator.reload"):
        policy.write_text(BROKEN_POLICY)
        await eventually(lambda: _reloads(app, "failure", "file") == 1, what="the broken policy to be refused")
    assert [r.msg.fields for r in caplog.records if r.name == "mediator.reload"] == [
        {"event": "reload.refused", "trigger": "file", "file": "policies/ip_allowlist.yaml", "line": 8,
         "column": 13, "problem": "ip_sets.other.allow[0]: invalid ip or cidr range: '300.1.2.3/32' "
                                  "('300.1.2.3/32' does not appear to be an IPv4 or IPv6 network)"}]
    assert (await client.get("/fhir/Medication/")).status == 403  # still the last good policy
    assert _reloads(app, "success", "file") == 1

    policy.write_text(DEFAULT_IP_POLICY)
    await eventually(lambda: _reloads(app, "success", "file") == 2, what="the fixed policy to load")
    assert (await client.get("/fhir/Medication/")).status == 200


async def test_unchanged_upstreams_are_reused_and_a_replaced_one_closes_after_its_requests(
        tmp_path, aiohttp_server, aiohttp_client):
    slow = SlowOpenImis()
    upstream_server = await aiohttp_server(slow.app())
    no_poll = "reload:\n  poll_interval_s: 0\n"
    root, app, reloader, client = await _mediator(tmp_path, upstream_url(upstream_server), aiohttp_client, no_poll)
    first = app[RUNTIME].current.upstreams["openimis"]

    assert await reloader.reload("test")
    assert app[RUNTIME].current.upstreams["openimis"] is first  # same pool, same login

    in_flight = asyncio.create_task(client.get("/fhir/Claim/"))
    await asyncio.wait_for(slow.arrived.wait(), 10)
    channels = root / "channels.yaml"
    channels.write_text(channels.read_text().replace("connect_timeout_s: 1", "connect_timeout_s: 2"))
    assert await reloader.reload("test")
    second = app[RUNTIME].current.upstreams["openimis"]
    assert second is not first and second.config.connect_timeout_s == 2
    assert first.in_flight == 1 and first._session is not None  # not closed under the running request
    response = await in_flight
    assert response.status == 200
    await eventually(lambda: first._session is None, what="the replaced pool to close")
    assert (await client.get("/fhir/Medication/")).status == 200  # served through the new pool
    assert second._session is not None
    assert _reloads(app, "success", "test") == 2


async def test_a_reload_that_changes_the_listener_warns_that_a_restart_is_needed(
        tmp_path, sandbox_server, aiohttp_client, caplog):
    root, app, reloader, _ = await _mediator(tmp_path, upstream_url(sandbox_server), aiohttp_client,
                                             "reload:\n  poll_interval_s: 0\n")
    channels = root / "channels.yaml"
    channels.write_text(channels.read_text().replace("max_body_bytes: 65536", "max_body_bytes: 4096"))
    with caplog.at_level(logging.WARNING, logger="mediator.reload"):
        assert await reloader.reload("sighup")
    assert {"event": "reload.restart_needed", "setting": "server.limits"} in [
        r.msg.fields for r in caplog.records if r.name == "mediator.reload" and r.levelname == "WARNING"]


async def test_a_reload_naming_a_missing_key_file_is_refused_at_its_line(tmp_path, sandbox_server, aiohttp_client,
                                                                        caplog):
    """A client added with a key file that is not there: refused at the line that names it (not a failed
    reload with a traceback), and the running configuration keeps serving."""
    from joserfc.jwk import ECKey

    from tests.identity.kit import facility_vendors_yaml, write_vendor_keys

    root, app, reloader, client = await _mediator(tmp_path, upstream_url(sandbox_server), aiohttp_client,
                                                  "reload:\n  poll_interval_s: 0\n")
    write_vendor_keys(root, {"vendor-a": ECKey.generate_key("P-256")})
    (root / "policies" / "clients.yaml").write_text(facility_vendors_yaml({"vendor-a": "JMHOS001",
                                                                           "vendor-b": "RAHOS001"}))
    with caplog.at_level(logging.ERROR, logger="mediator.reload"):
        assert not await reloader.reload("test")
    refused = [r.msg.fields for r in caplog.records if r.name == "mediator.reload"]
    # vendor-b's key file serves for its client assertions and its users' tokens: both places are named
    assert [(e["event"], e["file"], e["line"], e["column"], e["problem"]) for e in refused] == [
        ("reload.refused", "policies/clients.yaml", 31, 7,
         "clients.vendor-b.keys.public_key_file: keys/vendor-b.pem: cannot read (No such file or directory)"),
        ("reload.refused", "policies/clients.yaml", 40, 9,
         "clients.vendor-b.user_token.keys.public_key_file: keys/vendor-b.pem: cannot read "
         "(No such file or directory)")], refused
    assert _reloads(app, "failure", "test") == 1
    assert (await client.get("/fhir/Medication/")).status == 200   # the running configuration still serves
