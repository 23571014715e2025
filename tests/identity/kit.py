"""Test kit for identity tests: keys generated at test time, a clients.yaml, token minting.

Two registries: `clients_yaml` (vendor-a & co., for the authentication attack catalogue) and
`facility_vendors_yaml` (one vendor per health facility, each also its users' SSO issuer, for round
trips through authentication into authorization)."""

from __future__ import annotations

import base64
import json
import textwrap
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from mediator.identity.client import client_assertion, token_form
from tests.conftest import OPEN_CAPABILITIES_CHANNEL

BASE = "https://mediator.example.org/fhir/"
ORIGIN = "https://mediator.example.org"
TOKEN_URL = f"{ORIGIN}/auth/token"
IDP_ISSUER = "https://idp.vendor-a.example"

AUTH_CHANNELS = """\
- name: master-data
  path: ^/fhir/(Medication|Organization)(/[^/]+)?/?$
  methods: [GET]
  upstream: openimis
  ip_allowlist: [local]
""" + OPEN_CAPABILITIES_CHANNEL


TLS_BLOCK = """\
listen:
  host: 127.0.0.1
  port: 0
  tls:
    cert_file: certs/server.crt
    key_file: certs/server.key
    client_ca_file: certs/ca.crt
"""


@dataclass
class Keys:
    vendor_a: ECKey
    vendor_rsa: RSAKey
    idp: ECKey
    attacker: ECKey


def make_keys() -> Keys:
    return Keys(ECKey.generate_key("P-256"), RSAKey.generate_key(2048), ECKey.generate_key("P-256"),
                ECKey.generate_key("P-256"))


def clients_yaml(*, replay: str = "", user_token_keys: str = "public_key_file: keys/idp.pem",
                 vendor_a_cidrs: str = "[]", required_user: bool = False, user_token_extra: str = "") -> str:
    """`user_token_extra`: more `user_token` fields of vendor-a, e.g. "require_client_binding: true"."""
    return f"""\
version: 1
token_service:
  signing_key_file: keys/mediator-signing.key
{replay}clients:
  vendor-a:
    auth_methods: [mtls, private_key_jwt]
    certificates:
      - subject_cn: vendor-a
    keys:
      public_key_file: keys/vendor-a.pem
    ip_allowlist: [local]
    cidrs: {vendor_a_cidrs}
    health_facilities: [JMHOS001, JMHOS002]
    default_roles: [claim_administrator]
    scopes: [system/*.read, system/Claim.write]
    user_token:
      required: {str(required_user).lower()}
      issuer: {IDP_ISSUER}
      keys:
        {user_token_keys}
      algorithms: [ES256]
      max_lifetime_s: 600
      claims:
        user_id: preferred_username
        roles: roles
        health_facility: hf
{textwrap.indent(user_token_extra.rstrip() + chr(10), "      ") if user_token_extra else ""}\
  vendor-rsa:
    auth_methods: [private_key_jwt]
    keys:
      public_key_file: keys/vendor-rsa.pem
    algorithms: [RS256, RS384]
    ip_allowlist: [local]
    scopes: [system/*.read]
  vendor-b:
    auth_methods: [mtls]
    certificates:
      - subject_cn: vendor-b
    ip_allowlist: [local]
    health_facilities: [RAHOS001]
    default_roles: [hms]
    trust_user_header: true
    scopes: [system/*.read]
  vendor-far:
    auth_methods: [private_key_jwt]
    keys:
      public_key_file: keys/vendor-a.pem
    cidrs: ["192.0.2.0/24"]
    scopes: [system/*.read]
"""


KEYS_FOR_JWKS = make_keys()


def write_keys(root: Path, keys: Keys) -> None:
    folder = root / "keys"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vendor-a.pem").write_bytes(keys.vendor_a.as_pem(private=False))
    (folder / "vendor-rsa.pem").write_bytes(keys.vendor_rsa.as_pem(private=False))
    (folder / "idp.pem").write_bytes(keys.idp.as_pem(private=False))


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}."


def sign(header: dict[str, Any], claims: dict[str, Any], key: Any) -> str:
    return jwt.encode(header, claims, key, algorithms=[header["alg"]])


def assertion_claims(client_id: str = "vendor-a", **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {"iss": client_id, "sub": client_id, "aud": TOKEN_URL, "iat": now,
                              "exp": now + 120, "jti": uuid.uuid4().hex}
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def user_claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {"iss": IDP_ISSUER, "aud": BASE, "iat": now, "exp": now + 300,
                              "preferred_username": "dr.amina", "roles": ["claim_administrator"],
                              "hf": "JMHOS001", "jti": uuid.uuid4().hex}
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def user_token(key: ECKey, kid: str | None = None, **changes: Any) -> str:
    header: dict[str, Any] = {"alg": "ES256"}
    if kid is not None:
        header["kid"] = kid
    return sign(header, user_claims(**changes), key)


def form(assertion: str, scope: str = "system/*.read") -> dict[str, str]:
    return token_form(assertion, scope)


def good_assertion(keys: Keys) -> str:
    return client_assertion("vendor-a", keys.vendor_a, TOKEN_URL)


def hs256_forgery(header: dict[str, Any], claims: dict[str, Any], secret: bytes) -> str:
    """What an attacker does by hand (joserfc refuses to use a public key as an HMAC secret)."""
    import hashlib
    import hmac

    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


# --- one vendor per health facility -----------------------------------------------------------------

VENDOR_SCOPES = "system/*.cruds"
"""What a facility vendor's access token asks for by default."""
VENDOR_REGISTERED_SCOPES = (VENDOR_SCOPES, "system/*.rs")
"""What /auth/token may grant a facility vendor (each scope as written here)."""


def vendor_issuer(vendor: str) -> str:
    return f"https://sso.{vendor}.example"


def facility_vendors_yaml(facilities: dict[str, str]) -> str:
    """clients.yaml registering each vendor (client id → its one health facility) for mTLS (certificate
    CN = client id) and private_key_jwt (keys/<vendor>.pem), with that same key as the issuer key of
    its users' SSO tokens (claims preferred_username, roles, hf)."""
    entries = "".join(f"""\
  {vendor}:
    auth_methods: [mtls, private_key_jwt]
    certificates:
      - subject_cn: {vendor}
    keys:
      public_key_file: keys/{vendor}.pem
    ip_allowlist: [local]
    health_facilities: [{facility}]
    default_roles: [hms]
    scopes: [{', '.join(VENDOR_REGISTERED_SCOPES)}]
    user_token:
      required: false
      issuer: {vendor_issuer(vendor)}
      keys:
        public_key_file: keys/{vendor}.pem
      algorithms: [ES256]
      max_lifetime_s: 600
      claims:
        user_id: preferred_username
        roles: roles
        health_facility: hf
""" for vendor, facility in facilities.items())
    return f"""\
version: 1
token_service:
  signing_key_file: keys/mediator-signing.key
clients:
{entries}"""


def write_vendor_keys(root: Path, keys: dict[str, ECKey]) -> None:
    folder = root / "keys"
    folder.mkdir(parents=True, exist_ok=True)
    for vendor, key in keys.items():
        (folder / f"{vendor}.pem").write_bytes(key.as_pem(private=False))


def vendor_user_token(key: ECKey, vendor: str, user: str, roles: tuple[str, ...], facility: str | None,
                      **changes: Any) -> str:
    """The SSO token a vendor's HMS sends in X-User-Token for a logged-in user."""
    claims = {"iss": vendor_issuer(vendor), "preferred_username": user, "roles": list(roles), "hf": facility}
    return user_token(key, **{**claims, **changes})
