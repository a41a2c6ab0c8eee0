"""Prometheus metrics for `/metrics` (LoRAX's own set in `server/metrics_lorax.py`), in a registry of their own so several apps can live in one process.

Two sets, one series per quantity:

- `lorax_*`: LoRAX router's names and types (request counts and latency split, queue length,
  batch size, forward passes), rendered as LoRAX renders them so LoRAX dashboards work unchanged.
  A quantity LoRAX names is exported under LoRAX's name only.
- `loraserve_*`: what LoRAX has no name for (adapter cache, KV blocks, slots, Medusa acceptance,
  time to first token, inter-token latency). Monotonic counts are counters (`*_total`), levels
  are gauges, latencies histograms.

`/metrics` answers LoRAX's JSON form for `Accept: application/json` or `?format=json`.
"""

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

from loraserve.server.metrics_lorax import (
    MAX_PENDING_ADMISSIONS,
    TRACE,
    LoraxMetrics,
    LoraxRequestMetrics,
    RequestTrace,
    failure_label,
    text_to_json,
)

OTHER_ADAPTER_LABEL = "other"
BASE_ADAPTER_LABEL = "<base>"
MAX_LABEL_CHARS = 200
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
_RATE_WINDOW_S = 10.0

#: Engine statistics that only ever grow: exported as counters (`loraserve_engine_<key>_total`) so
#: `rate()` and `increase()` work on them and a restart reads as a counter reset, not a drop.
ENGINE_COUNTERS = frozenset(
    {
        "steps",
        "preemptions",
        "adapter_loads",
        "adapter_evictions",
        # KV blocks reused from, computed past, and evicted from the prefix cache (block_manager.py)
        "prefix_cache_hits",
        "prefix_cache_misses",
        "prefix_cache_evictions",
    }
)
#: Engine statistics another series already carries; exporting them again made two series for one
#: number. waiting/running: `lorax_queue_length`/`lorax_batch_current_size` (LoRAX's names, which
#: its dashboards read); batch_size (last step's size): `lorax_batch_current_size`; spec_*:
#: `loraserve_speculative_{steps,tokens}_total`; tokens_generated: `loraserve_generated_tokens_total`;
#: tokens_per_s: `loraserve_generated_tokens_per_second`.
ENGINE_ELSEWHERE = frozenset(
    {"waiting", "running", "batch_size", "spec_steps", "spec_tokens", "tokens_generated", "tokens_per_s"}
)
#: Adapter-store statistics that only ever grow (the rest, e.g. host_bytes, go up and down).
ADAPTER_CACHE_COUNTERS = frozenset(
    {
        "hits",
        "misses",
        "loads",
        "load_failures",
        "loaded_bytes",
        "auth_checks",
        "auth_failures",
        "shared_loads",
        "host_evictions",
        "merges_run",
    }
)


class _LiveStats(Collector):
    """Reads engine and adapter-cache state at scrape time, so the numbers are never stale.

    Each statistic is typed by what it is: monotonic counts are counters, levels are gauges.
    """

    def __init__(self, owner: ServerMetrics) -> None:
        self._owner = owner

    def collect(self) -> Iterable[Metric]:
        o = self._owner
        engine = o.engine_stats() if o.engine_stats else {}
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
            if key in ENGINE_ELSEWHERE or not _is_number(value):
                continue
            family = CounterMetricFamily if key in ENGINE_COUNTERS else GaugeMetricFamily
            yield family(f"loraserve_engine_{key}", f"Engine statistic `{key}`", value=float(value))
        yield from _speculation(engine)
        cache = o.adapter_stats() if o.adapter_stats else {}
        for key in ("hits", "misses", "loads"):
            yield CounterMetricFamily(
                f"loraserve_adapter_cache_{key}", f"Adapter cache {key}", value=float(cache.get(key, 0))
            )
        for key, value in sorted(cache.items()):
            if key in ("hits", "misses", "loads") or not _is_number(value):
                continue
            family = CounterMetricFamily if key in ADAPTER_CACHE_COUNTERS else GaugeMetricFamily
            yield family(f"loraserve_adapter_cache_{key}", f"Adapter cache `{key}`", value=float(value))
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


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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


