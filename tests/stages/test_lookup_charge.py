"""lookup_charge: which requests are charged before authorization (pure, by the rules), and over
sockets that they are charged whatever authorization decides while the rest are charged last.
The same property against the real openIMIS (no lookup once over the limit):
tests/e2e/test_facility_searches.py::test_reads_of_unknown_claims_are_charged_before_their_lookup."""

from __future__ import annotations

import uuid

import pytest

from mediator.app import METRICS, build_app
from mediator.config import load_config
from mediator.config.authorization import AuthorizationPolicy
from mediator.pipeline import Principal
from mediator.stages.authorization_policy import Access, looks_up_owner
from tests.stages.test_authorization import (
    JM_CLAIM,
    SHIPPED_POLICY,
    _claim,
    _claims_posted,
    _get,
    _post_claim,
    assert_real_authentication,
    write_authz_config,
)

CLERK = Principal("vendor-jm", "access_token", user_id="jm-clerk", roles=frozenset({"claim-admin"}),
                  health_facilities=frozenset({"JMHOS001"}))
MACHINE = Principal("vendor-jm", "mtls", roles=frozenset({"hms"}))


def _rules(tmp_path, sandbox_server):
    config = load_config(write_authz_config(tmp_path / "rules", sandbox_server))
    return config.policy("authorization", AuthorizationPolicy).rules


@pytest.mark.parametrize(("principal", "access", "looked_up"), [
    (CLERK, Access("ClaimResponse", "r", (), JM_CLAIM), True),     # the owner is asked of the claim index
    (CLERK, Access("Claim", "r", (), JM_CLAIM), True),
    (CLERK, Access("ClaimResponse", "s", ()), False),              # searches: charged last, answered locally
    (CLERK, Access("Claim", "c", None), False),                    # a claim's facility is in its body
    (CLERK, Access("Medication", "r", (), "x"), False),            # not facility-bound
    (MACHINE, Access("ClaimResponse", "r", (), JM_CLAIM), False),  # no rule of its roles may allow it
])
def test_which_requests_authorization_looks_up(tmp_path, sandbox_server, principal, access, looked_up):
    assert looks_up_owner(_rules(tmp_path, sandbox_server), principal, access) is looked_up


@pytest.fixture
def limited_mediator(tmp_path, sandbox_server, aiohttp_client):
    async def factory(burst: int):
        root = write_authz_config(tmp_path / "config", sandbox_server, SHIPPED_POLICY)
        (root / "policies" / "rate_limits.yaml").write_text(
            f"version: 1\nlimits:\n  - name: per-user\n    per: [user]\n    rate: 1\n    period_s: 86400\n"
            f"    burst: {burst}\n    on_store_error: local\n")
        app = build_app(load_config(root))
        assert_real_authentication(app)
        return await aiohttp_client(app)
    return factory


def _count(client, stage: str, outcome: str, reason: str) -> float:
    return client.server.app[METRICS].registry.get_sample_value(
        "mediator_stage_decisions_total", {"stage": stage, "outcome": outcome, "reason": reason}) or 0.0


async def test_lookup_reads_are_charged_before_authorization_whatever_it_decides(sandbox, limited_mediator):
    client = await limited_mediator(burst=5)
    missing = await _get(client, f"/fhir/ClaimResponse/{uuid.uuid4()}")      # 404 at authorization: charged 2
    assert missing.status == 404
    assert _count(client, "lookup_charge", "allow", "rate_limit.allowed") == 1
    assert int(missing.headers["RateLimit"].split(";r=")[1].split(";")[0]) == 3
    assert (await _post_claim(client, _claim())).status == 201                # charged last: 1
    assert _count(client, "rate_limit", "allow", "rate_limit.allowed") == 1
    assert _count(client, "lookup_charge", "allow", "lookup_charge.charged_later") == 1
    own = await _get(client, f"/fhir/ClaimResponse/{JM_CLAIM}")               # 2 more: the budget is spent
    assert own.status == 200
    assert _count(client, "rate_limit", "allow", "rate_limit.charged_before_lookup") == 1
    lookups = len(sandbox.requests)
    refused = await _get(client, f"/fhir/ClaimResponse/{uuid.uuid4()}")
    assert refused.status == 429
    assert _count(client, "lookup_charge", "deny", "rate_limit.exceeded") == 1
    assert len(sandbox.requests) == lookups   # refused before the owner lookup
    assert len(_claims_posted(sandbox)) == 1
