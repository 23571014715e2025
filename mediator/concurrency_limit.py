"""How many requests may be with openIMIS at once: a fixed number, or one that follows openIMIS's latency.

`GradientLimit` is the `mode: adaptive` controller (README "Adaptive concurrency"). It is Envoy's
adaptive-concurrency gradient controller in its overall shape — a minimum RTT measured in probe windows
at the floor concurrency, and every sampling window a percentile of the answer times compared with it —
with the update rule of Netflix concurrency-limits' Gradient2: the gradient is clamped to [0.5, 1] (it
only ever shrinks the limit, at most by half per window) and growth is additive, by one, and only when
the window actually used the whole limit (an idle upstream does not earn a larger limit).

Why not Envoy's update (limit × gradient + √limit): in front of openIMIS's few sync workers the limit
lives between 1 and a handful, where √limit of headroom is a whole extra worker's worth of queue.
Why not Gradient2's long-term average RTT as the baseline: under a sustained flood that average drifts
up with the queue it should detect; the periodic minimum-RTT probe does not.

With `adaptive.latency_probe`, a second signal: the answer times of a cheap read the mediator sends
itself (mediator/latency_probe.py), each over its baseline: the same percentile of the probe's answers
while no API request was with openIMIS (`IdleReference`: what a web user gets when the mediator sends
nothing), so that a window's verdict compares like with like. The baseline used before, and still until
enough idle answers have settled, the fastest answer of the last baseline_window_s, is one the probe's
own spread exceeds: on a box whose probe answered in 43–90 ms with nothing in flight, "the slower of two
probes over 1.5 × the fastest of two minutes" objected in idle windows and walked the limit to its floor
with no API traffic at all (README "Load protection against the real openIMIS", run 25).
The API requests' own times are a poor signal for what openIMIS's web users feel — a claim is slow
anyway, and it loads openIMIS's CPU and database more than its own answer time shows — whereas the probe
waits for a free openIMIS worker and shares its CPU exactly as a web user's request does. Like Envoy's
minRTT windows this is a measurement of openIMIS, not of the traffic; unlike them it needs no dip to
the floor, because the probe is not API traffic. A window's verdict is the stricter of the two
gradients, so either signal lowers the limit (of every kind: there is one limit per upstream) and the
limit grows only when neither objects and, if the probe answered in the window, one of its answers was
out while an API request was with openIMIS (an answer in a duty cycle's pause is no evidence for more).

Pure and single-threaded: `clock` is injectable, nothing here does I/O, so tests drive it step by step.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from mediator.config.models import BulkheadConfig

IDLE_REFERENCE_LAG_S = 30.0
"""How old an idle answer of the latency probe must be to count in its reference (at most a quarter of
baseline_window_s)."""
FLOOR_WINDOWS_BEFORE_PROBE = 5
"""Windows in a row at the floor after which the minimum RTT is measured again (Envoy does the same):
the unloaded time may have grown for good (a bigger database), and a stale low minimum would pin the
limit to the floor for ever."""


class ConcurrencyLimit(Protocol):
    @property
    def value(self) -> float:
        """The limit: average requests in flight; below 1 a duty cycle (see BulkheadConfig.min_concurrent)."""
        ...

    @property
    def current(self) -> int:
        """Requests that may be in flight at once now: the limit rounded down, at least 1."""
        ...

    @property
    def min_rtt_s(self) -> float | None:
        """The unloaded answer time in use (None: not measured, or not measuring)."""
        ...

    def saturated(self) -> None:
        """A request found every slot taken (the window used the whole limit)."""

    def record(self, rtt_s: float, kind: str = "") -> None:
        """openIMIS answered (or timed out) a request of `kind` after `rtt_s` of being sent, not counting
        the queue."""

    def record_latency_probe(self, rtt_s: float, idle: bool = False) -> None:
        """The latency probe (mediator/latency_probe.py) was answered after `rtt_s` (or timed out); `idle`:
        no API request of this instance was with openIMIS while it was out."""

    @property
    def latency_baseline_s(self) -> float | None:
        """The latency probe's baseline (None: no probe answered yet, or no probe)."""
        ...


