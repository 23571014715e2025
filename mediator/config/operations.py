"""Schema of the operational parts of `channels.yaml` `server:`: metrics listener, audit log, reload, shutdown.

These settings are read at start. `server.metrics` and `server.audit` need a restart to change (a reload
that changes them is applied for everything else and logs a warning naming the key).
"""

from __future__ import annotations

import logging.handlers
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

Port = Annotated[int, Field(ge=0, le=65535)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MetricsListenerConfig(_Strict):
    """Where Prometheus scrapes `/metrics`. A listener of its own, never the public FHIR port.

    Absent (`server.metrics` not given): no metrics listener at all. Plain HTTP: bind it to a private
    address (loopback, the pod network) only. With `serve --workers N`, worker i listens on `port + i`.
    """

    host: str = "127.0.0.1"
    port: Port = 9464


SYSLOG_FACILITIES = tuple(sorted(logging.handlers.SysLogHandler.facility_names))


class SyslogConfig(_Strict):
    """Ship every audit event to syslog as well (RFC 3164 over UDP, or a local unix socket)."""

    address: str
    """`host:port` (UDP) or an absolute unix socket path such as `/dev/log`."""
    facility: str = "local0"

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        if value.startswith("/"):
            return value
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("address must be host:port or an absolute unix socket path")
        return value

    @field_validator("facility")
    @classmethod
    def _facility(cls, value: str) -> str:
        if value not in SYSLOG_FACILITIES:
            raise ValueError(f"unknown syslog facility {value!r}; allowed: {', '.join(SYSLOG_FACILITIES)}")
        return value

    def socket_address(self) -> str | tuple[str, int]:
        if self.address.startswith("/"):
            return self.address
        host, _, port = self.address.rpartition(":")
        return host.strip("[]"), int(port)


class AuditConfig(_Strict):
    """The audit trail: one FHIR AuditEvent JSON line per FHIR request.

    Absent (`server.audit` not given): audit events are written as JSON lines to stderr (what container
    platforms collect). Present: written to `file`, rotated by size and by age, optionally shipped to syslog.
    """

    file: str
    """Path of the audit file; relative paths are relative to the configuration directory."""
    max_bytes: int = Field(10 * 1_048_576, ge=1024)
    """A file is rotated before it would grow beyond this."""
    backups: int = Field(10, ge=1, le=1000)
    """Rotated files kept (`audit.log.1` … `audit.log.N`); older ones are deleted."""
    max_age_days: float = Field(30, gt=0, le=3650)
    """A file is rotated once it is a day old; rotated files older than this are deleted."""
    syslog: SyslogConfig | None = None
    """Absent: no syslog shipping."""
    max_pending: int = Field(10_000, ge=100, le=1_000_000)
    """Records (audit event + access line) waiting for the writer thread at most; beyond, a record is
    dropped and counted in mediator_audit_records_dropped_total (the request is never held up)."""


class ReloadConfig(_Strict):
    """Hot reload: SIGHUP always reloads; this adds polling of the files' modification times."""

    poll_interval_s: float = Field(5, ge=0, le=3600)
    """Check `channels.yaml` and `policies/*` this often; 0: no polling (SIGHUP only)."""


class ShutdownConfig(_Strict):
    drain_timeout_s: float = Field(30, gt=0, le=3600)
    """On SIGTERM: stop accepting, then wait at most this long for requests in flight; then exit 0.
    Keep it below the platform's kill grace period (Kubernetes terminationGracePeriodSeconds)."""
