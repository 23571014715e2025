"""The request stage: one read, one parse, limits applied before the decoder recurses; later stages read
exchange.body. The refusals over raw sockets are in tests/security/test_bodies.py."""

from __future__ import annotations

import json
import sys

import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from mediator.config.models import LimitsConfig
from mediator.fhir import parse_fhir_path
from mediator.pipeline import Decision, Exchange, Pipeline
from mediator.stages import ORDER
from mediator.stages.rate_limit import request_cost
from mediator.stages.request_body import RequestBodyStage, nesting_depth_exceeds, parse_json
from tests.conftest import channels_yaml
from tests.fault_injection import Faults, faulty_sandbox_app
from tests.test_batch import CHANNELS as BATCH_CHANNELS

LIMITS = LimitsConfig(max_json_depth=32, max_bundle_entries=10)


def _exchange(method: str, path: str, body: bytes, content_type: str = "application/fhir+json") -> Exchange:
    request = make_mocked_request(method, path, headers=CIMultiDict({"Content-Type": content_type}))
    exchange = Exchange(request, "test-request", _body=body)
    exchange.fhir = parse_fhir_path(method, path.removeprefix("/fhir"))
    return exchange


def nested(depth: int) -> str:
    return '{"resourceType":"Claim","extension":' + "[" * (depth - 1) + "]" * (depth - 1) + "}"


@pytest.mark.parametrize(("text", "limit", "exceeds"), [
    ("{}", 1, False),
    ('{"a":[]}', 1, True),
    ('{"a":[]}', 2, False),
    ('{"a":"[[[[[[[[[["}', 1, False),            # brackets inside strings do not nest
    ('{"a":"\\"[[[[[["}', 1, False),              # nor after an escaped quote
    ('[[[[]]],[[[]]]]', 4, False),
    ('[[[[]]],[[[[]]]]]', 4, True),
    ('{"a":"\\\\"}', 1, False),                 # an escaped backslash does not escape the closing quote
    ('{"a":"\\\\\\"[[["}', 1, False),          # three backslashes: one escaped backslash, one escaped quote
    ('["]]]]]]]]", [[[[]]]]]', 4, True),          # closing brackets in a string cannot hide real depth
    ("[" * 100_000, 32, True),
])
def test_nesting_depth_is_measured_outside_strings(text: str, limit: int, exceeds: bool) -> None:
    assert nesting_depth_exceeds(text, limit) is exceeds


@pytest.mark.parametrize(("body", "reason", "status"), [
    (b"{", "request.malformed_json", 400),
    (b'{"resourceType":"Claim"}\xff', "request.malformed_json", 400),
    ('{"resourceType":"Claim"}'.encode("utf-16"), "request.malformed_json", 400),   # UTF-8 only
    (b'{"resourceType":"Claim","provider":{},"provider":{"reference":"Organization/x"}}',
     "request.duplicate_key", 400),
    (nested(33).encode(), "request.json_too_deep", 400),
    (nested(sys.getrecursionlimit() * 3).encode(), "request.json_too_deep", 400),
    (json.dumps({"resourceType": "Bundle", "entry": [{}] * 11}).encode(), "request.too_many_entries", 413),
])
def test_parse_refusals(body: bytes, reason: str, status: int) -> None:
    document, refusal = parse_json(body, LIMITS)
    assert document is None and refusal is not None
    assert (refusal.reason, refusal.status) == (reason, status)


def test_parse_keeps_the_document_at_the_limits() -> None:
    document, refusal = parse_json(nested(32).encode(), LIMITS)
    assert refusal is None and document["resourceType"] == "Claim"
    bundle, refusal = parse_json(json.dumps({"resourceType": "Bundle", "entry": [{}] * 10}).encode(), LIMITS)
    assert refusal is None and len(bundle["entry"]) == 10


@pytest.mark.parametrize(("method", "path", "body", "content_type", "reason"), [
    ("POST", "/fhir/Claim", b'{"resourceType":"Claim"}', "text/plain", "request.unsupported_media_type"),
    ("POST", "/fhir/Claim", b"[1]", "application/json", "request.not_a_resource"),
    ("POST", "/fhir/Claim", b'{"resourceType":"Patient"}', "application/json", "request.resource_type_mismatch"),
    ("PUT", "/fhir/Claim/a", b'{"resourceType":"Claim","id":"b"}', "application/json", "request.id_mismatch"),
])
async def test_stage_refusals(method: str, path: str, body: bytes, content_type: str, reason: str) -> None:
    exchange = _exchange(method, path, body, content_type)
    decision = await RequestBodyStage(LIMITS).run(exchange)
    assert not decision.allow and decision.reason == reason
    assert exchange.body is None


async def test_the_parsed_body_is_on_the_exchange_and_later_stages_read_it() -> None:
    raw = json.dumps({"resourceType": "Bundle", "type": "batch", "entry": [{}, {}, {}]}).encode()
    exchange = _exchange("POST", "/fhir/", raw)
    seen: list[object] = []

    class Later:
        name = "authorization"

        async def run(self, exchange: Exchange) -> Decision:
            seen.append(exchange.body)
            return Decision.allowed("authorization.ok")

    assert await Pipeline([RequestBodyStage(LIMITS), Later()]).run(exchange) is None
    assert exchange.body is not None and exchange.body.raw == raw
    assert seen == [exchange.body]
    assert request_cost(exchange) == 3   # rate_limit counts entries from the parsed document


async def test_a_deep_body_never_reaches_a_later_stage() -> None:
    exchange = _exchange("POST", "/fhir/", ('{"resourceType":"Bundle","entry":' + "[" * 50_000
                                              + "]" * 50_000 + "}").encode())
    reached: list[str] = []

    class Later:
        name = "rate_limit"

        async def run(self, exchange: Exchange) -> Decision:
            reached.append("rate_limit")
            return Decision.allowed("rate_limit.ok")

    denial = await Pipeline([RequestBodyStage(LIMITS), Later()]).run(exchange)
    assert denial is not None and denial.reason == "request.json_too_deep"
    assert reached == []


def test_request_stage_comes_after_authentication_and_before_authorization() -> None:
    assert ORDER.index("authentication") < ORDER.index("request") < ORDER.index("authorization")


async def test_a_batch_nested_beyond_recursion_is_400_through_rate_limits(sandbox, aiohttp_server, make_mediator):
    # Before the request stage, this body reached rate_limit.request_cost's json.loads first: a 500.
    faults = Faults()
    server = await aiohttp_server(faulty_sandbox_app(sandbox, faults))
    rate = ("version: 1\nlimits:\n  - name: per-client\n    per: [client]\n    rate: 5\n    period_s: 60\n"
            "    on_store_error: local\n    channels: [claims-batch]\n")
    client = await make_mediator(channels_yaml(f"http://{server.host}:{server.port}/api/api_fhir_r4/",
                                               channels=BATCH_CHANNELS), extra_policies={"rate_limits.yaml": rate})
    depth = sys.getrecursionlimit() * 3
    body = '{"resourceType":"Bundle","type":"batch","entry":' + "[" * depth + "]" * depth + "}"
    response = await client.post("/fhir/", data=body, headers={"Content-Type": "application/fhir+json"})
    assert response.status == 400
    assert (await response.json())["issue"][0]["details"]["coding"][0]["code"] == "request.json_too_deep"
    assert faults.forwarded == []
