"""Do API floods make the REAL openIMIS slow for its interactive users? One run, figures side by side.

    .venv/bin/python bench/openimis_load.py [--duration 60] [--segments 4] [--rate 200] [--probe-rate 4]
        [--only ...] [--channels FILE] [--instances 1,2] [--no-straight] [--json out.json]

Starts (or reuses) the real openIMIS of tests/openimis/harness.py (2 sync gunicorn workers). The
interactive user is the openIMIS web app's insuree search (GraphQL `insurees`, as the admin UI sends it,
with a GraphQL JWT), sent straight to openIMIS at `--probe-rate`/s on a fixed schedule (latency measured
from each request's due time: no coordinated omission) from a process of its own, as a web user's
browser is not the flood's client (`--probe-in-loop`: in the flood generator's event loop, which adds
that loop's delays to the interactive figures). Floods at `--rate`/s (open loop, at most
`--max-outstanding` requests open at once) by one HMS vendor with 50 users:

  (a) eligibility: GET Patient/?identifier=<a demo insuree>
  (b) claims: POST Claim (a fresh claim code each)

each sent (1) straight to openIMIS, (2) through one `openimis-mediator serve` with the shipped
channels.yaml and policies (ip_allowlist, rate_limits, replica, write_profiles) plus the e2e vendors'
clients and authorization, and (3) through two such processes sharing one Redis (server.redis + bulkhead
scope cluster, the flood split between them). Each scenario alternates idle and flood windows
(`--segments` of each, idle first, `--duration` s of flood in all) while the interactive user is sent
throughout; its samples are split by due time, and the flood's p99 is compared with the p99 of the
same scenario's idle windows: this box's idle latency drifts by a quarter within minutes, so a flood
compared with an idle phase measured minutes earlier measured the drift. Printed: interactive
p50/p90/p99 idle and p50/p90/p95/p99 under the flood (60 s of each: 240 samples, so a p99 is the third
slowest), each ratio to idle with a 90 % interval (a bootstrap over whole windows: bench/window_stats.py)
and the same ratio between the odd and the even idle windows (no flood on either side), the
API rate openIMIS served (answers from openIMIS per second of flood), refusals (429/503 by the mediator),
mediator CPU per forwarded request (measured alone, in a closed loop of one, before each scenario) and
per refused one (the rest of the flood windows' CPU divided by the refusals), the mediator's final
concurrency limit and minimum RTT, and the load average. A benchmark script, not a test: it asserts
nothing, it prints figures. Bounded in time: about (2 × duration + segments × 3 s + calibrate + 10 s)
per scenario and 60 s to start. The claims flood creates real claims in the openIMIS database: run it
against a disposable one (OPENIMIS_DB_NAME), then `harness.py up --fresh-db`.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from joserfc import jwt  # noqa: E402
from joserfc.jwk import ECKey  # noqa: E402

from mediator.identity.client import client_assertion, token_form  # noqa: E402
from tests.e2e.conftest import harness  # noqa: E402
from tests.e2e.vendors import AUTHORIZATION, BASE, CLIENTS, ORIGIN, VENDORS, _claim_for  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/window_stats.py
from window_stats import idle_halves_ratio, percentile, percentile_ratio_interval, window_samples  # noqa: E402

INSUREES_QUERY = ("{ insurees(first: 10, orderBy: [\"chfId\"]) { totalCount edges { node { id uuid chfId "
                  "lastName otherNames dob gender { code } family { uuid location { name } } } } } }")
VENDOR = "vendor-jm"
SETTLE_S = 1.0
"""After each flood window, before the next idle one: openIMIS finishes the last answers' work."""
MAX_SCENARIO_S = 3600.0
"""The interactive probe's bound: a scenario stops it long before."""
USERS = [f"bench-user-{i:02d}" for i in range(50)]
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its children that are still alive (serve --workers forks)."""
    total = 0.0
    pids = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                pids.append(int(entry))
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


@dataclass
class Tally:
    latencies_ms: list[float] = field(default_factory=list)
    timeline: list[tuple[float, float]] = field(default_factory=list)
    """(due time on CLOCK_MONOTONIC, the same clock in every process of the box; latency ms): which
    window a sample belongs to, and when the slow ones came."""
    statuses: Counter[int] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    errors: int = 0
    skipped: int = 0


Request = tuple[str, str, dict[str, Any]]


async def open_loop(session: aiohttp.ClientSession, rate: float, duration: float,
                    next_request: Callable[[int], Request], max_outstanding: int,
                    record_reason: bool = False, stop: asyncio.Event | None = None,
                    tally: Tally | None = None) -> Tally:
    """`rate` requests per second for `duration` s (or until `stop` is set) on a fixed schedule; a request
    whose slot comes while `max_outstanding` are open is skipped (counted). Waits for the open ones at
    the end (bounded). Adds to `tally` if given (one Tally for several segments)."""
    tally = tally if tally is not None else Tally()
    outstanding: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()
    start = loop.time()
    total = int(rate * duration)

    async def one(due: float, request: Request) -> None:
        method, url, kwargs = request
        try:
            async with session.request(method, url, **kwargs) as response:
                body = await response.read()
                tally.statuses[response.status] += 1
                if record_reason and response.status in (429, 503):
                    try:
                        tally.reasons[json.loads(body)["issue"][0]["details"]["coding"][0]["code"]] += 1
                    except (ValueError, KeyError, IndexError, TypeError):
                        tally.reasons["?"] += 1
        except (TimeoutError, aiohttp.ClientError):
            tally.errors += 1
            return
        tally.latencies_ms.append((loop.time() - due) * 1000)
        tally.timeline.append((round(due, 4), round(tally.latencies_ms[-1], 1)))

    for i in range(total):
        due = start + i / rate
        delay = due - loop.time()
        if delay > 0:
            if stop is None:
                await asyncio.sleep(delay)
            else:
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                except TimeoutError:
                    pass
        if stop is not None and stop.is_set():
            break
        if len(outstanding) >= max_outstanding:
            tally.skipped += 1
            continue
        task = asyncio.create_task(one(due, next_request(i)))
        outstanding.add(task)
        task.add_done_callback(outstanding.discard)
    if outstanding:
        await asyncio.wait(outstanding, timeout=60)
    for task in list(outstanding):
        task.cancel()
    return tally


async def closed_loop(session: aiohttp.ClientSession, duration: float, next_request: Callable[[int], Request],
                      tally: Tally | None = None) -> Tally:
    """One request at a time for `duration` s."""
    tally = tally if tally is not None else Tally()
    end = time.monotonic() + duration
    i = 0
    while time.monotonic() < end:
        method, url, kwargs = next_request(i)
        i += 1
        async with session.request(method, url, **kwargs) as response:
            await response.read()
            tally.statuses[response.status] += 1
    return tally


class ProbeProcess:
    """The interactive user in a process of its own (`--probe-child`): `start` returns once it sends
    (it printed "ready" and was told to go), `stop` ends it and gives its samples."""

    def __init__(self, child: asyncio.subprocess.Process) -> None:
        self.child = child

    @classmethod
    async def start(cls, graphql_url: str, token: str, rate: float) -> ProbeProcess:
        child = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--probe-child", json.dumps([graphql_url, token, rate]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert child.stdout is not None and child.stdin is not None
        if (await child.stdout.readline()).strip() != b"ready":
            raise SystemExit("interactive probe process failed to start")
        child.stdin.write(b"go\n")
        await child.stdin.drain()
        return cls(child)

    async def stop(self) -> Tally:
        assert self.child.stdin is not None
        self.child.stdin.write(b"stop\n")
        await self.child.stdin.drain()
        return await _probe_result(self.child)


async def _probe_result(child: asyncio.subprocess.Process) -> Tally:
    assert child.stdout is not None
    result = json.loads(await child.stdout.read())
    await child.wait()
    statuses = Counter({int(status): count for status, count in result["statuses"].items()})
    return Tally(latencies_ms=result["latencies_ms"], timeline=[tuple(p) for p in result["timeline"]],
                 statuses=statuses, errors=result["errors"])


async def probe_child(spec: str) -> None:
    graphql_url, token, rate = json.loads(spec)
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as session:
        request: Request = ("POST", graphql_url, {"json": {"query": INSUREES_QUERY},
                                                  "headers": {"Authorization": f"Bearer {token}"}})
        print("ready", flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)   # go
        stop = asyncio.Event()
        loop.run_in_executor(None, sys.stdin.readline).add_done_callback(lambda _: stop.set())   # stop
        tally = await open_loop(session, rate, MAX_SCENARIO_S, lambda i: request, 50, stop=stop)
    print(json.dumps({"latencies_ms": tally.latencies_ms, "timeline": tally.timeline, "statuses": tally.statuses,
                      "errors": tally.errors}), flush=True)


class Vendor:
    def __init__(self) -> None:
        self.key = ECKey.generate_key("P-256")
        self.access_token = ""

    def user_headers(self, count: int) -> list[dict[str, str]]:
        """Fresh single-use SSO user tokens, made before a phase (signing is not part of the load)."""
        now = int(time.time())
        out = []
        for i in range(count):
            claims = {"iss": f"https://sso.{VENDOR}.example", "aud": BASE, "iat": now, "exp": now + 600,
                      "preferred_username": USERS[i % len(USERS)], "roles": ["claim-admin"],
                      "hf": VENDORS[VENDOR], "jti": uuid.uuid4().hex}
            out.append({"X-User-Token": jwt.encode({"alg": "ES256"}, claims, self.key)})
        return out


SHIPPED_CHANNELS = ROOT / "channels.yaml"


def _shipped_config(root: Path, channels_file: Path, direct_base: str, vendor: Vendor, port: int,
                    metrics_port: int, redis_prefix: str | None, signing_key: bytes) -> None:
    """`channels_file`: the shipped channels.yaml, or another (`--channels`, e.g. a bulkhead variant)."""
    channels = yaml.safe_load(channels_file.read_text())
    channels = copy.deepcopy(channels)
    server = channels["server"]
    server["listen"] = {"host": "127.0.0.1", "port": port}
    server["public_base_url"] = BASE
    server["metrics"] = {"host": "127.0.0.1", "port": metrics_port}
    server["audit"] = {"file": "audit.log"}
    upstream = channels["upstreams"]["openimis"]
    upstream["base_url"] = direct_base
    if redis_prefix is not None:  # what README "Load protection" says to add for several instances
        server["redis"] = {"url": "redis://127.0.0.1:6379/0", "key_prefix": redis_prefix}
        upstream.setdefault("bulkhead", {})["scope"] = "cluster"
    (root / "policies").mkdir(parents=True, exist_ok=True)
    (root / "keys").mkdir(exist_ok=True)
    (root / "channels.yaml").write_text(yaml.safe_dump(channels, sort_keys=False))
    for name in ("ip_allowlist.yaml", "rate_limits.yaml", "replica.yaml", "write_profiles.yaml"):
        if (ROOT / "policies" / name).exists():
            (root / "policies" / name).write_text((ROOT / "policies" / name).read_text())
    # The e2e vendors' clients name the ip set `local`; the shipped ip_allowlist calls it hms-networks.
    (root / "policies" / "clients.yaml").write_text(CLIENTS.replace("[local]", "[hms-networks]"))
    (root / "keys" / "mediator-signing.key").write_bytes(signing_key)
    (root / "policies" / "authorization.yaml").write_text(AUTHORIZATION)
    for name in VENDORS:
        (root / "keys" / f"{name}.pem").write_bytes(vendor.key.as_pem(private=False))


class Mediators:
    """`count` serve processes on the shipped configuration (their own config dirs, one Redis prefix)."""

    def __init__(self, count: int, channels_file: Path, direct_base: str, vendor: Vendor, tmp: Path) -> None:
        self.ports = [_free_port() for _ in range(count)]
        self.metrics_ports = [_free_port() for _ in range(count)]
        self.redis_prefix = f"bench-load-{uuid.uuid4().hex[:8]}:" if count > 1 else None
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        env = {**os.environ, "OPENIMIS_USERNAME": "Admin", "OPENIMIS_PASSWORD": "admin123"}
        # One access-token signing key for every instance, as a deployment shares it.
        signing_key = ECKey.generate_key("P-256").as_pem(private=True)
        for i, (port, mport) in enumerate(zip(self.ports, self.metrics_ports, strict=True)):
            root = tmp / f"mediator-{count}-{i}"
            _shipped_config(root, channels_file, direct_base, vendor, port, mport, self.redis_prefix, signing_key)
            self.logs.append(root / "stderr.log")
            log = (root / "stderr.log").open("wb")
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "mediator", "--log-level", "WARNING", "serve", "--config", str(root)],
                env=env, stdout=log, stderr=log))

    def base(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i % len(self.ports)]}/fhir/"

    async def ready(self, session: aiohttp.ClientSession, vendor: Vendor) -> None:
        for proc, mport in zip(self.procs, self.metrics_ports, strict=True):
            for _ in range(300):
                if proc.poll() is not None:
                    raise SystemExit(f"mediator exited: {Path(self.logs[self.procs.index(proc)]).read_text()}")
                try:
                    async with session.get(f"http://127.0.0.1:{mport}/metrics") as r:
                        text = await r.text()
                    if "mediator_replica_last_sync_timestamp_seconds" in text and \
                            _metric(text, "mediator_replica_last_sync_timestamp_seconds") > 0:
                        break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        await self.sign_in(session, vendor)

    async def sign_in(self, session: aiohttp.ClientSession, vendor: Vendor) -> None:
        """A fresh access token for the vendor: called before each flood window, since one lasts 300 s and
        a scenario of --duration 150 outlived it (every later request a 401)."""
        async with session.post(f"http://127.0.0.1:{self.ports[0]}/auth/token", data=token_form(
                client_assertion(VENDOR, vendor.key, f"{ORIGIN}/auth/token"),
                "system/*.read system/Claim.write system/CoverageEligibilityRequest.write")) as r:
            vendor.access_token = (await r.json())["access_token"]

    def cpu(self) -> float:
        return sum(_cpu_seconds(p.pid) for p in self.procs)

    async def state(self, session: aiohttp.ClientSession) -> str:
        out = []
        for mport in self.metrics_ports:
            async with session.get(f"http://127.0.0.1:{mport}/metrics") as r:
                text = await r.text()
            out.append(f"limit {_metric(text, 'mediator_concurrency_limit'):.2f}, "
                       f"min RTT {_metric(text, 'mediator_upstream_min_rtt_seconds') * 1000:.0f} ms, "
                       f"probe baseline {_metric(text, 'mediator_latency_probe_baseline_seconds') * 1000:.0f} ms")
        return "; ".join(out)

    def stop(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.redis_prefix is not None:
            import redis
            client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
            keys = list(client.scan_iter(match=self.redis_prefix + "*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


@dataclass
class Row:
    scenario: str
    probe: Tally
    """The interactive samples due in the scenario's flood windows."""
    idle: Tally
    """The interactive samples due in the same scenario's idle windows, between its flood windows."""
    flood: Tally
    """The flood's answers (every flood window)."""
    duration: float = 0
    """Seconds of flood (every flood window)."""
    windows: list[tuple[str, float, float]] = field(default_factory=list)
    """("idle" | "flood", start, end), CLOCK_MONOTONIC."""
    origin: float = 0.0
    cpu_forwarded_ms: float | None = None
    cpu_refused_ms: float | None = None
    state: str = ""
    load: str = ""

    def served_per_s(self, direct: bool) -> float:
        mediator_refusals = self.refusals() if not direct else 0
        answered = sum(self.flood.statuses.values()) - mediator_refusals
        return answered / self.duration

    def refusals(self) -> int:
        return sum(self.flood.reasons.values())

    def statistics(self) -> dict[str, Any]:
        """How far the ratios to idle can be trusted (percentile_ratio_interval, idle_halves_ratio)."""
        idle = window_samples(self.idle.timeline, self.windows, "idle")
        flood = window_samples(self.probe.timeline, self.windows, "flood")
        return {"p99_ratio_interval": percentile_ratio_interval(idle, flood, 0.99),
                "p90_ratio_interval": percentile_ratio_interval(idle, flood, 0.9),
                "idle_halves_p99_ratio": idle_halves_ratio(idle, 0.99),
                "idle_halves_p90_ratio": idle_halves_ratio(idle, 0.9),
                "idle_windows": len(idle), "flood_windows": len(flood)}


