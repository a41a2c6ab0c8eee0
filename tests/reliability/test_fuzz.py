"""Schemathesis against the server's own OpenAPI schema: every route, a bounded number of examples, no 5xx.

`LORASERVE_FUZZ_EXAMPLES` sets the examples per operation (CI default 30).
The server is the main test server, so generated adapter ids hit the real
S3 and hub peers (and the local allow-list) rather than the internet.
Operations are driven one by one with Hypothesis directly (schemathesis's
pytest fixture loader does not support this pytest version).
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.reliability.stack import Stack

EXAMPLES = int(os.environ.get("LORASERVE_FUZZ_EXAMPLES", "30"))
ROUTES = {
    "POST /generate",
    "POST /generate_stream",
    "POST /",
    "POST /v1/completions",
    "POST /v1/chat/completions",
    "GET /v1/models",
    "GET /health",
    "GET /info",
    "GET /metrics",
}


@pytest.fixture(scope="module")
def operations(stack: Stack) -> dict:
    schema = schemathesis.openapi.from_url(stack.url + "/openapi.json")
    ops = {}
    for result in schema.get_all_operations():
        op = result.ok()
        ops[f"{op.method.upper()} {op.path}"] = op
    return ops


def test_schema_lists_every_route(operations: dict) -> None:
    assert ROUTES <= set(operations), sorted(operations)


@pytest.mark.parametrize("label", sorted(ROUTES))
def test_no_route_answers_5xx(operations: dict, label: str) -> None:
    op = operations[label]

    @given(case=op.as_strategy())
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def run(case: schemathesis.Case) -> None:
        case.call_and_validate(checks=[not_a_server_error], timeout=60)

    run()
