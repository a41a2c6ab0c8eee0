"""`s3` (moto S3 server) and `pbase` (loopback Predibase gateway + the same S3 server)."""

from __future__ import annotations

import asyncio

import pytest

from loraserve.adapters.errors import (
    AdapterAuthError,
    AdapterError,
    AdapterForbiddenError,
    AdapterNotFoundError,
)
from loraserve.adapters.sources import AdapterNotReadyError
from loraserve.adapters.sources.pbase import split_pbase_id, storage_to_s3_uri
from tests.adapters.adapter_asserts import assert_same_weights

PB_TOKEN = "pb_user_secret_token"


def test_s3_adapter_and_disk_cache(make_store, s3_env, peft_adapters, tmp_path):
    uri = s3_env.upload_dir(peft_adapters["all"], "adapters-bucket", "teams/a/lora-all")
    store = make_store()
    adapter = asyncio.run(store.get(uri, "s3", None))
    assert_same_weights(adapter, peft_adapters["all"])
    assert asyncio.run(store.get(uri + "/", "s3", None)) is not None
    cached = list((tmp_path / "cache" / "s3").iterdir())
    assert len(cached) == 1 and {p.name for p in cached[0].iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    # A fresh store (a restarted server) finds the files on disk without downloading again.
    assert_same_weights(asyncio.run(make_store().get(uri, "s3", None)), peft_adapters["all"])


def test_s3_errors(make_store, s3_env, peft_adapters, monkeypatch):
    s3_env.upload_dir(peft_adapters["qv"], "err-bucket", "ok")
    store = make_store()
    with pytest.raises(AdapterNotFoundError):
        asyncio.run(store.get("s3://err-bucket/missing", "s3", None))
    with pytest.raises(AdapterNotFoundError):
        asyncio.run(store.get("s3://no-such-bucket/x", "s3", None))
    with pytest.raises(AdapterError, match="s3://bucket/prefix"):
        asyncio.run(store.get("err-bucket/ok", "s3", None))
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(AdapterForbiddenError, match="no S3 credentials"):
        asyncio.run(make_store().get("s3://err-bucket/ok", "s3", None))


def test_pbase_with_version_v2(make_store, s3_env, fake_pbase, peft_adapters):
    fake_pbase.tokens.add(PB_TOKEN)
    uri = s3_env.upload_dir(peft_adapters["qv"], "pbase-v2", "repos/my-repo/3")
    fake_pbase.add_v2("my-repo", "3", uri)
    store = make_store(pbase=fake_pbase)
    adapter = asyncio.run(store.get("my-repo/3", "pbase", PB_TOKEN))
    assert_same_weights(adapter, peft_adapters["qv"])
    assert fake_pbase.count("/v1/") == 0
    for token in (None, "pb_wrong"):  # cached, but the token is still checked per request
        with pytest.raises(AdapterAuthError) as e:
            asyncio.run(store.get("my-repo/3", "pbase", token))
        assert e.value.status_code == 401 and PB_TOKEN not in str(e.value)


def test_pbase_without_version_uses_legacy_latest(make_store, s3_env, fake_pbase, peft_adapters, monkeypatch):
    fake_pbase.tokens.add(PB_TOKEN)
    s3_env.upload_dir(peft_adapters["qv"], "predibase-bucket", "uuid-1/run-1/artifacts/model/model_weights")
    s3_env.upload_dir(peft_adapters["mlp"], "predibase-bucket", "uuid-2/run-7/artifacts/model/model_weights")
    fake_pbase.add_legacy("my-repo", "1", "uuid-1", "run-1")
    fake_pbase.add_legacy("my-repo", "2", "uuid-2", "run-7")
    monkeypatch.setenv("PREDIBASE_MODEL_BUCKET", "predibase-bucket")
    store = make_store(pbase=fake_pbase, pbase_bucket=None)  # bucket read from the environment
    assert_same_weights(asyncio.run(store.get("my-repo", "pbase", PB_TOKEN)), peft_adapters["mlp"])
    assert fake_pbase.count("/v2/") == 0 and fake_pbase.count("/v1/models/version/name/my-repo") == 1
    # A version unknown to v2 falls back to the legacy endpoint with ?version=.
    assert_same_weights(asyncio.run(store.get("my-repo/1", "pbase", PB_TOKEN)), peft_adapters["qv"])
    assert fake_pbase.count("/v2/repos/my-repo/version/1") == 1 and fake_pbase.count("?version=1") == 1


def test_pbase_not_ready_and_missing(make_store, s3_env, fake_pbase, peft_adapters):
    fake_pbase.tokens.add(PB_TOKEN)
    fake_pbase.add_v2("my-repo", "4", "s3://pbase-v2/never-uploaded", status="training")
    store = make_store(pbase=fake_pbase)
    with pytest.raises(AdapterNotReadyError, match="training"):
        asyncio.run(store.get("my-repo/4", "pbase", PB_TOKEN))
    with pytest.raises(AdapterNotFoundError):
        asyncio.run(store.get("other-repo/1", "pbase", PB_TOKEN))
    with pytest.raises(AdapterError, match="model_repo"):
        asyncio.run(store.get("a/b/c", "pbase", PB_TOKEN))


def test_pbase_path_rules():
    assert storage_to_s3_uri("s3://b/k/x", "env-bucket") == "s3://b/k/x"
    assert storage_to_s3_uri("k/x/", "env-bucket") == "s3://env-bucket/k/x/"
    assert storage_to_s3_uri("first/k/x", None) == "s3://first/k/x"
    assert split_pbase_id("repo/7", None) == ("repo", "7")
    assert split_pbase_id("repo", None) == ("repo", None)
