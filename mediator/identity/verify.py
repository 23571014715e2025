"""One JWT verifier for every token the mediator accepts: client assertions, its own access tokens
and SSO user tokens. It returns a value (claims, or the name of the check that failed), never raises.

Order of checks (RFC 8725): shape → `alg` pinned (never `none`, never HS: keys are asymmetric) →
key chosen by `kid` from keys we configured (never from `jwk`/`jku`/`x5u` in the header) →
signature (joserfc) → `iss`, `aud`, `exp`, `nbf`, `iat` with bounded leeway → maximum lifetime.
"""

from __future__ import annotations

import binascii
import json
from collections import OrderedDict
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
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


@dataclass(slots=True)
class _SignatureChecked:
    key: PublicKey
    verified: Verified
    drop_after: float
    last_check: tuple[Expectations, int, Verified | Failure] | None = None
    """The last claim check: (the very Expectations object, `now` in whole seconds, its result).
    `check_claims` is a pure function of (claims, expectations, now), so the same inputs give it back."""


class VerifiedTokenCache:
    """Tokens whose signature already verified, so a token sent with every request costs one signature
    check (ECDSA/RSA: most of the time authentication takes), not one per request.

    Only the signature result is reused, and only when it is certain to be the same:
    * the key is the whole token string: a token differing in any byte is another entry;
    * an entry counts only if the key `pick_key` chooses now is the very key object that verified it
      (a JWKS refresh or a configuration reload makes new key objects, so a rotated-out key misses);
    * `alg`, `typ` and every claim (iss, aud, exp, nbf, iat, lifetime) are checked again on every use
      with the current time: an expired token is refused even while cached;
    * only tokens that passed every check are stored; an entry is dropped once its `exp` (plus the
      leeway it was checked with) has passed, and the least recently used entry goes beyond
      `max_entries` (bounded memory; a miss only costs a signature check).
    One instance per signer's keys (the mediator's own signing key; each client's user-token keys);
    used from the event loop only (no awaits inside, so no locking)."""

    def __init__(self, max_entries: int = 4096) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self.hits = 0
        """Signature checks saved so far (observability and tests)."""
        self._entries: OrderedDict[str, _SignatureChecked] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, token: object) -> bool:
        return token in self._entries

    def get(self, token: str, now: float) -> _SignatureChecked | None:
        entry = self._entries.get(token)
        if entry is None:
            return None
        if now > entry.drop_after:
            del self._entries[token]
            return None
        self._entries.move_to_end(token)
        return entry

    def put(self, token: str, key: PublicKey, verified: Verified, leeway_s: int) -> None:
        exp = verified.claims.get("exp")
        if not isinstance(exp, int | float):
            return
        # Read-only: one cached Verified is handed to many requests.
        frozen = Verified(MappingProxyType(dict(verified.header)), MappingProxyType(dict(verified.claims)))
        self._entries[token] = _SignatureChecked(key, frozen, float(exp) + leeway_s)
        self._entries.move_to_end(token)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


def verify(token: str, keys: KeySet, expect: Expectations, now: int,
           header: Mapping[str, Any] | None = None,
           cache: VerifiedTokenCache | None = None) -> Verified | Failure:
    """`cache`: reuse a previous signature check of this exact token with this exact key (see
    VerifiedTokenCache); every other check runs as without it."""
    cached = cache.get(token, now) if cache is not None else None
    if cached is not None:
        header = cached.verified.header
    elif header is None:
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
    if cached is not None and cached.key is key:
        assert cache is not None
        cache.hits += 1
        last = cached.last_check
        if last is not None and last[0] is expect and last[1] == now:
            return last[2]
        checked = check_claims(cached.verified.header, cached.verified.claims, expect, now)
        cached.last_check = (expect, now, checked)
        return checked
    try:
        token_obj = jwt.decode(token, key, algorithms=[alg])
    except JoseError:
        return Failure("bad_signature", "the token's signature does not verify")
    result = check_claims(token_obj.header, token_obj.claims, expect, now)
    if cache is not None and isinstance(result, Verified):
        cache.put(token, key, result, expect.leeway_s)
    return result


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
