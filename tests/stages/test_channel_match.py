import re

import pytest

from mediator.config.models import ChannelConfig
from mediator.stages.channel_match import Channel, ChannelTable, decide
from tests.conftest import OPEN_CAPABILITIES_CHANNEL, channels_yaml, upstream_url


def _channel(name, path, methods, **kw):
    config = ChannelConfig(name=name, path=path, methods=methods, upstream="openimis", **kw)
    return Channel(config, re.compile(path))


TABLE = ChannelTable(
    "/fhir/",
    (
        _channel("claims", r"^/fhir/Claim(/[^/]+)?/?$", ["GET", "POST"]),
        _channel("eligibility", r"^/fhir/CoverageEligibilityRequest(/[^/]+)?/?$", ["POST", "DELETE"]),
        _channel("coverage-admin", r"^/fhir/Coverage(/[^/]+)?/?$", ["PUT"], allow_protected_writes=True),
    ),
    frozenset({"CoverageEligibilityRequest", "Coverage", "Contract"}),
)


@pytest.mark.parametrize(
    ("method", "path", "reason", "status", "channel"),
    [
        ("GET", "/fhir/Claim/", "channel.matched", 200, "claims"),
        ("GET", "/fhir/Claim/abc-1", "channel.matched", 200, "claims"),
        ("POST", "/fhir/Claim", "channel.matched", 200, "claims"),
        ("DELETE", "/fhir/Claim/abc", "channel.method_not_allowed", 405, None),
        ("GET", "/fhir/Patient/", "channel.none", 404, None),
        ("GET", "/other/Claim/", "channel.none", 404, None),
        ("GET", "/fhirClaim/", "channel.none", 404, None),
        # openIMIS would delete the insuree: refused even though the channel lists DELETE.
        ("DELETE", "/fhir/CoverageEligibilityRequest/x1", "channel.protected_resource", 403, "eligibility"),
        ("POST", "/fhir/CoverageEligibilityRequest", "channel.matched", 200, "eligibility"),
        ("PUT", "/fhir/Coverage/x1", "channel.matched", 200, "coverage-admin"),
        ("GET", "/fhir/Claim/a/b/c", "channel.malformed_path", 400, None),
        ("GET", "/fhir/claim/", "channel.malformed_path", 400, None),
        ("GET", "/fhir/Claim/<script>", "channel.malformed_path", 400, None),
        ("TRACE", "/fhir/Claim/", "channel.method_not_allowed", 405, None),
        ("PROPFIND", "/fhir/Claim/", "channel.method_not_allowed", 405, None),
    ],
)
def test_channel_decisions(method, path, reason, status, channel):
    match = decide(method, path, path, TABLE)
    assert match.decision.reason == reason
    assert match.decision.status == status
    assert (match.channel.name if match.channel else None) == channel


@pytest.mark.parametrize(
    "raw_path",
    ["/fhir/Claim/%2e%2e/Patient", "/fhir/Claim%2FPatient", "/fhir/Claim/%252e", "/fhir/Claim/../Patient",
     "/fhir//Claim", "/fhir/Claim/a%5cb", "/fhir/Claim/a%00"],
)
def test_path_tricks_are_400(raw_path):
    match = decide("GET", raw_path, raw_path, TABLE)
    assert match.decision.status == 400
    assert match.decision.reason == "channel.malformed_path"


def test_method_not_allowed_lists_allowed_methods():
    match = decide("PATCH", "/fhir/Claim/1", "/fhir/Claim/1", TABLE)
    assert match.decision.headers["Allow"] == "GET, POST"


async def test_no_channel_never_reaches_openimis(sandbox, sandbox_server, make_mediator):
    client = await make_mediator(channels_yaml(upstream_url(sandbox_server)))
    for method, path in [("GET", "/fhir/Contract/"), ("DELETE", "/fhir/Claim/1"), ("GET", "/admin/"),
                         ("GET", "/fhir/Claim/..%2fPatient")]:
        response = await client.request(method, path)
        assert response.status in (400, 404, 405), path
        assert (await response.json())["resourceType"] == "OperationOutcome"
    assert sandbox.requests == []


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
async def test_metadata_is_read_only_405_with_allow(sandbox, sandbox_server, make_mediator, method):
    client = await make_mediator(channels_yaml(upstream_url(sandbox_server), channels=OPEN_CAPABILITIES_CHANNEL))
    response = await client.request(method, "/fhir/metadata", data=b"{}",
                                    headers={"Content-Type": "application/fhir+json"})
    assert response.status == 405
    assert response.headers["Allow"] == "GET"
    outcome = await response.json()
    assert outcome["issue"][0]["details"]["coding"][0]["code"] == "channel.method_not_allowed"
    assert sandbox.requests == []
