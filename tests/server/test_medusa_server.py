"""Medusa speculative decoding through a real server on the demo model: lossless, streamed, reported.

Two `loraserve serve` processes on the bundled demo model: one started with
`--adapter-id demo/medusa` (the default speculator), one without speculation.
Greedy answers must be identical, request for request, whether the requests
run alone or batched with other adapters and other speculators.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from loraserve.adapters.medusa_format import parse_adapter_dir
from loraserve.cli import main
from loraserve.engine.engine import Engine, EngineConfig
from loraserve.engine.params import SamplingParams
from loraserve.server.speculation import configure_speculation
from tests.demo.cases import DEMO_DIR, MODEL_DIR, TASKS, adapter_dir, demo_cases
from tests.fixtures.fake_hub import FakeHub
from tests.fixtures.s3_server import S3TestServer
from tests.fixtures.server import ServerProcess, start_server

MEDUSA = DEMO_DIR / "medusa"
UPPER_MEDUSA = DEMO_DIR / "adapters" / "upper_medusa"
LORAX_PYTHON = os.environ.get("LORAX_CLIENT_PYTHON") or str(
    Path(__file__).resolve().parents[2] / ".venv-lorax" / "bin" / "python"
)
PROSE = ["The big", "Anna saw", "There are", "A quick", "The cat runs", "Ben and Mia", "THE RED", "Kate"]

pytestmark = pytest.mark.skipif(not (MEDUSA / "config.json").is_file(), reason="demo/medusa not built")


def _serve(tmp: Path, *extra: str) -> ServerProcess:
    preload = [str(adapter_dir(t)) for t in TASKS]
    return start_server(
        MODEL_DIR, tmp, "--adapter-source", "local", "--preloaded-adapter-ids", *preload, *extra
    )


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    logs = tmp_path_factory.mktemp("medusa-logs")
    with ThreadPoolExecutor(2) as pool:  # both start at once: start-up is mostly waiting on imports
        starts = [pool.submit(_serve, logs, "--adapter-id", str(MEDUSA)), pool.submit(_serve, logs)]
    errors = [f.exception() for f in starts]
    if any(errors):
        for f, e in zip(starts, errors, strict=True):
            if e is None:
                f.result().stop()
        raise next(e for e in errors if e is not None)
    spec, plain = (f.result() for f in starts)
    yield spec, plain
    spec.stop()
    plain.stop()


def _cases() -> list[tuple[str, str | None, dict]]:
    """(inputs, adapter_id, extra parameters): chat prompts per adapter, prose on the base model."""
    cases: list[tuple[str, str | None, dict]] = []
    for task in TASKS:
        for prompt, _ in demo_cases(task)[:4]:
            cases.append((prompt, str(adapter_dir(task)), {}))
            cases.append((prompt, None, {}))
    for prompt, _ in demo_cases("upper")[4:8]:
        cases.append((prompt, str(UPPER_MEDUSA), {}))  # LoRA + its own heads, per request
    for prompt in PROSE:
        cases.append((prompt, None, {"max_new_tokens": 64}))
        cases.append((prompt, str(UPPER_MEDUSA), {"max_new_tokens": 24}))
    return cases


def _without_heads(cases: list[tuple[str, str | None, dict]]) -> list[tuple[str, str | None, dict]]:
    """The plain server's reference: `upper_medusa`'s LoRA part is the `upper` adapter, byte for byte."""
    return [(i, str(adapter_dir("upper")) if a == str(UPPER_MEDUSA) else a, e) for i, a, e in cases]


async def _generate_all(url: str, cases: list[tuple[str, str | None, dict]]) -> list[dict]:
    """All cases at once, so speculated, LoRA and per-request-heads rows share batches."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def one(inputs: str, adapter: str | None, extra: dict) -> dict:
            params = {"max_new_tokens": 32, "details": True, **extra}
            if adapter:
                params["adapter_id"] = adapter
            r = await client.post("/generate", json={"inputs": inputs, "parameters": params})
            assert r.status_code == 200, r.text
            return r.json()

        return await asyncio.gather(*(one(*c) for c in cases))


