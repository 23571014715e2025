"""Bodies that try to exhaust the mediator or confuse openIMIS: oversize (declared and chunked), slow
(slowloris on headers and on bodies), malformed JSON and FHIR, huge and deeply nested documents. Each is
refused with a declared reason before anything reaches openIMIS."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.rawhttp import ConnectionClosed, exchange, read_response, request
from tests.security.conftest import Target, assert_refused

JSON = {"Content-Type": "application/json"}


def post_claim(body: bytes, headers: dict[str, str] | None = None) -> bytes:
    return request("POST", "/fhir/Claim/", headers if headers is not None else JSON, body)


async def test_declared_oversize_body_is_413_before_it_is_read(target: Target) -> None:
    head = request("POST", "/fhir/Claim/", {**JSON, "Content-Length": str(50 * 1_048_576)})
    # Only the head is sent: the answer cannot depend on reading 50 MiB.
    response = await exchange(target.host, target.port, head)
    assert_refused(response, target, 413, "request.body_too_large")


async def test_chunked_oversize_body_is_413_while_reading(target: Target) -> None:
    chunk = b"a" * 16384
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(6)) + b"0\r\n\r\n"
    response = await exchange(target.host, target.port,
                              request("POST", "/fhir/Claim/", {**JSON, "Transfer-Encoding": "chunked"}) + body)
    assert_refused(response, target, 413, "request.body_too_large")


async def test_body_that_stops_arriving_is_408_after_the_body_read_timeout(target: Target) -> None:
    head = request("POST", "/fhir/Claim/", {**JSON, "Content-Length": "1000"})
    response = await exchange(target.host, target.port, head + b'{"resourceType":')
    assert_refused(response, target, 408, "request.body_timeout")
    assert response.headers.get("connection", "").lower() == "close"


async def test_body_trickled_in_small_chunks_is_cut_off_by_the_whole_body_deadline(target: Target) -> None:
    # Each chunk arrives well within any per-read timeout; only a deadline on the whole body stops this.
    reader, writer = await asyncio.open_connection(target.host, target.port)

    async def trickle() -> None:
        writer.write(request("POST", "/fhir/Claim/", {**JSON, "Transfer-Encoding": "chunked"}))
        try:
            for _ in range(100):
                writer.write(b"1\r\n \r\n")
                await writer.drain()
                await asyncio.sleep(0.05)
        except ConnectionError:
            pass

    sender = asyncio.create_task(trickle())
    try:
        response = await asyncio.wait_for(read_response(reader), 10)
    finally:
        sender.cancel()
        writer.close()
    assert_refused(response, target, 408, "request.body_timeout")


async def test_headers_that_never_finish_get_the_connection_closed(target: Target) -> None:
    reader, writer = await asyncio.open_connection(target.host, target.port)
    try:
        writer.write(b"GET /fhir/Medication/ HTTP/1.1\r\nHost: mediator.test\r\nX-Slow: a")
        await writer.drain()
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(read_response(reader), 10)
    finally:
        writer.close()
    assert target.forwarded() == []


async def test_idle_connection_without_any_request_is_closed(target: Target) -> None:
    reader, writer = await asyncio.open_connection(target.host, target.port)
    try:
        assert await asyncio.wait_for(reader.read(1), 10) == b""
    finally:
        writer.close()


MALFORMED = [
    (b'{"resourceType": "Claim"', JSON, 400, "request.malformed_json"),
    (b"\xff\xfe{}", JSON, 400, "request.malformed_json"),
    (b"", {**JSON, "Content-Length": "0"}, 400, "request.malformed_json"),
    (b"[]", JSON, 400, "request.not_a_resource"),
    (b'"Claim"', JSON, 400, "request.not_a_resource"),
    (b'{"id": "1"}', JSON, 400, "request.not_a_resource"),
    (b'{"resourceType": 7}', JSON, 400, "request.not_a_resource"),
    (b'{"resourceType": "Patient"}', JSON, 400, "request.resource_type_mismatch"),
    (b'{"resourceType": "Claim"}', {"Content-Type": "text/plain"}, 415, "request.unsupported_media_type"),
    (b'{"resourceType": "Claim"}', {"Content-Type": "application/xml"}, 415, "request.unsupported_media_type"),
    (b'{"resourceType": "Claim"}', {}, 415, "request.unsupported_media_type"),
]


@pytest.mark.parametrize(("body", "headers", "status", "reason"), MALFORMED,
                         ids=[m[3] + ":" + m[0][:20].decode("latin-1") for m in MALFORMED])
async def test_malformed_body_is_refused(target: Target, body: bytes, headers: dict[str, str], status: int,
                                         reason: str) -> None:
    response = await exchange(target.host, target.port, post_claim(body, headers))
    assert_refused(response, target, status, reason)


def nested(depth: int) -> bytes:
    return b'{"resourceType":"Claim","extension":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


@pytest.mark.parametrize("depth", [33, 200, 30_000], ids=["just-over-limit", "deep", "beyond-python-recursion"])
async def test_deeply_nested_body_is_refused(target: Target, depth: int) -> None:
    response = await exchange(target.host, target.port, post_claim(nested(depth)))
    assert_refused(response, target, 400, "request.json_too_deep")


async def test_nesting_at_the_limit_is_forwarded(target: Target) -> None:
    # The control for the depth limit: 32 levels pass and reach openIMIS.
    response = await exchange(target.host, target.port, post_claim(nested(32)))
    assert response.status not in (400, 413), response.body[:200]
    assert any(r["method"] == "POST" and r["path"] == "/api/api_fhir_r4/Claim/" for r in target.forwarded())


def bundle(entries: int) -> bytes:
    return json.dumps({"resourceType": "Bundle", "type": "batch",
                       "entry": [{"request": {"method": "GET", "url": "Medication/1"}}] * entries}).encode()


async def test_bundle_with_too_many_entries_is_413(target: Target) -> None:
    response = await exchange(target.host, target.port, post_claim(bundle(51)))
    assert_refused(response, target, 413, "request.too_many_entries")


async def test_bundle_at_the_entry_limit_is_not_refused_for_its_size(target: Target) -> None:
    # The control: 50 entries pass the entry limit; the Bundle is then refused for being posted to /Claim.
    response = await exchange(target.host, target.port, post_claim(bundle(50)))
    assert_refused(response, target, 400, "request.resource_type_mismatch")
