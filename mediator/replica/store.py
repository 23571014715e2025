"""Replica stores: where synced master data lives. In memory (per process, the default) or in Redis (shared).

Both keep data in *generations*. A full sync writes a new generation and `commit` makes it current in one
step (readers see the old or the new one, never a mix); a failed sync `discard`s it. An incremental sync
`apply`s all its changes and the new state in one step (one MULTI/EXEC in Redis; no await in memory).
The previous generation is kept until the next commit, so a reader that looked up the current generation
just before a commit can finish. Both stores pass the same contract tests (tests/replica/test_store.py).
"""

from __future__ import annotations

import bisect
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import redis.asyncio as aioredis
from redis.asyncio.lock import Lock
from redis.exceptions import LockError, RedisError

from mediator.errors import MediatorError
from mediator.replica.records import SearchPage, SearchQuery, StoredResource, SyncState, matches


class ReplicaStoreError(MediatorError):
    """The store could not be read or written (Redis down, for instance)."""


class ReplicaStore(Protocol):
    """Lifetime: `start` in the app's cleanup context, `close` at shutdown. Safe for concurrent readers;
    one writer at a time (the sync lock), which is what `try_lock` is for across instances."""

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def state(self) -> SyncState | None: ...
    async def new_generation(self) -> str: ...
    async def put(self, generation: str, records: Sequence[StoredResource]) -> None: ...
    async def commit(self, state: SyncState) -> None: ...
    async def discard(self, generation: str) -> None: ...
    async def apply(self, state: SyncState, upserts: Sequence[StoredResource],
                    removals: Sequence[tuple[str, str]]) -> None: ...
    async def index(self, generation: str, rtype: str) -> dict[str, StoredResource]: ...
    async def get(self, generation: str, rtype: str, rid: str) -> StoredResource | None: ...
    async def get_by_code(self, generation: str, rtype: str, code: str) -> StoredResource | None: ...
    async def search(self, generation: str, rtype: str, query: SearchQuery) -> SearchPage: ...
    async def count(self, generation: str, rtype: str) -> int: ...
    async def try_lock(self, ttl_s: float) -> bool: ...
    async def refresh_lock(self) -> None: ...
    async def unlock(self) -> None: ...


def _new_generation_name() -> str:
    return uuid.uuid4().hex[:16]


@dataclass(slots=True)
class _Table:
    records: dict[str, StoredResource] = field(default_factory=dict)
    codes: dict[str, str] = field(default_factory=dict)
    order: list[tuple[float, str]] = field(default_factory=list)

    def upsert(self, record: StoredResource) -> None:
        self.remove(record.rid)
        self.records[record.rid] = record
        for code in record.codes:
            self.codes[code] = record.rid
        bisect.insort(self.order, (record.last_updated, record.rid))

    def remove(self, rid: str) -> None:
        old = self.records.pop(rid, None)
        if old is None:
            return
        for code in old.codes:
            if self.codes.get(code) == rid:
                del self.codes[code]
        position = bisect.bisect_left(self.order, (old.last_updated, rid))
        del self.order[position]


