"""JWKS over a real local aiohttp server: cached, refreshed in the background, one throttled refetch
on an unknown kid, last good keys kept when the IdP is down; and user tokens verified through it."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web
from joserfc.jwk import ECKey

from mediator.identity.keys import JwksCache
from tests.conftest import channels_yaml, upstream_url
from tests.identity.kit import AUTH_CHANNELS, KEYS_FOR_JWKS, clients_yaml, form, good_assertion, user_token, write_keys


class Idp:
    """A stand-in IdP publishing a JWKS we control; `down` makes it answer 503."""

    def __init__(self) -> None:
        self.keys: list[ECKey] = []
        self.down = False
        self.hits = 0

    def publish(self, *keys: ECKey) -> None:
        self.keys = list(keys)

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        if self.down:
            return web.Response(status=503)
        return web.json_response({"keys": [dict(k.as_dict(private=False), kid=k.kid) for k in self.keys]})


def _key(kid: str) -> ECKey:
    key = ECKey.generate_key("P-256", parameters={"kid": kid})
    return key


@pytest.fixture
async def idp(aiohttp_server):
    provider = Idp()
    app = web.Application()
    app.router.add_get("/jwks", provider.handle)
    server = await aiohttp_server(app)
    provider.url = str(server.make_url("/jwks"))
    return provider


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_unknown_kid_refetches_once_per_interval_and_keeps_last_good_keys(idp):
    first, rotated, later = _key("k1"), _key("k2"), _key("k3")
    idp.publish(first)
    clock = Clock()
    cache = JwksCache(idp.url, refresh_s=3600, min_refetch_s=30, clock=clock)
    async with aiohttp.ClientSession() as session:
        await cache.start(session)
        try:
            assert [k.kid for k in cache.keys.keys] == ["k1"]
            idp.publish(first, rotated)
            assert await cache.refetch_for_unknown_kid() is True
            assert {k.kid for k in cache.keys.keys} == {"k1", "k2"}
            idp.publish(later)
            # Within the interval an unknown kid (e.g. an attacker's) causes no fetch at all.
            hits = idp.hits
            assert await cache.refetch_for_unknown_kid() is False
            assert idp.hits == hits
            # Many concurrent unknown kids after the interval: one fetch.
            clock.now += 31
            results = await asyncio.gather(*(cache.refetch_for_unknown_kid() for _ in range(10)))
            assert results.count(True) == 1 and idp.hits == hits + 1
            # IdP down: the last good keys stay.
            idp.down = True
            clock.now += 31
            assert await cache.refetch_for_unknown_kid() is True
            assert [k.kid for k in cache.keys.keys] == ["k3"]
        finally:
            await cache.close()


async def test_background_refresh_picks_up_new_keys(idp):
    idp.publish(_key("k1"))
    cache = JwksCache(idp.url, refresh_s=0.01, min_refetch_s=30)
    async with aiohttp.ClientSession() as session:
        await cache.start(session)
        try:
            idp.publish(_key("k9"))
            for _ in range(500):  # waits for the refresher task, not a timing assertion
                if cache.keys is not None and [k.kid for k in cache.keys.keys] == ["k9"]:
                    break
                await asyncio.sleep(0.01)
            assert [k.kid for k in cache.keys.keys] == ["k9"]
        finally:
            await cache.close()


async def test_hmac_and_private_keys_in_a_jwks_are_ignored(idp, aiohttp_server):
    secret = {"kty": "oct", "k": "c2VjcmV0", "kid": "hs"}
    private = _key("priv").as_dict(private=True)

    async def handle(request):
        return web.json_response({"keys": [secret, private, dict(_key("ok").as_dict(private=False), kid="ok")]})

    app = web.Application()
    app.router.add_get("/jwks", handle)
    server = await aiohttp_server(app)
    cache = JwksCache(str(server.make_url("/jwks")), refresh_s=3600, min_refetch_s=30)
    async with aiohttp.ClientSession() as session:
        await cache.start(session)
        await cache.close()
    assert [k.kid for k in cache.keys.keys] == ["ok"]


async def test_user_tokens_verify_through_the_idp_jwks_and_rotation(idp, tmp_path, sandbox_server, make_mediator):
    old, new = _key("2024"), _key("2025")
    idp.publish(old)
    write_keys(tmp_path / "config", KEYS_FOR_JWKS)
    client = await make_mediator(
        channels_yaml(upstream_url(sandbox_server), channels=AUTH_CHANNELS),
        extra_policies={"clients.yaml": clients_yaml(user_token_keys=f"jwks_url: {idp.url}", required_user=True)})
    token = (await (await client.post("/auth/token", data=form(good_assertion(KEYS_FOR_JWKS)))).json())["access_token"]
    auth = {"Authorization": f"Bearer {token}"}

    async def call(user: str | None) -> tuple[int, str]:
        headers = dict(auth, **({"X-User-Token": user} if user else {}))
        response = await client.get("/fhir/Medication/", headers=headers)
        body = await response.json()
        return response.status, body["issue"][0]["details"]["coding"][0]["code"] if "issue" in body else "ok"

    assert await call(user_token(old, kid="2024")) == (200, "ok")
    assert await call(None) == (401, "authentication.user_token_missing")
    idp.publish(old, new)  # rotation: the new kid is fetched on first sight
    assert await call(user_token(new, kid="2025")) == (200, "ok")
    hits = idp.hits
    assert await call(user_token(_key("evil"), kid="evil")) == (401, "authentication.user_token_unknown_key")
    assert await call(user_token(_key("evil2"), kid="evil2")) == (401, "authentication.user_token_unknown_key")
    assert idp.hits == hits  # the rotation fetch moments ago throttles refetches: forged kids cost nothing
    idp.down = True
    assert await call(user_token(new, kid="2025")) == (200, "ok")  # last good keys
