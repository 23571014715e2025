"""One JWT verifier for every token the mediator accepts: client assertions, its own access tokens
and SSO user tokens. It returns a value (claims, or the name of the check that failed), never raises.

Order of checks (RFC 8725): shape → `alg` pinned (never `none`, never HS: keys are asymmetric) →
key chosen by `kid` from keys we configured (never from `jwk`/`jku`/`x5u` in the header) →
signature (joserfc) → `iss`, `aud`, `exp`, `nbf`, `iat` with bounded leeway → maximum lifetime.
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from joserfc import jws, jwt
from joserfc.errors import (
    ClaimError,
    ExpiredTokenError,
    JoseError,
    MissingClaimError,
)
from joserfc.jwk import ECKey, KeySet, OKPKey, RSAKey

PublicKey = RSAKey | ECKey | OKPKey
MAX_TOKEN_CHARS = 8192


@dataclass(frozen=True, slots=True)
class Failure:
    """A refused token. `check` is the snake_case name of the failed check (part of the reason code);
    `message` is safe to show: it never contains the token or key material."""

    check: str
    message: str


@dataclass(frozen=True, slots=True)
class Verified:
    header: Mapping[str, Any]
    claims: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Expectations:
    """What a token must say. `audience` matches a string `aud` or one element of a list `aud`."""

    issuer: str
    audience: str
    algorithms: Collection[str]
    leeway_s: int = 30
    max_lifetime_s: int = 3600
    required: tuple[str, ...] = ("exp",)
    typ: str | None = None
    """If set, the header `typ` must equal it (keeps one kind of token from passing as another)."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Further exact claim values, e.g. {"sub": client_id}."""


def unverified_header(token: str) -> dict[str, Any] | Failure:
    """The protected header, before verification: only to pick the key and pinned algorithm."""
    if not token or len(token) > MAX_TOKEN_CHARS or token.count(".") != 2:
        return Failure("malformed", "the token is not a compact JWS")
    try:
        header = dict(jws.extract_compact(token.encode("ascii")).protected)
    except (JoseError, ValueError, UnicodeError, binascii.Error, json.JSONDecodeError):
        return Failure("malformed", "the token is not a compact JWS")
    return header


def unverified_claims(token: str) -> dict[str, Any] | Failure:
    """The payload before verification: only to find which client's keys to verify with (`iss`)."""
    try:
        claims = json.loads(jws.extract_compact(token.encode("ascii")).payload)
    except (JoseError, ValueError, UnicodeError, binascii.Error):
        return Failure("malformed", "the token payload is not JSON")
    if not isinstance(claims, dict):
        return Failure("malformed", "the token payload is not a JSON object")
    return claims


def pick_key(keys: KeySet, header: Mapping[str, Any]) -> PublicKey | None:
    """The configured key named by `kid`; without `kid`, the only key there is. Never a header key."""
    kid = header.get("kid")
    if kid is not None:
        if not isinstance(kid, str):
            return None
        for key in keys.keys:
            if key.kid == kid and isinstance(key, RSAKey | ECKey | OKPKey):
                return key
        return None
    candidates = [k for k in keys.keys if isinstance(k, RSAKey | ECKey | OKPKey)]
    return candidates[0] if len(candidates) == 1 else None


def verify(token: str, keys: KeySet, expect: Expectations, now: int,
           header: Mapping[str, Any] | None = None) -> Verified | Failure:
    if header is None:
        parsed = unverified_header(token)
        if isinstance(parsed, Failure):
            return parsed
        header = parsed
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in expect.algorithms:
        return Failure("algorithm_not_allowed", "the token's alg is not allowed for this issuer")
    if expect.typ is not None and header.get("typ") != expect.typ:
        return Failure("wrong_type", f"the token's typ must be {expect.typ}")
    key = pick_key(keys, header)
    if key is None:
        return Failure("unknown_key", "no configured key matches the token's kid")
    try:
        token_obj = jwt.decode(token, key, algorithms=[alg])
    except JoseError:
        return Failure("bad_signature", "the token's signature does not verify")
    return check_claims(token_obj.header, token_obj.claims, expect, now)


def _claim_failure(claim: str, claims: Mapping[str, Any]) -> Failure:
    if claim in ("nbf", "iat") and isinstance(claims.get(claim), int | float):
        return Failure("not_yet_valid", "the token is not valid yet")
    if claim == "iss":
        return Failure("wrong_issuer", "the token's iss is not the expected issuer")
    if claim == "aud":
        return Failure("wrong_audience", "the token's aud does not name this mediator")
    return Failure("invalid_claim", f"the token's {claim} claim is invalid")


def check_claims(header: Mapping[str, Any], claims: Mapping[str, Any], expect: Expectations,
                 now: int) -> Verified | Failure:
    options: dict[str, Any] = {name: {"essential": True} for name in expect.required}
    options["iss"] = {"essential": True, "value": expect.issuer}
    options["aud"] = {"essential": True, "value": expect.audience}
    for name, value in expect.extra.items():
        options[name] = {"essential": True, "value": value}
    registry = jwt.JWTClaimsRegistry(now=now, leeway=expect.leeway_s, **options)
    try:
        registry.validate(dict(claims))
    except MissingClaimError as exc:
        return Failure("missing_claim", f"the token lacks claim(s) {exc.claim}")
    except ExpiredTokenError:
        return Failure("expired", "the token has expired")
    except ClaimError as exc:
        return _claim_failure(exc.claim, claims)
    exp = claims["exp"]
    start = claims.get("iat", claims.get("nbf", now))
    if exp - now > expect.max_lifetime_s + expect.leeway_s or \
            (isinstance(start, int | float) and exp - start > expect.max_lifetime_s + expect.leeway_s):
        return Failure("lifetime_too_long", "the token lives longer than allowed")
    return Verified(header, claims)
