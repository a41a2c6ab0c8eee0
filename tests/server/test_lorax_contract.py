"""LoRAX's router contract (issue 15), table-driven against a real server.

Each row is one request and what LoRAX's router answers to it: status, `error_type` and the
message (LoRAX's prefix included); rows with status 200 must be accepted. The facts come from
`../shared/reference/lorax-api.md`, section "LoRAX at HEAD".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.fixtures.server import ServerProcess

PROMPT = "hello world"
VALIDATION = "Input validation error: "
GENERATION = "Request failed during generation: "
V = VALIDATION
FREQ = "`frequency_penalty` must be >= -2.0 and <= 2.0"
PRES = "`presence_penalty` must be >= -2.0 and <= 2.0"
MEDIA = "Expected request with `Content-Type: application/json`"
TEXT = {"content-type": "text/plain"}
FORM = {"content-type": "application/x-www-form-urlencoded"}
NONE = {"content-type": ""}  # an empty header: httpx then sends none of its own


@dataclass(frozen=True)
class Row:
    """One request and LoRAX's answer to it."""

    name: str
    body: dict[str, Any] | bytes
    status: int
    error_type: str | None = None
    message: str | None = None  # the error message starts with it (prefix included)
    path: str = "/generate"
    headers: dict[str, str] = field(default_factory=dict)


def params(**p: Any) -> dict[str, Any]:
    return {"inputs": PROMPT, "parameters": {"max_new_tokens": 2, **p}}


ROWS = [
    Row(
        "prefix-on-validation",
        params(top_k=0),
        422,
        "validation",
        VALIDATION + "`top_k` must be strictly positive",
    ),
    Row("prefix-on-root-route", params(top_k=0), 422, "validation", VALIDATION + "`top_k`", path="/"),
    Row("prefix-on-body-fields", {"inputs": 5}, 422, "validation", VALIDATION + "`inputs`"),
    Row("no-prefix-on-bad-json", b'{"inputs": ', 400, "bad_request", "request body is not valid JSON"),
    # -- LoRAX's router rules (validation.rs)
    Row("temperature-zero-is-greedy", params(temperature=0), 200),
    Row("temperature-zero-with-do-sample", params(temperature=0.0, do_sample=True), 200),
    Row(
        "temperature-negative",
        params(temperature=-0.5),
        422,
        "validation",
        V + "`temperature` must be non-negative",
    ),
    Row("top-p-one-is-accepted", params(top_p=1.0), 200),
    Row("top-p-over-one", params(top_p=1.0001), 422, "validation", V + "`top_p` must be > 0.0 and < 1.0"),
    Row("frequency-penalty-in-range", params(frequency_penalty=2.0, presence_penalty=-2.0), 200),
    Row("frequency-penalty-over", params(frequency_penalty=2.1), 422, "validation", V + FREQ),
    Row("frequency-penalty-under", params(frequency_penalty=-2.1), 422, "validation", V + FREQ),
    Row("presence-penalty-over", params(presence_penalty=7), 422, "validation", V + PRES),
    Row("penalties-on-the-stream", params(presence_penalty=1.5), 200, path="/generate_stream"),
    Row(
        "input-length-before-truncate",
        {"inputs": "hello " * 2000, "parameters": {"max_new_tokens": 2, "truncate": 4}},
        422,
        "validation",
        V + "`inputs` must have less than",
    ),
    Row("truncate-shortens-a-prompt-that-fits", params(truncate=1), 200),
    # -- adapters: LoRAX's loader fails what it cannot find or load as a generation error
    Row(
        "adapter-missing",
        params(adapter_id="/nonexistent/adapter", adapter_source="local"),
        424,
        "generation",
        GENERATION + "adapter error:",
    ),
    Row(
        "adapter-missing-on-root-route",
        params(adapter_id="/nonexistent/adapter", adapter_source="local"),
        424,
        "generation",
        GENERATION + "adapter error:",
        path="/",
    ),
    Row(
        "adapter-nul-byte",
        params(adapter_id="/tmp/a\x00b", adapter_source="local"),
        424,
        "generation",
        GENERATION + "adapter error:",
    ),
    # a token refused for its form keeps its auth status (no adapter is looked up)
    Row(
        "malformed-token-keeps-401",
        params(adapter_id="/nonexistent/adapter", adapter_source="local", api_token="a b"),
        401,
        "validation",
        V + "`api_token` is malformed",
    ),
    # -- the body must be declared JSON (axum's `Json` extractor)
    Row("text-plain-body", b'{"inputs": "hi"}', 415, "unsupported_media_type", MEDIA, headers=TEXT),
    Row("form-body", b"inputs=hi", 415, "unsupported_media_type", MEDIA, headers=FORM),
    Row("no-content-type", b'{"inputs": "hi"}', 415, "unsupported_media_type", MEDIA, headers=NONE),
    Row("json-with-charset", params(), 200, headers={"content-type": "application/json; charset=utf-8"}),
    Row("vendor-json", params(), 200, headers={"content-type": "application/vnd.api+json"}),
    Row("text-plain-on-stream", b"{}", 415, "unsupported_media_type", MEDIA, "/generate_stream", TEXT),
]


