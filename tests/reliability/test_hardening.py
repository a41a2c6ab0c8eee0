"""Issue 17 (hardening), end to end on the demo model: what one request may cost, and what it may send.

- One OpenAI request cannot starve everyone: `n`, `best_of` and the prompts per request are
  bounded, and every sequence counts against `--max-concurrent-requests`.
- A huge prompt is refused by its length in characters before it is tokenized, and tokenizing
  runs off the event loop, so `/health` keeps answering while large prompts arrive.
- Degenerate numbers and text get a 4xx JSON error, never a 500 or a body with `NaN` in it.

Every answer here is parsed as strict JSON (no `NaN`/`Infinity` literals), and the demo adapters'
known answers must stay correct throughout.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.demo.cases import MODEL_DIR, adapter_dir, demo_cases, demo_inputs
from tests.fixtures.server import ServerProcess, start_server

MAX_CONCURRENT = 8
REVERSE = str(adapter_dir("reverse"))
UPPER = str(adapter_dir("upper"))
BIG = "the red fox " * 87_500  # 1.05 MB of text: ~1-2 s to tokenize, far over --max-input-length


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = start_server(
        MODEL_DIR,
        tmp_path_factory.mktemp("hardening"),
        "--adapter-source",
        "local",
        "--max-concurrent-requests",
        str(MAX_CONCURRENT),
        "--max-request-bytes",
        str(4 << 20),  # room for 1 MB prompts: the body limit is not what is under test
    )
    yield srv
    srv.stop()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"not JSON: {name}")


def strict_json(text: str) -> Any:
    """json.loads that refuses Python's `NaN`/`Infinity` extensions, as every other parser does."""
    return json.loads(text, parse_constant=_reject_constant)


def events(text: str) -> list[Any]:
    """Every `data:` payload of an SSE body, strictly parsed (OpenAI's `[DONE]` left out)."""
    out = []
    for line in text.splitlines():
        if line.startswith("data:") and line[5:].strip() != "[DONE]":
            out.append(strict_json(line[5:]))
    return out


def error_text(r: httpx.Response) -> str:
    body = strict_json(r.text)
    err = body["error"]
    return str(err["message"] if isinstance(err, dict) else err).lower()


def post_raw(srv: ServerProcess, path: str, content: bytes, timeout: float = 30) -> httpx.Response:
    return httpx.post(
        srv.url + path, content=content, headers={"content-type": "application/json"}, timeout=timeout
    )


# -- 1. one request cannot starve everyone ---------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "says"),
    [
        ("/v1/completions", {"prompt": "hi", "max_tokens": 1, "n": 3000}, "`n`"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 1, "n": 3}, "`n`"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "n": 3000},
            "`n`",
        ),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 1, "n": 3000, "best_of": 3000}, "`best_of`"),
        ("/v1/completions", {"prompt": ["hi"] * 5000, "max_tokens": 1}, "`prompt`"),
        ("/v1/completions", {"prompt": [[5, 6]] * 17, "max_tokens": 1}, "`prompt`"),
        # 5 prompts x n=2 = 10 sequences, more than --max-concurrent-requests 8 could ever hold
        ("/v1/completions", {"prompt": ["hi"] * 5, "max_tokens": 1, "n": 2}, "sequences"),
    ],
)
def test_openai_fan_out_is_bounded(server: ServerProcess, path: str, body: dict, says: str) -> None:
    start = time.monotonic()
    r = httpx.post(server.url + path, json=body, timeout=20)
    assert r.status_code == 422, r.text[:300]
    assert says in error_text(r)
    assert time.monotonic() - start < 5, "refused only after doing the work"


def test_fan_out_within_the_bounds_still_answers_correctly(server: ServerProcess) -> None:
    cases = demo_cases("reverse")[:4]
    r = httpx.post(
        server.url + "/v1/completions",
        json={"model": REVERSE, "prompt": [p for p, _ in cases], "max_tokens": 32},
        timeout=60,
    )
    assert r.status_code == 200, r.text[:300]
    got = [c["text"] for c in strict_json(r.text)["choices"]]
    assert got == [want for _, want in cases]
    # n x prompts = the limit exactly: allowed
    r = httpx.post(
        server.url + "/v1/completions",
        json={"prompt": ["hello", "world", "a", "b"], "max_tokens": 2, "n": 2, "seed": 1},
        timeout=60,
    )
    assert r.status_code == 200, r.text[:300]
    assert len(strict_json(r.text)["choices"]) == 8
    r = httpx.post(
        server.url + "/generate",
        json={"inputs": "hello", "parameters": {"max_new_tokens": 2, "best_of": 2, "do_sample": True}},
        timeout=60,
    )
    assert r.status_code == 200, r.text[:300]


