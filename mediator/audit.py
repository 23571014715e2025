"""The audit trail: one FHIR R4 AuditEvent per FHIR request, as a JSON line.

Who (client id and user id from the authenticated Principal, client IP, health facilities), what
(action C/R/U/D/E from the FHIR interaction, resource type and id), outcome (FHIR outcome code and the
mediator's reason code), the request id and when. The event is built from an allowlist of fields: the
query string (insuree numbers), bodies, headers, tokens and passwords are never read, so never written.

Sinks: a file rotated by size and by age (bounded count), optionally syslog; absent config → stderr.

Off the request path: `record()` builds the event (a dict of allowlisted fields) and the access-log
fields and hands them, as one `RequestRecord`, to a `RecordWriter` thread. The writer serialises each
event once and writes a whole batch with one write() per sink; the access line goes to the
`mediator.access` logger's handlers from the same thread. Memory is bounded (`max_pending` records
waiting); the event loop never waits for a disk or a syslog socket; a record that does not fit is
dropped and counted (`mediator_audit_records_dropped_total`, and a warning at most every 10 s).
Thread-safety: `logging` handlers lock internally; one AuditLog per application, closed at cleanup
(which writes every record still waiting).
"""

from __future__ import annotations

import logging
import logging.handlers
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mediator import json_codec
from mediator.config.operations import AuditConfig
from mediator.logs import JsonEvent
from mediator.pipeline import Exchange

log = logging.getLogger("mediator.audit_writer")
access_log = logging.getLogger("mediator.access")

EXTENSION_BASE = "https://openimis-mediator.org/fhir/StructureDefinition/"
# IHE Basic Audit Log Patterns: the X-Request-Id of a RESTful exchange is an entity of this type.
BALP_ENTITY_TYPE = "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType"

# http://hl7.org/fhir/R4/valueset-audit-event-action.html — search and operations are "E" (execute).
ACTION_BY_INTERACTION = {
    "create": "C", "read": "R", "vread": "R", "history-instance": "R", "history-type": "R",
    "capabilities": "R", "update": "U", "patch": "U", "delete": "D",
}
# http://hl7.org/fhir/R4/codesystem-restful-interaction.html; batch and transaction cannot be told
# apart from the URL, operations are all "operation".
SUBTYPE_BY_INTERACTION = {
    "batch-or-transaction": "batch", "operation-system": "operation", "operation-type": "operation",
    "operation-instance": "operation",
}


def outcome_code(status: int) -> str:
    """FHIR AuditEvent.outcome: 0 success, 4 minor failure (refused/client error), 8 serious failure."""
    if status < 400:
        return "0"
    return "4" if status < 500 else "8"


