"""`hub` adapters through the real `huggingface_hub` client against a loopback hub."""

from __future__ import annotations

import asyncio
import logging

import pytest

from loraserve.adapters.errors import AdapterAuthError, AdapterError, AdapterNotFoundError
from loraserve.adapters.sources import AdapterUnavailableError
from tests.adapters.adapter_asserts import assert_same_weights

TOKEN = "hf_user_secret_token_123"


def test_public_repo_source_omitted_and_hub(make_store, fake_hub, peft_adapters):
    fake_hub.add_repo("org/public-lora", peft_adapters["qv"])
    store = make_store(hub=fake_hub)

    async def both():
        return await store.get("org/public-lora", None, None), await store.get("org/public-lora", "hub", None)

    first, second = asyncio.run(both())
    assert_same_weights(first, peft_adapters["qv"])
    assert second is first  # one cache entry for "default source" and explicit "hub"
    assert fake_hub.count("GET", "/resolve/") == 2  # config + safetensors, downloaded once
    assert fake_hub.count("GET", "/resolve/main/") == 0  # files are fetched by pinned commit sha


def test_revision_at_syntax_and_parameter(make_store, fake_hub, peft_adapters):
    old = fake_hub.add_repo("org/versioned", peft_adapters["qv"])
    new = fake_hub.add_repo("org/versioned", peft_adapters["all"])  # new commit on main
    fake_hub.add_repo("org/versioned", peft_adapters["mlp"], branch="exp")
    store = make_store(hub=fake_hub)
    latest = asyncio.run(store.get("org/versioned", "hub", None))
    assert_same_weights(latest, peft_adapters["all"]) and latest.key.endswith(new)
    pinned = asyncio.run(store.get(f"org/versioned@{old}", "hub", None))
    assert_same_weights(pinned, peft_adapters["qv"])
    assert asyncio.run(store.get("org/versioned", "hub", None, revision=old)) is pinned
    assert_same_weights(asyncio.run(store.get("org/versioned@exp", "hub", None)), peft_adapters["mlp"])
    with pytest.raises(AdapterNotFoundError):
        asyncio.run(store.get("org/versioned", "hub", None, revision="no-such-branch"))
    with pytest.raises(AdapterError, match="names revision"):
        asyncio.run(store.get("org/versioned@exp", "hub", None, revision="main"))


def test_missing_repo_and_non_adapter_repo(make_store, fake_hub, peft_adapters):
    fake_hub.add_repo("org/not-an-adapter", {"README.md": b"hi"})
    store = make_store(hub=fake_hub)
    with pytest.raises(AdapterAuthError):  # unauthenticated: the hub cannot tell missing from private
        asyncio.run(store.get("org/nothing", None, None))
    with pytest.raises(AdapterError, match="not a PEFT LoRA adapter") as e:
        asyncio.run(store.get("org/not-an-adapter", None, None))
    assert e.value.status_code == 400


def test_private_repo_needs_right_token(make_store, fake_hub, peft_adapters, caplog):
    caplog.set_level(logging.DEBUG)
    fake_hub.add_repo("org/private-lora", peft_adapters["qv"], private=True, tokens=(TOKEN,))
    fake_hub.add_token("hf_someone_else")
    store = make_store(hub=fake_hub)
    for token, status in ((None, 401), ("hf_wrong_token", 401), ("hf_someone_else", 404)):
        with pytest.raises(AdapterError) as e:
            asyncio.run(store.get("org/private-lora", "hub", token))
        assert e.value.status_code == status
        assert token is None or token not in str(e.value)
    adapter = asyncio.run(store.get("org/private-lora", "hub", TOKEN))
    assert_same_weights(adapter, peft_adapters["qv"])
    assert TOKEN not in caplog.text and "hf_wrong_token" not in caplog.text


