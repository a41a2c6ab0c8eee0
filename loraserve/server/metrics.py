"""Prometheus metrics for `/metrics`, in a registry of their own so several apps can live in one process."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_RATE_WINDOW_S = 10.0


class _LiveStats(Collector):
    """Reads engine and adapter-cache state at scrape time, so the numbers are never stale."""

    def __init__(self, owner: ServerMetrics) -> None:
        self._owner = owner

    def collect(self) -> Iterable[Metric]:
        o = self._owner
        engine = o.engine_stats() if o.engine_stats else {}
        yield GaugeMetricFamily(
            "loraserve_queue_size", "Requests waiting to be scheduled", value=float(engine.get("waiting", 0))
        )
        yield GaugeMetricFamily(
            "loraserve_batch_current_size",
            "Sequences in the running batch",
            value=float(engine.get("running", 0)),
        )
        yield GaugeMetricFamily(
            "loraserve_generated_tokens_per_second",
            f"Generated tokens per second over the last {_RATE_WINDOW_S:.0f}s",
            value=o.token_rate(),
        )
        yield GaugeMetricFamily(
            "loraserve_requests_in_flight",
            "Requests holding a concurrency slot",
            value=float(o.in_flight() if o.in_flight else 0),
        )
        for key, value in sorted(engine.items()):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                yield GaugeMetricFamily(
                    f"loraserve_engine_{key}", f"Engine statistic `{key}`", value=float(value)
                )
        yield from _speculation(engine)
        cache = o.adapter_stats() if o.adapter_stats else {}
        for key in ("hits", "misses", "loads"):
            yield CounterMetricFamily(
                f"loraserve_adapter_cache_{key}", f"Adapter cache {key}", value=float(cache.get(key, 0))
            )
        for key, value in sorted(cache.items()):
            if key not in ("hits", "misses", "loads") and isinstance(value, (int, float)):
                yield GaugeMetricFamily(
                    f"loraserve_adapter_cache_{key}", f"Adapter cache `{key}`", value=float(value)
                )


def _speculation(engine: dict[str, Any]) -> Iterable[Metric]:
    """Medusa acceptance as a counter pair (rate() them for a window) plus the mean since start."""
    steps, tokens = int(engine.get("spec_steps", 0)), int(engine.get("spec_tokens", 0))
    yield CounterMetricFamily(
        "loraserve_speculative_steps", "Verification steps of speculated sequences", value=float(steps)
    )
    yield CounterMetricFamily(
        "loraserve_speculative_tokens",
        "Tokens produced by verification steps (accepted drafts + one corrected or bonus token each)",
        value=float(tokens),
    )
    yield GaugeMetricFamily(
        "loraserve_speculative_tokens_per_step",
        "Mean tokens per verification step since start (1.0 = no draft accepted; 0 before any)",
        value=tokens / steps if steps else 0.0,
    )


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "loraserve_request",
            "HTTP requests by route and status code",
            ["route", "status"],
            registry=self.registry,
        )
        self.adapter_requests = Counter(
            "loraserve_adapter_request",
            "Generation requests per adapter",
            ["adapter_id"],
            registry=self.registry,
        )
        self.generated_tokens = Counter(
            "loraserve_generated_tokens", "Tokens generated", registry=self.registry
        )
        self.ttft = Histogram(
            "loraserve_time_to_first_token_seconds",
            "Time from admission to the first token",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "loraserve_request_duration_seconds",
            "Generation request latency",
            ["route"],
            registry=self.registry,
        )
        self.engine_stats: Callable[[], dict[str, Any]] | None = None
        self.adapter_stats: Callable[[], dict[str, Any]] | None = None
        self.in_flight: Callable[[], int] | None = None
        self.started_at = time.time()
        self._events: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()
        self.registry.register(_LiveStats(self))

    def adapter_request(self, adapter_id: str) -> None:
        self.adapter_requests.labels(adapter_id=adapter_id or "<base>").inc()

    def tokens_generated(self, n: int) -> None:
        self.generated_tokens.inc(n)
        now = time.monotonic()
        with self._lock:
            self._events.append((now, n))
            self._prune(now)

    def _prune(self, now: float) -> None:
        while self._events and now - self._events[0][0] > _RATE_WINDOW_S:
            self._events.popleft()

    def token_rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._prune(now)
            return sum(n for _, n in self._events) / _RATE_WINDOW_S

    def render(self) -> bytes:
        return generate_latest(self.registry)
