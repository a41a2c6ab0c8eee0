"""Prometheus metrics for `/metrics`, in a registry of their own so several apps can live in one process.

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

import bisect
import contextvars
import hashlib
import json
import math
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

OTHER_ADAPTER_LABEL = "other"
BASE_ADAPTER_LABEL = "<base>"
MAX_LABEL_CHARS = 200
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
_RATE_WINDOW_S = 10.0

#: Engine statistics that only ever grow: exported as counters (`loraserve_engine_<key>_total`) so
#: `rate()` and `increase()` work on them and a restart reads as a counter reset, not a drop.
ENGINE_COUNTERS = frozenset({"steps", "preemptions", "adapter_loads", "adapter_evictions"})
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
#
# LoRAX's router records its metrics with Rust's `metrics` crate and renders them with
# `metrics-exporter-prometheus`, whose text differs from prometheus_client's: counters keep their
# bare name (`lorax_request_count`, no `_total`), distributions with configured buckets are
# histograms and the others summaries, and there are no `_created` series. Dashboards built for
# LoRAX query those exact names, so they are rendered here by hand rather than through
# prometheus_client (which would append `_total` to every counter).

#: LoRAX's buckets for every metric whose name ends in `duration`: 0.0001 * 1.5^k, k = 1..35.
LORAX_DURATION_BUCKETS: tuple[float, ...] = tuple(0.0001 * 1.5**k for k in range(1, 36))
SUMMARY_QUANTILES = (0.0, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0)  # metrics-exporter-prometheus's
_SUMMARY_WINDOW_S = 60.0  # its default rolling window (3 buckets of 20 s)
_SUMMARY_MAX_SAMPLES = 10_000
#: Requests whose outcome LoRAX counts in `lorax_request_{count,success,failure}`.
GENERATION_PATHS = frozenset(
    {"/", "/generate", "/generate_stream", "/invocations", "/v1/completions", "/v1/chat/completions"}
)
#: `lorax_request_failure{err=...}` for an error status (LoRAX's labels where one fits).
_FAILURE_LABELS = {408: "incomplete", 422: "validation", 424: "generation", 429: "overloaded"}
_KNOWN_ERROR_TYPES = frozenset({"validation", "generation", "overloaded", "bad_request", "incomplete"})
_MAX_PENDING_ADMISSIONS = 4096


def _linear_buckets(limit: int) -> tuple[float, ...]:
    """LoRAX's token-count buckets: 100 equal steps up to `limit` (max input or total tokens)."""
    limit = max(int(limit), 1)
    return tuple(limit / 100.0 * (x + 1) for x in range(100))


def _fmt(value: float) -> str:
    return floatToGoString(value)


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


class _Family:
    """One LoRAX metric: a name, its Prometheus type and its series by label values."""

    kind = "untyped"

    def __init__(self, name: str, doc: str, labelnames: tuple[str, ...] = ()) -> None:
        self.name, self.doc, self.labelnames = name, doc, labelnames
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        return tuple(str(labels[n]) for n in self.labelnames)

    def lines(self) -> list[str]:
        return [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} {self.kind}"]


