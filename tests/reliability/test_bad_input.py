"""The bad-input table: every case gets a 4xx JSON error naming the problem, and nobody else notices.

While the table runs, `GoodTraffic` keeps sending good requests (every adapter
source, streaming and not) and checks each answer against the engine alone.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.reliability.good_traffic import GoodTraffic, error_message
from tests.reliability.stack import MAX_NEW, Stack

Body = dict | bytes | Callable[[Stack], dict | bytes]


@dataclass(frozen=True)
class Case:
    name: str
    body: Body
    status: int | tuple[int, ...]
    says: str  # lower-case text the error message must contain
    path: str = "/generate"
    headers: dict[str, str] | None = None


def p(**params: Any) -> dict:
    return {"inputs": "hello world", "parameters": {"max_new_tokens": MAX_NEW, **params}}


def local(name: str) -> Callable[[Stack], dict]:
    return lambda s: p(adapter_id=str(s.assets.bad[name]), adapter_source="local")


LONG_PROMPT = "hello world " * 40  # ~80 tokens against --max-input-length 48

CASES: list[Case] = [
    # -- JSON shape and types
    Case("inputs-not-a-string", {"inputs": 5}, 422, "inputs"),
    Case("inputs-missing", {"parameters": {"max_new_tokens": 2}}, 422, "inputs"),
    Case("inputs-empty", {"inputs": ""}, 422, "inputs"),
    Case("inputs-null", {"inputs": None}, 422, "inputs"),
    Case("parameters-not-an-object", {"inputs": "hi", "parameters": [1, 2]}, 422, "parameters"),
    Case("body-is-an-array", b"[1, 2, 3]", 422, "body"),
    Case("body-empty", b"", (400, 422), "body"),
    Case("body-not-json", b'{"inputs": "hi", ', 400, "json"),
    Case("body-deeply-nested", b"[" * 20000 + b"]" * 20000, 400, "body"),
    Case(
        "content-type-not-json",
        b'{"inputs": "hi"}',
        415,
        "content-type: application/json",
        headers={"content-type": "text/plain"},
    ),
    Case("invalid-utf8", b'{"inputs": "caf\xe9 \xff\xfe"}', 400, "utf-8"),
    Case("oversized-body", lambda s: {"inputs": "x" * 70_000}, 413, "exceeds"),
    Case("oversized-declared-length", b"{}", 413, "exceeds", headers={"content-length": "999999999"}),
    # -- token budgets
    Case("max-new-tokens-string", p(max_new_tokens="ten"), 422, "max_new_tokens"),
    Case("max-new-tokens-float", p(max_new_tokens=2.5), 422, "max_new_tokens"),
    Case("max-new-tokens-zero", p(max_new_tokens=0), 422, "max_new_tokens"),
    Case("max-new-tokens-negative", p(max_new_tokens=-5), 422, "max_new_tokens"),
    Case("max-new-tokens-huge", p(max_new_tokens=10**9), 422, "max_new_tokens"),
    Case("max-new-tokens-beyond-int64", p(max_new_tokens=2**70), 422, "max_new_tokens"),
    Case(
        "prompt-over-max-input-length",
        {"inputs": LONG_PROMPT, "parameters": {"max_new_tokens": 2}},
        422,
        "inputs",
    ),
    Case("truncate-negative", p(truncate=-1), 422, "truncate"),
    Case("truncate-over-max-input-length", p(truncate=1000), 422, "truncate"),
    # -- sampling ranges
    Case("top-p-zero", p(top_p=0.0), 422, "top_p"),
    Case("top-p-above-one", p(top_p=1.5), 422, "top_p"),
    Case("top-p-negative", p(top_p=-0.1), 422, "top_p"),
    Case("typical-p-one", p(typical_p=1.0), 422, "typical_p"),
    Case("typical-p-zero", p(typical_p=0.0), 422, "typical_p"),
    Case("frequency-penalty-over-two", p(frequency_penalty=2.5), 422, "frequency_penalty"),
    Case("presence-penalty-under-minus-two", p(presence_penalty=-3), 422, "presence_penalty"),
    Case("temperature-negative", p(temperature=-1.0), 422, "temperature"),
    Case("temperature-a-string", p(temperature="hot"), 422, "temperature"),
    Case("top-k-zero", p(top_k=0), 422, "top_k"),
    Case("repetition-penalty-zero", p(repetition_penalty=0.0), 422, "repetition_penalty"),
    Case("seed-negative", p(seed=-1), 422, "seed"),
    Case("return-k-alternatives-zero", p(return_k_alternatives=0), 422, "return_k_alternatives"),
    Case("best-of-zero", p(best_of=0, do_sample=True), 422, "best_of"),
    Case("best-of-too-many", p(best_of=99, do_sample=True), 422, "best_of"),
    # LoRAX sends a stream's validation errors as one SSE event on a 200 stream
    Case("best-of-with-streaming", p(best_of=2, do_sample=True), 200, "best_of", path="/generate_stream"),
    Case("best-of-greedy", p(best_of=2), 422, "best_of"),
    Case(
        "decoder-input-details-streaming",
        p(decoder_input_details=True),
        200,
        "decoder_input_details",
        path="/generate_stream",
    ),
    Case("stop-not-a-list-of-strings", p(stop=[1, {"a": 2}]), 422, "stop"),
    Case("ten-thousand-stop-sequences", p(stop=["a"] * 10_000), 422, "stop"),
    Case(
        "response-format-bad-schema",
        p(response_format={"type": "json_object", "schema": {"type": "wat"}}),
        422,
        "response_format",
    ),
    # -- adapters: one that does not exist or fails to load is LoRAX's 424; a refusal keeps 403
    Case("adapter-source-unknown", p(adapter_id="x", adapter_source="ftp"), 422, "adapter_source"),
    Case("adapter-id-wrong-type", p(adapter_id=["a"]), 422, "adapter_id"),
    Case(
        "adapter-local-missing",
        lambda s: p(adapter_id=str(s.assets.root / "adapters" / "nope"), adapter_source="local"),
        424,
        "not a readable adapter directory",
    ),
    Case(
        "adapter-hub-missing",
        p(adapter_id="nobody/nothing", adapter_source="hub"),
        (401, 424),
        "nobody/nothing",
    ),
    Case(
        "adapter-s3-missing",
        p(adapter_id="s3://adapters/nothing-here", adapter_source="s3"),
        424,
        "not found",
    ),
    Case("adapter-s3-no-bucket", p(adapter_id="s3://", adapter_source="s3"), 424, "bucket"),
    Case("adapter-for-another-base-model", local("other_base"), 424, "different base model"),
    Case("adapter-safetensors-corrupt", local("corrupt"), 424, "corrupt"),
    Case(
        "adapter-safetensors-corrupt-on-s3",
        lambda s: p(adapter_id=s.peers.s3_uri("corrupt"), adapter_source="s3"),
        424,
        "corrupt",
    ),
    Case("adapter-safetensors-truncated", local("truncated"), 424, "truncated"),
    Case("adapter-bin-malicious-pickle", local("pickle"), 424, "pickled code is refused"),
    Case("adapter-config-absurd-rank", local("absurd_rank"), 424, "rank"),
    Case("adapter-rank-larger-than-model", local("rank_too_big"), 424, "rank"),
    Case("adapter-config-not-json", local("config_not_json"), 424, "not valid json"),
    Case("adapter-not-lora", local("not_lora"), 424, "only lora"),
    # the same answer as a missing directory: callers cannot probe which paths exist (issue 17)
    Case("adapter-dir-empty", local("empty_dir"), 424, "not a readable adapter directory"),
    Case(
        "adapter-path-traversal",
        lambda s: p(adapter_id=f"{s.assets.root}/adapters/../../../../etc", adapter_source="local"),
        403,
        "'..'",
    ),
    Case("adapter-path-outside-roots", p(adapter_id="/etc", adapter_source="local"), 403, "outside"),
    Case("adapter-symlink-escapes-root", local("symlink_escape"), 403, "outside"),
    Case("adapter-home-expansion", p(adapter_id="~root/.ssh", adapter_source="local"), 403, "outside"),
    # -- the OpenAI routes share the rules
    Case(
        "openai-max-tokens-negative",
        {"model": "", "prompt": "hi", "max_tokens": -1},
        422,
        "max_new_tokens",
        path="/v1/completions",
    ),
    Case("openai-messages-missing", {"model": ""}, 422, "messages", path="/v1/chat/completions"),
    Case(
        "openai-prompt-token-out-of-vocab",
        {"model": "", "prompt": [10**9], "max_tokens": 2},
        422,
        "token",
        path="/v1/completions",
    ),
    Case(
        "openai-prompt-negative-token",
        {"model": "", "prompt": [-3, 5], "max_tokens": 2},
        422,
        "token",
        path="/v1/completions",
    ),
    Case(
        "openai-unknown-model-adapter",
        {"model": "nobody/nothing", "prompt": "hi", "max_tokens": 2},
        (401, 403, 404),
        "nobody/nothing",
        path="/v1/completions",
    ),
]


def send(client: httpx.Client, stack: Stack, case: Case) -> httpx.Response:
    body = case.body(stack) if callable(case.body) else case.body
    headers = {"content-type": "application/json", **(case.headers or {})}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    if "content-length" in headers:  # a lying Content-Length: HTTP clients refuse to send one
        return raw_post(stack, case.path, content, headers)
    return client.post(case.path, content=content, headers=headers)


def raw_post(stack: Stack, path: str, content: bytes, headers: dict[str, str]) -> httpx.Response:
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{stack.server.port}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    with socket.create_connection(("127.0.0.1", stack.server.port), timeout=30) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + content)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return httpx.Response(status, content=body)


def answer_error(r: httpx.Response) -> str:
    """The error message of a JSON error body, or of the one error event of a 200 SSE stream."""
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        events = [json.loads(line[5:]) for line in r.text.splitlines() if line.startswith("data:")]
        if len(events) != 1 or "error" not in events[0]:
            raise ValueError(f"not one error event: {r.text[:200]!r}")
        return str(events[0]["error"])
    return error_message(r)


def test_table_has_every_kind_of_case() -> None:
    assert len(CASES) >= 40
    assert len({c.name for c in CASES}) == len(CASES)


def test_bad_inputs_get_named_4xx_while_good_traffic_flows(stack: Stack, oracle: dict) -> None:
    problems: list[str] = []
    with GoodTraffic(stack, oracle) as traffic, httpx.Client(base_url=stack.url, timeout=60) as client:
        traffic.wait_served(5)  # every adapter source warmed up: the table runs against live traffic
        before = traffic.served
        # On an idle machine one pass of the table can finish before a good request does: repeat it
        # (at most 5 passes) until good traffic has demonstrably been served while it ran.
        for _ in range(5):
            for case in CASES:
                try:
                    r = send(client, stack, case)
                except httpx.HTTPError as e:
                    problems.append(f"{case.name}: {type(e).__name__}: {e}")
                    continue
                allowed = case.status if isinstance(case.status, tuple) else (case.status,)
                if r.status_code not in allowed:
                    problems.append(f"{case.name}: HTTP {r.status_code} (want {allowed}): {r.text[:300]}")
                    continue
                try:
                    message = answer_error(r)
                except ValueError:
                    problems.append(f"{case.name}: error body is not JSON: {r.text[:200]!r}")
                    continue
                if case.says not in message.lower():
                    problems.append(f"{case.name}: message does not say {case.says!r}: {message[:300]!r}")
            if traffic.served - before >= 3:
                break
        # Good traffic must have overlapped the table, not just run before or after it.
        served_during_table = traffic.served - before
    assert not problems, "\n".join(problems)
    assert not traffic.failures, "\n".join(traffic.failures[:20])
    assert served_during_table >= 3
    assert not stack.assets.pwned_marker.exists(), "the malicious pickle ran a command on the server"


@pytest.mark.parametrize("path", ["/generate", "/generate_stream"])
def test_truncate_shortens_a_prompt_that_fits_but_never_admits_a_longer_one(stack: Stack, path: str) -> None:
    """LoRAX's router checks `--max-input-length` on the untruncated prompt."""
    body = {
        "inputs": "hello world " * 3,
        "parameters": {"max_new_tokens": 2, "truncate": 16, "details": True},
    }
    r = httpx.post(stack.url + path, json=body, timeout=60)
    assert r.status_code == 200, r.text
    if path == "/generate":
        assert r.json()["details"]["prompt_tokens"] == 16
    too_long = {"inputs": LONG_PROMPT, "parameters": {"max_new_tokens": 2, "truncate": 16}}
    r = httpx.post(stack.url + path, json=too_long, timeout=60)
    assert r.status_code == (422 if path == "/generate" else 200), r.text  # streams: one error event
    assert "`inputs` must have less than 48 tokens" in answer_error(r), r.text
