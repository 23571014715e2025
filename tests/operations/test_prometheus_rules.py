"""The alert rules in deploy/prometheus: valid for Prometheus (`promtool check rules`), behaving as their
unit tests say (`promtool test rules`), and written against metrics the mediator really exposes.
promtool comes from Debian's prometheus package; `make test` installs it (deploy/dev/ensure-promtool.sh)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from mediator.async_claims.metrics import async_metrics
from mediator.metrics import Metrics

PROMETHEUS = Path(__file__).parents[2] / "deploy" / "prometheus"
RULES = PROMETHEUS / "async_claims.rules.yml"


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is missing: run `make promtool` (or `make test`), which installs Debian's prometheus")
    return found


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=PROMETHEUS, capture_output=True, text=True, timeout=60)


def test_the_rules_pass_promtool_check(promtool):
    result = _run(promtool, "check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_rules_pass_their_promtool_unit_tests(promtool):
    result = _run(promtool, "test", "rules", "async_claims.rules.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_refuses_a_broken_rule(promtool, tmp_path):
    broken = tmp_path / "broken.rules.yml"
    broken.write_text("groups:\n  - name: x\n    rules:\n      - alert: Broken\n        expr: sum by (a (b)\n")
    result = subprocess.run([promtool, "check", "rules", str(broken)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0


def test_the_rules_use_only_metrics_the_mediator_exposes():
    metrics = Metrics()
    async_metrics(metrics)
    exposed = set()
    for family in metrics.registry.collect():
        exposed.add(family.name)
        if family.type == "counter":
            exposed.add(family.name + "_total")
    groups = yaml.safe_load(RULES.read_text())["groups"]
    used = {name for group in groups for rule in group["rules"]
            for name in re.findall(r"\bmediator_[a-z_]+", rule["expr"])}
    assert used and used <= exposed, used - exposed


def test_prometheus_loads_the_rules_file():
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert RULES.name in config["rule_files"]
