"""`openimis-mediator test`: the decisions a policy must make, stated in YAML and proved offline.

A case file (README "Policy tests") describes requests, the facts they assume (facility directory,
claim owners) and the expected outcome. Each case runs through `mediator.offline.evaluate` (the server's
own `build_stages`, no openIMIS, no Redis, no network, nothing shared changed). The principal is the one
the authentication stage would build for the described caller from policies/clients.yaml: the client's
default roles, registered facilities and scopes, plus what the user's token would carry.

Output is one line per case (`PASS`/`FAIL file:line name`), for a failure the expected and actual
outcome and every stage's decision, then `N passed, N failed`; exit 1 if any failed, 2 if a case file
is invalid. `--junit FILE` also writes a JUnit XML report.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from mediator.config import Config, validate_document
from mediator.config.clients import ClientsPolicy
from mediator.config.models import Strict
from mediator.config.types import HttpMethod
from mediator.config.yaml_source import SourcedDocument, load_yaml
from mediator.errors import ConfigError, ConfigProblem
from mediator.offline import AssumedFacts, DescribedRequest, Explanation, evaluate
from mediator.pipeline import Decision, Principal
from mediator.stages.authentication import USER_NAME_PATTERN
from mediator.stages.ip_allowlist import IpSetTable

DEFAULT_CASES = "policies/tests"


class CaseRequest(Strict):
    """The described request and who sends it."""

    method: HttpMethod = "GET"
    path: str = Field(pattern=r"^/")
    """As the client sends it, with the query: /fhir/Patient?identifier=070707070"""
    headers: dict[str, str] = {}
    client_ip: str = "127.0.0.1"
    client: str | None = None
    """client_id in policies/clients.yaml. Absent: no credentials (anonymous)."""
    auth_method: Literal["mtls", "access_token"] | None = None
    """Absent: access_token when `scopes` is given, else the client's first auth method."""
    scopes: tuple[str, ...] | None = None
    """Scopes requested at /auth/token (granted: those the client is registered for). Absent: all of them."""
    user: str | None = None
    """The user: from an SSO user token when the client accepts them (user_token), else from the
    trusted X-User-Name header (trust_user_header, mtls)."""
    roles: tuple[str, ...] = ()
    """Roles the user's token carries (added to the client's default_roles)."""
    facilities: tuple[str, ...] = ()
    """HF codes the user's token names. Absent: the client's registered health_facilities."""
    body: str | dict[str, Any] | list[Any] | None = None
    """A file (relative to the case file) or the JSON body written inline as YAML."""

    @field_validator("client_ip")
    @classmethod
    def _ip(cls, value: str) -> str:
        ipaddress.ip_address(value)
        return value


class Expectation(Strict):
    """The outcome the policy must produce. Keys left out are not compared."""

    decision: Literal["allow", "deny"]
    reason: str | None = None
    """The deciding reason code, e.g. authorization.owner_other_facility (required for deny)."""
    status: int | None = Field(None, ge=100, le=599)
    stage: str | None = None
    """The stage that denied (deny only), e.g. authorization."""
    rule: str | None = None
    """The authorization rule that decided (null: no rule did)."""
    write_firewall: str | None = None
    """The write-firewall rule that decided (policies/write_profiles.yaml, e.g. profiles.Claim.contained;
    null: the firewall did not decide, e.g. an earlier stage refused)."""
    write_element: str | None = None
    """The element the write firewall's decision is about, e.g. Claim.contained[0] (null: the whole body)."""

    @model_validator(mode="after")
    def _deny_has_reason(self) -> Expectation:
        if self.decision == "deny" and self.reason is None:
            raise ValueError("a deny expectation needs its reason code")
        if self.decision == "allow" and (self.reason is not None or self.status not in (None, 200)
                                         or self.stage is not None):
            raise ValueError("reason, status and stage describe a denial")
        return self


class Case(Strict):
    name: str = Field(min_length=1, max_length=200)
    request: CaseRequest
    facts: AssumedFacts | None = None
    """Merged over the file's facts."""
    expect: Expectation