class MemoryReplicaStore:
    """The embedded default: dictionaries in this process. Lost on restart (the first sync refills it)."""

    def __init__(self) -> None:
        self._generations: dict[str, dict[str, _Table]] = {}
        self._state: SyncState | None = None
        self._previous: str | None = None

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._generations.clear()

    async def state(self) -> SyncState | None:
        return self._state

    async def new_generation(self) -> str:
        name = _new_generation_name()
        self._generations[name] = {}
        return name

    def _table(self, generation: str, rtype: str) -> _Table:
        return self._generations.get(generation, {}).get(rtype) or _Table()

    async def put(self, generation: str, records: Sequence[StoredResource]) -> None:
        tables = self._generations[generation]
        for record in records:
            tables.setdefault(record.rtype, _Table()).upsert(record)

    async def commit(self, state: SyncState) -> None:
        if state.generation not in self._generations:
            raise ReplicaStoreError(f"unknown generation {state.generation}")
        older = self._previous
        self._previous = self._state.generation if self._state is not None else None
        self._state = state
        if older is not None and older not in (state.generation, self._previous):
            self._generations.pop(older, None)

    async def discard(self, generation: str) -> None:
        if self._state is None or generation != self._state.generation:
            self._generations.pop(generation, None)

    async def apply(self, state: SyncState, upserts: Sequence[StoredResource],
                    removals: Sequence[tuple[str, str]]) -> None:
        tables = self._generations[state.generation]
        for rtype, rid in removals:
            if rtype in tables:
                tables[rtype].remove(rid)
        for record in upserts:
            tables.setdefault(record.rtype, _Table()).upsert(record)
        self._state = state

    async def index(self, generation: str, rtype: str) -> dict[str, StoredResource]:
        return dict(self._table(generation, rtype).records)

    async def get(self, generation: str, rtype: str, rid: str) -> StoredResource | None:
        return self._table(generation, rtype).records.get(rid)

    async def get_by_code(self, generation: str, rtype: str, code: str) -> StoredResource | None:
        table = self._table(generation, rtype)
        rid = table.codes.get(code.lower())
        return table.records.get(rid) if rid is not None else None

    async def search(self, generation: str, rtype: str, query: SearchQuery) -> SearchPage:
        table = self._table(generation, rtype)
        if query.code is not None:
            found = await self.get_by_code(generation, rtype, query.code)
            hits = [found] if found is not None and matches(found, query) else []
            return SearchPage(len(hits), hits[query.offset:query.offset + query.count])
        start = 0 if query.since is None else bisect.bisect_left(table.order, (query.since, ""))
        rows = (table.records[rid] for _, rid in table.order[start:])
        hits = [r for r in rows if matches(r, query)]
        return SearchPage(len(hits), hits[query.offset:query.offset + query.count])

    async def count(self, generation: str, rtype: str) -> int:
        return len(self._table(generation, rtype).records)

    async def try_lock(self, ttl_s: float) -> bool:
        return True  # one process: the syncer itself never overlaps (it runs in one task)

    async def refresh_lock(self) -> None:
        return None

    async def unlock(self) -> None:
        return None