class LoraxCounter(_Family):
    kind = "counter"

    def __init__(self, name: str, doc: str, labelnames: tuple[str, ...] = ()) -> None:
        super().__init__(name, doc, labelnames)
        self._values: dict[tuple[str, ...], float] = {} if labelnames else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def lines(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return super().lines() + [f"{self.name}{_labels(self.labelnames, k)} {_fmt(v)}" for k, v in items]


class LoraxGauge(_Family):
    """A level read at scrape time from `read` (the engine's own state, never a stale copy)."""

    kind = "gauge"

    def __init__(self, name: str, doc: str, read: Callable[[], float]) -> None:
        super().__init__(name, doc)
        self.read = read

    def lines(self) -> list[str]:
        return super().lines() + [f"{self.name} {_fmt(float(self.read()))}"]


class LoraxHistogram(_Family):
    kind = "histogram"

    def __init__(
        self, name: str, doc: str, buckets: Iterable[float], labelnames: tuple[str, ...] = ()
    ) -> None:
        super().__init__(name, doc, labelnames)
        self.buckets = tuple(sorted(buckets))
        self._series: dict[tuple[str, ...], list[float]] = {}  # per bucket counts, then sum, count
        if not labelnames:
            self._series[()] = [0.0] * (len(self.buckets) + 2)

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        i = bisect.bisect_left(self.buckets, value)
        with self._lock:
            s = self._series.setdefault(key, [0.0] * (len(self.buckets) + 2))
            if i < len(self.buckets):
                s[i] += 1
            s[-2] += value
            s[-1] += 1

    def count(self, **labels: str) -> float:
        with self._lock:
            s = self._series.get(self._key(labels))
            return s[-1] if s else 0.0

    def lines(self) -> list[str]:
        out = super().lines()
        with self._lock:
            series = sorted((k, list(v)) for k, v in self._series.items())
        for key, s in series:
            running = 0.0
            for bound, n in zip(self.buckets, s, strict=False):
                running += n
                le = 'le="' + _fmt(bound) + '"'
                out.append(f"{self.name}_bucket{_labels(self.labelnames, key, le)} {_fmt(running)}")
            inf = 'le="+Inf"'
            out.append(f"{self.name}_bucket{_labels(self.labelnames, key, inf)} {_fmt(s[-1])}")
            out.append(f"{self.name}_sum{_labels(self.labelnames, key)} {_fmt(s[-2])}")
            out.append(f"{self.name}_count{_labels(self.labelnames, key)} {_fmt(s[-1])}")
        return out


class LoraxSummary(_Family):
    """A distribution LoRAX gives no buckets, which its exporter renders as a summary: quantiles
    over the last minute plus an all-time sum and count."""

    kind = "summary"

    def __init__(self, name: str, doc: str) -> None:
        super().__init__(name, doc)
        self._recent: deque[tuple[float, float]] = deque(maxlen=_SUMMARY_MAX_SAMPLES)
        self._sum = 0.0
        self._count = 0

    def observe(self, value: float) -> None:
        with self._lock:
            self._recent.append((time.monotonic(), value))
            self._sum += value
            self._count += 1

    def lines(self) -> list[str]:
        horizon = time.monotonic() - _SUMMARY_WINDOW_S
        with self._lock:
            while self._recent and self._recent[0][0] < horizon:
                self._recent.popleft()
            values = sorted(v for _, v in self._recent)
            total, count = self._sum, self._count
        out = super().lines()
        if values:  # no quantile at all rather than NaN when the window is empty
            for q in SUMMARY_QUANTILES:
                v = values[min(len(values) - 1, int(q * len(values)))]
                out.append(f'{self.name}{{quantile="{_fmt(q)}"}} {_fmt(v)}')
        out.append(f"{self.name}_sum {_fmt(total)}")
        out.append(f"{self.name}_count {_fmt(float(count))}")
        return out


class LoraxMetrics:
    """LoRAX's router metrics, same names and types, fed by loraserve's request and engine hooks.

    Buckets depend on `max_input_length`/`max_total_tokens` as in LoRAX; `set_limits` fixes them
    once the engine is known (before any request, so no observation is lost).
    """

    def __init__(self) -> None:
        c, h = LoraxCounter, LoraxHistogram
        self.request_count = c("lorax_request_count", "Generation requests received")
        self.request_success = c("lorax_request_success", "Generation requests answered in full")
        self.request_failure = c(
            "lorax_request_failure", "Generation requests that failed, by cause", ("err",)
        )
        d = LORAX_DURATION_BUCKETS
        self.request_duration = h(
            "lorax_request_duration", "Request time in seconds, arrival to last byte", d
        )
        self.request_validation_duration = h(
            "lorax_request_validation_duration", "Seconds from arrival to a validated request", d
        )
        self.request_queue_duration = h(
            "lorax_request_queue_duration",
            "Seconds from validation to the engine's first forward pass for the request "
            "(adapter loading and waiting for batch room included)",
            d,
        )
        self.request_inference_duration = h(
            "lorax_request_inference_duration", "Seconds from the first forward pass to the last token", d
        )
        self.request_mean_time_per_token_duration = h(
            "lorax_request_mean_time_per_token_duration", "Inference seconds per generated token", d
        )
        self.request_generated_tokens = h(
            "lorax_request_generated_tokens", "Tokens generated per request", ()
        )
        self.request_input_length = h("lorax_request_input_length", "Prompt tokens per request", ())
        self.request_max_new_tokens = h("lorax_request_max_new_tokens", "max_new_tokens per request", ())
        self.request_skipped_tokens = LoraxSummary(
            "lorax_request_skipped_tokens",
            "Tokens per engine step and request beyond the first (accepted speculative drafts)",
        )
        self.batch_inference_count = c(
            "lorax_batch_inference_count", "Forward passes started (prefill: admits a request)", ("method",)
        )
        self.batch_inference_success = c(
            "lorax_batch_inference_success", "Forward passes completed", ("method",)
        )
        self.batch_inference_failure = c(
            "lorax_batch_inference_failure", "Forward passes that raised", ("method",)
        )
        self.batch_inference_duration = h(
            "lorax_batch_inference_duration", "Seconds per forward pass", d, ("method",)
        )
        self.queue_length = LoraxGauge("lorax_queue_length", "Requests waiting for the engine", lambda: 0.0)
        self.batch_current_size = LoraxGauge(
            "lorax_batch_current_size", "Sequences in the running batch", lambda: 0.0
        )
        self.batch_current_max_tokens = LoraxGauge(
            "lorax_batch_current_max_tokens",
            "Tokens the running batch may reach: prompt + max_new_tokens summed over its sequences",
            lambda: 0.0,
        )
        self.set_limits(2048, 4096)

    def set_limits(self, max_input_length: int, max_total_tokens: int) -> None:
        self.request_input_length.buckets = _linear_buckets(max_input_length)
        self.request_generated_tokens.buckets = _linear_buckets(max_total_tokens)
        self.request_max_new_tokens.buckets = _linear_buckets(max_total_tokens)
        for hist in (self.request_input_length, self.request_generated_tokens, self.request_max_new_tokens):
            hist._series = {(): [0.0] * (len(hist.buckets) + 2)}

    def families(self) -> list[_Family]:
        return [f for f in vars(self).values() if isinstance(f, _Family)]

    def render(self) -> str:
        return "".join(line + "\n" for f in self.families() for line in f.lines())


@dataclass
class RequestTrace:
    """One HTTP generation request's milestones (`time.perf_counter()` seconds), for LoRAX's
    per-request histograms. The ASGI middleware creates it; the generation hooks find it through
    a context variable, so no signature between route and engine has to carry it."""

    start: float
    validated: float | None = None
    admitted: float | None = None  # the engine's first forward pass over one of its sequences
    last_token: float | None = None
    generated_tokens: int = 0
    last_token_at: dict[str, float] = field(default_factory=dict)  # per sequence, for inter-token latency


_TRACE: contextvars.ContextVar[RequestTrace | None] = contextvars.ContextVar("loraserve_trace", default=None)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]
]


