"""`openimis-mediator test`: policy test cases run offline, output like a test runner, exit codes.

The shipped cases must pass against the shipped configuration (this is how `make test` runs them); the
fixture cases pin the exact output of a passing and a failing run; a run touches no network, no Redis
and writes nothing (a listening socket standing in for openIMIS counts connections; Redis is scanned).
"""

from __future__ import annotations

import shutil
import socket
import textwrap
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import redis

from mediator.cli import main

REPO = Path(__file__).parents[1]


def shipped_copy(root: Path) -> Path:
    """The shipped channels.yaml and policies (without their tests) in a directory of their own."""
    (root / "policies").mkdir(parents=True)
    shutil.copy(REPO / "channels.yaml", root / "channels.yaml")
    for policy in (REPO / "policies").glob("*.yaml"):
        shutil.copy(policy, root / "policies" / policy.name)
    return root


def write_cases(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def shipped_case_count() -> int:
    import yaml

    return sum(len(yaml.safe_load(p.read_text())["cases"]) for p in (REPO / "policies" / "tests").glob("*.yaml"))


def test_the_shipped_cases_pass_against_the_shipped_policies(capsys):
    code = main(["test", "--config", str(REPO)])
    out = capsys.readouterr().out.splitlines()
    assert code == 0, "\n".join(out)
    count = shipped_case_count()
    assert count >= 30
    assert out[-1] == f"{count} passed, 0 failed"
    assert len([line for line in out if line.startswith("PASS  policies/tests/")]) == count


GOOD = """\
    version: 1
    facts:
      facilities:
        RAHOS001: {claim_admins: [RHOS0011]}
      claims: {Claim001: RAHOS001, Claim002: JMHOS001}
    cases:
      - name: own claim status
        request: {method: GET, path: /fhir/ClaimResponse/Claim001, client: vendor-b, user: RHOS0011}
        expect: {decision: allow, rule: claim-status}
      - name: another facility's claim status
        request: {method: GET, path: /fhir/ClaimResponse/Claim002, client: vendor-b, user: RHOS0011}
        expect: {decision: deny, status: 403, reason: authorization.owner_other_facility, rule: claim-status}
    """


def test_a_passing_file_prints_one_line_per_case_and_the_summary(tmp_path, capsys):
    root = shipped_copy(tmp_path / "config")
    cases = write_cases(root / "policies" / "tests" / "status.yaml", GOOD)
    assert main(["test", "--config", str(root)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "PASS  policies/tests/status.yaml:7 own claim status",
        "PASS  policies/tests/status.yaml:10 another facility's claim status",
        "2 passed, 0 failed",
    ]
    assert main(["test", "--config", str(root), str(cases)]) == 0   # named explicitly: the same


FAILING = """\
    version: 1
    facts:
      facilities: {RAHOS001: {claim_admins: [RHOS0011]}}
      claims: {Claim002: JMHOS001}
    cases:
      - name: vendor-b reads Jambero's claim status (wrongly expected)
        request: {method: GET, path: /fhir/ClaimResponse/Claim002, client: vendor-b, user: RHOS0011}
        expect: {decision: allow}
      - name: master data
        request: {method: GET, path: /fhir/Medication, client: vendor-a}
        expect: {decision: allow, rule: master-data-read}
      - name: wrong rule expected
        request: {method: GET, path: /fhir/Medication, client: vendor-a}
        expect: {decision: allow, rule: claim-status}
      - name: a user on a client that vouches for none
        request: {method: GET, path: /fhir/Medication, client: vendor-a, user: someone}
        expect: {decision: allow}
    """


def test_a_failing_file_shows_expected_actual_and_every_stage_and_exits_1(tmp_path, capsys):
    root = shipped_copy(tmp_path / "config")
    cases = write_cases(tmp_path / "cases" / "wrong.yaml", FAILING)
    junit = tmp_path / "report.xml"
    assert main(["test", "--config", str(root), str(cases), "--junit", str(junit)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"FAIL  {cases}:6 vendor-b reads Jambero's claim status (wrongly expected)",
        "      expected: allow",
        "      actual:   deny  403  authorization.owner_other_facility  stage=authorization  rule=claim-status",
        "      client_ip       allow     client_ip.peer",
        "      channel         allow     channel.matched  -- claims",
        "      ip              allow     ip.allowed",
        "      authentication  allow     authentication.described  -- the described principal, not verified",
        "      request         allow     request.no_body",
        "      search          allow     search.not_a_search",
        "      lookup_charge   allow     rate_limit.allowed",
        "      authorization   deny 403  authorization.owner_other_facility  rule=claim-status  "
        "facilities=JMHOS001  -- owner belongs to another health facility",
        "                      assumed: claim index owner of Claim002: owned by JMHOS001",
        "      result: 403 authorization.owner_other_facility",
        f"PASS  {cases}:9 master data",
        f"FAIL  {cases}:12 wrong rule expected",
        "      expected: allow  rule=claim-status",
        "      actual:   allow  rule=master-data-read",
        "      client_ip       allow     client_ip.peer",
        "      channel         allow     channel.matched  -- master-data",
        "      ip              allow     ip.allowed",
        "      authentication  allow     authentication.described  -- the described principal, not verified",
        "      request         allow     request.no_body",
        "      search          allow     search.accepted",
        "      lookup_charge   allow     lookup_charge.charged_later",
        "      authorization   allow     authorization.allowed  rule=master-data-read",
        "      write           allow     write.no_body",
        "      rate_limit      allow     rate_limit.allowed",
        "      result: allowed; the live mediator would answer this request itself (from the master-data replica)",
        f"FAIL  {cases}:15 a user on a client that vouches for none",
        "      expected: allow",
        "      error: vendor-a accepts no user (mtls: no user_token, no trust_user_header)",
        "1 passed, 3 failed",
    ]
    report = ET.parse(junit).getroot()
    assert (report.tag, report.get("tests"), report.get("failures")) == ("testsuites", "4", "3")
    failures = {case.get("name"): case.find("failure") for case in report.iter("testcase")}
    assert failures["master data"] is None
    assert failures["wrong rule expected"].get("message") == \
        "expected allow  rule=claim-status, got allow  rule=master-data-read"


def test_invalid_case_files_are_all_reported_with_positions_and_exit_2(tmp_path, capsys):
    root = shipped_copy(tmp_path / "config")
    write_cases(root / "policies" / "tests" / "a.yaml", """\
        version: 1
        cases:
          - name: no reason
            request: {path: /fhir/Medication}
            expect: {decision: deny}
          - name: bad method
            request: {method: FETCH, path: /fhir/Medication, bogus: 1}
            expect: {decision: allow}
        """)
    write_cases(root / "policies" / "tests" / "b.yaml", """\
        version: 1
        cases:
          - name: missing body file
            request: {method: POST, path: /fhir/Claim, body: nowhere.json}
            expect: {decision: allow}
        """)
    assert main(["test", "--config", str(root)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "policies/tests/a.yaml:5:5: cases[0].expect: a deny expectation needs its reason code",
        "policies/tests/a.yaml:7:15: cases[1].request.method: unknown HTTP method 'FETCH'; allowed: DELETE, "
        "GET, HEAD, OPTIONS, PATCH, POST, PUT",
        "policies/tests/a.yaml:7:54: cases[1].request.bogus: Extra inputs are not permitted",
        "policies/tests/b.yaml:4:48: cases[0].request.body: cannot read nowhere.json: No such file or directory",
    ]


def test_no_case_files_is_an_error(tmp_path, capsys):
    root = shipped_copy(tmp_path / "config")
    assert main(["test", "--config", str(root)]) == 2
    assert "no case files" in capsys.readouterr().err


@pytest.mark.redis
def test_a_run_changes_no_shared_state_and_opens_no_connection(tmp_path, capsys, monkeypatch):
    """openIMIS is a listening socket that counts connections; Redis is configured with its own prefix and
    the replay store and openIMIS login name unset variables: none of them is touched."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    prefix = f"policy-test-{uuid.uuid4().hex}:"
    root = shipped_copy(tmp_path / "config")
    channels = (root / "channels.yaml").read_text()
    channels = channels.replace("http://127.0.0.1:8000/api/api_fhir_r4/", f"http://127.0.0.1:{port}/api/api_fhir_r4/")
    channels = channels.replace('  # redis: {url: "redis://127.0.0.1:6379/0", key_prefix: "mediator:"}',
                                f'  redis: {{url: "redis://127.0.0.1:6379/0", key_prefix: "{prefix}"}}')
    assert prefix in channels
    (root / "channels.yaml").write_text(channels)
    clients = (root / "policies" / "clients.yaml").read_text()
    clients = clients.replace("  # replay_store: {redis_url_env: MEDIATOR_REDIS_URL}",
                              "  replay_store: {redis_url_env: POLICY_TEST_UNSET_REDIS_URL}")
    (root / "policies" / "clients.yaml").write_text(clients)
    limits = (root / "policies" / "rate_limits.yaml").read_text().replace("rate: 120", "rate: 1").replace(
        "per: [user]\n", "per: [user]\n    burst: 2\n")   # one claim-status read costs 2 (its owner lookup)
    (root / "policies" / "rate_limits.yaml").write_text(limits)
    monkeypatch.delenv("OPENIMIS_PASSWORD", raising=False)
    monkeypatch.delenv("POLICY_TEST_UNSET_REDIS_URL", raising=False)
    same = "\n".join(f"""\
          - name: poll {i}
            request: {{method: GET, path: /fhir/ClaimResponse/RAD00001, client: vendor-b, user: RHOS0011}}
            expect: {{decision: allow}}""" for i in range(3))
    facts = "facts: {facilities: {RAHOS001: {claim_admins: [RHOS0011]}}, claims: {RAD00001: RAHOS001}}\n"
    cases = write_cases(tmp_path / "cases.yaml", "version: 1\n" + facts + "cases:\n"
                        + textwrap.dedent(same) + "\n")
    assert main(["test", "--config", str(root), str(cases)]) == 0, capsys.readouterr().out
    assert capsys.readouterr().out.splitlines()[-1] == "3 passed, 0 failed"
    with pytest.raises(BlockingIOError):
        listener.accept()
    listener.close()
    assert list(redis.Redis().scan_iter(match=f"{prefix}*")) == []
    assert not (root / "certs").exists()   # no signing key was created


@pytest.mark.redis
def test_explain_charges_no_rate_limit_and_writes_nothing(tmp_path, capsys):
    """Issue 13: explain used to build its stages with the live Redis store and charge the counters."""
    prefix = f"explain-{uuid.uuid4().hex}:"
    root = shipped_copy(tmp_path / "config")
    channels = (root / "channels.yaml").read_text().replace(
        '  # redis: {url: "redis://127.0.0.1:6379/0", key_prefix: "mediator:"}',
        f'  redis: {{url: "redis://127.0.0.1:6379/0", key_prefix: "{prefix}"}}')
    (root / "channels.yaml").write_text(channels)
    limits = (root / "policies" / "rate_limits.yaml").read_text().replace("rate: 600", "rate: 1").replace(
        "burst: 100", "burst: 1")
    (root / "policies" / "rate_limits.yaml").write_text(limits)
    argv = ["explain", "--config", str(root), "--path", "/fhir/Medication", "--client", "vendor-a",
            "--roles", "hms"]
    for _ in range(3):
        assert main(argv) == 0
        assert capsys.readouterr().out.splitlines()[-1] == \
            "result: allowed; the live mediator would answer this request itself (from the master-data replica)"
    assert list(redis.Redis().scan_iter(match=f"{prefix}*")) == []
    assert not (root / "certs").exists()


def test_explain_says_what_answers_a_request_openimis_never_sees(tmp_path, capsys):
    """The CapabilityStatement and replicated master data are answered by the live mediator itself (README
    "How a request flows": route steps capabilities and replica); explain says so, not "forward to openIMIS"."""
    root = shipped_copy(tmp_path / "config")
    assert main(["explain", "--config", str(root), "--path", "/fhir/metadata"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == \
        "result: allowed; the live mediator would answer this request itself (its own CapabilityStatement)"
    master_data = ["explain", "--config", str(root), "--client", "vendor-a", "--roles", "hms", "--path"]
    assert main([*master_data, "/fhir/Medication/"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == \
        "result: allowed; the live mediator would answer this request itself (from the master-data replica)"
    replica = (root / "policies" / "replica.yaml").read_text()
    (root / "policies" / "replica.yaml").write_text(replica.replace("resource_types: [ActivityDefinition, "
                                                                    "Medication, ", "resource_types: ["))
    assert main([*master_data, "/fhir/Medication/"]) == 0   # a type the replica does not hold: openIMIS
    assert capsys.readouterr().out.splitlines()[-1] == \
        "result: allowed; the live mediator would forward this request to openIMIS"


def _explain_as_rapta_offline(tmp_path, capsys, path: str) -> tuple[int, list[str]]:
    """explain of GET `path` by Rapta's claim administrator, with the demo facts and openIMIS unreachable."""
    root = shipped_copy(tmp_path / "config")
    channels = (root / "channels.yaml").read_text().replace("127.0.0.1:8000", "127.0.0.1:9")   # nothing there
    (root / "channels.yaml").write_text(channels)
    code = main(["explain", "--config", str(root), "--path", path, "--client", "vendor-b",
                 "--roles", "hms,claim-admin", "--facility", "RAHOS001", "--user", "RHOS0011",
                 "--facts", str(REPO / "policies" / "tests" / "facts" / "demo.yaml")])
    return code, capsys.readouterr().out.splitlines()


def test_explain_with_facts_is_offline(tmp_path, capsys):
    code, out = _explain_as_rapta_offline(tmp_path, capsys, "/fhir/ClaimResponse/RAD00001")
    assert code == 0, out
    assert "assumed: claim index owner of RAD00001: owned by RAHOS001" in out[-2]
    assert out[-1] == "result: allowed; the live mediator would forward this request to openIMIS"


def test_explain_with_facts_reports_a_scoped_search_as_not_evaluated_offline(tmp_path, capsys):
    code, out = _explain_as_rapta_offline(tmp_path, capsys, "/fhir/ClaimResponse?_count=5")
    assert code == 0, out
    assert not any("assumed:" in line for line in out)   # deciding it needs no lookup; serving it would
    assert out[-1] == ("result: allowed; the live mediator would answer this search itself from the claims of "
                       "facility RAHOS001 (openIMIS's claim index); the page's entries are not evaluated offline")


def test_the_readme_explain_example_prints_what_the_readme_says():
    import re
    import shlex
    import subprocess
    import sys

    section = (REPO / "README.md").read_text().split("### explain\n", 1)[1]
    command, printed = re.findall(r"```(?:sh)?\n(.*?)```", section, re.S)[:2]
    argv = shlex.split(command.replace("\\\n", " "))
    assert argv[0] == ".venv/bin/openimis-mediator"
    done = subprocess.run([sys.executable, "-m", "mediator", *argv[1:]], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1, done.stderr
    assert done.stdout == printed


def test_the_readme_failure_illustration_is_what_the_command_prints(tmp_path):
    """README "Policy tests" shows the output of `test --config .` with JADH0001 made Rapta's in the facts."""
    import re
    import subprocess
    import sys

    root = shipped_copy(tmp_path / "config")
    shutil.copytree(REPO / "policies" / "tests", root / "policies" / "tests")
    facts = root / "policies" / "tests" / "facts" / "demo.yaml"
    assert "  JADH0001: JMHOS001\n" in facts.read_text()
    facts.write_text(facts.read_text().replace("  JADH0001: JMHOS001\n", "  JADH0001: RAHOS001\n"))
    section = (REPO / "README.md").read_text().split("## Policy tests (`openimis-mediator test`)\n", 1)[1]
    shown = re.findall(r"\n```\n(PASS .*?)```", section, re.S)[0].splitlines()
    done = subprocess.run([sys.executable, "-m", "mediator", "test", "--config", "."], cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    printed = done.stdout.splitlines()
    assert printed[-1] == shown[-1]
    assert shown[0] in printed
    failure = printed.index(shown[1])
    assert printed[failure:failure + len(shown) - 2] == shown[1:-1]


def test_serve_loads_a_configuration_whose_case_files_are_broken(tmp_path):
    from mediator.config import load_config

    root = shipped_copy(tmp_path / "config")
    write_cases(root / "policies" / "tests" / "broken.yaml", "version: [\n")
    assert load_config(root).channels.channels   # tests are a tool for admins, never a start-up gate


def test_the_shipped_cases_cover_every_client_and_every_rule():
    import yaml

    cases = [c for p in (REPO / "policies" / "tests").glob("*.yaml") for c in yaml.safe_load(p.read_text())["cases"]]
    rules = {r["name"] for r in yaml.safe_load((REPO / "policies" / "authorization.yaml").read_text())["rules"]}
    clients = set(yaml.safe_load((REPO / "policies" / "clients.yaml").read_text())["clients"])
    allowed_by = {c["expect"].get("rule") for c in cases if c["expect"]["decision"] == "allow"}
    denied_under = {c["expect"].get("rule") for c in cases if c["expect"]["decision"] == "deny"}
    assert rules <= allowed_by
    assert {"claim-submit", "claim-status"} <= denied_under   # the cross-facility denials
    assert clients <= {c["request"].get("client") for c in cases}
    assert None in {c["request"].get("client") for c in cases}   # and callers without credentials
    reasons = {c["expect"].get("reason") for c in cases}
    assert {"authorization.provider_other_facility", "authorization.enterer_other_facility",
            "authorization.contained_other_facility", "authorization.owner_other_facility"} <= reasons


@pytest.mark.parametrize(("client", "user", "client_ip"), [
    ("vendor-a", None, "127.0.0.1"),
    ("vendor-a", "someone", "127.0.0.1"),        # X-User-Name from a client that is not trusted for it: ignored
    ("vendor-b", None, "127.0.0.1"),
    ("vendor-b", "RHOS0011", "127.0.0.1"),
    ("vendor-b", "JHOS0011", "127.0.0.1"),       # another facility's claim administrator
    ("vendor-b", "NOBODY", "127.0.0.1"),
    ("vendor-b", "bad name", "127.0.0.1"),
    ("vendor-b", "RHOS0011", "203.0.113.9"),     # off the client's networks
])
async def test_the_described_principal_is_what_authentication_proves(tmp_path, client, user, client_ip):
    """The case's caller goes through the real authentication stage's decision (mTLS: the certificate of
    make_dev_pki, the trusted header, the vouched-user directory fed the same facts): same outcome."""
    import ipaddress

    import yaml

    from mediator.certs import make_dev_pki
    from mediator.config import load_config
    from mediator.facilities import StaticFacilityDirectory
    from mediator.identity import Identity, describe_certificate
    from mediator.offline import AssumedFacts
    from mediator.pipeline import Decision
    from mediator.policy_tests import CaseRequest, principal_for
    from mediator.stages.authentication import Credentials, VouchedUsers, decide

    root = shipped_copy(tmp_path / "config")
    issued = {i.cert_path.stem: i for i in make_dev_pki(root / "certs")}
    config = load_config(root)
    facts = AssumedFacts.model_validate(yaml.safe_load((REPO / "policies/tests/facts/demo.yaml").read_text()))
    identity = Identity.from_config(config)
    der = __import__("ssl").PEM_cert_to_DER_cert(issued[client].cert_path.read_text())
    creds = Credentials(None, describe_certificate(der), None, user)
    live, proven = await decide(creds, ipaddress.ip_address(client_ip), identity, 0,
                                VouchedUsers(StaticFacilityDirectory(facts.snapshot())))
    described = principal_for(config, CaseRequest(path="/fhir/Medication", client=client, client_ip=client_ip,
                                                  user=user if client == "vendor-b" else None), facts)
    if isinstance(described, Decision):
        assert (live.allow, live.reason, live.status) == (False, described.reason, described.status)
    else:
        assert live.allow and proven is not None
        assert proven.user_key == described.user_key
        assert (proven.client_id, proven.auth_method, proven.user_id, proven.roles, proven.scopes,
                proven.health_facilities, proven.vouched_by) == \
            (described.client_id, described.auth_method, described.user_id, described.roles, described.scopes,
             described.health_facilities, described.vouched_by)


def test_a_wrong_write_firewall_expectation_shows_the_rule_and_element_that_decided(tmp_path, capsys):
    root = shipped_copy(tmp_path / "config")
    body = REPO / "policies" / "tests" / "bodies" / "claim-contained-rahos001.json"
    cases = write_cases(tmp_path / "w.yaml", f"""\
        version: 1
        facts:
          facilities: {{RAHOS001: {{claim_admins: [RHOS0011], keys: [d8a25f21-f36a-4d4d-9e58-1db8ffbe7036],
                                   claim_admin_keys: [598e43ca-9977-4f4b-a678-992528ce3454]}}}}
        cases:
          - name: contained expected to pass
            request: {{method: POST, path: /fhir/Claim, client: vendor-b, user: RHOS0011, body: {body}}}
            expect: {{decision: allow, write_firewall: profiles.Claim}}
        """)
    assert main(["test", "--config", str(root), str(cases)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == [
        f"FAIL  {cases}:6 contained expected to pass",
        "      expected: allow  write_firewall=profiles.Claim",
        "      actual:   deny  403  write.contained_not_allowed  stage=write  rule=claim-submit  "
        "write_firewall=profiles.Claim.contained",
    ]
    assert "      write           deny 403  write.contained_not_allowed  rule=profiles.Claim.contained  " \
           "element=Claim.contained[0]  -- Claim.contained[0]: a contained Organization is not accepted: openIMIS " \
           "would create or update it, keyed by its id" in out
    assert out[-1] == "0 passed, 1 failed"


async def test_the_offline_upstream_answers_the_claim_index_owner_lookup_from_facts_and_nothing_else():
    """The live ClaimIndex asks the offline stand-in: owner by code or uuid from the facts (the facility
    named by its assumed uuid), an unknown claim is None, any other index question fails closed."""
    import yaml

    from mediator.bulkhead import UpstreamGuard
    from mediator.claim_index import ClaimIndex
    from mediator.config.models import UpstreamConfig
    from mediator.facilities import LookupFailed
    from mediator.offline import AssumedFacts, OfflineUpstream

    facts = AssumedFacts.model_validate(yaml.safe_load((REPO / "policies/tests/facts/demo.yaml").read_text()))
    config = UpstreamConfig.model_validate({"base_url": "http://127.0.0.1:9/api/api_fhir_r4/"})
    upstream = OfflineUpstream("openimis", config, "https://mediator.example.org/fhir/", facts)
    index = ClaimIndex(upstream, UpstreamGuard.build("openimis", config.bulkhead, config.circuit_breaker),
                       "/api/graphql", 5)
    by_code = await index.owner("RAD00001", 0, "t")
    by_uuid = await index.owner("9a1b2c3d-0000-4000-8000-00000000a001", 0, "t")
    assert by_code is not None and by_code.facility_uuid == "d8a25f21-f36a-4d4d-9e58-1db8ffbe7036"
    assert by_uuid is not None and by_uuid.facility_uuid == "026e088a-fbd5-474e-8d42-069958a34127"
    assert facts.snapshot().facility_of_organization(by_code.facility_uuid) == "RAHOS001"
    assert await index.owner("NOSUCH01", 0, "t") is None
    with pytest.raises(LookupFailed):
        await index.page("d8a25f21-f36a-4d4d-9e58-1db8ffbe7036", 0, 10, 0, "t")
    assert upstream.lookups == ["claim index owner of RAD00001: owned by RAHOS001",
                                "claim index owner of 9a1b2c3d-0000-4000-8000-00000000a001: owned by JMHOS001",
                                "claim index owner of NOSUCH01: no such claim in the assumed facts",
                                "POST /api/graphql: not answerable offline"]
