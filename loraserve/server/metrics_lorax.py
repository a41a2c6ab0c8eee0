"""LoRAX's own metrics (`lorax_*`), rendered as LoRAX's router renders them, and the ASGI
wrapper that records each request's outcome; `server/metrics.py` owns the registry and the
`loraserve_*` set and serves both."""

from __future__ import annotations

import bisect
import contextvars
import json
import math
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:  # metrics.py imports this module
    from loraserve.server.metrics import ServerMetrics

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
MAX_PENDING_ADMISSIONS = 4096


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
            "Tokens per engine output of a request that came from accepted speculative drafts",
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


TRACE: contextvars.ContextVar[RequestTrace | None] = contextvars.ContextVar("loraserve_trace", default=None)

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
        token = TRACE.set(trace)
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
            TRACE.reset(token)
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
