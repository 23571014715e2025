"""Latency of each HMS transaction: direct to a real openIMIS vs through the mediator, in one run.

    .venv/bin/python bench/openimis_latency.py [--reps 15]

Starts (or reuses) the real openIMIS backend of tests/openimis/harness.py, starts `openimis-mediator
serve` in front of it as a subprocess (plain HTTP on loopback) with the whole pipeline of the e2e tests
(tests/e2e/vendors.py: IP allowlist, SMART access token + SSO user token, authorization with
per-facility checks, idempotent claims; no rate limit so the loop is not throttled), then calls each
transaction alternately direct and through the mediator and prints medians side by side. A benchmark
script, not a test: it asserts nothing, it prints figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from joserfc.jwk import ECKey  # noqa: E402

from mediator.identity.client import client_assertion, token_form  # noqa: E402
from tests.conftest import DEFAULT_IP_POLICY, write_config  # noqa: E402
from tests.e2e.conftest import e2e_channels, harness  # noqa: E402
from tests.e2e.vendors import AUTHORIZATION, CHANNELS, CLIENTS, ORIGIN, VENDORS, Vendor, _claim_for  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _timed(session: aiohttp.ClientSession, method: str, url: str, **kwargs: object) -> tuple[float, int]:
    started = time.perf_counter()
    async with session.request(method, url, **kwargs) as response:  # type: ignore[arg-type]
        await response.read()
        return (time.perf_counter() - started) * 1000, response.status


async def run(reps: int) -> None:
    info = harness.ensure_running()
    direct_base = info["fhir_base_url"].rstrip("/") + "/"
    token = harness.login(info["base_url"], "Admin", "admin123")
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        keys = {name: ECKey.generate_key("P-256") for name in VENDORS}
        (Path(tmp) / "keys").mkdir()
        for name, key in keys.items():
            (Path(tmp) / "keys" / f"{name}.pem").write_bytes(key.as_pem(private=False))
        write_config(Path(tmp), e2e_channels(direct_base, channels=CHANNELS), DEFAULT_IP_POLICY,
                     {"clients.yaml": CLIENTS, "authorization.yaml": AUTHORIZATION})
        env = {**os.environ, "OPENIMIS_USERNAME": "Admin", "OPENIMIS_PASSWORD": "admin123"}
        proc = subprocess.Popen([sys.executable, "-m", "mediator", "--log-level", "WARNING", "serve",
                                 "--config", tmp, "--port", str(port)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # audit events go to stderr
        try:
            mediator_base = f"http://127.0.0.1:{port}/fhir/"
            async with aiohttp.ClientSession() as session:
                for _ in range(100):
                    try:
                        async with session.get(f"http://127.0.0.1:{port}/healthz") as r:
                            if r.status == 200:
                                break
                    except aiohttp.ClientError:
                        await asyncio.sleep(0.1)
                direct_headers = {"Authorization": f"Bearer {token}"}
                vendor = Vendor(None, "vendor-jm", keys["vendor-jm"])
                async with session.post(f"http://127.0.0.1:{port}/auth/token", data=token_form(
                        client_assertion("vendor-jm", vendor.key, f"{ORIGIN}/auth/token"),
                        "system/*.read system/Claim.write")) as r:
                    vendor.access_token = (await r.json())["access_token"]
                cases = [
                    ("Patient by insuree number", "GET", "Patient/?identifier=070707070", None),
                    ("ActivityDefinition page (10)", "GET", "ActivityDefinition/?_count=10", None),
                    ("Organization by code", "GET", "Organization/?code=JMHOS001", None),
                    ("POST Claim", "POST", "Claim/", "claim"),
                    ("ClaimResponse read", "GET", "ClaimResponse/{claim_id}/", None),
                ]
                claim_id = None
                rows = []
                for name, method, path, body in cases:
                    direct, via = [], []
                    for i in range(reps + 1):
                        paths = ((direct_base, direct, direct_headers), (mediator_base, via, None))
                        for target, sink, headers in paths:
                            # A fresh SSO user token per call, as an HMS would send (its jti is single use).
                            kwargs: dict[str, object] = {"headers": headers or vendor.headers()}
                            if body:
                                kwargs["json"] = _claim_for("JMHOS001")
                            ms, status = await _timed(session, method, target + path.format(claim_id=claim_id),
                                                      **kwargs)
                            if body and status == 201 and claim_id is None:
                                async with session.post(direct_base + "Claim/", json=_claim_for("JMHOS001"),
                                                        headers=direct_headers) as r:
                                    claim_id = (await r.json())["id"]
                            if i > 0:  # the first round warms connections and caches on both paths
                                sink.append(ms)
                    d, m = statistics.median(direct), statistics.median(via)
                    rows.append((name, d, m, m - d))
        finally:
            proc.terminate()
            proc.wait(10)
    print(f"\nopenIMIS {info['versions'].get('openimis-be-api_fhir_r4', '?')} (api_fhir_r4), "
          f"core {info['versions'].get('openimis-be-core', '?')}; {reps} reps each, medians in ms")
    print(f"{'transaction':32} {'direct':>9} {'mediator':>9} {'added':>8}")
    for name, d, m, added in rows:
        print(f"{name:32} {d:9.1f} {m:9.1f} {added:8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=15)
    asyncio.run(run(parser.parse_args().reps))


if __name__ == "__main__":
    main()
