"""VerifiedTokenCache: a signature check is reused only for the same token and the same key object, and
every other check (alg, typ, iss, aud, exp, nbf, lifetime) still runs on every use. Keys are generated
at test time; tokens are real ES256 JWTs."""

from __future__ import annotations

import time
import uuid

import pytest
from joserfc.jwk import ECKey, KeySet

from mediator.identity.verify import Expectations, Failure, Verified, VerifiedTokenCache, verify
from tests.identity.kit import sign

ISSUER = "https://idp.example"
AUDIENCE = "https://mediator.example.org/fhir/"
KEY = ECKey.generate_key("P-256", parameters={"kid": "k1"})
EXPECT = Expectations(issuer=ISSUER, audience=AUDIENCE, algorithms=("ES256",), leeway_s=30, max_lifetime_s=600)


def token(key: ECKey = KEY, *, lifetime_s: int = 300, now: int | None = None, **changes: object) -> str:
    now = int(time.time()) if now is None else now
    claims = {"iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + lifetime_s, "sub": "dr.amina",
              "jti": uuid.uuid4().hex, **changes}
    return sign({"alg": "ES256", "kid": key.kid}, claims, key)


def test_a_token_verified_once_is_served_from_the_cache_with_the_same_claims():
    cache, keys, now = VerifiedTokenCache(), KeySet([KEY]), int(time.time())
    jwt_text = token(now=now)
    first = verify(jwt_text, keys, EXPECT, now, cache=cache)
    assert isinstance(first, Verified) and cache.hits == 0 and jwt_text in cache
    second = verify(jwt_text, keys, EXPECT, now + 1, cache=cache)
    assert isinstance(second, Verified) and cache.hits == 1
    assert dict(second.claims) == dict(first.claims)


def test_an_expired_token_is_refused_even_while_cached():
    cache, keys, now = VerifiedTokenCache(), KeySet([KEY]), int(time.time())
    jwt_text = token(now=now, lifetime_s=60)
    assert isinstance(verify(jwt_text, keys, EXPECT, now, cache=cache), Verified)
    # Still cached (it was stored with a 30 s leeway), but this check allows no leeway: refused.
    strict = Expectations(issuer=ISSUER, audience=AUDIENCE, algorithms=("ES256",), leeway_s=0, max_lifetime_s=600)
    result = verify(jwt_text, keys, strict, now + 61, cache=cache)
    assert result == Failure("expired", "the token has expired")
    assert cache.hits == 1   # the refusal came from the claim check on a cache hit
    # Past exp + the leeway it was stored with, the entry is dropped and the token refused all the same.
    assert verify(jwt_text, keys, EXPECT, now + 60 + 31, cache=cache) == Failure("expired", "the token has expired")
    assert jwt_text not in cache


@pytest.mark.parametrize(("expect", "check"), [
    (Expectations(issuer=ISSUER, audience="https://other.example/fhir/", algorithms=("ES256",)), "wrong_audience"),
    (Expectations(issuer="https://evil.example", audience=AUDIENCE, algorithms=("ES256",)), "wrong_issuer"),
    (Expectations(issuer=ISSUER, audience=AUDIENCE, algorithms=("RS256",)), "algorithm_not_allowed"),
    (Expectations(issuer=ISSUER, audience=AUDIENCE, algorithms=("ES256",), typ="at+jwt"), "wrong_type"),
    (Expectations(issuer=ISSUER, audience=AUDIENCE, algorithms=("ES256",), max_lifetime_s=60), "lifetime_too_long"),
    (Expectations(issuer=ISSUER, audience=AUDIENCE, algorithms=("ES256",), required=("exp", "client_id")),
     "missing_claim"),
])
def test_every_other_check_still_runs_on_a_cached_token(expect, check):
    cache, keys, now = VerifiedTokenCache(), KeySet([KEY]), int(time.time())
    jwt_text = token(now=now)
    assert isinstance(verify(jwt_text, keys, EXPECT, now, cache=cache), Verified)
    result = verify(jwt_text, keys, expect, now, cache=cache)
    assert isinstance(result, Failure) and result.check == check


