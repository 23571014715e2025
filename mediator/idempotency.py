"""Idempotent creates: a repeated POST within the window gets the first answer instead of a second claim.

Key: the `Idempotency-Key` header (draft-ietf-httpapi-idempotency-key-header; a quoted sf-string or a
bare token), else the resource's identifiers (`system|value`, sorted). It is scoped to the caller
(principal.client_id, or the client IP on a channel without authentication), the channel and the
resource type, and hashed: one vendor can neither read nor block another's answers.

A record goes through: in_flight (while openIMIS works on the first request) → done (a 2xx answer,
replayed for `window_s`) or unknown (the first request timed out or broke mid-exchange: openIMIS may
have created the claim; held for the window, answered 409 idempotency.outcome_unknown). Any other answer
(4xx/5xx from openIMIS, or the mediator refusing to send) releases the key so a corrected request can go.
A different body under the same key: 422 idempotency.key_reused.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from mediator.bulkhead import UpstreamRefused
from mediator.config.models import ChannelConfig
from mediator.errors import MediatorError
from mediator.fhir import operation_outcome_response
from mediator.logs import JsonEvent
from mediator.metrics import Metrics
from mediator.pipeline import Exchange
from mediator.redis_store import STORE_ERRORS, RedisStore
from mediator.upstream import UpstreamLoginFailed, UpstreamUnavailable

log = logging.getLogger("mediator.idempotency")

MAX_KEY_LENGTH = 255
# Answer headers worth replaying; the rest (Date, Server, X-Request-ID) belong to the new exchange.
# Content-Location: a repeated queued submission (202) points at the same status URL (mediator/async_claims).
REPLAYED_HEADERS = ("Content-Type", "Location", "Content-Location", "ETag", "Last-Modified", "Content-Language")


class InvalidKey(MediatorError, ValueError):
    pass


def explicit_key(header: str | None) -> str | None:
    """The Idempotency-Key header value, unquoted; InvalidKey if unusable."""
    if header is None:
        return None
    value = header.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    if not 1 <= len(value) <= MAX_KEY_LENGTH or not value.isprintable() or not value.isascii():
        raise InvalidKey(f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable ASCII characters")
    return "header:" + value


def identifier_key(resource: dict[str, Any]) -> str | None:
    """`system|value` of every identifier, sorted; None if the resource has none usable."""
    values = []
    for identifier in resource.get("identifier") or ():
        if isinstance(identifier, dict) and isinstance(identifier.get("value"), str) and identifier["value"]:
            system = identifier.get("system") if isinstance(identifier.get("system"), str) else ""
            values.append(f"{system}|{identifier['value']}")
    return "identifier:" + "\n".join(sorted(values)) if values else None


def fingerprint(resource: dict[str, Any]) -> str:
    """The same resource sent with other whitespace or key order has the same fingerprint."""
    canonical = json.dumps(resource, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Record:
    state: str
    """in_flight | done | unknown"""
    fingerprint: str
    token: str = ""
    status: int = 0
    headers: dict[str, str] | None = None
    body: bytes = b""

    def dump(self) -> bytes:
        return json.dumps({"state": self.state, "fp": self.fingerprint, "token": self.token,
                           "status": self.status, "headers": self.headers or {},
                           "body": base64.b64encode(self.body).decode()}).encode()

    @classmethod
    def load(cls, raw: bytes | str) -> Record:
        data = json.loads(raw)
        return cls(data["state"], data["fp"], data.get("token", ""), data.get("status", 0),
                   data.get("headers") or {}, base64.b64decode(data.get("body", "")))


class MemoryIdempotencyStore:
    """Records in this process's memory (no Redis configured). Atomic: no awaits inside methods."""

    def __init__(self, max_records: int = 100_000) -> None:
        self._records: dict[str, tuple[Record, float]] = {}
        self._max = max_records

    def _get(self, key: str) -> Record | None:
        found = self._records.get(key)
        if found is None:
            return None
        if found[1] <= time.monotonic():
            del self._records[key]
            return None
        return found[0]

    async def begin(self, key: str, record: Record, ttl_s: float) -> Record | None:
        existing = self._get(key)
        if existing is not None:
            return existing
        if len(self._records) >= self._max:
            now = time.monotonic()
            self._records = {k: v for k, v in self._records.items() if v[1] > now}
        self._records[key] = (record, time.monotonic() + ttl_s)
        return None

    async def get(self, key: str) -> Record | None:
        return self._get(key)

    async def finish(self, key: str, token: str, record: Record | None, ttl_s: float) -> None:
        existing = self._get(key)
        if existing is None or existing.token != token:
            return
        if record is None:
            del self._records[key]
        else:
            self._records[key] = (record, time.monotonic() + ttl_s)


