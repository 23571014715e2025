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
import re
import sys
import time
from typing import Any

from mediator import json_codec

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


EVENT_NAME = re.compile(r"\A[a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)+\Z")
"""`<area>.<what_happened>`: the stable name an operator filters on (`event.event`)."""


class JsonEvent:
    """The one kind of log message: its fields are serialised once, by whichever formatter writes them
    (JsonFormatter embeds the dict as `"event"`; any other formatter, or `record.getMessage()`, gets the
    compact JSON text).

    Every line but the access line is `JsonEvent.of("<area>.<what>", **fields)`: a stable name and typed
    fields (counts as numbers, causes as exception class names). The access line (logger
    `mediator.access`) is `JsonEvent(fields)`, its fields fixed by README "Logs". Fields never hold a
    token, a password, a key or a query string (tests/operations/test_log_convention.py pins the form)."""

    __slots__ = ("fields",)

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields

    @classmethod
    def of(cls, name: str, /, **fields: Any) -> JsonEvent:
        """An operational event: `{"event": name, **fields}`."""
        return cls({"event": name, **fields})

    def __str__(self) -> str:
        return json_codec.dumps_ascii(self.fields)


class JsonFormatter(logging.Formatter):
    """`{"ts","level","logger","msg","request_id"[,"exc"]}`; a message that is itself a JSON object
    (a JsonEvent, or text starting with "{") is embedded as `"event"` rather than as an escaped string."""

    _second: int = -1
    _second_text: str = ""

    def _timestamp(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:  # strftime once per second, not once per line
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._second_text}.{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": self._timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", None),
        }
        if isinstance(record.msg, JsonEvent) and not record.args:
            line["event"] = record.msg.fields
            if record.exc_info:
                line["exc"] = self.formatException(record.exc_info)
            return json_codec.dumps_ascii(line)
        message = record.getMessage()
        if message.startswith("{"):
            try:
                line["event"] = json.loads(message)
            except ValueError:
                line["msg"] = message
        else:
            line["msg"] = message
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json_codec.dumps_ascii(line)


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
