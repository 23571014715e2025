"""One logging style (README "Logs"): every line the mediator logs is a JsonEvent. Operational lines are
`JsonEvent.of("<area>.<what>", **fields)` with a literal, stable name; the access line (logger
`mediator.access`) is `JsonEvent(fields)`. Pinned by reading mediator/'s source, so a %-format text log
call added anywhere fails here; the scanner is shown to catch planted text calls first."""

from __future__ import annotations

import ast
import io
import json
import logging
from pathlib import Path

import pytest

from mediator.logs import EVENT_NAME, JsonEvent, JsonFormatter, RequestIdFilter
from mediator.redis_store import RedisStore
from mediator.stages.rate_limit import RateLimitStage, RateLimitTable

MEDIATOR = Path(__file__).resolve().parents[2] / "mediator"
LEVEL_METHODS = frozenset({"debug", "info", "warning", "warn", "error", "exception", "critical", "fatal", "log"})
ACCESS_LOGGER = "mediator.access"
# Field names that would put a secret or a caller's query (insuree numbers) into a log line.
FORBIDDEN_FIELDS = frozenset({"token", "access_token", "bearer", "password", "secret", "authorization", "cookie",
                              "key", "private_key", "assertion", "query", "raw_query", "query_string"})


def _is_get_logger(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and (
        (isinstance(node.func, ast.Attribute) and node.func.attr == "getLogger")
        or (isinstance(node.func, ast.Name) and node.func.id == "getLogger"))


def _logger_name(node: ast.Call) -> str | None:
    return node.args[0].value if node.args and isinstance(node.args[0], ast.Constant) else None


def _is_json_event(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "JsonEvent"


def _is_json_event_of(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "of" \
        and isinstance(node.func.value, ast.Name) and node.func.value.id == "JsonEvent"


class _Scan(ast.NodeVisitor):
    """Logging calls and JsonEvent constructions of one module, with what is wrong with them."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.problems: list[str] = []
        self.loggers: dict[str, str | None] = {}   # variable → logger name, from `x = logging.getLogger(...)`
        self.logging_calls = 0
        self._event_params: list[set[str]] = [set()]
        self._allowed_events: set[int] = set()   # id() of JsonEvent(...) nodes handed to the access logger

    def scan(self, tree: ast.Module) -> _Scan:
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and _is_get_logger(node.value):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        self.loggers[target.id] = _logger_name(node.value)  # type: ignore[arg-type]
        self.visit(tree)
        return self

    def _problem(self, node: ast.AST, text: str) -> None:
        self.problems.append(f"{self.where}:{getattr(node, 'lineno', 0)}: {text}")

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        params = {a.arg for a in (*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs)
                  if isinstance(a.annotation, ast.Name | ast.Constant)
                  and (getattr(a.annotation, "id", None) or getattr(a.annotation, "value", None)) == "JsonEvent"}
        self._event_params.append(params)
        self.generic_visit(node)
        self._event_params.pop()

    visit_AsyncFunctionDef = visit_FunctionDef  # noqa: N815  (ast.NodeVisitor's naming)

    def _receiver(self, func: ast.Attribute) -> tuple[bool, str | None]:
        """(is a logger, its name if known)."""
        value = func.value
        if _is_get_logger(value):
            return True, _logger_name(value)  # type: ignore[arg-type]
        if isinstance(value, ast.Name):
            if value.id in self.loggers:
                return True, self.loggers[value.id]
            if value.id == "logging" or value.id.lower().endswith(("log", "logger")):
                return True, None
        return False, None

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in LEVEL_METHODS | {"makeRecord"}:
            is_logger, name = self._receiver(func)
            if is_logger:
                self._check_logging_call(node, func.attr, name)
        if _is_json_event_of(node):
            self._check_event_of(node)
        elif _is_json_event(node) and id(node) not in self._allowed_events:
            self._problem(node, "JsonEvent(...) outside the access log: use JsonEvent.of(name, **fields)")
        self.generic_visit(node)

    def _check_logging_call(self, node: ast.Call, method: str, logger: str | None) -> None:
        self.logging_calls += 1
        index = {"log": 1, "makeRecord": 4}.get(method, 0)
        if len(node.args) <= index:
            self._problem(node, f".{method}() without a message")
            return
        message = node.args[index]
        if len(node.args) > index + 1 and method != "makeRecord":
            self._problem(node, f".{method}() with %-format arguments")
        if logger == ACCESS_LOGGER:
            if _is_json_event(message):
                self._allowed_events.add(id(message))
                return
            self._problem(node, "the access line is JsonEvent(fields)")
            return
        if _is_json_event_of(message):
            return
        if isinstance(message, ast.Name) and message.id in self._event_params[-1]:
            return   # a parameter typed JsonEvent: its JsonEvent.of(...) is checked where it is built
        self._problem(node, f".{method}() message is not JsonEvent.of(...): {ast.unparse(message)[:60]}")

    def _check_event_of(self, node: ast.Call) -> None:
        name = node.args[0] if node.args else None
        if not (isinstance(name, ast.Constant) and isinstance(name.value, str) and EVENT_NAME.match(name.value)):
            self._problem(node, "JsonEvent.of needs a literal `<area>.<what>` name")
        for keyword in node.keywords:
            if keyword.arg is None:
                self._problem(node, "JsonEvent.of(**fields): fields must be named where the event is logged")
            elif keyword.arg in FORBIDDEN_FIELDS or keyword.arg == "event":
                self._problem(node, f"JsonEvent.of field {keyword.arg!r} is not allowed in a log line")


def scan_source(source: str, where: str = "<planted>") -> _Scan:
    return _Scan(where).scan(ast.parse(source))


def test_the_scanner_catches_text_log_calls_planted_here():
    planted = '''
import logging
log = logging.getLogger("mediator.x")
access_log = logging.getLogger("mediator.access")

def bad(exc, request_id, fields, name):
    log.info("logged in to upstream %s", name)
    log.warning(f"failed: {exc}")
    log.log(logging.INFO, "text %s", exc)
    logging.getLogger("mediator.y").error("text")
    logging.warning("module-level text")
    log.exception(JsonEvent({"event": "x.y"}))
    log.info(JsonEvent.of(name))
    log.info(JsonEvent.of("NoDots"))
    log.info(JsonEvent.of("upstream.login", token=exc))
    access_log.info("access as text")
    log.info(JsonEvent.of("a.b", **fields))
'''
    flagged: dict[int, list[str]] = {}
    for problem in scan_source(planted).problems:
        _, line, text = problem.split(":", 2)
        flagged.setdefault(int(line), []).append(text.strip())
    assert sorted(flagged) == list(range(7, 18))   # every planted call, and nothing else
    assert flagged[7] == [".info() with %-format arguments",
                          ".info() message is not JsonEvent.of(...): 'logged in to upstream %s'"]
    assert flagged[8] == [".warning() message is not JsonEvent.of(...): f'failed: {exc}'"]
    assert flagged[10] == [".error() message is not JsonEvent.of(...): 'text'"]
    assert flagged[11] == [".warning() message is not JsonEvent.of(...): 'module-level text'"]
    assert flagged[13] == flagged[14] == ["JsonEvent.of needs a literal `<area>.<what>` name"]
    assert flagged[15] == ["JsonEvent.of field 'token' is not allowed in a log line"]
    assert flagged[16] == ["the access line is JsonEvent(fields)"]


def test_the_scanner_accepts_the_convention():
    good = '''
import logging
log = logging.getLogger("mediator.x")
access_log = logging.getLogger("mediator.access")

def good(exc, fields):
    log.info(JsonEvent.of("upstream.logged_in", upstream="openimis"))
    log.log(logging.DEBUG, JsonEvent.of("authentication.decided", outcome="allow"))
    log.error(JsonEvent.of("request.unhandled_error", error=type(exc).__name__), exc_info=exc)
    access_log.info(JsonEvent(fields))
    access_log.makeRecord(access_log.name, logging.INFO, __file__, 0, JsonEvent(fields), None, None)

def warn(event: JsonEvent):
    log.warning(event)
'''
    scan = scan_source(good)
    assert scan.problems == [] and scan.logging_calls == 6


def test_every_log_call_in_the_mediator_is_a_json_event():
    problems: list[str] = []
    calls = 0
    for path in sorted(MEDIATOR.rglob("*.py")):
        scan = scan_source(path.read_text(), str(path.relative_to(MEDIATOR.parent)))
        problems += scan.problems
        calls += scan.logging_calls
    assert problems == []
    assert calls > 60   # the scan saw the mediator's logging calls (about 70), not an empty tree


# --- what the converted events look like on the wire -----------------------------------------------------

def _formatted(record: logging.LogRecord) -> dict[str, object]:
    RequestIdFilter().filter(record)
    decoded: dict[str, object] = json.loads(JsonFormatter().format(record))
    return decoded


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def records():
    handler = _Records()
    logger = logging.getLogger("mediator")
    logger.addHandler(handler)
    saved = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved)


def test_a_mediator_error_logs_its_reason_class_and_text_as_fields(records):
    from mediator.upstream import UpstreamUnavailable

    UpstreamUnavailable("ClientOSError").log(logging.getLogger("mediator.chain"))
    line = _formatted(records[-1])
    assert line["level"] == "WARNING" and line["logger"] == "mediator.chain" and "msg" not in line
    assert line["event"] == {"event": "request.error", "reason": "upstream.unavailable",
                             "error": "UpstreamUnavailable", "detail": "ClientOSError"}


async def test_an_unhandled_error_keeps_its_traceback_beside_the_event(records):
    from mediator.chain import error_decision

    try:
        raise KeyError("a bug")
    except KeyError as exc:
        decision = error_decision(exc, "rid-00000001")
    assert decision.reason == "mediator.internal_error"
    line = _formatted(records[-1])
    assert line["event"] == {"event": "request.unhandled_error", "request_id": "rid-00000001", "error": "KeyError"}
    assert line["level"] == "ERROR" and "KeyError: 'a bug'" in str(line["exc"])


def test_a_rate_limit_store_warning_is_an_event_with_typed_fields(records):
    stage = RateLimitStage(RateLimitTable({}, 65536), RedisStore(None))
    stage._reconcile_failed(ConnectionError("refused"))
    stage._reconcile_failed(ConnectionError("refused"))   # one line per 10 s, not one per failure
    assert len(records) == 1
    line = _formatted(records[-1])
    assert line["logger"] == "mediator.rate_limit" and line["level"] == "WARNING"
    assert line["event"] == {"event": "rate_limit.reconcile_failed", "error": "ConnectionError",
                             "effect": "deciding locally"}


def test_plain_text_from_libraries_still_lands_in_msg():
    record = logging.LogRecord("asyncio", logging.WARNING, __file__, 1, "Executing %s took %.3f s",
                               ("<Task>", 0.2), None)
    line = _formatted(record)
    assert line["msg"] == "Executing <Task> took 0.200 s" and "event" not in line


def test_an_event_reads_as_json_text_for_other_formatters():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("mediator.test_convention")
    logger.addHandler(handler)
    try:
        logger.warning(JsonEvent.of("replica.sync_failed", detail="Organization list answered 500"))
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue() == ('WARNING {"event":"replica.sync_failed","detail":"Organization list answered 500"}'
                                 + "\n")