def send(server: ServerProcess, row: Row) -> httpx.Response:
    body = row.body if isinstance(row.body, bytes) else json.dumps(row.body).encode()
    headers = {"content-type": "application/json", **row.headers}
    if not headers["content-type"]:
        del headers["content-type"]
    return httpx.post(server.url + row.path, content=body, headers=headers, timeout=60)


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_lorax_router_contract(server: ServerProcess, row: Row) -> None:
    r = send(server, row)
    assert r.status_code == row.status, r.text
    if row.status == 200:
        return
    err = r.json()
    assert set(err) == {"error", "error_type"}, err
    assert err["error_type"] == row.error_type, err
    assert err["error"].startswith(row.message or ""), err


def test_openai_errors_keep_the_bare_message_in_openais_object(server: ServerProcess) -> None:
    r = httpx.post(server.url + "/v1/completions", json={"prompt": PROMPT, "n": 0}, timeout=60)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["message"] == "`n` must be strictly positive" and error["type"] == "validation"


def test_penalties_change_greedy_output_on_generate(server: ServerProcess) -> None:
    """`frequency_penalty`/`presence_penalty` are applied, not just accepted: a strong penalty on
    a long greedy generation must change what the base model repeats."""

    def text(**p: Any) -> str:
        body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 24, "ignore_eos_token": True, **p}}
        r = httpx.post(server.url + "/generate", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["generated_text"]

    plain = text()
    assert text(frequency_penalty=0.0, presence_penalty=0.0) == plain
    assert text(frequency_penalty=2.0, presence_penalty=2.0) != plain


def test_openai_routes_keep_openais_404_for_an_unknown_model(server: ServerProcess) -> None:
    """OpenAI's contract: an unknown `model` is a 404 (`openai.NotFoundError`), not LoRAX's 424."""
    body = {"model": "/nonexistent/adapter", "prompt": PROMPT, "max_tokens": 2, "adapter_source": "local"}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 404, r.text
    assert r.json()["error"]["type"] == "validation"
    assert r.json()["error"]["message"].startswith("adapter error:")


def test_openai_routes_refuse_a_non_json_body_with_415(server: ServerProcess) -> None:
    r = httpx.post(server.url + "/v1/completions", content=b"{}", headers=TEXT, timeout=60)
    assert r.status_code == 415, r.text
    assert r.json()["error"]["message"] == MEDIA


def test_get_routes_need_no_content_type(server: ServerProcess) -> None:
    for path in ("/health", "/info", "/v1/models"):
        assert httpx.get(server.url + path, headers=TEXT, timeout=60).status_code == 200, path


def test_apply_chat_template_on_generate_matches_the_chat_route(server: ServerProcess) -> None:
    """`inputs` as a JSON message list or a plain user string goes through the model's template;
    the output is the chat route's for the same conversation."""
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    body = {"model": "", "messages": messages, "max_tokens": 6, "temperature": 0}
    want = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()

    def generate(inputs: str, **p: Any) -> dict[str, Any]:
        parameters = {"max_new_tokens": 6, "apply_chat_template": True, "details": True, **p}
        r = httpx.post(
            server.url + "/generate", json={"inputs": inputs, "parameters": parameters}, timeout=60
        )
        assert r.status_code == 200, r.text
        return r.json()

    listed = generate(json.dumps(messages))
    assert listed["details"]["prompt_tokens"] == want["usage"]["prompt_tokens"]
    assert listed["generated_text"] == want["choices"][0]["message"]["content"]
    rendered = "<s>system: be brief\n<s>user: hello\nassistant: "  # the tiny model's template
    full = generate(json.dumps(messages), return_full_text=True)["generated_text"]
    assert full == rendered + listed["generated_text"]
    plain = generate("hello")
    user_only = {**body, "messages": [{"role": "user", "content": "hello"}]}
    chat_plain = httpx.post(server.url + "/v1/chat/completions", json=user_only, timeout=60).json()
    assert plain["generated_text"] == chat_plain["choices"][0]["message"]["content"]
    bad = {"inputs": '[{"content": "x"}]', "parameters": {"apply_chat_template": True}}
    r = httpx.post(server.url + "/generate", json=bad, timeout=60)
    assert r.status_code == 422 and r.json()["error"].startswith(VALIDATION + "`inputs`: message 0"), r.text
