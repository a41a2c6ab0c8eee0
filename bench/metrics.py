"""Timing and memory figures shared by every system runner.

Stdlib only: the vLLM runner imports this from its own virtual environment.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no data."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


@dataclass
class RequestTiming:
    """Wall-clock marks of one request, relative to the run's start."""

    arrival_s: float
    token_times_s: list[float] = field(default_factory=list)  # one mark per generated token

    @property
    def ttft_s(self) -> float | None:
        return self.token_times_s[0] - self.arrival_s if self.token_times_s else None

    def itls_s(self, start: float = float("-inf"), end: float = float("inf")) -> list[float]:
        """Gaps between consecutive tokens whose later token falls inside [start, end]."""
        t = self.token_times_s
        return [t[i] - t[i - 1] for i in range(1, len(t)) if start <= t[i] <= end]


@dataclass
class RunResult:
    """One system on one request set; latencies are None where the system cannot report them."""

    system: str
    run: str
    requests: int
    output_tokens: int
    wall_s: float
    tok_s: float
    ttft_p50_ms: float | None = None
    ttft_p99_ms: float | None = None
    itl_p50_ms: float | None = None
    itl_p99_ms: float | None = None
    peak_rss_mb: float | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def summarize(system: str, run: str, timings: list[RequestTiming], wall_s: float, **extra) -> RunResult:
    """Throughput over the whole run plus TTFT/ITL percentiles from per-token marks."""
    tokens = sum(len(t.token_times_s) for t in timings)
    ttfts = [t.ttft_s for t in timings if t.ttft_s is not None]
    itls = [x for t in timings for x in t.itls_s()]
    ms = 1000.0
    return RunResult(
        system=system,
        run=run,
        requests=len(timings),
        output_tokens=tokens,
        wall_s=wall_s,
        tok_s=tokens / wall_s if wall_s > 0 else 0.0,
        ttft_p50_ms=_scaled(percentile(ttfts, 50), ms),
        ttft_p99_ms=_scaled(percentile(ttfts, 99), ms),
        itl_p50_ms=_scaled(percentile(itls, 50), ms),
        itl_p99_ms=_scaled(percentile(itls, 99), ms),
        peak_rss_mb=peak_rss_mb(),
        extra=extra,
    )


def _scaled(x: float | None, k: float) -> float | None:
    return None if x is None else x * k


class Stopwatch:
    """perf_counter relative to a fixed start, so all marks of a run share one origin."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.t0


class TreeRssSampler:
    """Peak RSS of this process plus all its descendants, sampled in a thread.

    vLLM does its work in a child engine process, so `ru_maxrss` of the caller alone
    would under-report it; psutil (a vLLM dependency) walks the process tree.
    """

    def __init__(self, interval_s: float = 0.2) -> None:
        import threading

        self.peak_mb = 0.0
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> TreeRssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak_mb = max(self.peak_mb, total / 2**20)
            self._stop.wait(self._interval)


def write_results(path: str | Path, results: list[RunResult], **meta) -> None:
    Path(path).write_text(json.dumps({"results": [r.to_json() for r in results], **meta}, indent=1))
