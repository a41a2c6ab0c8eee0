"""`local` adapters: file layouts PEFT writes, unsafe pickles, and path restrictions."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraserve.adapters.errors import AdapterError, AdapterForbiddenError, AdapterNotFoundError
from tests.adapters.adapter_asserts import assert_same_weights


def _copy(src: Path, dst: Path, files: tuple[str, ...]) -> Path:
    dst.mkdir(parents=True)
    for f in files:
        shutil.copy(src / f, dst / f)
    return dst


def _write_bin_from(src: Path, dst: Path, scale: float = 1.0) -> None:
    sd = {k: v * scale for k, v in load_file(str(src / "adapter_model.safetensors")).items()}
    torch.save(sd, dst / "adapter_model.bin")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_safetensors_only(make_store, peft_adapters, tmp_path):
    d = _copy(peft_adapters["qv"], tmp_path / "st", ("adapter_config.json", "adapter_model.safetensors"))
    adapter = asyncio.run(make_store().get(str(d), "local", None))
    assert_same_weights(adapter, peft_adapters["qv"])
    assert adapter.target_modules == ("q_proj", "v_proj") and adapter.rank == 4


def test_bin_only(make_store, peft_adapters, tmp_path):
    d = _copy(peft_adapters["all"], tmp_path / "bin", ("adapter_config.json",))
    _write_bin_from(peft_adapters["all"], d)
    adapter = asyncio.run(make_store().get(str(d), "local", None))
    assert_same_weights(adapter, peft_adapters["all"])


def test_both_files_safetensors_wins(make_store, peft_adapters, tmp_path):
    d = _copy(peft_adapters["qv"], tmp_path / "both", ("adapter_config.json", "adapter_model.safetensors"))
    _write_bin_from(peft_adapters["qv"], d, scale=-3.0)  # different weights: must be ignored
    adapter = asyncio.run(make_store().get(str(d), "local", None))
    assert_same_weights(adapter, peft_adapters["qv"])


def test_malicious_pickle_refused(make_store, peft_adapters, tmp_path):
    d = _copy(peft_adapters["qv"], tmp_path / "evil", ("adapter_config.json",))
    marker = tmp_path / "pwned"
    torch.save({"payload": _Evil(marker)}, d / "adapter_model.bin")
    with pytest.raises(AdapterError) as e:
        asyncio.run(make_store().get(str(d), "local", None))
    assert e.value.status_code == 400 and "pickled code is refused" in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("bad", ["{root}/../{name}", "{root}/sub/../../{name}"])
def test_path_with_dotdot_refused(make_store, peft_adapters, tmp_path, bad):
    root = tmp_path / "allowed"
    root.mkdir()
    _copy(peft_adapters["qv"], tmp_path / "outside", ("adapter_config.json", "adapter_model.safetensors"))
    store = make_store()  # even with no root restriction, `..` is refused outright
    with pytest.raises(AdapterForbiddenError) as e:
        asyncio.run(store.get(bad.format(root=root, name="outside"), "local", None))
    assert e.value.status_code == 403


def test_allowed_roots(make_store, peft_adapters, tmp_path):
    root = tmp_path / "allowed"
    inside = _copy(peft_adapters["qv"], root / "a", ("adapter_config.json", "adapter_model.safetensors"))
    outside = _copy(peft_adapters["qv"], tmp_path / "b", ("adapter_config.json", "adapter_model.safetensors"))
    link = root / "escape"
    link.symlink_to(outside)  # a symlink cannot smuggle a path out of the root
    store = make_store(allowed_local_roots=[root])
    assert asyncio.run(store.get(str(inside), "local", None)).rank == 4
    for path in (outside, link):
        with pytest.raises(AdapterForbiddenError):
            asyncio.run(store.get(str(path), "local", None))


def test_missing_dir_and_missing_weights(make_store, peft_adapters, tmp_path):
    store = make_store()
    with pytest.raises(AdapterNotFoundError):
        asyncio.run(store.get(str(tmp_path / "nope"), "local", None))
    d = _copy(peft_adapters["qv"], tmp_path / "cfg-only", ("adapter_config.json",))
    with pytest.raises(AdapterNotFoundError, match="not a readable adapter directory"):
        asyncio.run(store.get(str(d), "local", None))


def test_server_caches_are_never_local_adapters(make_store, peft_adapters, tmp_path):
    """Issue 17: a private adapter downloaded into a cache must not be readable as a local path."""
    store = make_store(allowed_local_roots=[tmp_path])  # even inside an allowed root
    files = ("adapter_config.json", "adapter_model.safetensors")
    in_hub = _copy(peft_adapters["qv"], tmp_path / "hf-cache" / "models--o--r" / "snapshots" / "abc", files)
    in_s3 = _copy(peft_adapters["qv"], tmp_path / "cache" / "s3" / "digest", files)
    linked = tmp_path / "links"
    linked.mkdir()
    for f in files:  # a directory of symlinks into the cache is the cache
        (linked / f).symlink_to(in_hub / f)
    for path in (in_hub, in_s3, tmp_path / "hf-cache", linked):
        with pytest.raises(AdapterForbiddenError, match="own adapter cache"):
            asyncio.run(store.get(str(path), "local", None))
    ok = _copy(peft_adapters["qv"], tmp_path / "mine", files)
    assert asyncio.run(store.get(str(ok), "local", None)).rank == 4


def test_nul_byte_is_a_400(make_store, tmp_path):
    with pytest.raises(AdapterError, match="NUL") as e:
        asyncio.run(make_store().get(f"{tmp_path}/a\x00b", "local", None))
    assert e.value.status_code == 400
