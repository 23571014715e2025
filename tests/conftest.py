"""Shared fixtures: configuration directories written per test, the openIMIS stand-in on a real
socket, and the mediator in front of it on another real socket."""

from __future__ import annotations

import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from mediator.app import build_app
from mediator.config import Config, load_config
from mediator.errors import ConfigError
from mediator.sandbox import OpenImisSandbox, build_sandbox_app

SANDBOX_USER = {"OPENIMIS_USERNAME": "Admin", "OPENIMIS_PASSWORD": "admin123"}

DEFAULT_IP_POLICY = """\
version: 1
trusted_proxies: []
unlisted_channels: deny
ip_sets:
  local:
    allow: ["127.0.0.0/8", "::1/128"]
"""


OPEN_CAPABILITIES_CHANNEL = """\
- name: capabilities
  path: ^/fhir/metadata/?$
  methods: [GET]
  upstream: openimis
  ip_allowlist: [local]
  authentication: none
"""
"""The capabilities channel (GET /fhir/metadata, no authentication) as tests write it, indented as a
channels list at column 0 (channels_yaml dedents what it is given)."""


def channels_yaml(upstream: str, *, extra_server: str = "", channels: str | None = None) -> str:
    if channels is None:
        channels = """\
          - name: master-data
            path: ^/fhir/(ActivityDefinition|Medication|Location|Organization)(/[^/]+)?/?$
            methods: [GET]
            upstream: openimis
            ip_allowlist: [local]
            authentication: none
          - name: eligibility
            path: ^/fhir/(Patient(/[^/]+)?|CoverageEligibilityRequest)/?$
            methods: [GET, POST]
            upstream: openimis
            ip_allowlist: [local]
            authentication: none
          - name: claims
            path: ^/fhir/(Claim|ClaimResponse)(/[^/]+)?/?$
            methods: [GET, POST]
            upstream: openimis
            timeout_s: 2
            ip_allowlist: [local]
            authentication: none
        """
    server = textwrap.indent(textwrap.dedent(extra_server), "  ")
    return (
        "version: 1\n"
        "server:\n"
        "  public_base_url: https://mediator.example.org/fhir/\n"
        "  limits:\n"
        "    max_body_bytes: 65536\n"
        f"{server}"
        "upstreams:\n"
        "  openimis:\n"
        f"    base_url: {upstream}\n"
        "    connect_timeout_s: 1\n"
        "    login:\n"
        "      username_env: OPENIMIS_USERNAME\n"
        "      password_env: OPENIMIS_PASSWORD\n"
        "channels:\n"
    ) + textwrap.indent(textwrap.dedent(channels), "  ")


SHIPPED_WRITE_PROFILES = (Path(__file__).parents[1] / "policies" / "write_profiles.yaml").read_text()
"""The repository's policies/write_profiles.yaml: what tests with their own authorization policy run with."""

_ANY_CLAIM_ELEMENT = (
    "id meta implicitRules language text extension modifierExtension identifier status type subType use patient "
    "billablePeriod created enterer insurer provider priority fundsReserve related prescription "
    "originalPrescription payee referral facility careTeam supportingInfo diagnosis procedure insurance "
    "accident item total purpose servicedDate servicedPeriod name gender birthDate note").split()
ACCEPT_TEST_WRITES = "# For tests of the other stages only: any element (never contained) of these types.\n" \
    "version: 1\nprofiles:\n" + "".join(
        f"  {kind}:\n    interactions: [create, update]\n    elements:\n"
        + "".join(f"      {name}: any\n" for name in _ANY_CLAIM_ELEMENT)
        for kind in ("Claim", "CoverageEligibilityRequest", "Patient"))
"""Paired with ALLOW_ALL_AUTHORIZATION: the write firewall of tests that are about other stages."""


ALLOW_ALL_AUTHORIZATION = """\
# For tests of the other stages only: an absent authorization policy denies everything, so they say
# explicitly that every role they use may do anything (no facility check).
version: 1
facility_directory: {upstream: openimis}
rules:
  - name: tests-allow-everything
    roles: [anonymous, hms, claim-admin, claim_administrator]
    permissions: [system/*.cruds]
    facility_scope: any
"""


def write_config(root: Path, channels: str, ip_policy: str = DEFAULT_IP_POLICY,
                 extra_policies: dict[str, str | None] | None = None) -> Path:
    """`extra_policies`: file name → text; without "authorization.yaml" an allow-everything policy is
    written (ALLOW_ALL_AUTHORIZATION; needs an upstream named openimis) with ACCEPT_TEST_WRITES as the
    write profiles; {"authorization.yaml": None} writes none (to test the absent policy). With a test's
    own authorization policy, the shipped write profiles unless it gives its own (None: none)."""
    (root / "policies").mkdir(parents=True, exist_ok=True)
    (root / "channels.yaml").write_text(channels)
    (root / "policies" / "ip_allowlist.yaml").write_text(ip_policy)
    policies = dict(extra_policies or {})
    if "authorization.yaml" not in policies and "\n  openimis:\n" in channels:
        policies["authorization.yaml"] = ALLOW_ALL_AUTHORIZATION
        policies.setdefault("write_profiles.yaml", ACCEPT_TEST_WRITES)
    if policies.get("authorization.yaml") is not None:
        policies.setdefault("write_profiles.yaml", SHIPPED_WRITE_PROFILES)
    for name, text in policies.items():
        if text is not None:
            (root / "policies" / name).write_text(text)
    return root


@pytest.fixture(autouse=True)
def _openimis_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in SANDBOX_USER.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def sandbox() -> OpenImisSandbox:
    return OpenImisSandbox()


@pytest.fixture
async def sandbox_server(sandbox: OpenImisSandbox,
                         aiohttp_server: Callable[..., Awaitable[TestServer]]) -> TestServer:
    return await aiohttp_server(build_sandbox_app(sandbox))


def upstream_url(server: TestServer) -> str:
    return f"http://{server.host}:{server.port}/api/api_fhir_r4/"


MediatorFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
def make_mediator(tmp_path: Path, aiohttp_client: Any) -> MediatorFactory:
    """Build a mediator from config text and return a test client talking to it over a socket."""

    async def factory(channels: str, ip_policy: str = DEFAULT_IP_POLICY,
                      extra_policies: dict[str, str | None] | None = None, **client_kwargs: Any):
        root = write_config(tmp_path / "config", channels, ip_policy, extra_policies)
        config = load_config(root)
        return await aiohttp_client(build_app(config), **client_kwargs)

    return factory


@pytest.fixture
async def mediator(sandbox_server: TestServer, make_mediator: MediatorFactory):
    return await make_mediator(channels_yaml(upstream_url(sandbox_server)))


def loaded(root: Path) -> Config:
    return load_config(root)


def config_problems(root: Path) -> list[str]:
    """The `file:line:col: message` lines a configuration directory is refused with (it must be)."""
    with pytest.raises(ConfigError) as info:
        load_config(root)
    return [str(p) for p in info.value.problems]
