"""What one lever gives: the CPU per request of several mediator checkouts at the same fixed request rate,
interleaved, in one run (README "Benchmarks": per-request CPU levers).

`bench/run.py` measures at saturation, where the mediator shares the two cores with the load generator,
the upstream and Redis, and its CPU per request moves by ±20 % between rounds of the same code: too much
to see a lever worth 3 %. Here each checkout runs one worker process with `bench/run.py`'s full pipeline
(the same configuration, reconciled rate limits), loaded by h2load (C) at a fixed rate well below
saturation, and the figure is that worker's CPU (user + system, /proc) ÷ requests answered; every round
visits the checkouts in a new order, and the median of the rounds is kept (each round is printed), with
the median of each round's ratio to the first checkout (the machine's drift between rounds cancels out).
h2load sends one repeated user token (its headers are fixed): the fresh-token share of bench/run.py's mix
costs every checkout the same and is left out.

Usage: .venv/bin/python bench/levers_ab.py --variant base=/tmp/base --variant lever=/work/tree [--rate 300]
       [--duration 5] [--rounds 5] [--json F]     DIR: a checkout (its `mediator/` is imported first)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402  (bench/run.py: configuration, processes, tokens)


def measure(name: str, process: subprocess.Popen[bytes], url: str, headers: dict[str, str], rate: float,
            duration: int, connections: int) -> dict[str, float]:
    argv = ["h2load", "--h1", "-t1", f"-c{connections}", f"--rps={rate / connections:.3f}", f"-D{duration}"]
    for key, value in headers.items():
        argv += ["-H", f"{key}: {value}"]
    load = os.getloadavg()[0]
    before = bench.process_group_cpu_s(process.pid)
    out = subprocess.run(argv + [url], capture_output=True, text=True, timeout=duration + 30).stdout
    cpu = bench.process_group_cpu_s(process.pid) - before
    found = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
    if found is None:
        raise SystemExit(f"{name}: h2load gave no summary:\n{out[-2000:]}")
    done, succeeded = int(found.group(1)), int(found.group(2))
    return {"requests": succeeded, "errors": done - succeeded, "cpu_s": cpu, "load_average": load}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", required=True, metavar="LABEL=DIR")
    parser.add_argument("--rate", type=float, default=300, help="requests per second (well below saturation)")
    parser.add_argument("--duration", type=int, default=5, help="seconds per measurement (max 30)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (max 9); the median is kept")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not 1 <= args.duration <= 30 or not 1 <= args.rounds <= 9 or not 1 <= args.rate <= 5000:
        parser.error("keep it bounded: duration 1..30 s, rounds 1..9, rate 1..5000 req/s")
    if shutil.which("h2load") is None:
        parser.error("needs h2load on PATH (`make bench` installs nghttp2-client)")
    variants: list[tuple[str, Path]] = []
    for item in args.variant:
        label, _, folder = item.partition("=")
        if not label or not Path(folder, "mediator").is_dir():
            parser.error(f"--variant {item}: LABEL=DIR, DIR a checkout with mediator/")
        variants.append((label, Path(folder).resolve()))

    keys = bench.installed_policy_keys()
    features = [f for f in bench.FEATURES if f.present(keys)]
    run_id = uuid.uuid4().hex[:12]
    processes = bench.Processes()
    tmp = Path(tempfile.mkdtemp(prefix="mediator-ab-"))
    try:
        upstream_port = bench.free_port()
        upstream = processes.start([sys.executable, str(HERE / "upstream.py"), "--port", str(upstream_port)],
                                   tmp / "upstream.log")
        bench.wait_for_200(f"http://127.0.0.1:{upstream_port}/api/api_fhir_r4/Medication/", upstream,
                           tmp / "upstream.log")
        env = dict(os.environ, OPENIMIS_USERNAME="bench", OPENIMIS_PASSWORD="bench")
        started: dict[str, tuple[subprocess.Popen[bytes], str, dict[str, str]]] = {}
        for label, source in variants:
            port = bench.free_port()
            root = tmp / label
            bench.write_mediator_config(root, port, upstream_port, features,
                                        {"metrics_port": str(bench.free_port()), "run_id": run_id}, None, True)
            process = processes.start(
                [sys.executable, "-m", "mediator", "--log-level", "INFO", "serve", "--config", str(root),
                 "--workers", "1"], tmp / f"{label}.log", env=dict(env, PYTHONPATH=str(source)))
            bench.wait_for_200(f"http://127.0.0.1:{port}/healthz", process, tmp / f"{label}.log")
            origin = f"http://127.0.0.1:{port}"
            headers = {"Accept": "application/fhir+json",
                       "Authorization": f"Bearer {bench.BENCH_IDENTITY.access_token(origin)}",
                       "X-User-Token": bench.BENCH_IDENTITY.user_token(f"{origin}/fhir/", "bench.user.0")}
            url = f"{origin}{bench.FHIR_PATH}"
            bench.fetch(url, headers)  # admitted before any load
            started[label] = (process, url, headers)
        print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')}  load average "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; one worker each, full pipeline "
              f"({', '.join(f.name.split(' (')[0] for f in features)}); h2load -c{args.connections} at "
              f"{args.rate:.0f} req/s, {args.duration} s, {args.rounds} rounds in shuffled order; "
              f"GET {bench.FHIR_PATH}")
        rounds: dict[str, list[dict[str, float]]] = {label: [] for label, _ in variants}
        order = [label for label, _ in variants]
        for _ in range(args.rounds):
            random.shuffle(order)
            for label in order:
                process, url, headers = started[label]
                rounds[label].append(measure(label, process, url, headers, args.rate, args.duration,
                                             args.connections))
        print(f"| {'checkout':16} | {'CPU µs/request (median)':>23} | {'change':>7} | "
              f"{'× first (median of rounds)':>26} | each round (µs/request) | errors | load |")
        print("|" + "|".join("-" * (w + 2) for w in (16, 23, 7, 26, 23, 6, 4)) + "|")
        results: dict[str, dict[str, object]] = {}
        previous = None
        first: list[float] = []
        for label, _ in variants:
            per = [1e6 * r["cpu_s"] / max(r["requests"], 1) for r in rounds[label]]
            first = first or per
            median = statistics.median(per)
            # Against the first checkout in the same round: the drift of the machine between rounds cancels out.
            ratio = statistics.median(v / f for v, f in zip(per, first, strict=True))
            change = f"{median - previous:+.0f}" if previous is not None else ""
            errors = sum(int(r["errors"]) for r in rounds[label])
            load = statistics.mean(r["load_average"] for r in rounds[label])
            print(f"| {label:16} | {median:23.0f} | {change:>7} | {ratio:26.3f} | "
                  f"{' / '.join(f'{v:.0f}' for v in per):23} | {errors:6d} | {load:4.1f} |")
            results[label] = {"cpu_us_per_request": round(median, 1), "ratio_to_first": round(ratio, 3),
                              "rounds": [round(v, 1) for v in per], "errors": errors, "load_average": round(load, 2)}
            previous = median
        if args.json:
            args.json.write_text(json.dumps({"rate": args.rate, "duration": args.duration, "results": results},
                                            indent=2))
        return 1 if any(r["errors"] for r in results.values()) else 0
    finally:
        processes.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
        bench.delete_redis_keys(f"bench-{run_id}:")


if __name__ == "__main__":
    sys.exit(main())
