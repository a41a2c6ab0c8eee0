"""LoRAX 0.7 wire parity (issue 15): response shape, headers, `/info`, stream errors, extra routes.

Every `/generate` answer and every stream event a real server sends here is validated against
`lorax07_models` (the 0.7 client's models: missing fields fail, unknown fields pass).
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.fixtures.server import ServerProcess
from tests.server import lorax07_models as m

PROMPT = "hello world"
GENERATE_HEADERS = (
    "x-compute-type",
    "x-compute-time",
    "x-compute-characters",
    "x-total-time",
    "x-validation-time",
    "x-queue-time",
    "x-inference-time",
    "x-time-per-token",
    "x-time-to-first-token",
    "x-time-per-output-token",
    "x-prompt-tokens",
    "x-generated-tokens",
    "x-skipped-tokens",
    "x-total-tokens",
    "x-model-id",
)
STREAM_HEADERS = ("x-compute-type", "x-compute-characters", "x-model-id")


def _post(server: ServerProcess, path: str, body: Any, **kw: Any) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60, **kw)


def _events(text: str) -> list[dict]:
    return [json.loads(line[len("data:") :]) for line in text.splitlines() if line.startswith("data:")]


def _check_response(data: dict) -> m.Response:
    """Valid for the 0.7 client, and every token carries `skipped` (the model requires it)."""
    resp = m.Response.model_validate(data)
    if resp.details is not None:
        skipped = sum(t.skipped for t in resp.details.tokens)
        assert resp.details.skipped_tokens == skipped
    return resp


def _stream(server: ServerProcess, params: dict, path: str = "/generate_stream") -> list[m.StreamResponse]:
    body = {"inputs": PROMPT, "parameters": params, **({"stream": True} if path == "/" else {})}
    r = _post(server, path, body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    events = _events(r.text)
    assert events and all("error" not in e for e in events), events
    return [m.StreamResponse.model_validate(e) for e in events]


GENERATE_CASES = [
    {"max_new_tokens": 4},
    {"max_new_tokens": 4, "details": True},
    {"max_new_tokens": 4, "decoder_input_details": True},  # details even without `details`
    {"max_new_tokens": 4, "details": True, "decoder_input_details": True, "return_k_alternatives": 2},
    {"max_new_tokens": 4, "details": True, "best_of": 2, "do_sample": True},
    {"max_new_tokens": 4, "details": True, "do_sample": True, "seed": 7, "return_full_text": True},
    {"max_new_tokens": 8, "details": True, "stop": ["a"], "ignore_eos_token": True},
    {"max_new_tokens": 4, "details": True, "temperature": 0.7, "top_k": 5, "top_p": 0.9},
]


@pytest.mark.parametrize("params", GENERATE_CASES, ids=lambda p: ",".join(sorted(p)))
@pytest.mark.parametrize("path", ["/generate", "/", "/invocations"])
def test_every_generate_answer_parses_with_the_07_client_models(
    server: ServerProcess, path: str, params: dict
) -> None:
    r = _post(server, path, {"inputs": PROMPT, "parameters": params})
    assert r.status_code == 200, r.text
    data = r.json()
    if path != "/generate":  # the client's route answers a one-element array
        assert isinstance(data, list) and len(data) == 1
        data = data[0]
    resp = _check_response(data)
    wants_details = params.get("details") or params.get("decoder_input_details")
    assert (resp.details is not None) == bool(wants_details)
    if params.get("decoder_input_details"):
        assert resp.details is not None and resp.details.prefill
    for t in resp.details.tokens if resp.details else []:
        assert "skipped" in t.model_fields_set
    if resp.details is not None and resp.details.best_of_sequences:
        assert all(s.tokens for s in resp.details.best_of_sequences)


def test_without_speculation_no_token_is_skipped(server: ServerProcess) -> None:
    resp = _check_response(
        _post(
            server,
            "/generate",
            {
                "inputs": PROMPT,
                "parameters": {"max_new_tokens": 6, "details": True, "ignore_eos_token": True},
            },
        ).json()
    )
    assert resp.details is not None and resp.details.skipped_tokens == 0
    assert len(resp.details.tokens) == 6 and not any(t.skipped for t in resp.details.tokens)


@pytest.mark.parametrize(
    "params",
    [
        {"max_new_tokens": 5},
        {"max_new_tokens": 5, "details": True},
        {"max_new_tokens": 5, "details": True, "return_k_alternatives": 2, "ignore_eos_token": True},
        {"max_new_tokens": 5, "do_sample": True, "seed": 3, "details": True},
    ],
    ids=lambda p: ",".join(sorted(p)),
)
@pytest.mark.parametrize("path", ["/generate_stream", "/"])
def test_every_stream_event_parses_with_the_07_client_models(
    server: ServerProcess, path: str, params: dict
) -> None:
    events = _stream(server, params, path)
    assert all(e.generated_text is None and e.details is None for e in events[:-1])
    assert events[-1].generated_text is not None
    assert (events[-1].details is not None) == bool(params.get("details"))
    assert not any(e.token.skipped for e in events)  # no speculation on this server


def test_generate_headers_as_lorax_sends_them(server: ServerProcess) -> None:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 5, "ignore_eos_token": True}}
    for path in ("/generate", "/"):
        r = _post(server, path, body)
        assert r.status_code == 200, r.text
        for name in GENERATE_HEADERS:
            assert name in r.headers, (path, name)
        for name in GENERATE_HEADERS[1:14]:
            assert int(r.headers[name]) >= 0, (name, r.headers[name])
        assert r.headers["x-compute-characters"] == str(len(PROMPT))
        assert r.headers["x-generated-tokens"] == "5" and r.headers["x-skipped-tokens"] == "0"
        prompt = int(r.headers["x-prompt-tokens"])
        assert prompt > 0 and int(r.headers["x-total-tokens"]) == prompt + 5
        assert r.headers["x-model-id"] == str(server.model_dir)
        assert "x-adapter-id" not in r.headers and "x-adapter-source" not in r.headers


def test_adapter_headers_name_the_adapter_never_the_token(server: ServerProcess) -> None:
    secret = "hf_headersecret_0123456789abcdef"
    adapter = str(server.adapters["alpha"])
    params = {"max_new_tokens": 2, "adapter_id": adapter, "adapter_source": "local", "api_token": secret}
    for path in ("/generate", "/generate_stream"):
        r = _post(
            server,
            path,
            {"inputs": PROMPT, "parameters": params},
            headers={"Authorization": f"Bearer {secret}"},
        )
        assert r.status_code == 200, r.text
        assert r.headers["x-adapter-id"] == adapter and r.headers["x-adapter-source"] == "local"
        assert all(secret not in v for v in r.headers.values())
    merged = {"ids": [adapter, adapter], "weights": [0.5, 0.5]}  # merges need equal ranks
    r = _post(
        server,
        "/generate",
        {"inputs": PROMPT, "parameters": {"max_new_tokens": 2, "merged_adapters": merged}},
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-adapter-id"] == ",".join(merged["ids"])


def test_stream_headers_as_lorax_sends_them(server: ServerProcess) -> None:
    for path in ("/generate_stream", "/"):
        body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}, "stream": True}
        r = _post(server, path, body)
        assert r.status_code == 200, r.text
        for name in STREAM_HEADERS:
            assert name in r.headers, (path, name)
        assert r.headers["x-accel-buffering"] == "no"
        assert r.headers["x-compute-characters"] == str(len(PROMPT))


def test_non_ascii_adapter_ids_cannot_break_the_headers(server: ServerProcess) -> None:
    """A header can only carry Latin-1: an id that is not must still give a valid answer."""
    body = {
        "inputs": PROMPT,
        "parameters": {"adapter_id": "/nonexistent/ädapter\u2603", "adapter_source": "local"},
    }
    r = _post(server, "/generate_stream", body)
    assert r.status_code == 200, r.text
    assert r.headers["x-adapter-id"].isascii()
    assert "error" in _events(r.text)[0]


@pytest.mark.parametrize(
    ("params", "error_type", "says"),
    [
        ({"decoder_input_details": True}, "validation", "`decoder_input_details` == true is not supported"),
        ({"best_of": 2, "do_sample": True}, "validation", "`best_of` != 1 is not supported"),
        ({"top_k": 0}, "validation", "`top_k` must be strictly positive"),
        ({"adapter_id": "/nonexistent/adapter", "adapter_source": "local"}, None, "adapter"),
    ],
)
@pytest.mark.parametrize("path", ["/generate_stream", "/"])
def test_stream_errors_before_the_first_token_are_one_event_on_a_200_stream(
    server: ServerProcess, path: str, params: dict, error_type: str | None, says: str
) -> None:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2, **params}, "stream": True}
    r = _post(server, path, body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-accel-buffering"] == "no"
    events = _events(r.text)
    assert len(events) == 1 and set(events[0]) == {"error", "error_type"}, events
    assert says in events[0]["error"]
    if error_type is not None:
        assert events[0]["error_type"] == error_type
    if events[0]["error_type"] == "validation":
        assert events[0]["error"].startswith("Input validation error: ")


def test_body_that_does_not_parse_stays_an_http_error_on_streams(server: ServerProcess) -> None:
    """Like LoRAX's axum extractor: a body that is not a request never starts a stream."""
    r = httpx.post(
        server.url + "/generate_stream",
        content=b'{"inputs": ',
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 400


def test_info_has_every_lorax_field_with_its_type(server: ServerProcess) -> None:
    info = m.Info.model_validate(httpx.get(server.url + "/info", timeout=10).json())
    assert info.max_batch_total_tokens > 0 and isinstance(info.eager_prefill, bool)
    assert info.max_input_length < info.max_total_tokens


@pytest.mark.parametrize("path", ["/", "/ping", "/health", "/startup"])
def test_probe_routes_answer_200(server: ServerProcess, path: str) -> None:
    r = httpx.get(server.url + path, timeout=60)
    assert r.status_code == 200, r.text


def test_new_routes_are_documented(server: ServerProcess) -> None:
    paths = httpx.get(server.url + "/openapi.json", timeout=10).json()["paths"]
    for path in ("/ping", "/startup", "/tokenize", "/invocations"):
        assert path in paths, path
    assert "get" in paths["/"] and "post" in paths["/"]


@pytest.mark.parametrize("text", ["hello world", "héllo wörld ☃ 日本", "  spaced\nlines\t"])
def test_tokenize_gives_ids_vocab_entries_and_character_offsets(server: ServerProcess, text: str) -> None:
    r = _post(server, "/tokenize", {"inputs": text, "add_special_tokens": False})
    assert r.status_code == 200, r.text
    tokens = [m.SimpleToken.model_validate(t) for t in r.json()]
    assert tokens
    gen = _post(server, "/generate", {"inputs": text, "parameters": {"max_new_tokens": 1, "details": True}})
    prompt_tokens = gen.json()["details"]["prompt_tokens"]
    assert 0 <= prompt_tokens - len(tokens) <= 1  # /generate adds the bos token
    # Character offsets, not bytes: the byte-level pieces of one character share its span, and the
    # distinct spans, in order, spell the text.
    spans = list(dict.fromkeys((t.start, t.stop) for t in tokens))
    assert "".join(text[a:b] for a, b in spans) == text
    assert tokens[-1].stop == len(text)


def test_tokenize_adds_special_tokens_by_default(server: ServerProcess) -> None:
    plain = _post(server, "/tokenize", {"inputs": PROMPT, "add_special_tokens": False}).json()
    default = _post(server, "/tokenize", {"inputs": PROMPT}).json()
    null = _post(server, "/tokenize", {"inputs": PROMPT, "add_special_tokens": None}).json()
    assert default == null and len(default) >= len(plain)
    assert [t["id"] for t in default[len(default) - len(plain) :]] == [t["id"] for t in plain]


def test_tokenize_rejects_a_body_without_inputs(server: ServerProcess) -> None:
    r = _post(server, "/tokenize", {"text": PROMPT})
    assert r.status_code == 422 and r.json()["error_type"] == "validation"