class LoraxRequestMetrics:
    """ASGI middleware: counts each generation request once, by its outcome, as LoRAX does.

    It watches the response rather than the handlers, so every route and every error path is
    counted the same way: an error status, an error event in a 200 stream (how LoRAX reports
    errors found once streaming began), or a client gone before the last byte (`dropped`).
    """

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if (
            scope["type"] != "http"
            or scope.get("method") != "POST"
            or scope.get("path") not in GENERATION_PATHS
        ):
            await self.app(scope, receive, send)
            return
        trace = RequestTrace(start=time.perf_counter())
        token = _TRACE.set(trace)
        self.metrics.lorax.request_count.inc()
        status, finished, error = 0, None, None

        async def watch(message: Message) -> None:
            nonlocal status, finished, error
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body":
                body = message.get("body", b"")
                if error is None and b'{"error"' in body:
                    error = stream_error_type(body)
                if not message.get("more_body", False):
                    finished = time.perf_counter()
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            _TRACE.reset(token)
            self.metrics.request_finished(trace, status, finished, error)


def stream_error_type(body: bytes) -> str | None:
    """The `error_type` of an SSE error event (`data:{"error": ..., "error_type": ...}`) in a
    chunk of a 200 stream, or None when the chunk carries no such event."""
    for line in body.splitlines():
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if not payload.startswith(b'{"error"'):
            continue
        try:
            obj = json.loads(payload)
        except ValueError:
            return "generation"
        kind = obj.get("error_type") if isinstance(obj, dict) else None
        if kind is None and isinstance(obj.get("error"), dict):  # OpenAI's nested error object
            kind = obj["error"].get("type")
        return kind if kind in _KNOWN_ERROR_TYPES else "generation"
    return None


