"""Authentication stage and token endpoint: an attack catalogue, each refused with its reason code,
over real sockets with keys generated at test time; real TLS for mTLS; real Redis for replay."""

from __future__ import annotations

import os
import ssl
import time
import uuid
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as redis
from aiohttp import web

from mediator.app import METRICS, build_app
from mediator.certs import ensure_ca, issue, make_dev_pki
from mediator.config import load_config
from mediator.facilities import DirectoryUnavailable, FacilitySnapshot, StaticFacilityDirectory
from mediator.identity import Identity
from mediator.identity.client import client_assertion
from mediator.identity.keys import load_or_create_signing_key
from mediator.stages.authentication import Credentials, VouchedUsers, decide
from mediator.tls import server_context
from tests.conftest import channels_yaml, config_problems, upstream_url, write_config
from tests.identity.kit import (
    AUTH_CHANNELS,
    BASE,
    ORIGIN,
    TLS_BLOCK,
    TOKEN_URL,
    assertion_claims,
    clients_yaml,
    form,
    good_assertion,
    hs256_forgery,
    make_keys,
    sign,
    unsigned,
    user_token,
    write_keys,
)

KEYS = make_keys()


def reason_of(body: dict) -> str:
    return body["issue"][0]["details"]["coding"][0]["code"]


def counted(client, stage: str, reason: str) -> float:
    registry = client.server.app[METRICS].registry
    value = registry.get_sample_value("mediator_stage_decisions_total",
                                      {"stage": stage, "outcome": "deny", "reason": reason})
    return value or 0.0


@pytest.fixture
async def auth_mediator(tmp_path, sandbox_server, make_mediator):
    write_keys(tmp_path / "config", KEYS)
    return await make_mediator(channels_yaml(upstream_url(sandbox_server), channels=AUTH_CHANNELS),
                               extra_policies={"clients.yaml": clients_yaml()})


async def get_token(client, assertion: str | None = None, scope: str = "system/*.read") -> str:
    response = await client.post("/auth/token", data=form(assertion or good_assertion(KEYS), scope))
    assert response.status == 200, await response.text()
    body = await response.json()
    assert response.headers["Cache-Control"] == "no-store"
    return body["access_token"]


# --- token endpoint -------------------------------------------------------------------------------

async def test_a_registered_client_gets_a_token_with_the_granted_scopes(auth_mediator):
    response = await auth_mediator.post("/auth/token", data=form(
        good_assertion(KEYS), "system/*.read system/Patient.write system/Claim.write"))
    body = await response.json()
    assert response.status == 200
    assert body["token_type"] == "Bearer" and body["expires_in"] == 300
    assert body["scope"] == "system/*.read system/Claim.write"  # requested ∩ allowed
    jwks = await (await auth_mediator.get("/.well-known/jwks.json")).json()
    assert [k["kty"] for k in jwks["keys"]] == ["EC"] and "d" not in jwks["keys"][0]
    smart = await (await auth_mediator.get("/fhir/.well-known/smart-configuration")).json()
    assert smart["token_endpoint"] == TOKEN_URL
    assert smart["token_endpoint_auth_methods_supported"] == ["private_key_jwt"]


def _now() -> int:
    return int(time.time())


ASSERTION_ATTACKS = [
    # (case, assertion factory, status, oauth error, reason)
    ("alg none", lambda: unsigned({"alg": "none"}, assertion_claims()), 401, "invalid_client",
     "auth_token.assertion_algorithm_not_allowed"),
    ("HS256 keyed with the RSA public key",
     lambda: hs256_forgery({"alg": "HS256"}, assertion_claims("vendor-rsa"), KEYS.vendor_rsa.as_pem(private=False)),
     401, "invalid_client", "auth_token.assertion_algorithm_not_allowed"),
    ("signed by another key", lambda: sign({"alg": "ES256"}, assertion_claims(), KEYS.attacker), 401,
     "invalid_client", "auth_token.assertion_bad_signature"),
    ("attacker key embedded in the header",
     lambda: sign({"alg": "ES256", "jwk": KEYS.attacker.as_dict(private=False)}, assertion_claims(),
                  KEYS.attacker), 401, "invalid_client", "auth_token.assertion_bad_signature"),
    ("unknown kid", lambda: sign({"alg": "ES256", "kid": "../../../../dev/null"}, assertion_claims(),
                                 KEYS.vendor_a), 401, "invalid_client", "auth_token.assertion_unknown_key"),
    ("wrong audience", lambda: sign({"alg": "ES256"}, assertion_claims(aud=BASE), KEYS.vendor_a), 401,
     "invalid_client", "auth_token.assertion_wrong_audience"),
    ("sub is another client", lambda: sign({"alg": "ES256"}, assertion_claims(sub="vendor-b"), KEYS.vendor_a),
     401, "invalid_client", "auth_token.assertion_invalid_claim"),
    ("expired", lambda: sign({"alg": "ES256"}, assertion_claims(iat=_now() - 400, exp=_now() - 100),
                             KEYS.vendor_a), 401, "invalid_client", "auth_token.assertion_expired"),
    ("not yet valid", lambda: sign({"alg": "ES256"}, assertion_claims(nbf=_now() + 200), KEYS.vendor_a),
     401, "invalid_client", "auth_token.assertion_not_yet_valid"),
    ("lives too long", lambda: sign({"alg": "ES256"}, assertion_claims(exp=_now() + 3600), KEYS.vendor_a),
     401, "invalid_client", "auth_token.assertion_lifetime_too_long"),
    ("no jti", lambda: sign({"alg": "ES256"}, assertion_claims(jti=None), KEYS.vendor_a), 401,
     "invalid_client", "auth_token.assertion_missing_claim"),
    ("unknown client", lambda: sign({"alg": "ES256"}, assertion_claims("vendor-zz"), KEYS.vendor_a), 401,
     "invalid_client", "auth_token.unknown_client"),
    ("mtls-only client", lambda: sign({"alg": "ES256"}, assertion_claims("vendor-b"), KEYS.vendor_a), 401,
     "invalid_client", "auth_token.method_not_allowed"),
    ("client outside its networks", lambda: client_assertion("vendor-far", KEYS.vendor_a, TOKEN_URL), 403,
     "access_denied", "auth_token.client_ip_denied"),
    ("garbage", lambda: "not.a.jwt", 401, "invalid_client", "auth_token.assertion_malformed"),
]