# ---- LoRAX's metric names --------------------------------------------------------------------
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
            "Time from handing a sequence to the engine to its first token (engine queue + prefill)",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        # Request latency is `lorax_request_duration` (every generation route, LoRAX's buckets).
        self.engine_stats: Callable[[], dict[str, Any]] | None = None
        self.adapter_stats: Callable[[], dict[str, Any]] | None = None
        self.disk_stats: Callable[[], dict[str, int]] | None = None  # the adapter disk cache, if any
        self.in_flight: Callable[[], int] | None = None
        self.started_at = time.time()
        self.inter_token_latency = Histogram(
            "loraserve_inter_token_latency_seconds",
            "Time between consecutive tokens of a sequence (a step that emits k tokens counts k gaps "
            "of 1/k of it)",
            buckets=ITL_BUCKETS,
            registry=self.registry,
        )
        self._events: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()
        self.registry.register(_LiveStats(self))
        self.lorax = LoraxMetrics()
        self.lorax.queue_length.read = lambda: self._engine_stat("waiting")
        self.lorax.batch_current_size.read = lambda: self._engine_stat("running")
        self.lorax.batch_current_max_tokens.read = lambda: (
            float(self._batch_max_tokens) if self._engine_stat("running") else 0.0
        )
        self._batch_max_tokens = 0
        # request id -> perf_counter() of its first forward pass, until its first output claims it
        self._admitted: OrderedDict[str, float] = OrderedDict()

    def _engine_stat(self, key: str) -> float:
        value = (self.engine_stats() if self.engine_stats else {}).get(key, 0)
        return float(value) if _is_number(value) else 0.0

    # ---- wiring ---------------------------------------------------------------------------------
    def install(self, app: Any, engine: Any) -> None:
        """Add the request middleware to `app` and time `engine`'s forward passes.

        One call from the app factory, so the routes and the engine need no metrics code.
        """
        app.add_middleware(LoraxRequestMetrics, metrics=self)
        self.watch_engine(engine)

    def watch_engine(self, engine: Any) -> None:
        """Observe this engine's forward passes (`Engine.step_observer`) to feed `lorax_batch_*`
        and the admission times behind `lorax_request_queue_duration`. The observer runs on the
        step-loop thread and only takes this object's lock."""
        limits = getattr(engine, "limits", None)
        if limits is not None:
            self.lorax.set_limits(limits.max_input_length, limits.max_total_tokens)
        if hasattr(engine, "step_observer"):
            engine.step_observer = self._forward_pass

    def _forward_pass(self, rec: Any) -> None:
        lorax = self.lorax
        if rec.admitted:
            with self._lock:
                for request_id in rec.admitted:
                    self._admitted[request_id] = rec.started
                while len(self._admitted) > MAX_PENDING_ADMISSIONS:  # aborted before any output
                    self._admitted.popitem(last=False)
        self._batch_max_tokens = rec.max_tokens
        lorax.batch_inference_count.inc(method=rec.kind)
        if not rec.ok:
            lorax.batch_inference_failure.inc(method=rec.kind)
            return
        lorax.batch_inference_duration.observe(rec.seconds, method=rec.kind)
        lorax.batch_inference_success.inc(method=rec.kind)

    # ---- request hooks (called from generation.py) ------------------------------------------------
    def request_validated(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """A request passed validation: LoRAX records its input length and max_new_tokens here,
        whatever happens to the request later."""
        self.lorax.request_input_length.observe(float(prompt_tokens))
        self.lorax.request_max_new_tokens.observe(float(max_new_tokens))
        trace = TRACE.get()
        if trace is not None and trace.validated is None:
            trace.validated = time.perf_counter()

    def request_output(self, out: Any) -> None:
        """One engine output of a sequence: admission, inter-token latency and skipped tokens."""
        now = time.perf_counter()
        n = len(out.tokens)
        with self._lock:
            admitted = self._admitted.pop(out.request_id, None)
        trace = TRACE.get()
        if (
            trace is not None
            and admitted is not None
            and (trace.admitted is None or admitted < trace.admitted)
        ):
            trace.admitted = admitted
        if not n:
            return
        # drafts only: a decode burst (engine/decode_bursts.py) emits several tokens too
        self.lorax.request_skipped_tokens.observe(float(sum(t.skipped for t in out.tokens)))
        if trace is None:
            return
        previous = trace.last_token_at.get(out.request_id)
        if previous is not None:
            gap = (now - previous) / n
            for _ in range(n):
                self.inter_token_latency.observe(gap)
        if out.finished:
            trace.last_token_at.pop(out.request_id, None)
        else:
            trace.last_token_at[out.request_id] = now
        trace.last_token = now
        trace.generated_tokens += n

    def request_finished(
        self, trace: RequestTrace, status: int, finished: float | None, error: str | None
    ) -> None:
        """The response is over: count its outcome and, for a success, LoRAX's latency split."""
        lorax = self.lorax
        if not 200 <= status < 300:
            lorax.request_failure.inc(err=failure_label(status))
            return
        if error is not None:
            lorax.request_failure.inc(err=error)
            return
        if finished is None:  # the client left before the last byte
            lorax.request_failure.inc(err="dropped")
            return
        lorax.request_success.inc()
        validated = trace.validated if trace.validated is not None else trace.start
        end = trace.last_token if trace.last_token is not None else finished
        admitted = trace.admitted if trace.admitted is not None else min(validated, end)
        inference = max(end - admitted, 0.0)
        lorax.request_duration.observe(finished - trace.start)
        lorax.request_validation_duration.observe(validated - trace.start)
        lorax.request_queue_duration.observe(max(admitted - validated, 0.0))
        lorax.request_inference_duration.observe(inference)
        if trace.generated_tokens:
            lorax.request_mean_time_per_token_duration.observe(inference / trace.generated_tokens)
        lorax.request_generated_tokens.observe(float(trace.generated_tokens))

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
        """Prometheus text: loraserve's own families, then LoRAX's under LoRAX's names."""
        return generate_latest(self.registry) + self.lorax.render().encode()

    def render_json(self) -> dict[str, dict[str, Any]]:
        """The JSON LoRAX answers to `Accept: application/json` (see `text_to_json`)."""
        return text_to_json(self.render().decode())
