"""Kit for the real-openIMIS tests: two HMS vendors, two health facilities, the whole pipeline.

vendor-jm speaks for Jambero District Hospital (JMHOS001), vendor-ra for Rapta District Hospital
(RAHOS001). Each proves itself with a SMART Backend Services access token (private_key_jwt) and passes
its user's identity as a signed SSO token (X-User-Token). The mediator logs in to openIMIS as its own
service user (Admin): openIMIS would let that user do anything, so every refusal below is the
mediator's own doing. Rate limits run in the real Redis.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
from joserfc import jwt
from joserfc.jwk import ECKey

from mediator.identity.client import client_assertion, token_form
from tests.conftest import DEFAULT_IP_POLICY
from tests.e2e.conftest import e2e_channels, harness

ORIGIN = "https://mediator.example.org"
BASE = f"{ORIGIN}/fhir/"
VENDORS = {"vendor-jm": "JMHOS001", "vendor-ra": "RAHOS001"}
CLAIM_ADMIN = {"JMHOS001": "JHOS0011", "RAHOS001": "RHOS0011"}

CHANNELS = """\
- name: master-data
  path: ^/fhir/(ActivityDefinition|Medication|Location|Organization)(/[^/]+)?/?$
  methods: [GET]
  upstream: openimis
  timeout_s: 30
  ip_allowlist: [local]
- name: eligibility
  path: ^/fhir/(Patient(/[^/]+)?|CoverageEligibilityRequest)/?$
  methods: [GET, POST]
  upstream: openimis
  timeout_s: 30
  ip_allowlist: [local]
- name: claims
  path: ^/fhir/Claim(/[^/]+)?/?$
  methods: [GET, POST]
  upstream: openimis
  timeout_s: 60
  ip_allowlist: [local]
  idempotency: {window_s: 600}
- name: claims-batch
  path: ^/fhir/?$
  methods: [POST]
  upstream: openimis
  timeout_s: 60
  ip_allowlist: [local]
  idempotency: {window_s: 600}
  batch: {max_entries: 10}
- name: claim-status
  path: ^/fhir/ClaimResponse(/[^/]+)?/?$
  methods: [GET]
  upstream: openimis
  timeout_s: 30
  ip_allowlist: [local]
