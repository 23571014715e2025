"""Master-data replica benchmark (a script that prints figures, not a test).

    .venv/bin/python bench/replica_bench.py [--items 10000] [--requests 4000] [--concurrency 32] [--no-redis]

Three processes, so that no server competes with the load generator for one event loop:
  1. the openIMIS stand-in with --items generated medical items (plus its fixtures);
  2. two mediators in front of it: one channel `serve_from: replica` (synced before the run), one
     `serve_from: upstream` (every read proxied to the stand-in);
  3. this process: sync time and peak memory of a full sync of the items (memory store, and Redis when
     reachable), then the same `GET /fhir/Medication/<id>` (random ids) against both mediators.
The stand-in answers from dictionaries, so the proxied figure is flattering to openIMIS: a real openIMIS
does a database query, permission checks and FHIR conversion per read.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import resource
import socket
import sys
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mediator.app import RUNTIME, build_app  # noqa: E402
from mediator.config import load_config  # noqa: E402
from mediator.metrics import Metrics  # noqa: E402
from mediator.replica.service import Replica, store_for  # noqa: E402
from mediator.sandbox import OpenImisSandbox, build_sandbox_app  # noqa: E402
from mediator.upstream import OpenImisUpstream  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/0"
IP_POLICY = 'version: 1\nunlisted_channels: deny\nip_sets:\n  local:\n    allow: ["127.0.0.0/8"]\n'
AUTHORIZATION = ("version: 1\nfacility_directory: {upstream: openimis}\nrules:\n  - name: master-data-read\n"
                 "    roles: [anonymous]\n    permissions: [system/Medication.rs]\n    facility_scope: any\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(root: Path, sandbox_port: int, mediator_port: int, serve_from: str, store: str,
                 redis_prefix: str = "") -> Path:
    (root / "policies").mkdir(parents=True, exist_ok=True)
    redis = f'  redis:\n    url: "{REDIS_URL}"\n    key_prefix: "{redis_prefix}"\n' if redis_prefix else ""
    (root / "channels.yaml").write_text(
        "version: 1\nserver:\n"
        f"  public_base_url: http://127.0.0.1:{mediator_port}/fhir/\n{redis}"
        "upstreams:\n  openimis:\n"
        f"    base_url: http://127.0.0.1:{sandbox_port}/api/api_fhir_r4/\n"
        "    pool_size: 64\n"
        "    login: {username_env: OPENIMIS_USERNAME, password_env: OPENIMIS_PASSWORD}\n"
        "channels:\n  - name: master-data\n    path: ^/fhir/Medication(/[^/]+)?/?$\n    methods: [GET]\n"
        f"    upstream: openimis\n    serve_from: {serve_from}\n    ip_allowlist: [local]\n"
        # Master data without a client: the bench measures the replica, not authentication.
        "    authentication: none\n")
    (root / "policies" / "ip_allowlist.yaml").write_text(IP_POLICY)
    (root / "policies" / "authorization.yaml").write_text(AUTHORIZATION)  # absent: every request is 403
    (root / "policies" / "replica.yaml").write_text(
        f"version: 1\nupstream: openimis\nstore: {store}\nschedule: false\npage_size: 100\n"
        "resource_types: [Medication]\ndocuments: []\n")
    return root


def run_sandbox(port: int, items: int, ready: multiprocessing.synchronize.Event) -> None:
    sandbox = OpenImisSandbox()
    sandbox.generate_medications(items)

    async def main() -> None:
        runner = web.AppRunner(build_sandbox_app(sandbox), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


def run_mediators(configs: list[tuple[Path, int]], ready: multiprocessing.synchronize.Event) -> None:
    async def main() -> None:
        for root, port in configs:
            app = build_app(load_config(root))
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            replica = app[RUNTIME].current.replica
            if replica is not None and app[RUNTIME].current.config.channels.channels[0].serve_from == "replica":
                await replica.sync()
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


async def timed_sync(root: Path, trace: bool) -> tuple[float, int, int]:
    """(seconds, tracemalloc peak bytes or 0, resources) of one full sync into a fresh store."""
    config = load_config(root)
    policy = config.policies["replica"]
    server = config.channels.server
    upstream = OpenImisUpstream("openimis", config.channels.upstreams["openimis"], server.public_base_url)
    await upstream.start()
    replica = Replica(policy, store_for(config, policy), upstream, Metrics(), server.public_base_url)  # type: ignore[arg-type]
    await replica.start()
    try:
        await upstream.token()   # log in outside the measurement
        if trace:
            tracemalloc.start()
        started = time.perf_counter()
        report = await replica.sync(full=True)
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1] if trace else 0
        if trace:
            tracemalloc.stop()
        return elapsed, peak, report.counts.get("Medication", 0)
    finally:
        await replica.close()
        await upstream.close()


async def load(port: int, ids: list[str], requests: int, concurrency: int) -> tuple[float, int]:
    """(requests per second, non-200 answers) for `requests` GETs of random ids."""
    rng = random.Random(7)
    urls = [f"http://127.0.0.1:{port}/fhir/Medication/{rng.choice(ids)}" for _ in range(requests)]
    errors = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        for url in urls[:50]:   # warm up pools and the upstream login
            async with session.get(url) as r:
                await r.read()
        queue = iter(urls)

        async def worker() -> None:
            nonlocal errors
            for url in queue:
                async with session.get(url) as r:
                    await r.read()
                    errors += r.status != 200

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return requests / elapsed, errors


async def redis_reachable() -> bool:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", 6379), 1)
        writer.close()
        return True
    except (OSError, TimeoutError):
        return False


async def delete_redis_prefix(prefix: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
        for start in range(0, len(keys), 1000):
            await client.delete(*keys[start:start + 1000])
    finally:
        await client.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--no-redis", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("OPENIMIS_USERNAME", "Admin")
    os.environ.setdefault("OPENIMIS_PASSWORD", "admin123")
    sandbox_port, replica_port, proxy_port = free_port(), free_port(), free_port()
    ctx = multiprocessing.get_context("spawn")
    sandbox_ready, mediators_ready = ctx.Event(), ctx.Event()
    processes = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        replica_cfg = write_config(root / "replica", sandbox_port, replica_port, "replica", "memory")
        proxy_cfg = write_config(root / "proxy", sandbox_port, proxy_port, "upstream", "memory")
        try:
            processes.append(ctx.Process(target=run_sandbox, args=(sandbox_port, args.items, sandbox_ready),
                                         daemon=True))
            processes[-1].start()
            if not sandbox_ready.wait(120):
                raise SystemExit("the stand-in did not start")
            print(f"openIMIS stand-in: {args.items} generated items + fixtures, port {sandbox_port}")

            rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            seconds, _, count = asyncio.run(timed_sync(replica_cfg, trace=False))
            rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            _, peak, _ = asyncio.run(timed_sync(replica_cfg, trace=True))
            print(f"\nfull sync, memory store: {count} Medication in {seconds:.2f} s "
                  f"({count / seconds:,.0f} resources/s); tracemalloc peak {peak / 1e6:.1f} MB; "
                  f"process max RSS grew {(rss_after - rss_before) / 1024:.1f} MB")
            if not args.no_redis and asyncio.run(redis_reachable()):
                prefix = f"bench-replica-{uuid.uuid4().hex[:8]}:"
                redis_cfg = write_config(root / "redis", sandbox_port, replica_port, "replica", "redis", prefix)
                try:
                    seconds, _, count = asyncio.run(timed_sync(redis_cfg, trace=False))
                    print(f"full sync, Redis store:  {count} Medication in {seconds:.2f} s "
                          f"({count / seconds:,.0f} resources/s)")
                finally:
                    asyncio.run(delete_redis_prefix(prefix))

            processes.append(ctx.Process(target=run_mediators,
                                         args=([(replica_cfg, replica_port), (proxy_cfg, proxy_port)],
                                               mediators_ready), daemon=True))
            processes[-1].start()
            if not mediators_ready.wait(120):
                raise SystemExit("the mediators did not start")
            sandbox = OpenImisSandbox()
            sandbox.generate_medications(args.items)
            ids = list(sandbox.store["Medication"])
            cached, cached_errors = asyncio.run(load(replica_port, ids, args.requests, args.concurrency))
            proxied, proxied_errors = asyncio.run(load(proxy_port, ids, args.requests, args.concurrency))
            print(f"\nGET /fhir/Medication/<random id>, {args.requests} requests, concurrency {args.concurrency}, "
                  "plain HTTP on loopback:")
            print(f"{'':24}{'requests/s':>12}{'non-200':>10}")
            print(f"{'replica (cached)':24}{cached:>12,.0f}{cached_errors:>10}")
            print(f"{'proxied to stand-in':24}{proxied:>12,.0f}{proxied_errors:>10}")
            print(f"{'ratio cached/proxied':24}{cached / proxied:>12.2f}")
            print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")
            if cached_errors or proxied_errors:
                print("ERRORS: answers other than 200, the figures are not valid", file=sys.stderr)
                return 1
        finally:
            for process in processes:
                process.terminate()
                process.join(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