@pytest.mark.parametrize(("case", "make", "status", "error", "reason"), ASSERTION_ATTACKS,
                         ids=[a[0] for a in ASSERTION_ATTACKS])
async def test_bad_client_assertions_are_refused(auth_mediator, case, make, status, error, reason):
    response = await auth_mediator.post("/auth/token", data=form(make()))
    assert response.status == status
    body = await response.json()
    assert body["error"] == error
    assert "access_token" not in body
    assert counted(auth_mediator, "auth_token", reason) == 1
    if status == 401:
        assert 'error="invalid_client"' in response.headers["WWW-Authenticate"]


@pytest.mark.parametrize(("data", "status", "error"), [
    ({"grant_type": "password", "username": "x"}, 400, "unsupported_grant_type"),
    ({"grant_type": "client_credentials", "client_secret": "x"}, 401, "invalid_client"),
])
async def test_other_grants_and_secrets_are_refused(auth_mediator, data, status, error):
    response = await auth_mediator.post("/auth/token", data=data)
    assert response.status == status
    assert (await response.json())["error"] == error


async def test_scope_outside_the_clients_allowance_is_invalid_scope(auth_mediator):
    response = await auth_mediator.post("/auth/token", data=form(good_assertion(KEYS), "system/Patient.write"))
    assert response.status == 400
    assert (await response.json())["error"] == "invalid_scope"


async def test_an_assertion_is_accepted_once_in_memory(auth_mediator):
    assertion = good_assertion(KEYS)
    await get_token(auth_mediator, assertion)
    again = await auth_mediator.post("/auth/token", data=form(assertion))
    assert again.status == 401
    assert counted(auth_mediator, "auth_token", "auth_token.assertion_replayed") == 1


@pytest.mark.redis
async def test_replayed_assertion_is_refused_across_instances_with_redis(tmp_path, sandbox_server, aiohttp_client,
                                                                         monkeypatch):
    prefix = f"test:{uuid.uuid4().hex}:"
    monkeypatch.setenv("MEDIATOR_TEST_REDIS", "redis://127.0.0.1:6379/0")
    replay = f"  replay_store:\n    redis_url_env: MEDIATOR_TEST_REDIS\n    key_prefix: \"{prefix}\"\n"
    root = write_config(tmp_path / "config", channels_yaml(upstream_url(sandbox_server), channels=AUTH_CHANNELS),
                        extra_policies={"clients.yaml": clients_yaml(replay=replay)})
    write_keys(root, KEYS)
    config = load_config(root)
    first, second = await aiohttp_client(build_app(config)), await aiohttp_client(build_app(config))
    store = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        assertion = good_assertion(KEYS)
        assert (await first.post("/auth/token", data=form(assertion))).status == 200
        replayed = await second.post("/auth/token", data=form(assertion))  # another instance, same Redis
        assert replayed.status == 401
        assert counted(second, "auth_token", "auth_token.assertion_replayed") == 1
        keys = [k async for k in store.scan_iter(match=f"{prefix}*")]
        assert len(keys) == 1
        assert 0 < await store.pttl(keys[0]) <= (120 + 30) * 1000  # expires with the assertion
    finally:
        async for key in store.scan_iter(match=f"{prefix}*"):
            await store.delete(key)
        await store.aclose()