class CaseFile(Strict):
    version: Literal[1]
    facts: AssumedFacts = AssumedFacts()
    """Facts every case of this file assumes."""
    facts_file: str | None = None
    """A YAML file of facts (relative to this file), under `facts`."""
    cases: tuple[Case, ...]

    @model_validator(mode="after")
    def _unique_names(self) -> CaseFile:
        if not self.cases:
            raise ValueError("cases must not be empty")
        names = [c.name for c in self.cases]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate is not None:
            raise ValueError(f"duplicate case name {duplicate!r}")
        return self


class CaseError(Exception):
    """The case cannot describe a request the mediator could receive (reported as a failure)."""


@dataclass(frozen=True, slots=True)
class LoadedCase:
    file: str
    line: int
    case: Case
    facts: AssumedFacts
    body: bytes | None


@dataclass(frozen=True, slots=True)
class Outcome:
    decision: str
    reason: str
    status: int
    stage: str | None
    rule: str | None
    write_firewall: str | None
    write_element: str | None

    def describe(self, only: Iterable[str] | None = None) -> str:
        keys = set(only) if only is not None else {"reason", "status", "stage", "rule", "write_firewall",
                                                    "write_element"}
        parts = [self.decision]
        if "status" in keys and self.decision == "deny":
            parts.append(str(self.status))
        if "reason" in keys and self.reason:
            parts.append(self.reason)
        if "stage" in keys and self.stage is not None:
            parts.append(f"stage={self.stage}")
        if "rule" in keys:
            parts.append(f"rule={self.rule or '-'}")
        if "write_firewall" in keys:
            parts.append(f"write_firewall={self.write_firewall or '-'}")
        if "write_element" in keys:
            parts.append(f"write_element={self.write_element or '-'}")
        return "  ".join(parts)


@dataclass(slots=True)
class CaseResult:
    case: LoadedCase
    passed: bool
    expected: str
    actual: str = ""
    detail: list[str] = field(default_factory=list)

    @property
    def title(self) -> str:
        return f"{self.case.file}:{self.case.line} {self.case.case.name}"


def case_files(config_root: Path, given: Sequence[str]) -> list[Path]:
    """The case files to run: those given (files, or directories of *.yaml), else policies/tests/*.yaml."""
    if not given:
        default = config_root / DEFAULT_CASES
        return sorted(p for p in default.glob("*.yaml") if p.is_file()) if default.is_dir() else []
    found: list[Path] = []
    for target in map(Path, given):
        if target.is_dir():
            found += sorted(p for p in target.glob("*.yaml") if p.is_file())
        else:
            found.append(target)
    return found


def _display(path: Path, config_root: Path) -> str:
    try:
        return str(path.resolve().relative_to(config_root.resolve()))
    except ValueError:
        return str(path)


def load_cases(paths: Sequence[Path], config_root: Path) -> list[LoadedCase]:
    """Every case of every file; raises ConfigError listing every problem of every file."""
    problems: list[ConfigProblem] = []
    loaded: list[LoadedCase] = []
    for path in paths:
        name = _display(path, config_root)
        try:
            doc = load_yaml(path, name)
        except ConfigError as exc:
            problems += exc.problems
            continue
        model, found = validate_document(doc, CaseFile)
        problems += found
        if model is None:
            continue
        file_facts = model.facts
        if model.facts_file is not None:
            facts, found = _facts_file(path.parent / model.facts_file, doc)
            problems += found
            if facts is None:
                continue
            file_facts = model.facts.over(facts)
        for index, case in enumerate(model.cases):
            body, problem = _body(case.request.body, path.parent, doc, index)
            if problem is not None:
                problems.append(problem)
                continue
            facts = case.facts.over(file_facts) if case.facts is not None else file_facts
            loaded.append(LoadedCase(name, doc.position(("cases", index))[0], case, facts, body))
    if problems:
        raise ConfigError(problems)
    return loaded


def _facts_file(path: Path, referrer: SourcedDocument) -> tuple[AssumedFacts | None, list[ConfigProblem]]:
    try:
        doc = load_yaml(path, str(path))
    except ConfigError as exc:
        return None, [referrer.problem(("facts_file",), f"cannot read {path}")] + exc.problems
    return validate_document(doc, AssumedFacts)


