"""What the request stage's parse costs compared with a bare json.loads (the parse it replaced).

    .venv/bin/python bench/request_body_bench.py

Prints, for the verified demo claim and for a batch Bundle of 1000 such claims (about 2.3 MB, above the
default max_body_bytes: an upper bound), the median time of `json.loads` and of `parse_json` (UTF-8
decode, depth scan outside strings, decode with duplicate-key detection, entry count), and the ratio.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from mediator.config.models import LimitsConfig
from mediator.stages.request_body import parse_json

CLAIM = (Path(__file__).parents[1] / "tests" / "openimis" / "data" / "payloads" / "claim-verified.json").read_bytes()


def median_ms(work: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    claim = json.loads(CLAIM)
    bundle = json.dumps({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "POST", "url": "Claim"}, "resource": claim}] * 1000}).encode()
    limits = LimitsConfig.model_validate({"max_body_bytes": 8 * 1_048_576, "max_bundle_entries": 1000})
    print(f"{'body':<28} {'bytes':>9} {'json.loads ms':>14} {'parse_json ms':>14} {'ratio':>6}")
    for name, body, repeat in (("claim-verified.json", CLAIM, 2000), ("batch of 1000 claims", bundle, 20)):
        assert parse_json(body, limits)[1] is None
        plain = median_ms(lambda b=body: json.loads(b), repeat)   # type: ignore[misc]
        ours = median_ms(lambda b=body: parse_json(b, limits), repeat)   # type: ignore[misc]
        # Before the request stage a batch was parsed by rate_limit, authorization and the app: 3x json.loads.
        print(f"{name:<28} {len(body):>9} {plain:>14.3f} {ours:>14.3f} {ours / plain:>6.2f}")


if __name__ == "__main__":
    main()
