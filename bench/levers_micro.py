"""The per-call cost of each per-request CPU lever of issue 18, before and after, in one process.

End to end (`bench/run.py`, `bench/levers_ab.py`) a lever worth 1–3 % of a request is below the spread
of this shared 2-core machine; here each replaced piece of work is timed on its own, the checkout given
with `--before` (e.g. main) against this tree, best of 5 repeats, with how often a request of
`bench/run.py` does it (counted with cProfile: user_key 4 times, a decision per stage, ...). The sum is
an estimate of what the levers save per request, not a measurement of a request.

Usage: .venv/bin/python bench/levers_micro.py --before /tmp/base
"""

from __future__ import annotations

import argparse
import importlib
import ipaddress
import json
import logging
import os
import sys
import time
import timeit
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
MODULES = ("mediator.pipeline", "mediator.decision", "mediator.audit", "mediator.addresses", "mediator.metrics")


def load(tree: Path) -> dict[str, ModuleType]:
    for name in list(sys.modules):
        if name == "mediator" or name.startswith("mediator."):
            del sys.modules[name]
    sys.path.insert(0, str(tree))
    try:
        return {name: importlib.import_module(name) for name in MODULES}
    finally:
        sys.path.remove(str(tree))


def per_call_us(work: Callable[[], Any], number: int = 20000) -> float:
    return min(timeit.repeat(work, number=number, repeat=5)) / number * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="a checkout without the levers (its mediator/)")
    args = parser.parse_args()
    old = load(args.before.resolve())
    new = load(HERE.parent)
    sys.path.insert(0, str(HERE.parent))
    from mediator import json_codec
    from mediator.fhir import FhirRequest
    from mediator.request_view import RequestView

    sys.path.insert(0, str(HERE))
    import upstream as bench_upstream

    rows: list[tuple[str, float, float, int]] = []
    principal_args = ("bench-hms", "access_token", "bench.user.1", frozenset({"hms"}), frozenset({"system/*.read"}),
                      frozenset({"BENCH001"}), {})
    voucher = {"vouched_by": "iss=https://idp.bench.invalid"}

    def user_key_reads(module: ModuleType) -> Callable[[], list[str]]:
        def work() -> list[str]:
            principal = module.Principal(*principal_args, **voucher)
            return [principal.user_key for _ in range(4)]   # rate limit, authorization facts, audit, logs
        return work

    now = time.time()
    old_metrics, new_metrics = old["mediator.metrics"].Metrics(), new["mediator.metrics"].Metrics()
    old_allow = old["mediator.decision"].Decision.allowed("ip.allowed")
    new_allow = new["mediator.decision"].Decision.allowed("ip.allowed")
    bundle = json.loads(bench_upstream.bundle_body(8000))
    exchange = new["mediator.pipeline"].Exchange(RequestView.described("GET", "/fhir/Medication/"), "0" * 32)
    exchange.client_ip = ipaddress.ip_address("127.0.0.1")
    exchange.fhir = FhirRequest("search-type", "Medication", None, "Medication")
    exchange.principal = new["mediator.pipeline"].Principal(*principal_args, **voucher)
    event = new["mediator.audit"].audit_event(exchange, 200, "upstream.answered", now)
    access_line = {"ts": "2026-12-01T12:00:00.000Z", "level": "INFO", "logger": "mediator.access",
                   "request_id": "0" * 32, "event": {
                       "request_id": "0" * 32, "client_ip": "127.0.0.1", "method": "GET", "channel": "master-data",
                       "interaction": "search-type", "resource_type": "Medication", "status": 200,
                       "reason": "upstream.answered", "ms": 1.23}}
    cases: list[tuple[str, Callable[[], Any], Callable[[], Any], int]] = [
        ("Principal built, user_key read 4 times", user_key_reads(old["mediator.pipeline"]),
         user_key_reads(new["mediator.pipeline"]), 1),
        ("Decision.allowed", lambda: old["mediator.decision"].Decision.allowed("x.y"),
         lambda: new["mediator.decision"].Decision.allowed("x.y"), 10),
        ("stage decision counted (metrics)", lambda: old_metrics.record("ip", old_allow),
         lambda: new_metrics.record("ip", new_allow), 12),
        ("audit 'recorded' time", lambda: datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds"),
         lambda: new["mediator.audit"].recorded_time(now), 1),
        ("peer address parsed", lambda: old["mediator.addresses"].parse_ip("127.0.0.1"),
         lambda: new["mediator.addresses"].parse_ip("127.0.0.1"), 1),
        ("request id", lambda: uuid.uuid4().hex, lambda: os.urandom(16).hex(), 1),
        ("rewritten Bundle serialised (789 B)",
         lambda: json.dumps(bundle, ensure_ascii=False, separators=(",", ":")).encode(),
         lambda: json_codec.dumps(bundle), 1),
        ("audit event serialised", lambda: json.dumps(event, separators=(",", ":"), ensure_ascii=False),
         lambda: json_codec.dumps_text(event), 1),
        ("access line serialised", lambda: json.dumps(access_line, separators=(",", ":"), default=str),
         lambda: json_codec.dumps_ascii(access_line), 1),
    ]
    logging.disable(logging.CRITICAL)
    print(f"| {'work':40} | {'before µs':>9} | {'after µs':>8} | per request | saved µs/request |")
    print("|" + "|".join("-" * (w + 2) for w in (40, 9, 8, 11, 16)) + "|")
    for label, before, after, count in cases:
        a, b = per_call_us(before), per_call_us(after)
        rows.append((label, a, b, count))
        print(f"| {label:40} | {a:9.2f} | {b:8.2f} | {count:11d} | {count * (a - b):16.1f} |")
    print(f"estimated saving per request: {sum(c * (a - b) for _, a, b, c in rows):.0f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