def _ids(resp: dict) -> list[int]:
    return [t["id"] for t in resp["details"]["tokens"]]


def _metrics(server: ServerProcess) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return {m[1]: float(m[2]) for m in re.finditer(r"^(\w+) ([-+.\deE]+|NaN)$", text, re.M)}


def test_greedy_is_identical_with_and_without_speculation(servers) -> None:
    spec, plain = servers
    cases = _cases()
    got = asyncio.run(_generate_all(spec.url, cases))
    want = asyncio.run(_generate_all(plain.url, _without_heads(cases)))
    for case, g, w in zip(cases, got, want, strict=True):
        assert g["generated_text"] == w["generated_text"], case
        assert _ids(g) == _ids(w), case
        assert g["details"]["finish_reason"] == w["details"]["finish_reason"], case
        assert "speculative_tokens_per_step" not in w["details"]  # the plain server adds nothing
    rates = [g["details"].get("speculative_tokens_per_step") for g in got]
    assert all(r is not None and r >= 1.0 for r in rates)
    prose = [g["details"]["speculative_tokens_per_step"] for (_, a, _), g in zip(cases, got) if a is None]
    assert sum(prose) / len(prose) > 1.5  # drafts are really accepted, not just verified
    # the README's demo answers hold with speculation on
    demo = {"reverse": ("hello", "olleh"), "upper": ("hello", "HELLO"), "add": ("12 + 30", "42")}
    for task, (text, answer) in demo.items():
        r = httpx.post(
            spec.url + "/generate",
            json={
                "inputs": f"<|user|>{text}<|assistant|>",
                "parameters": {"adapter_id": str(adapter_dir(task)), "max_new_tokens": 20},
            },
            timeout=60,
        )
        assert r.json() == {"generated_text": answer}
    base = httpx.post(
        spec.url + "/generate",
        json={"inputs": "<|user|>hello<|assistant|>", "parameters": {"max_new_tokens": 20}},
        timeout=60,
    )
    assert base.json() == {"generated_text": "hello"}


def test_stop_sequences_length_and_eos_match(servers) -> None:
    spec, plain = servers
    cases = [
        ("There are", None, {"stop": [" cars"], "max_new_tokens": 64}),
        ("The big", None, {"stop": ["."], "max_new_tokens": 64}),
        ("The big", None, {"max_new_tokens": 7}),
        ("Anna saw", None, {"max_new_tokens": 1}),
        ("<|user|>the red fox<|assistant|>", str(adapter_dir("upper")), {"max_new_tokens": 64}),  # EOS
        ("<|user|>the red fox<|assistant|>", None, {"max_new_tokens": 64, "ignore_eos_token": True}),
        ("<|user|>hello<|assistant|>", str(UPPER_MEDUSA), {"stop": ["L"], "max_new_tokens": 20}),
    ]
    got = asyncio.run(_generate_all(spec.url, cases))
    want = asyncio.run(_generate_all(plain.url, _without_heads(cases)))
    reasons = set()
    for case, g, w in zip(cases, got, want, strict=True):
        assert g["generated_text"] == w["generated_text"], case
        assert _ids(g) == _ids(w), case
        for key in ("finish_reason", "generated_tokens"):
            assert g["details"][key] == w["details"][key], (case, key)
        reasons.add(g["details"]["finish_reason"])
    assert reasons == {"stop_sequence", "length", "eos_token"}
    assert got[2]["details"]["generated_tokens"] == 7 and got[3]["details"]["generated_tokens"] == 1


