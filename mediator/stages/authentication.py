"""Stage 4: who is calling, proven cryptographically; builds `exchange.principal`.

The client is proven by a mediator access token (`Authorization: Bearer`, from /auth/token) and/or a
TLS client certificate mapped to a registered client; when both are present they must name the same
client. The client must be enabled, allowed that method, and calling from its own networks. The user
is then proven by an SSO token (`X-User-Token`, verified against the client's configured issuer and bound
to the presenting client through `azp`/`client_id`), or, only for mTLS clients flagged
`trust_user_header`, named by `X-User-Name`: that name must be a claim administrator openIMIS knows
(the facility directory) of a facility the client is registered for, and the user then acts for that one
facility. Otherwise the header is ignored. A user is identified by who vouches for them
(`Principal.user_key`: the token's issuer, or the client of a trusted header). A channel with
`authentication: none` skips all of this (explicit open channels only).

Failures: 401 + `WWW-Authenticate: Bearer ... error="invalid_token"` (RFC 6750 §3) for credentials
that do not prove anything; 403 for authenticated callers that are not allowed. Reason codes are
`authentication.<check>`; token checks are `authentication.access_token_<check>` and
`authentication.user_token_<check>` with <check> from `mediator.identity.verify`.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mediator.config.clients import UserTokenPolicy
from mediator.facilities import DirectoryUnavailable, FacilityDirectory
from mediator.identity import Identity, PeerCertificate, RegisteredClient, describe_certificate
from mediator.identity.keys import ACCESS_TOKEN_TYPE
from mediator.identity.replay import ReplayStoreUnavailable
from mediator.identity.verify import Expectations, Failure, verify
from mediator.logs import JsonEvent
from mediator.pipeline import Decision, Exchange, Principal

log = logging.getLogger("mediator.identity")

REALM = "openimis-mediator"
USER_TOKEN_HEADER = "X-User-Token"
USER_NAME_HEADER = "X-User-Name"
USER_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
SIGNING_ALGORITHMS = ("ES256",)


def _challenge(error: str | None = None) -> dict[str, str]:
    # error_description is never the token or a key; the OperationOutcome says which check failed.
    value = f'Bearer realm="{REALM}"' + (f', error="{error}"' if error else "")
    return {"WWW-Authenticate": value}


def unauthenticated(reason: str, message: str, error: str | None = "invalid_token") -> Decision:
    return Decision.denied(f"authentication.{reason}", 401, message, _challenge(error))


def forbidden(reason: str, message: str) -> Decision:
    return Decision.denied(f"authentication.{reason}", 403, message)


@dataclass(frozen=True, slots=True)
class Credentials:
    """What the request presents, read from the request once (the adapter's job)."""

    authorization: str | None
    certificate: PeerCertificate | None
    user_token: str | None
    user_name: str | None


@dataclass(frozen=True, slots=True)
class ClientProof:
    client: RegisteredClient
    method: str
    scopes: frozenset[str]
    claims: dict[str, Any]


async def prove_client(creds: Credentials, identity: Identity, now: int) -> ClientProof | Decision:
    cert_client: RegisteredClient | None = None
    if creds.certificate is not None:
        matches = identity.client_for_certificate(creds.certificate)
        if len(matches) != 1:
            return unauthenticated("unknown_client_certificate", "the client certificate is not registered")
        cert_client = matches[0]
        if "mtls" not in cert_client.entry.auth_methods:
            return unauthenticated("method_not_allowed", "this client may not authenticate with a certificate")
    if creds.authorization is None:
        if cert_client is None:
            return unauthenticated("missing_credentials", "send a bearer access token or a client certificate",
                                   error=None)
        return ClientProof(cert_client, "mtls", frozenset(cert_client.entry.scopes),
                           {"cert_sha256": creds.certificate.sha256} if creds.certificate else {})
    scheme, _, token = creds.authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return unauthenticated("malformed_authorization", "Authorization must be 'Bearer <access token>'",
                               error="invalid_request")
    if identity.signing_key is None:
        return unauthenticated("access_token_unknown_key", "this mediator issues no access tokens")
    expect = identity.expectations.get(("access_token", ""))
    if expect is None:
        expect = identity.expectations[("access_token", "")] = Expectations(
            issuer=identity.issuer, audience=identity.audience, algorithms=SIGNING_ALGORITHMS,
            leeway_s=identity.service.leeway_s if identity.service else 30,
            max_lifetime_s=identity.service.access_token_lifetime_s if identity.service else 300,
            required=("exp", "sub", "client_id", "scope", "jti"), typ=ACCESS_TOKEN_TYPE)
    result = verify(token.strip(), identity.signing_keys, expect, now, cache=identity.access_tokens)
    if isinstance(result, Failure):
        return unauthenticated(f"access_token_{result.check}", result.message)
    client_id = result.claims.get("client_id")
    client = identity.clients.get(client_id) if isinstance(client_id, str) else None
    if client is None or result.claims.get("sub") != client_id:
        return unauthenticated("unknown_client", "the token names no registered client")
    if cert_client is not None and cert_client.client_id != client.client_id:
        return unauthenticated("client_mismatch", "the certificate and the token name different clients")
    if "private_key_jwt" not in client.entry.auth_methods:
        return unauthenticated("method_not_allowed", "this client may not use access tokens")
    scope = result.claims.get("scope")
    # Scopes still allowed now: a scope removed from the registry stops working before the token expires.
    scopes = frozenset(scope.split()) & frozenset(client.entry.scopes) if isinstance(scope, str) else frozenset()
    claims: dict[str, Any] = {"token_jti": result.claims.get("jti")}
    if cert_client is not None and creds.certificate is not None:
        claims["cert_sha256"] = creds.certificate.sha256
    return ClientProof(client, "access_token", scopes, claims)


def _strings(value: Any) -> frozenset[str] | None:
    if isinstance(value, str):
        return frozenset({value})
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return frozenset(value)
    return None


def _party_refusal(policy: UserTokenPolicy, client_id: str, claims: Mapping[str, Any]) -> Decision | None:
    """A user token is bound to the client it was issued to: `azp` and `client_id`, where the token
    has them, must each name the presenting client (its id or one of `user_token.client_aliases`);
    with `user_token.require_client_binding` a token naming neither is refused too."""
    accepted = {client_id, *policy.client_aliases}
    named = [claims[name] for name in ("azp", "client_id") if name in claims]
    if not named:
        if policy.require_client_binding:
            return unauthenticated("user_token_client_unbound",
                                   "user token: azp or client_id naming this client is required")
        return None
    if any(not isinstance(value, str) or value not in accepted for value in named):
        return unauthenticated("user_token_wrong_client", "user token: issued to another client (azp/client_id)")
    return None


async def prove_user(proof: ClientProof, creds: Credentials, identity: Identity, now: int,
                     users: VouchedUsers | None = None) -> Principal | Decision:
    client = proof.client
    entry = client.entry
    registered = frozenset(entry.health_facilities)
    base: dict[str, Any] = {"client_id": client.client_id, "scopes": proof.scopes,
                            "roles": frozenset(entry.default_roles), "health_facilities": registered}
    policy = entry.user_token
    if creds.user_token is not None:
        if policy is None or client.user_token_keys is None:
            return unauthenticated("user_token_not_accepted", "this client is not configured for user tokens")
        expect = identity.expectations.get(("user_token", client.client_id))
        if expect is None:
            expect = identity.expectations[("user_token", client.client_id)] = Expectations(
                issuer=policy.issuer, audience=policy.audience or identity.audience, algorithms=policy.algorithms,
                leeway_s=policy.leeway_s, max_lifetime_s=policy.max_lifetime_s,
                required=("exp", policy.claims.user_id) + (("jti",) if policy.replay_check else ()))
        verified = await client.user_token_keys.verify(creds.user_token, expect, now)
        if isinstance(verified, Failure):
            return unauthenticated(f"user_token_{verified.check}", f"user token: {verified.message}")
        claims = verified.claims
        user_id = claims.get(policy.claims.user_id)
        if not isinstance(user_id, str) or not user_id:
            return unauthenticated("user_token_invalid_claim", "user token: the user id claim is not a string")
        refusal = _party_refusal(policy, client.client_id, claims)
        if refusal is not None:
            return refusal
        if policy.replay_check:
            jti = claims.get("jti")
            try:
                first = await identity.replay.first_use(f"user:{policy.issuer}", str(jti),
                                                        float(claims["exp"]) + policy.leeway_s)
            except ReplayStoreUnavailable:
                return Decision.denied("authentication.replay_store_unavailable", 503, "try again later")
            if not first:
                return unauthenticated("user_token_replayed", "user token: already used")
        roles = base["roles"]
        if policy.claims.roles in claims:
            user_roles = _strings(claims[policy.claims.roles])
            if user_roles is None:
                return unauthenticated("user_token_invalid_claim", "user token: roles must be strings")
            # The application keeps its own roles (e.g. master-data download) and gains the user's;
            # `user/` permissions still need the user, so a system role cannot act as a user.
            roles = roles | user_roles
        facilities = registered
        if policy.claims.health_facility in claims:
            claimed = _strings(claims[policy.claims.health_facility])
            if claimed is None:
                return unauthenticated("user_token_invalid_claim", "user token: health facility must be strings")
            facilities = claimed
            if not facilities <= registered:
                return forbidden("facility_not_registered",
                                 "the user's health facility is not registered for this client")
        safe_claims = {"iss": policy.issuer, **proof.claims}
        return Principal(client.client_id, proof.method, user_id, roles, proof.scopes, facilities, safe_claims,
                         vouched_by=f"iss={policy.issuer}")
    if policy is not None and policy.required:
        return unauthenticated("user_token_missing", f"send the user's token in {USER_TOKEN_HEADER}")
    if creds.user_name is not None and proof.method == "mtls" and entry.trust_user_header:
        if not USER_NAME_PATTERN.match(creds.user_name):
            return Decision.denied("authentication.malformed_user_name", 400, f"malformed {USER_NAME_HEADER}")
        facility = await _facility_of_vouched_user(creds.user_name, registered, users)
        if isinstance(facility, Decision):
            return facility
        return Principal(client.client_id, "trusted_header", creds.user_name, base["roles"], proof.scopes,
                         frozenset({facility}), dict(proof.claims), vouched_by=f"client={client.client_id}")
    # X-User-Name from anyone else is ignored: never trusted, never forwarded (upstream allowlist).
    return Principal(client.client_id, proof.method, None, base["roles"], proof.scopes, registered,
                     dict(proof.claims))


@dataclass(frozen=True, slots=True)
class VouchedUsers:
    """Who a trusted header may name: openIMIS's claim administrators, from the facility directory that
    authorization uses (policies/authorization.yaml `facility_directory`)."""

    directory: FacilityDirectory
    refresh_on_miss_after_s: float = 30.0
    """An unknown name reloads the directory once if it is older than this (a newly created claim
    administrator); so a flood of unknown names costs at most one reload per interval."""


async def _facility_of_vouched_user(name: str, registered: frozenset[str],
                                    users: VouchedUsers | None) -> str | Decision:
    """The one health facility a trusted-header user acts for: the facility openIMIS has them as claim
    administrator of, which must be one the client is registered for."""
    if users is None:
        return forbidden("unknown_user", f"{USER_NAME_HEADER} cannot be checked: no facility directory is "
                                         "configured (policies/authorization.yaml)")
    try:
        snapshot = await users.directory.snapshot()
        facility = snapshot.facility_of_claim_administrator(name)
        if facility is None:
            fresher = await users.directory.snapshot(max_age_s=users.refresh_on_miss_after_s)
            facility = fresher.facility_of_claim_administrator(name)
    except DirectoryUnavailable:
        return Decision.denied("authentication.directory_unavailable", 503,
                               "the facility directory is unavailable; try again later", {"Retry-After": "5"})
    if facility is not None and facility in registered:
        return facility
    # SECURITY: one answer for "nobody" and "a claim administrator of a facility not yours": two answers
    # would tell the client which codes exist at other facilities. The log tells operators which it was.
    log.info(JsonEvent.of("authentication.vouched_user_refused",
                           why="unknown" if facility is None else "facility_not_registered"))
    return forbidden("unknown_user", f"{USER_NAME_HEADER} names no claim administrator of a health facility "
                                     "registered for this client")


async def decide(creds: Credentials, client_ip: Any, identity: Identity, now: int,
                 users: VouchedUsers | None = None) -> tuple[Decision, Principal | None]:
    proof = await prove_client(creds, identity, now)
    if isinstance(proof, Decision):
        return proof, None
    if not proof.client.entry.enabled:
        return forbidden("client_disabled", "this client is disabled"), None
    if not identity.address_allowed(proof.client, client_ip):
        return forbidden("client_ip_denied", "this client may not call from this address"), None
    principal = await prove_user(proof, creds, identity, now, users)
    if isinstance(principal, Decision):
        return principal, None
    return Decision.allowed("authentication.authenticated", principal.auth_method), principal


def read_credentials(exchange: Exchange) -> Credentials | Decision:
    request = exchange.request
    headers = request.headers
    for name in ("Authorization", USER_TOKEN_HEADER, USER_NAME_HEADER):
        if len(headers.getall(name, [])) > 1:
            return Decision.denied("authentication.repeated_header", 400, f"more than one {name} header")
    certificate = describe_certificate(request.peer_certificate) if request.peer_certificate else None
    return Credentials(headers.get("Authorization"), certificate, headers.get(USER_TOKEN_HEADER),
                       headers.get(USER_NAME_HEADER))


class AuthenticationStage:
    name = "authentication"

    def __init__(self, identity: Identity, users: VouchedUsers | None = None) -> None:
        self.identity = identity
        self.users = users
        """Where trusted-header user names are checked (None: no directory, such names are refused)."""

    async def run(self, exchange: Exchange) -> Decision:
        channel = exchange.channel
        if channel is not None and channel.config.authentication == "none":
            return Decision.allowed("authentication.not_required")
        creds = read_credentials(exchange)
        if isinstance(creds, Decision):
            decision = creds
        else:
            decision, exchange.principal = await decide(creds, exchange.client_ip, self.identity, int(time.time()),
                                                       self.users)
        principal = exchange.principal
        # Denials at INFO; an allow at DEBUG only: the audit event already records who made every
        # request, and one more INFO line per request cost about 3 % of the mediator's CPU (bench).
        level = logging.DEBUG if decision.allow else logging.INFO
        if not log.isEnabledFor(level):
            return decision
        log.log(level, JsonEvent.of("authentication.decided", request_id=exchange.request_id,
                                     outcome="allow" if decision.allow else "deny", reason=decision.reason,
                                     client_id=principal.client_id if principal else None,
                                     method=principal.auth_method if principal else None))
        return decision
