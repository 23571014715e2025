"""README "Quick start" and "Command line", executed: the requests `make run` prints, run by bash exactly as
README shows them against `openimis-mediator dev` on the shipped configuration (a copy on free ports: the
only change to the snippet is that port, and `--url` for the token command whose default names 8443),
and every option of the command-line table is a real option of that command and vice versa.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mediator.cli import build_parser
from tests.conftest import SANDBOX_USER
from tests.operations.support import free_port, port_open, stop_process

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MARK = "@@status="


def quick_start_snippet() -> str:
    section = README.read_text().split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    (snippet,) = [b for b in blocks if "curl" in b]
    return snippet


def _commands(snippet: str) -> list[tuple[str, str]]:
    """(command, trailing comment) per command; backslash continuations joined."""
    joined = snippet.replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        command, _, comment = line.partition("  # ")
        commands.append((command.strip(), comment.strip()))
    return commands


@pytest.fixture(scope="module")
def dev_mediator(tmp_path_factory):
    """`openimis-mediator dev` on a copy of the shipped configuration, with fresh dev certificates."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed: README's Quick start requests are curl commands")
    root = tmp_path_factory.mktemp("quick-start")
    shutil.copy(REPO / "channels.yaml", root / "channels.yaml")
    shutil.copytree(REPO / "policies", root / "policies")
    port, ops, sandbox = free_port(), free_port(), free_port()
    channels = (root / "channels.yaml").read_text()
    channels = channels.replace("port: 8443", f"port: {port}").replace("localhost:8443", f"localhost:{port}")
    channels = channels.replace("port: 9464", f"port: {ops}").replace("127.0.0.1:8000", f"127.0.0.1:{sandbox}")
    (root / "channels.yaml").write_text(channels)
    (root / ".venv").symlink_to(sys.prefix)   # `.venv/bin/openimis-mediator` as the README writes it
    subprocess.run([sys.executable, "-m", "mediator", "certs", "--out", "certs", "--client", "vendor-a",
                    "--client", "vendor-b"], cwd=root, check=True, capture_output=True, timeout=60)
    log = open(root / "dev.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "mediator", "dev", "--config", ".", "--sandbox-port", str(sandbox)],
                            cwd=root, env={**os.environ, **SANDBOX_USER}, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not port_open(port) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        assert port_open(port), (root / "dev.log").read_text()
        yield root, port
    finally:
        stop_process(proc)
        log.close()


def _run_snippet(root: Path, port: int) -> list[tuple[str, str, int, str]]:
    """Runs the snippet in one bash (its variables carry over); (command, comment, status, body) per curl."""
    commands = _commands(quick_start_snippet())
    script = ["set -e"]
    for command, _ in commands:
        command = command.replace("localhost:8443", f"localhost:{port}")
        if " token " in command:
            command = command.replace(" token ", f" token --url https://localhost:{port}/auth/token ", 1)
        if command.startswith("curl "):
            command = f"curl -sS -w '\\n{MARK}%{{http_code}}\\n' " + command[len("curl "):]
        script.append(command)
    done = subprocess.run(["bash", "-c", "\n".join(script)], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    answers = re.findall(rf"(.*?)\n{re.escape(MARK)}(\d+)\n", done.stdout, re.S)
    curls = [(c, comment) for c, comment in commands if c.startswith("curl ")]
    assert len(answers) == len(curls), done.stdout[-2000:]
    return [(c, comment, int(status), body) for (c, comment), (body, status) in zip(curls, answers, strict=True)]


def _reason(body: str) -> str:
    return str(json.loads(body)["issue"][0]["details"]["coding"][0]["code"])


def test_the_quick_start_requests_answer_what_the_readme_says(dev_mediator):
    root, port = dev_mediator
    results = _run_snippet(root, port)
    assert len(results) >= 7
    for command, comment, status, body in results:
        said = re.search(r"\b([245]\d\d)\b", comment)
        assert status == (int(said.group(1)) if said else 200), (command, status, body[:300])
        document = json.loads(body)
        if status == 403:
            assert _reason(body) == "authorization.owner_other_facility", command
        elif command.rstrip("'").endswith("/metadata"):
            assert document["resourceType"] == "CapabilityStatement"
        elif "?" in command or command.endswith("/"):
            assert document["resourceType"] == "Bundle" and document["type"] == "searchset", command
            assert document["entry"], command
    by_url = {re.search(r"/fhir/(\S+?)'?$", c).group(1): b for c, _, _, b in results}   # type: ignore[union-attr]
    own = json.loads(by_url["ClaimResponse/RAD00001"])
    assert own["resourceType"] == "ClaimResponse"
    rapta = json.loads(by_url["ClaimResponse?_count=5"])
    assert rapta["total"] == len(rapta["entry"])              # Rapta's total, Rapta's claims
    assert own["id"] in {e["resource"]["id"] for e in rapta["entry"]}


def test_a_system_token_may_not_look_up_insurees(dev_mediator):
    """README: "A system token (no user) may download master data but not look up insurees"."""
    root, port = dev_mediator
    token = subprocess.run([".venv/bin/openimis-mediator", "token", "--client", "vendor-a", "--key",
                            "certs/vendor-a.key", "--cacert", "certs/ca.crt", "--url",
                            f"https://localhost:{port}/auth/token"], cwd=root, capture_output=True, text=True,
                           timeout=60, check=True)
    access = json.loads(token.stdout)["access_token"]
    done = subprocess.run(["curl", "-sS", "-w", f"\n{MARK}%{{http_code}}\n", "--cacert", "certs/ca.crt", "-H",
                           f"Authorization: Bearer {access}",
                           f"https://localhost:{port}/fhir/Patient?identifier=123456789"],
                          cwd=root, capture_output=True, text=True, timeout=60, check=True)
    body, status = done.stdout.rsplit(f"\n{MARK}", 1)
    assert int(status) == 403
    assert _reason(body).startswith("authorization.")


def _table_rows() -> dict[str, str]:
    section = README.read_text().split("\n### Command line\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for cell in re.findall(r"(?m)^\| `openimis-mediator (\w+) ([^|]*(?:\\\|[^|]*)*)` \|", section):
        command, usage = cell
        rows[command] = usage
    return rows


def test_the_command_line_table_shows_every_option_of_every_command():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices   # type: ignore[union-attr]
    rows = _table_rows()
    assert set(rows) == set(commands)
    problems = []
    for name, usage in rows.items():
        real = {o for action in commands[name]._actions for o in action.option_strings
                if action.help != "==SUPPRESS==" and o.startswith("--")} - {"--help"}
        shown = set(re.findall(r"--[a-z][a-z-]*", usage))
        if shown != real:
            problems.append((name, sorted(real - shown), sorted(shown - real)))
    assert problems == []


def test_the_global_options_row_shows_the_parsers_global_options():
    section = README.read_text().split("\n### Command line\n", 1)[1].split("\n## ", 1)[0]
    (row,) = re.findall(r"(?m)^\| global ([^|]*(?:\\\|[^|]*)*)\|", section)
    real = {o for action in build_parser()._actions for o in action.option_strings if o.startswith("--")}
    assert set(re.findall(r"--[a-z][a-z-]*", row)) == real - {"--help"}
