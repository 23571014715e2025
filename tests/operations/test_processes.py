"""`openimis-mediator serve` as a real child process: SIGHUP reload, SIGTERM drain, worker processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import DEFAULT_IP_POLICY, channels_yaml, upstream_url, write_config
from tests.operations.support import (
    SlowOpenImis,
    eventually,
    free_consecutive_ports,
    free_port,
    mediator_process,
    port_open,
    wait_exit,
)
from tests.operations.test_reload import DENY_POLICY


def _config(tmp_path, upstream: str, port: int, metrics_port: int, poll: float = 0) -> object:
    server = (f"listen:\n  host: 127.0.0.1\n  port: {port}\n"
              f"metrics:\n  host: 127.0.0.1\n  port: {metrics_port}\n"
              f"reload:\n  poll_interval_s: {poll}\n"
              "shutdown:\n  drain_timeout_s: 10\n")
    return write_config(tmp_path / "config", channels_yaml(upstream, extra_server=server))


async def _samples(session: aiohttp.ClientSession, metrics_port: int) -> dict[str, list]:
    async with session.get(f"http://127.0.0.1:{metrics_port}/metrics") as response:
        text = await response.text()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


async def test_sighup_reloads_the_policy_of_a_running_server(tmp_path, sandbox_server):
    port, metrics_port = free_port(), free_port()
    root = _config(tmp_path, upstream_url(sandbox_server), port, metrics_port)
    log_file = tmp_path / "mediator.log"
    with mediator_process(root, log_file=log_file) as proc:
        await eventually(lambda: port_open(port), what="the mediator to listen")
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/fhir/Medication/") as response:
                assert response.status == 200
            (root / "policies" / "ip_allowlist.yaml").write_text(DENY_POLICY)
            await asyncio.sleep(0.3)  # polling is off (poll_interval_s: 0): only SIGHUP may apply the edit
            async with session.get(f"http://127.0.0.1:{port}/fhir/Medication/") as response:
                assert response.status == 200
            proc.send_signal(signal.SIGHUP)
            reloaded = asyncio.Event()

            async def denied() -> None:
                while True:
                    async with session.get(f"http://127.0.0.1:{port}/fhir/Medication/") as response:
                        if response.status == 403:
                            reloaded.set()
                            return
                    await asyncio.sleep(0.05)

            await asyncio.wait_for(denied(), 10)
            families = await _samples(session, metrics_port)
        reloads = {(s.labels["outcome"], s.labels["trigger"]): s.value
                   for s in families["mediator_config_reloads"] if s.name.endswith("_total")}
        assert reloads == {("success", "sighup"): 1.0}
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc) == 0
    lines = [json.loads(line) for line in log_file.read_text().splitlines() if line.startswith("{")]
    assert any(line.get("event", {}).get("event") == "reload.done" and line["event"]["trigger"] == "sighup"
               for line in lines)


async def test_sigterm_drains_the_request_in_flight_then_refuses_and_exits_0(tmp_path, aiohttp_server):
    slow = SlowOpenImis()
    upstream = await aiohttp_server(slow.app())
    port, metrics_port = free_port(), free_port()
    root = _config(tmp_path, upstream_url(upstream), port, metrics_port)
    with mediator_process(root, log_file=tmp_path / "mediator.log") as proc:
        await eventually(lambda: port_open(port), what="the mediator to listen")
        async with aiohttp.ClientSession() as session:
            in_flight = asyncio.create_task(session.get(f"http://127.0.0.1:{port}/fhir/Claim/"))
            await asyncio.wait_for(slow.arrived.wait(), 10)  # the request is at openIMIS now
            proc.send_signal(signal.SIGTERM)
            await eventually(lambda: not port_open(port), what="the listener to close")
            assert proc.poll() is None  # still draining
            response = await in_flight
            assert response.status == 200
            assert (await response.json())["resourceType"] == "Bundle"
        assert await wait_exit(proc) == 0
        with pytest.raises(aiohttp.ClientConnectorError):
            async with aiohttp.ClientSession() as session:
                await session.get(f"http://127.0.0.1:{port}/fhir/Medication/")


async def test_two_workers_share_the_port_and_sigterm_stops_both(tmp_path, sandbox_server):
    port = free_port()
    metrics_base = free_consecutive_ports(2)
    root = _config(tmp_path, upstream_url(sandbox_server), port, metrics_base)
    with mediator_process(root, "--workers", "2", log_file=tmp_path / "mediator.log") as parent:
        await eventually(lambda: port_open(port) and port_open(metrics_base) and port_open(metrics_base + 1),
                         timeout=15, what="both workers to listen")
        async with aiohttp.ClientSession() as session:
            for _ in range(40):  # a new connection each time: the kernel spreads them over the workers
                async with session.get(f"http://127.0.0.1:{port}/fhir/Medication/",
                                       headers={"Connection": "close"}) as response:
                    assert response.status == 200
            workers = [await _samples(session, metrics_base + i) for i in range(2)]
        pids = [int(w["mediator_worker_pid"][0].value) for w in workers]
        assert [w["mediator_worker_pid"][0].labels["worker"] for w in workers] == ["0", "1"]
        assert len(set(pids)) == 2 and parent.pid not in pids
        answered = [sum(s.value for s in w["mediator_requests"] if s.name.endswith("_total")) for w in workers]
        assert sum(answered) == 40 and min(answered) > 0  # both workers answered on the one port
        parent.send_signal(signal.SIGTERM)
        assert await wait_exit(parent) == 0
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert not port_open(port)


async def test_a_worker_that_dies_is_restarted(tmp_path, sandbox_server):
    port = free_port()
    metrics_base = free_consecutive_ports(2)
    root = _config(tmp_path, upstream_url(sandbox_server), port, metrics_base)
    with mediator_process(root, "--workers", "2", log_file=tmp_path / "mediator.log") as parent:
        await eventually(lambda: port_open(metrics_base) and port_open(metrics_base + 1), timeout=15,
                         what="both workers to listen")
        async with aiohttp.ClientSession() as session:
            before = int((await _samples(session, metrics_base + 1))["mediator_worker_pid"][0].value)
            os.kill(before, signal.SIGKILL)
            await eventually(lambda: not port_open(metrics_base + 1), what="worker 1 to die")
            await eventually(lambda: port_open(metrics_base + 1), timeout=15, what="worker 1 to come back")
            after = int((await _samples(session, metrics_base + 1))["mediator_worker_pid"][0].value)
        assert after != before and parent.poll() is None
        parent.send_signal(signal.SIGTERM)
        assert await wait_exit(parent) == 0


def test_bad_configuration_is_refused_before_any_worker_starts(tmp_path):
    root = write_config(tmp_path, channels_yaml("http://127.0.0.1:1/api/api_fhir_r4/"),
                        DEFAULT_IP_POLICY + "bogus: 1\n")
    result = subprocess.run([sys.executable, "-m", "mediator", "serve", "--config", str(root), "--workers", "2"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["policies/ip_allowlist.yaml:7:1: bogus: Extra inputs are not permitted"]


@pytest.mark.parametrize("taken", ["fhir", "metrics"])
def test_a_port_in_use_is_one_line_naming_the_port_and_the_setting(tmp_path, taken):
    import socket

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    busy = holder.getsockname()[1]
    other = free_port()
    port, metrics_port = (busy, other) if taken == "fhir" else (other, busy)
    root = _config(tmp_path, "http://127.0.0.1:9/api/api_fhir_r4/", port, metrics_port)
    try:
        done = subprocess.run([sys.executable, "-m", "mediator", "serve", "--config", str(root)],
                              capture_output=True, text=True, timeout=60)
    finally:
        holder.close()
    setting = "server.listen.port in channels.yaml, or run with --port" if taken == "fhir" else \
        "server.metrics.port in channels.yaml"
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert lines[-1] == (f"openimis-mediator: cannot listen on 127.0.0.1:{busy} ({taken} listener): address "
                         f"already in use; change {setting}")
    assert "Traceback" not in done.stderr
    if taken == "fhir":   # nothing else was started, so nothing else is said
        assert len(lines) == 1
