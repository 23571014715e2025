"""bench/window_stats.py: the intervals printed beside openimis_load.py's ratios must say what the data
can tell apart, or the README's "met / NOT met" readings mean nothing."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

_SPEC = importlib.util.spec_from_file_location(
    "window_stats", Path(__file__).resolve().parents[1] / "bench" / "window_stats.py")
assert _SPEC is not None and _SPEC.loader is not None
window_stats = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(window_stats)


def _windows(draw: random.Random, count: int, per_window: int, median_ms: float) -> list[list[float]]:
    return [[draw.lognormvariate(0, 0.3) * median_ms for _ in range(per_window)] for _ in range(count)]


def test_windows_group_samples_by_due_time_and_kind() -> None:
    windows = [("idle", 0.0, 10.0), ("flood", 10.0, 20.0), ("idle", 21.0, 31.0), ("flood", 31.0, 41.0)]
    timeline = [(1.0, 40.0), (9.9, 41.0), (10.0, 90.0), (20.5, 500.0), (25.0, 42.0), (40.9, 95.0)]
    assert window_stats.window_samples(timeline, windows, "idle") == [[40.0, 41.0], [42.0]]
    assert window_stats.window_samples(timeline, windows, "flood") == [[90.0], [95.0]]


def test_the_same_latency_on_both_sides_gives_an_interval_around_one() -> None:
    draw = random.Random(1)
    idle, flood = _windows(draw, 10, 60, 45.0), _windows(draw, 10, 60, 45.0)
    low, high = window_stats.percentile_ratio_interval(idle, flood, 0.9)
    assert low < 1.0 < high
    assert high - low < 0.5


def test_a_flood_twice_as_slow_is_told_apart_from_the_goal() -> None:
    draw = random.Random(2)
    idle, flood = _windows(draw, 10, 60, 45.0), _windows(draw, 10, 60, 90.0)
    low, high = window_stats.percentile_ratio_interval(idle, flood, 0.9)
    assert 1.5 < low < 2.0 < high


def test_one_stall_in_one_window_widens_the_p99_interval_past_the_goal() -> None:
    """openIMIS's collector stalls: four pairs of 600 ms answers in one flood window of ten decide its p99. The
    point ratio is far above 1.5, but the interval must reach below it (resamples without that window)."""
    draw = random.Random(3)
    idle, flood = _windows(draw, 10, 60, 45.0), _windows(draw, 10, 60, 45.0)
    flood[4] += [600.0, 610.0, 620.0, 630.0, 640.0, 650.0, 660.0, 670.0]
    point = window_stats.percentile([ms for w in flood for ms in w], 0.99) / \
        window_stats.percentile([ms for w in idle for ms in w], 0.99)
    low, high = window_stats.percentile_ratio_interval(idle, flood, 0.99)
    assert point > 1.5
    assert low < 1.5 < high


def test_the_interval_is_repeatable_and_empty_sides_give_nan() -> None:
    draw = random.Random(4)
    idle, flood = _windows(draw, 6, 30, 45.0), _windows(draw, 6, 30, 60.0)
    assert window_stats.percentile_ratio_interval(idle, flood, 0.99) == \
        window_stats.percentile_ratio_interval(idle, flood, 0.99)
    low, high = window_stats.percentile_ratio_interval([], flood, 0.99)
    assert low != low and high != high   # NaN


def test_idle_halves_compare_odd_with_even_windows() -> None:
    idle = [[10.0, 10.0], [20.0, 20.0], [10.0, 10.0], [20.0, 20.0]]
    assert window_stats.idle_halves_ratio(idle, 0.5) == 2.0
    assert window_stats.idle_halves_ratio([[10.0]], 0.5) != window_stats.idle_halves_ratio([[10.0]], 0.5)
