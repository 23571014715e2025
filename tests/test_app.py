"""The assembled pipeline over real sockets: order, limits, body checks, health endpoints."""

import asyncio
import json

import pytest

from mediator.pipeline import Decision, Exchange, Pipeline
from mediator.stages import ORDER, build_stages
from tests.conftest import channels_yaml, loaded, write_config


def test_stage_order_is_declared_once(tmp_path):
    root = write_config(tmp_path, channels_yaml("http://127.0.0.1:1/api/api_fhir_r4/"))
    names = [s.name for s in build_stages(loaded(root))]
    assert ORDER == ("client_ip", "channel", "ip", "load_shed", "authentication", "over_limit", "request",
                     "search", "lookup_charge", "authorization", "write", "rate_limit")
    assert names == [n for n in ORDER if n in names]
    assert names[:3] == ["client_ip", "channel", "ip"]


class _Stage:
    def __init__(self, name, allow, seen):
        self.name, self.allow, self.seen = name, allow, seen

    async def run(self, exchange):
        self.seen.append(self.name)
        return Decision.allowed(f"{self.name}.ok") if self.allow else Decision.denied(f"{self.name}.no", 403, "")


async def test_a_denial_stops_the_chain():
    seen: list[str] = []
    recorded = []

    class Recorder:
        def record(self, stage, decision):
            recorded.append((stage, decision.reason))

    pipeline = Pipeline([_Stage("a", True, seen), _Stage("b", False, seen), _Stage("c", True, seen)], Recorder())
    exchange = Exchange(request=None, request_id="r")  # type: ignore[arg-type]
    denial = await pipeline.run(exchange)
    assert denial is not None and denial.reason == "b.no"
    assert seen == ["a", "b"]
    assert recorded == [("a", "a.ok"), ("b", "b.no")]


def test_duplicate_stage_names_are_refused():
    with pytest.raises(ValueError):
        Pipeline([_Stage("a", True, []), _Stage("a", True, [])])


async def test_oversize_body_is_413_before_openimis(sandbox, mediator):
    big = json.dumps({"resourceType": "Claim", "note": "x" * 70000})
    response = await mediator.post("/fhir/Claim", data=big, headers={"Content-Type": "application/json"})
    assert response.status == 413
    assert (await response.json())["issue"][0]["code"] == "too-costly"
    assert not [r for r in sandbox.requests if r["path"].endswith("/Claim/")]


async def test_oversize_chunked_body_is_413(sandbox, mediator):
    async def chunks():
        yield b'{"resourceType":"Claim","note":"'
        for _ in range(20):
            yield b"x" * 8192
            await asyncio.sleep(0)
        yield b'"}'

    response = await mediator.post("/fhir/Claim", data=chunks(), headers={"Content-Type": "application/json"})
    assert response.status == 413
    assert not [r for r in sandbox.requests if r["path"].endswith("/Claim/")]


@pytest.mark.parametrize(
    ("body", "content_type", "status", "reason"),
    [
        ("{not json", "application/json", 400, "request.malformed_json"),
        ('["a"]', "application/json", 400, "request.not_a_resource"),
        ('{"resourceType": "Patient"}', "application/fhir+json", 400, "request.resource_type_mismatch"),
        ('{"resourceType": "Claim"}', "text/plain", 415, "request.unsupported_media_type"),
        ('{"resourceType": "Claim"}', "application/xml", 415, "request.unsupported_media_type"),
    ],
)
async def test_bad_bodies_get_a_clear_error_and_never_reach_openimis(sandbox, mediator, body, content_type,
                                                                       status, reason):
    from mediator.app import METRICS

    response = await mediator.post("/fhir/Claim", data=body.encode(), headers={"Content-Type": content_type})
    assert response.status == status
    assert (await response.json())["issue"][0]["details"]["coding"][0]["code"] == reason
    counted = mediator.server.app[METRICS].registry.get_sample_value(
        "mediator_requests_total", {"channel": "claims", "status": str(status), "reason": reason})
    assert counted == 1
    assert not [r for r in sandbox.requests if r["path"].endswith("/Claim/")]


async def test_every_answer_has_a_request_id(mediator):
    given = await mediator.get("/fhir/Medication/", headers={"X-Request-ID": "abcdef12-3456"})
    assert given.headers["X-Request-ID"] == "abcdef12-3456"
    made = await mediator.get("/fhir/Nothing/", headers={"X-Request-ID": "bad id\twith junk"})
    assert len(made.headers["X-Request-ID"]) == 32


async def test_liveness_on_the_public_port_readiness_only_on_the_ops_listener(mediator):
    assert (await mediator.get("/healthz")).status == 200
    assert (await mediator.get("/readyz")).status == 404   # tests/test_readiness.py: the ops listener

async def test_an_internal_error_is_a_500_outcome_and_the_server_lives_on(mediator):
    from mediator.chain import ForwardStep

    async def broken(*args, **kwargs):
        raise RuntimeError("boom")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ForwardStep, "send", broken)
        response = await mediator.get("/fhir/Medication/")
        assert response.status == 500
        outcome = await response.json()
        assert outcome["issue"][0]["details"]["coding"][0]["code"] == "mediator.internal_error"
        assert "boom" not in json.dumps(outcome)
    assert (await mediator.get("/fhir/Medication/")).status == 200


async def test_oversize_headers_are_refused_by_the_parser(mediator):
    reader, writer = await asyncio.open_connection(mediator.host, mediator.port)
    writer.write(b"GET /fhir/Medication/ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n")
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    assert status_line.split()[1] in (b"400", b"431")


async def test_duplicate_content_length_is_refused(sandbox, mediator):
    reader, writer = await asyncio.open_connection(mediator.host, mediator.port)
    writer.write(b"POST /fhir/Claim HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 2\r\nContent-Length: 30\r\n\r\n{}")
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    assert status_line.split()[1] == b"400"
    assert not [r for r in sandbox.requests if r["path"].endswith("/Claim/")]
