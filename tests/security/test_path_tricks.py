"""Path confusion sent as raw bytes (no client library normalises them): every variant that tries to
step out of the one allowed channel (GET Medication) towards Claim, Patient or openIMIS's login is
refused before matching, and nothing reaches openIMIS."""

from __future__ import annotations

import pytest

from tests.rawhttp import exchange, request
from tests.security.conftest import Target, assert_refused

ATTACKS = [
    # dot segments, plain and encoded
    ("/fhir/Medication/../Claim/", 400),
    ("/fhir/Medication/./", 400),
    ("/fhir/./Medication/", 400),
    ("/fhir/Medication/%2e%2e/Claim/", 400),
    ("/fhir/Medication/%2E%2E/Claim/", 400),
    ("/fhir/Medication/.%2e/Claim/", 400),
    # encoded slashes and backslashes
    ("/fhir/Medication%2F..%2FClaim/", 400),
    ("/fhir/Medication/x%2F..%2F..%2Flogin/", 400),
    ("/fhir/Medication/x%5C..%5CClaim", 400),
    ("/fhir/Medication\\..\\Claim", 400),
    # double encoding: %25 is '%', so %252e becomes %2e after one more decode (as Django would do)
    ("/fhir/Medication/%252e%252e/Claim/", 400),
    ("/fhir/Medication/%252F..%252FClaim", 400),
    ("/fhir/Medication/%25252e", 400),
    # overlong UTF-8 for '.' and '/' (CWE-172): not a valid id, never decoded into a separator
    ("/fhir/Medication/%c0%ae%c0%ae/Claim/", 400),
    ("/fhir/Medication/%c0%af..%c0%afClaim", 400),
    ("/fhir/Medication/%e0%80%ae%e0%80%ae/Claim", 400),
    # ';' path parameters (Tomcat/Spring style) to hide segments from a matcher
    ("/fhir/Medication;x=1/", 400),
    ("/fhir/Medication/..;/Claim/", 400),
    ("/fhir/Medication/1;jsessionid=abc", 400),
    ("/fhir/Claim;/Medication/", 400),
    # NUL and empty segments
    ("/fhir/Medication/%00", 400),
    ("/fhir//Medication/", 400),
    ("/fhir/Medication//Claim", 400),
    # case: resource types are case-sensitive FHIR names; the public base path is case-sensitive too
    ("/FHIR/Medication/", 404),
    ("/fhir/medication/", 400),
    ("/fhir/MEDICATION/", 404),
    ("/Fhir/Claim/", 404),
    # outside the public base altogether, including openIMIS's own paths
    ("/api/api_fhir_r4/Medication/", 404),
    ("/api/api_fhir_r4/login/", 404),
    ("/fhir/../api/api_fhir_r4/Claim/", 400),
    # channels that exist for other methods or resources stay closed to tricks aimed at them
    ("/fhir/Medication/%2e%2e/Patient/", 400),
]


@pytest.mark.parametrize(("target_path", "status"), ATTACKS, ids=[a[0] for a in ATTACKS])
async def test_path_trick_is_refused_and_nothing_reaches_openimis(target: Target, target_path: str,
                                                                  status: int) -> None:
    response = await exchange(target.host, target.port, request("GET", target_path))
    assert_refused(response, target, status)


@pytest.mark.parametrize("method", ["DELETE", "PUT", "PATCH"])
async def test_write_through_dot_segments_to_a_protected_resource_is_refused(target: Target, method: str) -> None:
    path = "/fhir/Medication/%2e%2e/CoverageEligibilityRequest/1"
    response = await exchange(target.host, target.port, request(method, path, {"Content-Type": "application/json"},
                                                               b'{"resourceType":"CoverageEligibilityRequest"}'))
    assert_refused(response, target, (400, 405))


async def test_plain_request_on_the_same_socket_path_reaches_openimis(target: Target) -> None:
    # The control: the harness can see a forwarded request, so the refusals above are real.
    response = await exchange(target.host, target.port, request("GET", "/fhir/Medication/"))
    assert response.status == 200
    assert any(r["path"] == "/api/api_fhir_r4/Medication/" for r in target.forwarded())
