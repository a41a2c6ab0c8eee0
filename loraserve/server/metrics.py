"""Prometheus metrics for `/metrics`, in a registry of their own so several apps can live in one process."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

OTHER_ADAPTER_LABEL = "other"
BASE_ADAPTER_LABEL = "<base>"
MAX_LABEL_CHARS = 200
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
            "Sequences holding a concurrency slot (best_of and n count each sequence)",
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
        disk = o.disk_stats() if o.disk_stats else None
        if disk is not None:
            yield GaugeMetricFamily(
                "loraserve_adapter_disk_cache_bytes",
                "Bytes of downloaded adapters on disk (bounded by --adapter-disk-cache-bytes)",
                value=float(disk.get("bytes", 0)),
            )
            yield CounterMetricFamily(
                "loraserve_adapter_disk_cache_evictions",
                "Downloaded adapters deleted to stay within --adapter-disk-cache-bytes",
                value=float(disk.get("evictions", 0)),
            )


def canonical_adapter_id(key: str) -> str:
    """The adapter's identity without source and revision: `local:/abs/path@rev` -> `/abs/path`.

    The store keys every adapter as `source:id@revision` with the id already canonical (a local
    path resolved, a hub repo without its `@branch`), so every spelling a caller used (`dir/.`,
    `dir//`, `repo@main`) maps to one label and one listing entry instead of one each.
    """
    head, at, _revision = key.rpartition("@")
    if not at:
        head = key
    _source, colon, ident = head.partition(":")
    return ident if colon and ident else key


def adapter_label(adapter_id: str) -> str:
    """A bounded Prometheus label for an id: a path spelled `dir/./x` or `dir//x` as `dir/x`, and
    anything longer than `MAX_LABEL_CHARS` cut with a digest of the whole, so one request cannot
    put a megabyte-long label into every scrape."""
    if adapter_id.startswith(("/", "./", "~")):
        adapter_id = os.path.normpath(adapter_id)
    if len(adapter_id) > MAX_LABEL_CHARS:
        digest = hashlib.sha256(adapter_id.encode()).hexdigest()[:16]
        adapter_id = f"{adapter_id[: MAX_LABEL_CHARS - 19]}...{digest}"
    return adapter_id


class _TopAdapterLabels:
    """Per-adapter request counts with at most `limit` labels; the rest are summed under `other`.

    A new adapter arriving when the table is full evicts the entry with the fewest requests (the
    least recently used among equals) and its count moves to `other`, so heavy adapters keep their
    own series, `other` only grows (it stays a valid counter) and a flood of distinct ids costs a
    bounded number of series instead of one each forever.
    """

    def __init__(self, limit: int) -> None:
        self.limit = max(0, limit)
        self._counts: dict[str, list[int]] = {}  # label -> [count, last use]
        self._other = 0
        self._tick = 0
        self._lock = threading.Lock()

    def inc(self, label: str) -> None:
        with self._lock:
            self._tick += 1
            entry = self._counts.get(label)
            if entry is None:
                if self.limit == 0:
                    self._other += 1
                    return
                if len(self._counts) >= self.limit:
                    victim = min(
                        (k for k in self._counts if k != BASE_ADAPTER_LABEL),
                        key=lambda k: (self._counts[k][0], self._counts[k][1]),
                        default=None,
                    )
                    if victim is None:
                        self._other += 1
                        return
                    self._other += self._counts.pop(victim)[0]
                entry = self._counts[label] = [0, 0]
            entry[0] += 1
            entry[1] = self._tick

    def snapshot(self) -> tuple[dict[str, int], int]:
        with self._lock:
            return {k: v[0] for k, v in self._counts.items()}, self._other


class _AdapterRequests(Collector):
    def __init__(self, labels: _TopAdapterLabels) -> None:
        self._labels = labels

    def collect(self) -> Iterable[Metric]:
        counts, other = self._labels.snapshot()
        family = CounterMetricFamily(
            "loraserve_adapter_request",
            f"Generation requests per adapter (the {self._labels.limit} busiest by canonical id; "
            f'the rest summed under adapter_id="{OTHER_ADAPTER_LABEL}")',
            labels=["adapter_id"],
        )
        for label, count in sorted(counts.items()):
            family.add_metric([label], float(count))
        if other:
            family.add_metric([OTHER_ADAPTER_LABEL], float(other))
        yield family


class _RecentAdapters:
    """The last `limit` public adapters served, by canonical id, for `/v1/models` (an LRU set)."""

    def __init__(self, limit: int) -> None:
        self.limit = max(0, limit)
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, adapter_id: str) -> None:
        if self.limit == 0:
            return
        with self._lock:
            self._ids[adapter_id] = None
            self._ids.move_to_end(adapter_id)
            while len(self._ids) > self.limit:
                self._ids.popitem(last=False)

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._ids)


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
    def __init__(
        self,
        max_adapter_labels: int = 100,
        max_listed_adapters: int = 100,
        static_adapter_ids: Iterable[str] = (),
    ) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "loraserve_request",
            "HTTP requests by route and status code",
            ["route", "status"],
            registry=self.registry,
        )
        self.adapter_labels = _TopAdapterLabels(max_adapter_labels)
        self.registry.register(_AdapterRequests(self.adapter_labels))
        self.recent_adapters = _RecentAdapters(max_listed_adapters)
        # --adapter-id and --preloaded-adapter-ids: /v1/models lists them as configured already.
        self.static_adapter_ids = frozenset(i for i in static_adapter_ids if i)
        # With LORAX_USE_GLOBAL_HF_TOKEN a caller without a token may load a private hub repo through
        # the server's token: usable by anyone here, but its name is still not for every caller.
        global_hf = (os.environ.get("LORAX_USE_GLOBAL_HF_TOKEN") or "").strip().upper()
        self._unlisted_sources: tuple[str, ...] = ("pbase:", "merged:")
        if global_hf in ("1", "TRUE", "YES", "ON"):
            self._unlisted_sources += ("hub:",)
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
        self.disk_stats: Callable[[], dict[str, int]] | None = None  # the adapter disk cache, if any
        self.in_flight: Callable[[], int] | None = None
        self.started_at = time.time()
        self._events: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()
        self.registry.register(_LiveStats(self))

    def adapter_request(self, adapter_id: str, adapter: Any = None, private: bool = False) -> None:
        """Count one request for an adapter and remember it for `/v1/models` when it is public.

        `adapter` (the resolved `LoraAdapter`) gives the canonical id; without it the id as sent
        is used, normalised and length-capped (merge inputs, Medusa-only static heads). `private`
        (the caller brought a token) keeps the adapter out of the listing other callers see.
        """
        key = getattr(adapter, "key", None)
        canonical = canonical_adapter_id(key) if key else None
        self.adapter_labels.inc(adapter_label(canonical or adapter_id or BASE_ADAPTER_LABEL))
        if (
            key
            and canonical
            and not private
            and not key.startswith(self._unlisted_sources)
            and adapter_id
            and adapter_id not in self.static_adapter_ids
        ):
            self.recent_adapters.add(canonical)

    def listed_adapters(self) -> list[str]:
        return self.recent_adapters.ids()

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
