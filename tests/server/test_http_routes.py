"""Every route over plain HTTP against a real server process."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.fixtures.server import ServerProcess

PROMPT = "hello world"


def post(server: ServerProcess, path: str, body: dict | str, **kw) -> httpx.Response:
    if isinstance(body, str):
        return httpx.post(
            server.url + path, content=body, headers={"content-type": "application/json"}, timeout=60, **kw
        )
    return httpx.post(server.url + path, json=body, timeout=60, **kw)


def gen(server: ServerProcess, **params) -> dict:
    r = post(server, "/generate", {"inputs": params.pop("inputs", PROMPT), "parameters": params})
    assert r.status_code == 200, r.text
    return r.json()


def sse_events(text: str) -> list[dict]:
    return [json.loads(line[len("data:") :]) for line in text.splitlines() if line.startswith("data:")]


def test_generate_details_prefill_and_alternatives(server: ServerProcess) -> None:
    out = gen(server, max_new_tokens=5, details=True, decoder_input_details=True, return_k_alternatives=2)
    d = out["details"]
    assert d["finish_reason"] == "length" and d["generated_tokens"] == 5 and len(d["tokens"]) == 5
    assert len(d["prefill"]) == d["prompt_tokens"] and d["prefill"][0]["logprob"] is None
    assert all(isinstance(p["logprob"], float) for p in d["prefill"][1:])
    for tok in d["tokens"]:
        assert set(tok) >= {"id", "text", "logprob", "special"}
        assert len(tok["alternative_tokens"]) == 2
        assert tok["alternative_tokens"][0]["logprob"] >= tok["alternative_tokens"][1]["logprob"]
    assert d["seed"] is None  # greedy: no seed, as in LoRAX
    assert "best_of_sequences" not in d


def test_details_are_omitted_unless_asked(server: ServerProcess) -> None:
    out = gen(server, max_new_tokens=3)
    assert set(out) == {"generated_text"}
    assert "prefill" in gen(server, max_new_tokens=2, details=True)["details"]
    assert gen(server, max_new_tokens=2, details=True)["details"]["prefill"] == []


def test_root_route_answers_an_array_or_a_stream(server: ServerProcess) -> None:
    expected = gen(server, max_new_tokens=6)["generated_text"]
    r = post(server, "/", {"inputs": PROMPT, "parameters": {"max_new_tokens": 6}})
    assert r.status_code == 200 and r.json() == [{"generated_text": expected}]
    r = post(server, "/", {"inputs": PROMPT, "parameters": {"max_new_tokens": 6}, "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    assert sse_events(r.text)[-1]["generated_text"] == expected


def test_stream_one_event_per_token_last_carries_text_and_details(server: ServerProcess) -> None:
    full = gen(server, max_new_tokens=6, details=True)
    r = post(
        server, "/generate_stream", {"inputs": PROMPT, "parameters": {"max_new_tokens": 6, "details": True}}
    )
    assert r.status_code == 200
    assert "data:{" in r.text  # LoRAX framing: no space after the colon
    events = sse_events(r.text)
    assert [e["token"]["id"] for e in events] == [t["id"] for t in full["details"]["tokens"]]
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    assert events[-1]["generated_text"] == full["generated_text"]
    assert events[-1]["details"] == {
        "finish_reason": "length",
        "prompt_tokens": full["details"]["prompt_tokens"],
        "generated_tokens": 6,
        "seed": None,
    }


def test_return_full_text_and_truncate(server: ServerProcess) -> None:
    plain = gen(server, max_new_tokens=4)["generated_text"]
    assert gen(server, max_new_tokens=4, return_full_text=True)["generated_text"] == PROMPT + plain
    long_prompt = "the quick brown fox jumps over the lazy dog"
    full = gen(server, inputs=long_prompt, max_new_tokens=2, details=True, decoder_input_details=True)
    cut = gen(
        server, inputs=long_prompt, max_new_tokens=2, details=True, decoder_input_details=True, truncate=4
    )
    assert cut["details"]["prompt_tokens"] == 4
    assert [p["id"] for p in cut["details"]["prefill"]] == [p["id"] for p in full["details"]["prefill"]][-4:]


def test_stop_sequence_ends_generation(server: ServerProcess) -> None:
    base = gen(server, max_new_tokens=12, details=True)
    text = base["generated_text"]
    stop = next(
        (
            text[: i + 1]
            for i in range(2, len(text))
            if text[i].isprintable()
            and text[i] != "\ufffd"
            and text[: i + 1].count(text[i]) == 1
            and len(text[: i + 1].encode()) > 2
        ),
        None,
    )
    if stop is None:
        pytest.skip(f"greedy text {text!r} has no usable stop sequence")
    stop = stop[-2:]
    out = gen(server, max_new_tokens=12, details=True, stop=[stop])
    assert out["details"]["finish_reason"] == "stop_sequence"
    assert out["generated_text"].endswith(stop) and len(out["generated_text"]) <= len(text)


def test_seeded_sampling_is_reproducible_and_reports_the_seed(server: ServerProcess) -> None:
    a = gen(server, max_new_tokens=8, do_sample=True, seed=7, details=True)
    b = gen(server, max_new_tokens=8, do_sample=True, seed=7, details=True)
    assert a["generated_text"] == b["generated_text"] and a["details"]["seed"] == 7


def test_best_of_returns_the_highest_logprob_sequence(server: ServerProcess) -> None:
    # every sequence runs to max_new_tokens: the server seeds each one at random, and at
    # temperature 1.5 one of them may sample EOS within 6 tokens (fresh-clone CI saw it once)
    out = gen(server, max_new_tokens=6, best_of=3, temperature=1.5, details=True, ignore_eos_token=True)
    others = out["details"]["best_of_sequences"]
    assert len(others) == 2
    best = sum(t["logprob"] for t in out["details"]["tokens"])
    for seq in others:
        assert sum(t["logprob"] for t in seq["tokens"]) <= best + 1e-6
        assert seq["seed"] is not None and seq["finish_reason"] == "length"


def test_ignore_eos_token_runs_to_max_new_tokens(server: ServerProcess) -> None:
    out = gen(server, max_new_tokens=20, ignore_eos_token=True, details=True)
    assert out["details"]["generated_tokens"] == 20 and out["details"]["finish_reason"] == "length"


def test_adapter_changes_output(server: ServerProcess) -> None:
    base = gen(server, max_new_tokens=8, details=True)
    alpha = gen(server, max_new_tokens=8, details=True, adapter_id=str(server.adapters["alpha"]))
    beta = gen(
        server,
        max_new_tokens=8,
        details=True,
        adapter_id=str(server.adapters["beta"]),
        adapter_source="local",
    )
    ids = [[t["id"] for t in o["details"]["tokens"]] for o in (base, alpha, beta)]
    assert ids[0] != ids[1] and ids[0] != ids[2] and ids[1] != ids[2]


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (
            {"inputs": PROMPT, "parameters": {"temperature": -1}},
            422,
            "`temperature` must be non-negative",
        ),
        ({"inputs": PROMPT, "parameters": {"max_new_tokens": "many"}}, 422, "parameters.max_new_tokens"),
        ({"inputs": PROMPT, "parameters": {"max_new_tokens": 100000}}, 422, "`max_new_tokens` must be <="),
        (
            {"inputs": PROMPT, "parameters": {"stop": ["a", "b", "c", "d", "e"]}},
            422,
            "`stop` supports up to 4",
        ),
        ({"inputs": PROMPT, "parameters": {"best_of": 2}}, 422, "you must use sampling"),
        (
            {
                "inputs": PROMPT,
                "parameters": {"response_format": {"type": "json_object", "schema": {"type": "wat"}}},
            },
            422,
            "`response_format`",
        ),
        (
            {"inputs": PROMPT, "parameters": {"merged_adapters": {"ids": [], "weights": []}}},
            422,
            "at least one adapter ID",
        ),
        (
            {"inputs": PROMPT, "parameters": {"response_format": {"type": "xml"}}},
            422,
            "response_format",
        ),
        ({"inputs": PROMPT, "parameters": {"adapter_source": "ftp"}}, 422, "parameters.adapter_source"),
        ({"parameters": {}}, 422, "`inputs`"),
        ({"inputs": "", "parameters": {}}, 422, "`inputs` cannot be empty"),
        (
            {
                "inputs": PROMPT,
                "parameters": {"adapter_id": "/nonexistent/adapter", "adapter_source": "local"},
            },
            424,  # LoRAX's loader: an adapter that cannot be found is a generation error
            "adapter",
        ),
    ],
)
def test_errors_have_lorax_shape_and_status(
    server: ServerProcess, body: dict, status: int, needle: str
) -> None:
    r = post(server, "/generate", body)
    assert r.status_code == status, r.text
    err = r.json()
    assert set(err) == {"error", "error_type"} and needle in err["error"]
    assert err["error_type"] == ("generation" if status == 424 else "validation")


def test_malformed_json_is_400(server: ServerProcess) -> None:
    r = post(server, "/generate", '{"inputs": "x",')
    assert r.status_code == 400 and r.json()["error_type"] == "bad_request"


def test_stream_validation_errors_are_one_event_on_a_200_stream(server: ServerProcess) -> None:
    """LoRAX sends errors found before the first token as an SSE event, not as a status."""
    r = post(server, "/generate_stream", {"inputs": PROMPT, "parameters": {"decoder_input_details": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    (event,) = sse_events(r.text)
    assert event["error_type"] == "validation" and "streaming" in event["error"]


def test_bearer_token_never_echoed(server: ServerProcess) -> None:
    secret = "hf_supersecret_token_123"
    r = post(
        server,
        "/generate",
        {"inputs": PROMPT, "parameters": {"adapter_id": "/nonexistent/x", "adapter_source": "local"}},
        headers={"Authorization": f"Bearer {secret}"},
    )
    assert r.status_code == 424 and secret not in r.text
    assert secret not in server.log()


def test_health_info_docs(server: ServerProcess) -> None:
    assert httpx.get(server.url + "/health").status_code == 200
    info = httpx.get(server.url + "/info").json()
    assert info["model_id"] == str(server.model_dir)
    assert info["model_dtype"] == "torch.float32" and info["model_device_type"] == "cpu"
    assert info["max_input_length"] < info["max_total_tokens"] <= 512
    assert (
        info["max_best_of"] == 3 and info["max_concurrent_requests"] == 16 and info["max_stop_sequences"] == 4
    )
    assert info["max_active_adapters"] >= 1 and info["max_lora_rank"] == 64 and info["version"]
    assert info["default_adapter_source"] == "local"
    assert httpx.get(server.url + "/docs").status_code == 200
    spec = httpx.get(server.url + "/openapi.json").json()
    for path in (
        "/",
        "/generate",
        "/generate_stream",
        "/health",
        "/info",
        "/metrics",
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
    ):
        assert path in spec["paths"], path


def test_metrics_exposes_the_serving_signals(server: ServerProcess) -> None:
    gen(server, max_new_tokens=3, adapter_id=str(server.adapters["alpha"]))
    text = httpx.get(server.url + "/metrics").text
    for name in (
        "loraserve_request_total{",
        "lorax_queue_length",
        "lorax_batch_current_size",
        "loraserve_generated_tokens_total",
        "loraserve_generated_tokens_per_second",
        "loraserve_time_to_first_token_seconds_bucket",
        "loraserve_adapter_request_total{",
        "loraserve_adapter_cache_hits_total",
        "loraserve_adapter_cache_misses_total",
        "loraserve_adapter_cache_loads_total",
    ):
        assert name in text, name
    assert f'adapter_id="{server.adapters["alpha"]}"' in text
    assert 'route="/generate",status="200"' in text


def _request_count(server: ServerProcess, route: str, status: int) -> float:
    want = f'loraserve_request_total{{route="{route}",status="{status}"}} '
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(want):
            return float(line.split()[-1])
    return 0.0


def test_request_counter_counts_streams_errors_and_unmatched_routes(server: ServerProcess) -> None:
    """Each request once, by its matched route and the status it got (a stream when it ends)."""
    cases = [("/generate_stream", 200), ("/generate", 422), ("unmatched", 404)]
    before = {c: _request_count(server, *c) for c in cases}
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}
    with httpx.stream("POST", server.url + "/generate_stream", json=body, timeout=60) as r:
        assert sum(1 for line in r.iter_lines() if line.startswith("data:")) == 3
    bad = {"inputs": PROMPT, "parameters": {"max_new_tokens": -1}}
    assert httpx.post(server.url + "/generate", json=bad, timeout=60).status_code == 422
    assert httpx.get(server.url + "/no-such-route", timeout=60).status_code == 404
    assert {c: _request_count(server, *c) - before[c] for c in cases} == dict.fromkeys(cases, 1.0)


def _gauge(server: ServerProcess, name: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} missing from /metrics")


def test_client_disconnect_aborts_the_stream(server: ServerProcess) -> None:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 480, "ignore_eos_token": True}}
    before = _gauge(server, "loraserve_generated_tokens_total")
    with httpx.stream("POST", server.url + "/generate_stream", json=body, timeout=60) as r:
        next(r.iter_lines())
    deadline = time.monotonic() + 10
    while _gauge(server, "lorax_batch_current_size") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gauge(server, "lorax_batch_current_size") == 0
    time.sleep(0.3)
    assert _gauge(server, "loraserve_generated_tokens_total") - before < 480
    assert _gauge(server, "loraserve_requests_in_flight") == 0