def test_a_cached_token_is_checked_again_when_the_key_under_its_kid_changes():
    cache, now = VerifiedTokenCache(), int(time.time())
    jwt_text = token(now=now)
    assert isinstance(verify(jwt_text, KeySet([KEY]), EXPECT, now, cache=cache), Verified)
    rotated = ECKey.generate_key("P-256", parameters={"kid": "k1"})   # same kid, another key (JWKS rotation)
    result = verify(jwt_text, KeySet([rotated]), EXPECT, now, cache=cache)
    assert result == Failure("bad_signature", "the token's signature does not verify")
    assert cache.hits == 0
    gone = verify(jwt_text, KeySet([ECKey.generate_key("P-256", parameters={"kid": "k2"})]), EXPECT, now, cache=cache)
    assert isinstance(gone, Failure) and gone.check == "unknown_key"


def test_a_tampered_copy_of_a_cached_token_is_another_token():
    cache, keys, now = VerifiedTokenCache(), KeySet([KEY]), int(time.time())
    jwt_text = token(now=now)
    assert isinstance(verify(jwt_text, keys, EXPECT, now, cache=cache), Verified)
    head, payload, signature = jwt_text.split(".")
    flipped = "A" if signature[10] != "A" else "B"   # a middle character: six signature bits change
    forged = f"{head}.{payload}.{signature[:10]}{flipped}{signature[11:]}"
    assert verify(forged, keys, EXPECT, now, cache=cache) == Failure("bad_signature",
                                                                     "the token's signature does not verify")
    assert forged not in cache and len(cache) == 1


def test_refused_tokens_are_never_stored():
    cache, keys, now = VerifiedTokenCache(), KeySet([KEY]), int(time.time())
    expired = token(now=now - 1000)
    wrong_key = token(ECKey.generate_key("P-256", parameters={"kid": "k1"}), now=now)
    for jwt_text in (expired, wrong_key, "not.a.token"):
        assert isinstance(verify(jwt_text, keys, EXPECT, now, cache=cache), Failure)
    assert len(cache) == 0


def test_the_cache_is_bounded_and_drops_the_least_recently_used():
    cache, keys, now = VerifiedTokenCache(max_entries=3), KeySet([KEY]), int(time.time())
    tokens = [token(now=now) for _ in range(5)]
    for jwt_text in tokens[:3]:
        assert isinstance(verify(jwt_text, keys, EXPECT, now, cache=cache), Verified)
    assert isinstance(verify(tokens[0], keys, EXPECT, now, cache=cache), Verified)   # now the most recent
    for jwt_text in tokens[3:]:
        assert isinstance(verify(jwt_text, keys, EXPECT, now, cache=cache), Verified)
    assert len(cache) == 3
    assert [t in cache for t in tokens] == [True, False, False, True, True]


def test_cached_claims_cannot_be_changed_by_a_caller():
    cache, keys, now = VerifiedTokenCache(), KeySet([KEY]), int(time.time())
    jwt_text = token(now=now)
    verify(jwt_text, keys, EXPECT, now, cache=cache)
    cached = verify(jwt_text, keys, EXPECT, now, cache=cache)
    assert isinstance(cached, Verified)
    with pytest.raises(TypeError):
        cached.claims["sub"] = "someone.else"  # type: ignore[index]


def test_a_cache_needs_room_for_one_entry():
    with pytest.raises(ValueError, match="max_entries must be at least 1"):
        VerifiedTokenCache(max_entries=0)


def test_a_claim_check_is_reused_within_the_same_second_only():
    strict = Expectations(issuer=ISSUER, audience=AUDIENCE, algorithms=("ES256",), leeway_s=0, max_lifetime_s=600)
    cache, keys, now = VerifiedTokenCache(), KeySet([KEY]), int(time.time())
    jwt_text = token(now=now, lifetime_s=60)
    assert isinstance(verify(jwt_text, keys, strict, now, cache=cache), Verified)
    checked = verify(jwt_text, keys, strict, now + 59, cache=cache)
    assert isinstance(checked, Verified)
    assert verify(jwt_text, keys, strict, now + 59, cache=cache) is checked        # same expectations, same second
    assert verify(jwt_text, keys, strict, now + 61, cache=cache) == Failure("expired", "the token has expired")
    other = Expectations(issuer=ISSUER, audience="https://other.example/fhir/", algorithms=("ES256",), leeway_s=0)
    assert verify(jwt_text, keys, other, now + 59, cache=cache) == Failure(
        "wrong_audience", "the token's aud does not name this mediator")