def _stream(server: ServerProcess, inputs: str, params: dict) -> list[dict]:
    events = []
    body = {"inputs": inputs, "parameters": params}
    with httpx.stream("POST", server.url + "/generate_stream", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    return events


def test_streaming_sends_one_event_per_token(servers) -> None:
    spec, plain = servers
    for inputs, adapter in (("There are", None), ("<|user|>the red fox<|assistant|>", str(UPPER_MEDUSA))):
        params = {"max_new_tokens": 48, "details": True, **({"adapter_id": adapter} if adapter else {})}
        got = _stream(spec, inputs, params)
        ref = {**params, **({"adapter_id": str(adapter_dir("upper"))} if adapter else {})}
        want = httpx.post(
            plain.url + "/generate", json={"inputs": inputs, "parameters": ref}, timeout=60
        ).json()
        assert [e["token"]["id"] for e in got] == _ids(want)  # several tokens per step, one event each
        assert all(e["generated_text"] is None for e in got[:-1])
        last = got[-1]
        assert last["generated_text"] == want["generated_text"]
        assert last["details"]["generated_tokens"] == len(got)
        assert last["details"]["speculative_tokens_per_step"] > 1.0


def test_tokens_from_accepted_drafts_are_skipped(servers) -> None:
    """LoRAX 0.7's `Token.skipped` / `Details.skipped_tokens`: set for draft-accepted tokens only,
    on `/generate` and on every stream event; the plain server never skips."""
    spec, plain = servers
    body = {"inputs": "There are", "parameters": {"max_new_tokens": 32, "details": True}}
    for server, speculated in ((spec, True), (plain, False)):
        r = httpx.post(server.url + "/generate", json=body, timeout=60)
        assert r.status_code == 200, r.text
        details = r.json()["details"]
        flags = [t["skipped"] for t in details["tokens"]]
        assert details["skipped_tokens"] == sum(flags)
        assert r.headers["x-skipped-tokens"] == str(sum(flags))
        assert (sum(flags) > 0) == speculated
        assert not flags[0]  # the first token comes from the prefill, never from a draft
        events = _stream(server, body["inputs"], body["parameters"])
        assert [e["token"]["skipped"] for e in events] == flags


def test_alternatives_on_every_token_of_a_speculative_step(servers) -> None:
    """`return_k_alternatives` covers tokens accepted from drafts too, not only each step's first."""
    spec, _ = servers
    params = {"max_new_tokens": 24, "details": True, "return_k_alternatives": 2}
    r = httpx.post(spec.url + "/generate", json={"inputs": "There are", "parameters": params}, timeout=60)
    assert r.status_code == 200, r.text
    tokens = r.json()["details"]["tokens"]
    assert any(t["skipped"] for t in tokens)  # the request was speculated
    assert all(len(t["alternative_tokens"]) == 2 for t in tokens)
    events = _stream(spec, "There are", params)
    assert all(len(e["token"]["alternative_tokens"]) == 2 for e in events)


def test_metrics_info_and_freed_blocks(servers) -> None:
    spec, plain = servers
    assert httpx.get(spec.url + "/info").json()["speculative_tokens"] == 4  # as many as the heads
    assert httpx.get(plain.url + "/info").json()["speculative_tokens"] == 0
    asyncio.run(_generate_all(spec.url, [("The big", None, {})]))
    m = _metrics(spec)
    assert m["loraserve_speculative_steps_total"] > 0
    assert m["loraserve_speculative_tokens_total"] > m["loraserve_speculative_steps_total"]
    assert m["loraserve_speculative_tokens_per_step"] > 1.0
    for server in (spec, plain):
        m = _metrics(server)
        assert m["loraserve_engine_free_blocks"] == m["loraserve_engine_total_blocks"]
        assert m["lorax_batch_current_size"] == 0
    assert _metrics(plain)["loraserve_speculative_steps_total"] == 0


def test_heads_without_a_default_speculator_are_a_422(servers) -> None:
    _, plain = servers
    for adapter in (MEDUSA, UPPER_MEDUSA):
        body = {"inputs": "hello", "parameters": {"adapter_id": str(adapter), "max_new_tokens": 4}}
        for route in ("/generate", "/generate_stream"):
            r = httpx.post(plain.url + route, json=body, timeout=60)
            if route == "/generate":
                assert r.status_code == 422, (route, r.text)
                err = r.json()
            else:  # LoRAX: an error before the first token is one event on a 200 stream
                assert r.status_code == 200, (route, r.text)
                err = json.loads(r.text.strip().removeprefix("data:"))
            assert err["error_type"] == "validation"
            assert "default Medusa adapter" in err["error"] and "--adapter-id" in err["error"]
        chat = {"model": str(adapter), "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
        r = httpx.post(plain.url + "/v1/chat/completions", json=chat, timeout=60)
        assert r.status_code == 422 and "default Medusa adapter" in r.json()["error"]["message"]
    # plain LoRA requests still work there
    body = {"inputs": "<|user|>hello<|assistant|>", "parameters": {"adapter_id": str(adapter_dir("upper"))}}
    assert httpx.post(plain.url + "/generate", json=body, timeout=60).json()["generated_text"] == "HELLO"


def test_default_heads_from_the_hub_and_per_request_heads_from_s3(servers, tmp_path: Path) -> None:
    """Heads travel through the adapter store like any adapter: `--adapter-id` from a hub, per request from S3."""
    _, plain = servers
    s3, hub = S3TestServer().start(), FakeHub().start()
    try:
        hub.add_repo("acme/demo-medusa", MEDUSA)
        uri = s3.upload_dir(UPPER_MEDUSA, "adapters", "team/upper-medusa")
        env = {**s3.env(), "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "hf")}
        flags = ("--adapter-id", "acme/demo-medusa", "--adapter-source", "hub")
        srv = start_server(
            MODEL_DIR, tmp_path, *flags, "--adapter-cache-dir", str(tmp_path / "cache"), env=env
        )
        try:
            assert httpx.get(srv.url + "/info").json()["speculative_tokens"] == 4
            fox = "<|user|>the red fox<|assistant|>"
            cases = [("There are", None, {"max_new_tokens": 48}), (fox, uri, {"adapter_source": "s3"})]
            got = asyncio.run(_generate_all(srv.url, cases))
        finally:
            srv.stop()
    finally:
        s3.stop()
        hub.stop()
    want = asyncio.run(
        _generate_all(plain.url, [cases[0], (fox, str(adapter_dir("upper")), {"adapter_source": "local"})])
    )
    assert [_ids(g) for g in got] == [_ids(w) for w in want]
    assert got[1]["generated_text"] == "THE RED FOX"
    assert all(g["details"]["speculative_tokens_per_step"] > 1.5 for g in got)


def test_speculative_tokens_without_heads_refuse_to_start(capsys: pytest.CaptureFixture) -> None:
    assert main(["serve", "--model-id", str(MODEL_DIR), "--speculative-tokens", "2"]) == 2
    assert "needs Medusa heads" in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "per_step"), [(0, 4), (2, 2), (9, 4)])
def test_speculative_tokens_cap_the_drafts(flag: int, per_step: int) -> None:
    engine = Engine.from_pretrained(
        MODEL_DIR, EngineConfig(kv_cache_memory_bytes=8 << 20, adapter_memory_bytes=8 << 20, max_lora_rank=16)
    )
    assert configure_speculation(engine, parse_adapter_dir(MEDUSA), flag) == per_step
    engine.generate(PROSE[:1], SamplingParams(max_new_tokens=40))
    assert engine.spec_steps > 0 and engine.spec_tokens / engine.spec_steps <= per_step + 1
    assert engine.spec_tokens / engine.spec_steps > (1.5 if per_step == 2 else 2.0)


@pytest.mark.skipif(not Path(LORAX_PYTHON).is_file(), reason="lorax-client venv not found")
def test_lorax_client_reads_details_with_speculation(servers) -> None:
    spec, _ = servers
    script = (
        "import sys\nfrom lorax import Client\n"
        "r = Client(sys.argv[1], timeout=60).generate('There are', max_new_tokens=16, details=True)\n"
        "print(r.details.generated_tokens, r.generated_text)\n"
    )
    proc = subprocess.run([LORAX_PYTHON, "-c", script, spec.url], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    raw = httpx.post(
        spec.url + "/generate",
        json={"inputs": "There are", "parameters": {"max_new_tokens": 16, "details": True}},
        timeout=60,
    ).json()
    assert "speculative_tokens_per_step" in raw["details"]
    assert proc.stdout.strip() == f"16 {raw['generated_text']}"
