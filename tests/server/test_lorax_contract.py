"""LoRAX's router contract (issue 15), table-driven against a real server.

Each row is one request and what LoRAX's router answers to it: status, `error_type` and the
message (LoRAX's prefix included); rows with status 200 must be accepted. The facts come from
`../shared/reference/lorax-api.md`, section "LoRAX at HEAD".
"""

from __future__ import annotations

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
]


def send(server: ServerProcess, row: Row) -> httpx.Response:
    if isinstance(row.body, bytes):
        headers = {"content-type": "application/json", **row.headers}
        return httpx.post(server.url + row.path, content=row.body, headers=headers, timeout=60)
    return httpx.post(server.url + row.path, json=row.body, headers=row.headers, timeout=60)


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
