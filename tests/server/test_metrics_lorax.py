"""`/metrics` against a real server: LoRAX's metric names with LoRAX's types, counters that only
grow, one series per quantity, and the JSON form lorax-client's `metrics(format="json")` reads.

LoRAX's dashboards query the router's names exactly as metrics-exporter-prometheus renders them
(counters without `_total`, `lorax_request_skipped_tokens` a summary), so the names and types
are checked literally here, not through a parser that would normalise them.
"""

from __future__ import annotations

import math
import time

import httpx

from loraserve.server.metrics_lorax import LoraxHistogram, LoraxSummary, stream_error_type, text_to_json
from tests.fixtures.server import ServerProcess

PROMPT = "<s>user: hello\nassistant: "

#: Every LoRAX router metric loraserve exports, with the type LoRAX's /metrics declares for it.
LORAX_TYPES = {
    "lorax_request_count": "counter",
    "lorax_request_success": "counter",
    "lorax_request_failure": "counter",
    "lorax_request_duration": "histogram",
    "lorax_request_validation_duration": "histogram",
    "lorax_request_queue_duration": "histogram",
    "lorax_request_inference_duration": "histogram",
    "lorax_request_mean_time_per_token_duration": "histogram",
    "lorax_request_generated_tokens": "histogram",
    "lorax_request_input_length": "histogram",
    "lorax_request_max_new_tokens": "histogram",
    "lorax_request_skipped_tokens": "summary",  # LoRAX sets no buckets for it: its exporter's summary
    "lorax_queue_length": "gauge",
    "lorax_batch_current_size": "gauge",
    "lorax_batch_current_max_tokens": "gauge",
    "lorax_batch_inference_count": "counter",
    "lorax_batch_inference_success": "counter",
    "lorax_batch_inference_failure": "counter",
    "lorax_batch_inference_duration": "histogram",
}

#: Series that duplicated another one, or monotonic counts that were gauges (now `<name>_total`).
GONE = (
    "loraserve_queue_size",
    "loraserve_batch_current_size",
    "loraserve_engine_waiting",
    "loraserve_engine_running",
    "loraserve_engine_batch_size",
    "loraserve_engine_spec_steps",
    "loraserve_engine_spec_tokens",
    "loraserve_engine_tokens_generated",
    "loraserve_engine_tokens_per_s",
    "loraserve_engine_steps",
    "loraserve_engine_preemptions",
    "loraserve_engine_adapter_loads",
    "loraserve_engine_adapter_evictions",
    "loraserve_adapter_cache_host_evictions",
    "loraserve_adapter_cache_load_failures",
    "loraserve_adapter_cache_auth_checks",
    "loraserve_request_duration_seconds",  # lorax_request_duration covers every generation route
)


