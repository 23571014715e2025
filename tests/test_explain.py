"""`explain` runs the live stages on a described request: its reasons equal the live mediator's.

The live request goes through the whole real pipeline with credentials minted at test time (see the
round trips of tests/stages/test_authorization.py); explain is given, as a described principal, what
the real authentication stage produced for that request (the test checks both agree), so every stage
after authentication and the final decision must match exactly.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from mediator.app import RUNTIME, build_app
from mediator.cli import main
from mediator.config import load_config
from mediator.explain import described_principal, explain
from mediator.pipeline import Decision, Exchange, Pipeline, Principal, Stage
from tests.conftest import DEFAULT_IP_POLICY, channels_yaml, upstream_url, write_config
from tests.stages.test_authorization import (
    CALLERS,
    CLAIM_CHANNELS,
    FACILITY_OF_VENDOR,
    JM_CLAIM,
    RA_CLAIM,
    RA_UUID,
    SHIPPED_POLICY,
    _bundle,
    _claim,
    assert_real_authentication,
    credentials,
    write_authz_config,
)

FOREIGN_PROVIDER = {"reference": f"Organization/{RA_UUID}"}

CASES = [
    ("POST", "/fhir/Claim/", "jm-clerk", _claim()),
    ("POST", "/fhir/Claim/", "jm-clerk", _claim(provider=FOREIGN_PROVIDER)),
    ("POST", "/fhir/Claim/", "ra-clerk", _claim()),
    ("POST", "/fhir/Claim/", "hms", _claim()),
    ("POST", "/fhir/Claim/", "jm-reader", _claim()),
    ("POST", "/fhir/", "jm-clerk", _bundle(_claim(), _claim(provider=FOREIGN_PROVIDER))),
    ("GET", f"/fhir/ClaimResponse/{RA_CLAIM}", "jm-clerk", None),
    ("GET", f"/fhir/ClaimResponse/{JM_CLAIM}", "jm-clerk", None),
    ("GET", f"/fhir/ClaimResponse/{JM_CLAIM}", "ra-clerk", None),
    ("GET", "/fhir/ClaimResponse?_count=100", "jm-clerk", None),
    ("GET", "/fhir/Patient?identifier=070707070", "jm-clerk", None),
    ("GET", "/fhir/Patient?name=x", "jm-clerk", None),
    ("GET", "/fhir/Medication", "hms", None),
    ("GET", "/fhir/metadata", None, None),          # an open channel: no credentials, anonymous
    ("DELETE", "/fhir/Claim/x", "jm-clerk", None),
    ("GET", "/fhir/Nowhere", "jm-clerk", None),
]


def described(who: str | None) -> Principal | None:
    """The principal explain is given for CALLERS[who], built the way `explain --client ...` builds it."""
    if who is None:
        return None
    caller = CALLERS[who]
    roles = ["hms", *caller.roles] if caller.user else ["hms"]
    facility = caller.facility if caller.user and caller.facility else FACILITY_OF_VENDOR[caller.vendor]
    return described_principal(None, caller.vendor, ",".join(roles), facility, caller.user, caller.scope,
                               "access_token")


def _fields(principal: Principal | None) -> tuple[Any, ...] | None:
    if principal is None:
        return None
    return (principal.client_id, principal.auth_method, principal.user_id, principal.roles, principal.scopes,
            principal.health_facilities)


class ObservedAuthentication:
    """The app's own authentication stage, run unchanged; the principal it produced is kept."""

    name = "authentication"

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self.principals: list[Principal | None] = []

    async def run(self, exchange: Exchange) -> Decision:
        decision = await self.stage.run(exchange)
        self.principals.append(exchange.principal)
        return decision


@pytest.mark.parametrize(("method", "path", "who", "body"), CASES)
async def test_explain_matches_the_live_decision(tmp_path, sandbox, sandbox_server, aiohttp_client, method, path, who,
                                                 body):
    config = load_config(write_authz_config(tmp_path / "config", sandbox_server))
    app = build_app(config)
    assert_real_authentication(app)
    seen: list[tuple[str, Decision]] = []

    class Recorder:
        def record(self, stage, decision):
            seen.append((stage, decision))

    runtime = app[RUNTIME].current
    observed = ObservedAuthentication(next(s for s in runtime.pipeline.stages if s.name == "authentication"))
    runtime.pipeline = Pipeline([observed if s.name == "authentication" else s for s in runtime.pipeline.stages],
                                Recorder())
    client = await aiohttp_client(app)
    data = json.dumps(body).encode() if body is not None else None
    headers = await credentials(client, who) if who else {}
    if data is not None:
        headers["Content-Type"] = "application/fhir+json"
    response = await client.request(method, path, data=data, headers=headers)

    principal = described(who)
    if observed.principals:   # authentication ran: it passed, and proved exactly the described principal
        assert [d.reason for s, d in seen if s == "authentication"] in (
            ["authentication.authenticated"], ["authentication.not_required"])
        assert [_fields(p) for p in observed.principals] == [_fields(principal)]
    explained = await explain(config, method, path, principal, body=data)

    # load_shed depends on the load at that moment, not on the policy: explain leaves it out.
    live = [(s, d.reason) for s, d in seen if s not in ("authentication", "load_shed")]
    assert [(s, r) for s, r in explained.reasons if s != "authentication"] == live
    live_final = seen[-1][1] if seen and not seen[-1][1].allow else None
    if explained.final is None:   # both let it through: the live request reached openIMIS
        assert live_final is None
        target = path.split("?")[0].removeprefix("/fhir").rstrip("/") + "/"
        if target == "/metadata/":   # the mediator answers its own CapabilityStatement (mediator.capabilities)
            assert response.status == 200 and (await response.json())["resourceType"] == "CapabilityStatement"
        else:
            # (a facility-scoped search of one claim reads that claim: <Type>/<uuid>/)
            assert [r for r in sandbox.requests if r["method"] == method and target in r["path"]]
    else:
        assert live_final is not None
        assert (response.status, live_final.reason) == (explained.final.status, explained.final.reason)


async def test_explain_command_prints_every_stage_and_the_rule(tmp_path, capsys, sandbox_server):
    root = write_config(tmp_path / "config", channels_yaml(upstream_url(sandbox_server), channels=CLAIM_CHANNELS),
                        DEFAULT_IP_POLICY, {"authorization.yaml": SHIPPED_POLICY})
    body = tmp_path / "claim.json"
    body.write_text(json.dumps(_claim(enterer={"reference": "Practitioner/598e43ca-9977-4f4b-a678-992528ce3454"})))
    # The command runs its own event loop; a thread keeps this test's loop serving the stand-in.
    code = await asyncio.to_thread(main, [
                 "explain", "--config", str(root), "--method", "POST", "--path", "/fhir/Claim/",
                 "--client", "hms-a", "--roles", "claim-admin,hms", "--facility", "JMHOS001", "--user", "u1",
                 "--body", str(body)])
    out = capsys.readouterr().out.splitlines()
    assert code == 1
    assert [line.split()[0] for line in out[1:-1]] == ["client_ip", "channel", "ip", "authentication",
                                                       "request", "search", "authorization"]
    assert "authorization.enterer_other_facility" in out[-2] and "rule=claim-submit" in out[-2]
    assert out[-1] == "result: 403 authorization.enterer_other_facility"
