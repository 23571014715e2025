"""`check` finds every mistake in one pass: errors of every file with the cross-file ones, problems at the
line they are about, warnings for what is valid but can never work (exit 0, 2 under --strict)."""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import pytest

from mediator.cli import main
from mediator.config.models import UpstreamConfig
from mediator.logs import JsonEvent
from mediator.upstream import OpenImisUpstream, UpstreamLoginFailed
from tests.conftest import DEFAULT_IP_POLICY, channels_yaml, config_problems, write_config
from tests.test_policy_tests import shipped_copy

UPSTREAM = "http://127.0.0.1:8000/api/api_fhir_r4/"


def test_type_errors_and_cross_file_problems_are_reported_together(tmp_path):
    channels = channels_yaml(UPSTREAM, channels="""\
      - name: master-data
        path: ^/fhir/Medication/?$
        methods: [GET, FETCH]
        upstream: openimis
        ip_allowlist: [local]
      - name: eligibility
        path: ^/fhir/Patient/?$
        methods: [GET]
        upstream: openimis-prod
        ip_allowlist: [nowhere]
      - name: eligibility
        path: ^/fhir/Claim/?$
        methods: [GET]
        upstream: openimis
        ip_allowlist: [local]
    """)
    root = write_config(tmp_path, channels, DEFAULT_IP_POLICY.replace("version: 1", "version: 2"))
    (root / "policies" / "rate_limits.yaml").write_text(textwrap.dedent("""\
        version: 1
        limits:
          - {name: b, per: [client], rate: 10, period_s: 60, on_store_error: local, channels: [claims]}
        """))
    assert config_problems(root) == [
        "channels.yaml:16:20: channels[0].methods[1]: unknown HTTP method 'FETCH'; allowed: DELETE, GET, HEAD, "
        "OPTIONS, PATCH, POST, PUT",
        "policies/ip_allowlist.yaml:1:1: version: Input should be 1",
        "channels.yaml:22:5: channels[1].upstream: unknown upstream 'openimis-prod' (not in upstreams)",
        "channels.yaml:24:5: channels[2].name: duplicate channel name 'eligibility' (also channels[1])",
        "policies/rate_limits.yaml:3:88: limits[0].channels[0]: unknown channel 'claims' (not in channels.yaml)",
    ]


def test_an_unknown_ip_set_is_reported_with_a_type_error_elsewhere(tmp_path):
    channels = channels_yaml(UPSTREAM).replace("ip_allowlist: [local]", "ip_allowlist: [hms]", 1)
    root = write_config(tmp_path, channels, DEFAULT_IP_POLICY)
    (root / "policies" / "clients.yaml").write_text("version: 1\nclients: {a: {auth_methods: [password]}}\n")
    problems = config_problems(root)
    assert problems[0] == "policies/clients.yaml:2:30: clients.a.auth_methods[0]: Input should be 'mtls' or " \
        "'private_key_jwt'"
    assert problems[2:] == ["channels.yaml:18:20: channels[0].ip_allowlist[0]: unknown ip set 'hms' "
                            "(not in policies/ip_allowlist.yaml)"]


def _misconfigured(tmp_path):
    root = shipped_copy(tmp_path / "config")
    authz = (root / "policies" / "authorization.yaml").read_text()
    authz = authz.replace("roles: [claim-admin]\n    permissions: [user/ClaimResponse.rs]",
                          "roles: [claim-amdin]\n    permissions: [user/ClaimResponse.rs]")
    authz += textwrap.indent(textwrap.dedent("""\
        - name: communications
          roles: [hms]
          permissions: [system/Communication.cr]
        """), "  ")
    (root / "policies" / "authorization.yaml").write_text(authz)
    channels = (root / "channels.yaml").read_text() + textwrap.indent(textwrap.dedent("""\
        - name: nobody
          path: ^/fhir/Invoice/?$
          methods: [GET]
          upstream: openimis
          ip_allowlist: []
        - name: far-away
          path: ^/fhir/Coverage/?$
          methods: [GET]
          upstream: openimis
          ip_allowlist: [far]
        """), "  ")
    (root / "channels.yaml").write_text(channels)
    ip = (root / "policies" / "ip_allowlist.yaml").read_text() + '  far: {allow: ["203.0.113.0/24"]}\n'
    (root / "policies" / "ip_allowlist.yaml").write_text(ip)
    return root


# The channels _misconfigured appends start on the line after the shipped channels.yaml's last.
APPENDED = len((Path(__file__).resolve().parents[2] / "channels.yaml").read_text().splitlines()) + 1

WARNINGS = [
    "policies/authorization.yaml:32:13: warning: rules[4].roles[0]: role 'claim-amdin' is in no enabled client's "
    "default_roles and no client accepts user tokens that could carry it",
    "policies/authorization.yaml:31:5: warning: rules[4].name: rule 'claim-status' can never match: no caller "
    "can carry any of its roles",
    "policies/authorization.yaml:40:19: warning: rules[6].permissions[0]: system/Communication.cr can never "
    "match: no channel routes POST /Communication or GET /Communication/<id>",
    f"channels.yaml:{APPENDED}:5: warning: channels[5]: no client can reach channel 'nobody': its ip_allowlist "
    "admits no address",
    f"channels.yaml:{APPENDED + 5}:5: warning: channels[6]: no client can reach channel 'far-away': no enabled "
    "client may "
    "call from an address its ip_allowlist admits",
]


