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
