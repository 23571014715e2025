"""The SMART Backend Services token endpoint and discovery documents, served by the mediator itself.

POST /auth/token: grant_type=client_credentials with a private_key_jwt client assertion (RFC 7523
§2.2, SMART Backend Services): iss = sub = client_id, aud = the token endpoint URL, short exp, jti
used once. Answers an ES256 access token (typ at+jwt, RFC 9068) carrying requested ∩ allowed
`system/` scopes, or an RFC 6749 §5.2 JSON error. GET /.well-known/jwks.json publishes the
verification key; GET /.well-known/smart-configuration (also under the FHIR base) describes it.

Error bodies come from authlib's RFC 6749 error classes; assertions are verified with joserfc
(`mediator.identity.verify`), not authlib.jose (deprecated).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from aiohttp import web
from authlib.oauth2.rfc6749 import errors as oauth_errors
from authlib.oauth2.rfc6749.util import list_to_scope, scope_to_list
from joserfc import jwt

from mediator.addresses import ClientIpPolicy, IPAddress, client_address
from mediator.errors import MediatorError
from mediator.identity import Identity, RegisteredClient
from mediator.identity.keys import ACCESS_TOKEN_TYPE, SIGNING_ALGORITHM, public_jwks
from mediator.identity.replay import ReplayStoreUnavailable
from mediator.identity.verify import Expectations, Failure, unverified_claims, unverified_header
from mediator.logs import JsonEvent
from mediator.pipeline import Decision, request_id_for

log = logging.getLogger("mediator.identity")

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
MAX_FORM_BYTES = 16 * 1024
REPLAY_STORE_RETRY_AFTER_S = "5"
"""Retry-After of a 503 temporarily_unavailable (the replay store, Redis, did not answer)."""
STAGE = "auth_token"
"""Label of token-endpoint decisions in mediator_stage_decisions_total."""


class TokenError(MediatorError):
    """A refusal: an authlib OAuth2Error (status + RFC 6749 error code) and our own reason code."""

    def __init__(self, error: oauth_errors.OAuth2Error, reason: str, status: int | None = None,
                 retry_after: str | None = None) -> None:
        self.error = error
        self.reason = reason
        self.status = status or error.status_code
        self.retry_after = retry_after
        super().__init__(reason)


def _invalid_client(reason: str, description: str) -> TokenError:
    return TokenError(oauth_errors.InvalidClientError(description=description), reason, 401)


def _error_response(exc: TokenError) -> web.Response:
    headers = {"Cache-Control": "no-store", "Pragma": "no-cache"}
    if exc.status == 401:
        # RFC 6749 §5.2: 401 invalid_client carries an authentication challenge.
        headers["WWW-Authenticate"] = 'Bearer realm="openimis-mediator", error="invalid_client"'
    if exc.retry_after is not None:
        headers["Retry-After"] = exc.retry_after
    return web.json_response(dict(exc.error.get_body()), status=exc.status, headers=headers)


def _ok_response(body: dict[str, Any]) -> web.Response:
    return web.json_response(body, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})


async def _issue(identity: Identity, request: web.Request, client_ip_policy: ClientIpPolicy,
                 now: int) -> tuple[dict[str, Any], str]:
    service = identity.service
    if service is None or identity.signing_key is None:
        raise _invalid_client("auth_token.no_clients", "no client is registered")
    if request.content_type != "application/x-www-form-urlencoded":
        raise TokenError(oauth_errors.InvalidRequestError(
            description="send application/x-www-form-urlencoded"), "auth_token.bad_content_type")
    address = await _client_address(request, client_ip_policy)
    admitted, _ = identity.token_requests.apply([f"auth-token:{address}"], [identity.token_request_limit], 1)
    if not admitted.allow:
        # Before reading the form or verifying a signature: an assertion flood costs us next to nothing.
        raise TokenError(oauth_errors.OAuth2Error(error="slow_down", description="too many token requests"),
                         "auth_token.rate_limited", 429, retry_after=admitted.headers.get("Retry-After", "1"))
    if request.content_length is None or request.content_length > MAX_FORM_BYTES:
        raise TokenError(oauth_errors.InvalidRequestError(description="form missing or too large"),
                         "auth_token.bad_form")
    form = await request.post()
    fields: dict[str, str] = {}
    for name in ("grant_type", "scope", "client_assertion_type", "client_assertion", "client_id"):
        values = form.getall(name, [])
        if len(values) > 1 or any(not isinstance(v, str) for v in values):
            raise TokenError(oauth_errors.InvalidRequestError(description=f"{name} given more than once"),
                             "auth_token.bad_form")
        if values:
            fields[name] = str(values[0])
    if fields.get("grant_type") != "client_credentials":
        raise TokenError(oauth_errors.UnsupportedGrantTypeError(fields.get("grant_type", "")[:64]),
                         "auth_token.unsupported_grant_type")
    if fields.get("client_assertion_type") != ASSERTION_TYPE or not fields.get("client_assertion"):
        raise _invalid_client("auth_token.no_client_assertion", "a private_key_jwt client assertion is required")
    assertion = fields["client_assertion"]

    client = _client_named_by(identity, assertion, fields.get("client_id"))
    if not client.entry.enabled or "private_key_jwt" not in client.entry.auth_methods or \
            client.assertion_keys is None:
        raise _invalid_client("auth_token.method_not_allowed", "this client may not use private_key_jwt")
    expect = Expectations(issuer=client.client_id, audience=identity.token_url,
                          algorithms=client.entry.algorithms, leeway_s=service.leeway_s,
                          max_lifetime_s=service.assertion_max_lifetime_s,
                          required=("exp", "jti", "sub"), extra={"sub": client.client_id})
    verified = await client.assertion_keys.verify(assertion, expect, now)
    if isinstance(verified, Failure):
        raise _invalid_client(f"auth_token.assertion_{verified.check}", verified.message)
    if not identity.address_allowed(client, address):
        raise TokenError(oauth_errors.AccessDeniedError(description="this client may not call from this address"),
                         "auth_token.client_ip_denied", 403)
    jti = verified.claims["jti"]
    if not isinstance(jti, str) or not 1 <= len(jti) <= 256:
        raise _invalid_client("auth_token.assertion_invalid_claim", "jti must be a short string")
    try:
        first = await identity.replay.first_use(f"assertion:{client.client_id}", jti,
                                                float(verified.claims["exp"]) + service.leeway_s)
    except ReplayStoreUnavailable:
        log.error(JsonEvent.of("token.replay_store_unavailable", outcome="assertion_refused"))
        # authlib (1.9) has no class for RFC 6749 §4.1.2.1 temporarily_unavailable: the generic error.
        raise TokenError(oauth_errors.OAuth2Error(error="temporarily_unavailable", description="try again later",
                                                  status_code=503),
                         "auth_token.replay_store_unavailable", 503, retry_after=REPLAY_STORE_RETRY_AFTER_S) from None
    if not first:
        raise _invalid_client("auth_token.assertion_replayed", "this assertion was already used")

    requested = scope_to_list(fields.get("scope") or "") or []
    allowed = set(client.entry.scopes)
    granted = [s for s in dict.fromkeys(requested) if s in allowed]
    if not granted:
        raise TokenError(oauth_errors.InvalidScopeError(
            description="none of the requested scopes is allowed for this client"), "auth_token.invalid_scope")
    lifetime = service.access_token_lifetime_s
    claims = {"iss": identity.issuer, "sub": client.client_id, "client_id": client.client_id,
              "aud": identity.audience, "iat": now, "nbf": now, "exp": now + lifetime,
              "jti": uuid.uuid4().hex, "scope": list_to_scope(granted)}
    header = {"alg": SIGNING_ALGORITHM, "kid": identity.signing_key.kid, "typ": ACCESS_TOKEN_TYPE}
    token = jwt.encode(header, claims, identity.signing_key, algorithms=[SIGNING_ALGORITHM])
    return ({"access_token": token, "token_type": "Bearer", "expires_in": lifetime,
             "scope": list_to_scope(granted)}, client.client_id)


def _client_named_by(identity: Identity, assertion: str, client_id: str | None) -> RegisteredClient:
    # The unverified iss only chooses whose keys to verify with; verification then pins it.
    header = unverified_header(assertion)
    claims = unverified_claims(assertion) if not isinstance(header, Failure) else header
    if isinstance(claims, Failure):
        raise _invalid_client("auth_token.assertion_malformed", claims.message)
    issuer = claims.get("iss")
    if not isinstance(issuer, str) or issuer not in identity.clients:
        raise _invalid_client("auth_token.unknown_client", "unknown client")
    if client_id is not None and client_id != issuer:
        raise _invalid_client("auth_token.client_id_mismatch", "client_id does not match the assertion")
    return identity.clients[issuer]


async def _client_address(request: web.Request, policy: ClientIpPolicy) -> IPAddress | None:
    # The one strict resolver (STYLE rule 8), the one the client_ip stage runs.
    decision, address = client_address(request.remote, request.headers, policy)
    return address if decision.allow else None


Recorder = Callable[[str, Decision], None]


def make_handlers(get_identity: Callable[[web.Request], Identity],
                  get_ip_policy: Callable[[web.Request], ClientIpPolicy],
                  record: Callable[[web.Request], Recorder]) -> dict[str, Any]:
    """aiohttp handlers bound to how the app finds the current Identity (it is swapped on reload)."""

    async def token(request: web.Request) -> web.Response:
        identity = get_identity(request)
        request_id = request_id_for(request)
        try:
            body, client_id = await _issue(identity, request, get_ip_policy(request), int(time.time()))
        except TokenError as exc:
            record(request)(STAGE, Decision.denied(exc.reason, exc.status, exc.error.description or ""))
            log.info(JsonEvent.of("token.refused", request_id=request_id, reason=exc.reason))
            response = _error_response(exc)
        except Exception:  # nothing a request does may take the process down; answer RFC 6749 JSON
            log.exception(JsonEvent.of("token.internal_error", request_id=request_id))
            record(request)(STAGE, Decision.denied("auth_token.internal_error", 500, ""))
            response = web.json_response({"error": "server_error"}, status=500,
                                         headers={"Cache-Control": "no-store"})
        else:
            record(request)(STAGE, Decision.allowed("auth_token.issued"))
            log.info(JsonEvent.of("token.issued", request_id=request_id, client_id=client_id, scope=body["scope"]))
            response = _ok_response(body)
        response.headers["X-Request-ID"] = request_id
        return response

    async def jwks(request: web.Request) -> web.Response:
        identity = get_identity(request)
        document = public_jwks(identity.signing_key) if identity.signing_key is not None else {"keys": []}
        return web.json_response(document, headers={"Cache-Control": "public, max-age=300"})

    async def smart_configuration(request: web.Request) -> web.Response:
        identity = get_identity(request)
        return web.json_response({
            "issuer": identity.issuer,
            "jwks_uri": f"{identity.issuer}/.well-known/jwks.json",
            "token_endpoint": identity.token_url,
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": sorted(
                {a for c in identity.clients.values() for a in c.entry.algorithms}),
            "grant_types_supported": ["client_credentials"],
            "scopes_supported": sorted({s for c in identity.clients.values() for s in c.entry.scopes}),
            "capabilities": ["client-confidential-asymmetric"],
        })

    return {"token": token, "jwks": jwks, "smart_configuration": smart_configuration}
