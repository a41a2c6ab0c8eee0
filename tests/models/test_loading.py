"""Checkpoint layouts and dtypes: sharded safetensors, and low-precision serving."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraserve.engine.engine import Engine, EngineConfig
from loraserve.models.weights import checkpoint_files
from tests.fixtures.tiny_models import load_hf_model, make_tokenizer

PROMPT = [1, 17, 33, 90, 5, 61, 7, 200, 3]


def small_engine(path: Path, dtype: str = "float32") -> Engine:
    return Engine.from_pretrained(
        path, EngineConfig(dtype=dtype, kv_cache_memory_bytes=16 << 20, adapter_memory_bytes=16 << 20)
    )


def test_sharded_checkpoint_loads_like_the_single_file(llama_dir: Path, tmp_path: Path) -> None:
    sharded = tmp_path / "sharded"
    load_hf_model(llama_dir).save_pretrained(sharded, max_shard_size="100KB")
    make_tokenizer(sharded)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(checkpoint_files(sharded)) > 1
    torch.testing.assert_close(
        small_engine(sharded).prompt_logits(PROMPT), small_engine(llama_dir).prompt_logits(PROMPT)
    )


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_serving_tracks_float32(llama_dir: Path, dtype: str) -> None:
    ref = small_engine(llama_dir).prompt_logits(PROMPT)
    low = small_engine(llama_dir, dtype).prompt_logits(PROMPT)
    assert low.dtype == torch.float32  # logits are always returned in float32 for sampling
    assert (low - ref).abs().max() < 0.05 * ref.abs().max()
