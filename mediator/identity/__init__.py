"""Identity: who is calling, proven cryptographically (README "Authentication").

`Identity.from_config` compiles policies/clients.yaml once: the client registry (certificate
matchers, key sources, networks), the mediator's signing key, the replay store and one `JwksCache`
per JWKS URL. The authentication stage and the token endpoint (`mediator.identity.token_service`)
share one Identity per runtime.

Lifetime: started and closed through the Runtime (`mediator.app.Runtime.start_new/close_retired`). On a
reload the new Identity is compiled afresh (clients, keys read from files, IP sets) but takes over the
previous one's live parts when their settings are unchanged: the replay store (so a token id seen before
the reload is still refused after it), each JWKS cache with the same URL and timings (keys and refresh
task kept), and the HTTP session the caches use.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import os
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
from cryptography import x509
from cryptography.x509.oid import NameOID
from joserfc.jwk import ECKey, KeySet

from mediator.addresses import CompiledIpSet, IPAddress, IpSetTable
from mediator.config import Config
from mediator.config.clients import ClientEntry, ClientsPolicy, KeySource, TokenService
from mediator.errors import MediatorError
from mediator.gcra import GcraLimit, LocalGcraStore
from mediator.identity.keys import (
    JwksCache,
    load_jwks_file,
    load_or_create_signing_key,
    load_public_key_file,
)
from mediator.identity.replay import MemoryReplayStore, RedisReplayStore, ReplayStore
from mediator.identity.verify import Expectations, Failure, Verified, VerifiedTokenCache, verify

POLICY_KEY = "clients"
VERIFIED_TOKENS_PER_SIGNER = 4096
"""Bound of each VerifiedTokenCache (the mediator's access tokens; each client's user tokens)."""


class KeyProvider:
    """The public keys of one signer: fixed (file) or a JWKS URL kept fresh by a JwksCache."""

    def __init__(self, static: KeySet | None = None, cache: JwksCache | None = None,
                 verified: VerifiedTokenCache | None = None) -> None:
        self.static = static
        self.cache = cache
        self.verified = verified
        """Signature checks to reuse (tokens sent again and again: user tokens); None: check every time."""

    def current(self) -> KeySet:
        if self.static is not None:
            return self.static
        if self.cache is not None and self.cache.keys is not None:
            return self.cache.keys
        return KeySet([])

    async def verify(self, token: str, expect: Expectations, now: int) -> Verified | Failure:
        result = verify(token, self.current(), expect, now, cache=self.verified)
        # An unknown kid may be a key the IdP just rotated in: one throttled refetch, then decide.
        if isinstance(result, Failure) and result.check == "unknown_key" and self.cache is not None:
            if await self.cache.refetch_for_unknown_kid():
                result = verify(token, self.current(), expect, now, cache=self.verified)
        return result


@dataclass(frozen=True, slots=True)
class RegisteredClient:
    client_id: str
    entry: ClientEntry
    networks: CompiledIpSet
    """The client's own `cidrs`."""
    assertion_keys: KeyProvider | None
    user_token_keys: KeyProvider | None


@dataclass(frozen=True, slots=True)
class PeerCertificate:
    sha256: str
    subject_cn: str | None


@functools.lru_cache(maxsize=1024)
def describe_certificate(der: bytes) -> PeerCertificate:
    """The fingerprint and subject CN of a client certificate (DER). A pure function of the bytes, and a
    client sends the same certificate with every request: parsed and hashed once per certificate
    (bounded, least recently used out), not once per request."""
    return _describe_certificate(der)


def _describe_certificate(der: bytes) -> PeerCertificate:
    cn: str | None = None
    try:
        names = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if len(names) == 1 and isinstance(names[0].value, str):
            cn = names[0].value
    except ValueError:
        cn = None
    return PeerCertificate(hashlib.sha256(der).hexdigest(), cn)


