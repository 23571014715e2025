"""Request smuggling (CWE-444): framing a proxy and its upstream could read differently. Each payload
hides a second request (GET /fhir/Medication/, which would be forwarded if parsed) behind ambiguous
framing. aiohttp's strict parser must refuse the message; nothing may reach openIMIS and no second
response may come back on the connection."""

from __future__ import annotations

import pytest

from tests.rawhttp import exchange
from tests.security.conftest import Target, assert_refused

SMUGGLED = b"GET /fhir/Medication/ HTTP/1.1\r\nHost: mediator.test\r\n\r\n"
CLAIM = b'{"resourceType":"Claim"}'


def _head(*lines: str) -> bytes:
    return ("\r\n".join(("POST /fhir/Claim/ HTTP/1.1", "Host: mediator.test",
                         "Content-Type: application/json", *lines)) + "\r\n\r\n").encode()


PAYLOADS = {
    "duplicate content-length, different values":
        _head("Content-Length: 24", f"Content-Length: {24 + len(SMUGGLED)}") + CLAIM + SMUGGLED,
    "duplicate content-length, same value":
        _head("Content-Length: 24", "Content-Length: 24") + CLAIM,
    "content-length list":
        _head("Content-Length: 24, 24") + CLAIM,
    "content-length with sign":
        _head("Content-Length: +24") + CLAIM,
    "content-length and transfer-encoding (CL.TE)":
        _head(f"Content-Length: {5 + len(SMUGGLED)}", "Transfer-Encoding: chunked") + b"0\r\n\r\n" + SMUGGLED,
    "transfer-encoding: chunked, identity":
        _head("Transfer-Encoding: chunked, identity") + b"0\r\n\r\n" + SMUGGLED,
    "transfer-encoding: identity, chunked plus content-length":
        _head("Transfer-Encoding: identity, chunked", "Content-Length: 5") + b"0\r\n\r\n" + SMUGGLED,
    "transfer-encoding twice":
        _head("Transfer-Encoding: chunked", "Transfer-Encoding: identity") + b"0\r\n\r\n" + SMUGGLED,
    "transfer-encoding: xchunked":
        _head("Transfer-Encoding: xchunked", "Content-Length: 5") + b"0\r\n\r\n" + SMUGGLED,
    "space before colon in transfer-encoding":
        _head("Transfer-Encoding : chunked", "Content-Length: 5") + b"0\r\n\r\n" + SMUGGLED,
    "obs-fold continuing transfer-encoding":
        _head("Transfer-Encoding: identity", " chunked", "Content-Length: 5") + b"0\r\n\r\n" + SMUGGLED,
    "obs-fold in any header":
        _head("Content-Length: 24", "X-Note: a", "\tb") + CLAIM,
    "bare LF line endings":
        b"POST /fhir/Claim/ HTTP/1.1\nHost: mediator.test\nContent-Type: application/json\nContent-Length: 24\n\n"
        + CLAIM,
    "bare CR in a header":
        _head("Content-Length: 24", "X-Note: a\rb") + CLAIM,
    "chunk size with garbage":
        _head("Transfer-Encoding: chunked") + b"5x\r\nhello\r\n0\r\n\r\n" + SMUGGLED,
    "negative chunk size":
        _head("Transfer-Encoding: chunked") + b"-1\r\n\r\n0\r\n\r\n",
    "NUL in header value":
        _head("Content-Length: 24", "X-Note: a\x00b") + CLAIM,
    "HTTP/1.0 with transfer-encoding":
        b"POST /fhir/Claim/ HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
}


@pytest.mark.parametrize("name", list(PAYLOADS))
async def test_ambiguous_framing_is_refused_and_nothing_is_smuggled(target: Target, name: str) -> None:
    response = await exchange(target.host, target.port, PAYLOADS[name], linger_s=0.2)
    assert_refused(response, target, 400)


async def test_request_line_with_absolute_form_cannot_pick_the_upstream_host(target: Target) -> None:
    # RFC 9112 §3.2.2 absolute-form: the authority in the target must not choose where we forward to.
    payload = b"GET http://127.0.0.1:1/api/api_fhir_r4/login/ HTTP/1.1\r\nHost: mediator.test\r\n\r\n"
    response = await exchange(target.host, target.port, payload)
    assert_refused(response, target, (400, 404))


async def test_oversize_header_is_refused_by_the_parser(target: Target) -> None:
    payload = b"GET /fhir/Medication/ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n"
    response = await exchange(target.host, target.port, payload)
    assert_refused(response, target, (400, 431))


async def test_too_many_headers_are_refused_by_the_parser(target: Target) -> None:
    headers = "".join(f"X-H{i}: v\r\n" for i in range(150)).encode()
    payload = b"GET /fhir/Medication/ HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n"
    response = await exchange(target.host, target.port, payload)
    assert_refused(response, target, (400, 431))
