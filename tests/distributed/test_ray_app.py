"""The Ray Serve app (2 replicas of the demo model) against the single server, real clients,
adapter-aware routing, token hygiene and a killed replica. The kill runs last: it disturbs the
shared app."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.distributed.conftest import ADAPTERS, REPO, RayApp
from tests.fixtures.server import ServerProcess

pytestmark = pytest.mark.ray

LORAX_PYTHON = os.environ.get("LORAX_CLIENT_PYTHON") or str(REPO / ".venv-lorax" / "bin" / "python")
PROMPT = "<|user|>hello there<|assistant|>"
REPLICA = "x-loraserve-replica"

#: (path, body) pairs whose answers must be the single server's, byte for byte where deterministic.
CASES: list[tuple[str, dict[str, Any]]] = [
    ("/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 8, "details": True}}),
    *[
        (
            "/generate",
            {"inputs": PROMPT, "parameters": {"adapter_id": a, "details": True, "max_new_tokens": 12}},
        )
        for a in ADAPTERS.values()
    ],
    ("/generate", {"inputs": "<|user|>12 + 30<|assistant|>", "parameters": {"adapter_id": ADAPTERS["add"]}}),
    (
        "/generate",
        {
            "inputs": PROMPT,
            "parameters": {
                "merged_adapters": {"ids": [ADAPTERS["upper"], ADAPTERS["reverse"]], "weights": [0.7, 0.3]},
                "max_new_tokens": 10,
            },
        },
    ),
    ("/", {"inputs": PROMPT, "parameters": {"adapter_id": ADAPTERS["upper"]}, "stream": False}),
    ("/generate", {"inputs": PROMPT, "parameters": {"adapter_id": str(REPO / "demo" / "nope")}}),
    ("/generate", {"inputs": PROMPT, "parameters": {"temperature": -1}}),
    ("/v1/completions", {"model": ADAPTERS["reverse"], "prompt": PROMPT, "max_tokens": 10, "temperature": 0}),
    (
        "/v1/chat/completions",
        {
            "model": ADAPTERS["upper"],
            "messages": [{"role": "user", "content": "the red fox"}],
            "temperature": 0,
        },
    ),
]
_VOLATILE = ("id", "created", "system_fingerprint")  # OpenAI fields that differ per response


def _comparable(r: httpx.Response) -> tuple[int, Any]:
    if not r.headers.get("content-type", "").startswith("application/json"):
        return r.status_code, r.text
    body = r.json()
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if k not in _VOLATILE}
    return r.status_code, body


def _events(url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with httpx.stream("POST", url + "/generate_stream", json=body, timeout=60) as r:
        assert r.status_code == 200
        return [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]


def _replica_counts(app: RayApp) -> dict[str, dict[str, int]]:
    r = httpx.get(app.url + "/metrics", headers={"accept": "application/json"}, timeout=30)
    assert r.status_code == 200
    return {rep["replica"]: rep["counts"] for rep in r.json()["replicas"]}


def test_answers_equal_the_single_server(ray_app: RayApp, single_server: ServerProcess) -> None:
    for path, body in CASES:
        ours = httpx.post(ray_app.url + path, json=body, timeout=60)
        single = httpx.post(single_server.url + path, json=body, timeout=60)
        assert _comparable(ours) == _comparable(single), (path, body)
        assert ours.headers.get("x-generated-tokens") == single.headers.get("x-generated-tokens")
    body = {"inputs": PROMPT, "parameters": {"adapter_id": ADAPTERS["reverse"], "details": True}}
    ours, single = _events(ray_app.url, body), _events(single_server.url, body)
    assert len(ours) > 2 and ours == single  # one event per token, relayed as the replica sent them
    for path in ("/info", "/health"):
        ours, single = httpx.get(ray_app.url + path), httpx.get(single_server.url + path)
        assert (ours.status_code, ours.content) == (single.status_code, single.content), path
    time.sleep(1.5)  # replicas report what they served every second; /v1/models is their union

    def models(url: str) -> list[str]:
        return sorted(m["id"] for m in httpx.get(url + "/v1/models").json()["data"])

    assert models(ray_app.url) == models(single_server.url)


def test_lorax_client_and_openai_client(ray_app: RayApp, single_server: ServerProcess) -> None:
    script = textwrap.dedent(
        """
        import json, sys
        from lorax import Client, errors
        adapters = json.loads(sys.argv[2])
        client = Client(sys.argv[1], timeout=60)
        out = {"upper": client.generate("<|user|>the red fox<|assistant|>", adapter_id=adapters["upper"]).generated_text}
        events = list(client.generate_stream("<|user|>hello<|assistant|>", adapter_id=adapters["reverse"]))
        out["stream"] = [e.token.text for e in events] + [events[-1].generated_text]
        try:
            client.generate("hi", adapter_id=adapters["upper"], temperature=-1.0)
        except errors.ValidationError as e:
            out["error"] = type(e).__name__
        print(json.dumps(out))
        """
    )

    def lorax(url: str) -> dict[str, Any]:
        proc = subprocess.run(
            [LORAX_PYTHON, "-c", script, url, json.dumps(ADAPTERS)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])

    ours = lorax(ray_app.url)
    assert (
        ours["upper"] == "THE RED FOX"
        and ours["stream"][-1] == "olleh"
        and ours["error"] == "ValidationError"
    )
    assert ours == lorax(single_server.url)

    from openai import OpenAI

    def chat(url: str) -> tuple[str, list[str]]:
        client = OpenAI(base_url=url + "/v1", api_key="-")
        messages = [{"role": "user", "content": "the red fox"}]
        whole = client.chat.completions.create(model=ADAPTERS["upper"], messages=messages, temperature=0)
        stream = client.chat.completions.create(
            model=ADAPTERS["reverse"], messages=messages, temperature=0, stream=True
        )
        return whole.choices[0].message.content or "", [
            c.choices[0].delta.content or "" for c in stream if c.choices
        ]

    text, pieces = chat(ray_app.url)
    # streamed in pieces (a decode burst's tokens come as one chunk), the same ones either way
    assert text == "THE RED FOX" and len([p for p in pieces if p]) > 1
    single_text, single_pieces = chat(single_server.url)  # bursts' lengths follow the steps' pace
    assert (text, "".join(pieces)) == (single_text, "".join(single_pieces))


def test_requests_for_one_adapter_land_on_one_replica(ray_app: RayApp, tmp_path: Path) -> None:
    # Copies no other test uses: fresh routing keys, nothing loaded anywhere yet.
    adapters = [str(shutil.copytree(ADAPTERS[name], tmp_path / name)) for name in ("reverse", "add")]
    time.sleep(1.5)  # the counters of earlier tests' last requests reach the hub first
    before = _replica_counts(ray_app)
    served: dict[str, set[str]] = {}
    for adapter in adapters:
        body = {"inputs": PROMPT, "parameters": {"adapter_id": adapter, "max_new_tokens": 4}}
        for i in range(6):
            r = httpx.post(ray_app.url + "/generate", json=body, timeout=60)
            assert r.status_code == 200, r.text
            served.setdefault(adapter, set()).add(r.headers[REPLICA])
            if i == 0:
                time.sleep(1.0)  # the replica reports its new key to Ray's routers every 0.1 s
    assert all(len(replicas) == 1 for replicas in served.values()), served
    deadline = time.monotonic() + 10
    while True:  # replicas push their counters to the hub every second
        after = _replica_counts(ray_app)
        delta = {
            k: sum(after.get(r, {}).get(k, 0) - before.get(r, {}).get(k, 0) for r in after)
            for k in ("hits", "misses")
        }
        if delta["hits"] + delta["misses"] >= 12 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert delta == {"hits": 10, "misses": 2}  # one load per adapter, every other request a hit
    text = httpx.get(ray_app.url + "/metrics", timeout=30).text
    assert text.count("loraserve_ray_adapter_lru_hits_total{replica=") == 2
    assert "lorax_request_count" in text or "loraserve_" in text


def test_tokens_never_reach_ray_logs_or_metrics(ray_app: RayApp) -> None:
    secret, bearer = f"tok-{uuid.uuid4().hex}", f"bearer-{uuid.uuid4().hex}"
    for adapter in (ADAPTERS["upper"], str(REPO / "demo" / "missing")):
        body = {"inputs": PROMPT, "parameters": {"adapter_id": adapter, "api_token": secret}}
        r = httpx.post(
            ray_app.url + "/generate", json=body, headers={"Authorization": f"Bearer {bearer}"}, timeout=60
        )
        assert r.status_code in (200, 424) and secret not in r.text
    time.sleep(1.5)  # one metrics report
    assert secret not in httpx.get(ray_app.url + "/metrics").text
    for path in (ray_app.session_dir / "logs").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert secret.encode() not in data and bearer.encode() not in data, path


def _engine_totals(app: RayApp) -> dict[str, float]:
    """Sums over replicas of the engine's `running` gauge and generated-token counter."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {"running": 0.0, "tokens": 0.0}
    for family in text_string_to_metric_families(httpx.get(app.url + "/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name == "loraserve_engine_running":
                out["running"] += sample.value
            elif sample.name == "loraserve_engine_tokens_generated_total":
                out["tokens"] += sample.value
    return out


def test_a_client_that_leaves_aborts_its_request_on_the_replica(ray_app: RayApp) -> None:
    long = {"adapter_id": ADAPTERS["reverse"], "max_new_tokens": 480, "ignore_eos_token": True}
    # How long the whole request takes here: the client below gives up after a quarter of it, so
    # it leaves mid-generation however fast the machine is (a fixed 0.3 s outlived the request
    # once decode steps got faster).
    start = time.monotonic()
    httpx.post(
        ray_app.url + "/generate", json={"inputs": PROMPT, "parameters": long}, timeout=60
    ).raise_for_status()
    give_up = (time.monotonic() - start) / 4
    time.sleep(1.5)
    before = _engine_totals(ray_app)
    with httpx.stream(
        "POST", ray_app.url + "/generate_stream", json={"inputs": PROMPT, "parameters": long}
    ) as r:
        next(line for line in r.iter_lines() if line.startswith("data:"))  # then hang up
    with pytest.raises(httpx.TimeoutException):  # a non-streaming client that gives up
        httpx.post(ray_app.url + "/generate", json={"inputs": PROMPT, "parameters": long}, timeout=give_up)
    deadline = time.monotonic() + 60
    time.sleep(1.5)
    while (after := _engine_totals(ray_app))["running"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert after["running"] == 0
    # Run to the end, the two requests would have generated 960 tokens.
    assert after["tokens"] - before["tokens"] < 480, (before, after)


def test_a_killed_replica_fails_its_request_retryably_and_is_replaced(ray_app: RayApp) -> None:
    import ray
    from ray import serve

    body = {
        "inputs": PROMPT,
        "parameters": {"adapter_id": ADAPTERS["upper"], "max_new_tokens": 400, "ignore_eos_token": True},
    }
    events: list[str] = []
    with httpx.stream("POST", ray_app.url + "/generate_stream", json=body, timeout=60) as r:
        lines = r.iter_lines()
        events.append(next(line for line in lines if line.startswith("data:")))
        victim = r.headers[REPLICA]
        actor = ray.get_actor(f"SERVE_REPLICA::loraserve#LoraServeReplica#{victim}", namespace="serve")
        ray.kill(actor, no_restart=True)
        events.extend(line for line in lines if line.startswith("data:"))
    last = json.loads(events[-1][5:])
    assert last.get("error_type") == "unavailable", last  # the stream ended early, saying why

    # New requests: a retryable 503 at most while Ray notices, then answers from a live replica.
    statuses: list[int] = []
    result: dict[str, Any] = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = httpx.post(ray_app.url + "/generate", json={"inputs": PROMPT, "parameters": {}}, timeout=60)
        statuses.append(r.status_code)
        if r.status_code == 200:
            result = r.json()
            break
        assert r.status_code == 503 and r.headers.get("retry-after"), r.text
        time.sleep(0.5)
    assert result.get("generated_text"), statuses

    def replicas() -> set[str]:
        prefix = "SERVE_REPLICA::loraserve#LoraServeReplica#"
        named = ray.util.list_named_actors(all_namespaces=True)
        return {a["name"][len(prefix) :] for a in named if a["name"].startswith(prefix)}

    deadline = time.monotonic() + 120
    while (victim in replicas() or len(replicas()) < 2) and time.monotonic() < deadline:
        time.sleep(1.0)
    assert victim not in replicas() and len(replicas()) == 2  # Ray replaced the killed replica
    while serve.status().applications["loraserve"].status != "RUNNING" and time.monotonic() < deadline:
        time.sleep(1.0)
    for _ in range(4):  # both replicas answer again
        r = httpx.post(ray_app.url + "/generate", json={"inputs": PROMPT, "parameters": {}}, timeout=60)
        assert r.status_code == 200 and r.json() == result