"""


def _client(name: str, facility: str) -> str:
    return f"""\
  {name}:
    auth_methods: [private_key_jwt]
    keys: {{public_key_file: keys/{name}.pem}}
    ip_allowlist: [local]
    health_facilities: [{facility}]
    default_roles: [hms]
    scopes: [system/*.read, system/Claim.write, system/CoverageEligibilityRequest.write]
    user_token:
      required: false
      issuer: https://sso.{name}.example
      keys: {{public_key_file: keys/{name}.pem}}
      algorithms: [ES256]
      claims: {{user_id: preferred_username, roles: roles, health_facility: hf}}
"""


CLIENTS = ("version: 1\ntoken_service:\n  signing_key_file: keys/mediator-signing.key\nclients:\n"
           + "".join(_client(n, f) for n, f in VENDORS.items()))

AUTHORIZATION = """\
version: 1
facility_directory: {upstream: openimis, ttl_s: 300}
search_results: {foreign_entries: drop}
rules:
  - name: capabilities
    roles: [hms, anonymous]
    permissions: [system/CapabilityStatement.r]
  - name: master-data-read
    roles: [hms]
    permissions: [system/Medication.rs, system/ActivityDefinition.rs, system/Organization.rs, system/Location.rs]
  - name: eligibility
    roles: [claim-admin]
    permissions: ["user/Patient.s?identifier=*", user/CoverageEligibilityRequest.c]
  - name: claim-submit
    roles: [claim-admin]
    permissions: [user/Claim.c]
  - name: claim-status
    roles: [claim-admin]
    permissions: [user/ClaimResponse.rs, user/Claim.rs]
"""

RATE_LIMITS = """\
version: 1
limits:
  - name: status-polls-per-user
    per: [user]
    rate: 5
    period_s: 60
    burst: 5
    channels: [claim-status]
    on_store_error: deny
"""


class Vendor:
    origin = ORIGIN   # defaults for subclasses with their own __init__ (tests/e2e/test_async_claims_faults.py)
    base = BASE

    def __init__(self, client, name: str, key: ECKey, origin: str = ORIGIN) -> None:
        self.client, self.name, self.key = client, name, key
        self.facility = VENDORS[name]
        self.access_token = ""
        self.origin = origin
        self.base = f"{origin}/fhir/"

    def assertion(self) -> str:
        """A fresh SMART client assertion for the token endpoint."""
        return client_assertion(self.name, self.key, f"{self.origin}/auth/token")

    async def login(self) -> None:
        assertion = self.assertion()
        response = await self.client.post("/auth/token", data=token_form(
            assertion, "system/*.read system/Claim.write system/CoverageEligibilityRequest.write"))
        assert response.status == 200, await response.text()
        self.access_token = (await response.json())["access_token"]

    def user_token(self, user: str | None = None, facility: str | None = None) -> str:
        now = int(time.time())
        claims = {"iss": f"https://sso.{self.name}.example", "aud": self.base, "iat": now,
                  "exp": now + 300,
                  "preferred_username": user or CLAIM_ADMIN[self.facility], "roles": ["claim-admin"],
                  "hf": facility or self.facility, "jti": uuid.uuid4().hex}
        return jwt.encode({"alg": "ES256"}, claims, self.key)

    def headers(self, *, user: bool = True, **user_claims: str) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.access_token}"}
        if user:
            headers["X-User-Token"] = self.user_token(**user_claims)
        return headers

    async def request(self, method: str, path: str, *, user: bool = True, **kwargs):  # type: ignore[no-untyped-def]
        headers = {**self.headers(user=user), **kwargs.pop("headers", {})}
        return await self.client.request(method, path, headers=headers, **kwargs)


def _reason(outcome: dict) -> str:
    return outcome["issue"][0]["details"]["coding"][0]["code"]


def _claim_for(facility: str) -> dict:
    """The verified demo Claim, re-pointed at `facility` and its claim administrator."""
    claim = harness.claim_payload()
    hf_uuid, admin_code, admin_uuid = harness.HEALTH_FACILITIES[facility]
    text = json.dumps(claim)
    for hf, (other_uuid, other_admin, other_admin_uuid) in harness.HEALTH_FACILITIES.items():
        if hf != facility:
            text = text.replace(other_uuid, hf_uuid).replace(other_admin_uuid, admin_uuid)
            text = text.replace(f'"{hf}"', f'"{facility}"').replace(f'"{other_admin}"', f'"{admin_code}"')
    return json.loads(text)


@pytest.fixture
async def vendors(openimis, tmp_path: Path, make_mediator):
    async for result in vendor_kit(openimis, tmp_path, make_mediator):
        yield result


async def vendor_kit(openimis, tmp_path: Path, make_mediator, *, origin: str = ORIGIN,  # type: ignore[no-untyped-def]
                     channels: str = CHANNELS, **client_kwargs):
    """The two vendors in front of a mediator whose public base is `origin`/fhir/ (the `vendors` fixture:
    https://mediator.example.org). `client_kwargs` go to the test client (e.g. server_kwargs={"port": n})."""
    keys = {name: ECKey.generate_key("P-256") for name in VENDORS}
    root = tmp_path / "config"  # where make_mediator writes the configuration
    (root / "keys").mkdir(parents=True)
    for name, key in keys.items():
        (root / "keys" / f"{name}.pem").write_bytes(key.as_pem(private=False))
    prefix = f"e2e-{uuid.uuid4().hex[:8]}:"
    redis = f"redis:\n  url: redis://127.0.0.1:6379/0\n  key_prefix: \"{prefix}\"\n"
    channels_text = e2e_channels(openimis["fhir_base_url"], channels=channels, extra_server=redis)
    channels_text = channels_text.replace(f"public_base_url: {BASE}", f"public_base_url: {origin}/fhir/")
    client = await make_mediator(
        channels_text, DEFAULT_IP_POLICY,
        {"clients.yaml": CLIENTS, "authorization.yaml": AUTHORIZATION, "rate_limits.yaml": RATE_LIMITS},
        **client_kwargs)
    result = {name: Vendor(client, name, keys[name], origin) for name in VENDORS}
    for vendor in result.values():
        await vendor.login()
    yield result
    import redis.asyncio as aioredis

    store = aioredis.from_url("redis://127.0.0.1:6379/0")
    keys_left = [k async for k in store.scan_iter(f"{prefix}*")]
    if keys_left:
        await store.delete(*keys_left)
    await store.aclose()




def per_user_budget(burst: int, channels: tuple[str, ...] = ()) -> str:
    """rate_limits.yaml with one per-user limit of `burst` requests and no refill to speak of (one a day):
    for tests that count exactly what each request is charged."""
    scope = f"    channels: [{', '.join(channels)}]\n" if channels else ""
    return ("version: 1\nlimits:\n  - name: per-user\n    per: [user]\n    rate: 1\n    period_s: 86400\n"
            f"    burst: {burst}\n{scope}    on_store_error: deny\n")