def _body(body: Any, base: Path, doc: SourcedDocument, index: int) -> tuple[bytes | None, ConfigProblem | None]:
    if body is None:
        return None, None
    if isinstance(body, str):
        try:
            return (base / body).read_bytes(), None
        except OSError as exc:
            return None, doc.problem(("cases", index, "request", "body"), f"cannot read {body}: {exc.strerror}")
    return json.dumps(body).encode(), None


def principal_for(config: Config, request: CaseRequest, facts: AssumedFacts) -> Principal | Decision | None:
    """The principal the authentication stage would build for this caller (or its refusal); a trusted
    header's user is looked up in the assumed facility directory, as live in openIMIS's."""
    if request.client is None:
        if request.user is not None or request.roles or request.facilities or request.scopes is not None:
            raise CaseError("user, roles, facilities and scopes need a client")
        return None
    policy = config.policies.get("clients")
    entry = policy.clients.get(request.client) if isinstance(policy, ClientsPolicy) else None
    if entry is None:
        return Decision.denied("authentication.unknown_client", 401, f"{request.client} is not registered")
    method = request.auth_method or ("access_token" if request.scopes is not None or
                                     "mtls" not in entry.auth_methods else "mtls")
    if ("mtls" if method == "mtls" else "private_key_jwt") not in entry.auth_methods:
        return Decision.denied("authentication.method_not_allowed", 401, f"{request.client} may not use {method}")
    if not entry.enabled:
        return Decision.denied("authentication.client_disabled", 403, "this client is disabled")
    address = ipaddress.ip_address(request.client_ip)
    own = any(address in ipaddress.ip_network(c) for c in entry.cidrs)
    if not own and not IpSetTable.from_config(config).allows(address, entry.ip_allowlist):
        return Decision.denied("authentication.client_ip_denied", 403, "this client may not call from this address")
    registered = frozenset(entry.scopes)
    scopes = registered if method == "mtls" or request.scopes is None else frozenset(request.scopes) & registered
    facilities = frozenset(entry.health_facilities)
    roles = frozenset(entry.default_roles)
    if request.user is None:
        if request.roles or request.facilities:
            raise CaseError("roles and facilities are carried by a user's token: give the user")
        if entry.user_token is not None and entry.user_token.required:
            return Decision.denied("authentication.user_token_missing", 401, "the client requires a user token")
        return Principal(request.client, method, None, roles, scopes, facilities)
    if entry.user_token is not None:
        if request.facilities:
            if not set(request.facilities) <= facilities:
                return Decision.denied("authentication.facility_not_registered", 403,
                                       "the user's health facility is not registered for this client")
            facilities = frozenset(request.facilities)
        return Principal(request.client, method, request.user, roles | frozenset(request.roles), scopes, facilities,
                         vouched_by=f"iss={entry.user_token.issuer}")
    if entry.trust_user_header and method == "mtls":
        if request.roles or request.facilities:
            raise CaseError(f"{request.client} vouches for users by X-User-Name, which carries no roles or "
                            "facilities")
        if not USER_NAME_PATTERN.match(request.user):
            return Decision.denied("authentication.malformed_user_name", 400, "malformed X-User-Name")
        if "authorization" not in config.policies:
            return Decision.denied("authentication.unknown_user", 403, "X-User-Name cannot be checked: no "
                                   "facility directory is configured (policies/authorization.yaml)")
        facility = facts.snapshot().facility_of_claim_administrator(request.user)
        if facility is None or facility not in facilities:
            return Decision.denied("authentication.unknown_user", 403, "X-User-Name names no claim "
                                   "administrator of a health facility registered for this client")
        return Principal(request.client, "trusted_header", request.user, roles, scopes, frozenset({facility}),
                         vouched_by=f"client={request.client}")
    raise CaseError(f"{request.client} accepts no user ({method}: no user_token, no trust_user_header)")


def outcome_of(explanation: Explanation) -> Outcome:
    final = explanation.final
    rule = explanation.authz.get("rule") if "authorization" in [s for s, _ in explanation.decisions] else None
    check = explanation.write_check
    write_rule, element = (check.rule, check.element) if check is not None else (None, None)
    if final is None:
        return Outcome("allow", "", 200, None, rule, write_rule, element)
    return Outcome("deny", final.reason, final.status, explanation.deciding_stage, rule, write_rule, element)