def failure_label(status: int) -> str:
    if status in _FAILURE_LABELS:
        return _FAILURE_LABELS[status]
    return "bad_request" if 400 <= status < 500 else "generation"


def wants_json(format_param: str | None, accept: str | None) -> bool:
    """LoRAX's choice: `?format=json` wins; otherwise an Accept header naming application/json
    (what lorax-client's `metrics(format="json")` sends)."""
    if format_param is not None:
        return format_param.lower() == "json"
    return "application/json" in (accept or "")


def text_to_json(text: str) -> dict[str, dict[str, Any]]:
    """LoRAX's JSON form of the Prometheus text (router `parse_text_to_metrics`):
    `{name: {"type": ..., "data": [{"key": ..., "value": ...}]}}` per `# TYPE` family, where a
    sample's key is its name with labels when it has labels, "sum"/"count" for `_sum`/`_count`
    samples and "" otherwise. Non-finite values become null (JSON has no NaN)."""
    families: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("# TYPE "):
            parts = line.split()
            if len(parts) >= 4:
                current = families[parts[2]] = {"type": parts[3], "data": []}
                continue
        if line.startswith("#") or current is None:
            continue
        name, _, value_str = line.rpartition(" ")
        try:
            value = float(value_str)
        except ValueError:
            continue
        if "{" in name:
            key = name
        elif name.endswith("_sum"):
            key = "sum"
        elif name.endswith("_count"):
            key = "count"
        else:
            key = ""
        current["data"].append({"key": key, "value": value if math.isfinite(value) else None})
    return families


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
        """Wrap this engine's `runner.execute` (one forward pass) to feed `lorax_batch_*` and the
        admission times behind `lorax_request_queue_duration`.

        Wrapping the instance keeps the engine free of server concerns; the wrapper runs on the
        step-loop thread and only takes this object's lock.
        """
        limits = getattr(engine, "limits", None)
        if limits is not None:
            self.lorax.set_limits(limits.max_input_length, limits.max_total_tokens)
        runner = getattr(engine, "runner", None)
        execute = getattr(runner, "execute", None)
        if execute is None or getattr(execute, "_loraserve_metrics", None) is self:
            return
        lorax = self.lorax

        def timed_execute(decodes: list[Any], prefills: list[Any]) -> Any:
            method = "prefill" if prefills else "decode"
            start = time.perf_counter()
            if prefills:
                with self._lock:
                    for seq in prefills:
                        if not seq.output_ids:  # a first admission, not a recompute after preemption
                            self._admitted[seq.request_id] = start
                    while len(self._admitted) > _MAX_PENDING_ADMISSIONS:  # aborted before any output
                        self._admitted.popitem(last=False)
            self._batch_max_tokens = sum(
                len(s.prompt_ids) + s.params.max_new_tokens for s in (*decodes, *prefills)
            )
            lorax.batch_inference_count.inc(method=method)
            try:
                result = execute(decodes, prefills)
            except BaseException:
                lorax.batch_inference_failure.inc(method=method)
                raise
            lorax.batch_inference_duration.observe(time.perf_counter() - start, method=method)
            lorax.batch_inference_success.inc(method=method)
            return result

        timed_execute._loraserve_metrics = self  # type: ignore[attr-defined]
        runner.execute = timed_execute

    # ---- request hooks (called from generation.py) ------------------------------------------------
    def request_validated(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """A request passed validation: LoRAX records its input length and max_new_tokens here,
        whatever happens to the request later."""
        self.lorax.request_input_length.observe(float(prompt_tokens))
        self.lorax.request_max_new_tokens.observe(float(max_new_tokens))
        trace = _TRACE.get()
        if trace is not None and trace.validated is None:
            trace.validated = time.perf_counter()

    def request_output(self, out: Any) -> None:
        """One engine output of a sequence: admission, inter-token latency and skipped tokens."""
        now = time.perf_counter()
        n = len(out.tokens)
        with self._lock:
            admitted = self._admitted.pop(out.request_id, None)
        trace = _TRACE.get()
        if (
            trace is not None
            and admitted is not None
            and (trace.admitted is None or admitted < trace.admitted)
        ):
            trace.admitted = admitted
        if not n:
            return
        self.lorax.request_skipped_tokens.observe(float(n - 1))
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
