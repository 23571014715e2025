"""The mediator on a real socket (with the CLI's parser limits and timeouts) in front of the openIMIS
stand-in, for attacks sent as raw bytes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from mediator.app import build_app, handler_args
from mediator.config import load_config
from mediator.fhir import FHIR_JSON
from mediator.sandbox import OpenImisSandbox
from tests.conftest import channels_yaml, upstream_url, write_config
from tests.rawhttp import RawResponse

# Short timeouts so slow-client tests finish quickly; small body and Bundle limits so floods are cheap.
TEST_LIMITS = """\
    max_body_bytes: 65536
    body_read_timeout_s: 0.5
    idle_timeout_s: 1
    max_json_depth: 32
    max_bundle_entries: 50
"""


@dataclass
class Target:
    host: str
    port: int
    sandbox: OpenImisSandbox

    def forwarded(self) -> list[dict[str, object]]:
        """What reached the openIMIS stand-in (logins included)."""
        return self.sandbox.requests


@pytest.fixture
async def target(tmp_path: Path, sandbox: OpenImisSandbox, sandbox_server: TestServer,
                 aiohttp_server: Callable[..., Awaitable[TestServer]]) -> Target:
    channels = channels_yaml(upstream_url(sandbox_server)).replace("    max_body_bytes: 65536\n", TEST_LIMITS)
    config = load_config(write_config(tmp_path / "config", channels))
    server = await aiohttp_server(build_app(config), **handler_args(config))
    assert server.host is not None and server.port is not None
    return Target(server.host, server.port, sandbox)


def assert_refused(response: RawResponse, target: Target, status: int | tuple[int, ...],
                   reason: str | None = None) -> None:
    """The answer is a refusal (an OperationOutcome, or the HTTP parser's own 400) and openIMIS saw nothing."""
    statuses = status if isinstance(status, tuple) else (status,)
    assert response.status in statuses, (response.status, response.body[:300])
    if response.headers.get("content-type", "").startswith(FHIR_JSON):
        outcome = response.json()
        assert outcome["resourceType"] == "OperationOutcome"
        if reason is not None:
            assert outcome["issue"][0]["details"]["coding"][0]["code"] == reason
    else:
        # aiohttp's parser refuses before any handler runs: a plain-text 400 and a closed connection.
        assert reason is None, f"expected an OperationOutcome with {reason}, got {response.headers}"
        assert response.status == 400 and response.headers.get("content-type", "").startswith("text/plain")
    assert not response.extra.startswith(b"HTTP/"), "a second response: something was parsed as two requests"
    assert target.forwarded() == [], f"reached openIMIS: {target.forwarded()}"