class _RecordedTime:
    """`datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")`, with the date and time of day
    formatted once per second rather than once per request (~7 µs per event, bench issue 18)."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, recorded: float) -> str:
        second = math.floor(recorded)
        micros = round((recorded - second) * 1e6)   # datetime rounds to the microsecond, then truncates
        if micros >= 1_000_000:
            second, micros = second + 1, micros - 1_000_000
        if second != self._second:
            self._prefix = datetime.fromtimestamp(second, UTC).isoformat()[:-6]   # without "+00:00"
            self._second = second
        return f"{self._prefix}.{micros // 1000:03d}+00:00"


recorded_time = _RecordedTime()


def audit_event(exchange: Exchange, status: int, reason: str, recorded: float) -> dict[str, Any]:
    """The AuditEvent for one answered request. Pure: reads only the allowlisted fields below."""
    fhir = exchange.fhir
    principal = exchange.principal
    agent: dict[str, Any] = {"requestor": True}
    if principal is not None:
        agent["who"] = {"identifier": {"system": EXTENSION_BASE + "client-id", "value": principal.client_id}}
        if principal.user_key:
            agent["altId"] = principal.user_key  # namespaced by the vouching issuer/client
        if principal.health_facilities:
            agent["extension"] = [{"url": EXTENSION_BASE + "health-facility", "valueString": code}
                                  for code in sorted(principal.health_facilities)]
    else:
        agent["who"] = {"display": "unauthenticated"}
    if exchange.client_ip is not None:
        agent["network"] = {"address": str(exchange.client_ip), "type": "2"}  # 2: IP address
    entities: list[dict[str, Any]] = [{
        "what": {"identifier": {"value": exchange.request_id}},
        "type": {"system": BALP_ENTITY_TYPE, "code": "XrequestId"},
    }]
    if fhir is not None and fhir.resource_type is not None:
        entity: dict[str, Any] = {"type": {"system": "http://hl7.org/fhir/resource-types",
                                           "code": fhir.resource_type}}
        if fhir.resource_id is not None:
            entity["what"] = {"reference": f"{fhir.resource_type}/{fhir.resource_id}"}
        entities.append(entity)
    check = exchange.write_check
    if check is not None and check.element is not None:
        # Which element the write firewall decided on: an element path (`Claim.contained[0]`), never a value.
        entities.append({"type": {"system": "http://hl7.org/fhir/resource-types", "code": "Bundle"
                                  if check.entry is not None else (fhir.resource_type if fhir else "Resource")},
                         "detail": [{"type": "write-firewall-element", "valueString": check.element},
                                    {"type": "write-firewall-rule", "valueString": check.rule or ""}]})
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest",
                 "display": "RESTful Operation"},
        "action": ACTION_BY_INTERACTION.get(fhir.interaction, "E") if fhir is not None else "E",
        "recorded": recorded_time(recorded),
        "outcome": outcome_code(status),
        "outcomeDesc": f"{status} {reason}",
        "agent": [agent],
        "source": {"observer": {"display": "openimis-mediator"}},
        "entity": entities,
    }
    if fhir is not None:
        code = SUBTYPE_BY_INTERACTION.get(fhir.interaction, fhir.interaction)
        event["subtype"] = [{"system": "http://hl7.org/fhir/restful-interaction", "code": code}]
    channel = exchange.channel.name if exchange.channel is not None else None
    if channel is not None:
        event["extension"] = [{"url": EXTENSION_BASE + "channel", "valueString": channel}]
    return event


class SizeAndAgeRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """RotatingFileHandler that also rotates a file once it is `rotate_after_s` old, and deletes rotated
    files older than `max_age_s`. Disk use stays below (backups + 1) × max_bytes and no file outlives
    max_age_s by more than rotate_after_s (while events keep arriving)."""

    def __init__(self, filename: str, max_bytes: int, backups: int, max_age_s: float,
                 rotate_after_s: float = 86400.0) -> None:
        super().__init__(filename, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        self.max_age_s = max_age_s
        self.rotate_after_s = rotate_after_s
        # Age counts from when this process opened the file (a restart starts a new day's clock).
        self._opened_at = time.time()

    def shouldRollover(self, record: logging.LogRecord) -> bool:  # noqa: N802 (logging's name)
        if time.time() - self._opened_at >= self.rotate_after_s and os.path.getsize(self.baseFilename) > 0:
            return True
        return bool(super().shouldRollover(record))

    def doRollover(self) -> None:  # noqa: N802
        super().doRollover()
        self._opened_at = time.time()
        self.prune()

    def write_lines(self, lines: list[str]) -> None:
        """A batch of lines with one write() (or one per file when the batch crosses a rotation): the
        same size and age bounds as emit(), checked per line against a size counted here, not lseek'd."""
        with self.lock:  # type: ignore[union-attr]  # logging creates it in Handler.__init__
            if self.stream is None:
                self.stream = self._open()
            stream = self.stream
            size = stream.tell()
            if size > 0 and time.time() - self._opened_at >= self.rotate_after_s:
                self.doRollover()
                size = 0
            chunk: list[str] = []
            for line in lines:
                text = line + "\n"
                length = len(text.encode("utf-8"))
                if size > 0 and size + length > self.maxBytes:
                    stream.write("".join(chunk))
                    chunk = []
                    self.doRollover()
                    stream = self.stream
                    assert stream is not None  # doRollover reopens (delay is off)
                    size = 0
                chunk.append(text)
                size += length
            stream.write("".join(chunk))
            stream.flush()

    def rotated_files(self) -> list[Path]:
        base = Path(self.baseFilename)
        return sorted(p for p in base.parent.glob(base.name + ".*") if p.suffix[1:].isdigit())

    def prune(self) -> None:
        cutoff = time.time() - self.max_age_s
        for path in self.rotated_files():
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
            except FileNotFoundError:
                pass


