"""`explain` runs the live stages on a described request: its reasons equal the live mediator's.

The live side uses the TEST-ONLY principal stage of tests/stages/test_authorization.py (until the
authentication stage is merged); explain uses its own described-principal stand-in. Both sit in the
authentication slot, so every other stage's reason must match exactly.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from mediator.cli import main
from mediator.config import load_config
from mediator.explain import explain
from tests.conftest import DEFAULT_IP_POLICY, channels_yaml, upstream_url, write_config
from tests.stages.test_authorization import (
    CLAIM_CHANNELS,
    JM_CLAIM,
    PRINCIPALS,
    RA_CLAIM,
    RA_UUID,
    SHIPPED_POLICY,
    _claim,
)

CASES = [
    ("POST", "/fhir/Claim/", "jm-clerk", _claim()),
    ("POST", "/fhir/Claim/", "jm-clerk", _claim(provider={"reference": f"Organization/{RA_UUID}"})),
    ("POST", "/fhir/Claim/", "hms", _claim()),
    ("GET", f"/fhir/ClaimResponse/{RA_CLAIM}", "jm-clerk", None),
    ("GET", f"/fhir/ClaimResponse/{JM_CLAIM}", "jm-clerk", None),
    ("GET", "/fhir/Patient?identifier=070707070", "jm-clerk", None),
    ("GET", "/fhir/Patient?name=x", "jm-clerk", None),
    ("GET", "/fhir/Medication", None, None),
    ("DELETE", "/fhir/Claim/x", "jm-clerk", None),
    ("GET", "/fhir/Nowhere", "jm-clerk", None),
]


@pytest.mark.parametrize(("method", "path", "who", "body"), CASES)
async def test_explain_matches_the_live_decision(tmp_path, sandbox_server, aiohttp_client, method, path, who, body):
    from mediator.app import build_app
    from tests.stages.test_authorization import install_test_principal_stage

    root = write_config(tmp_path / "config", channels_yaml(upstream_url(sandbox_server), channels=CLAIM_CHANNELS),
                        DEFAULT_IP_POLICY, {"authorization.yaml": SHIPPED_POLICY})
    config = load_config(root)
    app = build_app(config)
    install_test_principal_stage(app)
    seen = []

    class Recorder:
        def record(self, stage, decision):
            seen.append((stage, decision.reason))

    from mediator.app import RUNTIME
    from mediator.pipeline import Pipeline
    runtime = app[RUNTIME].current
    runtime.pipeline = Pipeline(runtime.pipeline.stages, Recorder())
    client = await aiohttp_client(app)
    data = json.dumps(body).encode() if body is not None else None
    headers = {"X-Test-Principal": who} if who else {}
    if data is not None:
        headers["Content-Type"] = "application/fhir+json"
    response = await client.request(method, path, data=data, headers=headers)
    live = [(s, r) for s, r in seen if s != "authentication"]

    explained = await explain(config, method, path, PRINCIPALS.get(who or ""), body=data)
    assert [(s, r) for s, r in explained.reasons if s != "authentication"] == live
    if explained.final is not None:
        assert response.status == explained.final.status


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
                                                       "authorization"]
    assert "authorization.enterer_other_facility" in out[-2] and "rule=claim-submit" in out[-2]
    assert out[-1] == "result: 403 authorization.enterer_other_facility"
