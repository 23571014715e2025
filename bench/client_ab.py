"""What the upstream client costs: the bare aiohttp proxy (bench/bare_proxy.py) with aiohttp's
ClientSession against the same proxy with the mediator's thin client (mediator/upstream_client.py), one
worker each, loaded in turn by h2load (C) at a fixed rate well below saturation, rounds in shuffled
order; CPU µs per request = the proxy's CPU (user + system, /proc) ÷ requests answered (README
"Benchmarks": the thin upstream client).

Usage: .venv/bin/python bench/client_ab.py [--rate 600] [--duration 5] [--rounds 7] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import levers_ab  # noqa: E402  (h2load at a fixed rate, CPU from /proc)
import run as bench  # noqa: E402  (processes, ports)

CLIENTS = ("aiohttp", "thin")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=600, help="requests per second (well below saturation)")
    parser.add_argument("--duration", type=int, default=5, help="seconds per measurement (max 30)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds (max 15); the median is kept")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not 1 <= args.duration <= 30 or not 1 <= args.rounds <= 15 or not 1 <= args.rate <= 5000:
        parser.error("keep it bounded: duration 1..30 s, rounds 1..15, rate 1..5000 req/s")
    if shutil.which("h2load") is None:
        parser.error("needs h2load on PATH (`make bench` installs nghttp2-client)")
    processes = bench.Processes()
    tmp = Path(tempfile.mkdtemp(prefix="mediator-client-ab-"))
    try:
        upstream_port = bench.free_port()
        upstream = processes.start([sys.executable, str(HERE / "upstream.py"), "--port", str(upstream_port)],
                                   tmp / "upstream.log")
        base = f"http://127.0.0.1:{upstream_port}/api/api_fhir_r4/"
        bench.wait_for_200(base + "Medication/", upstream, tmp / "upstream.log")
        env = dict(os.environ, PYTHONPATH=str(HERE.parent))
        started = {}
        for client in CLIENTS:
            port = bench.free_port()
            process = processes.start([sys.executable, str(HERE / "bare_proxy.py"), "--port", str(port),
                                       "--upstream", base, "--workers", "1", "--client", client],
                                      tmp / f"{client}.log", env=env)
            url = f"http://127.0.0.1:{port}{bench.FHIR_PATH}"
            bench.wait_for_200(url, process, tmp / f"{client}.log")
            started[client] = (process, url)
        print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')}  load average "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; bare proxy, one worker each; h2load "
              f"-c{args.connections} at {args.rate:.0f} req/s, {args.duration} s, {args.rounds} rounds in "
              f"shuffled order; GET {bench.FHIR_PATH}")
        rounds: dict[str, list[dict[str, float]]] = {client: [] for client in CLIENTS}
        order = list(CLIENTS)
        for _ in range(args.rounds):
            random.shuffle(order)
            for client in order:
                process, url = started[client]
                rounds[client].append(levers_ab.measure(client, process, url, {"Accept": "application/fhir+json"},
                                                        args.rate, args.duration, args.connections))
        per = {c: [1e6 * r["cpu_s"] / max(r["requests"], 1) for r in rounds[c]] for c in CLIENTS}
        saved = [a - t for a, t in zip(per["aiohttp"], per["thin"], strict=True)]
        print("| upstream client | CPU µs/request (median) | each round (µs/request) | errors |")
        print("|---|---:|---|---:|")
        results: dict[str, object] = {}
        for client in CLIENTS:
            errors = sum(int(r["errors"]) for r in rounds[client])
            print(f"| {client} | {statistics.median(per[client]):.0f} | "
                  f"{' / '.join(f'{v:.0f}' for v in per[client])} | {errors} |")
            results[client] = {"cpu_us_per_request": round(statistics.median(per[client]), 1),
                               "rounds": [round(v, 1) for v in per[client]], "errors": errors}
        print(f"saved per request (median of the rounds' differences): {statistics.median(saved):.0f} µs "
              f"(each round: {' / '.join(f'{v:.0f}' for v in saved)})")
        results["saved_us_per_request"] = round(statistics.median(saved), 1)
        if args.json:
            args.json.write_text(json.dumps({"rate": args.rate, "duration": args.duration, "results": results},
                                            indent=2))
        return 1 if any(int(rounds[c][i]["errors"]) for c in CLIENTS for i in range(args.rounds)) else 0
    finally:
        processes.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
