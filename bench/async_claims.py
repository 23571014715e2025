"""A burst of claims from three vendors, queued (Prefer: respond-async) vs synchronous, on the REAL openIMIS.

    .venv/bin/python bench/async_claims.py [--claims 510] [--senders 24] [--drain-concurrency 2]

Starts (or reuses) the real openIMIS of tests/openimis/harness.py and one `openimis-mediator serve` in
front of it (plain HTTP on loopback, the whole pipeline of the e2e tests: SMART access token + SSO user
token, per-facility authorization, idempotency, a claims channel with async_submission; Redis on
127.0.0.1:6379 under a fresh key prefix). Three vendors (UPHOS001, VIHOS001, ROHOS001) send the burst
together, `--senders` requests in flight in all.

Queued run: time until every claim is answered 202 (202s/s), then until every claim is in openIMIS's
database exactly once (psql, current rows), and openIMIS's interactive latency meanwhile: a probe logs
in to openIMIS's FHIR API directly every 200 ms (what a user's login costs while the queue drains).
Synchronous run: the same burst (fresh claim codes) without the header; a sender that gets 503
(bulkhead full) waits Retry-After and sends again, as a well-behaved HMS does; same probe.
A benchmark script, not a test: it asserts nothing, it prints figures. Bounded: --max-seconds per run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from joserfc import jwt  # noqa: E402
from joserfc.jwk import ECKey  # noqa: E402

from mediator.identity.client import client_assertion, token_form  # noqa: E402
from tests.conftest import DEFAULT_IP_POLICY, write_config  # noqa: E402
from tests.e2e.conftest import e2e_channels, harness  # noqa: E402
from tests.e2e.vendors import AUTHORIZATION, BASE, ORIGIN, _claim_for, _client  # noqa: E402

# Facilities no e2e test pages through: a bench run's hundreds of claims do not change what the e2e
# tests of the same database see (e.g. paging through one facility's claims).
VENDORS = {"vendor-up": "UPHOS001", "vendor-vi": "VIHOS001", "vendor-ro": "ROHOS001"}

CHANNELS = """\
- name: claims
  path: ^/fhir/Claim(/[^/]+)?/?$
  methods: [GET, POST]
  upstream: openimis
  timeout_s: 60
  ip_allowlist: [local]
  idempotency: {{window_s: 600}}
  async_submission: {{drain_concurrency: {drain}, poll_interval_s: 0.2}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sender:
    def __init__(self, name: str, key: ECKey, base: str) -> None:
        self.name, self.key, self.base = name, key, base
        self.facility = VENDORS[name]
        self.admin = harness.HEALTH_FACILITIES[self.facility][1]
        self.access_token = ""

    async def login(self, session: aiohttp.ClientSession) -> None:
        form = token_form(client_assertion(self.name, self.key, f"{ORIGIN}/auth/token"),
                          "system/*.read system/Claim.write")
        async with session.post(self.base + "/auth/token", data=form) as response:
            self.access_token = (await response.json())["access_token"]

    def headers(self) -> dict[str, str]:
        now = int(time.time())
        claims = {"iss": f"https://sso.{self.name}.example", "aud": BASE, "iat": now, "exp": now + 300,
                  "preferred_username": self.admin, "roles": ["claim-admin"], "hf": self.facility,
                  "jti": uuid.uuid4().hex}
        return {"Authorization": f"Bearer {self.access_token}",
                "X-User-Token": jwt.encode({"alg": "ES256"}, claims, self.key)}


class Probe:
    """openIMIS's own login, directly, every 200 ms: its interactive latency while the burst runs."""

    def __init__(self, login_url: str) -> None:
        self.login_url = login_url
        self.samples: list[float] = []
        self.errors = 0
        self._stop = asyncio.Event()

    async def run(self, session: aiohttp.ClientSession) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            try:
                async with session.post(self.login_url, json={"username": "Admin", "password": "admin123"},
                                        timeout=aiohttp.ClientTimeout(total=30)) as response:
                    await response.read()
                    if response.status == 200:
                        self.samples.append((time.perf_counter() - started) * 1000)
                    else:
                        self.errors += 1
            except (aiohttp.ClientError, TimeoutError):
                self.errors += 1
            try:
                await asyncio.wait_for(self._stop.wait(), 0.2)
            except TimeoutError:
                pass

    def stop(self) -> None:
        self._stop.set()

    def figures(self) -> str:
        if len(self.samples) < 2:
            return f"n={len(self.samples)}"
        q = statistics.quantiles(self.samples, n=100, method="inclusive")  # never beyond the max
        return (f"n={len(self.samples)} p50={statistics.median(self.samples):.0f} ms p99={q[98]:.0f} ms "
                f"max={max(self.samples):.0f} ms errors={self.errors}")


def _in_openimis(info: dict[str, Any], codes: list[str]) -> dict[str, int]:
    found = dict.fromkeys(codes, 0)
    for start in range(0, len(codes), 500):
        chunk = ",".join(f"'{c}'" for c in codes[start:start + 500])
        out = harness._psql(harness.Config(), 'select "ClaimCode", count(*) from "tblClaim" where "ValidityTo" '
                            f'is null and "ClaimCode" in ({chunk}) group by "ClaimCode"', db=info["db_name"])
        for line in out.splitlines():
            code, count = line.split("|")
            found[code] = int(count)
    return found


async def _burst(session: aiohttp.ClientSession, senders: list[Sender], count: int, in_flight: int,
                 queued: bool, deadline: float) -> dict[str, Any]:
    claims = [(senders[n % len(senders)], _claim_for(senders[n % len(senders)].facility)) for n in range(count)]
    todo: asyncio.Queue[tuple[Sender, dict[str, Any]]] = asyncio.Queue()
    for item in claims:
        todo.put_nowait(item)
    statuses: dict[int, int] = {}
    retries = relogins = 0
    locations: list[str] = []

    async def worker() -> None:
        nonlocal retries, relogins
        while not todo.empty() and time.monotonic() < deadline:
            sender, claim = todo.get_nowait()
            headers = {**sender.headers(), **({"Prefer": "respond-async"} if queued else {})}
            while time.monotonic() < deadline:
                async with session.post(sender.base + "/fhir/Claim", json=claim, headers=headers,
                                        timeout=aiohttp.ClientTimeout(total=120)) as response:
                    await response.read()
                    if response.status in (429, 503):
                        retries += 1
                        await asyncio.sleep(float(response.headers.get("Retry-After", "1")))
                        headers = {**sender.headers(), **({"Prefer": "respond-async"} if queued else {})}
                        continue
                    if response.status == 401:  # the access token expired mid-burst: log in again, resend
                        relogins += 1
                        await sender.login(session)
                        headers = {**sender.headers(), **({"Prefer": "respond-async"} if queued else {})}
                        continue
                    statuses[response.status] = statuses.get(response.status, 0) + 1
                    if "Content-Location" in response.headers:
                        locations.append(response.headers["Content-Location"])
                    break

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    answered_s = time.monotonic() - started
    return {"codes": [c["identifier"][0]["value"] for _, c in claims], "answered_s": answered_s,
            "statuses": statuses, "retries": retries, "relogins": relogins, "locations": locations, "started": started}


async def _run_one(info: dict[str, Any], session: aiohttp.ClientSession, senders: list[Sender], count: int,
                   in_flight: int, queued: bool, max_s: float) -> dict[str, Any]:
    probe = Probe(info["login_url"])
    probe_task = asyncio.create_task(probe.run(session))
    deadline = time.monotonic() + max_s
    burst = await _burst(session, senders, count, in_flight, queued, deadline)
    codes = burst["codes"]
    while True:
        found = _in_openimis(info, codes)
        if all(v >= 1 for v in found.values()) or time.monotonic() > deadline:
            break
        await asyncio.sleep(1.0)
    all_in_s = time.monotonic() - burst["started"]
    probe.stop()
    await probe_task
    return {**burst, "all_in_s": all_in_s, "found": found, "probe": probe.figures(), "load": os.getloadavg()}


def _report(name: str, result: dict[str, Any], count: int) -> None:
    found = result["found"]
    once = sum(1 for v in found.values() if v == 1)
    print(f"\n{name}: {count} claims, 3 vendors")
    print(f"  answered: {result['answered_s']:.1f} s ({count / result['answered_s']:.1f} answers/s) "
          f"statuses={result['statuses']} retries after 503/429={result['retries']} "
          f"re-logins after 401={result['relogins']}")
    print(f"  all in openIMIS: {result['all_in_s']:.1f} s; exactly once: {once}/{count}; "
          f"missing: {sum(1 for v in found.values() if v == 0)}; duplicated: {sum(1 for v in found.values() if v > 1)}")
    print(f"  openIMIS login during the run: {result['probe']}")
    print(f"  load average at the end: {' '.join(f'{x:.2f}' for x in result['load'])}")


async def run(count: int, in_flight: int, drain: int, max_s: float) -> None:
    info = harness.ensure_running()
    port = _free_port()
    prefix = f"bench-async-{uuid.uuid4().hex[:8]}:"
    with tempfile.TemporaryDirectory() as tmp:
        keys = {name: ECKey.generate_key("P-256") for name in VENDORS}
        (Path(tmp) / "keys").mkdir()
        for name, key in keys.items():
            (Path(tmp) / "keys" / f"{name}.pem").write_bytes(key.as_pem(private=False))
        clients = ("version: 1\ntoken_service:\n  signing_key_file: keys/mediator-signing.key\nclients:\n"
                   + "".join(_client(n, f) for n, f in VENDORS.items()))
        redis = f"redis:\n  url: redis://127.0.0.1:6379/0\n  key_prefix: \"{prefix}\"\n  timeout_s: 2\n"
        write_config(Path(tmp), e2e_channels(info["fhir_base_url"], channels=CHANNELS.format(drain=drain),
                                             extra_server=redis),
                     DEFAULT_IP_POLICY, {"clients.yaml": clients, "authorization.yaml": AUTHORIZATION})
        env = {**os.environ, "OPENIMIS_USERNAME": "Admin", "OPENIMIS_PASSWORD": "admin123"}
        proc = subprocess.Popen([sys.executable, "-m", "mediator", "--log-level", "WARNING", "serve",
                                 "--config", tmp, "--port", str(port)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            base = f"http://127.0.0.1:{port}"
            connector = aiohttp.TCPConnector(limit=in_flight + 8)
            async with aiohttp.ClientSession(connector=connector) as session:
                for _ in range(100):
                    try:
                        async with session.get(base + "/healthz") as r:
                            if r.status == 200:
                                break
                    except aiohttp.ClientError:
                        await asyncio.sleep(0.1)
                senders = [Sender(name, key, base) for name, key in keys.items()]
                for sender in senders:
                    await sender.login(session)
                await _run_one(info, session, senders, 6, 3, False, 60)  # warm-up: directory, logins, pools
                print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
                      f"bulkhead 16, drain_concurrency {drain}, {in_flight} requests in flight")
                queued = await _run_one(info, session, senders, count, in_flight, True, max_s)
                _report("QUEUED (Prefer: respond-async)", queued, count)
                sync = await _run_one(info, session, senders, count, in_flight, False, max_s)
                _report("SYNCHRONOUS", sync, count)
        finally:
            proc.terminate()
            proc.wait(15)
            store = aioredis.from_url("redis://127.0.0.1:6379/0")
            left = [k async for k in store.scan_iter(f"{prefix}*")]
            if left:
                await store.delete(*left)
            await store.aclose()
    print(f"\nopenIMIS {info['versions'].get('openimis-be-api_fhir_r4', '?')} (api_fhir_r4); "
          f"{os.cpu_count()} CPUs shared with whatever else runs")
    print(json.dumps({"queued_202_per_s": round(count / queued["answered_s"], 1),
                      "queued_all_in_s": round(queued["all_in_s"], 1), "sync_all_in_s": round(sync["all_in_s"], 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--claims", type=int, default=510)
    parser.add_argument("--senders", type=int, default=24, help="requests in flight across the three vendors")
    parser.add_argument("--drain-concurrency", type=int, default=2)
    parser.add_argument("--max-seconds", type=float, default=400, help="bound of each run")
    args = parser.parse_args()
    asyncio.run(run(args.claims, args.senders, args.drain_concurrency, args.max_seconds))


if __name__ == "__main__":
    main()
