"""Structured logging: one JSON object per line, with the request id of the request being handled.

The request id lives in a context variable set by `app.handle_fhir` for the duration of one request;
`RequestIdFilter` copies it onto every record, so a line logged anywhere below the handler (upstream
login, a stage, an error) carries the same id that openIMIS receives in `X-Request-ID` and the caller
gets back. Messages are what the code passes; nothing here reads headers or bodies.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("mediator_request_id", default=None)


def bind_request_id(request_id: str) -> contextvars.Token[str | None]:
    return REQUEST_ID.set(request_id)


def unbind_request_id(token: contextvars.Token[str | None]) -> None:
    REQUEST_ID.reset(token)


class RequestIdFilter(logging.Filter):
    """Adds `record.request_id` (None outside a request). Attach to handlers, so every logger benefits."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """`{"ts","level","logger","msg","request_id"[,"exc"]}`; a message that is itself a JSON object
    (the access log) is embedded as `"event"` rather than as an escaped string."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", None),
        }
        if message.startswith("{"):
            try:
                line["event"] = json.loads(message)
            except ValueError:
                line["msg"] = message
        else:
            line["msg"] = message
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, separators=(",", ":"), default=str)


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Give the root logger one stderr handler (JSON lines, or plain text for a terminal).

    Like logging.basicConfig, it does nothing if the root logger already has handlers (an embedding
    program or a test runner configured logging first)."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root.addHandler(handler)
    root.setLevel(level.upper())
