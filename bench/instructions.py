"""Instructions per request of the bare aiohttp proxy and of the mediator's full pipeline, counted by
valgrind's callgrind, in one run (README "Benchmarks"): issue 18's CPU ratio without the ±15 % that CPU
time moves by between rounds of the same code on this shared 2-core box.

    .venv/bin/python bench/instructions.py [--duration 20] [--json out.json] [--dumps DIR]

Each target runs as ONE process under `valgrind --tool=callgrind --instr-atstart=no` (the bare proxy's
worker in-process; the mediator `serve --workers 1`), behind the same fast openIMIS imitation
(bench/upstream.py) as bench/run.py, with bench/run.py's configuration and token mix (its FEATURES,
`make_token_mix`, its wrk script): warmed by `wrk -c4` with the repeated user tokens only, then counted
for `--duration` s of `wrk -c4` with the mix (1 request in 10 a fresh user token). Instructions are
counted only between `callgrind_control -i on` and the dump, and divided by the requests wrk completed.

What the count is and is not: user-space instructions of the target's process (every thread: the audit
writer too), not CPU time — no kernel time (the send()/recv() of both sides, about a fifth of the CPU in
the py-spy profiles), no cache misses, no Redis. Under callgrind a process runs ~50× slower, so whatever
depends on wall time sees fewer requests per tick: rate limits here are decided with one Redis round trip
per request (`reconcile` off: its 50 ms reconciliation would be spread over a couple of requests), and the
audit writer's 20 ms batches hold a request or two instead of dozens. The same code and inputs give the
same count within a fraction of a percent, which is what comparing two checkouts needs; the ratio is a
second view of the CPU target, not a replacement for bench/run.py's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import run as bench_run  # noqa: E402  (bench/run.py: the same configuration, tokens and wrk script)


def wrk(url: str, script: Path, duration: int) -> int:
    out = subprocess.run(["wrk", "-t1", "-c4", f"-d{duration}s", "--timeout", "10s", "-s", str(script), url],
                         check=True, capture_output=True, text=True).stdout
    match = re.search(r"(\d+) requests in", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if match is None:
        raise SystemExit(f"wrk printed no request count:\n{out}")
    if errors is not None:
        raise SystemExit(f"{url}: {errors.group(1)} answers were not 2xx: the target refused the bench\n{out}")
    return int(match.group(1))


def counted(pid: int, out_prefix: Path) -> int:
    """The instructions of the newest dump of `pid`."""
    dumps = sorted(out_prefix.parent.glob(f"{out_prefix.name}.{pid}.*"), key=lambda p: p.stat().st_mtime)
    if not dumps:
        raise SystemExit(f"no callgrind dump of {pid}")
    text = dumps[-1].read_text(errors="replace")
    match = re.search(r"^(?:totals|summary): (\d+)", text, re.MULTILINE)
    if match is None:
        raise SystemExit(f"{dumps[-1]}: no instruction total in the dump")
    return int(match.group(1))


def measure(name: str, pid: int, url: str, warm: Path, mix: Path, duration: int, out_prefix: Path) -> dict[str, float]:
    wrk(url, warm, 5)
    subprocess.run(["callgrind_control", "-i", "on", str(pid)], check=True, capture_output=True)
    subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)
    requests = wrk(url, mix, duration)
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
    subprocess.run(["callgrind_control", "-i", "off", str(pid)], check=True, capture_output=True)
    time.sleep(1)
    instructions = counted(pid, out_prefix)
    print(f"  {name}: {requests} requests, {instructions / max(1, requests):,.0f} instructions each",
          file=sys.stderr, flush=True)
    return {"requests": requests, "instructions": instructions,
            "instructions_per_request": instructions / max(1, requests)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=20, help="seconds of counted load per target (max 120)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--dumps", type=Path,
                        help="keep the callgrind dumps in this folder (callgrind_annotate shows where they differ)")
    args = parser.parse_args()
    if not 1 <= args.duration <= 120:
        parser.error("--duration 1..120")
    for tool in ("valgrind", "callgrind_control", "wrk"):
        if shutil.which(tool) is None:
            parser.error(f"needs {tool} on PATH (apt-get install valgrind wrk)")

    features = [f for f in bench_run.FEATURES if f.present(bench_run.installed_policy_keys())]
    env = dict(os.environ, OPENIMIS_USERNAME="bench", OPENIMIS_PASSWORD="bench")
    for feature in features:
        env.update(feature.env)
    run_id = uuid.uuid4().hex[:12]
    processes = bench_run.Processes()
    tmp = Path(tempfile.mkdtemp(prefix="mediator-instructions-"))
    out_prefix = tmp / "callgrind"
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out_prefix}.%p"]
    try:
        upstream_port, bare_port, mediator_port = (bench_run.free_port() for _ in range(3))
        upstream = processes.start([sys.executable, str(HERE / "upstream.py"), "--port", str(upstream_port)],
                                   tmp / "upstream.log")
        upstream_base = f"http://127.0.0.1:{upstream_port}/api/api_fhir_r4/"
        bare = processes.start(valgrind + [
            sys.executable, "-c", f"import sys; sys.path.insert(0, {str(HERE)!r}); import bare_proxy; "
            f"bare_proxy.worker({bare_port}, {upstream_base!r}, None, False)"], tmp / "bare.log")
        root = tmp / "mediator"
        bench_run.write_mediator_config(root, mediator_port, upstream_port, features,
                                        {"metrics_port": str(bench_run.free_port()), "run_id": run_id},
                                        None, reconcile=False)
        mediator = processes.start(valgrind + [sys.executable, "-m", "mediator", "--log-level", "INFO", "serve",
                                               "--config", str(root), "--workers", "1"], tmp / "mediator.log",
                                   env=env)
        bench_run.wait_for_200(upstream_base + "Medication/", upstream, tmp / "upstream.log")
        bench_run.wait_for_200(f"http://127.0.0.1:{bare_port}{bench_run.FHIR_PATH}", bare, tmp / "bare.log", 300)
        bench_run.wait_for_200(f"http://127.0.0.1:{mediator_port}/healthz", mediator, tmp / "mediator.log", 600)

        origin = f"http://127.0.0.1:{mediator_port}"
        audience = f"{origin}/fhir/"
        authorization = f"Bearer {bench_run.BENCH_IDENTITY.access_token(origin)}"
        # The repeated users are signed in by the warm-up; the fresh tokens are new to the counted part.
        repeated = bench_run.make_token_mix(audience, 50, 0, 0)
        mix = bench_run.TokenMix(repeated.repeated, bench_run.make_token_mix(audience, 0, 10, 60 * args.duration).fresh,
                                 10)
        scripts = {}
        for label, tokens in (("warm", repeated), ("mix", mix)):
            scripts[label] = tmp / f"{label}.lua"
            scripts[label].write_text(bench_run.wrk_script(tokens, authorization, bench_run.FHIR_PATH))
        url = f"{{origin}}{bench_run.FHIR_PATH}"
        figures = {
            "bare": measure("bare", bare.pid, url.format(origin=f"http://127.0.0.1:{bare_port}"), scripts["warm"],
                            scripts["mix"], args.duration, out_prefix),
            "mediator": measure("mediator", mediator.pid, url.format(origin=origin), scripts["warm"],
                                scripts["mix"], args.duration, out_prefix),
        }
    finally:
        processes.stop_all()
        bench_run.delete_redis_keys(f"bench-{run_id}:")
    bare_ipr = figures["bare"]["instructions_per_request"]
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')}  callgrind, one process each, wrk -c4 for {args.duration} s; "
          f"token mix: {mix.describe()}; rate limits one Redis round trip per request")
    print("| target | requests | instructions/request | × bare |\n|---|---:|---:|---:|")
    for name, row in figures.items():
        print(f"| {name} | {row['requests']:.0f} | {row['instructions_per_request']:,.0f} | "
              f"{row['instructions_per_request'] / bare_ipr:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    if args.dumps:
        args.dumps.mkdir(parents=True, exist_ok=True)
        for dump in tmp.glob("callgrind.*.*"):
            shutil.copy(dump, args.dumps / dump.name)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