# KEYS[1]: record key. ARGV[1]: new in_flight record, ARGV[2]: its TTL in ms. Returns the existing
# record, or nil after storing the new one (SET NX + GET in one step; SET NX GET needs Redis >= 7).
_BEGIN = """
local existing = redis.call('GET', KEYS[1])
if existing then return existing end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""
# KEYS[1]: record key. ARGV[1]: our token; ARGV[2]: final record ('' = delete); ARGV[3]: TTL in ms.
# Only the request holding the in_flight token may settle the record.
_FINISH = """
local existing = redis.call('GET', KEYS[1])
if not existing then return 0 end
if cjson.decode(existing)['token'] ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
return 1
"""


class RedisIdempotencyStore:
    """Records in Redis, shared by every instance."""

    def __init__(self, redis: RedisStore) -> None:
        self._redis = redis
        self._begin: Any = None
        self._finish: Any = None

    async def begin(self, key: str, record: Record, ttl_s: float) -> Record | None:
        if self._begin is None:
            self._begin = self._redis.client.register_script(_BEGIN)
        found = await self._begin(keys=[key], args=[record.dump(), int(ttl_s * 1000)])
        return Record.load(found) if found else None

    async def get(self, key: str) -> Record | None:
        found = await self._redis.client.get(key)
        return Record.load(found) if found else None

    async def finish(self, key: str, token: str, record: Record | None, ttl_s: float) -> None:
        if self._finish is None:
            self._finish = self._redis.client.register_script(_FINISH)
        await self._finish(keys=[key], args=[token, record.dump() if record else "", int(ttl_s * 1000)])


def _outcome(status: int, reason: str, message: str, retry_after: int | None = None) -> web.Response:
    return operation_outcome_response(status, reason, message,
                                      {"Retry-After": str(retry_after)} if retry_after else None)


def _nothing_sent(exc: BaseException) -> bool:
    """True when openIMIS cannot have received the request (so releasing the key is safe)."""
    if isinstance(exc, UpstreamRefused | UpstreamLoginFailed):
        return True
    return isinstance(exc, UpstreamUnavailable) and isinstance(exc.__cause__, aiohttp.ClientConnectorError)


Send = Callable[[], Awaitable[web.Response]]


class Idempotency:
    """Runs creates through the store. One per runtime; safe for concurrent requests."""

    POLL_S = 0.05

    def __init__(self, redis: RedisStore, metrics: Metrics | None = None) -> None:
        self.redis = redis
        self.store: MemoryIdempotencyStore | RedisIdempotencyStore = (
            RedisIdempotencyStore(redis) if redis.configured else MemoryIdempotencyStore())
        self._metrics = metrics

    def _key(self, exchange: Exchange, channel: str, resource_type: str, material: str) -> str:
        principal = exchange.principal
        scope = f"client={principal.client_id}" if principal is not None else f"ip={exchange.client_ip}"
        if self.redis.configured:
            return self.redis.key("idem", scope, channel, resource_type, material)
        return "\n".join(("idem", scope, channel, resource_type, material))

    async def create(self, exchange: Exchange, channel: ChannelConfig, resource_type: str,
                     resource: dict[str, Any], key_header: str | None, send: Send,
                     key_suffix: str = "") -> web.Response:
        """`send` performs the create once; it is called at most once, and only if no answer is on record.

        `key_suffix` tells apart the entries of one batch sent under one Idempotency-Key header.
        """
        config = channel.idempotency
        if config is None:
            return await send()
        try:
            header_key = explicit_key(key_header)
            material = header_key + key_suffix if header_key else identifier_key(resource)
        except InvalidKey as exc:
            return _outcome(400, "idempotency.invalid_key", str(exc))
        if material is None:
            if config.require_key:
                return _outcome(400, "idempotency.key_missing",
                                "send an Idempotency-Key header or give the resource an identifier")
            return await send()
        key = self._key(exchange, channel.name, resource_type, material)
        print_ = fingerprint(resource)
        token = secrets.token_hex(16)
        # The first request keeps its claim on the key for as long as it can take, plus a margin.
        lock_s = channel.timeout_s + 60
        deadline = time.monotonic() + channel.timeout_s
        while True:
            try:
                existing = await self.store.begin(key, Record("in_flight", print_, token), lock_s)
            except STORE_ERRORS as exc:
                return await self._store_failed(exc, config.on_store_error, send)
            if existing is None:
                break
            if existing.fingerprint != print_:
                return _outcome(422, "idempotency.key_reused",
                                "this idempotency key was used with a different request body")
            if existing.state == "done":
                if self._metrics is not None:
                    self._metrics.idempotent_replays.labels(channel.name).inc()
                headers = dict(existing.headers or {})
                headers["Idempotent-Replayed"] = "true"
                content_type = headers.pop("Content-Type", "application/json")
                return web.Response(status=existing.status, body=existing.body, headers=headers,
                                    content_type=content_type.split(";")[0], charset="utf-8")
            if existing.state == "unknown":
                return _outcome(409, "idempotency.outcome_unknown",
                                "an earlier attempt with this key timed out: openIMIS may have it; search for it "
                                "(e.g. Claim?identifier=) before resubmitting with a new Idempotency-Key")
            if config.in_flight == "reject" or time.monotonic() >= deadline:
                return _outcome(409, "idempotency.in_flight",
                                "the same request is still being processed; retry later", 1)
            await asyncio.sleep(self.POLL_S)
        try:
            response = await send()
        except BaseException as exc:
            await self._settle(key, token, None if _nothing_sent(exc) else Record("unknown", print_), config.window_s)
            raise
        if 200 <= response.status < 300:
            headers = {h: response.headers[h] for h in REPLAYED_HEADERS if h in response.headers}
            body = response.body if isinstance(response.body, bytes) else b""
            await self._settle(key, token, Record("done", print_, "", response.status, headers, body),
                               config.window_s)
        else:
            await self._settle(key, token, None, config.window_s)
        return response

    async def _settle(self, key: str, token: str, record: Record | None, window_s: float) -> None:
        try:
            await self.store.finish(key, token, record, window_s)
        except STORE_ERRORS as exc:
            # The answer still goes to the caller; the in_flight record expires after its lock time, and
            # until then duplicates get 409, never a second submission.
            if self._metrics is not None:
                self._metrics.store_errors.labels("idempotency", "keep_lock").inc()
            log.warning(JsonEvent.of("idempotency.store_failed", operation="settle_key", error=type(exc).__name__))

    async def _store_failed(self, exc: BaseException, mode: str, send: Send) -> web.Response:
        if self._metrics is not None:
            self._metrics.store_errors.labels("idempotency", mode).inc()
        log.warning(JsonEvent.of("idempotency.store_failed", operation="claim_key", error=type(exc).__name__,
                                  on_store_error=mode))
        if mode == "forward":
            return await send()
        return _outcome(503, "idempotency.store_unavailable",
                        "cannot guarantee a single submission right now; retry later", 1)
