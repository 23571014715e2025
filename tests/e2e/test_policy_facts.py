"""The facts the shipped policy tests assume are what the real openIMIS demo database answers.

policies/tests/facts/demo.yaml stands in for the facility directory the mediator reads from openIMIS; here
the real directory is loaded from the real openIMIS (UpstreamFacilityDirectory, as the authorization stage
does) and every facility key and claim administrator of the facts must resolve to the same facility.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from mediator.config.models import UpstreamConfig
from mediator.facilities import UpstreamFacilityDirectory
from mediator.offline import AssumedFacts
from mediator.upstream import OpenImisUpstream

pytestmark = [pytest.mark.openimis, pytest.mark.timeout(1800)]

FACTS = Path(__file__).parents[2] / "policies" / "tests" / "facts" / "demo.yaml"


async def test_the_shipped_facts_match_the_real_openimis_directory(openimis: Any) -> None:
    facts = AssumedFacts.model_validate(yaml.safe_load(FACTS.read_text()))
    config = UpstreamConfig.model_validate({"base_url": openimis["fhir_base_url"].rstrip("/") + "/",
                                            "login": {"username_env": "OPENIMIS_USERNAME",
                                                      "password_env": "OPENIMIS_PASSWORD"}})
    upstream = OpenImisUpstream("openimis", config, "https://mediator.example.org/fhir/")
    await upstream.start()
    try:
        real = await UpstreamFacilityDirectory(upstream, 300, 0, 100, 30).snapshot()
    finally:
        await upstream.close()
    assumed = facts.snapshot()
    checked = 0
    for code, facility in facts.facilities.items():
        # The uuid the offline claim index names the facility by is the one openIMIS's index filters by.
        assert (code, real.uuid_of_facility(code)) == (code, assumed.uuid_of_facility(code))
        for key in (code, *facility.keys):
            assert (key, real.facility_of_organization(key)) == (key, code)
            assert assumed.facility_of_organization(key) == code
            checked += 1
        for admin in facility.claim_admins:
            assert (admin, real.facility_of_claim_administrator(admin)) == (admin, code)
            assert (admin, real.facility_of_practitioner(admin)) == (admin, code)
            assert assumed.facility_of_claim_administrator(admin) == code
            checked += 1
        for key in facility.claim_admin_keys:
            assert (key, real.facility_of_practitioner(key)) == (key, code)
            checked += 1
    assert checked >= 8
