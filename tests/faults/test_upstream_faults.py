"""openIMIS misbehaving, over real sockets: down, silent, slow, answering garbage (non-JSON under a JSON
content type, HTML error pages, truncated bodies, a wrong Content-Length, a reset mid-body). Each gets a
declared outcome: 502 `upstream.unavailable` / `upstream.invalid_answer` or 504 `upstream.timeout`, as an
OperationOutcome. Nothing is lost: the mediator keeps serving, and a claim is never sent twice.

The upstream here is a scripted raw-socket server (a fake, because real openIMIS cannot be made to fail
on demand); it logs in like openIMIS and then does what the test says.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from mediator.app import build_app, handler_args
from mediator.config import load_config
from tests.conftest import channels_yaml, write_config
from tests.rawhttp import exchange, request

Behaviour = Callable[[asyncio.StreamWriter], Awaitable[None]]
BUNDLE = json.dumps({"resourceType": "Bundle", "type": "searchset", "total": 0}).encode()


def answer(status: str, body: bytes, content_type: str = "application/json", length: int | None = None) -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n\r\n").encode() + body


class ScriptedUpstream:
    def __init__(self) -> None:
        self.behaviour: Behaviour = self.ok
        self.requests: list[tuple[str, str]] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def ok(self, writer: asyncio.StreamWriter) -> None:
        writer.write(answer("200 OK", BUNDLE))

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, path = head.split(b" ")[:2]
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                if path.endswith(b"/login/"):
                    writer.write(answer("200 OK", json.dumps({"token": "t", "exp": 4102444800}).encode()))
                    continue
                self.requests.append((method.decode(), path.decode()))
                await self.behaviour(writer)
                if writer.is_closing():
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/api_fhir_r4/"


@pytest.fixture
async def upstream() -> AsyncIterator[ScriptedUpstream]:
    scripted = ScriptedUpstream()
    scripted.server = await asyncio.start_server(scripted.handle, "127.0.0.1", 0)
    scripted.port = scripted.server.sockets[0].getsockname()[1]
    yield scripted
    scripted.server.close()
    await scripted.server.wait_closed()


CHANNELS = """\
  - name: master-data
    path: ^/fhir/Medication(/[^/]+)?/?$
    methods: [GET]
    upstream: openimis
    timeout_s: 0.5
    ip_allowlist: [local]
    authentication: none
  - name: claims
    path: ^/fhir/Claim/?$
    methods: [POST]
    upstream: openimis
    timeout_s: 0.5
    ip_allowlist: [local]
    authentication: none
