"""Base models from the hub (loopback fake, real `huggingface_hub` client) and S3 (moto): the resolved
directory serves the same logits as the local copy, and every failure names what was tried and why."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from loraserve.engine.engine import Engine, EngineConfig
from loraserve.models.config import ModelLoadError
from loraserve.models.source import resolve_model
from tests.fixtures.fake_hub import FakeHub, files_of, point_hf_at
from tests.fixtures.s3_server import S3TestServer
from tests.fixtures.tiny_models import make_tiny_model

TOKEN = "hf_model_token_abc"
IDS = [1, 5, 9, 17, 33, 2, 8]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-base"), "llama")


@pytest.fixture(scope="module")
def tiny_other(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-base-2"), "llama", seed=7)


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    fake = FakeHub().start()
    point_hf_at(monkeypatch, fake, tmp_path / "hf-home")
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3TestServer]:
    server = S3TestServer().start()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server: S3TestServer, monkeypatch: pytest.MonkeyPatch) -> S3TestServer:
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


def _logits(path: Path) -> torch.Tensor:
    engine = Engine.from_pretrained(path, EngineConfig(kv_cache_memory_bytes=16 << 20))
    return engine.prompt_logits(IDS)


def _unneeded(directory: Path) -> dict[str, bytes]:
    """The checkpoint plus files the server never reads, which must not be downloaded."""
    return {
        **files_of(directory),
        "README.md": b"# card",
        "pytorch_model.bin": b"not read",
        "extra/x.txt": b"x",
    }


def test_hub_model_gives_the_local_logits_and_downloads_only_what_is_needed(hub, tiny, tmp_path) -> None:
    hub.add_repo("org/tiny", _unneeded(tiny))
    path = resolve_model("org/tiny")
    assert path.is_relative_to(tmp_path / "hf-home" / "hub")
    assert {p.name for p in path.iterdir()} == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert hub.count("GET", "pytorch_model.bin") == 0 and hub.count("GET", "README.md") == 0
    torch.testing.assert_close(_logits(path), _logits(tiny), rtol=0, atol=0)


def test_hub_revision_and_offline_cache(hub, tiny, tiny_other, monkeypatch: pytest.MonkeyPatch) -> None:
    old = hub.add_repo("org/versioned", files_of(tiny))
    hub.add_repo("org/versioned", files_of(tiny_other))  # new commit on main
    hub.add_repo("org/versioned", files_of(tiny), branch="exp")
    at_old = resolve_model("org/versioned", revision=old)
    at_main = resolve_model("org/versioned")
    at_exp = resolve_model("org/versioned", revision="exp")
    assert at_old.name == old and at_main.name != old
    torch.testing.assert_close(_logits(at_old), _logits(tiny), rtol=0, atol=0)
    torch.testing.assert_close(_logits(at_main), _logits(tiny_other), rtol=0, atol=0)
    torch.testing.assert_close(_logits(at_exp), _logits(tiny), rtol=0, atol=0)
    with pytest.raises(
        ModelLoadError, match=r"org/versioned@nope on the Hugging Face Hub .*: revision not found"
    ):
        resolve_model("org/versioned", revision="nope")
    # offline: the cache answers, without a request
    before = len(hub.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("org/versioned", revision="exp") == at_exp
    assert len(hub.requests) == before
    with pytest.raises(
        ModelLoadError, match=r"org/elsewhere@main .*: offline \(HF_HUB_OFFLINE=1\) and it is not in"
    ):
        resolve_model("org/elsewhere")


def test_private_hub_model_needs_a_token(hub, tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.add_repo("org/private", files_of(tiny), private=True, tokens=(TOKEN,))
    with pytest.raises(ModelLoadError) as e:
        resolve_model("org/private")
    assert "repository not found or private (a private repo needs HF_TOKEN" in str(e.value)
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(ModelLoadError, match="the token in HF_TOKEN was rejected") as e:
        resolve_model("org/private")
    assert "hf_wrong" not in str(e.value)
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", TOKEN)
    path = resolve_model("org/private")
    torch.testing.assert_close(_logits(path), _logits(tiny), rtol=0, atol=0)


def test_hub_failures_say_what_was_tried(hub, tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.add_repo(
        "org/bin-only", {"config.json": (tiny / "config.json").read_bytes(), "pytorch_model.bin": b"x"}
    )
    with pytest.raises(
        ModelLoadError, match=r"hub model org/bin-only@main has no \*\.safetensors weights \(it has"
    ):
        resolve_model("org/bin-only")
    with pytest.raises(
        ModelLoadError, match=r"tried org/missing@main on the Hugging Face Hub \(http://127"
    ) as e:
        resolve_model("org/missing")
    assert str(e.value).endswith("; nor is there a local directory org/missing")
    with pytest.raises(ModelLoadError, match="not a local directory and not a valid hub repo id"):
        resolve_model("no//such dir")
    with pytest.raises(ModelLoadError, match="no such directory"):
        resolve_model("org/tiny", source="local")
    with pytest.raises(ModelLoadError, match=r"/nowhere/m\.gguf: no such GGUF file .*--gguf-file"):
        resolve_model("/nowhere/m.gguf")
    with pytest.raises(ModelLoadError, match=r"\./nowhere: no such local directory or file$"):
        resolve_model("./nowhere")
    # gated: the hub's 403 with X-Error-Code GatedRepo
    handler = hub._server.RequestHandlerClass

    class Gated(handler):  # type: ignore[misc, valid-type]
        def _handle(self, head: bool) -> None:
            self._error(403, "Access to model org/gated is restricted.", "GatedRepo", head)

    hub._server.RequestHandlerClass = Gated
    with pytest.raises(ModelLoadError, match="org/gated@main .*: the repo is gated"):
        resolve_model("org/gated")
    hub.stop()  # unreachable
    with pytest.raises(ModelLoadError, match="the hub could not be reached"):
        resolve_model("org/tiny")


def test_s3_model_gives_the_local_logits_and_is_cached(s3, tiny, tmp_path) -> None:
    uri = s3.upload_dir(tiny, "models", "llama/tiny")
    s3.client().put_object(Bucket="models", Key="llama/tiny/README.md", Body=b"card")
    path = resolve_model(uri, source="s3", cache_dir=tmp_path)
    assert path.is_relative_to(tmp_path / "s3") and not (path / "README.md").exists()
    torch.testing.assert_close(_logits(path), _logits(tiny), rtol=0, atol=0)
    assert resolve_model(uri + "/", cache_dir=tmp_path) == path  # s3:// under the default source too


def test_s3_failures_say_what_was_tried(s3, tiny, tmp_path) -> None:
    s3.upload_dir(tiny, "models", "llama/tiny")
    with pytest.raises(ModelLoadError, match=r"tried s3://nobucket/x on S3: not found \(NoSuchBucket\)"):
        resolve_model("s3://nobucket/x", source="s3", cache_dir=tmp_path)
    with pytest.raises(ModelLoadError, match=r"tried s3://models/nothing on S3: not found"):
        resolve_model("s3://models/nothing", source="s3", cache_dir=tmp_path)
    s3.client().put_object(Bucket="models", Key="bin/config.json", Body=b"{}")
    s3.client().put_object(Bucket="models", Key="bin/pytorch_model.bin", Body=b"x")
    with pytest.raises(ModelLoadError, match=r"s3 model s3://models/bin has no \*\.safetensors weights"):
        resolve_model("s3://models/bin", source="s3", cache_dir=tmp_path)
    with pytest.raises(ModelLoadError, match="S3 models have no revisions"):
        resolve_model("s3://models/llama/tiny", source="s3", revision="main", cache_dir=tmp_path)
    with pytest.raises(ModelLoadError, match="must look like s3://bucket/prefix"):
        resolve_model("models/llama", source="s3", cache_dir=tmp_path)