def _closed_port() -> int:
    """A local port nothing listens on (bound, then released): connecting is refused at once."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_token_endpoint_with_its_replay_store_down_is_503_temporarily_unavailable(
        tmp_path, sandbox_server, aiohttp_client, monkeypatch):
    monkeypatch.setenv("MEDIATOR_TEST_REDIS", f"redis://127.0.0.1:{_closed_port()}/0")
    replay = "  replay_store:\n    redis_url_env: MEDIATOR_TEST_REDIS\n"
    root = write_config(tmp_path / "config", channels_yaml(upstream_url(sandbox_server), channels=AUTH_CHANNELS),
                        extra_policies={"clients.yaml": clients_yaml(replay=replay)})
    write_keys(root, KEYS)
    client = await aiohttp_client(build_app(load_config(root)))
    response = await client.post("/auth/token", data=form(good_assertion(KEYS)))
    assert response.status == 503
    assert (await response.json()) == {"error": "temporarily_unavailable", "error_description": "try again later"}
    assert int(response.headers["Retry-After"]) >= 1
    assert response.headers["Cache-Control"] == "no-store"
    assert counted(client, "auth_token", "auth_token.replay_store_unavailable") == 1


def test_every_authlib_error_the_token_endpoint_uses_exists_in_the_pinned_authlib():
    """An error class that does not exist is an AttributeError (a 500) exactly when it is needed."""
    import ast
    import inspect
    import re

    from authlib.oauth2.rfc6749 import errors as oauth_errors

    import mediator.identity.token_service as token_service

    tree = ast.parse(inspect.getsource(token_service))
    used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name) and node.value.id == "oauth_errors"}
    assert used >= {"InvalidClientError", "InvalidRequestError", "OAuth2Error"}  # the scan finds them
    for name in sorted(used):
        error_class = getattr(oauth_errors, name)   # AttributeError: the class does not exist
        assert issubclass(error_class, oauth_errors.OAuth2Error)
        if name == "OAuth2Error":
            error = error_class(error="temporarily_unavailable", description="x", status_code=503)
        else:
            error = error_class("x") if name == "UnsupportedGrantTypeError" else error_class(description="x")
        assert dict(error.get_body())["error"]
    # The version tested is the version pinned.
    import importlib.metadata
    from pathlib import Path

    pinned = re.search(r'"authlib==([^"]+)"', (Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert pinned is not None and pinned[1] == importlib.metadata.version("authlib")


# --- access tokens on FHIR channels ---------------------------------------------------------------

async def test_no_credentials_is_401_with_a_bearer_challenge(auth_mediator, sandbox):
    response = await auth_mediator.get("/fhir/Medication/")
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="openimis-mediator"'
    assert reason_of(await response.json()) == "authentication.missing_credentials"
    assert sandbox.requests == []


async def test_open_channel_needs_no_credentials(auth_mediator):
    assert (await auth_mediator.get("/fhir/metadata")).status == 200


async def test_a_token_from_the_endpoint_opens_the_channel(auth_mediator):
    token = await get_token(auth_mediator)
    response = await auth_mediator.get("/fhir/Medication/", headers={"Authorization": f"Bearer {token}"})
    assert response.status == 200


async def test_a_token_sent_again_reuses_its_signature_check_but_a_tampered_copy_does_not(auth_mediator):
    from mediator.app import RUNTIME

    identity = auth_mediator.server.app[RUNTIME].current.identity
    token, user = await get_token(auth_mediator), user_token(KEYS.idp)
    headers = {"Authorization": f"Bearer {token}", "X-User-Token": user}
    for _ in range(3):
        assert (await auth_mediator.get("/fhir/Medication/", headers=headers)).status == 200
    assert (identity.access_tokens.hits, len(identity.access_tokens)) == (2, 1)
    user_cache = identity.clients["vendor-a"].user_token_keys.verified
    assert (user_cache.hits, len(user_cache)) == (2, 1)
    head, payload, signature = token.split(".")
    forged = f"{head}.{payload}.{signature[:10]}{'A' if signature[10] != 'A' else 'B'}{signature[11:]}"
    response = await auth_mediator.get("/fhir/Medication/", headers={"Authorization": f"Bearer {forged}"})
    assert response.status == 401
    assert reason_of(await response.json()) == "authentication.access_token_bad_signature"


async def test_denials_are_logged_at_info_and_allows_only_at_debug(auth_mediator, caplog):
    import json
    import logging

    token = await get_token(auth_mediator)
    for level in (logging.INFO, logging.DEBUG):
        caplog.clear()
        caplog.set_level(level, logger="mediator.identity")
        bearer = {"Authorization": f"Bearer {token}"}
        assert (await auth_mediator.get("/fhir/Medication/", headers=bearer)).status == 200
        assert (await auth_mediator.get("/fhir/Medication/")).status == 401
        events = [json.loads(r.getMessage()) for r in caplog.records if r.name == "mediator.identity"]
        seen = [(e["outcome"], e["reason"]) for e in events if e.get("event") == "authentication.decided"]
        allowed = [("allow", "authentication.authenticated")] if level == logging.DEBUG else []
        assert seen == allowed + [("deny", "authentication.missing_credentials")]
        assert token not in caplog.text


def _access_claims(**changes):
    now = _now()
    claims = {"iss": ORIGIN, "sub": "vendor-a", "client_id": "vendor-a", "aud": BASE, "iat": now, "nbf": now,
              "exp": now + 300, "jti": uuid.uuid4().hex, "scope": "system/*.read"}
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


ACCESS_TOKEN_ATTACKS = [
    ("alg none", lambda k: unsigned({"alg": "none", "typ": "at+jwt"}, _access_claims()),
     "authentication.access_token_algorithm_not_allowed"),
    ("HS256 keyed with our public key",
     lambda k: hs256_forgery({"alg": "HS256", "typ": "at+jwt", "kid": k.kid}, _access_claims(),
                             k.as_pem(private=False)),
     "authentication.access_token_algorithm_not_allowed"),
    ("forged with our kid", lambda k: sign({"alg": "ES256", "typ": "at+jwt", "kid": k.kid}, _access_claims(),
                                           KEYS.attacker), "authentication.access_token_bad_signature"),
    ("kid injection", lambda k: sign({"alg": "ES256", "typ": "at+jwt", "kid": "x' OR '1'='1"}, _access_claims(), k),
     "authentication.access_token_unknown_key"),
    ("wrong issuer", lambda k: sign({"alg": "ES256", "typ": "at+jwt", "kid": k.kid},
                                    _access_claims(iss="https://evil.example"), k),
     "authentication.access_token_wrong_issuer"),
    ("wrong audience", lambda k: sign({"alg": "ES256", "typ": "at+jwt", "kid": k.kid},
                                      _access_claims(aud="https://other.example/fhir/"), k),
     "authentication.access_token_wrong_audience"),
    ("expired", lambda k: sign({"alg": "ES256", "typ": "at+jwt", "kid": k.kid},
                               _access_claims(iat=_now() - 900, nbf=_now() - 900, exp=_now() - 600), k),
     "authentication.access_token_expired"),
    ("future nbf", lambda k: sign({"alg": "ES256", "typ": "at+jwt", "kid": k.kid},
                                  _access_claims(nbf=_now() + 120), k),
     "authentication.access_token_not_yet_valid"),
    ("not an access token (typ JWT)", lambda k: sign({"alg": "ES256", "typ": "JWT", "kid": k.kid},
                                                     _access_claims(), k), "authentication.access_token_wrong_type"),
    ("client no longer registered", lambda k: sign({"alg": "ES256", "typ": "at+jwt", "kid": k.kid},
                                                   _access_claims(sub="vendor-gone", client_id="vendor-gone"), k),
     "authentication.unknown_client"),
    ("malformed", lambda k: "abc", "authentication.access_token_malformed"),
]


@pytest.mark.parametrize(("case", "make", "reason"), ACCESS_TOKEN_ATTACKS, ids=[a[0] for a in ACCESS_TOKEN_ATTACKS])
async def test_bad_access_tokens_are_401_with_their_reason(auth_mediator, tmp_path, sandbox, case, make, reason):
    key = load_or_create_signing_key(tmp_path / "config" / "keys" / "mediator-signing.key")
    response = await auth_mediator.get("/fhir/Medication/", headers={"Authorization": f"Bearer {make(key)}"})
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="openimis-mediator", error="invalid_token"'
    body = await response.json()
    assert reason_of(body) == reason
    assert body["resourceType"] == "OperationOutcome"
    assert counted(auth_mediator, "authentication", reason) == 1
    assert sandbox.requests == []


async def test_basic_authorization_is_not_a_bearer_token(auth_mediator):
    response = await auth_mediator.get("/fhir/Medication/", headers={"Authorization": "Basic QWRtaW46YWRtaW4xMjM="})
    assert response.status == 401
    assert reason_of(await response.json()) == "authentication.malformed_authorization"


# --- SSO user tokens --------------------------------------------------------------------------------

# Times are computed when the case runs, not when the module is collected: a suite that runs longer than a
# token's offset (several minutes under load) would otherwise send an nbf that has already passed.
USER_TOKEN_CASES = [
    ("foreign health facility", lambda: dict(hf="XXHOS999"), 403, "authentication.facility_not_registered"),
    ("one foreign facility in a list", lambda: dict(hf=["JMHOS001", "XXHOS999"]), 403,
     "authentication.facility_not_registered"),
    ("wrong issuer", lambda: dict(iss="https://idp.vendor-b.example"), 401, "authentication.user_token_wrong_issuer"),
    ("wrong audience", lambda: dict(aud="https://openimis.example"), 401, "authentication.user_token_wrong_audience"),
    ("expired", lambda: dict(iat=_now() - 900, exp=_now() - 300), 401, "authentication.user_token_expired"),
    ("future nbf", lambda: dict(nbf=_now() + 300), 401, "authentication.user_token_not_yet_valid"),
    ("lifetime beyond max", lambda: dict(exp=_now() + 7200), 401, "authentication.user_token_lifetime_too_long"),
    ("no user id", lambda: dict(preferred_username=None), 401, "authentication.user_token_missing_claim"),
]


@pytest.mark.parametrize(("case", "changes", "status", "reason"), USER_TOKEN_CASES,
                         ids=[c[0] for c in USER_TOKEN_CASES])
async def test_bad_user_tokens_are_refused(auth_mediator, case, changes, status, reason):
    token = await get_token(auth_mediator)
    response = await auth_mediator.get("/fhir/Medication/", headers={
        "Authorization": f"Bearer {token}", "X-User-Token": user_token(KEYS.idp, **changes())})
    assert response.status == status
    assert reason_of(await response.json()) == reason


async def test_user_token_signed_by_another_key_or_alg_is_refused(auth_mediator):
    token = await get_token(auth_mediator)
    cases = {
        "authentication.user_token_bad_signature": user_token(KEYS.attacker),
        "authentication.user_token_algorithm_not_allowed": unsigned({"alg": "none"}, {"iss": "x"}),
    }
    for reason, user in cases.items():
        response = await auth_mediator.get("/fhir/Medication/", headers={
            "Authorization": f"Bearer {token}", "X-User-Token": user})
        assert reason_of(await response.json()) == reason


async def test_a_valid_user_token_passes(auth_mediator):
    token = await get_token(auth_mediator)
    response = await auth_mediator.get("/fhir/Medication/", headers={
        "Authorization": f"Bearer {token}", "X-User-Token": user_token(KEYS.idp)})
    assert response.status == 200


# --- decide(): the principal built ------------------------------------------------------------------

@pytest.fixture
async def identity(tmp_path, aiohttp_server):
    root = write_config(tmp_path / "config", channels_yaml("http://127.0.0.1:9/api/", channels=AUTH_CHANNELS),
                        extra_policies={"clients.yaml": clients_yaml(required_user=False)})
    write_keys(root, KEYS)
    built = Identity.from_config(load_config(root))
    await built.start_new(None)
    yield built
    await built.close_retired(None)


def _cert(_identity, cn):
    from mediator.identity import PeerCertificate

    return PeerCertificate("ab" * 32, cn)


LOCAL = __import__("ipaddress").ip_address("127.0.0.1")


async def test_principal_from_a_user_token_carries_user_roles_and_facility(identity):
    token = await _access_token(identity)
    decision, principal = await decide(Credentials(f"Bearer {token}", None, user_token(KEYS.idp), None),
                                       LOCAL, identity, _now())
    assert decision.reason == "authentication.authenticated"
    assert principal is not None
    assert (principal.client_id, principal.auth_method, principal.user_id) == ("vendor-a", "access_token", "dr.amina")
    assert principal.health_facilities == {"JMHOS001"}
    assert principal.roles == {"claim_administrator"}
    assert principal.scopes == {"system/*.read"}
    assert token not in str(principal.claims)


async def _access_token(identity_obj):
    key = identity_obj.signing_key
    return sign({"alg": "ES256", "typ": "at+jwt", "kid": key.kid}, _access_claims(), key)


# The facility directory that trusted-header names are checked against (claim administrator codes, exact).
CLAIM_ADMINS = StaticFacilityDirectory(FacilitySnapshot(
    claim_administrators={"RHOS0011": "RAHOS001", "JHOS0011": "JMHOS001"}, loaded_at=time.time()))
USERS = VouchedUsers(CLAIM_ADMINS)


@pytest.mark.parametrize(("cn", "user_name", "method", "user_id", "reason"), [
    ("vendor-b", "RHOS0011", "trusted_header", "RHOS0011", "authentication.authenticated"),  # flagged mTLS
    ("vendor-a", "jdoe", "mtls", None, "authentication.authenticated"),               # header ignored
    ("vendor-b", "bad name;", None, None, "authentication.malformed_user_name"),
    ("vendor-b", "NOBODY", None, None, "authentication.unknown_user"),                 # not in openIMIS
    ("vendor-b", "rhos0011", None, None, "authentication.unknown_user"),               # codes are exact
    # Another facility's claim administrator: the same answer as nobody (no oracle for other HFs' codes).
    ("vendor-b", "JHOS0011", None, None, "authentication.unknown_user"),
    ("vendor-c", None, None, None, "authentication.unknown_client_certificate"),
])
async def test_certificate_clients_and_the_trusted_user_header(identity, cn, user_name, method, user_id, reason):
    decision, principal = await decide(Credentials(None, _cert(identity, cn), None, user_name), LOCAL, identity,
                                       _now(), USERS)
    assert decision.reason == reason
    if method is None:
        assert principal is None and not decision.allow
        assert decision.status in (400, 401, 403)
    else:
        assert principal is not None
        assert (principal.auth_method, principal.user_id) == (method, user_id)


async def test_the_log_tells_operators_why_a_vouched_user_was_refused(identity, caplog):
    with caplog.at_level("INFO", logger="mediator.identity"):
        for name in ("NOBODY", "JHOS0011"):
            await decide(Credentials(None, _cert(identity, "vendor-b"), None, name), LOCAL, identity, _now(), USERS)
    whys = [r.msg.fields for r in caplog.records if "vouched_user_refused" in r.getMessage()]
    assert whys == [{"event": "authentication.vouched_user_refused", "why": "unknown"},
                    {"event": "authentication.vouched_user_refused", "why": "facility_not_registered"}]


async def test_a_trusted_header_user_acts_for_their_own_facility_vouched_by_the_client(identity):
    _, principal = await decide(Credentials(None, _cert(identity, "vendor-b"), None, "RHOS0011"), LOCAL,
                                identity, _now(), USERS)
    assert principal is not None
    assert principal.health_facilities == {"RAHOS001"}   # the directory's, not every registered one
    assert principal.user_key == "client=vendor-b/user=RHOS0011"


class _Unavailable:
    async def snapshot(self, *, max_age_s=None):
        raise DirectoryUnavailable("openIMIS down")


async def test_a_trusted_header_cannot_be_checked_without_a_directory(identity):
    creds = Credentials(None, _cert(identity, "vendor-b"), None, "RHOS0011")
    decision, principal = await decide(creds, LOCAL, identity, _now(), None)
    assert (decision.status, decision.reason, principal) == (403, "authentication.unknown_user", None)
    decision, principal = await decide(creds, LOCAL, identity, _now(), VouchedUsers(_Unavailable()))
    assert (decision.status, decision.reason, principal) == (503, "authentication.directory_unavailable", None)
    assert decision.headers["Retry-After"]


async def test_an_unknown_name_reloads_the_directory_once_for_a_new_claim_administrator(identity):
    class Growing:
        def __init__(self):
            self.asked: list[float | None] = []

        async def snapshot(self, *, max_age_s=None):
            self.asked.append(max_age_s)
            known = {"NEW0001": "RAHOS001"} if max_age_s is not None else {}
            return FacilitySnapshot(claim_administrators=known)

    directory = Growing()
    decision, principal = await decide(Credentials(None, _cert(identity, "vendor-b"), None, "NEW0001"), LOCAL,
                                       identity, _now(), VouchedUsers(directory, 30.0))
    assert decision.allow and principal is not None and principal.health_facilities == {"RAHOS001"}
    assert directory.asked == [None, 30.0]


async def test_header_user_name_is_ignored_for_token_clients(identity):
    token = await _access_token(identity)
    decision, principal = await decide(Credentials(f"Bearer {token}", None, None, "Admin"), LOCAL, identity, _now())
    assert decision.allow and principal is not None and principal.user_id is None


async def test_certificate_and_token_for_different_clients_is_refused(identity):
    token = await _access_token(identity)
    decision, _ = await decide(Credentials(f"Bearer {token}", _cert(identity, "vendor-b"), None, None), LOCAL,
                               identity, _now())
    assert decision.reason == "authentication.client_mismatch"


async def test_a_client_outside_its_networks_is_403(identity):
    token = await _access_token(identity)
    outside = __import__("ipaddress").ip_address("198.51.100.7")
    decision, _ = await decide(Credentials(f"Bearer {token}", None, None, None), outside, identity, _now())
    assert (decision.status, decision.reason) == (403, "authentication.client_ip_denied")


# --- mTLS over real TLS ---------------------------------------------------------------------------

def _mtls_config(tmp_path: Path, sandbox_server) -> tuple[Path, Path]:
    root = tmp_path / "config"
    certs = root / "certs"
    make_dev_pki(certs, ("vendor-a", "vendor-b", "vendor-c"))
    ensure_ca(tmp_path / "other-ca")
    issue(tmp_path / "other-ca", "vendor-a", server=False)  # same name, another CA
    write_config(root, channels_yaml(upstream_url(sandbox_server), extra_server=TLS_BLOCK, channels=AUTH_CHANNELS),
                 extra_policies={"clients.yaml": clients_yaml()})
    write_keys(root, KEYS)
    return root, certs


async def _mtls_answers(url: str, certs: Path, other_ca: Path) -> None:
    def context(folder: Path | None, name: str | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        if folder is not None and name is not None:
            ctx.load_cert_chain(folder / f"{name}.crt", folder / f"{name}.key")
        return ctx

    async with aiohttp.ClientSession() as session:
        async with session.get(url, ssl=context(certs, "vendor-a")) as response:
            assert response.status == 200
        # Vouched users are checked against the claim administrators openIMIS (here the stand-in) has.
        vendor_b = context(certs, "vendor-b")
        async with session.get(url, ssl=vendor_b, headers={"X-User-Name": "RHOS0011"}) as response:
            assert response.status == 200
        async with session.get(url, ssl=vendor_b, headers={"X-User-Name": "NOBODY"}) as response:
            assert response.status == 403
            assert reason_of(await response.json()) == "authentication.unknown_user"
        async with session.get(url, ssl=context(certs, "vendor-c")) as response:  # our CA, not registered
            assert response.status == 401
            assert reason_of(await response.json()) == "authentication.unknown_client_certificate"
        async with session.get(url, ssl=context(None, None)) as response:
            assert reason_of(await response.json()) == "authentication.missing_credentials"
        with pytest.raises(aiohttp.ClientError):  # a certificate from another CA fails the handshake
            async with session.get(url, ssl=context(other_ca, "vendor-a")) as response:
                await response.read()


async def test_mtls_clients_over_real_tls(tmp_path, sandbox_server, unused_tcp_port):
    root, certs = _mtls_config(tmp_path, sandbox_server)
    config = load_config(root)
    runner = web.AppRunner(build_app(config))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", unused_tcp_port,
                       ssl_context=server_context(config.channels.server.listen.tls, root))
    await site.start()
    try:
        await _mtls_answers(f"https://localhost:{unused_tcp_port}/fhir/Medication/", certs, tmp_path / "other-ca")
    finally:
        await runner.cleanup()


async def test_mtls_clients_over_real_tls_with_uvloop(tmp_path, sandbox_server, unused_tcp_port):
    """`serve --event-loop uvloop` has its own TLS transport: the same certificates give the same answers."""
    pytest.importorskip("uvloop")
    from tests.operations.support import eventually, mediator_process, port_open

    root, certs = _mtls_config(tmp_path, sandbox_server)
    with mediator_process(root, "--port", str(unused_tcp_port), "--event-loop", "uvloop",
                          log_file=tmp_path / "serve.log") as process:
        await eventually(lambda: port_open(unused_tcp_port) or process.poll() is not None, 20, "the listener")
        assert process.poll() is None, (tmp_path / "serve.log").read_text()
        await _mtls_answers(f"https://localhost:{unused_tcp_port}/fhir/Medication/", certs, tmp_path / "other-ca")
    assert '"event":{"event":"server.event_loop","event_loop":"uvloop"}' in (tmp_path / "serve.log").read_text()


# --- configuration --------------------------------------------------------------------------------

@pytest.mark.parametrize(("replace", "expected"), [
    (("algorithms: [RS256, RS384]", "algorithms: [HS256]"),
     "policies/clients.yaml:31:18: clients.vendor-rsa.algorithms[0]: Input should be 'RS256', 'RS384', 'RS512', "
     "'PS256', 'PS384', 'PS512', 'ES256', 'ES384', 'ES512' or 'EdDSA'"),
    (("      - subject_cn: vendor-b\n", "      - {}\n"),
     "policies/clients.yaml:37:9: clients.vendor-b.certificates[0]: give subject_cn, sha256 or both"),
    (("    ip_allowlist: [local]\n    cidrs: []", "    ip_allowlist: [nowhere]\n    cidrs: []"),
     "policies/clients.yaml:11:20: clients.vendor-a.ip_allowlist[0]: unknown ip set 'nowhere' "
     "(not in policies/ip_allowlist.yaml)"),
    (("    auth_methods: [mtls]\n", "    auth_methods: [private_key_jwt]\n"),
     "policies/clients.yaml:34:3: clients.vendor-b: auth method private_key_jwt needs keys"),
    (("      - subject_cn: vendor-a\n", "      - sha256: abc\n"),
     "policies/clients.yaml:8:9: clients.vendor-a.certificates[0].sha256: sha256 must be 64 hex digits "
     "(colons allowed)"),
])
def test_clients_policy_errors_name_file_line_and_message(tmp_path, replace, expected):
    text = clients_yaml().replace(*replace)
    assert text != clients_yaml()
    root = write_config(tmp_path, channels_yaml("http://127.0.0.1:9/api/"), extra_policies={"clients.yaml": text})

    assert config_problems(root) == [expected]


def test_signing_key_is_generated_once_with_mode_0600(tmp_path):
    path = tmp_path / "k" / "signing.key"
    first = load_or_create_signing_key(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert load_or_create_signing_key(path).kid == first.kid
    assert os.path.getsize(path) > 0


async def test_token_requests_are_limited_per_address_before_any_signature_work(tmp_path, sandbox_server,
                                                                                 make_mediator):
    write_keys(tmp_path / "config", KEYS)
    clients = clients_yaml().replace("  signing_key_file: keys/mediator-signing.key\n",
                                     "  signing_key_file: keys/mediator-signing.key\n"
                                     "  requests_per_minute_per_address: 6\n  request_burst: 3\n")
    client = await make_mediator(channels_yaml(upstream_url(sandbox_server), channels=AUTH_CHANNELS),
                                 extra_policies={"clients.yaml": clients})
    statuses = []
    for _ in range(3):
        statuses.append((await client.post("/auth/token", data=form(good_assertion(KEYS)))).status)
    assert statuses == [200, 200, 200]
    # The 4th within the burst window is refused whatever it carries, even a garbage assertion.
    refused = await client.post("/auth/token", data=form("not-even-a-jwt"))
    assert refused.status == 429
    assert (await refused.json())["error"] == "slow_down"
    assert int(refused.headers["Retry-After"]) >= 1
    counted = client.server.app[METRICS].registry.get_sample_value(
        "mediator_stage_decisions_total",
        {"stage": "auth_token", "outcome": "deny", "reason": "auth_token.rate_limited"})
    assert counted == 1


def test_token_request_limit_schema(tmp_path):
    root = write_config(tmp_path / "config", channels_yaml("http://127.0.0.1:9/api/", channels=AUTH_CHANNELS),
                        extra_policies={"clients.yaml": clients_yaml().replace(
                            "  signing_key_file: keys/mediator-signing.key\n",
                            "  signing_key_file: keys/mediator-signing.key\n  requests_per_minute_per_address: 0\n")})
    assert config_problems(root) == [
        "policies/clients.yaml:4:3: token_service.requests_per_minute_per_address: "
        "Input should be greater than or equal to 1"]


# --- user tokens are bound to the presenting client (azp / client_id) -------------------------------

async def _identity_with(tmp_path, user_token_extra: str) -> Identity:
    root = write_config(tmp_path / "bound", channels_yaml("http://127.0.0.1:9/api/", channels=AUTH_CHANNELS),
                        extra_policies={"clients.yaml": clients_yaml(user_token_extra=user_token_extra)})
    write_keys(root, KEYS)
    return Identity.from_config(load_config(root))


@pytest.mark.parametrize(("extra", "claims", "reason"), [
    ("", {}, "authentication.authenticated"),                          # no azp/client_id: accepted by default
    ("", {"azp": "vendor-a"}, "authentication.authenticated"),
    ("", {"client_id": "vendor-a"}, "authentication.authenticated"),
    ("", {"azp": "vendor-rsa"}, "authentication.user_token_wrong_client"),   # issued to another application
    ("", {"azp": "vendor-a", "client_id": "vendor-rsa"}, "authentication.user_token_wrong_client"),
    ("", {"azp": ["vendor-a"]}, "authentication.user_token_wrong_client"),   # not a string
    ("client_aliases: [hms-a-prod]", {"azp": "hms-a-prod"}, "authentication.authenticated"),
    ("require_client_binding: true", {}, "authentication.user_token_client_unbound"),
    ("require_client_binding: true", {"azp": "vendor-a"}, "authentication.authenticated"),
])
async def test_user_tokens_are_bound_to_the_presenting_client(tmp_path, extra, claims, reason):
    bound = await _identity_with(tmp_path, extra)
    token = await _access_token(bound)
    decision, principal = await decide(Credentials(f"Bearer {token}", None, user_token(KEYS.idp, **claims), None),
                                       LOCAL, bound, _now())
    assert decision.reason == reason
    if not decision.allow:
        assert decision.status == 401 and principal is None
        assert "invalid_token" in decision.headers["WWW-Authenticate"]


async def test_a_user_token_is_keyed_by_its_issuer(identity):
    token = await _access_token(identity)
    _, principal = await decide(Credentials(f"Bearer {token}", None, user_token(KEYS.idp), None), LOCAL,
                                identity, _now())
    assert principal is not None
    assert principal.user_key == "iss=https%3A%2F%2Fidp.vendor-a.example/user=dr.amina"


def test_client_binding_options_are_part_of_the_schema(tmp_path):
    root = write_config(tmp_path / "c", channels_yaml("http://127.0.0.1:9/api/", channels=AUTH_CHANNELS),
                        extra_policies={"clients.yaml": clients_yaml(user_token_extra="require_client_binding: maybe")})
    write_keys(root, KEYS)
    problems = config_problems(root)
    assert len(problems) == 1 and "clients.vendor-a.user_token.require_client_binding" in problems[0]
    assert problems[0].startswith("policies/clients.yaml:")
