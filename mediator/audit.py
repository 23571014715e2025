"""The audit trail: one FHIR R4 AuditEvent per FHIR request, as a JSON line.

Who (client id and user id from the authenticated Principal, client IP, health facilities), what
(action C/R/U/D/E from the FHIR interaction, resource type and id), outcome (FHIR outcome code and the
mediator's reason code), the request id and when. The event is built from an allowlist of fields: the
query string (insuree numbers), bodies, headers, tokens and passwords are never read, so never written.

Sinks: a file rotated by size and by age (bounded count), optionally syslog; absent config → stderr.
Thread-safety: `logging` handlers lock internally; one AuditLog per application, closed at cleanup.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mediator.config.operations import AuditConfig
from mediator.pipeline import Exchange

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
        "recorded": datetime.fromtimestamp(recorded, UTC).isoformat(timespec="milliseconds"),
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


class AuditLog:
    """Where audit events go. `record()` never raises into the request (logging reports its own errors)."""

    def __init__(self, handlers: list[logging.Handler]) -> None:
        # A private logger (not in logging's registry): no propagation into the application log, and
        # several applications in one process (tests, reload) do not share handlers.
        self.logger = logging.Logger("mediator.audit", logging.INFO)
        self.handlers = handlers
        for handler in handlers:
            handler.setFormatter(_Message())
            self.logger.addHandler(handler)

    @classmethod
    def from_config(cls, config: AuditConfig | None, root: Path) -> AuditLog:
        if config is None:
            return cls([logging.StreamHandler(sys.stderr)])
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
        return cls(handlers)

    def record(self, exchange: Exchange, status: int, reason: str) -> None:
        self.record_event(audit_event(exchange, status, reason, time.time()))

    def record_event(self, event: dict[str, Any]) -> None:
        """Write an AuditEvent built elsewhere (the queue's final outcomes, which have no request)."""
        text = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
        # makeRecord + handle is Logger.info without findCaller's stack walk: the event names its own
        # source, and the formatter writes the message only.
        self.logger.handle(self.logger.makeRecord(self.logger.name, logging.INFO, __file__, 0, text, None, None))

    def close(self) -> None:
        for handler in self.handlers:
            self.logger.removeHandler(handler)
            handler.close()