class RedisReplicaStore:
    """Redis, shared by every mediator instance (redis.asyncio). Keys, under `<key_prefix>replica:`:

    state (JSON SyncState), previous (generation name), lock, and per generation g and type T:
    g:<g>:types (set), g:<g>:<T>:body (hash id -> JSON), g:<g>:<T>:idx (hash id -> index row),
    g:<g>:<T>:code (hash code -> id), g:<g>:<T>:order (zset id by last_updated).
    """

    def __init__(self, url: str, key_prefix: str, client: aioredis.Redis | None = None,
                 password: str | None = None) -> None:
        self._url = url
        self._password = password
        self._prefix = f"{key_prefix}replica:"
        self._client = client
        self._lock: Lock | None = None

    async def start(self) -> None:
        if self._client is None:
            # Its own client, not the shared request-path pool: sync writes are bulk and slower than
            # the short per-command timeouts that suit rate limiting.
            self._client = aioredis.from_url(self._url, password=self._password, decode_responses=False)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    @property
    def redis(self) -> aioredis.Redis:
        if self._client is None:
            raise ReplicaStoreError("store not started")
        return self._client

    def _key(self, generation: str, rtype: str, part: str) -> str:
        return f"{self._prefix}g:{generation}:{rtype}:{part}"

    async def state(self) -> SyncState | None:
        try:
            raw = await self.redis.get(self._prefix + "state")
        except RedisError as exc:
            raise ReplicaStoreError(f"redis: {type(exc).__name__}") from exc
        return SyncState.from_json(raw) if raw is not None else None

    async def new_generation(self) -> str:
        return _new_generation_name()

    async def put(self, generation: str, records: Sequence[StoredResource]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        self._queue_upserts(pipe, generation, records, {})
        await self._execute(pipe)

    def _queue_upserts(self, pipe: aioredis.client.Pipeline, generation: str, records: Sequence[StoredResource],
                       old: dict[tuple[str, str], StoredResource]) -> None:
        for record in records:
            previous = old.get((record.rtype, record.rid))
            if previous is not None:
                stale_codes = [c for c in previous.codes if c not in record.codes]
                if stale_codes:
                    pipe.hdel(self._key(generation, record.rtype, "code"), *stale_codes)
            pipe.sadd(f"{self._prefix}g:{generation}:types", record.rtype)
            pipe.hset(self._key(generation, record.rtype, "body"), record.rid, record.body)
            pipe.hset(self._key(generation, record.rtype, "idx"), record.rid, record.index_row())
            if record.codes:
                pipe.hset(self._key(generation, record.rtype, "code"), mapping={c: record.rid for c in record.codes})
            pipe.zadd(self._key(generation, record.rtype, "order"), {record.rid: record.last_updated})

    async def _execute(self, pipe: aioredis.client.Pipeline) -> list[object]:
        try:
            result: list[object] = await pipe.execute()
            return result
        except RedisError as exc:
            raise ReplicaStoreError(f"redis: {type(exc).__name__}") from exc

    async def commit(self, state: SyncState) -> None:
        current = await self.state()
        try:
            older = await self.redis.get(self._prefix + "previous")
        except RedisError as exc:
            raise ReplicaStoreError(f"redis: {type(exc).__name__}") from exc
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(self._prefix + "state", state.to_json())
        if current is not None:
            pipe.set(self._prefix + "previous", current.generation)
        await self._execute(pipe)
        if older is not None:
            older_name = _text(older)
            if older_name not in (state.generation, current.generation if current else None):
                await self._drop(older_name)

    async def _drop(self, generation: str) -> None:
        types_key = f"{self._prefix}g:{generation}:types"
        try:
            types = await self.redis.smembers(types_key)
            keys = [self._key(generation, _text(t), part) for t in types for part in ("body", "idx", "code", "order")]
            await self.redis.delete(types_key, *keys)
        except RedisError as exc:
            raise ReplicaStoreError(f"redis: {type(exc).__name__}") from exc

    async def discard(self, generation: str) -> None:
        current = await self.state()
        if current is None or current.generation != generation:
            await self._drop(generation)

    async def apply(self, state: SyncState, upserts: Sequence[StoredResource],
                    removals: Sequence[tuple[str, str]]) -> None:
        generation = state.generation
        touched = {(r.rtype, r.rid) for r in upserts} | set(removals)
        old: dict[tuple[str, str], StoredResource] = {}
        for rtype, rid in touched:
            found = await self.get(generation, rtype, rid, with_body=False)
            if found is not None:
                old[(rtype, rid)] = found
        owned_codes: dict[tuple[str, str], list[str]] = {}
        for rtype, rid in removals:
            previous = old.get((rtype, rid))
            if previous is not None and previous.codes:
                owners = await self.redis.hmget(self._key(generation, rtype, "code"), list(previous.codes))
                # Only drop a code that still points at this resource (another may have taken it over).
                owned_codes[(rtype, rid)] = [c for c, o in zip(previous.codes, owners, strict=True)
                                             if o == rid.encode()]
        # Only the sync-lock holder writes, so what we just read cannot change before EXEC.
        pipe = self.redis.pipeline(transaction=True)
        for rtype, rid in removals:
            if (rtype, rid) not in old:
                continue
            if owned_codes.get((rtype, rid)):
                pipe.hdel(self._key(generation, rtype, "code"), *owned_codes[(rtype, rid)])
            pipe.hdel(self._key(generation, rtype, "body"), rid)
            pipe.hdel(self._key(generation, rtype, "idx"), rid)
            pipe.zrem(self._key(generation, rtype, "order"), rid)
        self._queue_upserts(pipe, generation, upserts, old)
        pipe.set(self._prefix + "state", state.to_json())
        await self._execute(pipe)

    async def index(self, generation: str, rtype: str) -> dict[str, StoredResource]:
        try:
            rows = await self.redis.hgetall(self._key(generation, rtype, "idx"))
        except RedisError as exc:
            raise ReplicaStoreError(f"redis: {type(exc).__name__}") from exc
        return {_text(k): StoredResource.from_index_row(rtype, _text(k), v) for k, v in rows.items()}

    async def get(self, generation: str, rtype: str, rid: str, with_body: bool = True) -> StoredResource | None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hget(self._key(generation, rtype, "idx"), rid)
        if with_body:
            pipe.hget(self._key(generation, rtype, "body"), rid)
        result = await self._execute(pipe)
        row = result[0]
        if not isinstance(row, bytes):
            return None
        body = result[1] if with_body and isinstance(result[1], bytes) else b""
        return StoredResource.from_index_row(rtype, rid, row, body)

    async def get_by_code(self, generation: str, rtype: str, code: str) -> StoredResource | None:
        try:
            rid = await self.redis.hget(self._key(generation, rtype, "code"), code.lower())
        except RedisError as exc:
            raise ReplicaStoreError(f"redis: {type(exc).__name__}") from exc
        return await self.get(generation, rtype, _text(rid)) if rid is not None else None

    async def _bodies(self, generation: str, rtype: str, rows: list[StoredResource]) -> list[StoredResource]:
        if not rows:
            return []
        try:
            bodies = await self.redis.hmget(self._key(generation, rtype, "body"), [r.rid for r in rows])
        except RedisError as exc:
            raise ReplicaStoreError(f"redis: {type(exc).__name__}") from exc
        return [StoredResource(r.rtype, r.rid, _bytes(b), r.last_updated, r.digest, r.codes, r.name)
                for r, b in zip(rows, bodies, strict=True) if b is not None]

    async def search(self, generation: str, rtype: str, query: SearchQuery) -> SearchPage:
        if query.code is not None:
            found = await self.get_by_code(generation, rtype, query.code)
            hits = [found] if found is not None and matches(found, query) else []
            return SearchPage(len(hits), hits[query.offset:query.offset + query.count])
        if query.name is not None:
            rows = sorted((r for r in (await self.index(generation, rtype)).values() if matches(r, query)),
                          key=lambda r: (r.last_updated, r.rid))
            page = rows[query.offset:query.offset + query.count]
            return SearchPage(len(rows), await self._bodies(generation, rtype, page))
        low = "-inf" if query.since is None else f"{'' if query.since_inclusive else '('}{query.since!r}"
        high = "+inf" if query.until is None else f"{'' if query.until_inclusive else '('}{query.until!r}"
        order = self._key(generation, rtype, "order")
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.zcount(order, low, high)
            pipe.zrangebyscore(order, low, high, start=query.offset, num=query.count)
            total, ids = await pipe.execute()
            if not ids:
                return SearchPage(int(total), [])
            pipe = self.redis.pipeline(transaction=False)
            pipe.hmget(self._key(generation, rtype, "idx"), ids)
            pipe.hmget(self._key(generation, rtype, "body"), ids)
            rows, bodies = await pipe.execute()
        except RedisError as exc:
            raise ReplicaStoreError(f"redis: {type(exc).__name__}") from exc
        items = [StoredResource.from_index_row(rtype, i.decode(), row, body)
                 for i, row, body in zip(ids, rows, bodies, strict=True) if row is not None and body is not None]
        return SearchPage(int(total), items)

    async def count(self, generation: str, rtype: str) -> int:
        try:
            return int(await self.redis.zcard(self._key(generation, rtype, "order")))
        except RedisError as exc:
            raise ReplicaStoreError(f"redis: {type(exc).__name__}") from exc

    async def try_lock(self, ttl_s: float) -> bool:
        # redis-py's Lock: SET NX PX with a random token, released only by its holder (Lua check-and-delete).
        self._lock = self.redis.lock(self._prefix + "lock", timeout=ttl_s, blocking=False)
        try:
            return bool(await self._lock.acquire())
        except RedisError as exc:
            raise ReplicaStoreError(f"redis: {type(exc).__name__}") from exc

    async def refresh_lock(self) -> None:
        if self._lock is not None:
            try:
                await self._lock.reacquire()
            except (LockError, RedisError) as exc:
                raise ReplicaStoreError(f"sync lock lost: {type(exc).__name__}") from exc

    async def unlock(self) -> None:
        if self._lock is not None:
            try:
                await self._lock.release()
            except (LockError, RedisError):
                pass  # expired or Redis gone: the TTL frees it either way
            self._lock = None


def _text(value: bytes | str) -> str:
    """A Redis reply as text (the client is built without decode_responses: bodies stay bytes)."""
    return value.decode() if isinstance(value, bytes) else value


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()