def compare(expect: Expectation, actual: Outcome) -> bool:
    """Equal on the decision and on every other key the case gives."""
    if expect.decision != actual.decision:
        return False
    return all(getattr(expect, key) == getattr(actual, key)
               for key in ("reason", "status", "stage", "rule", "write_firewall", "write_element")
               if key in expect.model_fields_set)


def _expected_text(expect: Expectation) -> str:
    given = expect.model_fields_set
    parts: list[str] = [expect.decision]
    if "status" in given and expect.status is not None:
        parts.append(str(expect.status))
    if expect.reason is not None:
        parts.append(expect.reason)
    if "stage" in given:
        parts.append(f"stage={expect.stage}")
    if "rule" in given:
        parts.append(f"rule={expect.rule or '-'}")
    if "write_firewall" in given:
        parts.append(f"write_firewall={expect.write_firewall or '-'}")
    if "write_element" in given:
        parts.append(f"write_element={expect.write_element or '-'}")
    return "  ".join(parts)


async def run_case(config: Config, loaded: LoadedCase) -> CaseResult:
    case = loaded.case
    expected = _expected_text(case.expect)
    try:
        principal = principal_for(config, case.request, loaded.facts)
    except CaseError as exc:
        return CaseResult(loaded, False, expected, "", [f"error: {exc}"])
    request = case.request
    headers = dict(request.headers)
    if principal is not None and not isinstance(principal, Decision) and principal.auth_method == "trusted_header":
        headers.setdefault("X-User-Name", principal.user_id or "")
    described = DescribedRequest(request.method, request.path, headers, loaded.body, request.client_ip)
    explanation = await evaluate(config, described, principal, loaded.facts)
    actual = outcome_of(explanation)
    keys = case.expect.model_fields_set - {"decision"}
    passed = compare(case.expect, actual)
    return CaseResult(loaded, passed, expected, actual.describe(keys | {"status", "reason", "stage", "rule"}),
                      [] if passed else explanation.lines())


async def run_cases(config: Config, cases: Sequence[LoadedCase]) -> list[CaseResult]:
    return [await run_case(config, case) for case in cases]


def report_lines(results: Sequence[CaseResult]) -> list[str]:
    out: list[str] = []
    for result in results:
        out.append(f"{'PASS' if result.passed else 'FAIL'}  {result.title}")
        if result.passed:
            continue
        out.append(f"      expected: {result.expected}")
        if result.actual:
            out.append(f"      actual:   {result.actual}")
        out += [f"      {line}" for line in result.detail]
    failed = sum(not r.passed for r in results)
    out.append(f"{len(results) - failed} passed, {failed} failed")
    return out


def write_junit(results: Sequence[CaseResult], path: Path) -> None:
    failed = sum(not r.passed for r in results)
    suites = ET.Element("testsuites", tests=str(len(results)), failures=str(failed))
    suite = ET.SubElement(suites, "testsuite", name="openimis-mediator policy tests", tests=str(len(results)),
                          failures=str(failed), errors="0", skipped="0")
    for result in results:
        case = ET.SubElement(suite, "testcase", classname=result.case.file, name=result.case.case.name,
                             file=result.case.file, line=str(result.case.line))
        if not result.passed:
            failure = ET.SubElement(case, "failure", message=f"expected {result.expected}, got {result.actual}")
            failure.text = "\n".join([f"expected: {result.expected}", f"actual:   {result.actual}",
                                      *result.detail])
    ET.ElementTree(suites).write(path, encoding="utf-8", xml_declaration=True)


def run_policy_tests(config: Config, given: Sequence[str], junit: str | None = None) -> tuple[int, list[str]]:
    """(exit code, output lines): 0 all passed, 1 a case failed, 2 a case file is invalid or none found."""
    paths = case_files(config.root, given)
    if not paths:
        return 2, [f"no case files in {', '.join(given) if given else config.root / DEFAULT_CASES}"]
    try:
        cases = load_cases(paths, config.root)
    except ConfigError as exc:
        return 2, [str(p) for p in exc.problems]
    results = asyncio.run(run_cases(config, cases))
    if junit is not None:
        write_junit(results, Path(junit))
    return (1 if any(not r.passed for r in results) else 0), report_lines(results)
