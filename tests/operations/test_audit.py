"""The audit trail: valid FHIR AuditEvents, redaction, bounded rotation, syslog over a real UDP socket."""

from __future__ import annotations

import io
import ipaddress
import json
import logging
import os
import socket
import threading
import time

import pytest
from fhir.resources.R4B.auditevent import AuditEvent

from mediator.audit import AuditLog, RecordWriter, RequestRecord, SizeAndAgeRotatingFileHandler, audit_event
from mediator.config.operations import AuditConfig, SyslogConfig
from mediator.fhir import parse_fhir_path
from mediator.logs import JsonFormatter
from mediator.metrics import Metrics
from mediator.pipeline import Exchange, Principal
from tests.conftest import channels_yaml, config_problems, upstream_url, write_config

AUDIT_TO_FILE = """\
audit:
  file: audit/audit.log
  max_bytes: 4096
  backups: 3
  max_age_days: 7
"""


def _exchange(method: str, path: str, principal: Principal | None = None) -> Exchange:
    exchange = Exchange(request=None, request_id="req-0123456789")  # type: ignore[arg-type]
    exchange.fhir = parse_fhir_path(method, path)
    exchange.client_ip = ipaddress.ip_address("192.0.2.7")
    exchange.principal = principal
    return exchange


@pytest.mark.parametrize(
    ("method", "path", "action", "subtype"),
    [
        ("POST", "Claim", "C", "create"),
        ("GET", "Claim/abc", "R", "read"),
        ("GET", "Patient", "E", "search-type"),
        ("PUT", "Claim/abc", "U", "update"),
        ("DELETE", "Coverage/x1", "D", "delete"),
        ("POST", "", "E", "batch"),
        ("GET", "metadata", "R", "capabilities"),
        ("POST", "Claim/$submit", "E", "operation"),
    ],
)
def test_action_follows_the_fhir_interaction(method, path, action, subtype):
    event = audit_event(_exchange(method, path), 200, "upstream.answered", 1_700_000_000.0)
    assert (event["action"], event["subtype"][0]["code"]) == (action, subtype)
    AuditEvent.model_validate(event)


@pytest.mark.parametrize(("status", "outcome"), [(200, "0"), (201, "0"), (403, "4"), (429, "4"), (502, "8")])
def test_outcome_code_follows_the_status(status, outcome):
    event = audit_event(_exchange("GET", "Claim/abc"), status, "r.x", 1_700_000_000.0)
    assert (event["outcome"], event["outcomeDesc"]) == (outcome, f"{status} r.x")


def test_who_comes_from_the_principal_and_the_event_is_a_valid_r4_audit_event():
    principal = Principal(client_id="hms-vendor-a", auth_method="private_key_jwt", user_id="ca-0042",
                          health_facilities=frozenset({"JMHOS001", "JMHOS002"}),
                          claims={"access_token": "eyJsecret"}, vouched_by="iss=https://sso.a.example")
    event = audit_event(_exchange("GET", "Claim/abc", principal), 200, "upstream.answered", 1_700_000_000.0)
    parsed = AuditEvent.model_validate(event)
    agent = event["agent"][0]
    assert agent["who"]["identifier"]["value"] == "hms-vendor-a"
    assert agent["altId"] == "iss=https%3A%2F%2Fsso.a.example/user=ca-0042"  # namespaced by its issuer
    assert [e["valueString"] for e in agent["extension"]] == ["JMHOS001", "JMHOS002"]
    assert agent["network"] == {"address": "192.0.2.7", "type": "2"}
    assert [e.get("what") for e in event["entity"]] == [{"identifier": {"value": "req-0123456789"}},
                                                          {"reference": "Claim/abc"}]
    assert parsed.recorded.isoformat() == "2023-11-14T22:13:20+00:00"
    assert "eyJsecret" not in json.dumps(event)


async def test_every_request_is_audited_to_the_file_without_secrets(tmp_path, sandbox_server, make_mediator):
    client = await make_mediator(channels_yaml(upstream_url(sandbox_server), extra_server=AUDIT_TO_FILE))
    secrets = {"Authorization": "Bearer eyJhbGciOi.secret-token", "Cookie": "sessionid=cookie-secret"}
    await client.get("/fhir/Patient?identifier=123456789", headers=secrets)
    await client.post("/fhir/Claim", json={"resourceType": "Claim", "text": {"div": "body-secret-pw"}}, headers=secrets)
    await client.get("/fhir/Nothing/zz", headers=secrets)
    await client.close()
    text = (tmp_path / "config" / "audit" / "audit.log").read_text()
    events = [json.loads(line) for line in text.splitlines()]
    assert [(e["action"], e["outcomeDesc"]) for e in events] == [
        ("E", "200 upstream.answered"), ("C", "201 upstream.answered"), ("R", "404 channel.none")]
    for event in events:
        AuditEvent.model_validate(event)
    for secret in ("123456789", "secret-token", "cookie-secret", "body-secret-pw", "admin123", "identifier="):
        assert secret not in text


