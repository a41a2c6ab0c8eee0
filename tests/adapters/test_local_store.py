"""`local_adapter_store`: the store with only the `local` source loads, validates and refuses like a full one.

It replaced a separate local-directory loader (used by `loraserve generate` and
servers built without remote sources), so these tests pin what that loader
did: LoRA, Medusa and LoRA + Medusa directories, caching, and clear refusals.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from loraserve.adapters.errors import AdapterError, AdapterNotFoundError
from loraserve.adapters.store import AdapterStore, local_adapter_store
from loraserve.models.config import ModelConfig
from tests.adapters.adapter_asserts import assert_same_weights
from tests.fixtures.medusa_heads import add_medusa_heads, make_medusa_adapter

H, V = 64, 384  # tiny_llama's hidden size and vocabulary


@pytest.fixture
def store(tiny_llama: Path) -> Iterator[AdapterStore]:
    s = local_adapter_store(ModelConfig.from_dir(tiny_llama), max_rank=16)
    yield s
    s.close()


def test_loads_lora_and_caches_it(store: AdapterStore, peft_adapters: dict[str, Path]) -> None:
    path = str(peft_adapters["qv"])
    adapter = asyncio.run(store.get(path, "local", None))
    assert_same_weights(adapter, peft_adapters["qv"])
    assert store.get_blocking(path) is adapter  # `local` is the default source
    stats = store.stats()
    assert (stats["loads"], stats["hits"], stats["misses"]) == (1, 1, 1)
    assert adapter.key.startswith("local:")


def test_loads_medusa_alone_and_with_lora(
    store: AdapterStore, peft_adapters: dict[str, Path], tmp_path: Path
) -> None:
    heads_only = store.get_blocking(str(make_medusa_adapter(tmp_path / "medusa", H, V, num_heads=2)))
    assert heads_only.medusa is not None and heads_only.medusa.num_heads == 2 and not heads_only.modules
    both_dir = add_medusa_heads(shutil.copytree(peft_adapters["qv"], tmp_path / "qv-medusa"), H, V)
    both = store.get_blocking(str(both_dir))
    assert both.medusa is not None and both.modules


def test_other_sources_are_refused_naming_local(store: AdapterStore) -> None:
    for source in ("hub", "s3", "pbase"):
        with pytest.raises(AdapterError, match=rf"'{source}' is not enabled here; enabled: local"):
            store.get_blocking("org/adapter", source)
    with pytest.raises(AdapterError, match="unknown adapter_source"):
        store.get_blocking("org/adapter", "ftp")


def test_missing_directory_is_not_found(store: AdapterStore, tmp_path: Path) -> None:
    """A missing and an empty directory answer alike: callers cannot probe which paths exist."""
    with pytest.raises(AdapterNotFoundError, match="not a readable adapter directory"):
        store.get_blocking(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterNotFoundError, match="not a readable adapter directory"):
        store.get_blocking(str(tmp_path / "empty"))


def test_fit_checks_apply(store: AdapterStore, peft_adapters: dict[str, Path], tmp_path: Path) -> None:
    """The same validation as a full server: shapes, rank limit and Medusa hidden size."""
    small = local_adapter_store(store.model_config, max_rank=4)
    try:
        with pytest.raises(AdapterError, match="maximum LoRA rank 4"):
            small.get_blocking(str(peft_adapters["all"]))  # rank 8
    finally:
        small.close()
    renamed = shutil.copytree(peft_adapters["qv"], tmp_path / "renamed")
    weights = renamed / "adapter_model.safetensors"
    sd = {k.replace("q_proj", "qkv_proj"): v for k, v in load_file(str(weights)).items()}
    save_file(sd, str(weights))
    with pytest.raises(AdapterError, match="'qkv_proj'.*does not have"):
        store.get_blocking(str(renamed))
    with pytest.raises(AdapterError, match="hidden size 32"):
        store.get_blocking(str(make_medusa_adapter(tmp_path / "narrow", 32, V)))