class WindowedMinimum:
    """The smallest value added in the last `span_s` (a monotonic deque: O(1) amortised per value)."""

    def __init__(self, span_s: float) -> None:
        self.span_s = span_s
        self._values: deque[tuple[float, float]] = deque()

    def add(self, now: float, value: float) -> None:
        while self._values and self._values[-1][1] >= value:
            self._values.pop()
        self._values.append((now, value))
        while self._values[0][0] < now - self.span_s:
            self._values.popleft()

    @property
    def value(self) -> float | None:
        return self._values[0][1] if self._values else None


class IdleReference:
    """The latency probe's answers while no API request was with openIMIS: what its web users get when the
    mediator sends nothing. The last `span_s` of them, but never fewer than the `keep` most recent (a
    flood that keeps a request in flight for minutes leaves no new ones, and the reference must outlast
    it); at most `cap`. Only answers at least `lag_s` old count: a sudden slowdown (a report, many web
    users) is judged against the answers from before it for that long, instead of being taken into the
    reference's upper percentiles within a few answers."""

    def __init__(self, span_s: float, lag_s: float, keep: int = 20, cap: int = 1000) -> None:
        self.span_s = span_s
        self.lag_s = lag_s
        self.keep = keep
        self._values: deque[tuple[float, float]] = deque(maxlen=cap)

    def add(self, now: float, value: float) -> None:
        self._values.append((now, value))
        while len(self._values) > self.keep and self._values[0][0] < now - self.span_s:
            self._values.popleft()

    def settled(self, now: float) -> list[float]:
        """The answers that count now (at least lag_s old)."""
        until = now - self.lag_s
        return [v for t, v in self._values if t <= until]

    def __len__(self) -> int:
        return len(self._values)


class StaticLimit:
    """`mode: static`: `max_concurrent`, always."""

    def __init__(self, limit: int) -> None:
        self._limit = limit

    @property
    def value(self) -> float:
        return float(self._limit)

    @property
    def current(self) -> int:
        return self._limit

    @property
    def min_rtt_s(self) -> float | None:
        return None

    def saturated(self) -> None:
        pass

    def record(self, rtt_s: float, kind: str = "") -> None:
        pass

    def record_latency_probe(self, rtt_s: float, idle: bool = False) -> None:
        pass

    @property
    def latency_baseline_s(self) -> float | None:
        return None


