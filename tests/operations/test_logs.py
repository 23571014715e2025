"""Structured logs: JSON lines, and the request id on every line logged while a request is handled."""

from __future__ import annotations

import io
import json
import logging

from mediator.app import AUDIT
from mediator.logs import JsonEvent, JsonFormatter, RequestIdFilter, configure_logging


def _capture(logger_name: str) -> tuple[io.StringIO, logging.Handler]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    logging.getLogger(logger_name).addHandler(handler)
    return stream, handler


async def test_lines_logged_during_a_request_carry_its_id_which_openimis_also_receives(sandbox, mediator):
    stream, handler = _capture("mediator")
    logging.getLogger("mediator").setLevel(logging.INFO)
    try:
        logging.getLogger("mediator.test").info("before any request")
        response = await mediator.get("/fhir/Medication/", headers={"X-Request-ID": "trace-abc-0001"})
        assert response.status == 200
        assert mediator.server.app[AUDIT].flush()  # the access line is written by the audit writer thread
    finally:
        logging.getLogger("mediator").removeHandler(handler)
        logging.getLogger("mediator").setLevel(logging.NOTSET)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    by_message = {(line.get("msg") or line["event"].get("event") or line["event"].get("channel")): line
                  for line in lines}
    assert by_message["before any request"]["request_id"] is None
    login = by_message["upstream.logged_in"]  # logged deep in upstream.py, not by the handler
    assert login["request_id"] == "trace-abc-0001" and login["logger"] == "mediator.upstream"
    assert login["event"] == {"event": "upstream.logged_in", "upstream": "openimis"}
    access = by_message["master-data"]
    assert access["request_id"] == "trace-abc-0001" and access["event"]["status"] == 200
    forwarded = [r for r in sandbox.requests if r["path"].endswith("/Medication/")]
    assert forwarded[0]["headers"]["X-Request-ID"] == "trace-abc-0001"


def test_json_formatter_keeps_exceptions_and_plain_messages():
    record = logging.LogRecord("mediator.x", logging.ERROR, __file__, 1, "failed %s", ("here",), None)
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    RequestIdFilter().filter(record)
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "failed here" and line["level"] == "ERROR" and "ValueError: boom" in line["exc"]
    assert line["ts"].endswith("Z")


def test_configure_logging_installs_one_json_handler_on_an_unconfigured_root():
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        root.handlers[:] = []
        configure_logging("WARNING", "json")
        assert len(root.handlers) == 1 and isinstance(root.handlers[0].formatter, JsonFormatter)
        assert root.level == logging.WARNING
        configure_logging("DEBUG", "text")  # already configured: left alone
        assert len(root.handlers) == 1 and root.level == logging.WARNING
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_a_json_event_is_embedded_as_is_and_reads_as_json_text_elsewhere():
    fields = {"request_id": "r-1", "status": 200, "reason": "upstream.answered", "ms": 1.5}
    record = logging.LogRecord("mediator.access", logging.INFO, __file__, 1, JsonEvent(fields), None, None)
    record.request_id = "r-1"
    line = json.loads(JsonFormatter().format(record))
    assert line["event"] == fields and "msg" not in line and line["request_id"] == "r-1"
    assert line["ts"].endswith("Z") and len(line["ts"]) == len("2026-01-01T00:00:00.000Z")
    assert json.loads(record.getMessage()) == fields   # plain formatters and caplog see the JSON text
