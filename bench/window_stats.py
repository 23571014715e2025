"""Statistics of bench/openimis_load.py: how far a ratio of two latency percentiles can be trusted when
the samples come in windows (README "Load protection against the real openIMIS"). Standard library only."""

from __future__ import annotations

import random


def percentile(values: list[float], q: float) -> float:
    """Nearest rank (NaN for no values)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered) + 0.5)) - 1))]


def window_samples(timeline: list[tuple[float, float]], windows: list[tuple[str, float, float]],
                   kind: str) -> list[list[float]]:
    """The latencies of `timeline` ((due, ms)), one list per window of `kind` ("idle" | "flood")."""
    return [[ms for due, ms in timeline if begin <= due < end] for w, begin, end in windows if w == kind]


def percentile_ratio_interval(idle: list[list[float]], flood: list[list[float]], q: float,
                              resamples: int = 2000, coverage: float = 0.9, seed: int = 16) -> tuple[float, float]:
    """How far the flood's `q` percentile ÷ the idle `q` percentile can move on this evidence: a window
    bootstrap (each resample draws as many whole windows, with replacement, from each side as it has;
    `coverage` of the resampled ratios lie within the interval). Whole windows, not samples: a collector
    stall of openIMIS comes as a pair of slow answers, and the box's idle latency drifts over minutes, so
    the answers of one window are not independent of one another. Seeded: the same figures give the
    same interval."""
    idle, flood = [w for w in idle if w], [w for w in flood if w]
    if not idle or not flood:
        return float("nan"), float("nan")
    draw = random.Random(seed)
    ratios = []
    for _ in range(resamples):
        idle_q = percentile([ms for w in draw.choices(idle, k=len(idle)) for ms in w], q)
        flood_q = percentile([ms for w in draw.choices(flood, k=len(flood)) for ms in w], q)
        ratios.append(flood_q / idle_q if idle_q else float("nan"))
    ratios.sort()
    tail = (1 - coverage) / 2
    return ratios[int(tail * (resamples - 1))], ratios[int((1 - tail) * (resamples - 1))]


def idle_halves_ratio(idle: list[list[float]], q: float) -> float:
    """The `q` percentile of the odd idle windows ÷ that of the even ones: what the ratio is with no flood
    on either side, the resolution of the comparison on this box."""
    odd = [ms for w in idle[1::2] for ms in w]
    even = [ms for w in idle[0::2] for ms in w]
    return percentile(odd, q) / percentile(even, q) if odd and even else float("nan")