def _percentile(samples: list[float], fraction: float) -> float:
    """Nearest rank: the smallest sample with at least `fraction` of the samples at or below it."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


class GradientLimit:
    """`mode: adaptive`. Starts with a probe (no minimum RTT is known yet)."""

    def __init__(self, config: BulkheadConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.floor = float(config.min_concurrent)
        self.ceiling = float(config.max_concurrent)
        self.params = config.adaptive
        self.limit = float(config.initial_concurrent or config.min_concurrent)
        self.min_rtt: float | None = None
        self.probing = True
        self.probes = 0
        """Minimum-RTT measurements completed (a counter for tests and metrics)."""
        self.baselines: dict[str, float] = {}
        """Unloaded answer time per kind of request (channel:interaction), from the last probes: a claim
        POST and a Patient search differ by several times, so each sample is compared with its own kind's
        (a flood of claims after one of lookups is not mistaken for a queue)."""
        self._clock = clock
        self._samples: list[float] = []
        self._probe_samples: dict[str, list[float]] = {}
        self._ratios: list[float] = []
        self._unknown_kinds = 0
        self._window_started = clock()
        self._used_whole_limit = False
        self._next_probe = 0.0
        self._floor_windows = 0
        probe = self.params.latency_probe
        span = probe.baseline_window_s if probe is not None else 0.0
        self._probe_fastest = WindowedMinimum(span)
        self._probe_idle = IdleReference(span, lag_s=min(IDLE_REFERENCE_LAG_S, span / 4))
        self._probe_ratios: list[float] = []
        self.probe_verdicts = 0
        """Windows whose verdict included the latency probe's (a counter for tests)."""
        self._probe_objects = False
        """The latency probe's last verdict asked for less (openIMIS is slow for its web users)."""
        self._probe_saw_load = False
        """A probe of this window was out while an API request of this instance was with openIMIS."""

    @property
    def value(self) -> float:
        return self.measuring if self.probing else self.limit

    @property
    def measuring(self) -> float:
        """The limit while the minimum RTT is measured: the floor, but at least one request at a time. The
        unloaded answer time is that of a request alone; a duty cycle below 1 only adds pauses between
        such requests, which change nothing in what is measured but make the measurement last 1/floor
        times longer (at a floor of 0.1, ten claims took ~15 s at a tenth of the admitted rate, every
        `probe_interval_s`).

        Unless the latency probe objects (its last window, before or during the measurement, found
        openIMIS slow): then the measurement goes on at the limit's own duty cycle, slower but without
        keeping a request in flight all the time. Ten claims one after the other were 2–4 s of a claim
        always in flight, at the start of every flood after a quiet minute and once a minute during one,
        and that is where the web users' slow answers clustered (bench/openimis_load.py, run 13)."""
        unloaded = min(self.ceiling, max(self.floor, 1.0))
        return max(self.floor, min(unloaded, self.limit)) if self._probe_objects else unloaded

    @property
    def current(self) -> int:
        return max(1, int(self.value))

    @property
    def min_rtt_s(self) -> float | None:
        return self.min_rtt

    @property
    def idle_probe_answers(self) -> int:
        """The latency probe's answers in the idle reference now (for tests)."""
        return len(self._probe_idle)

    IDLE_REFERENCE_SAMPLES = 10
    """Settled idle answers needed before the latency probe is judged against them (before: against its
    fastest answer, as every answer was before the reference existed)."""

    @property
    def latency_baseline_s(self) -> float | None:
        """The probe's `percentile` while the API was idle (like for like: a window's probes at that
        percentile against the same percentile with no API load), from IDLE_REFERENCE_SAMPLES idle answers
        at least the reference's lag old; until then its fastest answer of the last baseline_window_s."""
        probe = self.params.latency_probe
        if probe is not None:
            settled = self._probe_idle.settled(self._clock())
            if len(settled) >= self.IDLE_REFERENCE_SAMPLES:
                return _percentile(settled, probe.percentile)
        return self._probe_fastest.value

    def saturated(self) -> None:
        self._used_whole_limit = True

    def record_latency_probe(self, rtt_s: float, idle: bool = False) -> None:
        now = self._clock()
        self._probe_fastest.add(now, rtt_s)
        if idle:
            self._probe_idle.add(now, rtt_s)
        else:
            self._probe_saw_load = True
        # Every answer is judged, an idle one too: openIMIS slow for other reasons (a report) lowers the
        # limit until the reference has followed it (its lag, then its percentile of baseline_window_s).
        baseline = self.latency_baseline_s
        if baseline is not None and baseline > 0:
            self._probe_ratios.append(rtt_s / baseline)
        # The probe closes windows by itself: a flood of slow claims at a duty cycle answers too rarely
        # for min_samples per window, and the probe's verdict must not wait for them.
        if now - self._window_started >= self.params.window_s:
            if self.probing:
                self._judge_measurement(now)
            else:
                self._close_window(now)

    def _probe_gradient(self) -> float | None:
        """The latency probe's verdict on the window (None: no probe answer in it), remembered for
        `measuring`."""
        probe = self.params.latency_probe
        if probe is None or not self._probe_ratios:
            return None
        self.probe_verdicts += 1
        gradient = _gradient(probe.tolerance, _percentile(self._probe_ratios, probe.percentile))
        self._probe_objects = gradient < 1.0
        return gradient

    def _judge_measurement(self, now: float) -> None:
        """While the minimum RTT is measured, the latency probe still judges every window: its objection
        lowers the limit (as in any window) and slows the measurement to that limit (`measuring`). The
        measurement's samples are kept."""
        gradient = self._probe_gradient()
        if gradient is None:
            return
        self.limit = max(self.floor, self.limit * gradient)   # 1.0 (no objection) leaves it
        self._probe_ratios.clear()
        self._probe_saw_load = False
        self._window_started = now

    def record(self, rtt_s: float, kind: str = "") -> None:
        now = self._clock()
        if self.probing:
            self._samples.append(rtt_s)
            self._probe_samples.setdefault(kind, []).append(rtt_s)
            if len(self._samples) >= self.params.probe_samples:
                self.min_rtt = _percentile(self._samples, self.params.percentile)
                for measured, samples in self._probe_samples.items():
                    self.baselines[measured] = _percentile(samples, self.params.percentile)
                self.probing = False
                self.probes += 1
                self._next_probe = now + self.params.probe_interval_s
                self._start_window(now)
            return
        baseline = self.baselines.get(kind)
        if baseline is None:
            # A kind no probe has measured: no verdict from it; enough of them call for a probe.
            self._unknown_kinds += 1
        elif baseline > 0:
            self._ratios.append(rtt_s / baseline)
        if now - self._window_started >= self.params.window_s and \
                (len(self._ratios) >= self.params.min_samples or self._unknown_kinds >= self.params.min_samples):
            self._close_window(now)

    def _start_window(self, now: float) -> None:
        self._samples.clear()
        self._probe_samples.clear()
        self._ratios.clear()
        self._probe_ratios.clear()
        self._probe_saw_load = False
        self._unknown_kinds = 0
        self._window_started = now
        self._used_whole_limit = False

    def _start_probe(self, now: float) -> None:
        self._floor_windows = 0
        self.probing = True
        self._start_window(now)

    def _close_window(self, now: float) -> None:
        api_verdict = len(self._ratios) >= self.params.min_samples
        if not api_verdict and self._unknown_kinds >= self.params.min_samples:
            self._start_probe(now)  # mostly kinds without a baseline: measure them
            return
        api_gradient = 1.0
        if api_verdict:
            # The window's answer times, each relative to its kind's unloaded time (1.0: unloaded).
            api_gradient = _gradient(self.params.tolerance, _percentile(self._ratios, self.params.percentile))
        gradient = api_gradient
        probe_gradient = self._probe_gradient()
        if probe_gradient is not None:
            gradient = min(gradient, probe_gradient)
        elif not api_verdict:
            self._start_window(now)  # nothing to judge by: a window without answers
            return
        if gradient >= 1.0:
            # +1 per window; below 1 (a duty cycle) doubling, so a fractional floor is left as fast.
            # Only on evidence that the load is harmless: a window that used the whole limit and, when the
            # probe answered in it, a probe that met API load. At a duty cycle most probes fall into its
            # pauses, where openIMIS has nothing of ours; their silence used to double the limit back
            # within a few windows of every objection (README "Load protection against the real
            # openIMIS", runs 26-29), so a cut did not hold for long.
            earned = self._used_whole_limit and (probe_gradient is None or self._probe_saw_load)
            growth = min(1.0, self.limit) if earned else 0.0
            new_limit = self.limit + growth
        else:
            new_limit = self.limit * gradient
        self.limit = max(float(self.floor), min(float(self.ceiling), new_limit))
        near_floor = self.limit <= self.floor + 0.5 * min(1.0, self.floor)
        # Only the API answers' own verdict calls for measuring their unloaded time again: a floor the
        # latency probe holds says openIMIS is busy, not that the minimum RTT is stale (and a measurement
        # at a duty cycle of slow claims would hold the limit at the floor for many seconds).
        self._floor_windows = self._floor_windows + 1 if near_floor and api_gradient < 1.0 else 0
        if now >= self._next_probe or self._floor_windows >= FLOOR_WINDOWS_BEFORE_PROBE:
            self._start_probe(now)
        else:
            self._start_window(now)


def _gradient(tolerance: float, ratio: float) -> float:
    """How much to scale the limit for a window whose answers took `ratio` × their unloaded time."""
    return max(0.5, min(1.0, tolerance / ratio)) if ratio > 0 else 1.0


def build_limit(config: BulkheadConfig, clock: Callable[[], float] = time.monotonic) -> ConcurrencyLimit:
    return GradientLimit(config, clock) if config.mode == "adaptive" else StaticLimit(config.max_concurrent)
