"""The durable part of queued submission: Redis Streams (one per channel and client) and job records.

Layout (every key starts with server.redis.key_prefix):

* `async-q:<digest(channel, client)>` — a stream per channel and client, consumer group `drain`. An entry
  is one claim to deliver; it stays in the stream (and, once read, in the group's pending list) until its
  outcome is recorded, then it is acknowledged and deleted in the same script that records the outcome.
* `async-streams` — hash stream key → {"channel", "client"}: the streams instances drain, round robin.
* `async-job:<id>` — hash of one submission (a single claim or a batch): who sent it (client, facilities),
  what it is (kind, total entries), per entry its attempts, whether a send may have reached openIMIS
  without an answer (`sent:<i>`), and its final result (`r:<i>`). No expiry while unsettled; once every
  entry is settled it expires after the channel's result_retention_s.

Accepting writes the job and XADDs its entries in one MULTI/EXEC: the 202 is sent only after Redis
acknowledged both (with appendfsync always, after they reached the disk).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mediator.redis_store import RedisStore

GROUP = "drain"
REGISTRY = "async-streams"

# KEYS[1] job hash, KEYS[2] stream. ARGV: result field, result json, retention ms, group, entry id, now.
# Records the entry's result once (a second delivery of the same entry, after a reclaim, changes nothing),
# settles the job when it was the last entry, and acknowledges + deletes the stream entry.
_SETTLE = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('XACK', KEYS[2], ARGV[4], ARGV[5]); redis.call('XDEL', KEYS[2], ARGV[5])
  return -1
end
local finished = 0
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  local settled = redis.call('HINCRBY', KEYS[1], 'settled', 1)
  if settled >= tonumber(redis.call('HGET', KEYS[1], 'total')) then
    redis.call('HSET', KEYS[1], 'state', 'done', 'finished_at', ARGV[6])
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
    finished = 1
  end
end
redis.call('XACK', KEYS[2], ARGV[4], ARGV[5]); redis.call('XDEL', KEYS[2], ARGV[5])
return finished
"""

