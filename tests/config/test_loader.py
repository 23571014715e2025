"""Schema tests: each validation error pins its exact message and line (Kong 01-schema_spec style)."""

from pathlib import Path

import pytest

from mediator.cli import main
from mediator.config import load_config
from tests.conftest import DEFAULT_IP_POLICY, channels_yaml, config_problems, write_config

FIXTURES = Path(__file__).parent / "fixtures"
GOOD_CHANNELS = channels_yaml("http://127.0.0.1:8000/api/api_fhir_r4/")


def test_the_shipped_example_configuration_is_valid():
    config = load_config(Path(__file__).parents[2])
    assert [c.name for c in config.channels.channels][:2] == ["capabilities", "master-data"]


@pytest.mark.parametrize(
    ("fixture", "expected"),
    [
        ("bad_cidr.yaml",
         ["policies/ip_allowlist.yaml:4:27: ip_sets.vendor-a.allow[1]: invalid ip or cidr range: "
          "'10.0.0.1/8' (10.0.0.1/8 has host bits set)"]),
        ("bad_unknown_key.yaml",
         ["policies/ip_allowlist.yaml:3:1: trusted_proxy: Extra inputs are not permitted"]),
        ("bad_version.yaml",
         ["policies/ip_allowlist.yaml:1:1: version: Input should be 1"]),
        ("bad_yaml_syntax.yaml",
         ["policies/ip_allowlist.yaml:5:10: YAML syntax: expected the node content, but found ':'"]),
        ("bad_duplicate_key.yaml",
         ["policies/ip_allowlist.yaml:6:3: duplicate key 'vendor-a'"]),
        ("bad_unlisted_channels.yaml",
         ["policies/ip_allowlist.yaml:2:1: unlisted_channels: Input should be 'deny' or 'unrestricted'"]),
    ],
)
def test_ip_policy_errors_name_file_line_and_message(tmp_path, fixture, expected):
    root = write_config(tmp_path, GOOD_CHANNELS, (FIXTURES / fixture).read_text())
    assert config_problems(root) == expected


@pytest.mark.parametrize(
    ("fixture", "expected"),
    [
        ("bad_channel_method.yaml",
         ["channels.yaml:11:20: channels[0].methods[1]: unknown HTTP method 'FETCH'; "
          "allowed: DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT"]),
        ("bad_channel_regex.yaml",
         ["channels.yaml:10:5: channels[0].path: invalid regular expression: "
          "missing ), unterminated subpattern at position 7"]),
        ("bad_channel_upstream.yaml",
         ["channels.yaml:12:5: channels[0].upstream: unknown upstream 'openimis-prod' (not in upstreams)"]),
        ("bad_channel_ip_set.yaml",
         ["channels.yaml:13:20: channels[0].ip_allowlist[0]: unknown ip set 'vendor-z' "
          "(not in policies/ip_allowlist.yaml)"]),
        ("bad_upstream_base.yaml",
         ["channels.yaml:4:5: upstreams.openimis.base_url: base_url must end with '/'"]),
        ("bad_missing_channels.yaml",
         ["channels.yaml:1:1: channels: Field required"]),
    ],
)
def test_channel_errors_name_file_line_and_message(tmp_path, fixture, expected):
    root = write_config(tmp_path, (FIXTURES / fixture).read_text(), DEFAULT_IP_POLICY)
    assert config_problems(root) == expected


def test_every_broken_file_is_reported_at_once(tmp_path):
    root = write_config(tmp_path, (FIXTURES / "bad_upstream_base.yaml").read_text(),
                        (FIXTURES / "bad_version.yaml").read_text())
    problems = config_problems(root)
    assert [p.split(":")[0] for p in problems] == ["channels.yaml", "policies/ip_allowlist.yaml"]


def test_missing_policy_file_is_an_error(tmp_path):
    root = write_config(tmp_path, GOOD_CHANNELS)
    (root / "policies" / "ip_allowlist.yaml").unlink()
    [problem] = config_problems(root)
    assert problem.startswith("policies/ip_allowlist.yaml:1:1: cannot read file")


def test_check_command_prints_problems_and_exits_2(tmp_path, capsys):
    root = write_config(tmp_path, GOOD_CHANNELS, (FIXTURES / "bad_cidr.yaml").read_text())
    assert main(["check", "--config", str(root)]) == 2
    assert "policies/ip_allowlist.yaml:4:27:" in capsys.readouterr().err
    (root / "policies" / "ip_allowlist.yaml").write_text(DEFAULT_IP_POLICY)
    assert main(["check", "--config", str(root)]) == 0
    assert "configuration is valid" in capsys.readouterr().out
