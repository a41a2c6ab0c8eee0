"""Prefix caching and chunked prefill through a real server: the flags and their environment
variables, `/metrics` block counters, and the same answers with the features on and off."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.fixtures.server import ServerProcess, start_server
from tests.server.test_metrics_lorax import scrape

SYSTEM = "You are a terse assistant. Answer in one word. " * 4
PARAMS = {"max_new_tokens": 6, "ignore_eos_token": True, "details": True}


@pytest.fixture(scope="module")
def plain_server(tiny_assets, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Caching off and chunking on, through the environment as LoRAX's launcher reads it."""
    model, adapters = tiny_assets
    env = {"PREFIX_CACHING": "false", "CHUNKED_PREFILL": "true", "PREFILL_CHUNK_TOKENS": "8"}
    srv = start_server(model, tmp_path_factory.mktemp("plain"), "--adapter-source", "local", env=env)
    srv.adapters = dict(adapters)
    yield srv
    srv.stop()


def generate(srv: ServerProcess, text: str, adapter: str | None = None, **extra) -> dict:
    params = {**PARAMS, **extra, **({"adapter_id": str(srv.adapters[adapter])} if adapter else {})}
    r = httpx.post(srv.url + "/generate", json={"inputs": text, "parameters": params}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def cache_counters(srv: ServerProcess) -> dict[str, float]:
    types, samples = scrape(srv.url)
    names = ("hits", "misses", "evictions")
    for n in names:
        assert types[f"loraserve_engine_prefix_cache_{n}_total"] == "counter"
    return {n: samples[f"loraserve_engine_prefix_cache_{n}_total"] for n in names}


def test_shared_prompts_hit_the_cache_and_answer_as_without_it(
    server: ServerProcess, plain_server: ServerProcess
) -> None:
    before = cache_counters(server)
    questions = [SYSTEM + q for q in ("Sky colour?", "Grass colour?", "Snow colour?")]
    for adapter in (None, "alpha"):
        for q in questions:
            cached, plain = generate(server, q, adapter), generate(plain_server, q, adapter)
            assert cached["generated_text"] == plain["generated_text"]
            toks = [t["id"] for t in cached["details"]["tokens"]]
            assert toks == [t["id"] for t in plain["details"]["tokens"]]
            assert cached["details"]["generated_tokens"] == plain["details"]["generated_tokens"]
    after = cache_counters(server)
    assert after["hits"] > before["hits"] and after["misses"] > before["misses"]
    assert cache_counters(plain_server) == {"hits": 0, "misses": 0, "evictions": 0}


def test_decoder_input_details_are_complete_on_a_cached_prompt(
    server: ServerProcess, plain_server: ServerProcess
) -> None:
    """Prompt logprobs need every position: such requests compute their whole prompt, so the
    details equal those of a server without caching (chunking never splits them either)."""
    q = SYSTEM + "Sea colour?"
    generate(server, q)  # cache the prompt first
    cached = generate(server, q, decoder_input_details=True)["details"]["prefill"]
    plain = generate(plain_server, q, decoder_input_details=True)["details"]["prefill"]
    assert [p["id"] for p in cached] == [p["id"] for p in plain] and len(cached) > 16
    for a, b in zip(cached, plain):
        assert (a["logprob"] is None) == (b["logprob"] is None)
        if a["logprob"] is not None:
            assert abs(a["logprob"] - b["logprob"]) < 1e-3