class _Message(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return record.getMessage()


def write_access_lines(entries: list[logging.LogRecord]) -> None:
    """Logger.callHandlers for a batch: every handler of `mediator.access` and its ancestors (as far as
    propagation goes) gets the records it accepts; a stream handler gets them as one write. Each write
    from this thread releases the GIL to the event loop and takes it back, so one write per line would
    cost more CPU than the lines themselves."""
    logger: logging.Logger | None = access_log
    while logger is not None:
        for handler in logger.handlers:
            accepted = [e for e in entries if e.levelno >= handler.level and handler.filter(e)]
            if not accepted:
                continue
            stream = getattr(handler, "stream", None) if type(handler) in (logging.StreamHandler,
                                                                           logging.FileHandler) else None
            if stream is not None:  # (a FileHandler opened with delay has none yet: handle() opens it)
                with handler.lock:  # type: ignore[union-attr]
                    try:
                        terminator = getattr(handler, "terminator", "\n")
                        stream.write("".join(handler.format(e) + terminator for e in accepted))
                        stream.flush()
                    except Exception:
                        handler.handleError(accepted[0])
            else:
                for entry in accepted:
                    handler.handle(entry)
        logger = logger.parent if logger.propagate else None


@dataclass(slots=True)
class RequestRecord:
    """What one answered request leaves behind: its audit event and its access-log fields (None when the
    access log is off), built on the request path, serialised and written by the writer thread."""

    event: dict[str, Any]
    access: dict[str, Any] | None
    request_id: str
    created: float


class RecordWriter:
    """One thread writing batches handed over by the event loop: bounded, never blocking the caller.

    `submit` only appends to a deque (atomic under the GIL); the thread takes what has accumulated every
    BATCH_INTERVAL_S. When `max_pending` records are already waiting the record is dropped and `on_drop`
    is called (a metric)."""

    BATCH_INTERVAL_S = 0.02
    """A record is written at most this long after the request was answered (while the queue has room)."""

    def __init__(self, write: Callable[[list[RequestRecord]], None], max_pending: int,
                 on_drop: Callable[[], None] | None = None) -> None:
        self._write = write
        self._pending: deque[RequestRecord] = deque()
        self._max_pending = max_pending
        self._on_drop = on_drop
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._closing = False
        self.dropped = 0
        self._last_drop_warning = 0.0
        self._thread = threading.Thread(target=self._run, name="mediator-audit-writer", daemon=True)
        self._thread.start()

    def submit(self, record: RequestRecord) -> bool:
        if len(self._pending) >= self._max_pending or self._closing:
            self.dropped += 1
            if self._on_drop is not None:
                self._on_drop()
            now = time.monotonic()
            if now - self._last_drop_warning > 10:
                self._last_drop_warning = now
                log.warning(JsonEvent.of("audit.record_dropped", waiting=len(self._pending),
                                          dropped_request_id=record.request_id, dropped_total=self.dropped))
            return False
        self._pending.append(record)
        if len(self._pending) > self._max_pending // 2 and not self._wake.is_set():
            self._wake.set()  # filling up: write now rather than at the next tick
        return True

    def _run(self) -> None:
        # The thread wakes every BATCH_INTERVAL_S (or when the queue is half full, or on flush/close), not
        # once per record: each wake-up takes the GIL from the event loop, so per-record wake-ups would
        # cost more than the writes they move off the request path.
        while True:
            self._wake.wait(self.BATCH_INTERVAL_S)
            self._wake.clear()
            while self._pending:
                self._idle.clear()
                batch: list[RequestRecord] = []
                while self._pending and len(batch) < 1000:
                    batch.append(self._pending.popleft())
                try:
                    self._write(batch)
                except Exception:  # a sink error must not stop the writer; logging reports it
                    log.exception(JsonEvent.of("audit.write_failed", records=len(batch)))
            self._idle.set()
            if self._closing and not self._pending:
                return

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every submitted record is written (tests, shutdown)."""
        deadline = time.monotonic() + timeout_s
        while self._pending or not self._idle.is_set():
            if time.monotonic() > deadline:
                return False
            self._wake.set()
            time.sleep(0.001)
        return True

    def close(self, timeout_s: float = 10.0) -> None:
        self._closing = True
        self._wake.set()
        self._thread.join(timeout_s)


class AuditLog:
    """Where audit events (and the access log lines) go. `record()` never raises into the request and
    never waits for a sink (see RecordWriter)."""

    DEFAULT_MAX_PENDING = 10_000

    def __init__(self, handlers: list[logging.Handler], max_pending: int = DEFAULT_MAX_PENDING,
                 on_drop: Callable[[], None] | None = None) -> None:
        # A private logger (not in logging's registry): no propagation into the application log, and
        # several applications in one process (tests, reload) do not share handlers.
        self.logger = logging.Logger("mediator.audit", logging.INFO)
        self.handlers = handlers
        for handler in handlers:
            handler.setFormatter(_Message())
            self.logger.addHandler(handler)
        self._files = [h for h in handlers if isinstance(h, SizeAndAgeRotatingFileHandler)]
        self._others = [h for h in handlers if not isinstance(h, SizeAndAgeRotatingFileHandler)]
        self.writer = RecordWriter(self._write, max_pending, on_drop)

    @classmethod
    def from_config(cls, config: AuditConfig | None, root: Path,
                    on_drop: Callable[[], None] | None = None) -> AuditLog:
        if config is None:
            return cls([logging.StreamHandler(sys.stderr)], on_drop=on_drop)
        path = Path(config.file)
        if not path.is_absolute():
            path = root / path
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers: list[logging.Handler] = [SizeAndAgeRotatingFileHandler(
            str(path), config.max_bytes, config.backups, config.max_age_days * 86400)]
        if config.syslog is not None:
            syslog = logging.handlers.SysLogHandler(
                address=config.syslog.socket_address(),
                facility=logging.handlers.SysLogHandler.facility_names[config.syslog.facility])
            syslog.ident = "openimis-mediator: "
            handlers.append(syslog)
        return cls(handlers, config.max_pending, on_drop)

    def record(self, exchange: Exchange, status: int, reason: str,
               access: dict[str, Any] | None = None) -> None:
        """Hand this request's audit event (and access-log fields) to the writer; returns at once."""
        now = time.time()
        self.writer.submit(RequestRecord(audit_event(exchange, status, reason, now), access,
                                         exchange.request_id, now))

    def record_event(self, event: dict[str, Any]) -> None:
        """Hand over an AuditEvent built elsewhere (the claim queue's final outcomes, which have no
        request and no access line); written like the others."""
        self.writer.submit(RequestRecord(event, None, "-", time.time()))

    def _write(self, batch: list[RequestRecord]) -> None:
        """Writer thread: each event serialised once; one write per file sink per batch."""
        lines = [json_codec.dumps_text(r.event) for r in batch]
        for handler in self._files:
            handler.write_lines(lines)
        for other in self._others:
            for line in lines:
                # makeRecord + handle is Logger.info without findCaller's stack walk.
                other.handle(self.logger.makeRecord(self.logger.name, logging.INFO, __file__, 0, line, (), None))
        entries = []
        for r in batch:
            if r.access is not None:
                entry = access_log.makeRecord(access_log.name, logging.INFO, __file__, 0, JsonEvent(r.access),
                                              (), None)
                entry.created, entry.msecs = r.created, (r.created % 1) * 1000
                entry.request_id = r.request_id  # the writer thread has no request context
                if access_log.filter(entry):
                    entries.append(entry)
        if entries:
            write_access_lines(entries)

    def flush(self, timeout_s: float = 5.0) -> bool:
        return self.writer.flush(timeout_s)

    def close(self) -> None:
        self.writer.close()
        for handler in self.handlers:
            self.logger.removeHandler(handler)
            handler.close()