# -- 2. tokenizing never blocks the event loop -----------------------------------------------------


class HealthProbe:
    """Polls `/health` from a thread and keeps the slowest answer seen."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.worst = 0.0
        self.count = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                start = time.perf_counter()
                try:
                    r = client.get(self.url + "/health")
                    if r.status_code != 200:
                        self.failures.append(f"/health {r.status_code}")
                except httpx.HTTPError as e:
                    self.failures.append(f"/health {type(e).__name__}")
                self.worst = max(self.worst, time.perf_counter() - start)
                self.count += 1
                time.sleep(0.05)


def _post_all(srv: ServerProcess, requests: list[tuple[str, dict]]) -> list[httpx.Response]:
    def one(req: tuple[str, dict]) -> httpx.Response:
        path, body = req
        return post_raw(srv, path, json.dumps(body).encode(), timeout=120)

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(one, requests))


def test_huge_prompts_are_refused_by_length_while_health_answers(server: ServerProcess) -> None:
    requests = [
        ("/generate", {"inputs": BIG, "parameters": {"max_new_tokens": 2}}),
        ("/generate_stream", {"inputs": BIG, "parameters": {"max_new_tokens": 2}}),
        ("/v1/completions", {"prompt": BIG, "max_tokens": 2}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": BIG}], "max_tokens": 2}),
    ] * 2
    with HealthProbe(server.url) as probe:
        time.sleep(0.2)
        start = time.monotonic()
        responses = _post_all(server, requests)
        took = time.monotonic() - start
        time.sleep(0.2)
    for (path, _), r in zip(requests, responses, strict=True):
        # LoRAX sends a stream's validation error as one event on a 200 stream
        want = 200 if path == "/generate_stream" else 422
        assert r.status_code == want, f"{path}: {r.status_code} {r.text[:200]}"
        text = events(r.text)[0]["error"].lower() if want == 200 else error_text(r)
        assert "tokens" in text, r.text[:300]
    assert not probe.failures, probe.failures[:5]
    assert probe.worst < 0.5, f"/health took {probe.worst:.2f} s while huge prompts were refused"
    assert took < 10, f"eight refusals took {took:.1f} s"


def test_truncate_does_not_admit_huge_prompts(server: ServerProcess) -> None:
    """LoRAX checks the untruncated length (issue 15), so `truncate` no longer makes a 1 MB prompt
    worth tokenizing: it is refused by its characters, at once, while /health keeps answering."""
    body = {"inputs": BIG, "parameters": {"max_new_tokens": 2, "truncate": 16, "details": True}}
    with HealthProbe(server.url) as probe:
        time.sleep(0.2)
        start = time.monotonic()
        responses = _post_all(server, [("/generate", body)] * 4)
        took = time.monotonic() - start
        time.sleep(0.2)
    for r in responses:
        assert r.status_code == 422, r.text[:300]
        assert "`inputs` must have less than" in error_text(r), r.text[:300]
    assert not probe.failures, probe.failures[:5]
    assert probe.worst < 0.5, f"/health took {probe.worst:.2f} s while huge prompts were refused"
    assert took < 5, f"four refusals took {took:.1f} s"


# -- 3. degenerate numbers and text: 4xx JSON, never a 500 or NaN ---------------------------------


def test_tiny_temperature_decodes_greedily_with_finite_logprobs(server: ServerProcess) -> None:
    prompt, want = demo_cases("reverse")[0]
    params = {
        "adapter_id": REVERSE,
        "max_new_tokens": 32,
        "do_sample": True,
        "temperature": 1e-300,  # 0.0 in float32
        "details": True,
        "decoder_input_details": True,
        "return_k_alternatives": 3,
    }
    r = post_raw(server, "/generate", json.dumps({"inputs": prompt, "parameters": params}).encode())
    assert r.status_code == 200, r.text[:300]
    body = strict_json(r.text)
    assert body["generated_text"] == want
    assert all(t["logprob"] <= 0 for t in body["details"]["tokens"])

    del params["decoder_input_details"]
    r = post_raw(server, "/generate_stream", json.dumps({"inputs": prompt, "parameters": params}).encode())
    assert r.status_code == 200, r.text[:300]
    got = events(r.text)
    assert got[-1]["generated_text"] == want
    assert all("error" not in e for e in got)

    chat = {
        "model": UPPER,
        "messages": [{"role": "user", "content": demo_inputs("upper")[0]}],
        "temperature": 1e-300,
        "logprobs": True,
        "top_logprobs": 2,
        "max_tokens": 32,
    }
    want_upper = demo_cases("upper")[0][1]
    r = post_raw(server, "/v1/chat/completions", json.dumps(chat).encode())
    assert r.status_code == 200, r.text[:300]
    assert strict_json(r.text)["choices"][0]["message"]["content"] == want_upper
    r = post_raw(server, "/v1/chat/completions", json.dumps({**chat, "stream": True}).encode())
    assert r.status_code == 200, r.text[:300]
    chunks = events(r.text)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == want_upper


def test_tiny_repetition_penalty_keeps_json_valid(server: ServerProcess) -> None:
    body = {
        "inputs": "hello hello",
        "parameters": {"max_new_tokens": 4, "repetition_penalty": 1e-300, "details": True},
    }
    r = post_raw(server, "/generate", json.dumps(body).encode())
    assert r.status_code == 200, r.text[:300]
    strict_json(r.text)
    r = post_raw(server, "/generate_stream", json.dumps(body).encode())
    assert r.status_code == 200, r.text[:300]
    assert all("error" not in e for e in events(r.text))


@pytest.mark.parametrize(
    ("path", "raw", "says"),
    [
        ("/generate", b'{"inputs": "hi", "parameters": {"temperature": NaN}}', "temperature"),
        ("/generate", b'{"inputs": "hi", "parameters": {"temperature": Infinity}}', "temperature"),
        ("/generate", b'{"inputs": "hi", "parameters": {"temperature": 1e999}}', "temperature"),
        ("/generate", b'{"inputs": "hi", "parameters": {"repetition_penalty": NaN}}', "repetition_penalty"),
        (
            "/generate",
            b'{"inputs": "hi", "parameters": {"repetition_penalty": Infinity}}',
            "repetition_penalty",
        ),
        ("/generate", b'{"inputs": "hi", "parameters": {"top_p": -Infinity}}', "top_p"),
        (
            "/generate",
            b'{"inputs": "hi", "parameters": {"merged_adapters": {"ids": ["a"], "weights": [NaN]}}}',
            "weights",
        ),
        ("/generate_stream", b'{"inputs": "hi", "parameters": {"temperature": NaN}}', "temperature"),
        ("/", b'{"inputs": "hi", "parameters": {"typical_p": NaN}}', "typical_p"),
        ("/v1/completions", b'{"prompt": "hi", "temperature": NaN}', "temperature"),
        ("/v1/completions", b'{"prompt": "hi", "repetition_penalty": Infinity}', "repetition_penalty"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "top_p": NaN}', "top_p"),
    ],
)
def test_non_finite_numbers_are_422(server: ServerProcess, path: str, raw: bytes, says: str) -> None:
    r = post_raw(server, path, raw)
    assert r.status_code == 422, r.text[:300]
    msg = error_text(r)
    assert says in msg and "finite" in msg, msg


@pytest.mark.parametrize(
    ("path", "raw", "says"),
    [
        ("/generate", b'{"inputs": "\\ud800"}', "inputs"),
        ("/generate", b'{"inputs": "abc \\udfff def", "parameters": {"max_new_tokens": 2}}', "inputs"),
        ("/generate_stream", b'{"inputs": "x\\ud800"}', "inputs"),
        ("/generate", b'{"inputs": "hi", "parameters": {"stop": ["\\ud800"]}}', "stop"),
        ("/generate", b'{"inputs": "hi", "parameters": {"adapter_id": "\\ud800"}}', "adapter_id"),
        ("/v1/completions", b'{"prompt": "\\ud800"}', "prompt"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "content"),
    ],
)
def test_lone_surrogates_are_400_json(server: ServerProcess, path: str, raw: bytes, says: str) -> None:
    r = post_raw(server, path, raw)
    assert r.status_code == 400, r.text[:300]
    msg = error_text(r)
    assert says in msg and "surrogate" in msg, msg


def test_demo_answers_after_the_abuse(server: ServerProcess) -> None:
    """Nothing above left the server in a state that changes anyone's answer."""
    for task in ("reverse", "upper", "add"):
        prompt, want = demo_cases(task)[0]
        body = {"inputs": prompt, "parameters": {"adapter_id": str(adapter_dir(task)), "max_new_tokens": 32}}
        r = httpx.post(server.url + "/generate", json=body, timeout=60)
        assert r.status_code == 200, r.text[:300]
        assert r.json()["generated_text"] == want
    assert Path(server.log_path).exists()
    assert "Traceback" not in server.log()