"""


@pytest.fixture
async def mediator_at(tmp_path: Path, aiohttp_server: Callable[..., Awaitable[object]]) \
        -> Callable[[str], Awaitable[tuple[str, int]]]:
    async def start(upstream_url: str) -> tuple[str, int]:
        config = load_config(write_config(tmp_path / "config", channels_yaml(upstream_url, channels=CHANNELS)))
        server = await aiohttp_server(build_app(config), **handler_args(config))
        return server.host, server.port  # type: ignore[attr-defined]
    return start


async def get_medication(address: tuple[str, int]):  # type: ignore[no-untyped-def]
    return await exchange(*address, request("GET", "/fhir/Medication/"))


def assert_outcome(response, status: int, reason: str) -> None:  # type: ignore[no-untyped-def]
    assert response.status == status, response.body[:300]
    assert response.headers["content-type"].startswith("application/fhir+json")
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["details"]["coding"][0]["code"] == reason


async def test_upstream_down_is_502(mediator_at) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = await mediator_at(f"http://127.0.0.1:{port}/api/api_fhir_r4/")
    assert_outcome(await get_medication(address), 502, "upstream.unavailable")


async def never_answers(writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(30)


async def answers_slowly(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
    for _ in range(30):
        await asyncio.sleep(0.1)
        writer.write(b" ")


async def non_json_under_json_type(writer: asyncio.StreamWriter) -> None:
    writer.write(answer("200 OK", b"<html><body>Server Error</body></html>"))


async def html_error_page(writer: asyncio.StreamWriter) -> None:
    writer.write(answer("500 Internal Server Error", b"<h1>Server Error (500)</h1>", "text/html"))


async def deeply_nested_json(writer: asyncio.StreamWriter) -> None:
    writer.write(answer("200 OK", b"[" * 50_000 + b"]" * 50_000))


async def truncated_body(writer: asyncio.StreamWriter) -> None:
    writer.write(answer("200 OK", BUNDLE[:10], length=len(BUNDLE)))
    await writer.drain()
    writer.close()


async def short_content_length(writer: asyncio.StreamWriter) -> None:
    # Says 10 bytes, sends the whole Bundle: the client reads a cut JSON and the rest is junk on the wire.
    writer.write(answer("200 OK", BUNDLE, length=10))


async def reset_mid_body(writer: asyncio.StreamWriter) -> None:
    writer.write(answer("200 OK", BUNDLE[:10], length=len(BUNDLE)))
    await writer.drain()
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close → RST
    writer.transport.abort()


async def closes_without_answer(writer: asyncio.StreamWriter) -> None:
    writer.close()


async def chunked_never_finished(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"5\r\n{\"a\":\r\n")
    await writer.drain()
    writer.close()


FAULTS = [
    (never_answers, 504, "upstream.timeout"),
    (answers_slowly, 504, "upstream.timeout"),
    (non_json_under_json_type, 502, "upstream.invalid_answer"),
    (html_error_page, 502, "upstream.invalid_answer"),
    (deeply_nested_json, 502, "upstream.invalid_answer"),
    (truncated_body, 502, "upstream.unavailable"),
    (short_content_length, 502, "upstream.unavailable"),  # ClientResponseError: junk after the message
    (reset_mid_body, 502, "upstream.unavailable"),
    (closes_without_answer, 502, "upstream.unavailable"),
    (chunked_never_finished, 502, "upstream.unavailable"),
]


@pytest.mark.parametrize(("behaviour", "status", "reason"), FAULTS, ids=[f[0].__name__ for f in FAULTS])
async def test_misbehaving_upstream_gets_a_declared_outcome_and_the_mediator_recovers(
        upstream: ScriptedUpstream, mediator_at, behaviour: Behaviour, status: int,  # type: ignore[no-untyped-def]
        reason: str) -> None:
    address = await mediator_at(upstream.url)
    upstream.behaviour = behaviour
    assert_outcome(await get_medication(address), status, reason)
    # Nothing lost: once openIMIS behaves again, the very next request goes through.
    upstream.behaviour = upstream.ok
    response = await get_medication(address)
    assert response.status == 200 and response.json()["resourceType"] == "Bundle"


@pytest.mark.parametrize(("behaviour", "status", "reason"),
                         [(reset_mid_body, 502, "upstream.unavailable"), (never_answers, 504, "upstream.timeout"),
                          (closes_without_answer, 502, "upstream.unavailable")],
                         ids=["reset", "timeout", "closed"])
async def test_failed_claim_submission_is_sent_exactly_once(
        upstream: ScriptedUpstream, mediator_at, behaviour: Behaviour, status: int,  # type: ignore[no-untyped-def]
        reason: str) -> None:
    # A POST that may have been processed must not be repeated behind the caller's back (double claim).
    address = await mediator_at(upstream.url)
    upstream.behaviour = behaviour
    response = await exchange(*address, request("POST", "/fhir/Claim/", {"Content-Type": "application/json"},
                                                b'{"resourceType":"Claim"}'))
    assert_outcome(response, status, reason)
    await asyncio.sleep(0.1)
    assert [r for r in upstream.requests if r[0] == "POST"] == [("POST", "/api/api_fhir_r4/Claim/")]


async def test_many_concurrent_requests_during_an_outage_all_get_an_answer(
        upstream: ScriptedUpstream, mediator_at) -> None:  # type: ignore[no-untyped-def]
    address = await mediator_at(upstream.url)
    upstream.behaviour = reset_mid_body
    responses = await asyncio.gather(*(get_medication(address) for _ in range(40)))
    assert [r.status for r in responses] == [502] * 40
    upstream.behaviour = upstream.ok
    # 40 failures in a row open the circuit breaker (upstream.circuit_breaker): the next request is
    # answered at once with 503 + Retry-After instead of loading a recovering openIMIS.
    after = await get_medication(address)
    assert after.status == 503
    assert after.headers["retry-after"]
    assert b"upstream.circuit_open" in after.body
