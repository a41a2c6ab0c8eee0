"""Routing keys: the adapter a request is served with, never its token (no Ray needed)."""

from __future__ import annotations

import json

from loraserve.distributed.keys import adapter_ref

BASE = "demo/model"


def ref(path: str, body: dict, headers: list[tuple[bytes, bytes]] | None = None, default: str = "hub"):
    return adapter_ref(path, json.dumps(body).encode(), headers or [], model_id=BASE, default_source=default)


def test_lorax_and_openai_requests_for_one_adapter_share_a_key() -> None:
    lorax = ref("/generate", {"inputs": "x", "parameters": {"adapter_id": "a/b", "adapter_source": "local"}})
    stream = ref("/generate_stream", {"inputs": "x", "parameters": {"adapter_id": "a/b"}}, default="local")
    openai = ref("/v1/chat/completions", {"model": "a/b", "adapter_source": "LOCAL", "messages": []})
    assert lorax is not None and lorax.key == "local:a/b" == stream.key == openai.key
    assert lorax.source == "local" and stream.source is None  # the replica applies its own default


def test_base_model_other_routes_and_bad_bodies_have_no_key() -> None:
    assert ref("/generate", {"inputs": "x"}) is None
    assert ref("/v1/completions", {"model": BASE, "prompt": "x"}) is None
    assert ref("/v1/completions", {"model": "", "prompt": "x"}) is None
    assert ref("/tokenize", {"inputs": "x", "parameters": {"adapter_id": "a"}}) is None
    assert adapter_ref("/generate", b"{nope", [], model_id=BASE, default_source="hub") is None
    assert ref("/generate", {"inputs": "x", "parameters": {"merged_adapters": {"ids": []}}}) is None


def test_private_sources_hash_ids_and_tokens_never_enter_keys() -> None:
    headers = [(b"authorization", b"Bearer hdr-secret")]
    r = ref(
        "/generate",
        {"inputs": "x", "parameters": {"adapter_id": "org/private", "api_token": "s3cr3t"}},
        headers,
    )
    assert r is not None and r.token == "s3cr3t"
    assert r.key.startswith("hub:sha256-") and "private" not in r.key and "s3cr3t" not in r.key
    assert "s3cr3t" not in repr(r)
    r2 = ref("/v1/completions", {"model": "org/private", "prompt": "x"}, headers)
    assert r2 is not None and r2.key == r.key and r2.token == "hdr-secret"  # same adapter, same replica


def test_merged_adapters_key_by_the_merge_spec() -> None:
    spec = {"ids": ["a", "b"], "weights": [0.5, 0.5], "merge_strategy": "linear"}
    one = ref("/generate", {"inputs": "x", "parameters": {"merged_adapters": spec, "adapter_source": "s3"}})
    same = ref(
        "/v1/completions", {"model": BASE, "merged_adapters": spec, "adapter_source": "s3", "prompt": "x"}
    )
    other = ref(
        "/generate", {"inputs": "x", "parameters": {"merged_adapters": {**spec, "weights": [0.6, 0.4]}}}
    )
    assert one is not None and one.key.startswith("merged:") and one.merge is not None
    assert same is not None and same.key == one.key
    assert other is not None and other.key != one.key