# KEYS[1] job hash. ARGV: sent field, now, attempts field. queued → in_progress (never back over done).
_MARK = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HINCRBY', KEYS[1], ARGV[3], 1)
if redis.call('HGET', KEYS[1], 'state') == 'queued' then redis.call('HSET', KEYS[1], 'state', 'in_progress') end
return 1
"""


def new_job_id() -> str:
    """128 random bits: a status URL cannot be guessed (and answers only its submitter anyway)."""
    return secrets.token_hex(16)


@dataclass(frozen=True, slots=True)
class Result:
    """The final outcome of one entry: what the caller would have got synchronously."""

    status: int
    body: str
    reason: str
    location: str = ""

    def dump(self) -> str:
        return json.dumps({"status": self.status, "body": self.body, "reason": self.reason,
                           "location": self.location}, separators=(",", ":"))

    @classmethod
    def load(cls, raw: str) -> Result:
        data = json.loads(raw)
        return cls(int(data["status"]), str(data["body"]), str(data["reason"]), str(data.get("location", "")))


@dataclass(frozen=True, slots=True)
class QueuedEntry:
    """One claim to deliver, as stored in the stream. `code` (the claim code) lets a retry whose earlier
    outcome is unknown look the claim up in openIMIS first."""

    job_id: str
    index: int
    resource_type: str
    body: bytes
    code: str
    accepted_at: float
    request_id: str
    client_ip: str

    def fields(self) -> dict[str, str | bytes]:
        return {"job": self.job_id, "index": str(self.index), "rtype": self.resource_type, "body": self.body,
                "code": self.code, "accepted_at": repr(self.accepted_at),
                "request_id": self.request_id, "client_ip": self.client_ip}

    @classmethod
    def parse(cls, raw: Mapping[bytes, bytes]) -> QueuedEntry:
        def text(name: str) -> str:
            return raw.get(name.encode(), b"").decode()
        return cls(text("job"), int(text("index") or 0), text("rtype"), raw.get(b"body", b""), text("code"),
                   float(text("accepted_at") or 0), text("request_id"), text("client_ip"))


@dataclass(frozen=True, slots=True)
class StreamRef:
    key: str
    channel: str
    client: str


@dataclass(frozen=True, slots=True)
class Job:
    job_id: str
    channel: str
    client: str
    facilities: frozenset[str]
    kind: str
    """single | batch"""
    state: str
    """queued | in_progress | done"""
    total: int
    settled: int
    accepted_at: float
    results: dict[int, Result] = field(default_factory=dict)
    attempts: dict[int, int] = field(default_factory=dict)
    sent_at: dict[int, float] = field(default_factory=dict)

    @classmethod
    def parse(cls, job_id: str, raw: Mapping[bytes, bytes]) -> Job:
        def text(name: str) -> str:
            return raw.get(name.encode(), b"").decode()
        results, attempts, sent = {}, {}, {}
        for name, value in raw.items():
            key = name.decode()
            if key.startswith("r:"):
                results[int(key[2:])] = Result.load(value.decode())
            elif key.startswith("a:"):
                attempts[int(key[2:])] = int(value)
            elif key.startswith("sent:"):
                sent[int(key[5:])] = float(value)
        return cls(job_id, text("channel"), text("client"), frozenset(json.loads(text("facilities") or "[]")),
                   text("kind"), text("state"), int(text("total") or 0), int(text("settled") or 0),
                   float(text("accepted_at") or 0), results, attempts, sent)


class QueueStore:
    """Redis operations of the queue. Every method may raise one of redis_store.STORE_ERRORS."""

    def __init__(self, redis: RedisStore) -> None:
        self.redis = redis
        self._settle: Any = None
        self._mark: Any = None
        self._groups: set[str] = set()

    def stream_key(self, channel: str, client: str) -> str:
        return self.redis.key("async-q", channel, client)

    def job_key(self, job_id: str) -> str:
        prefix = self.redis.config.key_prefix if self.redis.config is not None else ""
        return f"{prefix}async-job:{job_id}"

    @property
    def registry_key(self) -> str:
        prefix = self.redis.config.key_prefix if self.redis.config is not None else ""
        return prefix + REGISTRY

    def forget_groups(self) -> None:
        """After an error: create the groups again if needed (Redis restarted without its data)."""
        self._groups.clear()

    async def _ensure_group(self, stream: str) -> None:
        if stream in self._groups:
            return
        try:
            await self.redis.client.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except Exception as exc:  # BUSYGROUP: it exists (another instance, or before a restart)
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups.add(stream)

    async def enqueue(self, job_id: str, *, channel: str, client: str, facilities: frozenset[str], kind: str,
                      entries: Sequence[QueuedEntry], presettled: Mapping[int, Result], total: int,
                      request_id: str) -> None:
        """Store the job and its entries atomically (MULTI/EXEC); returns once Redis acknowledged."""
        stream = self.stream_key(channel, client)
        await self._ensure_group(stream)
        job: dict[str, str] = {
            "channel": channel, "client": client, "facilities": json.dumps(sorted(facilities)), "kind": kind,
            "state": "queued", "total": str(total), "settled": str(len(presettled)),
            "accepted_at": repr(time.time()), "request_id": request_id}
        job.update({f"r:{i}": r.dump() for i, r in presettled.items()})
        async with self.redis.client.pipeline(transaction=True) as pipe:
            pipe.hset(self.job_key(job_id), mapping=job)  # type: ignore[arg-type]
            for entry in entries:
                pipe.xadd(stream, entry.fields())  # type: ignore[arg-type]
            pipe.hset(self.registry_key, stream, json.dumps({"channel": channel, "client": client}))
            await pipe.execute()

    async def streams(self) -> list[StreamRef]:
        raw: Any = await self.redis.client.hgetall(self.registry_key)
        refs = []
        for key, value in raw.items():
            labels = json.loads(value)
            refs.append(StreamRef(key.decode(), str(labels["channel"]), str(labels["client"])))
        return sorted(refs, key=lambda r: r.key)

    async def read_new(self, consumer: str, streams: Sequence[StreamRef]) -> list[tuple[StreamRef, str, QueuedEntry]]:
        """At most one new entry from each of `streams` (one per vendor per round: fair)."""
        for ref in streams:
            await self._ensure_group(ref.key)
        answer: Any = await self.redis.client.xreadgroup(GROUP, consumer, {r.key: ">" for r in streams}, count=1)
        by_key = {r.key: r for r in streams}
        found = []
        for stream_key, messages in answer or ():
            ref = by_key[stream_key.decode() if isinstance(stream_key, bytes) else stream_key]
            for entry_id, fields in messages:
                found.append((ref, entry_id.decode(), QueuedEntry.parse(fields)))
        return found

    async def reclaim(self, consumer: str, ref: StreamRef, min_idle_s: float,
                      count: int) -> list[tuple[StreamRef, str, QueuedEntry]]:
        """Entries another consumer has held without a heartbeat for `min_idle_s` (it died): now ours."""
        await self._ensure_group(ref.key)
        answer = await self.redis.client.xautoclaim(ref.key, GROUP, consumer, int(min_idle_s * 1000),
                                                    start_id="0-0", count=count)
        return [(ref, entry_id.decode(), QueuedEntry.parse(fields)) for entry_id, fields in answer[1] if fields]

    async def heartbeat(self, consumer: str, held: Mapping[str, Sequence[str]]) -> None:
        """Reset the idle time of the entries this consumer is working on (XCLAIM JUSTID by their owner)."""
        async with self.redis.client.pipeline(transaction=False) as pipe:
            for stream, ids in held.items():
                if ids:
                    pipe.xclaim(stream, GROUP, consumer, 0, list(ids), justid=True)
            await pipe.execute()

    async def job(self, job_id: str) -> Job | None:
        raw: Any = await self.redis.client.hgetall(self.job_key(job_id))
        return Job.parse(job_id, raw) if raw else None

    async def mark_sending(self, job_id: str, index: int) -> bool:
        """Before a send: from now on the outcome is unknown until recorded (a reclaim checks openIMIS
        first). False when the job no longer exists (expired): nothing to deliver."""
        if self._mark is None:
            self._mark = self.redis.client.register_script(_MARK)
        found = await self._mark(keys=[self.job_key(job_id)], args=[f"sent:{index}", repr(time.time()), f"a:{index}"])
        return int(found) == 1

    async def clear_sent(self, job_id: str, index: int) -> None:
        """openIMIS cannot have received the last send (refused before sending, connection refused)."""
        await self.redis.client.hdel(self.job_key(job_id), f"sent:{index}")

    async def settle(self, ref: StreamRef, entry_id: str, entry: QueuedEntry, result: Result,
                     retention_s: int) -> bool:
        """Record the entry's final result, ack + delete it. True when the whole job is now done."""
        if self._settle is None:
            self._settle = self.redis.client.register_script(_SETTLE)
        finished = await self._settle(keys=[self.job_key(entry.job_id), ref.key],
                                      args=[f"r:{entry.index}", result.dump(), retention_s * 1000, GROUP,
                                            entry_id, repr(time.time())])
        return int(finished) == 1

    async def depth(self, ref: StreamRef) -> tuple[int, float | None]:
        """Entries not yet settled in this stream, and the accept time (epoch s) of the oldest."""
        client = self.redis.client
        length = await client.xlen(ref.key)
        if not length:
            return 0, None
        first: Any = await client.xrange(ref.key, count=1)
        if not first:
            return int(length), None
        millis = int(first[0][0].decode().split("-")[0])
        return int(length), millis / 1000