async def run(args: argparse.Namespace) -> None:
    info = harness.ensure_running()
    direct_base = info["fhir_base_url"].rstrip("/") + "/"
    graphql_url = info["graphql_url"]
    fhir_token = harness.login(info["base_url"], "Admin", "admin123")
    rows: list[Row] = []
    async with aiohttp.ClientSession() as probe_session:
        async with probe_session.post(graphql_url, json={
                "query": "mutation($u:String!,$p:String!){tokenAuth(username:$u,password:$p){token}}",
                "variables": {"u": "Admin", "p": "admin123"}}) as r:
            gql_token = (await r.json())["data"]["tokenAuth"]["token"]
        probe_request: Request = ("POST", graphql_url, {"json": {"query": INSUREES_QUERY},
                                                         "headers": {"Authorization": f"Bearer {gql_token}"}})
        async with probe_session.post(graphql_url, **probe_request[2]) as r:
            insurees = [e["node"]["chfId"] for e in (await r.json())["data"]["insurees"]["edges"]]

        async def probe_start() -> Callable[[], Awaitable[Tally]]:
            """Starts the interactive user; the callable returned stops it and gives its samples."""
            if args.probe_in_loop:
                stop = asyncio.Event()
                task = asyncio.create_task(open_loop(probe_session, args.probe_rate, MAX_SCENARIO_S,
                                                     lambda i: probe_request, 50, stop=stop))

                async def stop_in_loop() -> Tally:
                    stop.set()
                    return await task
                return stop_in_loop
            child = await ProbeProcess.start(graphql_url, gql_token, args.probe_rate)
            return child.stop

        direct_headers = {"Authorization": f"Bearer {fhir_token}"}

        def flood_requests(kind: str, base: Callable[[int], str],
                           headers: Callable[[int], dict[str, str]]) -> Callable[[int], Request]:
            if kind == "eligibility":
                return lambda i: ("GET", base(i) + f"Patient/?identifier={random.choice(insurees)}",
                                  {"headers": headers(i)})
            return lambda i: ("POST", base(i) + "Claim/", {"headers": headers(i),
                                                         "json": _claim_for(VENDORS[VENDOR])})

        async def settle() -> None:
            await asyncio.sleep(3)  # openIMIS finishes what the last phase left it

        vendor = Vendor()

        async def scenario(name: str, make: Callable[[], Callable[[int], Request]],
                           mediators: Mediators | None = None, calibrate: Callable[[int], Request] | None = None,
                           one_at_a_time: bool = False) -> None:
            """Idle and flood windows in turn (`--segments` of each, idle first), the interactive user sent
            throughout: each flood is compared with idle windows of the same minutes, so the box's drift
            (its idle latency moves by a quarter within minutes) is in both alike."""
            row = Row(name, Tally(), Tally(), Tally(), duration=args.duration)
            segment = args.duration / args.segments
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.max_outstanding),
                                             timeout=aiohttp.ClientTimeout(total=70)) as flood_session:
                if mediators is not None and calibrate is not None:
                    before = mediators.cpu()
                    alone = await closed_loop(flood_session, args.calibrate, calibrate)
                    forwarded = sum(n for s, n in alone.statuses.items() if s not in (429, 503))
                    row.cpu_forwarded_ms = (mediators.cpu() - before) * 1000 / max(1, forwarded)
                    await settle()
                requests = make()
                flood_cpu = 0.0
                stop_probe = await probe_start()
                row.origin = time.monotonic()
                for index in range(args.segments):
                    start = time.monotonic()
                    await asyncio.sleep(segment)
                    row.windows.append(("idle", start, time.monotonic()))
                    offset = index * (int(args.rate * segment) + 1)  # a fresh user header / claim each

                    def shifted(i: int, offset: int = offset) -> Request:
                        return requests(i + offset)
                    if mediators is not None:
                        await mediators.sign_in(flood_session, vendor)
                    cpu_before = mediators.cpu() if mediators is not None else 0.0
                    start = time.monotonic()
                    if one_at_a_time:
                        await closed_loop(flood_session, segment, shifted, row.flood)
                    else:
                        await open_loop(flood_session, args.rate, segment, shifted, args.max_outstanding,
                                        record_reason=mediators is not None, tally=row.flood)
                    row.windows.append(("flood", start, start + segment))
                    if mediators is not None:
                        flood_cpu += mediators.cpu() - cpu_before
                    await asyncio.sleep(SETTLE_S)  # what the flood left openIMIS (open_loop waited for its answers)
                samples = await stop_probe()
                for due, latency in samples.timeline:
                    window = next((w for w, begin, end in row.windows if begin <= due < end), None)
                    target = row.probe if window == "flood" else row.idle if window == "idle" else None
                    if target is not None:
                        target.latencies_ms.append(latency)
                        target.timeline.append((due, latency))
                row.probe.errors = samples.errors
                if mediators is not None:
                    refused = row.refusals()
                    forwarded = sum(row.flood.statuses.values()) - refused
                    if refused and row.cpu_forwarded_ms is not None:
                        row.cpu_refused_ms = max(0.0, flood_cpu * 1000 - forwarded * row.cpu_forwarded_ms) / refused
                    row.state = await mediators.state(flood_session)
            row.load = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
            rows.append(row)
            print(f"  done: {name} (load {row.load})", file=sys.stderr, flush=True)
            await settle()

        kinds = [k for k in ("eligibility", "claims") if args.only in (None, k)]
        # openIMIS just (re)started answers its first GraphQL queries slowly (cold caches and lazy imports in
        # each worker, up to seconds): not its idle latency. Warm both workers before measuring anything.
        await closed_loop(probe_session, 3, lambda i: probe_request)

        def direct_flood(kind: str) -> Callable[[], Callable[[int], Request]]:
            return lambda: flood_requests(kind, lambda i: direct_base, lambda i: direct_headers)

        def indexed(headers: list[dict[str, str]]) -> Callable[[int], dict[str, str]]:
            # The access token of the moment (renewed before every flood window: it lasts 300 s, a scenario
            # longer); `%`: a calibration of quick refusals outruns its list.
            return lambda i: {**headers[i % len(headers)], "Authorization": f"Bearer {vendor.access_token}"}

        def mediator_flood(kind: str, m: Mediators, headers: list[dict[str, str]]
                           ) -> Callable[[], Callable[[int], Request]]:
            return lambda: flood_requests(kind, m.base, indexed(headers))

        for kind in kinds if not args.no_straight else ():
            await scenario(f"{kind}: straight to openIMIS", direct_flood(kind))
        if "claims" in kinds and args.one_at_a_time:
            # The best any admission control that admits claims at all can do: one claim at a time, no
            # pause between them, straight to openIMIS (a free worker is always left to the web users).
            await scenario("claims: one at a time, straight", direct_flood("claims"), one_at_a_time=True)
        with tempfile.TemporaryDirectory() as tmp:
            for count in (int(c) for c in args.instances.split(",")):
                mediators = Mediators(count, args.channels.resolve(), direct_base, vendor, Path(tmp))
                try:
                    await mediators.ready(probe_session, vendor)
                    await settle()
                    for kind in kinds:
                        n = int(args.rate * args.duration) + 10
                        calib_headers = vendor.user_headers(int(args.calibrate * 100))
                        flood_headers = vendor.user_headers(n)
                        await scenario(f"{kind}: mediator x{count}",
                                       mediator_flood(kind, mediators, flood_headers), mediators,
                                       flood_requests(kind, mediators.base, indexed(calib_headers)))
                finally:
                    mediators.stop()
    print(f"\nReal openIMIS ({info['versions'].get('openimis-be-api_fhir_r4', '?')}, 2 sync gunicorn workers); "
          f"interactive = GraphQL insurees at {args.probe_rate}/s; floods at {args.rate}/s, {args.duration:.0f} s "
          f"per scenario in {args.segments} windows, each after an idle window of the same length "
          f"(at most {args.max_outstanding} open); shared 2-core box, load average after each scenario.")
    print(f"{'scenario':34} {'idle p50/p90/p99':>16} {'p50 ms':>7} {'p90 ms':>7} {'p95 ms':>7} {'p99 ms':>7} "
          f"{'p90/idle':>8} {'p99/idle':>8} {'served/s':>9} {'refused':>8} {'cpu fwd':>8} {'cpu ref':>8} "
          f"{'ref/fwd':>7}  {'goal':7} load / mediator state")
    # Once per row, for the table and the JSON alike (each interval is 2,000 resamples).
    statistics = [row.statistics() for row in rows]
    for row, stats in zip(rows, statistics, strict=True):
        p50, p90, p95, p99 = (percentile(row.probe.latencies_ms, q) for q in (0.5, 0.9, 0.95, 0.99))
        idle_p50, idle_p90, idle_p99 = (percentile(row.idle.latencies_ms, q) for q in (0.5, 0.9, 0.99))
        ratio = p99 / idle_p99 if idle_p99 else float("nan")
        ratio_p90 = p90 / idle_p90 if idle_p90 else float("nan")
        direct = "mediator" not in row.scenario
        served = f"{row.served_per_s(direct):9.1f}"
        refused = f"{row.refusals():8d}" if not direct else f"{'':8}"
        fwd = f"{row.cpu_forwarded_ms:8.2f}" if row.cpu_forwarded_ms is not None else f"{'':8}"
        ref = f"{row.cpu_refused_ms:8.2f}" if row.cpu_refused_ms is not None else f"{'':8}"
        rel = f"{row.cpu_refused_ms / row.cpu_forwarded_ms:7.2f}" \
            if row.cpu_refused_ms is not None and row.cpu_forwarded_ms else f"{'':7}"
        goal = ""
        if not direct:
            met_latency = ratio <= 1.5
            met_cpu = row.cpu_refused_ms is None or (row.cpu_forwarded_ms is not None
                                                     and row.cpu_refused_ms <= row.cpu_forwarded_ms / 2)
            goal = "met" if met_latency and met_cpu else "NOT MET"
            if row.flood.statuses[401] + row.flood.statuses[403] > 0.01 * sum(row.flood.statuses.values()):
                goal = "INVALID"   # the bench's own credentials were refused: no flood reached openIMIS
        idle_cell = f"{idle_p50:.0f} / {idle_p90:.0f} / {idle_p99:.0f}"
        print(f"{row.scenario:34} {idle_cell:>16} {p50:7.0f} {p90:7.0f} {p95:7.0f} {p99:7.0f} {ratio_p90:8.2f} "
              f"{ratio:8.2f} {served} {refused} {fwd} {ref} {rel}  {goal:7} "
              f"{row.load}{' / ' + row.state if row.state else ''}")
        extra = dict(sorted(row.flood.statuses.items()))
        print(f"{'':34} statuses {extra} reasons {dict(row.flood.reasons)} errors {row.flood.errors} "
              f"skipped {row.flood.skipped}; interactive samples {len(row.idle.latencies_ms)} idle + "
              f"{len(row.probe.latencies_ms)} flood, probe errors {row.probe.errors}")
        (lo99, hi99), (lo90, hi90) = stats["p99_ratio_interval"], stats["p90_ratio_interval"]
        print(f"{'':34} 90% intervals (window bootstrap, {stats['idle_windows']} idle and {stats['flood_windows']} "
              f"flood windows): p99/idle {lo99:.2f}-{hi99:.2f}, p90/idle {lo90:.2f}-{hi90:.2f}; no flood at all, "
              f"odd / even idle windows: p99 {stats['idle_halves_p99_ratio']:.2f}, "
              f"p90 {stats['idle_halves_p90_ratio']:.2f}")
    if args.json:
        def relative(row: Row, timeline: list[tuple[float, float]]) -> list[tuple[float, float]]:
            return sorted((round(due - row.origin, 3), latency) for due, latency in timeline)
        Path(args.json).write_text(json.dumps([{
            "scenario": r.scenario, "p50_ms": percentile(r.probe.latencies_ms, 0.5),
            "p95_ms": percentile(r.probe.latencies_ms, 0.95), "samples": len(r.probe.latencies_ms),
            "p99_ms": percentile(r.probe.latencies_ms, 0.99),
            "idle_p50_ms": percentile(r.idle.latencies_ms, 0.5), "idle_p99_ms": percentile(r.idle.latencies_ms, 0.99),
            "idle_samples": len(r.idle.latencies_ms),
            "p90_ms": percentile(r.probe.latencies_ms, 0.9), "idle_p90_ms": percentile(r.idle.latencies_ms, 0.9),
            **stats,
            "served_per_s": r.served_per_s("mediator" not in r.scenario), "refused": r.refusals(),
            "cpu_forwarded_ms": r.cpu_forwarded_ms, "cpu_refused_ms": r.cpu_refused_ms, "load": r.load,
            "state": r.state,
            "windows": [(w, round(b - r.origin, 3), round(e - r.origin, 3)) for w, b, e in r.windows],
            "interactive_timeline": relative(r, r.probe.timeline),
            "idle_timeline": relative(r, r.idle.timeline)} for r, stats in zip(rows, statistics, strict=True)],
            indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60,
                        help="seconds of flood per scenario, and as many of idle windows between them (60: 240 "
                             "interactive samples each, so the p99 is not just the slowest answer)")
    parser.add_argument("--segments", type=int, default=4,
                        help="flood windows per scenario, each after an idle window of the same length")
    parser.add_argument("--calibrate", type=float, default=5, help="seconds of the forwarded-only CPU measurement")
    parser.add_argument("--rate", type=float, default=200, help="flood requests per second")
    parser.add_argument("--probe-rate", type=float, default=4, help="interactive requests per second")
    parser.add_argument("--max-outstanding", type=int, default=128, help="flood requests open at once, at most")
    parser.add_argument("--only", choices=["eligibility", "claims"], help="one flood only (quicker)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--channels", type=Path, default=SHIPPED_CHANNELS,
                        help="the channels.yaml the mediators run (default: the shipped one); its server "
                             "listen/metrics/audit/redis and the upstream's base_url are replaced as for the shipped")
    parser.add_argument("--no-straight", action="store_true",
                        help="skip the floods straight to openIMIS (comparing mediator configurations)")
    parser.add_argument("--instances", default="1,2", help="mediator instance counts to run, e.g. 1 or 1,2")
    parser.add_argument("--probe-in-loop", action="store_true",
                        help="measure the interactive user in the flood generator's own event loop")
    parser.add_argument("--one-at-a-time", action="store_true",
                        help="also: claims one at a time (closed loop) straight to openIMIS, the web users' "
                             "latency with a single claim always in flight")
    parser.add_argument("--probe-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe_child:
        asyncio.run(probe_child(args.probe_child))
        return
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