def test_rotation_keeps_size_and_count_bounded(tmp_path):
    handler = SizeAndAgeRotatingFileHandler(str(tmp_path / "a.log"), max_bytes=2000, backups=3, max_age_s=86400)
    log = AuditLog([handler])
    for i in range(200):
        log.logger.info(json.dumps({"n": i, "pad": "x" * 80}))
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["a.log", "a.log.1", "a.log.2", "a.log.3"]
    assert all((tmp_path / f).stat().st_size <= 2000 for f in files)
    assert '"n": 199' in (tmp_path / "a.log").read_text()


def test_rotation_by_age_and_old_files_are_deleted(tmp_path):
    handler = SizeAndAgeRotatingFileHandler(str(tmp_path / "a.log"), max_bytes=10**6, backups=5,
                                            max_age_s=7 * 86400, rotate_after_s=86400)
    log = AuditLog([handler])
    log.logger.info("day one")
    week_old = time.time() - 8 * 86400
    (tmp_path / "a.log.4").write_text("ancient\n")
    os.utime(tmp_path / "a.log.4", (week_old, week_old))
    handler._opened_at -= 86401  # the current file is now more than a day old
    log.logger.info("day two")
    log.close()
    assert (tmp_path / "a.log.1").read_text() == "day one\n"
    assert (tmp_path / "a.log").read_text() == "day two\n"
    assert not (tmp_path / "a.log.4").exists()  # older than max_age_days: deleted at rollover


def test_audit_events_are_shipped_to_syslog_over_udp(tmp_path):
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(5)
    port = receiver.getsockname()[1]
    config = AuditConfig(file=str(tmp_path / "audit.log"),
                         syslog=SyslogConfig(address=f"127.0.0.1:{port}", facility="local3"))
    log = AuditLog.from_config(config, tmp_path)
    try:
        log.record(_exchange("GET", "Claim/abc"), 403, "ip.denied")
        datagram = receiver.recv(65536).decode()
    finally:
        log.close()
        receiver.close()
    # PRI = facility local3 (19) * 8 + severity info (6) = 158 (RFC 3164 §4.1.1)
    assert datagram.startswith("<158>openimis-mediator: {")
    event = json.loads(datagram[len("<158>openimis-mediator: "):].rstrip("\x00"))
    assert event["outcomeDesc"] == "403 ip.denied"
    assert json.loads((tmp_path / "audit.log").read_text()) == event


def test_without_audit_config_events_go_to_stderr_as_json(tmp_path, capsys):
    log = AuditLog.from_config(None, tmp_path)
    log.record(_exchange("GET", "Claim/abc"), 200, "upstream.answered")
    log.close()
    assert json.loads(capsys.readouterr().err)["resourceType"] == "AuditEvent"
    assert not logging.getLogger("mediator.audit").handlers  # private logger: nothing leaks into app logs


@pytest.mark.parametrize(
    ("audit", "expected"),
    [
        ("audit:\n  file: a.log\n  backups: 0\n",
         "channels.yaml:8:5: server.audit.backups: Input should be greater than or equal to 1"),
        ("audit:\n  file: a.log\n  syslog:\n    address: localhost\n",
         "channels.yaml:9:7: server.audit.syslog.address: address must be host:port or an absolute unix socket path"),
        ("audit:\n  file: a.log\n  syslog:\n    address: 127.0.0.1:514\n    facility: local9\n",
         "channels.yaml:10:7: server.audit.syslog.facility: unknown syslog facility 'local9'; allowed: auth, "
         "authpriv, console, cron, daemon, ftp, kern, local0, local1, local2, local3, local4, local5, local6, "
         "local7, lpr, mail, news, ntp, security, solaris-cron, syslog, user, uucp"),
        ("audit:\n  max_bytes: 2048\n",
         "channels.yaml:6:3: server.audit.file: Field required"),
        ("metrics:\n  port: 99999\n",
         "channels.yaml:7:5: server.metrics.port: Input should be less than or equal to 65535"),
        ("reload:\n  poll_every: 3\n",
         "channels.yaml:7:5: server.reload.poll_every: Extra inputs are not permitted"),
        ("shutdown:\n  drain_timeout_s: 0\n",
         "channels.yaml:7:5: server.shutdown.drain_timeout_s: Input should be greater than 0"),
    ],
)
def test_operations_schema_errors_name_file_line_and_message(tmp_path, audit, expected):
    root = write_config(tmp_path, channels_yaml("http://127.0.0.1:1/api/api_fhir_r4/", extra_server=audit))
    assert config_problems(root) == [expected]