class Identity:
    """Compiled identity configuration and its live resources (JWKS caches, replay store)."""

    def __init__(self, *, clients: dict[str, RegisteredClient], ip_sets: IpSetTable,
                 service: TokenService | None, signing_key: ECKey | None, issuer: str, token_url: str,
                 audience: str, replay: ReplayStore, jwks: dict[str, JwksCache],
                 replay_spec: tuple[str, ...] = ("memory",),
                 session: aiohttp.ClientSession | None = None) -> None:
        self.clients = clients
        self.ip_sets = ip_sets
        self.service = service
        self.signing_key = signing_key
        self.issuer = issuer
        self.token_url = token_url
        self.audience = audience
        self.replay = replay
        self.jwks = jwks
        self.replay_spec = replay_spec
        """What the replay store is (kind, URL, prefix): equal specs mean the store can be handed over."""
        self._session = session
        self.signing_keys = KeySet([signing_key]) if signing_key is not None else KeySet([])
        self.access_tokens = VerifiedTokenCache(VERIFIED_TOKENS_PER_SIGNER)
        """Signature checks of our own access tokens (sent with every request until they expire)."""
        self.token_requests = LocalGcraStore(max_keys=10_000)
        """Per-address admission to POST /auth/token (token_service.requests_per_minute_per_address)."""
        rate = service.requests_per_minute_per_address if service is not None else 60
        burst = service.request_burst if service is not None else 20
        emission = 60_000_000 // rate
        self.token_request_limit = GcraLimit("auth-token-per-address", rate, 60, emission, emission * burst, burst)
        self.expectations: dict[tuple[str, str], Expectations] = {}
        """What each kind of token must say, built once per runtime by the authentication stage: one
        stable object per kind lets a VerifiedTokenCache hit reuse the claim check of the same second."""

    @classmethod
    def from_config(cls, config: Config, previous: Identity | None = None) -> Identity:
        """`previous`: the running Identity on a reload; its live parts are taken over where unchanged."""
        base = config.channels.server.public_base_url
        parts = urlsplit(base)
        origin = f"{parts.scheme}://{parts.netloc}"
        ip_sets = IpSetTable.from_config(config)
        if POLICY_KEY not in config.policies:
            return cls(clients={}, ip_sets=ip_sets, service=None, signing_key=None, issuer=origin,
                       token_url=f"{origin}/auth/token", audience=base,
                       replay=_kept_replay(previous, ("memory",)) or MemoryReplayStore(), jwks={})
        policy = config.policy(POLICY_KEY, ClientsPolicy)
        service = policy.token_service
        jwks: dict[str, JwksCache] = {}
        running = previous.jwks if previous is not None else {}

        def provider(source: KeySource | None, reused: bool = False) -> KeyProvider | None:
            """`reused`: tokens of this signer come again with every request (user tokens), so
            signature checks are cached; client assertions are single-use, so they are not."""
            if source is None:
                return None
            verified = VerifiedTokenCache(VERIFIED_TOKENS_PER_SIGNER) if reused else None
            if source.jwks_url is not None:
                if source.jwks_url not in jwks:
                    kept = running.get(source.jwks_url)
                    unchanged = kept is not None and kept.refresh_s == service.jwks_refresh_s \
                        and kept.min_refetch_s == service.jwks_min_refetch_s
                    jwks[source.jwks_url] = kept if kept is not None and unchanged else JwksCache(
                        source.jwks_url, service.jwks_refresh_s, service.jwks_min_refetch_s)
                return KeyProvider(cache=jwks[source.jwks_url], verified=verified)
            if source.public_key_file is not None:
                return KeyProvider(static=load_public_key_file(config.root / source.public_key_file),
                                   verified=verified)
            assert source.jwks_file is not None  # KeySource validates exactly one
            return KeyProvider(static=load_jwks_file(config.root / source.jwks_file), verified=verified)

        clients = {
            client_id: RegisteredClient(
                client_id, entry, CompiledIpSet(tuple(ipaddress.ip_network(c) for c in entry.cidrs), ()),
                provider(entry.keys), provider(entry.user_token.keys if entry.user_token else None, reused=True))
            for client_id, entry in policy.clients.items()
        }
        spec = _replay_spec(service)
        return cls(clients=clients, ip_sets=ip_sets, service=service,
                   signing_key=load_or_create_signing_key(config.root / service.signing_key_file),
                   issuer=service.issuer or origin, token_url=service.token_url or f"{origin}/auth/token",
                   audience=base, replay=_kept_replay(previous, spec) or _replay_store(spec), jwks=jwks,
                   replay_spec=spec, session=previous._session if previous is not None and jwks else None)

    async def start_new(self, previous: Identity | None) -> None:
        """Start what this Identity did not take over from `previous` (None: everything)."""
        if not self.jwks:
            return
        if self._session is None:
            self._session = aiohttp.ClientSession()
        running = set(map(id, previous.jwks.values())) if previous is not None else set()
        for cache in self.jwks.values():
            if id(cache) not in running:
                await cache.start(self._session)

    async def close_retired(self, next_identity: Identity | None) -> None:
        """Close what `next_identity` does not use (None: everything)."""
        kept = set(map(id, next_identity.jwks.values())) if next_identity is not None else set()
        for cache in self.jwks.values():
            if id(cache) not in kept:
                await cache.close()
        if self._session is not None and (next_identity is None or next_identity._session is not self._session):
            await self._session.close()
        self._session = None
        if next_identity is None or next_identity.replay is not self.replay:
            await self.replay.close()

    def client_for_certificate(self, cert: PeerCertificate) -> list[RegisteredClient]:
        """Clients whose certificate matchers all match (the config refuses duplicate matchers)."""
        found = []
        for client in self.clients.values():
            for match in client.entry.certificates:
                if (match.sha256 is None or match.sha256 == cert.sha256) and \
                        (match.subject_cn is None or match.subject_cn == cert.subject_cn):
                    found.append(client)
                    break
        return found

    def address_allowed(self, client: RegisteredClient, address: IPAddress | None) -> bool:
        if address is None:
            return False
        return client.networks.contains(address) or self.ip_sets.allows(address, client.entry.ip_allowlist)


def _replay_spec(service: TokenService) -> tuple[str, ...]:
    store = service.replay_store
    if store.redis_url_env is None:
        return ("memory",)
    url = os.environ.get(store.redis_url_env)
    if not url:
        raise MediatorError(f"policies/clients.yaml: token_service.replay_store.redis_url_env: "
                            f"environment variable {store.redis_url_env} is not set")
    return ("redis", url, store.key_prefix)


def _replay_store(spec: tuple[str, ...]) -> ReplayStore:
    if spec[0] == "memory":
        return MemoryReplayStore()
    return RedisReplayStore(spec[1], spec[2])


def _kept_replay(previous: Identity | None, spec: tuple[str, ...]) -> ReplayStore | None:
    """The running replay store if it is the same store: token ids seen before a reload stay refused."""
    if previous is not None and previous.replay_spec == spec:
        return previous.replay
    return None


__all__ = ["Identity", "KeyProvider", "PeerCertificate", "RegisteredClient", "describe_certificate"]
