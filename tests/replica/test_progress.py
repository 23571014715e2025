"""`openimis-mediator sync` (README "Command line"): a per-type progress bar on stderr whose lines never run
into the log lines the sync writes."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from pathlib import Path

from tests.conftest import SANDBOX_USER, upstream_url

REPO = Path(__file__).resolve().parents[2]


async def test_sync_prints_one_finished_line_per_type_and_log_lines_of_their_own(tmp_path, sandbox_server):
    shutil.copy(REPO / "channels.yaml", tmp_path / "channels.yaml")
    shutil.copytree(REPO / "policies", tmp_path / "policies")
    channels = (tmp_path / "channels.yaml").read_text()
    (tmp_path / "channels.yaml").write_text(channels.replace("http://127.0.0.1:8000/api/api_fhir_r4/",
                                                             upstream_url(sandbox_server)))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mediator", "sync", "--config", str(tmp_path), "--full",
        env={**os.environ, **SANDBOX_USER}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    lines = [line.rsplit("\r", 1)[-1] for line in err.decode().splitlines()]
    bars = [line for line in lines if "[" in line and "/" in line and not line.startswith("{")]
    assert {line.split()[0] for line in bars} >= {"Medication", "Organization", "CodeSystem/medical-item"}
    assert all("{" not in line for line in bars)   # no log line glued onto a bar
    events = [json.loads(line)["event"] for line in lines if line.startswith("{")]
    assert any(e["event"] == "replica.full_sync_done" and e["counts"]["Medication"] >= 1 for e in events)
    assert lines[-1].startswith("full sync done in ")