def test_records_are_written_off_the_request_path_with_the_access_line(tmp_path):
    access = logging.getLogger("mediator.access")
    lines: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record)

    keep = Keep()
    access.addHandler(keep)
    access.setLevel(logging.INFO)
    log = AuditLog.from_config(AuditConfig(file=str(tmp_path / "audit.log")), tmp_path)
    try:
        log.record(_exchange("GET", "Claim/abc"), 200, "upstream.answered", {"status": 200, "channel": "claims"})
        assert log.flush()
        events = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
        assert [e["outcomeDesc"] for e in events] == ["200 upstream.answered"]
        assert len(lines) == 1 and lines[0].request_id == "req-0123456789"  # type: ignore[attr-defined]
        assert lines[0].threadName == "mediator-audit-writer"
        assert lines[0].msg.fields == {"status": 200, "channel": "claims"}  # type: ignore[union-attr]
    finally:
        log.close()
        access.removeHandler(keep)
        access.setLevel(logging.NOTSET)


def test_a_full_writer_drops_and_counts_instead_of_blocking(tmp_path):
    release = threading.Event()
    written: list[int] = []
    drops: list[int] = []

    def slow_sink(batch):
        release.wait(10)  # a stuck disk
        written.extend(range(len(batch)))

    writer = RecordWriter(slow_sink, max_pending=100, on_drop=lambda: drops.append(1))
    record = RequestRecord({"resourceType": "AuditEvent"}, None, "req-1", time.time())
    started = time.perf_counter()
    accepted = sum(writer.submit(record) for _ in range(1000))
    elapsed = time.perf_counter() - started
    waiting = len(writer._pending)
    release.set()
    assert writer.flush(10)
    writer.close()
    # At most max_pending wait (plus what the writer took into the stuck sink before it blocked).
    assert waiting <= 100 and 100 <= accepted < 1000
    assert writer.dropped == len(drops) == 1000 - accepted
    assert len(written) == accepted
    assert elapsed < 0.5  # never waited for the sink


def test_batched_writes_keep_the_rotation_bounds(tmp_path):
    handler = SizeAndAgeRotatingFileHandler(str(tmp_path / "a.log"), max_bytes=2000, backups=3, max_age_s=86400)
    log = AuditLog([handler])
    for i in range(200):
        log.writer.submit(RequestRecord({"n": i, "pad": "x" * 80}, None, f"r{i}", time.time()))
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["a.log", "a.log.1", "a.log.2", "a.log.3"]
    assert all((tmp_path / f).stat().st_size <= 2000 for f in files)
    assert (tmp_path / "a.log").read_text().splitlines()[-1] == '{"n":199,"pad":"' + "x" * 80 + '"}'


def test_the_dropped_records_metric_counts_drops(tmp_path):
    metrics = Metrics()
    log = AuditLog([logging.NullHandler()], max_pending=100, on_drop=metrics.audit_records_dropped.inc)
    log.writer._closing = True  # a closed writer accepts nothing: every record is a counted drop
    log.record(_exchange("GET", "Claim/abc"), 200, "upstream.answered")
    log.writer._closing = False
    log.close()
    assert metrics.registry.get_sample_value("mediator_audit_records_dropped_total") == 1


def test_access_lines_reach_stream_handlers_in_one_write_with_their_request_ids(tmp_path):
    class CountingStream(io.StringIO):
        writes = 0

        def write(self, text: str) -> int:
            CountingStream.writes += 1
            return super().write(text)

    stream = CountingStream()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    access = logging.getLogger("mediator.access")
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    log = AuditLog([logging.NullHandler()])
    try:
        for i in range(3):
            exchange = _exchange("GET", "Claim/abc")
            exchange.request_id = f"req-{i:012d}"
            log.record(exchange, 200, "upstream.answered", {"status": 200, "n": i})
        assert log.flush()
    finally:
        log.close()
        access.removeHandler(handler)
        access.setLevel(logging.NOTSET)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(line["request_id"], line["event"]["n"]) for line in lines] == [(f"req-{i:012d}", i) for i in range(3)]
    # One write per batch: the three records are submitted within microseconds of each other, so they are
    # one batch, or two if the writer's 20 ms tick falls between them; never one write per line.
    assert CountingStream.writes <= 2
