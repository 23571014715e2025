"""Issue 13's identity and fail-closed edges, against a REAL openIMIS (tests/e2e/vendors.py has the kit)."""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import pytest

from mediator.app import METRICS
from mediator.config import load_config
from mediator.facilities import UpstreamFacilityDirectory
from mediator.identity import Identity, PeerCertificate
from mediator.server import build_metrics_app
from mediator.stages.authentication import Credentials, VouchedUsers, decide
from mediator.upstream import OpenImisUpstream
from tests.conftest import DEFAULT_IP_POLICY, write_config
from tests.e2e.conftest import e2e_channels, harness
from tests.e2e.vendors import BASE, CHANNELS, _claim_for, _reason

pytestmark = [pytest.mark.openimis, pytest.mark.timeout(1800)]


async def test_another_vendors_user_of_the_same_name_does_not_spend_this_users_rate_limit(vendors):
    """status-polls-per-user: 5 a minute per user, a facility-scoped search page costs 2 (README "Rate
    limits"). Vendor RA names its user JHOS0011, like Jambero's."""
    jm, ra = vendors["vendor-jm"], vendors["vendor-ra"]
    as_jhos = {"Authorization": f"Bearer {ra.access_token}", "X-User-Token": ra.user_token(user="JHOS0011")}
    borrowed = [await ra.client.get("/fhir/ClaimResponse/?_count=1", headers=as_jhos) for _ in range(3)]
    assert [r.status for r in borrowed] == [200] * 2 + [429]   # RA's JHOS0011 is limited...
    own = await jm.request("GET", "/fhir/ClaimResponse/?_count=1")
    assert own.status == 200, await own.text()                  # ...Jambero's JHOS0011 is untouched


async def test_a_duplicate_claim_code_is_refused_without_naming_the_code_or_openimis(openimis, vendors):
    jm, ra = vendors["vendor-jm"], vendors["vendor-ra"]
    code = "E2EDUP" + str(int(time.time() * 1000))[-8:]
    jambero = _claim_for("JMHOS001")
    jambero["identifier"][0]["value"] = code
    assert (await jm.request("POST", "/fhir/Claim", json=jambero)).status == 201
    # Rapta submits its own claim under the same code: openIMIS refuses it ("Claim with code '<code>'
    # already exists", a 500), which must not tell Rapta that Jambero has a claim with that code.
    rapta = _claim_for("RAHOS001")
    rapta["identifier"][0]["value"] = code
    refused = await ra.request("POST", "/fhir/Claim", json=rapta)
    text = await refused.text()
    assert refused.status >= 400
    assert refused.content_type == "application/fhir+json"
    assert _reason(await refused.json()) in ("upstream.error", "upstream.refused")
    upstream = urlsplit(openimis["fhir_base_url"])
    for secret in (code, "already exists", upstream.netloc, str(upstream.port), "api_fhir_r4"):
        assert secret not in text, secret
    assert "Server" not in refused.headers


def _trusted_header_config(root, fhir_base_url: str) -> None:
    clients = """\
version: 1
token_service: {signing_key_file: keys/mediator-signing.key}
clients:
  vendor-b:
    auth_methods: [mtls]
    certificates: [{subject_cn: vendor-b}]
    cidrs: ["127.0.0.0/8"]
    health_facilities: [RAHOS001]
    default_roles: [hms, claim-admin]
    trust_user_header: true
"""
    write_config(root, e2e_channels(fhir_base_url, channels=CHANNELS), DEFAULT_IP_POLICY,
                 {"clients.yaml": clients})


async def test_trusted_header_users_are_openimis_claim_administrators_of_a_registered_facility(openimis, tmp_path):
    _trusted_header_config(tmp_path, openimis["fhir_base_url"])
    config = load_config(tmp_path)
    upstream = OpenImisUpstream("openimis", config.channels.upstreams["openimis"], BASE)
    await upstream.start()
    try:
        directory = UpstreamFacilityDirectory(upstream, ttl_s=300, max_stale_s=0, page_size=100, timeout_s=30)
        snapshot = await directory.snapshot()
        # openIMIS's PractitionerRole list knows every demo claim administrator and their facility.
        assert {code: snapshot.facility_of_claim_administrator(code) for code in harness.CLAIM_ADMINS} == \
            harness.CLAIM_ADMINS
        identity = Identity.from_config(config)
        vendor_b = PeerCertificate("ab" * 32, "vendor-b")
        users = VouchedUsers(directory)
        local = __import__("ipaddress").ip_address("127.0.0.1")

        async def vouch(name: str):  # type: ignore[no-untyped-def]
            return await decide(Credentials(None, vendor_b, None, name), local, identity, int(time.time()), users)

        decision, principal = await vouch("RHOS0011")
        assert decision.allow and principal is not None
        assert (principal.user_id, principal.health_facilities) == ("RHOS0011", {"RAHOS001"})
        for name in ("NOBODY", "JHOS0011"):   # nobody, and Jambero's claim administrator: one answer
            decision, principal = await vouch(name)
            assert (decision.status, decision.reason, principal) == (403, "authentication.unknown_user", None)
    finally:
        await upstream.close()


async def test_readyz_on_the_ops_listener_probes_the_real_openimis(openimis, make_mediator, aiohttp_client):
    mediator = await make_mediator(e2e_channels(openimis["fhir_base_url"], channels=CHANNELS))
    ops = await aiohttp_client(build_metrics_app(mediator.server.app[METRICS], mediator.server.app))
    response = await ops.get("/readyz")
    assert response.status == 200, await response.text()
    assert (await response.json())["upstreams"] == {"openimis": True}
    assert (await mediator.get("/readyz")).status == 404