def test_cached_private_adapter_rechecked_every_request(make_store, fake_hub, peft_adapters):
    fake_hub.add_repo("org/private-lora", peft_adapters["qv"], private=True, tokens=(TOKEN,))
    store = make_store(hub=fake_hub, auth_ttl_s=0.0)
    asyncio.run(store.get("org/private-lora", "hub", TOKEN))
    # Cached now, but a request without the token, or with a wrong one, is still refused.
    for token in (None, "hf_wrong"):
        with pytest.raises(AdapterAuthError):
            asyncio.run(store.get("org/private-lora", "hub", token))
    asyncio.run(store.get("org/private-lora", "hub", TOKEN))
    fake_hub.revoke(TOKEN)  # token revoked after caching
    with pytest.raises(AdapterAuthError) as e:
        asyncio.run(store.get("org/private-lora", "hub", TOKEN))
    assert e.value.status_code == 401 and TOKEN not in str(e.value)
    stats = store.stats()
    assert stats["loads"] == 1 and stats["auth_failures"] == 3


def test_auth_result_cached_briefly(make_store, fake_hub, peft_adapters):
    fake_hub.add_repo("org/private-lora", peft_adapters["qv"], private=True, tokens=(TOKEN,))
    store = make_store(hub=fake_hub, auth_ttl_s=60.0)

    async def many():
        return [await store.get("org/private-lora", "hub", TOKEN) for _ in range(5)]

    assert len({id(a) for a in asyncio.run(many())}) == 1
    assert fake_hub.count("GET", "/api/models/") == 1
    with pytest.raises(AdapterAuthError):  # a different (missing) token is checked on its own
        asyncio.run(store.get("org/private-lora", "hub", None))


@pytest.mark.parametrize("flag", [True, False])
def test_global_hf_token_flag(make_store, fake_hub, peft_adapters, monkeypatch, flag):
    server_token = "hf_server_own_token"
    fake_hub.add_repo("org/private-lora", peft_adapters["qv"], private=True, tokens=(server_token,))
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", server_token)
    monkeypatch.setenv("HF_TOKEN", server_token)
    monkeypatch.setenv("LORAX_USE_GLOBAL_HF_TOKEN", "1" if flag else "0")
    store = make_store(hub=fake_hub, use_global_hf_token=None)  # read from the environment
    if flag:
        assert_same_weights(asyncio.run(store.get("org/private-lora", "hub", None)), peft_adapters["qv"])
    else:  # the server's token (even in HF_TOKEN, which huggingface_hub itself would pick up) is not used
        with pytest.raises(AdapterAuthError):
            asyncio.run(store.get("org/private-lora", "hub", None))
    # A caller's own token is always the one used, flag or not.
    with pytest.raises(AdapterAuthError):
        asyncio.run(store.get("org/private-lora", "hub", "hf_callers_bad_token"))


def test_offline_mode_uses_disk_cache(make_store, fake_hub, peft_adapters):
    fake_hub.add_repo("org/public-lora", peft_adapters["all"])
    asyncio.run(make_store(hub=fake_hub).get("org/public-lora", "hub", None))
    fake_hub.stop()
    offline = make_store(hub_offline=True)  # no endpoint reachable at all
    assert_same_weights(asyncio.run(offline.get("org/public-lora", "hub", None)), peft_adapters["all"])
    with pytest.raises(AdapterNotFoundError):
        asyncio.run(offline.get("org/never-downloaded", "hub", None))


def test_hub_down_keeps_public_adapters_but_not_private(make_store, fake_hub, peft_adapters):
    fake_hub.add_repo("org/public-lora", peft_adapters["qv"])
    fake_hub.add_repo("org/private-lora", peft_adapters["mlp"], private=True, tokens=(TOKEN,))
    store = make_store(hub=fake_hub, auth_ttl_s=0.0)
    public = asyncio.run(store.get("org/public-lora", "hub", None))
    asyncio.run(store.get("org/private-lora", "hub", TOKEN))
    fake_hub.stop()
    assert asyncio.run(store.get("org/public-lora", "hub", None)) is public
    with pytest.raises(AdapterUnavailableError) as e:
        asyncio.run(store.get("org/private-lora", "hub", TOKEN))
    assert e.value.status_code == 503


def test_standard_hf_environment_is_honoured(fake_hub, peft_adapters, monkeypatch, tmp_path):
    from loraserve.adapters.sources import HubSource

    sha = fake_hub.add_repo("org/env-lora", peft_adapters["qv"])
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    path, revision = HubSource().download("org/env-lora")
    assert revision == sha and path.is_relative_to(tmp_path / "hf-home" / "hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fake_hub.stop()
    assert HubSource().download("org/env-lora") == (path, sha)