def scrape(url: str) -> tuple[dict[str, str], dict[str, float]]:
    """(`# TYPE` name -> type, sample with labels -> value) from the Prometheus text, verbatim."""
    r = httpx.get(url + "/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    types: dict[str, str] = {}
    samples: dict[str, float] = {}
    for line in r.text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            types[name] = kind
        elif line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return types, samples


def counter_series(types: dict[str, str], samples: dict[str, float]) -> dict[str, float]:
    return {s: v for s, v in samples.items() if types.get(s.partition("{")[0]) == "counter"}


def some_traffic(server: ServerProcess) -> None:
    """Two /generate (one with an adapter), a stream, an OpenAI completion and one 422."""
    gen = server.url + "/generate"
    params = {"max_new_tokens": 4, "ignore_eos_token": True}
    assert httpx.post(gen, json={"inputs": PROMPT, "parameters": params}, timeout=60).status_code == 200
    adapter = {**params, "adapter_id": str(server.adapters["alpha"])}
    assert httpx.post(gen, json={"inputs": PROMPT, "parameters": adapter}, timeout=60).status_code == 200
    with httpx.stream(
        "POST", server.url + "/generate_stream", json={"inputs": PROMPT, "parameters": params}, timeout=60
    ) as r:
        assert r.status_code == 200 and b"generated_text" in r.read()
    completion = {"model": "", "prompt": PROMPT, "max_tokens": 3}
    assert httpx.post(server.url + "/v1/completions", json=completion, timeout=60).status_code == 200
    bad = {"inputs": PROMPT, "parameters": {"max_new_tokens": 0}}
    assert httpx.post(gen, json=bad, timeout=60).status_code == 422


def test_every_lorax_metric_is_exported_with_loraxs_type(server: ServerProcess) -> None:
    types0, before = scrape(server.url)
    some_traffic(server)
    types, after = scrape(server.url)
    for name, kind in LORAX_TYPES.items():
        assert types.get(name) == kind, (name, types.get(name))
    # counters keep LoRAX's bare name: a dashboard's `rate(lorax_request_count[1m])` finds them
    assert "lorax_request_count" in after and "lorax_request_count_total" not in after
    for name, kind in LORAX_TYPES.items():
        if kind == "histogram":
            assert any(s.startswith(name + "_bucket{") and 'le="+Inf"' in s for s in after), name
            assert any(s.partition("{")[0] == name + "_count" for s in after), name
    assert 'lorax_request_skipped_tokens{quantile="0.5"}' in after

    def delta(sample: str) -> float:
        return after.get(sample, 0.0) - before.get(sample, 0.0)

    assert delta("lorax_request_count") == 5
    assert delta("lorax_request_success") == 4
    assert delta('lorax_request_failure{err="validation"}') == 1
    assert delta("lorax_request_duration_count") == 4
    assert delta("lorax_request_queue_duration_count") == 4
    assert 4 + 4 + 4 < delta("lorax_request_generated_tokens_sum") <= 4 + 4 + 4 + 3
    assert delta("lorax_request_input_length_count") == 4  # the 422 never passed validation
    assert delta("lorax_request_max_new_tokens_sum") == 4 + 4 + 4 + 3
    assert delta('lorax_batch_inference_count{method="prefill"}') >= 4
    assert delta('lorax_batch_inference_success{method="decode"}') >= 3
    # one per engine output of a sequence (a decode burst's tokens come in one); no drafts here
    assert delta("lorax_request_skipped_tokens_count") >= 4 + 4
    assert delta("lorax_request_skipped_tokens_sum") == 0
    assert after["lorax_queue_length"] == 0 and after["lorax_batch_current_size"] == 0
    # the split adds up: validation + queue + inference never exceed the whole request
    parts = sum(delta(f"lorax_request_{p}_duration_sum") for p in ("validation", "queue", "inference"))
    assert 0 < parts <= delta("lorax_request_duration_sum") + 1e-6
    assert types0  # the first scrape parsed too


def test_counters_only_increase_and_no_quantity_has_two_series(server: ServerProcess) -> None:
    types, first = scrape(server.url)
    some_traffic(server)
    types2, second = scrape(server.url)
    c1, c2 = counter_series(types, first), counter_series(types2, second)
    assert len(c1) > 20
    for series, value in c1.items():
        assert series in c2, f"{series} disappeared"
        assert c2[series] >= value, (series, value, c2[series])
    assert c2["loraserve_engine_steps_total"] > c1["loraserve_engine_steps_total"]
    assert types2["loraserve_engine_steps_total"] == "counter"
    assert types2["loraserve_inter_token_latency_seconds"] == "histogram"
    assert types2["loraserve_time_to_first_token_seconds"] == "histogram"
    for name in GONE:
        assert name not in types2, name
    for name in ("loraserve_speculative_steps_total", "loraserve_adapter_cache_loaded_bytes_total"):
        assert types2[name] == "counter", name


def test_json_form_for_accept_application_json(server: ServerProcess) -> None:
    some_traffic(server)
    r = httpx.get(server.url + "/metrics", headers={"Accept": "application/json"}, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    body = r.json()
    for name, kind in LORAX_TYPES.items():
        assert body[name]["type"] == kind, name
    for family in body.values():
        assert family["type"] in ("counter", "gauge", "histogram", "summary")
        for point in family["data"]:
            assert set(point) == {"key", "value"} and isinstance(point["key"], str)
            assert point["value"] is None or math.isfinite(point["value"])
    # LoRAX's keys: labelled samples by full name, `_sum`/`_count` as "sum"/"count", bare ones ""
    duration = {p["key"]: p["value"] for p in body["lorax_request_duration"]["data"]}
    assert duration["count"] >= 4 and duration["sum"] > 0
    assert any(k.startswith('lorax_request_duration_bucket{le="') for k in duration)
    assert body["lorax_queue_length"]["data"] == [{"key": "", "value": 0.0}]
    by_query = httpx.get(server.url + "/metrics", params={"format": "json"}, timeout=30)
    assert by_query.headers["content-type"].startswith("application/json")
    assert "lorax_request_count" in by_query.json()
    plain = httpx.get(server.url + "/metrics", headers={"Accept": "text/plain"}, timeout=30)
    assert plain.headers["content-type"].startswith("text/plain")


def test_stream_error_events_and_json_parsing() -> None:
    assert stream_error_type(b'data:{"error":"bad","error_type":"validation"}\n\n') == "validation"
    assert stream_error_type(b'data: {"error": {"message": "x", "type": "overloaded"}}\n\n') == "overloaded"
    assert stream_error_type(b'data:{"token":{"text":"{\\"error\\""}}\n\n') is None
    text = (
        "# TYPE a_total counter\na_total 3\n"
        '# TYPE h histogram\nh_bucket{le="1"} 1\nh_sum 0.5\nh_count 1\n'
        "# TYPE s summary\ns_sum NaN\n"
    )
    assert text_to_json(text) == {
        "a_total": {"type": "counter", "data": [{"key": "", "value": 3.0}]},
        "h": {
            "type": "histogram",
            "data": [
                {"key": 'h_bucket{le="1"}', "value": 1.0},
                {"key": "sum", "value": 0.5},
                {"key": "count", "value": 1.0},
            ],
        },
        "s": {"type": "summary", "data": [{"key": "sum", "value": None}]},
    }


def test_histogram_and_summary_render_cumulative_buckets_and_quantiles() -> None:
    h = LoraxHistogram("lorax_x_duration", "x", (0.1, 1.0))
    for v in (0.05, 0.5, 5.0):
        h.observe(v)
    lines = h.lines()
    assert 'lorax_x_duration_bucket{le="0.1"} 1.0' in lines
    assert 'lorax_x_duration_bucket{le="1.0"} 2.0' in lines
    assert 'lorax_x_duration_bucket{le="+Inf"} 3.0' in lines
    assert "lorax_x_duration_count 3.0" in lines
    s = LoraxSummary("lorax_s", "s")
    assert 'lorax_s{quantile="0.5"}' not in "\n".join(s.lines())  # no NaN quantiles when empty
    for v in range(10):
        s.observe(float(v))
    lines = s.lines()
    assert 'lorax_s{quantile="0.0"} 0.0' in lines and 'lorax_s{quantile="1.0"} 9.0' in lines
    assert "lorax_s_sum 45.0" in lines and "lorax_s_count 10.0" in lines


def test_stream_failures_count_by_cause(server: ServerProcess) -> None:
    """A refused stream is a failure whether it is answered 422 or, as LoRAX does, as an error
    event on a 200 stream; a client that leaves mid-stream is `dropped`, never a success."""
    _, before = scrape(server.url)
    bad = {"inputs": PROMPT, "parameters": {"max_new_tokens": 0}}
    with httpx.stream("POST", server.url + "/generate_stream", json=bad, timeout=60) as r:
        r.read()
    long = {"inputs": PROMPT, "parameters": {"max_new_tokens": 400, "ignore_eos_token": True}}
    with httpx.stream("POST", server.url + "/generate_stream", json=long, timeout=60) as r:
        next(r.iter_lines())
    deadline = time.monotonic() + 10
    while True:
        _, after = scrape(server.url)
        dropped = after.get('lorax_request_failure{err="dropped"}', 0.0)
        if dropped > before.get('lorax_request_failure{err="dropped"}', 0.0) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert after["lorax_request_count"] - before["lorax_request_count"] == 2
    assert after["lorax_request_success"] == before["lorax_request_success"]
    for err in ("validation", "dropped"):
        key = f'lorax_request_failure{{err="{err}"}}'
        assert after.get(key, 0.0) - before.get(key, 0.0) == 1, key
