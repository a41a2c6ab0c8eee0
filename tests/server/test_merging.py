"""`parameters.merged_adapters` end to end through a real server (issue 5).

The merge's expected result never comes from loraserve's merge code: linear
and TIES are rebuilt with PEFT's `merge_utils` (see `merge_oracle.py`) and
served as an ordinary adapter, so "merged request == request with the oracle
adapter" checks the merge, the cache key and the serving path together.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fixtures.fake_hub import FakeHub
from tests.fixtures.server import ServerProcess, start_server
from tests.fixtures.tiny_models import make_peft_adapter
from tests.server.merge_oracle import peft_greedy, write_oracle_merge
from tests.server.test_lorax_client import LORAX_PYTHON, run_client

PROMPTS = ("hello world", "the quick brown fox")
NEW_TOKENS = 10
SECRET = "hf_merge_private_token_31337"
# Same rank, partly overlapping targets and different alphas: union and first-config scale both matter.
MERGE_ADAPTERS: dict[str, dict] = {
    "m1": dict(target_modules=("q_proj", "v_proj", "down_proj"), seed=21, lora_alpha=16),
    "m2": dict(target_modules=("q_proj", "o_proj", "up_proj"), seed=22, lora_alpha=32),
    "m3": dict(target_modules=("v_proj", "down_proj"), seed=23, lora_alpha=8),
}


@pytest.fixture(scope="module")
def merge_dirs(
    tiny_assets: tuple[Path, dict[str, Path]], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    model, _ = tiny_assets
    root = tmp_path_factory.mktemp("merge-adapters")
    return {
        name: make_peft_adapter(model, root / name, r=8, init_std=2.0, **kw)
        for name, kw in MERGE_ADAPTERS.items()
    }


@pytest.fixture(scope="module")
def hub(merge_dirs: dict[str, Path]) -> Iterator[FakeHub]:
    fake = FakeHub().start()
    fake.add_repo("team/public-m1", merge_dirs["m1"])
    fake.add_repo("team/private-m2", merge_dirs["m2"], private=True, tokens=(SECRET,))
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def second_server(
    tiny_assets: tuple[Path, dict[str, Path]], hub: FakeHub, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """Another process on the same model (a "restart"), whose hub source is the fake hub."""
    model, _ = tiny_assets
    tmp = tmp_path_factory.mktemp("second")
    env = {
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp / "hf"),
        "HF_HUB_OFFLINE": "0",
        "LORAX_USE_GLOBAL_HF_TOKEN": "0",
        # huggingface_hub parses these as ints; fixed here so the hub client never depends on the CLI's default.
        "HF_HUB_ETAG_TIMEOUT": "30",
        "HF_HUB_DOWNLOAD_TIMEOUT": "30",
    }
    srv = start_server(
        model, tmp, "--adapter-source", "local", "--adapter-cache-dir", str(tmp / "cache"), env=env
    )
    yield srv
    srv.stop()


def post(server: ServerProcess, params: dict, inputs: str = PROMPTS[0], **kw) -> httpx.Response:
    return httpx.post(
        server.url + "/generate", json={"inputs": inputs, "parameters": params}, timeout=60, **kw
    )


def greedy(server: ServerProcess, params: dict, inputs: str = PROMPTS[0], **kw) -> dict:
    """Token ids (and logprobs, prompt ids) of a fixed-length greedy run."""
    full = {
        "max_new_tokens": NEW_TOKENS,
        "ignore_eos_token": True,
        "details": True,
        "decoder_input_details": True,
    }
    r = post(server, {**full, **params}, inputs, **kw)
    assert r.status_code == 200, r.text
    d = r.json()["details"]
    return {
        "text": r.json()["generated_text"],
        "ids": [t["id"] for t in d["tokens"]],
        "logprobs": [t["logprob"] for t in d["tokens"]],
        "prompt": [t["id"] for t in d["prefill"]],
    }


def merged(dirs: list[Path], weights: list[float], strategy: str = "linear", **kw) -> dict:
    spec = {"ids": [str(d) for d in dirs], "weights": weights, "merge_strategy": strategy, **kw}
    return {"merged_adapters": spec, "adapter_source": "local"}


@pytest.mark.parametrize(
    ("strategy", "kw"),
    [("linear", {}), ("ties", {"density": 0.6, "majority_sign_method": "total"})],
)
def test_merge_matches_peft_oracle_adapter(
    server: ServerProcess, merge_dirs: dict[str, Path], tmp_path: Path, strategy: str, kw: dict
) -> None:
    dirs, weights = [merge_dirs["m1"], merge_dirs["m2"], merge_dirs["m3"]], [0.6, 1.2, -0.4]
    sign = kw.get("majority_sign_method", "total")
    oracle = write_oracle_merge(dirs, weights, tmp_path / "oracle", strategy, kw.get("density", 1.0), sign)
    base = greedy(server, {})
    for prompt in PROMPTS:
        got = greedy(server, merged(dirs, weights, strategy, **kw), prompt)
        want = greedy(server, {"adapter_id": str(oracle), "adapter_source": "local"}, prompt)
        assert got["ids"] == want["ids"] and got["text"] == want["text"], prompt
        assert got["logprobs"] == pytest.approx(want["logprobs"], abs=1e-4)
    assert (
        greedy(server, merged(dirs, weights, strategy, **kw))["ids"] != base["ids"]
    )  # the merge does something
    if strategy == "linear":  # and the oracle adapter is what transformers + PEFT make of it
        ref = peft_greedy(server.model_dir, oracle, got["prompt"], NEW_TOKENS)
        assert got["ids"] == ref


def test_dare_is_deterministic_within_and_across_processes(
    server: ServerProcess, second_server: ServerProcess, merge_dirs: dict[str, Path]
) -> None:
    dirs = [merge_dirs["m1"], merge_dirs["m2"], merge_dirs["m3"]]
    for strategy in ("dare_linear", "dare_ties"):
        params = merged(dirs, [1.0, 0.7, 0.5], strategy, density=0.5, majority_sign_method="frequency")
        first = greedy(server, params)
        assert greedy(server, params) == first, strategy
        assert greedy(second_server, params) == first, f"{strategy} changed across a restart"
        plain = greedy(server, merged(dirs, [1.0, 0.7, 0.5], "linear"))
        assert first["logprobs"] != plain["logprobs"], f"{strategy} dropped nothing"


def error_of(route: str, r: httpx.Response) -> dict:
    """The error body: a 422 on /generate; on /generate_stream LoRAX's one event on a 200 stream,
    unless the body does not even parse into a request (a 422 before the route runs)."""
    if route == "/generate" or r.status_code == 422:
        assert r.status_code == 422, r.text
        return r.json()
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
    return json.loads(r.text.strip().removeprefix("data:"))


@pytest.mark.parametrize(
    ("merge", "extra", "needle"),
    [
        ({"ids": [], "weights": []}, {}, "at least one adapter ID"),
        ({"ids": ["m1", "m2"], "weights": [1.0]}, {}, "number of adapter IDs must match"),
        ({"ids": ["m1", "m2"], "weights": [1, 1], "merge_strategy": "ties", "density": 1.5}, {}, "`density`"),
        ({"ids": ["m1", "m2"], "weights": [1, 1], "merge_strategy": "ties", "density": 0.0}, {}, "`density`"),
        ({"ids": ["m1", "m2"], "weights": [1, 1], "merge_strategy": "mean"}, {}, "merge_strategy"),
        ({"ids": ["m1", "m2"], "weights": [1, 1], "majority_sign_method": "x"}, {}, "majority_sign_method"),
        ({"ids": ["m1", "m2"], "weights": [1, 1]}, {"adapter_id": "m1"}, "at most one of `adapter_id`"),
    ],
)
def test_invalid_specs_are_422_json(server: ServerProcess, merge: dict, extra: dict, needle: str) -> None:
    for route in ("/generate", "/generate_stream"):
        r = httpx.post(
            server.url + route, json={"inputs": "hi", "parameters": {"merged_adapters": merge, **extra}}
        )
        err = error_of(route, r)
        assert err["error_type"] == "validation" and needle in err["error"], err


def test_different_ranks_are_422_naming_the_ranks(server: ServerProcess) -> None:
    alpha, beta = server.adapters["alpha"], server.adapters["beta"]  # r=4 and r=8
    for route in ("/generate", "/generate_stream"):
        r = httpx.post(
            server.url + route, json={"inputs": "hi", "parameters": merged([alpha, beta], [1.0, 1.0])}
        )
        body = error_of(route, r)
        assert body["error_type"] == "validation" and "r=4" in body["error"] and "r=8" in body["error"], body


def test_single_id_is_the_plain_adapter(server: ServerProcess, merge_dirs: dict[str, Path]) -> None:
    # LoRAX serves a one-id spec as that adapter, whatever its weight.
    got = greedy(server, merged([merge_dirs["m2"]], [0.25], "ties", density=0.3))
    assert got == greedy(server, {"adapter_id": str(merge_dirs["m2"]), "adapter_source": "local"})


@pytest.mark.skipif(not Path(LORAX_PYTHON).is_file(), reason="lorax-client venv not found")
def test_lorax_client_merged_adapters_round_trip(server: ServerProcess, merge_dirs: dict[str, Path]) -> None:
    ids = [str(merge_dirs["m1"]), str(merge_dirs["m3"])]
    names = {"m1": merge_dirs["m1"], "m3": merge_dirs["m3"], "alpha": server.adapters["alpha"]}
    out = run_client(
        dataclasses.replace(server, adapters=names),
        f"""
        from lorax.types import MergedAdapters
        ma = MergedAdapters(ids=[adapters["m1"], adapters["m3"]], weights=[0.8, 0.5], merge_strategy="ties",
                            density=0.7, majority_sign_method="frequency")
        r = client.generate("hello world", max_new_tokens={NEW_TOKENS}, ignore_eos_token=True,
                            merged_adapters=ma, adapter_source="local")
        out["text"] = r.generated_text
        out["ids"] = [t.id for t in r.details.tokens]
        events = list(client.generate_stream("hello world", max_new_tokens={NEW_TOKENS}, ignore_eos_token=True,
                                             merged_adapters=ma, adapter_source="local"))
        out["stream_ids"] = [e.token.id for e in events]
        bad = MergedAdapters(ids=[adapters["m1"], adapters["alpha"]], weights=[1, 1], density=0.0)
        expect_error("ranks", lambda: client.generate("hi", merged_adapters=bad, adapter_source="local"))
    """,
    )
    spec = {"ids": ids, "weights": [0.8, 0.5], "merge_strategy": "ties", "density": 0.7}
    want = greedy(
        server, {"merged_adapters": {**spec, "majority_sign_method": "frequency"}, "adapter_source": "local"}
    )
    assert out["ids"] == want["ids"] == out["stream_ids"] and out["text"] == want["text"]
    assert out["ranks"][0] == "ValidationError" and "different ranks" in out["ranks"][1]


def test_mixed_batch_rows_match_each_row_alone(server: ServerProcess, merge_dirs: dict[str, Path]) -> None:
    dirs = [merge_dirs["m1"], merge_dirs["m2"], merge_dirs["m3"]]
    rows = [
        (merged(dirs, [0.6, 1.2, -0.4]), PROMPTS[0]),
        (merged(dirs[:2], [1.0, 0.5], "ties", density=0.5), PROMPTS[1]),
        (merged(dirs, [1.0, 0.7, 0.5], "dare_ties", density=0.5), PROMPTS[0]),
        ({"adapter_id": str(dirs[0]), "adapter_source": "local"}, PROMPTS[1]),
        ({}, PROMPTS[0]),
        (merged(dirs, [0.6, 1.2, -0.4]), PROMPTS[1]),
    ]
    alone = [greedy(server, p, text) for p, text in rows]

    async def together() -> list[dict]:
        full = {"max_new_tokens": NEW_TOKENS, "ignore_eos_token": True, "details": True}
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            calls = [
                client.post("/generate", json={"inputs": t, "parameters": {**full, **p}}) for p, t in rows * 2
            ]
            return [r.json() for r in await asyncio.gather(*calls)]

    for i, body in enumerate(asyncio.run(together())):
        want = alone[i % len(rows)]
        assert [t["id"] for t in body["details"]["tokens"]] == want["ids"], f"row {i % len(rows)}"
        assert [t["logprob"] for t in body["details"]["tokens"]] == pytest.approx(want["logprobs"], abs=1e-4)
    assert len({json.dumps(a["ids"]) for a in alone}) >= 4  # the rows really differ


def test_private_adapter_among_ids_needs_its_token(
    second_server: ServerProcess, server: ServerProcess, merge_dirs: dict[str, Path]
) -> None:
    spec = {"ids": ["team/public-m1", "team/private-m2"], "weights": [0.9, 0.4], "merge_strategy": "linear"}
    params = {"merged_adapters": spec, "adapter_source": "hub"}
    assert post(second_server, params).status_code == 401
    assert post(second_server, {**params, "api_token": "hf_wrong"}).status_code == 401
    got = greedy(second_server, {**params, "api_token": SECRET})
    header = greedy(second_server, params, headers={"Authorization": f"Bearer {SECRET}"})
    assert got == header
    # The same tensors from local copies give the same generation on the other process.
    assert got["ids"] == greedy(server, merged([merge_dirs["m1"], merge_dirs["m2"]], [0.9, 0.4]))["ids"]
    # A cached merge does not bypass the check.
    r = post(second_server, params)
    assert r.status_code == 401 and r.json()["error_type"] == "validation"
    assert SECRET not in r.text and SECRET not in second_server.log()


def test_openai_completions_take_merged_adapters(server: ServerProcess, merge_dirs: dict[str, Path]) -> None:
    params = merged([merge_dirs["m1"], merge_dirs["m2"]], [0.7, 0.3], "ties", density=0.8)
    body = {
        "prompt": PROMPTS[1],
        "max_tokens": NEW_TOKENS,
        "temperature": 0,
        "ignore_eos_token": True,
        **params,
    }
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == greedy(server, params, PROMPTS[1])["text"]
    bad = httpx.post(
        server.url + "/v1/completions", json={**body, "model": str(merge_dirs["m1"])}, timeout=60
    )
    assert bad.status_code == 422 and "at most one of" in bad.json()["error"]["message"]