def test_warnings_for_what_can_never_work_exit_0_or_2_under_strict(tmp_path, capsys):
    root = _misconfigured(tmp_path)
    assert main(["check", "--config", str(root)]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == WARNINGS
    assert captured.out == f"{root}: configuration is valid (7 channels, 5 warnings)\n"
    assert main(["check", "--config", str(root), "--strict"]) == 2
    assert capsys.readouterr().err.splitlines() == WARNINGS


def test_user_permissions_need_a_client_that_vouches_for_users(tmp_path, capsys):
    root = shipped_copy(tmp_path / "config")
    clients = (root / "policies" / "clients.yaml").read_text().replace("trust_user_header: true",
                                                                       "trust_user_header: false")
    (root / "policies" / "clients.yaml").write_text(clients)
    assert main(["check", "--config", str(root)]) == 0
    assert capsys.readouterr().err.splitlines() == [
        f"policies/authorization.yaml:{line}:5: warning: rules[{i}].name: rule '{name}' can never match: its "
        "user/ permissions need a user, and no client that carries its roles vouches for users"
        for i, line, name in ((2, 23, "eligibility"), (3, 27, "claim-submit"), (4, 31, "claim-status"),
                              (5, 35, "claim-read"))]


def test_the_shipped_configuration_has_no_warnings(capsys):
    from pathlib import Path
    assert main(["check", "--config", str(Path(__file__).parents[2]), "--strict"]) == 0
    assert capsys.readouterr().err == ""


def test_a_channel_no_rule_grants_is_unreachable(tmp_path, capsys):
    root = shipped_copy(tmp_path / "config")
    channels = (root / "channels.yaml").read_text() + textwrap.indent(textwrap.dedent("""\
        - name: invoices
          path: ^/fhir/Invoice(/[^/]+)?/?$
          methods: [GET]
          upstream: openimis
          ip_allowlist: [hms-networks]
        """), "  ")
    (root / "channels.yaml").write_text(channels)
    assert main(["check", "--config", str(root), "--strict"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"channels.yaml:{APPENDED}:5: warning: channels[5]: no client can reach channel 'invoices': no authorization "
        "rule grants any request it routes"]


def test_unset_environment_variables_are_warnings(tmp_path, capsys, monkeypatch):
    root = shipped_copy(tmp_path / "config")
    channels = (root / "channels.yaml").read_text().replace(
        '  # redis: {url: "redis://127.0.0.1:6379/0", key_prefix: "mediator:"}',
        '  redis: {url: "redis://127.0.0.1:6379/0", password_env: CHECK_TEST_REDIS_PASSWORD}')
    (root / "channels.yaml").write_text(channels)
    monkeypatch.delenv("OPENIMIS_PASSWORD")
    monkeypatch.delenv("CHECK_TEST_REDIS_PASSWORD", raising=False)
    assert main(["check", "--config", str(root)]) == 0
    assert capsys.readouterr().err.splitlines() == [
        "channels.yaml:29:7: warning: upstreams.openimis.login.password_env: environment variable "
        "OPENIMIS_PASSWORD is not set (the openIMIS login of upstream openimis needs it)",
        "channels.yaml:21:44: warning: server.redis.password_env: environment variable CHECK_TEST_REDIS_PASSWORD "
        "is not set (the Redis password needs it)",
    ]


async def test_at_run_time_an_unset_login_variable_is_one_clear_log_line(caplog):
    config = UpstreamConfig.model_validate({"base_url": UPSTREAM, "login": {"username": "Admin",
                                                                            "password_env": "OPENIMIS_PASSWORD"}})
    upstream = OpenImisUpstream("openimis", config, "https://m.example/fhir/", environ={})
    caplog.set_level(logging.ERROR, logger="mediator.upstream")
    for _ in range(3):
        with pytest.raises(UpstreamLoginFailed, match="environment variable OPENIMIS_PASSWORD is not set"):
            await upstream.token()
    assert [r.msg.fields for r in caplog.records if isinstance(r.msg, JsonEvent)] == [
        {"event": "upstream.credentials_missing", "upstream": "openimis", "variable": "OPENIMIS_PASSWORD",
         "setting": "upstreams.openimis.login"}]
    assert len(caplog.records) == 1


def test_a_missing_config_directory_is_named(tmp_path, capsys):
    assert main(["check", "--config", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == (f"--config {tmp_path / 'nowhere'}: no such directory (it should hold "
                                       "channels.yaml and policies/)\n")


def test_check_with_tests_runs_the_policy_tests(tmp_path, capsys):
    root = shipped_copy(tmp_path / "config")
    (root / "policies" / "tests").mkdir()
    (root / "policies" / "tests" / "one.yaml").write_text(textwrap.dedent("""\
        version: 1
        cases:
          - name: metadata is open
            request: {path: /fhir/metadata}
            expect: {decision: deny, reason: authentication.missing_credentials}
        """))
    assert main(["check", "--config", str(root), "--with-tests"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "FAIL  policies/tests/one.yaml:3 metadata is open"
    assert out[-1] == "0 passed, 1 failed"
    assert main(["check", "--config", str(root)]) == 0   # without the option the tests are not run


def test_absent_authorization_and_write_profiles_are_warnings(tmp_path, capsys):
    root = shipped_copy(tmp_path / "config")
    (root / "policies" / "authorization.yaml").unlink()
    (root / "policies" / "write_profiles.yaml").unlink()
    assert main(["check", "--config", str(root), "--strict"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "policies/authorization.yaml:1:1: warning: the file is absent: every request is denied "
        "(authorization.no_policy)",
        "policies/write_profiles.yaml:1:1: warning: the file is absent: every write is refused (write.no_profile)",
    ]
